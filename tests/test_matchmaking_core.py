"""Direct tests of matchmaking: the deterministic partition and a simulated swarm of MatchCores
with gossip delays, partial views and late joiners."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2pcompute.collective.matchcore import (
    Candidate,
    Formed,
    MatchCore,
    MatchState,
    NoGroup,
    SendHello,
    SendReady,
    group_digest,
    partition,
)
from p2pcompute.errors import ConfigError


@given(
    n=st.integers(0, 40),
    target=st.integers(1, 8),
    data=st.data(),
)
def test_partition_sizes_and_determinism(n: int, target: int, data: st.DataObject) -> None:
    min_size = data.draw(st.integers(1, target))
    peers = [f"p{i}" for i in range(n)]
    groups = partition(peers, "round-1", target=target, min_size=min_size)
    again = partition(list(reversed(peers)), "round-1", target=target, min_size=min_size)
    assert groups == again  # order of the view does not matter
    if n < min_size:
        assert groups == []
        return
    flat = [p for g in groups for p in g]
    assert sorted(flat) == sorted(peers)  # everyone placed exactly once
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= min_size
    if len(groups) > 1:
        assert max(sizes) <= max(target, 2 * min_size)


def test_partition_reshuffles_per_round_and_validates() -> None:
    peers = [f"p{i}" for i in range(12)]
    assert partition(peers, "a", target=4, min_size=2) != partition(peers, "b", target=4, min_size=2)
    assert [len(g) for g in partition(peers[:5], "a", target=4, min_size=3)] == [5]
    with pytest.raises(ConfigError):
        partition(peers, "a", target=0, min_size=1)
    with pytest.raises(ConfigError):
        MatchCore(Candidate("a", 1, 1, 10), run="r", round_key="k", target=2, min_size=3, now=0, deadline=5)
    with pytest.raises(ConfigError):
        MatchCore(Candidate("a", 1, 1, 10), run="r", round_key="k", target=2, min_size=2, now=5, deadline=5)


def test_two_peers_form_and_a_late_one_gets_busy() -> None:
    a = MatchCore(Candidate("a", 1, 1, 100), run="r", round_key="k", target=2, min_size=2, now=0, deadline=10)
    assert a.poll(1.0) == []  # alone: nothing to propose
    a.add_candidate(Candidate("b", 1, 1, 100), 1.0)
    assert a.poll(1.2) == []  # not settled yet
    (hello,) = a.poll(1.5)
    assert isinstance(hello, SendHello)
    assert hello.to == ("b",)
    assert hello.digest == group_digest("r", "k", hello.members)
    a.on_vote("b", "other", 3, 1.6)
    assert a.poll(1.6) == []
    a.on_vote("b", hello.digest, 2, 1.65)  # older than what b told us: ignored
    assert a.poll(1.65) == []
    a.on_vote("b", hello.digest, 4, 1.7)
    (ready,) = a.poll(1.7)
    assert ready == SendReady(("b",), hello.digest)
    assert a.state is MatchState.LOCKED
    assert not a.on_ready("b", "stale", 1.75)
    assert a.on_ready("b", hello.digest, 1.8)
    (formed,) = a.poll(1.8)
    assert isinstance(formed, Formed)
    assert [c.peer_id for c in formed.members] == list(hello.members)
    assert a.answer_state() == "busy"
    assert a.poll(50) == []


def test_no_group_at_deadline_and_silent_members_are_dropped() -> None:
    a = MatchCore(Candidate("a", 1, 1, 100), run="r", round_key="k", target=2, min_size=2, now=0, deadline=10,
                  hello_timeout=2.0)
    a.add_candidate(Candidate("b", 1, 1, 100), 0.0)
    a.add_candidate(Candidate("x", 1, 1, 0.5), 0.0)  # expires before we propose
    (hello,) = a.poll(0.5)
    assert isinstance(hello, SendHello)
    assert "x" not in hello.members
    assert a.next_deadline(0.5) == 2.5
    assert a.poll(2.5) == []  # b never answered: dropped, back to gathering
    assert a.state is MatchState.GATHERING
    assert "b" in a.excluded
    assert not a.add_candidate(Candidate("b", 1, 1, 100), 3.0)
    (nog,) = a.poll(10.0)
    assert isinstance(nog, NoGroup)
    assert "deadline" in nog.reason


def test_waits_for_a_full_group_until_patience() -> None:
    a = MatchCore(Candidate("a", 1, 1, 100), run="r", round_key="k", target=4, min_size=2, now=0, deadline=10,
                  patience=3.0)
    a.add_candidate(Candidate("b", 1, 1, 100), 0.1)
    assert a.poll(1.0) == []  # settled, but only 2 of 4
    assert a.next_deadline(1.0) == 3.0
    (hello,) = a.poll(3.0)
    assert isinstance(hello, SendHello)


class Swarm:
    """N MatchCores exchanging adverts (gossip with random delay) and hellos (request + answer)."""

    def __init__(self, rng: random.Random, *, max_delay: float, target: int, min_size: int) -> None:
        self.rng = rng
        self.max_delay = max_delay
        self.target, self.min_size = target, min_size
        self.cores: dict[str, MatchCore] = {}
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.results: dict[str, Formed | NoGroup] = {}
        self.timers: dict[str, set[float]] = {}
        self.expected: int | None = None  # passed to every core (peers the caller knows will come)
        self.formed_at: dict[str, float] = {}
        self.paused: dict[str, tuple[float, float]] = {}  # peer -> (from, until): SIGSTOP

    def awake(self, pid: str, fn: Callable[[], None]) -> bool:
        """False (and ``fn`` put off until it wakes) while ``pid`` is paused."""
        start, until = self.paused.get(pid, (0.0, 0.0))
        if start <= self.now < until:
            self.at(until, fn)
            return False
        return True

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (t, next(self.seq), fn))

    def delay(self) -> float:
        return self.rng.uniform(0.001, self.max_delay)

    def join(self, pid: str, t: float) -> None:
        def start() -> None:
            cand = Candidate(pid, 1.0, 1.0, expires=1000.0)
            self.cores[pid] = MatchCore(cand, run="r", round_key="k", target=self.target,
                                        min_size=self.min_size, now=self.now, deadline=self.now + 20.0,
                                        expected=self.expected)
            for other in list(self.cores):
                if other != pid:  # gossip our advert to everyone already listening
                    self.at(self.now + self.delay(), self.deliver_advert(other, cand))
                    known = self.cores[other].me  # and we hear theirs (they re-advertise)
                    self.at(self.now + self.delay(), self.deliver_advert(pid, known))
            self.step(pid)
        self.at(t, start)

    def deliver_advert(self, to: str, cand: Candidate) -> Callable[[], None]:
        def fn() -> None:
            if self.awake(to, fn):
                self.cores[to].add_candidate(cand, self.now)
                self.step(to)
        return fn

    def step(self, pid: str) -> None:
        if not self.awake(pid, lambda: self.step(pid)):
            return
        core = self.cores[pid]
        for action in core.poll(self.now):
            if isinstance(action, SendHello):
                view = [core.candidates[p] for p in core.view(self.now)]
                for m in action.to:
                    self.at(self.now + self.delay(), self.hello(pid, m, action.digest, action.seq, view))
            elif isinstance(action, SendReady):
                for m in action.to:
                    self.at(self.now + self.delay(), self.ready(pid, m, action.digest))
            else:
                self.results[pid] = action
                self.formed_at[pid] = self.now
        nxt = core.next_deadline(self.now)
        if nxt is not None and nxt not in self.timers.setdefault(pid, set()):
            self.timers[pid].add(nxt)
            self.at(nxt, lambda: self.step(pid))

    def hello(self, frm: str, to: str, digest: str, seq: int, view: list[Candidate]) -> Callable[[], None]:
        def fn() -> None:
            core = self.cores.get(to)
            if core is None or not self.awake(to, fn):
                return
            for c in view:
                core.add_candidate(c, self.now)
            core.on_vote(frm, digest, seq, self.now)
            state, mine, my_seq = core.answer_state(), core.digest, core.seq
            my_view = [core.candidates[p] for p in core.view(self.now)]
            self.step(to)

            def answer() -> None:
                sender = self.cores[frm]
                if not self.awake(frm, answer):
                    return
                if state == "busy":
                    sender.on_busy(to, self.now)
                else:
                    for c in my_view:
                        sender.add_candidate(c, self.now)
                    sender.on_vote(to, mine, my_seq, self.now)
                self.step(frm)
            self.at(self.now + self.delay(), answer)
        return fn

    def ready(self, frm: str, to: str, digest: str) -> Callable[[], None]:
        def fn() -> None:
            if not self.awake(to, fn):
                return
            ok = self.cores[to].on_ready(frm, digest, self.now)
            committed = ok and self.cores[to].committed(digest)
            self.step(to)

            def answer() -> None:
                if not self.awake(frm, answer):
                    return
                if not ok:
                    self.cores[frm].on_ready_refused(to, self.now)
                elif committed:
                    self.cores[frm].on_ready_confirmed(to, digest, self.now)
                self.step(frm)
            self.at(self.now + self.delay(), answer)
        return fn

    def run(self, until: float = 100.0) -> None:
        steps = 0
        while self.queue and self.queue[0][0] <= until:
            t, _, fn = heapq.heappop(self.queue)
            self.now = t
            fn()
            steps += 1
            assert steps < 200_000, "simulation does not settle"


def check_consistent(swarm: Swarm, ignore: frozenset[str] = frozenset()) -> None:
    """Formed groups never overlap partially: two formed peers share a group or nothing."""
    formed = {p: r for p, r in swarm.results.items() if isinstance(r, Formed) and p not in ignore}
    for p, r in formed.items():
        members = tuple(c.peer_id for c in r.members)
        assert p in members
        for q in members:
            if q in formed:
                other = tuple(c.peer_id for c in formed[q].members)
                assert other == members or not (set(other) & set(members) - {q}), (p, q, members, other)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 10), target=st.integers(2, 5), seed=st.integers(0, 2**32 - 1))
def test_simultaneous_joins_form_the_partition_of_everyone(n: int, target: int, seed: int) -> None:
    swarm = Swarm(random.Random(seed), max_delay=0.2, target=target, min_size=2)
    for i in range(n):
        swarm.join(f"p{i}", t=random.Random(seed + i).uniform(0, 0.1))
    swarm.run()
    check_consistent(swarm)
    expected = partition([f"p{i}" for i in range(n)], "k", target=target, min_size=2)
    for pid in swarm.cores:
        res = swarm.results.get(pid)
        assert isinstance(res, Formed), (pid, res)
        members = tuple(c.peer_id for c in res.members)
        assert members in expected


def test_four_peers_in_two_pairs_merge_into_one_group() -> None:
    """Hivemind's split: {a, b} and {c, d} start out knowing only each other."""
    swarm = Swarm(random.Random(1), max_delay=0.05, target=4, min_size=2)
    for pid in "abcd":
        swarm.cores[pid] = MatchCore(Candidate(pid, 1, 1, 1000), run="r", round_key="k", target=4,
                                     min_size=2, now=0, deadline=20, patience=0.3, settle=0.2)
    swarm.cores["a"].add_candidate(swarm.cores["b"].me, 0)
    swarm.cores["b"].add_candidate(swarm.cores["a"].me, 0)
    swarm.cores["c"].add_candidate(swarm.cores["d"].me, 0)
    swarm.cores["d"].add_candidate(swarm.cores["c"].me, 0)
    for pid in "abcd":
        swarm.at(0.0, lambda pid=pid: swarm.step(pid))
    # each pair proposes itself at 0.3; the gossip bridging them lands just after
    swarm.at(0.31, swarm.deliver_advert("a", swarm.cores["c"].me))
    swarm.at(0.31, swarm.deliver_advert("c", swarm.cores["a"].me))
    swarm.run()
    check_consistent(swarm)
    groups = {tuple(c.peer_id for c in r.members) for r in swarm.results.values() if isinstance(r, Formed)}
    assert groups == {("b", "a", "d", "c")} or all(len(g) == 2 for g in groups)
    assert len(swarm.results) == 4


