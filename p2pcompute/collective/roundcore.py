"""Sans-IO bookkeeping of one averaging round: who owes what, what arrived, what to do next.

A *round* is one call to average tensors with a formed group. It runs as one or more
*attempts*; each attempt is a full reduce-scatter + all-gather among the attempt's members
(:class:`~p2pcompute.collective.plan.AttemptPlan`), computed from every member's pristine
input. The invariant the whole design serves:

    a peer reports success only when every element of its result is the exact weighted
    average of the contributions of the members it reports, and of nobody else's.

How an attempt ends (:class:`AttemptCore`):

* A reducer that has every contributor's slice of its part sends the average to everyone.
  A peer holding every part is *complete* and tells all members ``ok``.
* Any failure seen locally (a transfer that breaks, no progress within ``sender_timeout``
  for a contribution or ``reducer_timeout`` for an averaged part, a peer leaving) makes the
  attempt *failed*: the peer tells all members ``fail`` (with the peers it suspects, and the
  peers it *blames* for provably bad data), then stops its transfers. A ``fail`` from anyone
  fails the attempt everywhere.
* Each peer then collects statuses from all members it does not already suspect, for at most
  ``status_timeout``. Complete and every status ``ok`` -> :class:`Commit`. Otherwise
  :class:`Retry` among the members that answered, minus those that left or were blamed.
  A suspect that still answers stays: a peer that aborts resets its own streams, and its
  partners must not exclude it for that. Suspicion only stops us *waiting* for a peer.
  The retry starts again from the pristine inputs, so partial sums of a dead sender never
  reach a result.

:class:`RoundCore` chains attempts, enforces ``min_size`` and ``max_attempts`` and produces
the :class:`RoundOutcome`. Time is passed in (``now``), never read, so every path is tested
on plain numbers. Imports only :mod:`p2pcompute.collective.plan` and :mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from p2pcompute.collective.plan import AttemptPlan
from p2pcompute.errors import ConfigError, LocalProtocolError

# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class SendStatus:
    """Tell every other member of the attempt how it went for us."""

    ok: bool
    suspects: frozenset[str] = frozenset()
    blamed: frozenset[str] = frozenset()
    leaving: bool = False


@dataclass(frozen=True)
class AnnounceLeft:
    """We leave the round after our status for this attempt went out: tell every member, for
    the round as a whole (one status per attempt keeps every member's view of it the same)."""


@dataclass(frozen=True)
class SendAveragedPart:
    """Our part holds every contribution: finalize it and send it to every other member."""


@dataclass(frozen=True)
class StopTransfers:
    """The attempt failed: cancel its data transfers (statuses still flow)."""


@dataclass(frozen=True)
class Commit:
    """The attempt succeeded: the result is the exact average over ``participants``."""

    participants: tuple[str, ...]
    weight_total: float


@dataclass(frozen=True)
class Retry:
    """The attempt failed: run another among ``members`` (suspects and silent peers removed)."""

    members: tuple[str, ...]
    removed: frozenset[str]
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """The attempt ended and this peer will not retry (it left or was cancelled)."""

    reason: str


Outcome = Commit | Retry | GiveUp


@dataclass(frozen=True)
class Decided:
    outcome: Outcome


Action = SendStatus | AnnounceLeft | SendAveragedPart | StopTransfers | Decided


class Phase(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"  # we hold the full average; waiting for the others' statuses
    FAILED = "failed"  # we stopped; waiting for the others' statuses
    DECIDED = "decided"


@dataclass(frozen=True)
class Status:
    """A member's report on an attempt: ``ok``, or ``fail`` naming whom it suspects / blames."""

    ok: bool
    suspects: frozenset[str] = frozenset()
    blamed: frozenset[str] = frozenset()
    leaving: bool = False


@dataclass(frozen=True)
class Timeouts:
    """Bounds on waiting, in seconds. All must be positive.

    ``sender_timeout``: no progress on an incoming contribution for this long -> suspect the sender.
    ``reducer_timeout``: no progress on an averaged part (nor on anything else of the attempt)
    for this long -> suspect the reducer. ``status_timeout``: how long a finished peer waits
    for the others' statuses. ``suspect_grace``: once every unsuspected member has answered,
    how much longer to wait for a suspect's status (an aborting peer sends its status just
    before its streams reset; hearing it keeps that peer in the next attempt).
    """

    sender_timeout: float = 5.0
    reducer_timeout: float = 10.0
    status_timeout: float = 15.0
    suspect_grace: float = 0.5

    def __post_init__(self) -> None:
        for name in ("sender_timeout", "reducer_timeout", "status_timeout", "suspect_grace"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")


# ----------------------------------------------------------------------------- one attempt


class AttemptCore:
    """The state of one attempt on one peer (``me``). Feed it events, execute its actions.

    Example::

        core = AttemptCore(plan, me, now=0.0)
        actions = core.start()                    # maybe SendAveragedPart (nothing to wait for)
        actions += core.contribution_done("b", now=0.4)
        actions += core.averaged_part_done("b", now=0.9)   # -> SendStatus(ok=True)
        actions += core.status_received("b", Status(ok=True), now=1.0)   # -> Decided(Commit(...))
    """

    def __init__(self, plan: AttemptPlan, me: str, *, now: float, timeouts: Timeouts | None = None):
        if me not in plan.members:
            raise LocalProtocolError(f"{me} is not a member of the attempt")
        self.plan = plan
        self.me = me
        self.timeouts = timeouts or Timeouts()
        start, end = plan.part_of(me)
        self.is_reducer = end > start
        contributors = plan.contributors
        self.waiting_contributions: dict[str, float] = (
            {c: now for c in contributors if c != me} if self.is_reducer else {}
        )
        self.waiting_parts: dict[str, float] = {r: now for r in plan.reducers if r != me}
        self.phase = Phase.RUNNING
        self.part_finalized = False
        self.suspects: set[str] = set()  # everything we came to suspect
        self.blamed: set[str] = set()  # peers that sent provably bad data
        self.complete = False
        self.statuses: dict[str, Status] = {}
        self.reason = ""
        self.outcome: Outcome | None = None
        self._last_any = now
        self._created_at = now
        self._terminal_at: float | None = None
        self._grace_until: float | None = None
        self._started = False

    # -- helpers
    @property
    def others(self) -> tuple[str, ...]:
        return tuple(m for m in self.plan.members if m != self.me)

    def _member(self, peer: str) -> bool:
        return peer in self.plan.members and peer != self.me

    def start(self) -> list[Action]:
        """Actions to take right away (the reducer of a part nobody else contributes to)."""
        if self._started:
            raise LocalProtocolError("attempt already started")
        self._started = True
        return self._after(self._created_at, self._advance())

    def _advance(self) -> list[Action]:
        out: list[Action] = []
        if self.phase is not Phase.RUNNING:
            return out
        if self.is_reducer and not self.part_finalized and not self.waiting_contributions:
            self.part_finalized = True
            out.append(SendAveragedPart())
        if (self.part_finalized or not self.is_reducer) and not self.waiting_parts:
            self.phase = Phase.COMPLETE
            self.complete = True
            out.append(SendStatus(ok=True))
        return out

    def _fail(self, now: float, reason: str) -> list[Action]:
        if self.phase is not Phase.RUNNING:
            return []
        self.phase = Phase.FAILED
        self.reason = reason
        self._terminal_at = now
        # the status goes first: our partners should hear why before our streams reset
        return [SendStatus(ok=False, suspects=frozenset(self.suspects), blamed=frozenset(self.blamed)),
                StopTransfers()]

    def _after(self, now: float, out: list[Action]) -> list[Action]:
        if self.phase is Phase.COMPLETE and self._terminal_at is None:
            self._terminal_at = now
        if self.phase in (Phase.COMPLETE, Phase.FAILED) and not self._awaited_statuses():
            silent_suspects = [m for m in self.others if m not in self.statuses]
            if not silent_suspects:
                out.append(Decided(self._decide()))
            elif self._grace_until is None:
                self._grace_until = now + self.timeouts.suspect_grace
            elif now >= self._grace_until:
                out.append(Decided(self._decide()))
        return out

    def _known_suspects(self) -> set[str]:
        known = self.suspects | self.blamed
        for peer, st in self.statuses.items():
            known |= st.suspects | st.blamed
            if st.leaving:
                known.add(peer)
        return known

    def _awaited_statuses(self) -> list[str]:
        known = self._known_suspects()
        return [m for m in self.others if m not in self.statuses and m not in known]

    def _decide(self) -> Outcome:
        self.phase = Phase.DECIDED
        if self.outcome is None:
            everyone_ok = all(st.ok and not st.leaving for st in self.statuses.values())
            if self.complete and everyone_ok:
                self.outcome = Commit(self.plan.members, self.plan.weight_total)
            else:
                removed: set[str] = set(self.blamed)
                for peer, st in self.statuses.items():
                    removed |= st.blamed
                    if st.leaving:
                        removed.add(peer)
                removed |= {m for m in self.others if m not in self.statuses}
                reason = self.reason or "a member reported a failure"
                members = tuple(m for m in self.plan.members if m not in removed)
                self.outcome = Retry(members, frozenset(removed), reason)
        return self.outcome

    # -- events
    def progress(self, peer: str, now: float) -> None:
        """Bytes of this attempt arrived from ``peer`` (resets its inactivity timer)."""
        self._last_any = max(self._last_any, now)
        if peer in self.waiting_contributions:
            self.waiting_contributions[peer] = now
        if peer in self.waiting_parts:
            self.waiting_parts[peer] = now

    def contribution_done(self, sender: str, now: float) -> list[Action]:
        """``sender``'s whole slice of our part arrived, authenticated, and is reduced."""
        if self.phase is not Phase.RUNNING or sender not in self.waiting_contributions:
            return []
        del self.waiting_contributions[sender]
        self._last_any = max(self._last_any, now)
        return self._after(now, self._advance())

    def averaged_part_done(self, reducer: str, now: float) -> list[Action]:
        """``reducer``'s whole averaged part arrived, authenticated, into our result."""
        if self.phase is not Phase.RUNNING or reducer not in self.waiting_parts:
            return []
        del self.waiting_parts[reducer]
        self._last_any = max(self._last_any, now)
        return self._after(now, self._advance())

    def peer_failed(self, peer: str, now: float, reason: str, *, blame: bool = False) -> list[Action]:
        """A transfer with ``peer`` broke or timed out: suspect it (``blame``: it sent bad data)."""
        if not self._member(peer) or self.phase is Phase.DECIDED:
            return []
        self.suspects.add(peer)
        if blame:
            self.blamed.add(peer)
        return self._after(now, self._fail(now, f"{peer}: {reason}"))

    def status_received(self, peer: str, status: Status, now: float) -> list[Action]:
        """``peer``'s status for this attempt (only its first one counts)."""
        if not self._member(peer) or peer in self.statuses or self.phase is Phase.DECIDED:
            return []
        # suspects outside the attempt mean nothing here; drop them
        members = self.plan.members
        status = Status(
            status.ok,
            frozenset(s for s in status.suspects if s in members),
            frozenset(s for s in status.blamed if s in members),
            status.leaving,
        )
        self.statuses[peer] = status
        out: list[Action] = []
        if status.leaving:
            out = self._fail(now, f"{peer} left the round")
        elif not status.ok:
            named = ", ".join(sorted(status.suspects)) or "nobody"
            out = self._fail(now, f"{peer} reported a failure (suspects: {named})")
        return self._after(now, out)

    def leave(self, now: float, reason: str = "cancelled") -> list[Action]:
        """We abandon the round (cancellation): tell the others, stop, give up.

        Before our status went out, the status itself says we leave; after, our status stands
        (every member decides this attempt on the same statuses) and a round-level notice makes
        the next attempt fail fast without us.
        """
        if self.phase is Phase.DECIDED:
            return []
        running = self.phase is Phase.RUNNING
        self.phase = Phase.DECIDED
        self.outcome = GiveUp(reason)
        first: Action = SendStatus(ok=False, leaving=True) if running else AnnounceLeft()
        return [first, StopTransfers(), Decided(self.outcome)]

    def peer_left(self, peer: str, now: float) -> list[Action]:
        """``peer`` announced it left the round: it will neither send nor answer any more."""
        if not self._member(peer) or self.phase is Phase.DECIDED:
            return []
        self.suspects.add(peer)
        return self._after(now, self._fail(now, f"{peer} left the round"))

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (``None``: nothing timed)."""
        if self.phase is Phase.RUNNING:
            times = [t + self.timeouts.sender_timeout for t in self.waiting_contributions.values()]
            times += [
                max(t, self._last_any) + self.timeouts.reducer_timeout for t in self.waiting_parts.values()
            ]
            return min(times) if times else None
        if self.phase in (Phase.COMPLETE, Phase.FAILED):
            assert self._terminal_at is not None
            deadline = self._terminal_at + self.timeouts.status_timeout
            if self._grace_until is not None:
                deadline = min(deadline, self._grace_until)
            return deadline
        return None

    def poll(self, now: float) -> list[Action]:
        """Apply every deadline that has passed by ``now``."""
        if self.phase is Phase.RUNNING:
            late = [
                c for c, t in self.waiting_contributions.items() if now >= t + self.timeouts.sender_timeout
            ]
            late += [
                r
                for r, t in self.waiting_parts.items()
                if now >= max(t, self._last_any) + self.timeouts.reducer_timeout
            ]
            if not late:
                return []
            self.suspects.update(late)
            return self._after(now, self._fail(now, f"no progress from {', '.join(sorted(set(late)))}"))
        if self.phase in (Phase.COMPLETE, Phase.FAILED):
            assert self._terminal_at is not None
            if now >= self._terminal_at + self.timeouts.status_timeout:
                return [Decided(self._decide())]
            if self._grace_until is not None and now >= self._grace_until:
                return self._after(now, [])
        return []


# ----------------------------------------------------------------------------- the round


class RoundStatus(enum.Enum):
    AVERAGED = "averaged"
    FAILED = "failed"
    NO_GROUP = "no_group"


@dataclass(frozen=True)
class RoundOutcome:
    """What a round did. ``ok`` only for :attr:`RoundStatus.AVERAGED`.

    On success every element of the result is the exact weighted average of the contributions
    of ``participants`` (whose weights sum to ``weight_total``); ``excluded`` are the group's
    members that were dropped, and ``reason`` says why earlier attempts failed (empty when the
    first one succeeded). On failure the caller's tensors are left as they were. With a robust
    aggregator, ``clipped`` names the senders whose contribution to our part we clipped
    (their running counts: :meth:`p2pcompute.collective.Collective.clip_counts`).
    """

    status: RoundStatus
    participants: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    attempts: int = 0
    weight_total: float = 0.0
    reason: str = ""
    group: tuple[str, ...] = ()
    clipped: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is RoundStatus.AVERAGED


@dataclass
class RoundCore:
    """Chains attempts until one commits, the group shrinks below ``min_size``, or we give up.

    Example::

        rc = RoundCore(me="a", members=("a", "b"), weights=(1, 1), bandwidths=(1, 1), total=10,
                       min_size=2)
        attempt = rc.start_attempt(now=0.0)         # an AttemptCore; drive it, then:
        nxt = rc.finish_attempt(attempt.outcome, now=...)   # next AttemptCore, or None when over
        rc.result                                   # RoundOutcome once over
    """

    me: str
    members: Sequence[str]
    weights: Sequence[float]
    bandwidths: Sequence[float]
    total: int
    min_size: int = 2
    max_attempts: int = 3
    timeouts: Timeouts = field(default_factory=Timeouts)
    attempts: int = 0
    result: RoundOutcome | None = None

    def __post_init__(self) -> None:
        self.members = tuple(self.members)
        if self.me not in self.members:
            raise ConfigError("we must be a member of our own group")
        if len(self.members) != len(self.weights) or len(self.members) != len(self.bandwidths):
            raise ConfigError("members, weights and bandwidths must have the same length")
        if self.min_size < 1 or self.max_attempts < 1:
            raise ConfigError("min_size and max_attempts must be at least 1")
        self._weight = dict(zip(self.members, (float(w) for w in self.weights), strict=True))
        self._bandwidth = dict(zip(self.members, (float(b) for b in self.bandwidths), strict=True))
        self.current: tuple[str, ...] = tuple(self.members)
        self.attempt: AttemptCore | None = None
        # statuses that arrived for an attempt we have not started yet: {attempt: {peer: (digest, status)}}
        self._early: dict[int, dict[str, tuple[str, Status]]] = {}
        self.left: set[str] = set()
        self._failures: list[str] = []  # "attempt k: reason" of each failed attempt

    def _plan_for(self, members: Iterable[str]) -> AttemptPlan:
        ms = tuple(members)
        return AttemptPlan.build(
            ms,
            weights=[self._weight[m] for m in ms],
            bandwidths=[self._bandwidth[m] for m in ms],
            total=self.total,
        )

    def _fail(self, reason: str) -> None:
        self.result = RoundOutcome(
            RoundStatus.FAILED,
            excluded=tuple(m for m in self.members if m not in self.current),
            attempts=self.attempts,
            reason=reason,
            group=tuple(self.members),
        )
        self.attempt = None

    def _viable(self, members: tuple[str, ...]) -> str:
        """Why ``members`` cannot run an attempt ("" when they can)."""
        if self.me not in members:
            return "we were excluded by the other members"
        if len(members) < self.min_size:
            return f"only {len(members)} members left, fewer than min_size={self.min_size}"
        if sum(self._weight[m] for m in members) <= 0:
            return "no member left with a positive weight"
        if sum(self._bandwidth[m] for m in members) <= 0:
            return "no member left that reduces (all bandwidths are 0)"
        return ""

    def start_attempt(self, now: float) -> AttemptCore | None:
        """The first attempt (``None`` and a FAILED result when the group cannot even start)."""
        if self.attempts:
            raise LocalProtocolError("round already started")
        why = self._viable(self.current)
        if why:
            self._fail(why)
            return None
        self.attempts = 1
        self.attempt = AttemptCore(self._plan_for(self.current), self.me, now=now, timeouts=self.timeouts)
        return self.attempt

    def finish_attempt(self, outcome: Outcome, now: float) -> AttemptCore | None:
        """Record how the current attempt ended; returns the next attempt or ``None`` when over."""
        if self.attempt is None or self.result is not None:
            raise LocalProtocolError("no attempt is running")
        plan = self.attempt.plan
        if isinstance(outcome, Commit):
            self.current = outcome.participants
            self.result = RoundOutcome(
                RoundStatus.AVERAGED,
                participants=outcome.participants,
                excluded=tuple(m for m in self.members if m not in outcome.participants),
                attempts=self.attempts,
                weight_total=outcome.weight_total,
                # why earlier attempts failed, if any: a success after a retry still says what happened
                reason="; ".join(self._failures),
                group=tuple(self.members),
            )
            self.attempt = None
            return None
        if isinstance(outcome, GiveUp):
            self._fail(outcome.reason)
            return None
        self._failures.append(f"attempt {self.attempts}: {outcome.reason}")
        self.current = tuple(m for m in outcome.members if m in plan.members)
        why = self._viable(self.current)
        if not why and self.attempts >= self.max_attempts:
            why = f"gave up after {self.attempts} attempts"
        if why:
            self._fail(f"{outcome.reason}; {why}")
            return None
        self.attempts += 1
        self.attempt = AttemptCore(self._plan_for(self.current), self.me, now=now, timeouts=self.timeouts)
        return self.attempt

    def kickoff(self, now: float) -> list[Action]:
        """Start the current attempt: its first actions, then any statuses that arrived early."""
        if self.attempt is None:
            raise LocalProtocolError("no attempt is running")
        out = self.attempt.start()
        digest = self.attempt.plan.digest()
        for peer, (dig, status) in self._early.pop(self.attempts, {}).items():
            if dig == digest:
                out += self.attempt.status_received(peer, status, now)
        for peer in sorted(self.left):
            out += self.attempt.peer_left(peer, now)
        return out

    def on_left(self, peer: str, now: float) -> list[Action]:
        """``peer`` left the round (a round-level notice): no attempt will wait for it again."""
        if self.result is not None or peer not in self.members or peer == self.me:
            return []
        self.left.add(peer)
        return self.attempt.peer_left(peer, now) if self.attempt is not None else []

    def leave(self, now: float, reason: str = "cancelled") -> list[Action]:
        """We abandon the round; execute the actions, then :meth:`finish_attempt` the GiveUp."""
        if self.attempt is None:
            return []
        return self.attempt.leave(now, reason)

    def on_status(self, attempt_no: int, digest: str, peer: str, status: Status, now: float) -> list[Action]:
        """A status from ``peer`` for attempt ``attempt_no`` (1-based) of this round.

        Statuses for the running attempt go to it when their plan digest matches (a member
        whose view of the membership differs is simply not heard, and so left out next time);
        statuses for a later attempt wait (one per peer and attempt, at most ``max_attempts``);
        older ones are dropped.
        """
        if self.result is not None or peer not in self.members:
            return []
        if self.attempt is not None and attempt_no == self.attempts:
            if digest == self.attempt.plan.digest():
                return self.attempt.status_received(peer, status, now)
            return []
        if self.attempts < attempt_no <= self.max_attempts:
            self._early.setdefault(attempt_no, {}).setdefault(peer, (digest, status))
        return []
