"""Sans-IO negotiation cores: :class:`ProviderCore` and :class:`RequesterCore`.

Neither core does I/O or reads a clock: the driver feeds them validated messages
and the current time (``now``, seconds on any monotonic clock) and performs the
actions they return (send this, start that run, deliver this item). Everything
here is deterministic, so it is tested with hypothesis on a simulated network
with drops, duplicates, reordering and clock jumps.

Lease life (both sides)::

    requester: PENDING item --accept--> ACCEPTING --grant--> ACTIVE --result--> DONE
                                           |  reject / timeout     | error / expiry / peer gone
                                           +--> item PENDING again (attempt counted) or FAILED
    provider:  offer --accept--> ACTIVE --run ok--> DONE | run failed --> FAILED
                                   | cancel / expiry (no requester heartbeat for lease_ttl)
                                   +--> CANCELLED / EXPIRED (the run is aborted; its slot is
                                        freed only when the run has really stopped)

Invariants (checked by tests/test_negotiation_stateful.py):

* a provider never has more runs in progress than ``capacity``;
* a lease id is granted and run at most once; an item is delivered at most once;
* every lease ends: by result, error, cancel or expiry; a job ends by its deadline.

Accept policy (requester), documented in docs/tasks.md: offers for the job's
request rounds are filtered (kind, price <= max_price, resources >= needs,
provider not excluded, offer still valid, heartbeat compatible) and ranked by
``(price, expected_start, our leases already on that offer, -free slots, provider id)``.
Round 1 collects offers for ``offer_window`` seconds (or until ``enough_offers``
arrived); later rounds (renegotiation) assign as soon as any usable offer arrives.

Imports :mod:`p2pcompute.tasks.messages` only.
"""

from __future__ import annotations

import enum
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from p2pcompute.errors import ConfigError, LocalProtocolError
from p2pcompute.tasks.messages import Offer, Resources, TaskRequest

IdFactory = Callable[[], bytes]


def _random_id() -> bytes:
    return os.urandom(16)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Publish:
    """Publish ``request`` on the task topic (the driver stamps ``issued`` and signs it)."""

    request: TaskRequest


@dataclass(frozen=True)
class SendOffer:
    to: str
    offer: Offer


@dataclass(frozen=True)
class SendAccept:
    to: str
    lease_id: bytes
    offer: Offer
    item: int


@dataclass(frozen=True)
class SendGrant:
    to: str
    lease_id: bytes
    lease_ttl: float
    heartbeat: float


@dataclass(frozen=True)
class SendReject:
    to: str
    lease_id: bytes
    reason: str
    retryable: bool


@dataclass(frozen=True)
class SendHeartbeat:
    to: str
    lease_id: bytes
    seq: int


@dataclass(frozen=True)
class SendCancel:
    to: str
    lease_id: bytes
    reason: str


@dataclass(frozen=True)
class SendInputs:
    """Requester: the lease was granted; send the item's params and input tensors."""

    to: str
    lease_id: bytes
    item: int


@dataclass(frozen=True)
class StartRun:
    """Provider: receive the inputs of ``lease_id`` and run ``kind``."""

    lease_id: bytes
    requester: str
    kind: str
    offer_id: bytes
    price: float


@dataclass(frozen=True)
class AbortRun:
    """Provider: stop the run of ``lease_id`` (cancelled or expired); report :meth:`run_stopped`."""

    lease_id: bytes
    reason: str


@dataclass(frozen=True)
class SendResult:
    """Provider: the run succeeded while the lease was alive; send result and outputs."""

    to: str
    lease_id: bytes


@dataclass(frozen=True)
class SendError:
    to: str
    lease_id: bytes
    reason: str
    retryable: bool


@dataclass(frozen=True)
class ItemDone:
    """Requester: ``item`` finished on ``provider`` under ``lease_id`` (delivered once)."""

    item: int
    lease_id: bytes
    provider: str


@dataclass(frozen=True)
class ItemFailed:
    item: int
    reason: str


@dataclass(frozen=True)
class CloseLease:
    """Requester: forget the transport of ``lease_id`` (it ended without a result)."""

    lease_id: bytes
    reason: str


Action = (
    Publish
    | SendOffer
    | SendAccept
    | SendGrant
    | SendReject
    | SendHeartbeat
    | SendCancel
    | SendInputs
    | StartRun
    | AbortRun
    | SendResult
    | SendError
    | ItemDone
    | ItemFailed
    | CloseLease
)