def test_pairs_that_hear_of_each_other_before_forming_merge() -> None:
    swarm = Swarm(random.Random(2), max_delay=0.05, target=4, min_size=2)
    for pid in "abcd":
        swarm.cores[pid] = MatchCore(Candidate(pid, 1, 1, 1000), run="r", round_key="k", target=4,
                                     min_size=2, now=0, deadline=20, patience=1.0, settle=0.2)
    swarm.cores["a"].add_candidate(swarm.cores["b"].me, 0)
    swarm.cores["b"].add_candidate(swarm.cores["a"].me, 0)
    swarm.cores["c"].add_candidate(swarm.cores["d"].me, 0)
    swarm.cores["d"].add_candidate(swarm.cores["c"].me, 0)
    for pid in "abcd":
        swarm.at(0.0, lambda pid=pid: swarm.step(pid))
    # only a and c hear of one another (one bridge); hellos carry the views on to b and d
    swarm.at(0.5, swarm.deliver_advert("a", swarm.cores["c"].me))
    swarm.at(0.5, swarm.deliver_advert("c", swarm.cores["a"].me))
    swarm.run()
    groups = {tuple(c.peer_id for c in r.members) for r in swarm.results.values() if isinstance(r, Formed)}
    assert len(groups) == 1
    (group,) = groups
    assert sorted(group) == ["a", "b", "c", "d"]
    assert len(swarm.results) == 4


