"""Overlapped outer steps (DiLoCo ``overlap=``): rounds averaged in the background, in memory.

Simulated peers average through a :class:`~p2pcompute.testing.LocalGroup` (real arithmetic, no
network); inner steps take 0.1 s of trio's mock clock each, so a round's lateness and the
compute's wait are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.testing

from p2pcompute.errors import ConfigError
from p2pcompute.testing import LocalGroup
from p2pcompute.training.averager import Averager, AveragingOutcome
from p2pcompute.training.diloco import DiLoCo, StepReport
from p2pcompute.training.state import TrainingState, load_checkpoint

DIM = 8
STEP_SECONDS = 0.1  # mock time one inner step takes
H = 5


def batch(i: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * i + s)
    x = torch.randn(8, DIM, generator=g)
    return x, x.sum(dim=1, keepdim=True)


class LateAverager:
    """An averager whose rounds land ``delay`` seconds after the group's average is ready."""

    def __init__(self, inner: Averager, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    async def average(self, tensors: Sequence[torch.Tensor], **kw: Any) -> AveragingOutcome:
        outcome = await self.inner.average(tensors, **kw)
        await trio.sleep(self.delay)
        return outcome


class Peer:
    def __init__(self, averager: Averager, nursery: trio.Nursery, i: int, **kw: Any) -> None:
        torch.manual_seed(0)
        self.i = i
        self.model = torch.nn.Linear(DIM, 1)
        self.opt = DiLoCo(self.model, torch.optim.SGD(self.model.parameters(), lr=0.02), averager,
                          inner_steps=H, overlap="delayed", nursery=nursery, **kw)
        self.reports: list[StepReport] = []
        self.steps = 0

    async def train(self, steps: int) -> None:
        for _ in range(steps):
            x, y = batch(self.i, self.steps)
            torch.nn.functional.mse_loss(self.model(x), y).backward()
            await trio.sleep(STEP_SECONDS)  # the compute
            report = await self.opt.astep(samples=8.0)
            self.opt.zero_grad()
            self.steps += 1
            if report is not None:
                self.reports.append(report)


async def run_all(peers: list[Peer], steps: int) -> None:
    async with trio.open_nursery() as n:
        for p in peers:
            n.start_soon(p.train, steps)


async def test_overlapped_peers_stay_bit_identical_and_never_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    group = LocalGroup()
    with trio.fail_after(100):
        async with trio.open_nursery() as bg:
            peers = [Peer(group.join(f"p{i}"), bg, i) for i in range(3)]
            await run_all(peers, 4 * H)
            assert all(p.opt.pending for p in peers)  # round 3 in flight
            assert peers[0].opt.outer_step == 3
            for p in peers:
                p.reports.append(await p.opt.flush())  # type: ignore[arg-type]
    digests = {p.opt.state_digest() for p in peers}
    assert len(digests) == 1
    reports = peers[0].reports
    assert [r.outer_step for r in reports] == [1, 2, 3, 4]
    assert all(r.overlapped and r.participants == ("p0", "p1", "p2") for r in reports)
    assert all(r.waited == 0 for r in reports[:3])  # landed during the next inner phase
    # after flush the model is the shared anchor (no inner step since): every peer holds it
    w = [p.model.weight.detach().clone() for p in peers]
    assert torch.equal(w[0], w[1])
    assert torch.equal(w[0], w[2])
    assert not any(p.opt.pending for p in peers)


async def test_a_round_that_lands_late_is_waited_for_at_the_next_boundary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    group = LocalGroup()
    late = H * STEP_SECONDS + 1.5  # the round lands 1.5 s after the next inner phase ends
    with trio.fail_after(100):
        async with trio.open_nursery() as bg:
            peers = [Peer(LateAverager(group.join(f"p{i}"), late), bg, i) for i in range(2)]
            await run_all(peers, 3 * H)
            for p in peers:
                await p.opt.flush()
    r = peers[0].reports
    assert [x.outer_step for x in r] == [1, 2]
    assert r[0].waited == pytest.approx(1.5)
    assert r[1].waited == pytest.approx(1.5)
    assert r[0].seconds == pytest.approx(late)
    assert peers[0].opt.state_digest() == peers[1].opt.state_digest()


@pytest.mark.parametrize("early", [True, False])
async def test_a_round_that_lands_mid_phase_is_applied_at_the_next_inner_step(
    autojump_clock: trio.testing.MockClock, early: bool
) -> None:
    group = LocalGroup()
    lag = 2.5 * STEP_SECONDS  # the round is done two and a half inner steps into the next phase
    landed_at: dict[int, list[int]] = {0: [], 1: []}
    with trio.fail_after(100):
        async with trio.open_nursery() as bg:
            peers = [Peer(LateAverager(group.join(f"p{i}"), lag), bg, i, land_early=early) for i in range(2)]

            async def train(p: Peer) -> None:
                for step in range(1, 3 * H + 1):
                    x, y = batch(p.i, step)
                    torch.nn.functional.mse_loss(p.model(x), y).backward()
                    await trio.sleep(STEP_SECONDS)
                    report = await p.opt.astep(samples=8.0)
                    p.opt.zero_grad()
                    if report is not None:
                        p.reports.append(report)
                        landed_at[p.i].append(step)
                        if step % H:  # mid-phase: the model is the new anchor plus this phase's steps
                            assert not p.opt.pending
                    if step % H == 0:
                        assert p.opt.pending  # a round was started at the boundary

            async with trio.open_nursery() as n:
                for p in peers:
                    n.start_soon(train, p)
            for p in peers:
                await p.opt.flush()
    # launched at steps H and 2H, applied three inner steps later (land_early=False: at the
    # next boundary, a whole phase late)
    want = [H + 3, 2 * H + 3] if early else [2 * H, 3 * H]
    assert landed_at[0] == landed_at[1] == want
    assert all(r.waited == 0 and r.overlapped for r in peers[0].reports)
    assert peers[0].opt.state_digest() == peers[1].opt.state_digest()


async def test_a_peer_dying_during_a_background_round(autojump_clock: trio.testing.MockClock) -> None:
    group = LocalGroup()
    with trio.fail_after(100):
        async with trio.open_nursery() as bg:
            peers = [Peer(LateAverager(group.join(f"p{i}"), 0.2), bg, i) for i in range(3)]
            await run_all(peers, H)  # round 0 started on every peer
            await run_all(peers[:2], H)  # round 0 landed; round 1 started on p0, p1 only
            assert peers[2].opt.pending
            group.leave("p2")  # p2 dies: its background round is gone with it
            peers[2].opt.abandon()
            await run_all(peers[:2], 2 * H)  # the survivors' inner steps go on
            for p in peers[:2]:
                await p.opt.flush()
    parts = [r.participants for r in peers[0].reports]
    assert parts[0] == ("p0", "p1", "p2")
    assert parts[1:] == [("p0", "p1")] * 2
    assert all(r.waited == 0 for r in peers[0].reports)  # compute never stalled
    assert peers[0].opt.state_digest() == peers[1].opt.state_digest()
    assert peers[0].opt.total_inner_steps == 4 * H


async def test_a_joiner_arriving_during_a_background_round(autojump_clock: trio.testing.MockClock) -> None:
    group = LocalGroup()
    with trio.fail_after(100):
        async with trio.open_nursery() as bg:
            peers = [Peer(group.join(f"p{i}"), bg, i) for i in range(2)]
            await run_all(peers, 2 * H)
            await trio.testing.wait_all_tasks_blocked()  # round 1 in flight
            assert peers[0].opt.pending
            assert peers[0].opt.outer_step == 1
            joiner = Peer(group.join("p2"), bg, 2)
            joiner.opt.load_state(peers[0].opt.export_state())  # the shared state, as downloaded

            async def catch_up(step: int) -> TrainingState:
                while peers[0].opt.outer_step < step:  # (Swarm polls its peers' offers)
                    await trio.sleep(0.05)
                return peers[0].opt.export_state()

            joiner.opt.catch_up = catch_up
            # it trains its first phase alongside the others and joins their next round
            async with trio.open_nursery() as n:
                n.start_soon(run_all, peers, 2 * H)
                n.start_soon(joiner.train, 2 * H)
            for p in [*peers, joiner]:
                await p.opt.flush()
    # rounds 0 and 1 (in flight when it came) had the two; from round 2 on all three
    parts = [r.participants for r in peers[0].reports] + [joiner.reports[-1].participants]
    assert parts == [("p0", "p1"), ("p0", "p1"), ("p0", "p1", "p2"), ("p0", "p1", "p2")]
    assert len({p.opt.state_digest() for p in [*peers, joiner]}) == 1


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Autojumps only after 0.05 s of real idleness: the checkpoint's worker thread finishes first."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.mark.parametrize("how", ["cancelled", "keyboard_interrupt"])
async def test_interrupt_during_a_background_round_leaves_nothing_and_the_checkpoint_intact(
    patient_clock: trio.testing.MockClock, tmp_path: Path, how: str
) -> None:
    group = LocalGroup()
    ckpt = tmp_path / "state.ckpt"
    digest_at_save: bytes | None = None
    with trio.fail_after(1000):
        caught: BaseException | None = None
        try:
            async with trio.open_nursery() as bg:
                a = Peer(LateAverager(group.join("a"), 60.0), bg, 0, checkpoint=ckpt)
                b = Peer(LateAverager(group.join("b"), 60.0), bg, 1)
                await run_all([a, b], H)
                await run_all([a, b], H)  # waits for round 0 (60 s), saves, starts round 1
                assert a.opt.outer_step == 1
                assert a.opt.pending
                digest_at_save = a.opt.state_digest()
                await trio.sleep(1.0)  # round 1 is running in the background
                if how == "cancelled":
                    bg.cancel_scope.cancel()
                else:
                    raise KeyboardInterrupt
        except BaseException as exc:  # what escaped is checked below
            caught = exc
    if how == "cancelled":
        assert caught is None
    else:
        assert isinstance(caught, BaseExceptionGroup)
        assert caught.subgroup(KeyboardInterrupt) is not None
    # the nursery exited: the background rounds are over (cancelled, never applied)
    assert a.opt.outer_step == 1
    state = load_checkpoint(ckpt)
    assert state.step == 1
    assert state.digest() != b""
    fresh = Peer(LocalGroup().join("x"), bg, 0)
    fresh.opt.load_state(state)
    assert fresh.opt.state_digest() == digest_at_save


async def test_overlap_needs_a_nursery_and_diloco_mode() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup().join("a"), overlap="sideways")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup().join("a"), overlap=True,
               mode="per_step")
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalGroup().join("a"), inner_steps=1,
                 overlap=True)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(ConfigError, match="nursery"):
        await opt.astep()


