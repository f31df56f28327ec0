"""Direct tests of the round bookkeeping: one attempt's state machine, and whole rounds in a
discrete-event simulation of N peers with real (float64) vectors and injected faults."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from p2pcompute.collective.plan import AttemptPlan, split_parts
from p2pcompute.collective.roundcore import (
    Action,
    AnnounceLeft,
    AttemptCore,
    Commit,
    Decided,
    GiveUp,
    Phase,
    Retry,
    RoundCore,
    RoundOutcome,
    RoundStatus,
    SendAveragedPart,
    SendStatus,
    Status,
    StopTransfers,
    Timeouts,
)
from p2pcompute.errors import ConfigError, LocalProtocolError

T = Timeouts(sender_timeout=5.0, reducer_timeout=10.0, status_timeout=15.0, suspect_grace=0.5)


def plan3(weights: tuple[float, ...] = (1, 1, 1), bws: tuple[float, ...] = (1, 1, 1)) -> AttemptPlan:
    return AttemptPlan.build(("a", "b", "c"), weights=weights, bandwidths=bws, total=9)


def decided(actions: list[Action]) -> list[object]:
    return [a.outcome for a in actions if isinstance(a, Decided)]


# ----------------------------------------------------------------------------- one attempt


def test_happy_attempt_commits_after_all_statuses() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    assert core.start() == []
    assert core.contribution_done("b", now=1) == []
    assert core.contribution_done("c", now=1) == [SendAveragedPart()]
    assert core.averaged_part_done("b", now=2) == []
    assert core.averaged_part_done("c", now=2) == [SendStatus(ok=True)]
    assert core.phase is Phase.COMPLETE
    assert core.status_received("b", Status(ok=True), now=2.1) == []
    out = core.status_received("c", Status(ok=True), now=2.2)
    assert decided(out) == [Commit(("a", "b", "c"), 3.0)]


def test_aux_peer_and_lone_reducer() -> None:
    # a has bandwidth 0: it reduces nothing; c has weight 0: it sends nothing
    plan = plan3(weights=(1, 1, 0), bws=(0, 1, 1))
    a = AttemptCore(plan, "a", now=0.0, timeouts=T)
    assert not a.is_reducer
    assert a.waiting_contributions == {}
    assert a.start() == []
    c = AttemptCore(plan, "c", now=0.0, timeouts=T)
    assert set(c.waiting_contributions) == {"a", "b"}
    solo = AttemptCore(AttemptPlan.build(("a", "b"), weights=(1, 0), bandwidths=(1, 0), total=4), "a", now=0)
    assert solo.start() == [SendAveragedPart(), SendStatus(ok=True)]
    with pytest.raises(LocalProtocolError):
        solo.start()


def test_sender_timeout_fires_and_status_goes_before_stop() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    core.progress("b", now=3.0)
    assert core.next_deadline() == 5.0  # c never sent a byte
    out = core.poll(5.0)
    assert out == [SendStatus(ok=False, suspects=frozenset({"c"})), StopTransfers()]
    assert core.phase is Phase.FAILED
    # b answers; c is suspected, so after the grace we decide without it
    assert core.status_received("b", Status(ok=False, suspects=frozenset({"c"})), now=5.1) == []
    assert core.next_deadline() == pytest.approx(5.6)
    out = core.poll(5.6)
    assert decided(out) == [Retry(("a", "b"), frozenset({"c"}), "no progress from c")]


def test_reducer_timeout_counts_from_last_activity() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    core.progress("b", now=4.0)
    core.contribution_done("b", 4.0)
    core.progress("c", now=4.5)
    core.contribution_done("c", 4.5)
    # parts from b and c: nothing yet, but activity at 4.5 pushes their deadline
    assert core.next_deadline() == 14.5
    assert core.poll(14.4) == []
    out = core.poll(14.5)
    assert out[0] == SendStatus(ok=False, suspects=frozenset({"b", "c"}))


def test_suspect_that_answers_within_grace_is_kept() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    out = core.peer_failed("b", now=1.0, reason="stream reset")
    assert out[0] == SendStatus(ok=False, suspects=frozenset({"b"}))
    assert core.status_received("c", Status(ok=False), now=1.1) == []
    out = core.status_received("b", Status(ok=False, suspects=frozenset({"c"})), now=1.2)
    assert decided(out) == [Retry(("a", "b", "c"), frozenset(), "b: stream reset")]


def test_blamed_peer_is_removed_even_if_it_answers() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    out = core.peer_failed("b", now=1.0, reason="bad tag", blame=True)
    assert out[0] == SendStatus(ok=False, suspects=frozenset({"b"}), blamed=frozenset({"b"}))
    core.status_received("c", Status(ok=False), now=1.1)
    out = core.status_received("b", Status(ok=False), now=1.2)
    (outcome,) = decided(out)
    assert isinstance(outcome, Retry)
    assert outcome.members == ("a", "c")


def test_complete_peer_retries_when_another_failed() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    for p in "bc":
        core.contribution_done(p, 1.0)
    for p in "bc":
        core.averaged_part_done(p, 2.0)
    assert core.phase is Phase.COMPLETE
    out = core.status_received("b", Status(ok=False, suspects=frozenset({"c"})), now=2.5)
    assert out == []  # no second status from us; we wait for c (grace)
    out = core.poll(3.0)
    assert decided(out) == [Retry(("a", "b"), frozenset({"c"}), "")] or isinstance(
        decided(out)[0], Retry
    )


def test_complete_peer_commits_without_silent_member() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    for p in "bc":
        core.contribution_done(p, 1.0)
        core.averaged_part_done(p, 1.0)
    core.status_received("b", Status(ok=True), 1.5)
    assert core.next_deadline() == 16.0
    out = core.poll(16.0)
    assert decided(out) == [Commit(("a", "b", "c"), 3.0)]


def test_leave_and_ignored_events() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    assert core.status_received("zz", Status(ok=False), 1.0) == []  # not a member
    assert core.peer_failed("a", 1.0, "self") == []
    assert core.contribution_done("zz", 1.0) == []
    out = core.leave(2.0)
    assert out == [SendStatus(ok=False, leaving=True), StopTransfers(), Decided(GiveUp("cancelled"))]
    # after our status went out, leaving is announced for the round instead of a second status
    done = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    done.start()
    done.peer_failed("b", 1.0, "reset")
    assert done.leave(2.0) == [AnnounceLeft(), StopTransfers(), Decided(GiveUp("cancelled"))]
    assert core.leave(3.0) == []
    assert core.poll(100.0) == []
    assert core.next_deadline() is None
    with pytest.raises(LocalProtocolError):
        AttemptCore(plan3(), "zz", now=0)


def test_leaving_status_removes_peer() -> None:
    core = AttemptCore(plan3(), "a", now=0.0, timeouts=T)
    core.start()
    core.status_received("b", Status(ok=False, leaving=True), 1.0)
    out = core.status_received("c", Status(ok=False), 1.1)
    (outcome,) = decided(out)
    assert isinstance(outcome, Retry)
    assert outcome.members == ("a", "c")


def test_timeouts_validate() -> None:
    with pytest.raises(ConfigError):
        Timeouts(sender_timeout=0)
    with pytest.raises(ConfigError):
        Timeouts(suspect_grace=-1)


class AttemptMachine(RuleBasedStateMachine):
    """Arbitrary event orders on one attempt; the safety rules must hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = AttemptPlan.build(
            ("a", "b", "c", "d"), weights=(1, 2, 0, 1), bandwidths=(1, 0, 1, 2), total=13
        )
        self.core = AttemptCore(self.plan, "a", now=0.0, timeouts=T)
        self.now = 0.0
        self.actions: list[Action] = list(self.core.start())
        self.heard: dict[str, Status] = {}

    def feed(self, out: list[Action]) -> None:
        self.actions += out

    @rule(peer=st.sampled_from("bcd"))
    def contribution(self, peer: str) -> None:
        self.feed(self.core.contribution_done(peer, self.now))

    @rule(peer=st.sampled_from("bcd"))
    def part(self, peer: str) -> None:
        self.feed(self.core.averaged_part_done(peer, self.now))

    @rule(peer=st.sampled_from("bcd"), blame=st.booleans())
    def failure(self, peer: str, blame: bool) -> None:
        self.feed(self.core.peer_failed(peer, self.now, "x", blame=blame))

    @rule(
        peer=st.sampled_from("bcd"),
        ok=st.booleans(),
        leaving=st.booleans(),
        suspects=st.frozensets(st.sampled_from("abcdz")),
    )
    def status(self, peer: str, ok: bool, leaving: bool, suspects: frozenset[str]) -> None:
        status = Status(ok and not leaving, suspects if not ok else frozenset(), frozenset(), leaving)
        if peer not in self.heard and self.core.phase is not Phase.DECIDED:
            self.heard[peer] = status
        self.feed(self.core.status_received(peer, status, self.now))

    @rule(dt=st.floats(0, 20))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(self.core.poll(self.now))

    @precondition(lambda self: self.core.phase is not Phase.DECIDED)
    @rule()
    def cancel(self) -> None:
        self.feed(self.core.leave(self.now))

    @invariant()
    def safety(self) -> None:
        acts = self.actions
        outcomes = [a.outcome for a in acts if isinstance(a, Decided)]
        assert len(outcomes) <= 1
        assert sum(isinstance(a, SendAveragedPart) for a in acts) <= 1
        statuses = [a for a in acts if isinstance(a, SendStatus)]
        assert len(statuses) <= 2
        if len(statuses) == 2:  # only "ok" then "leaving" ... never two verdicts
            assert statuses[1].leaving
        for i, a in enumerate(acts):
            if isinstance(a, SendAveragedPart):
                # our part (a reduces) is only sent after every other contributor (b, d) delivered
                assert self.core.part_finalized
            if isinstance(a, StopTransfers):
                assert any(isinstance(b, SendStatus) for b in acts[:i])
        if outcomes and isinstance(outcomes[0], Commit):
            assert self.core.complete
            assert not self.core.waiting_parts
            assert not self.core.waiting_contributions
            assert all(s.ok and not s.leaving for s in self.heard.values())
            assert outcomes[0].participants == self.plan.members
        if outcomes and isinstance(outcomes[0], Retry):
            retry = outcomes[0]
            assert "a" in retry.members or "a" in retry.removed
            for p, s in self.heard.items():
                if s.leaving:
                    assert p not in retry.members