@pytest.mark.xfail(
    strict=False,
    reason="known corner (issue 16, docs/design/training.md 'Churn'): hypothesis finds rare schedules "
    "(n=7 seed=1614, n=7 seed=664809) where a late peer forms with two that formed without it",
)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 9), seed=st.integers(0, 2**32 - 1))
# Found by this test: p2's ready reached p8 and p5 while each was between two proposals and
# was dropped; p2 formed, the others timed out waiting for it and formed without p2.
@example(n=9, seed=300876)
def test_late_joiners_never_break_formed_groups(n: int, seed: int) -> None:
    rng = random.Random(seed)
    swarm = Swarm(rng, max_delay=0.3, target=3, min_size=2)
    for i in range(n):
        swarm.join(f"p{i}", t=rng.uniform(0, 6))
    swarm.run()
    check_consistent(swarm)
    assert set(swarm.results) == set(swarm.cores)  # everyone got an answer: a group or NoGroup


def test_a_committed_answer_counts_as_the_peers_ready() -> None:
    def core(me: str) -> MatchCore:
        c = MatchCore(
            Candidate(me, 1, 1, 100), run="r", round_key="k", target=2, min_size=2, now=0, deadline=10
        )
        c.add_candidate(Candidate("b" if me == "a" else "a", 1, 1, 100), 0.0)
        return c

    a, b = core("a"), core("b")
    (hello_a,) = a.poll(0.5)
    (hello_b,) = b.poll(0.5)
    assert hello_a.digest == hello_b.digest
    digest = hello_a.digest
    b.on_vote("a", digest, hello_a.seq, 0.6)
    assert any(isinstance(x, SendReady) for x in b.poll(0.6))  # b is locked: its ready goes out
    assert b.committed(digest)
    assert not b.committed("other")
    # b's ready to a is lost; a locks later and sends its own ready, which b accepts as committed
    a.on_vote("b", digest, hello_b.seq, 0.7)
    a.poll(0.7)
    assert a.state is MatchState.LOCKED
    assert b.on_ready("a", digest, 0.8)
    a.on_ready_confirmed("b", digest, 0.9)
    (formed,) = a.poll(0.9)
    assert isinstance(formed, Formed)
    # a confirmation for another digest, or from outside the proposal, changes nothing
    c = core("a")
    c.poll(0.5)
    c.on_ready_confirmed("b", "other", 0.6)
    c.on_ready_confirmed("zz", c.digest, 0.6)
    assert c.readies == set()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 7), seed=st.integers(0, 2**32 - 1), late=st.booleans())
