"""One error boundary: the public entry points of p2pcompute.tasks raise only p2pcompute.errors.

Each of these used to raise a bare ValueError, TypeError or RuntimeError (the service ones
through the registry, the params check and the cores' config checks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from conftest import TEST_CAPACITY
from test_ledger import PROVIDER, make_receipt

from p2pcompute.errors import ConfigError, LocalProtocolError, P2PComputeError
from p2pcompute.identity import Identity
from p2pcompute.overlay import open_node
from p2pcompute.tasks import negotiation as n
from p2pcompute.tasks.builtin import builtin_registry
from p2pcompute.tasks.driver import open_tasks
from p2pcompute.tasks.frames import need_lane
from p2pcompute.tasks.ledger import Ledger
from p2pcompute.tasks.messages import Offer, Resources, seal_offer
from p2pcompute.tasks.registry import TaskRegistry, check_params


def test_registry_misuse_is_a_config_error() -> None:
    reg = TaskRegistry()
    reg.register("ok", lambda tensors, params: {})
    for call in (
        lambda: reg.register("ok", lambda tensors, params: {}),
        lambda: reg.register("bad name", lambda tensors, params: {}),
        lambda: reg.register("f", 3),  # type: ignore[arg-type]
        lambda: reg.register("p", lambda tensors, params: {}, price=-1.0),
    ):
        with pytest.raises(ConfigError):
            call()


def test_bad_params_are_a_local_protocol_error() -> None:
    for params in ([1], {"o": object()}, {"b": b"x" * 70_000}):
        with pytest.raises(LocalProtocolError):
            check_params(params)  # type: ignore[arg-type]


def test_sealing_someone_elses_offer_is_a_local_protocol_error() -> None:
    me, other = Identity.generate(), Identity.generate()
    offer = Offer(
        b"\x01" * 16, b"\x02" * 16, other.peer_id, me.peer_id, "k", 0.0, 0.0, 1, 1, 1,
        Resources(), 10.0, 1.0, 5.0,
    )  # fmt: skip
    with pytest.raises(LocalProtocolError):
        seal_offer(offer, me)


def test_ledger_misuse_is_a_local_protocol_error(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.jsonl", owner=PROVIDER.peer_id)
    with pytest.raises(LocalProtocolError, match="role"):
        ledger.append(make_receipt(1), "buyer")
    with pytest.raises(LocalProtocolError, match="owner"):
        ledger.append(make_receipt(1), "requester")
    ledger.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        ledger.append(make_receipt(1), "provider")


def test_core_misuse_is_a_config_or_local_protocol_error() -> None:
    with pytest.raises(ConfigError):
        n.ProviderCore("p", {}, n.ProviderConfig(capacity=0))
    for bad in ({"items": 0}, {"parallel": 0}, {"retries": -1}):
        with pytest.raises(ConfigError):
            n.JobSpec("k", **bad)  # type: ignore[arg-type]
    core = n.RequesterCore("r", n.JobSpec("k"))
    core.start(0.0)
    with pytest.raises(LocalProtocolError):
        core.start(1.0)


def test_every_error_here_is_in_the_hierarchy() -> None:
    assert issubclass(ConfigError, P2PComputeError)
    assert issubclass(LocalProtocolError, P2PComputeError)


def test_a_lease_without_a_lane_is_a_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="lane"):
        need_lane(None)


async def test_service_entry_points_refuse_misuse_with_the_hierarchy() -> None:
    with trio.fail_after(60):
        async with open_node(capacity=TEST_CAPACITY) as node:
            with pytest.raises(ConfigError):
                async with open_tasks(node, builtin_registry(), capacity=0):
                    pass
            async with open_tasks(node) as tasks:
                with pytest.raises(LocalProtocolError):
                    await tasks.run_task("matmul", {}, {"o": object()})
                with pytest.raises(ConfigError):
                    await tasks.run_task("matmul", {}, {}, parallel=0)
                with pytest.raises(ConfigError):
                    await tasks.map_tasks("matmul", [({}, {})], retries=-1)