@pytest.mark.slow
def test_two_swarms_overlap_for_real_and_close_with_a_round_in_flight() -> None:
    """Real nodes on 127.0.0.1: rounds run in each Swarm's nursery during the next inner phase;
    peers stay bit-identical; closing with a round in flight leaves no thread behind."""
    import threading

    from p2pcompute.training.swarm import Swarm

    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(dim=1, keepdim=True)
    results: dict[str, Any] = {}
    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common = {"bootstrap": boot.addrs, "patience": 5.0, "matchmaking_timeout": 20.0,
                  "advert_interval": 1.0}
        with Swarm(**common) as a, Swarm(**common) as b:
            a.wait_for_peers(1, timeout=30)
            b.wait_for_peers(1, timeout=30)
            barrier = threading.Barrier(2, timeout=60)

            def train(name: str, swarm: Swarm, offset: int) -> None:
                try:
                    gen = torch.Generator().manual_seed(0)
                    model = torch.nn.Linear(4, 1)
                    with torch.no_grad():
                        for p in model.parameters():
                            p.copy_(torch.randn(p.shape, generator=gen))
                    opt = swarm.diloco(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=5,
                                       join=False, overlap=True)
                    barrier.wait()
                    for s in range(15):  # three phases: rounds 0 and 1 land, round 2 in flight
                        lo = (s * 2 + offset) * 8
                        torch.nn.functional.mse_loss(model(x[lo : lo + 8]), y[lo : lo + 8]).backward()
                        opt.step()
                        opt.zero_grad()
                    assert opt.pending
                    last = opt.finish()
                    assert last is not None
                    assert last.overlapped
                    results[name] = opt
                    barrier.wait()
                    for _ in range(5):  # one more phase: round 3 in flight when the swarm closes
                        model(x[:8]).sum().backward()
                        opt.step()
                        opt.zero_grad()
                    assert opt.pending
                except BaseException as exc:
                    results[name] = exc

            t = threading.Thread(target=train, args=("b", b, 1))
            t.start()
            train("a", a, 0)
            t.join(120)
            assert not t.is_alive()
            for name in ("a", "b"):
                assert not isinstance(results[name], BaseException), results[name]
            pa, pb = results["a"], results["b"]
            assert [len(r.participants) for r in pa.history[:3]] == [2, 2, 2]
            assert pa.history[2].participants == pb.history[2].participants
    assert [t.name for t in threading.enumerate() if t.name.startswith("p2pcompute-swarm")] == []
    assert pa.outer_step == pb.outer_step == 3
    assert pa.state_digest() == pb.state_digest()