def test_known_partners_all_present_form_without_waiting_out_patience(n: int, seed: int, late: bool) -> None:
    """Every peer knows the n-1 others will come (``expected``): the group of all forms as soon as
    the last arrives, long before patience (10 s: half the 20 s deadline), never split in two."""
    rng = random.Random(seed)
    swarm = Swarm(rng, max_delay=0.2, target=8, min_size=2)
    swarm.expected = n - 1
    for i in range(n):
        swarm.join(f"p{i}", t=3.0 if late and i == n - 1 else rng.uniform(0, 0.1))
    swarm.run()
    check_consistent(swarm)
    groups = {tuple(sorted(c.peer_id for c in r.members)) for r in swarm.results.values()
              if isinstance(r, Formed)}
    assert groups == {tuple(sorted(f"p{i}" for i in range(n)))}
    assert max(swarm.formed_at.values()) < (3.0 if late else 0.0) + 3.0


def test_an_expected_peer_that_never_comes_costs_patience_only() -> None:
    a = MatchCore(Candidate("a", 1, 1, 100), run="r", round_key="k", target=8, min_size=2, now=0, deadline=10,
                  patience=3.0, expected=2)
    a.add_candidate(Candidate("b", 1, 1, 100), 0.1)
    assert a.poll(1.0) == []  # b is here, c (expected) is not
    (hello,) = a.poll(3.0)
    assert isinstance(hello, SendHello)
    a2 = MatchCore(Candidate("a", 1, 1, 100), run="r", round_key="k", target=8, min_size=2, now=0,
                   deadline=10, patience=3.0, expected=1)
    a2.add_candidate(Candidate("b", 1, 1, 100), 0.1)
    (hello,) = a2.poll(0.6)  # everyone expected is here: settled (0.5 s) is enough
    assert isinstance(hello, SendHello)