TestAttemptMachine = AttemptMachine.TestCase
TestAttemptMachine.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)


# ----------------------------------------------------------------------------- simulated rounds

FAULTS = ("crash_before", "crash_sending", "hang_sending", "crash_reducing", "cancel")


@dataclass
class Sim:
    rng: random.Random
    max_delay: float = 0.2
    now: float = 0.0
    queue: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), fn))

    def delay(self) -> float:
        return self.rng.uniform(0.001, self.max_delay)

    def run(self, until: float) -> None:
        while self.queue and self.queue[0][0] <= until:
            t, _, fn = heapq.heappop(self.queue)
            self.now = t
            fn()


class SimPeer:
    def __init__(
        self,
        sim: Sim,
        peers: dict[str, SimPeer],
        pid: str,
        x: torch.Tensor,
        members: tuple[str, ...],
        weights: tuple[float, ...],
        bws: tuple[float, ...],
        fault: str | None,
        min_size: int,
    ) -> None:
        self.sim, self.peers, self.id, self.x = sim, peers, pid, x
        self.fault = fault
        self.fired = False
        self.dead = self.hung = self.left = False
        self.rc = RoundCore(pid, members, weights, bws, total=x.numel(), min_size=min_size, max_attempts=3,
                            timeouts=T)
        self.result = x.clone()
        self.acc = torch.zeros(0, dtype=x.dtype)
        self.outcome: RoundOutcome | None = None
        self.finished_at: float | None = None
        self.att: AttemptCore | None = None
        self.early: dict[int, list[tuple[str, str, str, torch.Tensor | None]]] = {}
        self.polls: set[float] = set()

    # -- plumbing
    @property
    def gone(self) -> bool:
        return self.dead or self.hung or self.left

    def send(
        self, to: str, kind: str, data: torch.Tensor | None = None, status: Status | None = None
    ) -> None:
        if self.gone or self.att is None:
            return
        att_no, digest = self.rc.attempts, self.att.plan.digest()
        sender = self

        def deliver() -> None:
            peer = self.peers[to]
            if kind != "status" and (sender.dead or sender.left) and sender.att_digest_stopped(digest):
                peer.on_data(att_no, digest, sender.id, "reset", None)
                return
            if peer.dead or peer.left:
                if kind != "status":  # a data stream to a dead peer breaks
                    self.sim.at(self.sim.now + self.sim.delay(), lambda: sender.on_data(
                        att_no, digest, to, "reset", None))
                return
            if peer.hung:
                return
            if kind == "status":
                assert status is not None
                peer.apply(peer.rc.on_status(att_no, digest, sender.id, status, self.sim.now))
            elif kind == "left":
                peer.apply(peer.rc.on_left(sender.id, self.sim.now))
            else:
                peer.on_data(att_no, digest, sender.id, kind, data)

        self.sim.at(self.sim.now + self.sim.delay(), deliver)

    def att_digest_stopped(self, digest: str) -> bool:
        return True

    def die(self) -> None:
        self.fired = True
        self.dead = True

    # -- round
    def start(self) -> None:
        if self.fault == "crash_before":
            self.die()
            return
        att = self.rc.start_attempt(self.sim.now)
        if att is None:
            self.finish()
            return
        self.begin(att)
        if self.fault == "cancel":
            self.sim.at(self.sim.rng.uniform(0.0, 0.3), self.cancel)

    def cancel(self) -> None:
        if self.gone or self.att is None or self.outcome is not None:
            return
        self.fired = True
        self.apply(self.rc.leave(self.sim.now))
        self.left = True

    def begin(self, att: AttemptCore) -> None:
        self.att = att
        plan = att.plan
        s, e = plan.part_of(self.id)
        w = plan.weight_of(self.id) / plan.weight_total
        self.acc = self.x[s:e] * w
        if self.id in plan.contributors:
            reducers = [r for r in plan.reducers if r != self.id]
            self.sim.rng.shuffle(reducers)
            for i, r in enumerate(reducers):
                rs, re_ = plan.part_of(r)
                midway = i == len(reducers) // 2
                if self.fault in ("crash_sending", "hang_sending") and midway and not self.fired:
                    self.fired = True
                    if self.fault == "crash_sending":
                        self.dead = True
                        for r2 in reducers[i:]:  # the streams it had open break
                            self.sim.at(self.sim.now + self.sim.delay(), self._reset_to(r2))
                    else:
                        self.hung = True
                    return
                self.send(r, "contrib", self.x[rs:re_].clone())
        self.apply(self.rc.kickoff(self.sim.now))
        for item in self.early.pop(self.rc.attempts, []):
            self.on_data(self.rc.attempts, *item)
        self.schedule_poll()

    def _reset_to(self, to: str) -> Callable[[], None]:
        att_no, digest = self.rc.attempts, self.att.plan.digest() if self.att else ""

        def fire() -> None:
            peer = self.peers[to]
            if not peer.gone:
                peer.on_data(att_no, digest, self.id, "reset", None)
        return fire

    def on_data(self, att_no: int, digest: str, sender: str, kind: str, data: torch.Tensor | None) -> None:
        if self.gone or self.att is None or self.outcome is not None:
            return
        if att_no > self.rc.attempts:
            self.early.setdefault(att_no, []).append((digest, sender, kind, data))
            return
        if att_no < self.rc.attempts or digest != self.att.plan.digest():
            return
        att, plan, now = self.att, self.att.plan, self.sim.now
        if kind == "reset":
            self.apply(att.peer_failed(sender, now, "stream reset"))
        elif att.phase is not Phase.RUNNING:
            return
        elif kind == "contrib":
            assert data is not None
            att.progress(sender, now)
            self.acc += data * (plan.weight_of(sender) / plan.weight_total)
            self.apply(att.contribution_done(sender, now))
        elif kind == "part":
            assert data is not None
            s, e = plan.part_of(sender)
            att.progress(sender, now)
            self.result[s:e] = data
            self.apply(att.averaged_part_done(sender, now))
        self.schedule_poll()

    def schedule_poll(self) -> None:
        if self.att is None:
            return
        deadline = self.att.next_deadline()
        if deadline is not None and deadline not in self.polls:
            self.polls.add(deadline)
            att = self.att

            def poll() -> None:
                if self.att is att and not self.gone and self.outcome is None:
                    self.apply(att.poll(self.sim.now))
                    self.schedule_poll()

            self.sim.at(deadline, poll)

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if self.dead or self.hung:
                return
            assert self.att is not None
            if isinstance(a, SendStatus):
                for m in self.att.others:
                    self.send(m, "status", status=Status(a.ok, a.suspects, a.blamed, a.leaving))
            elif isinstance(a, AnnounceLeft):
                for m in self.att.others:
                    self.send(m, "left")
            elif isinstance(a, SendAveragedPart):
                if self.fault == "crash_reducing" and not self.fired:
                    self.die()
                    for m in self.att.others:
                        self.sim.at(self.sim.now + self.sim.delay(), self._reset_to(m))
                    return
                s, e = self.att.plan.part_of(self.id)
                self.result[s:e] = self.acc
                for m in self.att.others:
                    self.send(m, "part", self.acc.clone())
            elif isinstance(a, StopTransfers):
                for m in self.att.others:  # worst case: every partner sees our streams reset
                    self.sim.at(self.sim.now + self.sim.delay(), self._reset_to(m))
            elif isinstance(a, Decided):
                nxt = self.rc.finish_attempt(a.outcome, self.sim.now)
                if nxt is None:
                    self.finish()
                else:
                    self.begin(nxt)
                return
        self.schedule_poll()

    def finish(self) -> None:
        self.outcome = self.rc.result
        self.finished_at = self.sim.now
        assert self.outcome is not None
        if not self.outcome.ok:
            self.result = self.x.clone()


