"""Real py-libp2p nodes on 127.0.0.1 buying and selling tasks.

Covers: a task end to end with receipts in both ledgers; a provider killed mid-lease
and the task completing elsewhere; forged offers and a dishonest receipt refused;
unknown kinds; the map helper over several providers; the tensor lane as data plane.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from conftest import TEST_CAPACITY

from p2pcompute.errors import TaskFailed
from p2pcompute.identity import Identity
from p2pcompute.overlay import Node, open_node
from p2pcompute.tasks import Resources, TaskRegistry, verify_ledger, verify_matmul_bench
from p2pcompute.tasks.driver import OFFER_PROTOCOL, ProviderFaults, TaskService, open_tasks, serve_tasks
from p2pcompute.tasks.messages import Offer, seal_offer
from p2pcompute.tasks.receipts import ReceiptBody

NODE_OPTS: dict[str, Any] = {"capacity": TEST_CAPACITY}


@contextlib.asynccontextmanager
async def provider(
    boot: Node, registry: TaskRegistry | None = None, **options: Any
) -> AsyncIterator[tuple[Node, TaskService]]:
    async with (
        open_node(bootstrap=boot.addrs, **NODE_OPTS) as node,
        serve_tasks(node, registry, **options) as svc,
    ):
        yield node, svc


class Killable:
    """A provider running in its own task, so the test can kill it (its node goes away abruptly)."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.service: TaskService | None = None

    async def run(self, boot: Node, registry: TaskRegistry | None, task_status: Any, **options: Any) -> None:
        with self.scope:
            async with provider(boot, registry, **options) as (_node, svc):
                self.service = svc
                task_status.started()
                await trio.sleep_forever()