# -- churn: dead, leaving, paused and late peers (issue 16)


def core_ab(**kw: object) -> MatchCore:
    return MatchCore(Candidate("a", 1, 1, 100), run="r", round_key="k", target=8, min_size=2, now=0,
                     deadline=30, patience=3.0, **kw)  # type: ignore[arg-type]


def test_an_expected_partner_that_dies_or_leaves_is_not_waited_for() -> None:
    """Expected by id: once the dead partner is forgotten (its connection closed, or it said it
    was leaving) the others form after the settle window, not after patience."""
    a = core_ab(expected={"b", "c"})
    a.add_candidate(Candidate("b", 1, 1, 100), 0.1)
    assert a.poll(1.0) == []  # c is expected and not here: wait (up to patience)
    a.forget("c", 1.2)
    (hello,) = a.poll(1.2)
    assert isinstance(hello, SendHello)
    assert set(hello.members) == {"a", "b"}
    # by count (the older form) forgetting lowers the count the same way
    a2 = core_ab(expected=2)
    a2.add_candidate(Candidate("b", 1, 1, 100), 0.1)
    assert a2.poll(1.0) == []
    a2.forget("c", 1.2)
    assert isinstance(a2.poll(1.2)[0], SendHello)
    # a forgotten candidate that was in the view leaves it
    a3 = core_ab(expected={"b", "c"})
    for p in "bc":
        a3.add_candidate(Candidate(p, 1, 1, 100), 0.1)
    a3.forget("b", 0.2)
    assert a3.view(0.7) == ["a", "c"]
    assert a3.add_candidate(Candidate("b", 1, 1, 200), 0.8) is False


