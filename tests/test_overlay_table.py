"""The sans-IO peer table: entry, replay, equivocation, expiry on explicit time, offences, queries."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from p2pcompute.capacity import Capacity, GpuInfo, make_advert
from p2pcompute.capacity.model import CapacityQuery
from p2pcompute.errors import BadSignature, StaleMessage
from p2pcompute.identity import Identity
from p2pcompute.overlay.table import PeerTable

NOW = 1_800_000_000.0
GIB = 1 << 30
ME = Identity.from_seed(b"0" * 32)
PEERS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]


def cap(free_gib: int) -> Capacity:
    gpus = (GpuInfo(index=0, name="A100", uuid="GPU-0", memory_total=80 * GIB, memory_free=free_gib * GIB),)
    return Capacity(
        cpu_cores=4, ram_total=GIB, ram_available=GIB, platform="x", gpus=gpus if free_gib else ()
    )


def adv(
    ident: Identity, seq: int, *, issued: float = NOW, ttl: float = 30.0, free: int = 10, **kw: Any
) -> bytes:
    return make_advert(
        ident,
        peer_id=ident.peer_id,
        swarm="s",
        seq=seq,
        capacity=cap(free),
        addrs=[],
        ttl=ttl,
        issued=issued,
        **kw,
    )


def table() -> PeerTable:
    return PeerTable(ME.peer_id, "s", clock=lambda: NOW)


def test_enter_update_duplicate_own() -> None:
    t = table()
    a = PEERS[0]
    assert t.offer(adv(a, 1), sender=a.peer_id)[0] == "new"
    assert t.offer(adv(a, 1), sender=a.peer_id)[0] == "duplicate"
    assert t.offer(adv(a, 2), sender=a.peer_id)[0] == "updated"
    assert t.offer(adv(ME, 1), sender=ME.peer_id)[0] == "own"
    assert [r.peer_id for r in t.alive()] == [a.peer_id]
    assert t.get(a.peer_id).seq == 2


def test_replay_and_equivocation_are_counted_against_the_sender() -> None:
    t = table()
    a, relay = PEERS[0], PEERS[1]
    t.offer(adv(a, 5), sender=a.peer_id)
    with pytest.raises(StaleMessage):
        t.offer(adv(a, 4), sender=a.peer_id, blame=relay.peer_id)
    with pytest.raises(BadSignature):
        t.offer(adv(a, 5, free=3), sender=a.peer_id, blame=relay.peer_id)
    assert t.offences(relay.peer_id) == {"stale": 1, "forged": 1}
    assert t.offence_total(relay.peer_id) == 1
    assert t.offence_total(relay.peer_id, include_stale=True) == 2
    # lists received by peer exchange may lag: an old sequence there is not an offence
    with pytest.raises(StaleMessage):
        t.offer(adv(a, 3), blame=relay.peer_id, count_stale=False)
    assert t.offences(relay.peer_id) == {"stale": 1, "forged": 1}
    with pytest.raises(BadSignature):
        t.offer(adv(a, 9), sender=relay.peer_id)  # signer is not the sender
    assert t.offences(relay.peer_id)["forged"] == 2


def test_expiry_on_explicit_time_and_no_resurrection() -> None:
    t = table()
    a = PEERS[0]
    t.offer(adv(a, 1, ttl=10.0), sender=a.peer_id, now=NOW)
    assert t.alive(NOW + 9.9)
    assert not t.alive(NOW + 10.0)
    assert t.expire(NOW + 5) == []
    assert t.expire(NOW + 10.0) == [a.peer_id]
    assert a.peer_id not in t
    # the same advert handed on later (peer exchange) does not bring the peer back
    with pytest.raises(StaleMessage):
        t.offer(adv(a, 1, ttl=10.0), blame=PEERS[1].peer_id, now=NOW + 10.5, count_stale=False)
    assert t.offer(adv(a, 2, issued=NOW + 11, ttl=10.0), sender=a.peer_id, now=NOW + 11)[0] == "new"


def test_lifetime_is_capped_by_the_issuer_clock() -> None:
    t = PeerTable(ME.peer_id, "s", max_skew=2.0)
    a = PEERS[0]
    t.offer(adv(a, 1, issued=NOW - 25, ttl=30.0), sender=a.peer_id, now=NOW)
    assert t.get(a.peer_id).expires == NOW + 7  # type: ignore[union-attr]


def test_find_best_first_and_roles() -> None:
    t = table()
    t.offer(adv(PEERS[0], 1, free=10), sender=PEERS[0].peer_id)
    t.offer(adv(PEERS[1], 1, free=70), sender=PEERS[1].peer_id)
    t.offer(adv(PEERS[2], 1, free=0), sender=PEERS[2].peer_id)
    t.offer(adv(PEERS[3], 1, free=79, role="bootstrap"), sender=PEERS[3].peer_id)
    best = t.find(CapacityQuery(gpus=1))
    assert [r.peer_id for r in best] == [PEERS[1].peer_id, PEERS[0].peer_id]
    assert (
        t.find(CapacityQuery(min_free_memory=50 * GIB), roles=("peer", "bootstrap"))[0].peer_id
        == PEERS[3].peer_id
    )
    assert len(t.find(CapacityQuery())) == 3
    assert len(t.sample_adverts(None, 2)) == 2


class TableMachine(RuleBasedStateMachine):
    """Random adverts, replays and clock steps: the table never holds an expired or older advert."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.t = PeerTable(ME.peer_id, "s", max_skew=1.0, clock=lambda: self.now)
        self.sent: dict[str, int] = {}
        self.best: dict[str, int] = {}

    @rule(who=st.integers(0, 3), bump=st.integers(-2, 3), ttl=st.floats(1.0, 20.0))
    def offer(self, who: int, bump: int, ttl: float) -> None:
        ident = PEERS[who]
        seq = max(0, self.sent.get(ident.peer_id, 0) + bump)
        self.sent[ident.peer_id] = max(seq, self.sent.get(ident.peer_id, 0))
        try:
            self.t.offer(adv(ident, seq, issued=self.now, ttl=ttl), sender=ident.peer_id)
        except (StaleMessage, BadSignature):
            assert seq <= self.best.get(ident.peer_id, -1)
            return
        assert seq > self.best.get(ident.peer_id, -1) or seq == self.best.get(ident.peer_id)
        self.best[ident.peer_id] = seq

    @rule(dt=st.floats(0.0, 10.0))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.t.expire()

    @invariant()
    def nothing_expired_or_regressed(self) -> None:
        for rec in self.t.alive():
            assert rec.expires > self.now
            assert rec.seq == self.best[rec.peer_id]


TestTableMachine = TableMachine.TestCase
TestTableMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
