"""The provider's sans-IO negotiation core: offers, leases and run slots.

No I/O, no clock: the driver (:mod:`p2pcompute.tasks.provider`) feeds it verified
messages and the time and carries out the returned actions. A lease's life is the
table :data:`PROVIDER_LEASE`: it starts ACTIVE at the grant and ends by the first of
run ok (DONE), run failed (FAILED), cancel (CANCELLED) or expiry (EXPIRED: no heartbeat
for ``lease_ttl``, or its inputs not all in by the input deadline); any other event for it
is ignored. Its run slot is freed when the run has really stopped, or, for a worker thread
still finishing a chunk, as soon as the lease ended while such lingering runs stay within
their budget (:meth:`ProviderCore.run_abandoned`). One requester holds at most
``config.per_requester`` live leases.

Imports :mod:`p2pcompute.tasks.actions`, :mod:`p2pcompute.tasks.messages`, errors.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from p2pcompute.errors import ConfigError
from p2pcompute.tasks.actions import (
    AbortRun,
    Action,
    Bounded,
    IdFactory,
    Outcome,
    SendError,
    SendGrant,
    SendHeartbeat,
    SendOffer,
    SendReject,
    SendResult,
    StartRun,
    random_id,
)
from p2pcompute.tasks.messages import Offer, Resources, TaskRequest


@dataclass(frozen=True)
class KindTerms:
    """What a provider asks for one kind: the resources a run needs and its price."""

    needs: Resources = Resources()  # noqa: RUF009 (frozen, immutable)
    price: float = 0.0


@dataclass(frozen=True)
class ProviderConfig:
    """Provider policy. ``capacity`` is how many runs may be in progress at once.

    Limits against a greedy or stalling requester (docs/tasks.md, "Deadlines and limits"):

    * ``max_leases_per_requester``: live leases one requester may hold at once; ``None``
      means half the slots, rounded up (``(capacity + 1) // 2``), so that with two or more
      slots one identity never holds them all. Past it, offers stop and accepts are
      refused with a retryable ``task-reject``.
    * ``input_deadline`` + declared input bytes / ``input_rate``: the time a granted lease
      has to deliver all its inputs (heartbeats do not extend it); past it the lease ends
      (a retryable ``task-error``) and its slot is freed. ``result_deadline`` + output
      bytes / ``input_rate`` bounds the delivery of a result the same way.
    * ``max_offers_per_requester``: open offers kept for one requester (of ``max_offers`` in
      all); a new request from a requester at the cap replaces its oldest unused offer, so
      that one identity flooding requests cannot crowd the others out of the offer table.
    * ``max_lease_streams_per_requester``: lease streams one peer may have open at once
      (``None``: ``4 * per_requester + 4``); more are closed at once, unread.
    * ``accept_deadline``: how long a new lease stream may take to send its accept;
      ``receipt_deadline``: how long the provider waits for the co-signed receipt.
    * ``session_idle``: the longest a *session* may sit idle (docs/design/sessions.md). An
      accept that asks for a session keeps its offer open after each lease for that long
      (at most this), so the requester sends its next items on the same terms and stream
      without a new request; every item is still its own lease, with the caps above. 0
      turns sessions off (each offer then lives ``offer_valid_for`` as before).
    * ``max_lingering_bytes``: memory that cancelled runs still stopping (a worker thread
      finishing its chunk) may hold while their slots are already free again; at most
      ``capacity`` such runs, any beyond keep their slot until they stop.

    Example::

        ProviderConfig(capacity=4, max_leases_per_requester=2, input_deadline=10.0)
    """

    capacity: int = 1
    resources: Resources = Resources(cpus=1.0)  # noqa: RUF009 (frozen, immutable)
    heartbeat: float = 1.0
    lease_ttl: float = 5.0
    offer_valid_for: float = 10.0
    max_offers: int = 4096
    max_offers_per_requester: int = 64
    memory: int = 4096  # remembered request ids / ended leases (duplicates and late messages)
    max_input_bytes: int = 1 << 30
    max_leases_per_requester: int | None = None
    input_deadline: float = 30.0
    input_rate: float = float(1 << 20)
    result_deadline: float = 30.0
    accept_deadline: float = 30.0
    receipt_deadline: float = 30.0
    max_lingering_bytes: int = 1 << 30
    max_lease_streams_per_requester: int | None = None
    session_idle: float = 30.0

    def __post_init__(self) -> None:
        if self.max_leases_per_requester is not None and self.max_leases_per_requester < 1:
            raise ConfigError("max_leases_per_requester must be at least 1")
        if self.max_offers_per_requester < 1 or self.max_offers < 1:
            raise ConfigError("max_offers and max_offers_per_requester must be at least 1")
        times = (self.input_deadline, self.result_deadline, self.accept_deadline, self.receipt_deadline)
        if not all(t > 0 for t in times) or not self.input_rate > 0:
            raise ConfigError("deadlines and input_rate must be positive")
        if not 0 <= self.session_idle <= 3600:
            raise ConfigError("session_idle must be between 0 and 3600 s")

    @property
    def per_requester(self) -> int:
        """Live leases one requester may hold (``max_leases_per_requester`` or half the slots)."""
        if self.max_leases_per_requester is not None:
            return self.max_leases_per_requester
        return max(1, (self.capacity + 1) // 2)

    @property
    def streams_per_requester(self) -> int:
        """Lease streams one peer may have open (``max_lease_streams_per_requester`` or a default)."""
        if self.max_lease_streams_per_requester is not None:
            return self.max_lease_streams_per_requester
        return 4 * self.per_requester + 4

    def input_seconds(self, input_bytes: int) -> float:
        """Seconds a granted lease has to deliver ``input_bytes`` of inputs.

        Example::

            >>> ProviderConfig().input_seconds(1 << 20)
            31.0
        """
        return self.input_deadline + min(input_bytes, self.max_input_bytes) / self.input_rate

    def result_seconds(self, output_bytes: int) -> float:
        """Seconds the provider spends at most delivering a result of ``output_bytes``."""
        return self.result_deadline + output_bytes / self.input_rate


#: The reason of the reject that an accept gets for an offer (or session) the provider no longer keeps.
EXPIRED_OFFER = "unknown or expired offer"


class ProviderEvent(enum.Enum):
    """What can end a provider's lease."""

    CANCEL = "cancel"  # the requester cancelled, or its stream died
    EXPIRE = "expire"  # no traffic from the requester for lease_ttl, or inputs late
    RUN_OK = "run ok"
    RUN_FAILED = "run failed"


#: The provider's lease life as data: a lease is live from its grant until the first of
#: these events ends it with the given outcome; a lease that has ended ignores them all.
PROVIDER_LEASE: dict[ProviderEvent, Outcome] = {
    ProviderEvent.CANCEL: Outcome.CANCELLED,
    ProviderEvent.EXPIRE: Outcome.EXPIRED,
    ProviderEvent.RUN_OK: Outcome.DONE,
    ProviderEvent.RUN_FAILED: Outcome.FAILED,
}


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
    granted: float = 0.0
    inputs_due: float | None = None  # the input deadline, until the inputs have arrived


@dataclass
class _POffer:
    offer: Offer
    expires: float
    active: int = 0
    session: float = 0.0  # idle seconds granted to a session on this offer (0: none yet)


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
        new_id: IdFactory = random_id,
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
        # runs whose lease ended while their worker thread still finishes a chunk: lease -> bytes
        self._lingering: dict[bytes, int] = {}
        self._ended = Bounded(config.memory)
        self._seen_requests = Bounded(config.memory)
        self.stats: dict[str, int] = {
            "offers": 0,
            "granted": 0,
            "rejected": 0,
            "done": 0,
            "failed": 0,
            "cancelled": 0,
            "expired": 0,
            "ignored": 0,
            "busy_refusals": 0,
            "offers_replaced": 0,
            "input_timeouts": 0,
            "sessions": 0,
            "sessions_ended": 0,
        }

    # -- queries

    @property
    def running(self) -> frozenset[bytes]:
        return frozenset(self._running)

    @property
    def active_leases(self) -> frozenset[bytes]:
        return frozenset(self._leases)

    def free_slots(self) -> int:
        """Slots free for a new run: capacity minus runs in progress and lingering runs over budget."""
        return self.config.capacity - len(self._running) - self._lingering_over_budget()

    def held_by(self, requester: str) -> int:
        """Live leases ``requester`` holds here (capped by ``config.per_requester``)."""
        return sum(1 for lease in self._leases.values() if lease.requester == requester)

    @property
    def lingering(self) -> dict[bytes, int]:
        """Cancelled runs still stopping whose slot is already free: lease id -> bytes held."""
        return dict(self._lingering)

    def lease_requester(self, lease_id: bytes) -> str | None:
        lease = self._leases.get(lease_id)
        return lease.requester if lease else None

    def outcome(self, lease_id: bytes) -> Outcome | None:
        return self._ended.get(lease_id)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has something to do (None: nothing pending)."""
        times = [min(lease.expires, lease.next_heartbeat) for lease in self._leases.values()]
        times += [lease.inputs_due for lease in self._leases.values() if lease.inputs_due is not None]
        if self._offers:
            times.append(next(iter(self._offers.values())).expires)
        return min(times) if times else None

    def leases_in_flight(self) -> list[dict[str, Any]]:
        """The leases held now: id (hex), requester, kind, price, when granted (core clock), running.

        Example::

            [(lease["kind"], lease["requester"]) for lease in core.leases_in_flight()]
        """
        return [
            {
                "lease": lease.lease_id.hex(),
                "requester": lease.requester,
                "kind": lease.kind,
                "price": lease.price,
                "granted": lease.granted,
                "running": lease.lease_id in self._running,
            }
            for lease in self._leases.values()
        ]

    def statistics(self) -> dict[str, int]:
        return {
            **self.stats,
            "running": len(self._running),
            "leases": len(self._leases),
            "lingering": len(self._lingering),
            "lingering_bytes": sum(self._lingering.values()),
        }

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
        room = self.config.per_requester - self.held_by(request.requester)
        if room <= 0:
            self.stats["busy_refusals"] += 1  # this requester holds its share: no offer
            return []
        self._expire_offers(now)
        if not self._room_for_offer(request.requester):
            return []
        offer = Offer(
            offer_id=self._new_id(),
            request_id=request.request_id,
            provider=self.peer_id,
            requester=request.requester,
            kind=request.kind,
            price=terms.price,
            expected_start=0.0,
            slots=max(1, min(request.count, free, room)),
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

    def handle_accept(
        self,
        sender: str,
        lease_id: bytes,
        offer_id: bytes,
        now: float,
        *,
        inputs: int | None = None,
        session: float = 0.0,
    ) -> list[Action]:
        """``sender`` accepts our offer as lease ``lease_id``: grant it if we still can.

        ``inputs`` is the byte count of the inputs the lease will send (``None``: it sends
        none); they must all arrive by ``config.input_seconds(inputs)`` after the grant
        (:meth:`inputs_received`), heartbeats or not. A requester that already holds
        ``config.per_requester`` leases is refused with a retryable reject.

        ``session`` > 0 asks to keep the offer open as a session: after each of its leases
        the offer stays acceptable for ``min(session, config.session_idle)`` more seconds
        (plus ``lease_ttl`` of slack for the requester's later clock), so that the requester
        leases its next items without a new request. The grant says what was granted.
        """
        if lease_id in self._leases or lease_id in self._ended:
            self.stats["ignored"] += 1  # duplicate or late: never a second run
            return []
        self._expire_offers(now)
        record = self._offers.get(offer_id)

        def reject(reason: str, retryable: bool) -> list[Action]:
            self._ended.put(lease_id, Outcome.REJECTED)
            self.stats["rejected"] += 1
            return [SendReject(sender, lease_id, reason, retryable)]

        if record is None or record.offer.requester != sender or record.expires <= now:
            return reject(EXPIRED_OFFER, True)
        if record.active >= record.offer.slots:
            return reject("all slots of this offer are in use", True)
        if self.free_slots() <= 0:
            return reject("provider at capacity", True)
        if self.held_by(sender) >= self.config.per_requester:
            self.stats["busy_refusals"] += 1
            return reject(f"busy: at most {self.config.per_requester} leases per requester", True)
        if inputs is not None and inputs > self.config.max_input_bytes:
            return reject(f"inputs of {inputs} bytes over the cap of {self.config.max_input_bytes}", False)
        lease = _PLease(
            lease_id,
            sender,
            offer_id,
            record.offer.kind,
            record.offer.price,
            now + self.config.lease_ttl,
            now + self.config.heartbeat,
            granted=now,
        )
        if inputs is not None:
            lease.inputs_due = now + self.config.input_seconds(inputs)
        granted = min(max(0.0, session), self.config.session_idle)
        if granted > 0:
            if record.session == 0:
                self.stats["sessions"] += 1
            record.session = max(record.session, granted)
        record.active += 1
        self._leases[lease_id] = lease
        self._running.add(lease_id)
        self.stats["granted"] += 1
        return [
            SendGrant(sender, lease_id, self.config.lease_ttl, self.config.heartbeat, granted),
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

    def inputs_received(self, lease_id: bytes) -> None:
        """All inputs of ``lease_id`` arrived: its input deadline no longer applies."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.inputs_due = None

    def handle_cancel(self, sender: str, lease_id: bytes, reason: str, now: float) -> list[Action]:
        """The requester cancels (or its stream died): end the lease and abort the run."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.requester != sender:
            self.stats["ignored"] += 1
            return []
        self._end(lease, ProviderEvent.CANCEL, now)
        return [AbortRun(lease_id, f"cancelled by requester: {reason}")]

    def run_succeeded(self, lease_id: bytes, now: float) -> list[Action]:
        """The run finished with outputs. Sends the result if the lease is still alive."""
        self._running.discard(lease_id)
        lease = self._leases.get(lease_id)
        if lease is None:
            return []  # cancelled or expired meanwhile: the result is dropped
        self._end(lease, ProviderEvent.RUN_OK, now)
        return [SendResult(lease.requester, lease_id)]

    def run_failed(self, lease_id: bytes, reason: str, retryable: bool, now: float) -> list[Action]:
        """The run raised. Reports the error if the lease is still alive."""
        self._running.discard(lease_id)
        lease = self._leases.get(lease_id)
        if lease is None:
            return []
        self._end(lease, ProviderEvent.RUN_FAILED, now)
        return [SendError(lease.requester, lease_id, reason, retryable)]

    def end_session(self, sender: str, offer_id: bytes) -> None:
        """``sender`` ends its session on ``offer_id``: no more accepts on that offer (its
        leases in progress run on). Another peer's offer, or an unknown one, is ignored.

        Example::

            core.end_session(requester, offer.offer_id)   # the requester said task-end
        """
        record = self._offers.get(offer_id)
        if record is None or record.offer.requester != sender:
            self.stats["ignored"] += 1
            return
        self.stats["sessions_ended"] += 1
        if record.active == 0:
            del self._offers[offer_id]
        else:  # leases still hold it: closed to accepts now, forgotten with the last of them
            record.session, record.expires = 0.0, -math.inf

    def run_stopped(self, lease_id: bytes) -> None:
        """An aborted run has really stopped: its slot is free again (a lingering run is forgotten)."""
        self._running.discard(lease_id)
        self._lingering.pop(lease_id, None)

    def run_abandoned(self, lease_id: bytes, memory: int) -> None:
        """The lease of a run has ended but its worker thread is still finishing a chunk.

        Its slot is free at once while the lingering runs stay within budget (at most
        ``capacity`` of them, holding at most ``config.max_lingering_bytes`` together);
        ``memory`` (bytes) is accounted until :meth:`run_stopped`.
        """
        if lease_id in self._running and lease_id not in self._leases:
            self._running.discard(lease_id)
            self._lingering[lease_id] = max(0, memory)

    def tick(self, now: float) -> list[Action]:
        """Expire silent leases, send due heartbeats, drop stale offers."""
        out: list[Action] = []
        for lease in list(self._leases.values()):
            if lease.inputs_due is not None and now >= lease.inputs_due:
                self._end(lease, ProviderEvent.EXPIRE, now)
                self.stats["input_timeouts"] += 1
                reason = f"inputs not received within {lease.inputs_due - lease.granted:g} s"
                out.append(SendError(lease.requester, lease.lease_id, reason, True))
                out.append(AbortRun(lease.lease_id, reason))
            elif now >= lease.expires:
                self._end(lease, ProviderEvent.EXPIRE, now)
                out.append(AbortRun(lease.lease_id, "lease expired: no heartbeat from the requester"))
            elif now >= lease.next_heartbeat:
                lease.seq += 1
                lease.next_heartbeat = now + self.config.heartbeat  # no burst after a clock jump
                out.append(SendHeartbeat(lease.requester, lease.lease_id, lease.seq))
        self._expire_offers(now)
        return out

    # -- internals

    def _end(self, lease: _PLease, event: ProviderEvent, now: float) -> None:
        outcome = PROVIDER_LEASE[event]
        del self._leases[lease.lease_id]
        self._ended.put(lease.lease_id, outcome)
        record = self._offers.get(lease.offer_id)
        if record is not None:
            record.active -= 1
            if record.session > 0:  # a session: idle time counts from its last lease
                record.expires = max(record.expires, now + record.session + self.config.lease_ttl)
        self.stats[outcome.value] += 1

    def _room_for_offer(self, requester: str) -> bool:
        """Whether one more offer to ``requester`` fits; at its cap, its oldest unused offer goes."""
        mine = [oid for oid, r in self._offers.items() if r.offer.requester == requester]
        if len(mine) >= self.config.max_offers_per_requester:
            unused = [oid for oid in mine if self._offers[oid].active == 0]
            if not unused:
                return False
            del self._offers[unused[0]]  # insertion order: the oldest
            self.stats["offers_replaced"] += 1
        return len(self._offers) < self.config.max_offers

    def _lingering_over_budget(self) -> int:
        """Lingering runs beyond the budget (count and bytes): each of them still takes a slot."""
        over, count, held = 0, 0, 0
        for memory in self._lingering.values():
            count, held = count + 1, held + memory
            if count > self.config.capacity or held > self.config.max_lingering_bytes:
                over += 1
        return over

    def _expire_offers(self, now: float) -> None:
        for offer_id, record in list(self._offers.items()):
            if record.expires <= now and record.active == 0:
                del self._offers[offer_id]


__all__ = ["EXPIRED_OFFER", "PROVIDER_LEASE", "KindTerms", "ProviderConfig", "ProviderCore", "ProviderEvent"]