class RecordingAverager:
    """Notes (trio time, round id) of every round this peer starts."""

    def __init__(self, inner: Averager) -> None:
        self.inner = inner
        self.started: list[tuple[float, int]] = []

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    async def average(self, tensors: Sequence[torch.Tensor], **kw: Any) -> AveragingOutcome:
        self.started.append((trio.current_time(), kw["round_id"]))
        return await self.inner.average(tensors, **kw)


async def test_a_joiner_enters_its_round_before_fetching_the_state_after_the_last_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The fetch of the state after the round in flight when it joined (a poll, a download) may
    take longer than the others' matchmaking window: the joiner's round starts first, so it is
    matched with them however long the fetch takes (issue 16: it lost 30 s, then a phase)."""
    group = LocalGroup()
    fetch = 0.3  # seconds the joiner's catch-up takes after the state is out (under a phase, 0.5 s)
    with trio.fail_after(100):
        async with trio.open_nursery() as bg:
            peers = [Peer(group.join(f"p{i}"), bg, i) for i in range(2)]
            await run_all(peers, 2 * H)
            await trio.testing.wait_all_tasks_blocked()
            recorder = RecordingAverager(group.join("p2"))
            joiner = Peer(recorder, bg, 2)  # type: ignore[arg-type]
            joiner.opt.load_state(peers[0].opt.export_state())
            fetched_at: list[float] = []

            async def catch_up(step: int) -> TrainingState:
                while peers[0].opt.outer_step < step:
                    await trio.sleep(0.05)
                await trio.sleep(fetch)
                fetched_at.append(trio.current_time())
                return peers[0].opt.export_state()

            joiner.opt.catch_up = catch_up
            async with trio.open_nursery() as n:
                n.start_soon(run_all, peers, 2 * H)
                n.start_soon(joiner.train, 2 * H)
            for p in [*peers, joiner]:
                await p.opt.flush()
    first_time, first_round = recorder.started[0]
    assert first_round == 2  # the swarm's round after the one in flight when it joined
    assert first_time < fetched_at[0] - fetch  # started before the fetch, not after it
    assert peers[0].reports[2].participants == ("p0", "p1", "p2")
    assert len({p.opt.state_digest() for p in [*peers, joiner]}) == 1
