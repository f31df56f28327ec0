"""Peers of unequal speed (DiLoCo ``join_early``): a slow peer joins every round with a partial phase.

Simulated peers average through a :class:`~p2pcompute.testing.LocalGroup` on trio's mock clock;
a fast peer's inner step takes 0.1 s, the slow peer's 0.35 s. :class:`Calling` stands in for the
matchmaking advert the Swarm hears: starting a round tells every other optimizer of it. The last
test runs two real Swarms on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.collective.aggregate import capped_weights
from p2pcompute.errors import ConfigError
from p2pcompute.testing import LocalGroup
from p2pcompute.training.averager import Averager, AveragingOutcome
from p2pcompute.training.diloco import DiLoCo, StepReport

DIM = 6
H = 6
FAST, SLOW = 0.1, 0.35  # mock seconds per inner step; a slow phase ends 0.1 s after a fast one's


def batch(i: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * i + s)
    x = torch.randn(8, DIM, generator=g)
    return x, x.sum(dim=1, keepdim=True)


class Calling:
    """An averager that tells the other peers when it starts a round, and records what it sent."""

    def __init__(self, inner: Averager, everyone: list[DiLoCo]) -> None:
        self.inner = inner
        self.everyone = everyone
        self.sent: list[tuple[float, list[torch.Tensor]]] = []

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    async def average(self, tensors: Sequence[torch.Tensor], **kw: Any) -> AveragingOutcome:
        for opt in self.everyone:
            if opt.averager is not self:
                opt.note_round(kw["round_id"])
        self.sent.append((kw["weight"], [t.clone() for t in tensors]))
        return await self.inner.average(tensors, **kw)


class Peer:
    def __init__(self, group: LocalGroup, everyone: list[DiLoCo], i: int, seconds: float, **kw: Any) -> None:
        torch.manual_seed(0)
        self.i, self.seconds = i, seconds
        self.model = torch.nn.Linear(DIM, 1)
        self.averager = Calling(group.join(f"p{i}"), everyone)
        self.opt = DiLoCo(self.model, torch.optim.SGD(self.model.parameters(), lr=0.02), self.averager,
                          inner_steps=H, join_early=True, **kw)
        everyone.append(self.opt)
        self.reports: list[StepReport] = []
        self.steps = 0

    async def train(self, rounds: int) -> None:
        while self.opt.outer_step + self.opt.pending < rounds:
            x, y = batch(self.i, self.steps)
            torch.nn.functional.mse_loss(self.model(x), y).backward()
            await trio.sleep(self.seconds)  # the compute
            report = await self.opt.astep(samples=8.0)
            self.opt.zero_grad()
            self.steps += 1
            if report is not None:
                self.reports.append(report)
        last = await self.opt.flush()
        if last is not None:
            self.reports.append(last)


async def test_a_partial_phase_is_weighted_by_its_samples(autojump_clock: trio.testing.MockClock) -> None:
    group, everyone = LocalGroup(), []
    fast = Peer(group, everyone, 0, FAST, outer_lr=1.0, outer_momentum=0.0)
    slow = Peer(group, everyone, 1, SLOW, outer_lr=1.0, outer_momentum=0.0)
    start = [a.clone() for a in fast.opt.anchor]
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            n.start_soon(fast.train, 1)
            n.start_soon(slow.train, 1)
    (wf, df), (ws, ds) = fast.averager.sent[0], slow.averager.sent[0]
    assert (wf, ws) == (8.0 * H, 16.0)  # 6 fast steps against 2 slow ones, 8 samples each
    assert slow.reports[0].early
    assert slow.reports[0].local_steps == 2
    assert not fast.reports[0].early
    assert fast.reports[0].local_steps == H
    # outer SGD with lr 1 and no momentum: the new anchor is the start minus the weighted mean
    for a0, a, f, s in zip(start, fast.opt.anchor, df, ds, strict=True):
        assert torch.allclose(a, a0 - (wf * f + ws * s) / (wf + ws), atol=1e-6)
    assert fast.opt.state_digest() == slow.opt.state_digest()


@pytest.mark.parametrize("overlap", [False, "delayed"])
async def test_a_slow_peer_joins_every_round(autojump_clock: trio.testing.MockClock, overlap: Any) -> None:
    group, everyone = LocalGroup(), []
    peers = [Peer(group, everyone, 0, FAST), Peer(group, everyone, 1, FAST), Peer(group, everyone, 2, SLOW)]
    with trio.fail_after(100):
        async with trio.open_nursery() as n:
            for p in peers:
                p.opt.nursery = n
                n.start_soon(p.train, 4)
    assert len({p.opt.state_digest() for p in peers}) == 1
    assert group.history == [(k, ("p0", "p1", "p2")) for k in range(4)]
    slow = peers[2].reports
    assert [r.outer_step for r in slow] == [1, 2, 3, 4]
    # overlapped, the last phase is the flush's (no round of its own)
    assert all(r.early and r.local_steps == 2 for r in slow)
    assert all(r.local_steps == H and not r.early for r in peers[0].reports)
    assert peers[2].steps < peers[0].steps / 2


def test_note_round_only_ends_the_phase_of_its_own_round() -> None:
    model = torch.nn.Linear(2, 1)
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup().join("a"), join_early=True)
    opt.note_round(3)  # a round ahead of us: we are behind, not called
    assert not opt._round_called()
    opt.note_round(0)
    assert opt._round_called()
    off = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup().join("b"))
    off.note_round(0)
    assert not off._round_called()  # join_early is off by default
    with pytest.raises(ConfigError, match="join_early"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup().join("c"), mode="per_step",
               join_early=True)


@pytest.mark.slow
def test_a_slow_swarm_peer_joins_rounds_for_real() -> None:
    """Two real Swarms on 127.0.0.1, one 3x slower per inner step: the slow one hears the fast
    one's matchmaking advert and averages its partial phase in the same rounds."""
    from p2pcompute.training.swarm import Swarm

    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    results: dict[str, Any] = {}
    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common = {"bootstrap": boot.addrs, "patience": 5.0, "matchmaking_timeout": 20.0,
                  "advert_interval": 1.0}
        with Swarm(**common) as a, Swarm(**common) as b:
            a.wait_for_peers(1, timeout=30)
            b.wait_for_peers(1, timeout=30)
            barrier = threading.Barrier(2, timeout=60)

            def train(name: str, swarm: Swarm, seconds: float) -> None:
                try:
                    torch.manual_seed(0)
                    model = torch.nn.Linear(4, 1)
                    opt = swarm.diloco(model, torch.optim.SGD(model.parameters(), lr=0.05), inner_steps=8,
                                       join=False, join_early=True)
                    barrier.wait()
                    s = 0
                    while opt.outer_step < 3 and s < 100:
                        lo = (s % 60) * 8
                        torch.nn.functional.mse_loss(model(x[lo : lo + 8]), y[lo : lo + 8]).backward()
                        time.sleep(seconds)  # the compute
                        opt.step(samples=8)
                        opt.zero_grad()
                        s += 1
                    results[name] = opt
                except BaseException as exc:
                    results[name] = exc

            t = threading.Thread(target=train, args=("slow", b, 0.09))
            t.start()
            train("fast", a, 0.03)
            t.join(60)
            assert not t.is_alive()
    for name in ("fast", "slow"):
        assert not isinstance(results[name], BaseException), results[name]
    fast, slow = results["fast"], results["slow"]
    joined = [len(r.participants) == 2 for r in slow.history]
    assert sum(joined) >= 2, [(r.local_steps, r.participants, r.error) for r in slow.history]
    assert any(r.early and r.local_steps < 8 for r in slow.history)
    if all(joined) and all(len(r.participants) == 2 for r in fast.history):
        assert fast.state_digest() == slow.state_digest()