def simulate(
    n: int, weights: list[float], bws: list[float], size: int, fault: str | None, faulty: int, seed: int,
    min_size: int = 2,
) -> tuple[dict[str, SimPeer], torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sim = Sim(rng)
    ids = tuple(f"p{i}" for i in range(n))
    xs = torch.randn(n, size, generator=gen, dtype=torch.float64)
    peers: dict[str, SimPeer] = {}
    for i, pid in enumerate(ids):
        peers[pid] = SimPeer(sim, peers, pid, xs[i], ids, tuple(weights), tuple(bws),
                             fault if i == faulty else None, min_size)
    for p in peers.values():
        sim.at(0.0, p.start)
    sim.run(until=1000.0)
    return peers, xs


def check_exact(peers: dict[str, SimPeer], xs: torch.Tensor, weights: list[float]) -> None:
    ids = list(peers)
    for p in peers.values():
        if p.outcome is None:
            continue
        if p.outcome.ok:
            idx = [ids.index(q) for q in p.outcome.participants]
            w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
            expected = (xs[idx] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(p.result, expected, rtol=1e-12, atol=1e-12)
            assert p.id in p.outcome.participants
            assert p.outcome.weight_total == pytest.approx(float(w.sum()))
        else:
            assert torch.equal(p.result, p.x)  # failure leaves the input untouched


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 6),
    size=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_simulated_rounds_without_faults_all_commit(
    n: int, size: int, seed: int, data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=n, max_size=n))
    bws = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=n, max_size=n))
    if sum(weights) == 0 or sum(bws) == 0:
        weights[0] = bws[-1] = 1.0
    peers, xs = simulate(n, weights, bws, size, None, 0, seed)
    check_exact(peers, xs, weights)
    for p in peers.values():
        assert p.outcome is not None
        assert p.outcome.ok, p.outcome
        assert p.outcome.participants == tuple(peers)
        assert p.outcome.attempts == 1
    # every peer holds bit-identical results: each part was reduced once, by its reducer
    first = next(iter(peers.values())).result
    assert all(torch.equal(p.result, first) for p in peers.values())


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 6),
    size=st.integers(1, 40),
    fault=st.sampled_from(FAULTS),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_simulated_single_fault_survivors_finish_exactly(
    n: int, size: int, fault: str, seed: int, data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=n, max_size=n))
    bws = data.draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=n, max_size=n))
    if sum(weights) == 0 or sum(bws) == 0:
        weights[0] = bws[-1] = 1.0
    faulty = data.draw(st.integers(0, n - 1))
    peers, xs = simulate(n, weights, bws, size, fault, faulty, seed)
    check_exact(peers, xs, weights)
    bad = f"p{faulty}"
    survivors = tuple(p for p in peers if p != bad)
    viable = (
        len(survivors) >= 2
        and sum(w for i, w in enumerate(weights) if i != faulty) > 0
        and sum(b for i, b in enumerate(bws) if i != faulty) > 0
    )
    for pid in survivors:
        p = peers[pid]
        assert p.outcome is not None, f"{pid} never finished"
        assert p.finished_at is not None
        assert p.finished_at < 3 * (T.reducer_timeout + T.status_timeout + 2)
        start, end = split_parts(size, bws)[faulty]
        passive = weights[faulty] == 0 and end == start  # sends nothing, reduces nothing
        if not peers[bad].fired or (passive and p.outcome.ok and p.outcome.participants == tuple(peers)):
            assert p.outcome.ok
            assert p.outcome.participants == tuple(peers)
        elif fault == "cancel" and p.outcome.ok and p.outcome.participants == tuple(peers):
            pass  # it left after its ok had gone out: our result (checked exact above) holds everyone
        elif viable:
            assert p.outcome.ok, (pid, p.outcome)
            assert p.outcome.participants == survivors
            assert p.outcome.excluded == (bad,)
        else:
            assert not p.outcome.ok
    if fault == "cancel" and peers[bad].fired:
        assert peers[bad].outcome is not None
        assert peers[bad].outcome.status is RoundStatus.FAILED