async def test_matmul_end_to_end_with_receipts_in_both_ledgers(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot:  # noqa: SIM117 (separate lifetimes)
            async with provider(boot, ledger=tmp_path / "p.jsonl") as (pnode, psvc):
                async with (
                    open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode,
                    open_tasks(rnode, ledger=tmp_path / "r.jsonl") as tasks,
                ):
                    await tasks.wait_for_providers(1, timeout=30)
                    a, b = torch.randn(64, 32), torch.randn(32, 16)
                    result = await tasks.run_task("matmul", {"a": a, "b": b}, {}, deadline=60)
                    assert torch.allclose(result.outputs["c"], a @ b, atol=1e-5)
                    assert result.provider == pnode.peer_id
                    body = result.receipt.body
                    assert (body.provider, body.requester, body.kind) == (
                        pnode.peer_id,
                        rnode.peer_id,
                        "matmul",
                    )

                    bench = await tasks.run_task("matmul-bench", {}, {"n": 128, "seed": 3, "repeats": 2})
                    assert bench.info["tflops"] > 0
                    assert verify_matmul_bench({"n": 128, "seed": 3, "repeats": 2}, bench.outputs)
                    forged = {"check": bench.outputs["check"] + 1.0}
                    assert not verify_matmul_bench({"n": 128, "seed": 3, "repeats": 2}, forged)
                # the provider records its receipt once the requester's co-signature arrives
                await psvc.wait_for_stat("receipts", 2, timeout=20)
    for name, role in (("p.jsonl", "provider"), ("r.jsonl", "requester")):
        report = verify_ledger(tmp_path / name)
        assert report.ok, report.problems
        assert [e.role for e in report.entries] == [role, role]
        assert report.entries[0].receipt.lease_id == result.receipt.lease_id


async def test_unknown_kind_and_task_errors_fail_cleanly() -> None:
    reg = TaskRegistry()

    @reg.task("explode")
    def explode(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise ValueError("bad parameter")

    with trio.fail_after(90):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot, provider(boot, reg) as (_p, psvc):  # noqa: SIM117 (separate lifetimes)
            async with open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode, open_tasks(rnode) as tasks:
                await tasks.wait_for_providers(1, timeout=30)
                with pytest.raises(TaskFailed, match="bad parameter"):
                    await tasks.run_task("explode", {"x": torch.ones(3)}, {}, deadline=30)
                with pytest.raises(TaskFailed):
                    await tasks.run_task("no-such-kind", {}, {}, deadline=2)
                assert psvc.provider is not None
                assert psvc.provider.free_slots() == 1


async def test_provider_killed_mid_lease_task_completes_elsewhere() -> None:
    started = trio.Event()
    slow = TaskRegistry()

    @slow.task("square", price=0.0)
    async def hang(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    good = TaskRegistry()

    @good.task("square", price=1.0)
    def square(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"y": tensors["x"] ** 2}

    with trio.fail_after(120):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot, trio.open_nursery() as nursery:
            victim = Killable()
            await nursery.start(victim.run, boot, slow)
            async with provider(boot, good) as (good_node, _):  # noqa: SIM117 (separate lifetimes)
                async with open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode, open_tasks(rnode) as tasks:
                    await tasks.wait_for_providers(2, timeout=30)

                    async def kill_when_started() -> None:
                        await started.wait()
                        victim.scope.cancel()

                    nursery.start_soon(kill_when_started)
                    x = torch.arange(10.0)
                    t0 = trio.current_time()
                    # the cheaper (hanging) provider wins the offer window, then dies
                    result = await tasks.run_task(
                        "square", {"x": x}, {}, enough_offers=2, offer_window=15.0, lease_ttl=4.0, deadline=60
                    )
                    assert started.is_set()
                    assert result.provider == good_node.peer_id
                    assert torch.equal(result.outputs["y"], x**2)
                    assert trio.current_time() - t0 < 30


async def test_forged_offers_are_refused_and_the_task_still_runs() -> None:
    with trio.fail_after(90):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot, provider(boot) as (pnode, _):  # noqa: SIM117 (separate lifetimes)
            async with (
                open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode,
                open_tasks(rnode) as tasks,
                open_node(bootstrap=boot.addrs, **NODE_OPTS) as mallory,
            ):
                await tasks.wait_for_providers(1, timeout=30)
                someone_else = Identity.generate()
                offer = Offer(
                    offer_id=b"\x01" * 16,
                    request_id=b"\x02" * 16,
                    provider=someone_else.peer_id,
                    requester=rnode.peer_id,
                    kind="matmul",
                    price=0.0,
                    expected_start=0.0,
                    slots=1,
                    free=1,
                    capacity=1,
                    resources=Resources(cpus=64),
                    valid_for=10.0,
                    heartbeat=1.0,
                    lease_ttl=5.0,
                )
                # signed by someone else, sent by mallory: the signer is not the sender
                stream = await mallory.open_stream(rnode.peer_id, OFFER_PROTOCOL)
                await stream.send_frame(seal_offer(offer, someone_else))
                await stream.close()
                # bytes flipped in the signed body
                raw = bytearray(seal_offer(offer, someone_else))
                raw[40] ^= 0xFF
                stream = await mallory.open_stream(rnode.peer_id, OFFER_PROTOCOL)
                await stream.send_frame(bytes(raw))
                await stream.close()
                await tasks.wait_for_stat("bad_offers", 2, timeout=10)
                a = torch.ones(4, 4)
                result = await tasks.run_task("matmul", {"a": a, "b": a}, {}, deadline=60)
                assert result.provider == pnode.peer_id


async def test_dishonest_receipt_is_refused_and_work_moves_on(tmp_path: Path) -> None:
    # the liar claims a higher price than it offered
    def inflate(body: ReceiptBody) -> bytes:
        return replace(body, price=body.price + 100.0).encode()

    with trio.fail_after(120):
        async with (
            open_node(role="bootstrap", **NODE_OPTS) as boot,
            provider(boot, ledger=tmp_path / "liar.jsonl", faults=ProviderFaults(receipt_body=inflate)),
        ):
            async with open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode, open_tasks(rnode) as tasks:
                await tasks.wait_for_providers(1, timeout=30)
                with pytest.raises(TaskFailed, match="receipt field price"):
                    await tasks.run_task(
                        "matmul", {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, {}, retries=0, deadline=30
                    )
                assert tasks.stats["bad_receipts"] == 1
                async with provider(boot) as (honest_node, _):
                    await tasks.wait_for_providers(2, timeout=30)
                    result = await tasks.run_task(
                        "matmul",
                        {"a": torch.ones(2, 2), "b": torch.ones(2, 2)},
                        {},
                        retries=2,
                        enough_offers=2,
                        offer_window=15.0,
                        deadline=60,
                    )
                    assert result.provider == honest_node.peer_id
            assert verify_ledger(tmp_path / "liar.jsonl").entries == []


async def test_map_spreads_over_providers_with_progress(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(120):
        async with (  # noqa: SIM117 (separate lifetimes)
            open_node(role="bootstrap", **NODE_OPTS) as boot,
            provider(boot, capacity=2) as (n1, _),
            provider(boot, capacity=2) as (n2, _),
        ):
            async with open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode, open_tasks(rnode) as tasks:
                await tasks.wait_for_providers(2, timeout=30)
                seen: list[tuple[int, int]] = []
                items = [({"a": torch.full((2, 2), float(i)), "b": torch.eye(2)}, {}) for i in range(8)]
                results = await tasks.map_tasks(
                    "matmul",
                    items,
                    parallel=4,
                    enough_offers=2,
                    offer_window=15.0,
                    progress=lambda d, n: seen.append((d, n)),
                    deadline=60,
                )
                assert [r.outputs["c"][0, 0].item() for r in results] == [float(i) for i in range(8)]  # type: ignore[union-attr]
                assert seen[-1] == (8, 8)
                assert {r.provider for r in results} == {n1.peer_id, n2.peer_id}  # type: ignore[union-attr]
                assert len({r.receipt.lease_id for r in results}) == 8  # type: ignore[union-attr]
                # without a callback, several items are reported as plain lines on the progress logger
                with caplog.at_level(logging.INFO, logger="p2pcompute.progress"):
                    await tasks.map_tasks("matmul", items[:2], enough_offers=2, offer_window=15, deadline=60)
                lines = [r.getMessage() for r in caplog.records if r.name == "p2pcompute.progress"]
                assert lines[-1].startswith("matmul tasks: 100% 2/2 tasks"), lines


async def test_inputs_and_outputs_over_the_tensor_lane() -> None:
    from p2pcompute.tensors import open_lane

    with trio.fail_after(90):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot:  # noqa: SIM117 (separate lifetimes)
            async with (
                open_node(bootstrap=boot.addrs, **NODE_OPTS) as pnode,
                open_lane(pnode) as plane,
                serve_tasks(pnode, lane=plane),
                open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode,
                open_lane(rnode) as rlane,
                open_tasks(rnode, lane=rlane) as tasks,
            ):
                await tasks.wait_for_providers(1, timeout=30)
                a, b = torch.randn(256, 128), torch.randn(128, 64)
                result = await tasks.run_task("matmul", {"a": a, "b": b}, {}, deadline=60)
                assert torch.allclose(result.outputs["c"], a @ b, atol=1e-4)
                assert rlane.statistics().sent >= 1
                assert plane.statistics().sent >= 1