def test_a_round_that_closed_without_us_ends_at_once_not_at_the_deadline() -> None:
    """A joiner late for its round hears ``busy`` from everyone: no group now, not in 30 s."""
    a = core_ab()
    a.add_candidate(Candidate("b", 1, 1, 100), 0.1)
    a.add_candidate(Candidate("c", 1, 1, 100), 0.1)
    a.on_busy("b", 0.2)
    assert a.poll(0.2) == []  # c may still be forming with us
    a.on_busy("c", 0.3)
    (result,) = a.poll(0.3)
    assert isinstance(result, NoGroup)
    assert "closed without us" in result.reason
    # an expected partner not heard from yet keeps the round open
    b = core_ab(expected={"c", "d"})
    b.add_candidate(Candidate("c", 1, 1, 100), 0.1)
    b.on_busy("c", 0.2)
    assert b.poll(0.2) == []
    b.forget("d", 0.4)
    assert isinstance(b.poll(0.4)[0], NoGroup)


@pytest.mark.xfail(
    strict=False,
    reason="known corner (issue 16): a pause at ~0.69 s with expected partners (seed=1, pause_at=0.6875, "
    "known=True) leaves the other two without a group by the deadline",
)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pause_at=st.floats(0.0, 1.0), known=st.booleans())
def test_a_peer_paused_during_matchmaking_is_dropped_and_the_others_form(
    seed: int, pause_at: float, known: bool
) -> None:
    """The SIGSTOP case: p2 stops for 8 s mid-matchmaking. p0 and p1 form one group (with p2 when
    it got far enough before the pause, else without it) within a hello timeout (3 s) of their
    proposal, never at the deadline (20 s).

    What p2 itself ends with is not checked: readies it reads on waking were sent before the
    others gave up on it, so it may believe in a group they left (its all-reduce then fails and
    it re-syncs), and its own timers may fire before it reads them (the driver then asks the
    others again and learns the round closed, see the next test)."""
    rng = random.Random(seed)
    swarm = Swarm(rng, max_delay=0.2, target=8, min_size=2)
    if known:
        swarm.expected = 2
    for i in range(3):
        swarm.join(f"p{i}", t=rng.uniform(0, 0.1))
    swarm.paused["p2"] = (pause_at, pause_at + 8.0)
    swarm.run()
    check_consistent(swarm, ignore=frozenset({"p2"}))
    r0, r1 = swarm.results.get("p0"), swarm.results.get("p1")
    assert isinstance(r0, Formed), r0
    assert isinstance(r1, Formed), r1
    if {c.peer_id for c in r0.members} == {"p0", "p1"}:
        assert max(swarm.formed_at["p0"], swarm.formed_at["p1"]) < (4.5 if known else 14.0)


def test_a_peer_that_wakes_to_find_everyone_gone_learns_the_round_closed() -> None:
    """Woken from a pause, p2's timers dropped p0 and p1 (silent to it) before it read anything;
    asking them again (the driver pulls from dropped peers once the view is empty) brings
    ``busy``: the round closed, no group at once rather than at the deadline."""
    a = core_ab()
    for p in "bc":
        a.add_candidate(Candidate(p, 1, 1, 100), 0.1)
    (hello,) = a.poll(3.0)  # patience over: propose the three of us
    assert isinstance(hello, SendHello)
    assert a.poll(9.0) == []  # woken: silent members dropped, nobody left
    assert a.view(9.0) == ["a"]
    assert a.silent() == {"b", "c"}
    assert a.poll(9.05) == []  # nothing heard yet: they may come back to us
    a.on_busy("b", 9.1)  # b went on without us (c, silent, is no reason to hold on)
    (result,) = a.poll(9.1)
    assert isinstance(result, NoGroup)
    assert "closed without us" in result.reason
