"""Sans-IO matchmaking: peers that want to average under one run and round form groups.

Every candidate publishes a signed *join* advert (run, round key, weight, bandwidth, tensor
layout digest, expiry). Every peer keeps the set of live candidates it knows (its *view*) and
cuts it with the same deterministic function, :func:`partition`: candidates sorted by
``sha256(round key | peer id)`` and dealt into contiguous groups of about ``target`` (never
fewer than ``min_size``). Two peers with the same view therefore compute the same groups;
there is no leader to race for and no follower to lock.

Views converge by two means: gossip (every advert reaches every candidate) and *hellos*: once
its view has been quiet for ``settle`` seconds (and its group is full, or ``patience`` ran
out, or every peer the caller said to expect is in the view), a peer proposes its group and
sends each member a hello carrying the group's digest and the adverts of its whole view; the
answer carries the receiver's current digest and view.
Any new candidate learned this way changes the view, the partition, and so the proposal. A
group is *formed* when every member's latest hello names the same digest. Hence two groups
that started forming at once (a view of {A, B} here, {C, D} there) merge as soon as either
side hears of the other instead of splitting the swarm, and every later round starts from the
union. A member that answers ``busy`` (already formed) or does not answer within
``hello_timeout`` leaves the view. At the deadline without a formed group: :class:`NoGroup`.

Votes alone would let one member "form" on another's vote that has since moved on (a merge in
flight). So formation has a second phase: a peer that holds matching votes from every member
*locks* its proposal and sends each member ``ready``; it forms once every member sent ``ready``
for the same digest. A locked peer does not change its proposal; a member that has moved on
refuses the ``ready`` (which unlocks the sender) and a lock that gathers no full set of
``ready`` within ``hello_timeout`` drops the members that stayed silent and proposes again.
A ready that arrives while its receiver is between two proposals is dropped with them, so the
answer to a ready says whether the answerer is itself committed (locked on, or formed with,
that digest); a committed answer counts as that member's ready (:meth:`MatchCore.committed`,
:meth:`MatchCore.on_ready_confirmed`).

Imports :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from p2pcompute.errors import ConfigError, LocalProtocolError


def group_order_key(round_key: str, peer_id: str) -> bytes:
    """The sort key of ``peer_id`` in round ``round_key`` (fresh shuffle every round)."""
    return hashlib.sha256(f"p2pcompute-match-v1|{round_key}|{peer_id}".encode()).digest()


def partition(
    peers: Iterable[str], round_key: str, *, target: int, min_size: int
) -> list[tuple[str, ...]]:
    """Cut ``peers`` into groups of about ``target`` (at least ``min_size``), deterministically.

    Sizes differ by at most one; when ``target``-sized groups would leave one below ``min_size``
    there are fewer, larger groups instead. Fewer than ``min_size`` peers: no group.

    Example::

        >>> [len(g) for g in partition([f"p{i}" for i in range(10)], "r1", target=4, min_size=2)]
        [4, 3, 3]
    """
    if target < 1 or min_size < 1:
        raise ConfigError("target and min_size must be at least 1")
    ordered = sorted(set(peers), key=lambda p: (group_order_key(round_key, p), p))
    n = len(ordered)
    if n < min_size or n == 0:
        return []
    groups = max(1, math.ceil(n / target))
    while groups > 1 and n // groups < min_size:
        groups -= 1
    base, extra = divmod(n, groups)
    out: list[tuple[str, ...]] = []
    start = 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(tuple(ordered[start : start + size]))
        start += size
    return out


def group_digest(run: str, round_key: str, members: Sequence[str]) -> str:
    """The name of a proposed group; equal digests mean equal (run, round, members in order)."""
    h = hashlib.sha256(f"p2pcompute-group-v1|{run}|{round_key}|".encode())
    h.update("|".join(members).encode())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class Candidate:
    """A peer that wants to average in this round, as its signed advert said."""

    peer_id: str
    weight: float
    bandwidth: float
    expires: float
    advert: bytes = b""  # the signed advert, forwarded in hellos


@dataclass(frozen=True)
class SendHello:
    """Propose ``members`` (digest ``digest``) to each peer in ``to``."""

    to: tuple[str, ...]
    digest: str
    members: tuple[str, ...]
    seq: int


@dataclass(frozen=True)
class SendReady:
    """Every member named our digest: tell them we are locked on it."""

    to: tuple[str, ...]
    digest: str


@dataclass(frozen=True)
class Formed:
    """A group formed: average with ``members`` (in this order)."""

    digest: str
    members: tuple[Candidate, ...]


@dataclass(frozen=True)
class NoGroup:
    reason: str


MatchAction = SendHello | SendReady | Formed | NoGroup


class MatchState(enum.Enum):
    GATHERING = "gathering"
    PROPOSED = "proposed"
    LOCKED = "locked"
    FORMED = "formed"
    NO_GROUP = "no_group"


@dataclass
class MatchCore:
    """One peer's matchmaking for one (run, round). Feed it adverts, hellos, answers and time.

    Example::

        core = MatchCore(me, run="r", round_key="step-7", target=4, min_size=2, now=0.0, deadline=30.0)
        core.add_candidate(other, now=0.1)
        actions = core.poll(now=0.7)      # SendHello(...) once the view settled
        core.on_vote(peer, digest, seq, now=0.8)
        actions = core.poll(now=0.8)      # Formed(...) when every member named our digest
    """

    me: Candidate
    run: str
    round_key: str
    target: int
    min_size: int
    now: float
    deadline: float
    settle: float = 0.5
    patience: float | None = None  # how long to wait for a full group (default: half the time left)
    #: the other peers the caller knows will come (its live partners that are ready for this
    #: round), as their ids or just their number: once the view holds them all, the group counts
    #: as full and patience is not waited out. One that leaves or dies is :meth:`forget`-ten.
    expected: int | Collection[str] | None = None
    hello_timeout: float = 3.0
    max_candidates: int = 256
    state: MatchState = MatchState.GATHERING
    candidates: dict[str, Candidate] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    votes: dict[str, str] = field(default_factory=dict)
    proposal: tuple[str, ...] = ()
    digest: str = ""
    seq: int = 0  # bumps with every proposal; votes carry it so a late answer never beats a new hello
    result: Formed | NoGroup | None = None

    def __post_init__(self) -> None:
        if self.target < 1 or self.min_size < 1 or self.min_size > max(self.target, 1):
            raise ConfigError("need 1 <= min_size <= target")
        if self.deadline <= self.now:
            raise ConfigError("the matchmaking deadline must be in the future")
        if self.settle < 0 or self.hello_timeout <= 0:
            raise ConfigError("settle must be >= 0 and hello_timeout > 0")
        self.candidates[self.me.peer_id] = self.me
        self._changed_at = self.now
        self._full_by = self.now + (
            self.patience if self.patience is not None else (self.deadline - self.now) / 2
        )
        self._proposed_at = 0.0
        self._vote_seq: dict[str, int] = {}
        self.readies: set[str] = set()
        self._locked_at = 0.0
        #: the expected peers by id (None: only a count, or nobody, is expected)
        self.expected_ids: set[str] | None = None
        if self.expected is not None and not isinstance(self.expected, int):
            self.expected_ids = set(self.expected) - {self.me.peer_id}
        #: peers that answered ``busy``: they formed (or gave up) this round without us
        self.busy: set[str] = set()

    # -- view
    def view(self, now: float) -> list[str]:
        """Live candidates we may group with (us included)."""
        return [
            p
            for p, c in self.candidates.items()
            if p == self.me.peer_id or (c.expires > now and p not in self.excluded)
        ]

    def add_candidate(self, cand: Candidate, now: float) -> bool:
        """A verified advert for this round; True when it changed our view."""
        pid = cand.peer_id
        if pid == self.me.peer_id or pid in self.excluded or cand.expires <= now:
            return False
        known = self.candidates.get(pid)
        if known is not None:
            if cand.expires > known.expires:
                self.candidates[pid] = cand
            return False
        if len(self.candidates) >= self.max_candidates:
            return False
        self.candidates[pid] = cand
        self._changed_at = now
        return True

    def exclude(self, peer: str, now: float) -> None:
        """``peer`` is busy (formed elsewhere), unreachable or silent: drop it from our view."""
        if peer == self.me.peer_id or peer in self.excluded:
            return
        self.excluded.add(peer)
        self.votes.pop(peer, None)
        if peer in self.candidates:
            self._changed_at = now

    def forget(self, peer: str, now: float) -> None:
        """``peer`` left or died (it said so, or its connection closed): never wait for it again.

        It leaves the view and stops counting as expected, so a group of the others forms at
        once instead of after ``patience`` or a hello timeout.
        """
        if peer == self.me.peer_id:
            return
        if self.expected_ids is not None:
            self.expected_ids.discard(peer)
        elif isinstance(self.expected, int) and peer not in self.excluded and self.expected > 0:
            self.expected -= 1
        settled_since = self._changed_at
        self.exclude(peer, now)
        self._changed_at = settled_since  # a peer gone is nothing new to wait and see about

    def on_busy(self, peer: str, now: float) -> None:
        """``peer`` answered ``busy``: it has formed (or given up) this round without us."""
        if peer == self.me.peer_id:
            return
        self.busy.add(peer)
        self.exclude(peer, now)

    def silent(self) -> set[str]:
        """Peers dropped for silence (no answer in time), not known to have moved on.

        Once the view is only us, the driver asks them again: a ``busy`` answer tells us the
        round closed (a peer woken from a pause otherwise waits out the deadline).
        """
        return self.excluded - self.busy

    def _everyone_here(self, now: float) -> bool:
        """Every peer the caller expects is in the view (or known not to come)."""
        if self.expected_ids is not None:
            view = set(self.view(now))
            return all(p in view or p in self.excluded for p in self.expected_ids)
        return isinstance(self.expected, int) and len(self.view(now)) > self.expected

    def on_vote(self, peer: str, digest: str, seq: int, now: float) -> None:
        """``peer`` told us (in a hello or an answer) which group it proposes as of its ``seq``."""
        if peer in self.candidates and peer != self.me.peer_id and seq >= self._vote_seq.get(peer, -1):
            self._vote_seq[peer] = seq
            self.votes[peer] = digest

    # -- decisions
    def my_group(self, now: float) -> tuple[str, ...]:
        for group in partition(self.view(now), self.round_key, target=self.target, min_size=self.min_size):
            if self.me.peer_id in group:
                return group
        return ()

    def on_ready(self, peer: str, digest: str, now: float) -> bool:
        """``peer`` is locked on ``digest``; False (refuse: it should unlock) when that is not ours."""
        if self.state in (MatchState.PROPOSED, MatchState.LOCKED) and digest == self.digest:
            if peer in self.proposal:
                self.readies.add(peer)
                return True
            return False
        return self.state is MatchState.FORMED and digest == self.digest

    def committed(self, digest: str) -> bool:
        """True when we are locked on ``digest`` (our own ready went out) or formed with it.

        Answering a peer's ready with this lets the peer count us as ready even when our own
        ready reached it while it was between two proposals and was dropped.
        """
        return self.state in (MatchState.LOCKED, MatchState.FORMED) and digest == self.digest

    def on_ready_confirmed(self, peer: str, digest: str, now: float) -> None:
        """``peer`` accepted our ready and is itself committed to ``digest``: it counts as ready."""
        live = self.state in (MatchState.PROPOSED, MatchState.LOCKED)
        if live and digest == self.digest and peer in self.proposal:
            self.readies.add(peer)

    def on_ready_refused(self, peer: str, now: float) -> None:
        """``peer`` refused our ``ready``: it has moved on; unlock and forget its vote."""
        self.votes.pop(peer, None)
        if self.state is MatchState.LOCKED:
            self.state = MatchState.PROPOSED
            self.readies.clear()

    def poll(self, now: float) -> list[MatchAction]:
        """Everything due by ``now``: a (new) proposal, locking, formation, or giving up."""
        if self.state in (MatchState.FORMED, MatchState.NO_GROUP):
            return []
        if now >= self.deadline:
            self.state = MatchState.NO_GROUP
            have = len(self.view(now))
            self.result = NoGroup(
                f"no group formed by the deadline ({have} candidate(s) known, min_size={self.min_size})"
            )
            return [self.result]
        out: list[MatchAction] = []
        others = [m for m in self.proposal if m != self.me.peer_id]
        if self.state is MatchState.LOCKED:
            if all(m in self.readies for m in others):
                self.state = MatchState.FORMED
                self.result = Formed(self.digest, tuple(self.candidates[m] for m in self.proposal))
                return [self.result]
            if now < self._locked_at + self.hello_timeout:
                return []
            for m in others:
                if m not in self.readies:
                    self.exclude(m, now)
            self.state = MatchState.PROPOSED
            self.readies.clear()
        if self.state is MatchState.PROPOSED:
            waited = now >= self._proposed_at + self.hello_timeout
            for m in [m for m in others if waited and m not in self.votes]:
                self.exclude(m, now)
        if self.busy and self.view(now) == [self.me.peer_id] and not self._expected_missing(now):
            # every peer we heard of has closed this round without us: waiting for the deadline
            # only delays our next round (a late joiner re-syncs and joins that one)
            self.state = MatchState.NO_GROUP
            self.result = NoGroup(f"the round closed without us ({len(self.busy)} peer(s) formed or gave up)")
            return [*out, self.result]
        group = self.my_group(now)
        settled = now >= self._changed_at + self.settle
        if self.state is MatchState.GATHERING:
            everyone = self._everyone_here(now)
            if group and settled and (len(group) >= self.target or everyone or now >= self._full_by):
                out += self._propose(group, now)
        elif group != self.proposal:
            if group:
                out += self._propose(group, now)
            else:
                self.state = MatchState.GATHERING
                self.proposal, self.digest = (), ""
        if self.state is MatchState.PROPOSED and all(
            self.votes.get(m) == self.digest for m in self.proposal if m != self.me.peer_id
        ):
            self.state = MatchState.LOCKED
            self._locked_at = now
            others = [m for m in self.proposal if m != self.me.peer_id]
            out.append(SendReady(tuple(others), self.digest))
            if all(m in self.readies for m in others):
                self.state = MatchState.FORMED
                self.result = Formed(self.digest, tuple(self.candidates[m] for m in self.proposal))
                out.append(self.result)
        return out

    def _expected_missing(self, now: float) -> bool:
        """An expected peer we have not heard from yet (it may still come)."""
        if self.expected_ids is None:
            return False
        view = set(self.view(now))
        return any(p not in view and p not in self.excluded for p in self.expected_ids)

    def _propose(self, group: tuple[str, ...], now: float) -> list[MatchAction]:
        self.state = MatchState.PROPOSED
        self.seq += 1
        self.readies.clear()
        self.proposal = group
        self.digest = group_digest(self.run, self.round_key, group)
        self._proposed_at = now
        others = tuple(m for m in group if m != self.me.peer_id)
        return [SendHello(others, self.digest, group, self.seq)] if others else []

    def next_deadline(self, now: float) -> float | None:
        """When (after ``now``) :meth:`poll` may next have something to do without a new event."""
        if self.state in (MatchState.FORMED, MatchState.NO_GROUP):
            return None
        times = [self.deadline]
        if self.state is MatchState.GATHERING:
            times += [self._changed_at + self.settle, self._full_by]
        elif self.state is MatchState.PROPOSED:
            times.append(self._proposed_at + self.hello_timeout)
        else:
            times.append(self._locked_at + self.hello_timeout)
        return min([t for t in times if t > now] or [self.deadline])

    def answer_state(self) -> str:
        """What we tell a peer's hello: ``"ok"`` while forming, ``"busy"`` once formed or done."""
        return "busy" if self.state in (MatchState.FORMED, MatchState.NO_GROUP) else "ok"

    def adverts(self, now: float) -> list[bytes]:
        """The signed adverts of our view, to forward in hellos and answers."""
        return [self.candidates[p].advert for p in self.view(now) if self.candidates[p].advert]

    def member(self, peer: str) -> Candidate:
        try:
            return self.candidates[peer]
        except KeyError:
            raise LocalProtocolError(f"{peer} is not a known candidate") from None
