"""The requester's sans-IO negotiation core: one job of ``spec.items`` task runs.

No I/O, no clock: the driver (:mod:`p2pcompute.tasks.requester`) feeds it verified
messages and the time and carries out the returned actions. A lease's life is the
table :data:`REQUESTER_LEASE`::

    ACCEPTING --grant--> ACTIVE --result--> DONE
        | reject -> REJECTED (the item is pending again, no attempt counted)
        | error -> FAILED, lost / timeout -> LOST (an attempt counted), cancel -> CANCELLED

an event that the table does not list for the lease's state is ignored.

Imports :mod:`p2pcompute.tasks.actions`, :mod:`p2pcompute.tasks.messages`, errors.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from p2pcompute.errors import ConfigError, LocalProtocolError
from p2pcompute.tasks.actions import (
    Action,
    Bounded,
    CloseLease,
    IdFactory,
    ItemDone,
    ItemFailed,
    Outcome,
    Publish,
    SendAccept,
    SendCancel,
    SendHeartbeat,
    SendInputs,
    random_id,
)
from p2pcompute.tasks.messages import Offer, Resources, TaskRequest


@dataclass(frozen=True)
class JobSpec:
    """One job: ``items`` runs of ``kind``, at most ``parallel`` at once.

    Times are seconds. ``retries`` bounds the failed attempts per item after the first;
    ``deadline`` bounds the whole job from :meth:`RequesterCore.start`; ``result_timeout``
    (``None``: only the job's deadline) bounds each lease from its grant to its result, so
    a provider that heartbeats but never answers is set aside and the item retried.
    ``providers`` (``None``: anyone) keeps only offers from these peers: a training session
    pins its segments to the worker that already holds its state.
    """

    kind: str
    items: int = 1
    needs: Resources = Resources(cpus=0.0)  # noqa: RUF009 (frozen, immutable)
    max_price: float = 1e18
    parallel: int = 16
    retries: int = 3
    deadline: float = 300.0
    offer_window: float = 0.3
    enough_offers: int | None = None
    accept_timeout: float = 5.0
    lease_ttl: float = 10.0
    rerequest_interval: float = 0.5
    rerequest_max_interval: float = 8.0
    input_bytes: int = 0
    exclude_for: float = 30.0
    result_timeout: float | None = None
    providers: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.items < 1 or self.parallel < 1 or self.retries < 0:
            raise ConfigError("items and parallel must be >= 1, retries >= 0")
        if self.result_timeout is not None and not self.result_timeout > 0:
            raise ConfigError("result_timeout must be positive (or None)")


class ItemStatus(enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class LeaseState(enum.Enum):
    """Where a live lease is: accepted and waiting for the grant, or granted."""

    ACCEPTING = "accepting"
    ACTIVE = "active"


class LeaseEvent(enum.Enum):
    """What can happen to a requester's lease."""

    GRANT = "grant"
    REJECT = "reject"
    HEARTBEAT = "heartbeat"
    RESULT = "result"
    ERROR = "error"  # the provider's error, or a result the driver refused
    LOST = "lost"  # transport lost, or timed out (no grant / no heartbeat)
    CANCEL = "cancel"  # the job gave up (deadline, caller)


_A, _G = LeaseState.ACCEPTING, LeaseState.ACTIVE

#: The requester's lease life as data: (state, event) -> the next state, or the outcome that
#: ends the lease. An event not listed for the lease's state is ignored (a duplicate, a late
#: or out-of-order message). A result implies the grant, so it is accepted in both states.
REQUESTER_LEASE: dict[tuple[LeaseState, LeaseEvent], LeaseState | Outcome] = {
    (_A, LeaseEvent.GRANT): _G,
    (_A, LeaseEvent.REJECT): Outcome.REJECTED,
    (_G, LeaseEvent.HEARTBEAT): _G,
    **{(state, LeaseEvent.RESULT): Outcome.DONE for state in (_A, _G)},
    **{(state, LeaseEvent.ERROR): Outcome.FAILED for state in (_A, _G)},
    **{(state, LeaseEvent.LOST): Outcome.LOST for state in (_A, _G)},
    **{(state, LeaseEvent.CANCEL): Outcome.CANCELLED for state in (_A, _G)},
}


@dataclass
class _Item:
    index: int
    status: ItemStatus = ItemStatus.PENDING
    attempts: int = 0
    lease_id: bytes | None = None
    last_error: str = ""


@dataclass
class _ROffer:
    offer: Offer
    expires: float
    in_use: int = 0
    exhausted: bool = False


@dataclass
class _RLease:
    lease_id: bytes
    item: int
    offer_id: bytes
    provider: str
    state: LeaseState
    expires: float
    heartbeat: float
    next_heartbeat: float
    seq: int = 0
    result_due: float = math.inf  # from the grant, when the job has a result_timeout


@dataclass
class _Round:
    request_id: bytes
    started: float


class RequesterCore:
    """A requester's negotiation state for one job (``spec.items`` task runs).

    Example::

        core = RequesterCore(me, JobSpec("matmul", items=10, parallel=4))
        actions = core.start(now)          # [Publish(request)]
        actions += core.handle_offer(offer, now)
        actions += core.tick(now)          # accepts, heartbeats, timeouts, renegotiation
    """

    def __init__(self, peer_id: str, spec: JobSpec, *, new_id: IdFactory = random_id) -> None:
        self.peer_id = peer_id
        self.spec = spec
        self._new_id = new_id
        self.items = [_Item(i) for i in range(spec.items)]
        self._offers: dict[bytes, _ROffer] = {}
        self._leases: dict[bytes, _RLease] = {}
        self._ended = Bounded(max(4096, 4 * spec.items))
        self._excluded: dict[str, float] = {}  # provider -> excluded until (a transient fault is forgiven)
        self._rounds: dict[bytes, _Round] = {}
        self._window_end: float | None = None
        self._first_round_done = False
        self._next_round_at = 0.0
        self._round_interval = spec.rerequest_interval
        self._deadline = 0.0
        self._started = False
        self._finished = False
        self.stats: dict[str, int] = {
            "rounds": 0,
            "offers": 0,
            "accepts": 0,
            "grants": 0,
            "rejects": 0,
            "timeouts": 0,
            "errors": 0,
            "done": 0,
            "failed": 0,
            "ignored": 0,
            "session_offers": 0,
        }

    # -- queries

    @property
    def done(self) -> bool:
        """True once every item is DONE or FAILED (and no lease is left)."""
        return self._finished

    @property
    def active_leases(self) -> frozenset[bytes]:
        return frozenset(self._leases)

    def lease_provider(self, lease_id: bytes) -> str | None:
        lease = self._leases.get(lease_id)
        return lease.provider if lease else None

    def lease_offer(self, lease_id: bytes) -> Offer | None:
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        record = self._offers.get(lease.offer_id)
        return record.offer if record else None

    def lease_item(self, lease_id: bytes) -> int | None:
        lease = self._leases.get(lease_id)
        return lease.item if lease else None

    def next_deadline(self) -> float | None:
        if self._finished:
            return None
        times = [self._deadline]
        for lease in self._leases.values():
            times.append(min(lease.expires, lease.result_due))
            if lease.state is LeaseState.ACTIVE:
                times.append(lease.next_heartbeat)
        if self._window_end is not None:
            times.append(self._window_end)
        if self._pending() and not self._usable_offers(float("-inf")):
            times.append(self._next_round_at)
        return min(times)

    def statistics(self) -> dict[str, int]:
        return {**self.stats, "leases": len(self._leases), "excluded": len(self._excluded)}

    # -- events

    def start(self, now: float, sessions: Sequence[tuple[Offer, float]] = ()) -> list[Action]:
        """Begin the job: lease on open ``sessions`` at once, publish a request if they are not enough.

        ``sessions`` are offers of earlier jobs that their providers keep open as sessions
        (docs/design/sessions.md), each with the time (this core's clock) until which it may
        be accepted. Those that pass the job's filters (kind, price, providers, needs,
        heartbeat) are used with no request round and no offer window. When their free slots
        cover ``min(parallel, items)``, nothing is published; otherwise a request goes out too
        and its offers are used as they arrive. Should the sessions fail, the job falls back
        to request rounds by itself.

        Example::

            actions = core.start(now, sessions=[(offer, now + 20.0)])   # SendAccept, no Publish
        """
        if self._started:
            raise LocalProtocolError("job already started")
        self._started = True
        self._deadline = now + self.spec.deadline
        out: list[Action] = []
        for offer, until in sessions:
            if until > now and offer.offer_id not in self._offers and self._acceptable(offer, now):
                self._offers[offer.offer_id] = _ROffer(offer, until)
                self.stats["session_offers"] += 1
        if self._offers:
            self._first_round_done = True  # known terms: no window to wait for
            self._next_round_at = now  # a round as soon as the sessions run out
            room = sum(r.offer.slots for r in self._usable_offers(now))
            if room < min(self.spec.parallel, self.spec.items):
                self._new_round(now, out)
            self._assign(now, out)
        else:
            self._new_round(now, out)
        return out

    def _acceptable(self, offer: Offer, now: float) -> bool:
        """Whether ``offer`` fits this job: kind, price, pinned providers, exclusions, needs, timing."""
        return (
            offer.requester == self.peer_id
            and offer.kind == self.spec.kind
            and offer.price <= self.spec.max_price
            and (self.spec.providers is None or offer.provider in self.spec.providers)
            and not self._is_excluded(offer.provider, now)
            and self.spec.needs.fits_in(offer.resources)
            and offer.heartbeat * 2 <= self.spec.lease_ttl
        )

    def handle_offer(self, offer: Offer, now: float) -> list[Action]:
        """A verified offer (signed by ``offer.provider``, addressed to us) arrived."""
        if (
            self._finished
            or offer.request_id not in self._rounds
            or offer.offer_id in self._offers
            or not self._acceptable(offer, now)
        ):
            self.stats["ignored"] += 1
            return []
        self._offers[offer.offer_id] = _ROffer(offer, now + offer.valid_for)
        self.stats["offers"] += 1
        self._round_interval = self.spec.rerequest_interval  # offers are flowing: no backoff
        out: list[Action] = []
        window_open = self._window_end is not None and now < self._window_end
        enough = self.spec.enough_offers or min(self.spec.parallel, self.spec.items)
        if window_open and not self._first_round_done and len(self._usable_offers(now)) >= enough:
            self._close_window()
        if self._window_end is None or self._first_round_done:
            self._assign(now, out)
        return out

    def handle_grant(self, sender: str, lease_id: bytes, now: float) -> list[Action]:
        """The provider granted ``lease_id``: send the item's inputs."""
        if self._ended.get(lease_id) in (Outcome.LOST, Outcome.CANCELLED):
            # we gave up on it already: tell the provider so it frees the slot now
            return [SendCancel(sender, lease_id, "lease abandoned by the requester")]
        step = self._step(sender, lease_id, LeaseEvent.GRANT)
        if step is None:
            return []
        lease, state = step
        assert isinstance(state, LeaseState)
        lease.state = state
        lease.expires = now + self.spec.lease_ttl
        lease.next_heartbeat = now + lease.heartbeat
        if self.spec.result_timeout is not None:
            lease.result_due = now + self.spec.result_timeout
        self.stats["grants"] += 1
        return [SendInputs(sender, lease_id, lease.item)]

    def handle_reject(self, sender: str, lease_id: bytes, reason: str, now: float) -> list[Action]:
        """The provider refused the accept (full, offer gone): try another offer, no attempt counted."""
        step = self._step(sender, lease_id, LeaseEvent.REJECT)
        if step is None:
            return []
        lease, outcome = step
        self.stats["rejects"] += 1
        record = self._offers.get(lease.offer_id)
        if record is not None:
            record.exhausted = True  # try another offer; a reject costs the item no attempt
        out: list[Action] = [CloseLease(lease_id, f"rejected: {reason}")]
        self._drop_lease(lease, outcome)
        item = self.items[lease.item]
        item.status, item.lease_id, item.last_error = ItemStatus.PENDING, None, f"rejected: {reason}"
        self._assign(now, out)
        self._check_finished(out)
        return out

    def handle_heartbeat(self, sender: str, lease_id: bytes, now: float) -> list[Action]:
        """The provider is alive (a heartbeat, or any traffic of the lease)."""
        step = self._step(sender, lease_id, LeaseEvent.HEARTBEAT)
        if step is None:
            return []
        lease = step[0]
        lease.expires = max(lease.expires, now + self.spec.lease_ttl)
        return []

    def handle_result(self, sender: str, lease_id: bytes, now: float) -> list[Action]:
        """The result of ``lease_id`` arrived *and was verified* by the driver."""
        step = self._step(sender, lease_id, LeaseEvent.RESULT)
        if step is None:
            return []
        lease, outcome = step
        item = self.items[lease.item]
        self._drop_lease(lease, outcome)
        item.status, item.lease_id = ItemStatus.DONE, None
        self.stats["done"] += 1
        out: list[Action] = [ItemDone(item.index, lease_id, sender)]
        self._assign(now, out)
        self._check_finished(out)
        return out

    def handle_error(
        self, sender: str, lease_id: bytes, reason: str, retryable: bool, now: float
    ) -> list[Action]:
        """The provider reported a failed run (or the driver found its result invalid)."""
        step = self._step(sender, lease_id, LeaseEvent.ERROR)
        if step is None:
            return []
        lease, outcome = step
        self.stats["errors"] += 1
        out: list[Action] = [CloseLease(lease_id, reason)]
        self._drop_lease(lease, outcome)
        item = self.items[lease.item]
        if retryable:
            self._exclude(sender, now)
            self._fail_attempt(item, reason, out)
        else:
            self._fail_item(item, reason, out)
        self._assign(now, out)
        self._check_finished(out)
        return out

    def lease_lost(self, lease_id: bytes, reason: str, now: float) -> list[Action]:
        """The driver lost the lease's transport (stream reset, provider gone)."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return []
        return self._lose(lease, reason, now)

    def cancel(self, now: float, reason: str = "cancelled by the caller") -> list[Action]:
        """Give up the whole job: cancel every lease, fail every unfinished item."""
        out: list[Action] = []
        for lease in list(self._leases.values()):
            out.append(SendCancel(lease.provider, lease.lease_id, reason))
            out.append(CloseLease(lease.lease_id, reason))
            self._end(lease, LeaseEvent.CANCEL)
        for item in self.items:
            if item.status in (ItemStatus.PENDING, ItemStatus.LEASED):
                self._fail_item(item, reason, out)
        self._check_finished(out)
        return out

    def tick(self, now: float) -> list[Action]:
        """Time passed: deadline, lease timeouts, heartbeats, offer window, renegotiation."""
        if self._finished or not self._started:
            return []
        if now >= self._deadline:
            return self.cancel(now, f"deadline of {self.spec.deadline:g} s passed")
        out: list[Action] = []
        for lease in list(self._leases.values()):
            if now >= min(lease.expires, lease.result_due):
                self.stats["timeouts"] += 1
                if now >= lease.result_due:
                    what = f"no result within {self.spec.result_timeout:g} s"
                else:
                    what = "no grant" if lease.state is LeaseState.ACCEPTING else "no heartbeat"
                out += self._lose(lease, f"provider timed out ({what})", now)
            elif lease.state is LeaseState.ACTIVE and now >= lease.next_heartbeat:
                lease.seq += 1
                lease.next_heartbeat = now + lease.heartbeat
                out.append(SendHeartbeat(lease.provider, lease.lease_id, lease.seq))
        if self._window_end is not None and now >= self._window_end:
            self._close_window()
        if self._window_end is None or self._first_round_done:
            self._assign(now, out)
        if (
            self._pending()
            and self._window_end is None
            and not self._usable_offers(now)
            and now >= self._next_round_at
        ):
            self._new_round(now, out)
        self._check_finished(out)
        return out

    # -- internals

    def _pending(self) -> list[_Item]:
        return [i for i in self.items if i.status is ItemStatus.PENDING]

    def _usable_offers(self, now: float) -> list[_ROffer]:
        return [
            r
            for r in self._offers.values()
            if not r.exhausted
            and r.expires > now
            and r.in_use < r.offer.slots
            and not self._is_excluded(r.offer.provider, now)
        ]

    def _exclude(self, provider: str, now: float) -> None:
        self._excluded[provider] = now + self.spec.exclude_for

    def _is_excluded(self, provider: str, now: float) -> bool:
        return self._excluded.get(provider, -math.inf) > now

    def _close_window(self) -> None:
        self._window_end = None
        self._first_round_done = True

    def _new_round(self, now: float, out: list[Action]) -> None:
        request_id = self._new_id()
        self._rounds[request_id] = _Round(request_id, now)
        pending = max(1, len(self._pending()))
        spec = self.spec
        request = TaskRequest(
            request_id=request_id,
            requester=self.peer_id,
            kind=spec.kind,
            needs=spec.needs,
            max_price=spec.max_price,
            count=min(pending, spec.parallel, 1024),
            deadline_in=max(0.0, self._deadline - now),
            input_bytes=spec.input_bytes,
            issued=0.0,
        )
        self.stats["rounds"] += 1
        if not self._first_round_done:
            self._window_end = now + spec.offer_window
        self._next_round_at = now + self._round_interval
        self._round_interval = min(self._round_interval * 2, spec.rerequest_max_interval)
        out.append(Publish(request))

    def _assign(self, now: float, out: list[Action]) -> None:
        for item in self._pending():
            if len(self._leases) >= self.spec.parallel:
                return
            usable = self._usable_offers(now)
            if not usable:
                return
            best = min(
                usable,
                key=lambda r: (
                    r.offer.price,
                    r.offer.expected_start,
                    r.in_use,
                    -r.offer.free,
                    r.offer.provider,
                    r.offer.offer_id,
                ),
            )
            lease_id = self._new_id()
            while lease_id in self._leases or lease_id in self._ended:
                lease_id = self._new_id()
            best.in_use += 1
            lease = _RLease(
                lease_id,
                item.index,
                best.offer.offer_id,
                best.offer.provider,
                LeaseState.ACCEPTING,
                now + self.spec.accept_timeout,
                best.offer.heartbeat,
                now + best.offer.heartbeat,
            )
            self._leases[lease_id] = lease
            item.status, item.lease_id = ItemStatus.LEASED, lease_id
            self.stats["accepts"] += 1
            out.append(SendAccept(best.offer.provider, lease_id, best.offer, item.index))

    def _lose(self, lease: _RLease, reason: str, now: float) -> list[Action]:
        out: list[Action] = [
            SendCancel(lease.provider, lease.lease_id, reason),
            CloseLease(lease.lease_id, reason),
        ]
        self._exclude(lease.provider, now)
        self._end(lease, LeaseEvent.LOST)
        self._fail_attempt(self.items[lease.item], reason, out)
        self._assign(now, out)
        self._check_finished(out)
        return out

    def _step(
        self, sender: str, lease_id: bytes, event: LeaseEvent
    ) -> tuple[_RLease, LeaseState | Outcome] | None:
        """``sender``'s live lease and where ``event`` takes it; None (counted as ignored) when
        the lease is unknown, another peer's, or the table has no such transition."""
        lease = self._leases.get(lease_id)
        target = None if lease is None else REQUESTER_LEASE.get((lease.state, event))
        if lease is None or lease.provider != sender or target is None:
            self.stats["ignored"] += 1
            return None
        return lease, target

    def _end(self, lease: _RLease, event: LeaseEvent) -> None:
        """End ``lease`` by ``event`` (one the table lists as ending it in any state)."""
        outcome = REQUESTER_LEASE[(lease.state, event)]
        assert isinstance(outcome, Outcome)
        self._drop_lease(lease, outcome)

    def _drop_lease(self, lease: _RLease, outcome: Outcome | LeaseState) -> None:
        assert isinstance(outcome, Outcome)
        del self._leases[lease.lease_id]
        self._ended.put(lease.lease_id, outcome)
        record = self._offers.get(lease.offer_id)
        if record is not None:
            record.in_use -= 1

    def _fail_attempt(self, item: _Item, reason: str, out: list[Action]) -> None:
        item.attempts += 1
        item.last_error = reason
        if item.attempts > self.spec.retries:
            self._fail_item(item, f"gave up after {item.attempts} attempts; last: {reason}", out)
        else:
            item.status, item.lease_id = ItemStatus.PENDING, None

    def _fail_item(self, item: _Item, reason: str, out: list[Action]) -> None:
        item.status, item.lease_id, item.last_error = ItemStatus.FAILED, None, reason
        self.stats["failed"] += 1
        out.append(ItemFailed(item.index, reason))

    def _check_finished(self, out: list[Action]) -> None:
        if self._finished:
            return
        if all(i.status in (ItemStatus.DONE, ItemStatus.FAILED) for i in self.items) and not self._leases:
            self._finished = True


def with_issued(request: TaskRequest, wall: float) -> TaskRequest:
    """``request`` stamped with the wall-clock time it is published."""
    return replace(request, issued=wall)


__all__ = [
    "REQUESTER_LEASE",
    "ItemStatus",
    "JobSpec",
    "LeaseEvent",
    "LeaseState",
    "RequesterCore",
    "with_issued",
]