@pytest.mark.parametrize("fault", FAULTS)
def test_simulated_fault_kinds_four_peers(fault: str) -> None:
    weights, bws = [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]
    peers, xs = simulate(4, weights, bws, 101, fault, 2, seed=7)
    check_exact(peers, xs, weights)
    assert peers["p2"].fired
    for pid in ("p0", "p1", "p3"):
        out = peers[pid].outcome
        assert out is not None
        assert out.ok, out
        assert out.participants == ("p0", "p1", "p3")
        assert out.attempts == 2
        assert out.excluded == ("p2",)


def test_round_core_gives_up_below_min_size_and_after_max_attempts() -> None:
    rc = RoundCore("a", ("a", "b", "c"), (1, 1, 1), (1, 1, 1), total=5, min_size=3, timeouts=T)
    att = rc.start_attempt(0.0)
    assert att is not None
    assert rc.finish_attempt(Retry(("a", "b"), frozenset({"c"}), "c died"), 1.0) is None
    assert rc.result is not None
    assert rc.result.status is RoundStatus.FAILED
    assert "min_size" in rc.result.reason
    assert rc.result.excluded == ("c",)
    with pytest.raises(LocalProtocolError):
        rc.finish_attempt(Retry(("a",), frozenset(), ""), 2.0)

    rc = RoundCore("a", ("a", "b"), (1, 1), (1, 1), total=5, max_attempts=2, timeouts=T)
    rc.start_attempt(0.0)
    assert rc.finish_attempt(Retry(("a", "b"), frozenset(), "x"), 1.0) is not None
    assert rc.finish_attempt(Retry(("a", "b"), frozenset(), "x"), 2.0) is None
    assert rc.result is not None
    assert "after 2 attempts" in rc.result.reason

    rc = RoundCore("a", ("a", "b"), (1, 1), (1, 1), total=5, timeouts=T)
    rc.start_attempt(0.0)
    rc.finish_attempt(Retry(("b",), frozenset({"a"}), "x"), 1.0)
    assert rc.result is not None
    assert "excluded" in rc.result.reason

    rc = RoundCore("a", ("a", "b"), (0, 1), (1, 0), total=5, timeouts=T)
    rc.start_attempt(0.0)
    rc.finish_attempt(Retry(("a",), frozenset({"b"}), "x"), 1.0)
    assert rc.result is not None
    assert not rc.result.ok

    rc = RoundCore("a", ("a",), (1,), (1,), total=5, min_size=2)
    assert rc.start_attempt(0.0) is None
    assert rc.result is not None
    assert not rc.result.ok
    with pytest.raises(ConfigError):
        RoundCore("z", ("a",), (1,), (1,), total=1)


