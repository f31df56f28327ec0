"""Two processes with one key: the node that an advert of its own key reaches notices it.

A unit test of :meth:`Discovery.check_own` (what counts as ours, as an earlier run, as a clone),
then real py-libp2p nodes on 127.0.0.1: a restarted node does not mistake its previous run's
advert for a clone; two nodes sharing a key are reported in statistics, the status document
and the metrics.
"""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
import trio
from conftest import TEST_CAPACITY

from p2pcompute.capacity.adverts import make_advert, open_advert
from p2pcompute.identity import Identity
from p2pcompute.observe import Observer
from p2pcompute.observe.metrics import NodeCollector
from p2pcompute.overlay import open_node
from p2pcompute.overlay.config import NodeConfig
from p2pcompute.overlay.discovery import Discovery
from p2pcompute.overlay.table import PeerTable

ADDR = "/ip4/127.0.0.1/tcp/4001"
OTHER = "/ip4/127.0.0.1/tcp/4555"


def _discovery(ident: Identity, clock: list[float]) -> Discovery:
    return Discovery(
        ident,
        "lab",
        NodeConfig(capacity=TEST_CAPACITY),
        net=cast(Any, None),  # check_own never touches the network
        peers=PeerTable(ident.peer_id, "lab"),
        addrs=lambda: [ADDR],
        notify=lambda: None,
        stats={},
        clock=lambda: clock[0],
    )


def _advert(ident: Identity, *, seq: int, issued: float, addrs: list[str]) -> bytes:
    return make_advert(
        ident,
        peer_id=ident.peer_id,
        swarm="lab",
        seq=seq,
        capacity=TEST_CAPACITY,
        addrs=addrs,
        ttl=30.0,
        issued=issued,
    )


def test_check_own_tells_ours_an_earlier_run_and_a_clone() -> None:
    ident = Identity.generate()
    now = [time.time()]
    d = _discovery(ident, now)

    def check(raw: bytes) -> bool:
        return d.check_own(open_advert(raw, swarm="lab", now=now[0]), via="12D3KooWforwarder")

    first_seq = d._seq
    now[0] += 1
    ours = d.build_advert(TEST_CAPACITY)
    assert not check(ours)
    for _ in range(70):  # more than it remembers byte for byte: its sequence range still says "ours"
        d.build_advert(TEST_CAPACITY)
    assert not check(ours)
    # an earlier run of this node: lower sequence, issued before we started
    assert not check(_advert(ident, seq=first_seq - 5, issued=now[0] - 30, addrs=[OTHER]))
    assert d.clones == {}
    assert "identity_conflicts" not in d.stats
    # another process started before us and still advertising (its seq is lower, its advert new)
    assert check(_advert(ident, seq=first_seq - 3, issued=now[0], addrs=[OTHER]))
    # one started after us (higher seq); and one that reuses a sequence number we issued
    assert check(_advert(ident, seq=d._seq + 10_000, issued=now[0], addrs=[OTHER]))
    assert check(_advert(ident, seq=d._seq, issued=now[0] + 0.5, addrs=[ADDR]))
    assert set(d.clones) == {OTHER, ADDR}
    assert d.stats["identity_conflicts"] == 3


async def test_two_nodes_with_one_key_are_noticed_and_a_restart_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ident = Identity.generate()
    opts: dict[str, Any] = {"capacity": TEST_CAPACITY, "advert_interval": 1.0, "discovery_interval": 0.5}
    with trio.fail_after(60):
        async with open_node(role="bootstrap", **opts) as boot:
            async with open_node(ident, bootstrap=boot.addrs, **opts) as earlier:
                await boot.wait_until(lambda: ident.peer_id in boot.peers, timeout=20)
            # restarted: the bootstrap node still holds the earlier run's advert and hands it back
            assert ident.peer_id in boot.peers
            async with open_node(ident, bootstrap=boot.addrs, **opts) as a:
                assert earlier.addrs != a.addrs
                assert a.identity_clones() == []
                async with open_node(ident, bootstrap=boot.addrs, **opts) as b:
                    # b's adverts (higher sequence numbers) win every table; a, hidden, notices
                    await a.wait_until(lambda: bool(a.identity_clones()), timeout=30)
                    assert a.identity_clones() == b.addrs
                    assert a.statistics()["identity_conflicts"] >= 1
                    # one warning naming the other process's address (what `bootstrap` shows on stderr)
                    warnings = [r.getMessage() for r in caplog.records if "another process" in r.getMessage()]
                    assert len(warnings) == 1
                    assert b.addrs[0] in warnings[0]
                    assert f"uses this node's key (peer id {a.peer_id})" in warnings[0]
                    observer = Observer(a, role="peer")
                    node_doc = observer.status()["node"]  # what `status --url ... --json` prints
                    assert node_doc["clone_addrs"] == b.addrs
                    assert node_doc["identity_conflicts"] >= 1
                    families = {f.name: f for f in NodeCollector(observer).collect()}
                    assert families["p2pcompute_identity_conflicts"].samples[0].value >= 1