async def test_local_group_caps_claimed_weights_at_a_multiple_of_the_median() -> None:
    group = LocalGroup()
    avgs = [group.join(f"p{i}") for i in range(3)]
    xs = [torch.full((4,), float(i + 1)) for i in range(3)]
    outcomes: list[AveragingOutcome] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for a, x, w in zip(avgs, xs, (1.0, 1.0, 100.0), strict=True):
                async def one(a: Any = a, x: torch.Tensor = x, w: float = w) -> None:
                    outcomes.append(await a.average([x], weight=w, round_id=0, weight_cap=4.0))
                n.start_soon(one)
    expect = (1 * 1.0 + 1 * 2.0 + 4 * 3.0) / 6  # the claim of 100 counts as 4 (4x the median, 1)
    assert all(torch.allclose(x, torch.full((4,), expect)) for x in xs)
    assert {o.total_weight for o in outcomes} == {6.0}


@pytest.mark.slow
async def test_the_network_round_caps_claimed_weights_the_same_on_every_member() -> None:
    from p2pcompute.collective import RoundOutcome
    from tests.test_allreduce_integration import GUARD, check, make_inputs, run_peers, swarm
    from tests.test_allreduce_integration import Peer as NetPeer

    claims = [1.0, 2.0, 300.0]
    xs = make_inputs(3, [(257,), (3, 5)], seed=7)
    with trio.fail_after(GUARD):
        async with swarm(3) as (boot, peers):
            async def body(p: NetPeer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                return await p.coll.average("capped", "round-1", p.tensors, weight=claims[p.index], target=3,
                                            min_size=2, matchmaking_timeout=60, weight_cap=4.0)
            await run_peers(boot, peers, body)
    check(peers, xs, [1.0, 2.0, 8.0], "none", [0, 1, 2], excluded=[])  # 300 counts as 4 x 2


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=12).filter(lambda ws: sum(ws) > 0),
       st.floats(1, 16))
def test_capping_twice_is_capping_once(weights: list[float], cap: float) -> None:
    # a join_early round caps the weights before the plan and a robust aggregator caps them again:
    # the second cap must change nothing (the median survives the first), or members would disagree
    once = capped_weights(weights, cap)
    assert capped_weights(once, cap) == once
    assert all(c <= w for c, w in zip(once, weights, strict=True))