class Outcome(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"
    LOST = "lost"


class _Bounded(OrderedDict[bytes, Outcome]):
    """An insertion-ordered map that forgets its oldest entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: bytes, value: Outcome) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


# --------------------------------------------------------------------------- provider


@dataclass(frozen=True)
class KindTerms:
    """What a provider asks for one kind: the resources a run needs and its price."""

    needs: Resources = Resources()  # noqa: RUF009 (frozen, immutable)
    price: float = 0.0


@dataclass(frozen=True)
class ProviderConfig:
    """Provider policy. ``capacity`` is how many runs may be in progress at once."""

    capacity: int = 1
    resources: Resources = Resources(cpus=1.0)  # noqa: RUF009 (frozen, immutable)
    heartbeat: float = 1.0
    lease_ttl: float = 5.0
    offer_valid_for: float = 10.0
    max_offers: int = 4096
    memory: int = 4096  # remembered request ids / ended leases (duplicates and late messages)
    max_input_bytes: int = 1 << 30


@dataclass
class _PLease:
    lease_id: bytes
    requester: str
    offer_id: bytes
    kind: str
    price: float
    expires: float
    next_heartbeat: float
    seq: int = 0


@dataclass
class _POffer:
    offer: Offer
    expires: float
    active: int = 0


class ProviderCore:
    """A provider's negotiation state: its offers, leases and run slots.

    Example::

        core = ProviderCore(me, {"matmul": KindTerms()}, ProviderConfig(capacity=2))
        for action in core.handle_request(request, now=trio.current_time()):
            ...   # SendOffer -> sign and stream it to the requester
    """

    def __init__(
        self,
        peer_id: str,
        kinds: Mapping[str, KindTerms],
        config: ProviderConfig = ProviderConfig(),
        *,
        new_id: IdFactory = _random_id,
    ) -> None:
        if config.capacity < 1:
            raise ConfigError("capacity must be at least 1")
        self.peer_id = peer_id
        self.kinds = dict(kinds)
        self.config = config
        self._new_id = new_id
        self._offers: OrderedDict[bytes, _POffer] = OrderedDict()
        self._leases: dict[bytes, _PLease] = {}
        self._running: set[bytes] = set()  # runs started and not yet stopped (holds the slots)
        self._ended = _Bounded(config.memory)
        self._seen_requests = _Bounded(config.memory)
        self.stats: dict[str, int] = {
            "offers": 0,
            "granted": 0,
            "rejected": 0,
            "done": 0,
            "failed": 0,
            "cancelled": 0,
            "expired": 0,
            "ignored": 0,
        }

    # -- queries

    @property
    def running(self) -> frozenset[bytes]:
        return frozenset(self._running)

    @property
    def active_leases(self) -> frozenset[bytes]:
        return frozenset(self._leases)

    def free_slots(self) -> int:
        return self.config.capacity - len(self._running)

    def lease_requester(self, lease_id: bytes) -> str | None:
        lease = self._leases.get(lease_id)
        return lease.requester if lease else None

    def outcome(self, lease_id: bytes) -> Outcome | None:
        return self._ended.get(lease_id)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has something to do (None: nothing pending)."""
        times = [min(lease.expires, lease.next_heartbeat) for lease in self._leases.values()]
        if self._offers:
            times.append(next(iter(self._offers.values())).expires)
        return min(times) if times else None

    def statistics(self) -> dict[str, int]:
        return {**self.stats, "running": len(self._running), "leases": len(self._leases)}

    # -- events

    def handle_request(self, request: TaskRequest, now: float) -> list[Action]:
        """A verified request arrived: offer if we serve the kind, fit the needs, price and have room."""
        if request.request_id in self._seen_requests or request.requester == self.peer_id:
            self.stats["ignored"] += 1
            return []
        self._seen_requests.put(request.request_id, Outcome.DONE)
        terms = self.kinds.get(request.kind)
        free = self.free_slots()
        if (
            terms is None
            or free <= 0
            or terms.price > request.max_price
            or not terms.needs.merge(request.needs).fits_in(self.config.resources)
            or request.input_bytes > self.config.max_input_bytes
            or request.deadline_in <= 0
        ):
            return []
        self._expire_offers(now)
        if len(self._offers) >= self.config.max_offers:
            return []
        offer = Offer(
            offer_id=self._new_id(),
            request_id=request.request_id,
            provider=self.peer_id,
            requester=request.requester,
            kind=request.kind,
            price=terms.price,
            expected_start=0.0,
            slots=max(1, min(request.count, free)),
            free=free,
            capacity=self.config.capacity,
            resources=self.config.resources,
            valid_for=self.config.offer_valid_for,
            heartbeat=self.config.heartbeat,
            lease_ttl=self.config.lease_ttl,
        )
        # an offer stays acceptable a little past valid_for: the requester counts from receipt
        keep = self.config.offer_valid_for + self.config.lease_ttl
        self._offers[offer.offer_id] = _POffer(offer, now + keep)
        self.stats["offers"] += 1
        return [SendOffer(request.requester, offer)]

    def handle_accept(self, sender: str, lease_id: bytes, offer_id: bytes, now: float) -> list[Action]:
        """``sender`` accepts our offer as lease ``lease_id``: grant it if we still can."""
        if lease_id in self._leases or lease_id in self._ended:
            self.stats["ignored"] += 1  # duplicate or late: never a second run
            return []
        self._expire_offers(now)
        record = self._offers.get(offer_id)

        def reject(reason: str, retryable: bool) -> list[Action]:
            self._ended.put(lease_id, Outcome.REJECTED)
            self.stats["rejected"] += 1
            return [SendReject(sender, lease_id, reason, retryable)]

        if record is None or record.offer.requester != sender:
            return reject("unknown or expired offer", True)
        if record.active >= record.offer.slots:
            return reject("all slots of this offer are in use", True)
        if self.free_slots() <= 0:
            return reject("provider at capacity", True)
        lease = _PLease(
            lease_id,
            sender,
            offer_id,
            record.offer.kind,
            record.offer.price,
            now + self.config.lease_ttl,
            now + self.config.heartbeat,
        )
        record.active += 1
        self._leases[lease_id] = lease
        self._running.add(lease_id)
        self.stats["granted"] += 1
        return [
            SendGrant(sender, lease_id, self.config.lease_ttl, self.config.heartbeat),
            StartRun(lease_id, sender, lease.kind, offer_id, lease.price),
        ]

    def handle_heartbeat(self, sender: str, lease_id: bytes, now: float) -> list[Action]:
        """The requester is alive (a heartbeat, or any traffic of the lease): extend it."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.requester != sender:
            self.stats["ignored"] += 1
            return []
        lease.expires = max(lease.expires, now + self.config.lease_ttl)
        return []

    def handle_cancel(self, sender: str, lease_id: bytes, reason: str, now: float) -> list[Action]:
        """The requester cancels (or its stream died): end the lease and abort the run."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.requester != sender:
            self.stats["ignored"] += 1
            return []
        self._end(lease, Outcome.CANCELLED)
        return [AbortRun(lease_id, f"cancelled by requester: {reason}")]

    def run_succeeded(self, lease_id: bytes, now: float) -> list[Action]:
        """The run finished with outputs. Sends the result if the lease is still alive."""
        self._running.discard(lease_id)
        lease = self._leases.get(lease_id)
        if lease is None:
            return []  # cancelled or expired meanwhile: the result is dropped
        self._end(lease, Outcome.DONE)
        return [SendResult(lease.requester, lease_id)]

    def run_failed(self, lease_id: bytes, reason: str, retryable: bool, now: float) -> list[Action]:
        """The run raised. Reports the error if the lease is still alive."""
        self._running.discard(lease_id)
        lease = self._leases.get(lease_id)
        if lease is None:
            return []
        self._end(lease, Outcome.FAILED)
        return [SendError(lease.requester, lease_id, reason, retryable)]

    def run_stopped(self, lease_id: bytes) -> None:
        """An aborted run has really stopped: its slot is free again."""
        self._running.discard(lease_id)

    def tick(self, now: float) -> list[Action]:
        """Expire silent leases, send due heartbeats, drop stale offers."""
        out: list[Action] = []
        for lease in list(self._leases.values()):
            if now >= lease.expires:
                self._end(lease, Outcome.EXPIRED)
                out.append(AbortRun(lease.lease_id, "lease expired: no heartbeat from the requester"))
            elif now >= lease.next_heartbeat:
                lease.seq += 1
                lease.next_heartbeat = now + self.config.heartbeat  # no burst after a clock jump
                out.append(SendHeartbeat(lease.requester, lease.lease_id, lease.seq))
        self._expire_offers(now)
        return out

    # -- internals

    def _end(self, lease: _PLease, outcome: Outcome) -> None:
        del self._leases[lease.lease_id]
        self._ended.put(lease.lease_id, outcome)
        record = self._offers.get(lease.offer_id)
        if record is not None:
            record.active -= 1
        self.stats[outcome.value] += 1

    def _expire_offers(self, now: float) -> None:
        for offer_id, record in list(self._offers.items()):
            if record.expires <= now and record.active == 0:
                del self._offers[offer_id]


# --------------------------------------------------------------------------- requester


@dataclass(frozen=True)
class JobSpec:
    """One job: ``items`` runs of ``kind``, at most ``parallel`` at once.

    Times are seconds. ``retries`` bounds the failed attempts per item after the first;
    ``deadline`` bounds the whole job from :meth:`RequesterCore.start`.
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

    def __post_init__(self) -> None:
        if self.items < 1 or self.parallel < 1 or self.retries < 0:
            raise ConfigError("items and parallel must be >= 1, retries >= 0")


class ItemStatus(enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"


class LeaseState(enum.Enum):
    ACCEPTING = "accepting"
    ACTIVE = "active"


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

    def __init__(self, peer_id: str, spec: JobSpec, *, new_id: IdFactory = _random_id) -> None:
        self.peer_id = peer_id
        self.spec = spec
        self._new_id = new_id
        self.items = [_Item(i) for i in range(spec.items)]
        self._offers: dict[bytes, _ROffer] = {}
        self._leases: dict[bytes, _RLease] = {}
        self._ended = _Bounded(max(4096, 4 * spec.items))
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
            times.append(lease.expires)
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

    def start(self, now: float) -> list[Action]:
        """Begin the job: publish the first request."""
        if self._started:
            raise LocalProtocolError("job already started")
        self._started = True
        self._deadline = now + self.spec.deadline
        out: list[Action] = []
        self._new_round(now, out)
        return out

    def handle_offer(self, offer: Offer, now: float) -> list[Action]:
        """A verified offer (signed by ``offer.provider``, addressed to us) arrived."""
        if (
            self._finished
            or offer.request_id not in self._rounds
            or offer.offer_id in self._offers
            or offer.requester != self.peer_id
            or offer.kind != self.spec.kind
            or offer.price > self.spec.max_price
            or self._is_excluded(offer.provider, now)
            or not self.spec.needs.fits_in(offer.resources)
            or offer.heartbeat * 2 > self.spec.lease_ttl
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
        lease = self._leases.get(lease_id)
        if lease is None or lease.provider != sender:
            if self._ended.get(lease_id) in (Outcome.LOST, Outcome.CANCELLED):
                # we gave up on it already: tell the provider so it frees the slot now
                return [SendCancel(sender, lease_id, "lease abandoned by the requester")]
            self.stats["ignored"] += 1
            return []
        if lease.state is not LeaseState.ACCEPTING:
            self.stats["ignored"] += 1
            return []
        lease.state = LeaseState.ACTIVE
        lease.expires = now + self.spec.lease_ttl
        lease.next_heartbeat = now + lease.heartbeat
        self.stats["grants"] += 1
        return [SendInputs(sender, lease_id, lease.item)]

    def handle_reject(self, sender: str, lease_id: bytes, reason: str, now: float) -> list[Action]:
        lease = self._leases.get(lease_id)
        if lease is None or lease.provider != sender or lease.state is not LeaseState.ACCEPTING:
            self.stats["ignored"] += 1
            return []
        self.stats["rejects"] += 1
        record = self._offers.get(lease.offer_id)
        if record is not None:
            record.exhausted = True  # try another offer; a reject costs the item no attempt
        out: list[Action] = [CloseLease(lease_id, f"rejected: {reason}")]
        self._drop_lease(lease, Outcome.REJECTED)
        item = self.items[lease.item]
        item.status, item.lease_id, item.last_error = ItemStatus.PENDING, None, f"rejected: {reason}"
        self._assign(now, out)
        self._check_finished(out)
        return out

    def handle_heartbeat(self, sender: str, lease_id: bytes, now: float) -> list[Action]:
        """The provider is alive (a heartbeat, or any traffic of the lease)."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.provider != sender or lease.state is not LeaseState.ACTIVE:
            self.stats["ignored"] += 1
            return []
        lease.expires = max(lease.expires, now + self.spec.lease_ttl)
        return []

    def handle_result(self, sender: str, lease_id: bytes, now: float) -> list[Action]:
        """The result of ``lease_id`` arrived *and was verified* by the driver."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.provider != sender:  # (a result implies the grant: no state check)
            self.stats["ignored"] += 1
            return []
        item = self.items[lease.item]
        self._drop_lease(lease, Outcome.DONE)
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
        lease = self._leases.get(lease_id)
        if lease is None or lease.provider != sender:
            self.stats["ignored"] += 1
            return []
        self.stats["errors"] += 1
        out: list[Action] = [CloseLease(lease_id, reason)]
        self._drop_lease(lease, Outcome.FAILED)
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
            self._drop_lease(lease, Outcome.CANCELLED)
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
            if now >= lease.expires:
                self.stats["timeouts"] += 1
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
        self._drop_lease(lease, Outcome.LOST)
        self._fail_attempt(self.items[lease.item], reason, out)
        self._assign(now, out)
        self._check_finished(out)
        return out

    def _drop_lease(self, lease: _RLease, outcome: Outcome) -> None:
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
    "AbortRun",
    "Action",
    "CloseLease",
    "ItemDone",
    "ItemFailed",
    "ItemStatus",
    "JobSpec",
    "KindTerms",
    "LeaseState",
    "Outcome",
    "ProviderConfig",
    "ProviderCore",
    "Publish",
    "RequesterCore",
    "SendAccept",
    "SendCancel",
    "SendError",
    "SendGrant",
    "SendHeartbeat",
    "SendInputs",
    "SendOffer",
    "SendReject",
    "SendResult",
    "StartRun",
    "with_issued",
]