def test_round_core_buffers_early_statuses() -> None:
    rc = RoundCore("a", ("a", "b", "c"), (1, 1, 1), (1, 1, 1), total=6, timeouts=T)
    att = rc.start_attempt(0.0)
    assert att is not None
    rc.kickoff(0.0)
    nxt_plan = AttemptPlan.build(("a", "b"), weights=(1, 1), bandwidths=(1, 1), total=6)
    # b already finished attempt 2 and says ok before we even started it
    assert rc.on_status(2, nxt_plan.digest(), "b", Status(ok=True), 1.0) == []
    assert rc.on_status(9, "x", "b", Status(ok=True), 1.0) == []  # beyond max_attempts: dropped
    assert rc.on_status(1, "wrong-digest", "b", Status(ok=False), 1.0) == []
    nxt = rc.finish_attempt(Retry(("a", "b"), frozenset({"c"}), "c died"), 2.0)
    assert nxt is not None
    assert nxt.plan.digest() == nxt_plan.digest()
    rc.kickoff(2.0)
    assert "b" in nxt.statuses
    out = nxt.contribution_done("b", 3.0) + nxt.averaged_part_done("b", 3.0)
    assert decided(out) == [Commit(("a", "b"), 2.0)]
    with pytest.raises(LocalProtocolError):
        rc.kickoff(4.0)
