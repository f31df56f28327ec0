"""Wire messages of task negotiation (sans-IO): schemas, caps, signed requests and offers.

What travels where (details in docs/protocol/tasks.md):

* ``task-request`` -- GossipSub, signed by the requester (envelope kind ``task-request``);
* ``task-offer``   -- provider -> requester stream, signed by the provider (kind ``task-offer``);
* ``task-accept`` / ``task-grant`` / ``task-reject`` / ``task-heartbeat`` / ``task-result`` /
  ``task-error`` / ``task-cancel`` / ``task-receipt`` / ``task-end`` -- on the lease stream, which py-libp2p
  authenticates (Noise), so they are not signed again; the receipt inside is.

Every type has a version and a size cap; decoding raises a typed
:class:`~p2pcompute.errors.MalformedMessage` / :class:`~p2pcompute.errors.BadSignature`
naming the peer. Times on the wire are *durations* (seconds) except the request's
``issued`` stamp, so peers need no synchronised clocks for leases.

Imports :mod:`p2pcompute.wire` and :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from p2pcompute.errors import BadSignature, LocalProtocolError, MalformedMessage, StaleMessage
from p2pcompute.wire.codec import Field, Schema, decode
from p2pcompute.wire.signing import Signer, open_signed, seal_signed

ID_LEN = 16
DIGEST_LEN = 32
MAX_KIND_LEN = 64
MAX_PARAMS = 64 * 1024
MAX_REASON = 1024
MAX_COUNT = 1024
#: Upper bound on one lease's inputs or outputs (bytes); a provider may set a lower one.
MAX_TENSOR_BYTES = 1 << 40
#: Tensors of at most this many bytes in all travel inside their header frame, and that frame
#: (at most INLINE_FRAME bytes) inside the accept (inputs) or the result (outputs).
INLINE_TENSORS = 16 * 1024
INLINE_FRAME = INLINE_TENSORS + 4096

REQUEST_KIND = "task-request"
OFFER_KIND = "task-offer"
REQUEST_CAP = 4096
OFFER_CAP = 4096


def _id_field(name: str) -> Field:
    return Field(name, bytes, exact_len=ID_LEN)


@dataclass(frozen=True)
class Resources:
    """What one run of a task needs (or what a provider has): GPUs, GPU memory (bytes), CPU cores.

    Example::

        >>> Resources(gpus=1, gpu_memory=8 << 30).fits_in(Resources(gpus=2, gpu_memory=24 << 30, cpus=8))
        True
    """

    gpus: int = 0
    gpu_memory: int = 0
    cpus: float = 1.0

    def fits_in(self, available: Resources) -> bool:
        """True when every need is at most what ``available`` offers."""
        return (
            self.gpus <= available.gpus
            and self.gpu_memory <= available.gpu_memory
            and self.cpus <= available.cpus
        )

    def merge(self, other: Resources) -> Resources:
        """The element-wise maximum of two needs."""
        return Resources(
            max(self.gpus, other.gpus), max(self.gpu_memory, other.gpu_memory), max(self.cpus, other.cpus)
        )

    def to_wire(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "gpu_memory": self.gpu_memory, "cpus": self.cpus}


_RESOURCE_FIELDS = (
    Field("gpus", int, min=0, max=1024),
    Field("gpu_memory", int, min=0, max=1 << 50),
    Field("cpus", float, min=0, max=1 << 16),
)

REQUEST = Schema(
    REQUEST_KIND,
    1,
    max_size=REQUEST_CAP,
    fields=(
        _id_field("request_id"),
        Field("kind", str, max_len=MAX_KIND_LEN),
        *_RESOURCE_FIELDS,
        Field("max_price", float, min=0, max=1e18),
        Field("count", int, min=1, max=MAX_COUNT),
        Field("deadline_in", float, min=0, max=7 * 86400),
        Field("input_bytes", int, min=0, max=MAX_TENSOR_BYTES),
        Field("issued", float, min=0),
    ),
)

OFFER = Schema(
    OFFER_KIND,
    1,
    max_size=OFFER_CAP,
    fields=(
        _id_field("offer_id"),
        _id_field("request_id"),
        Field("requester", str, max_len=128),
        Field("kind", str, max_len=MAX_KIND_LEN),
        Field("price", float, min=0, max=1e18),
        Field("expected_start", float, min=0, max=86400),
        Field("slots", int, min=1, max=MAX_COUNT),
        Field("free", int, min=0, max=1 << 20),
        Field("capacity", int, min=1, max=1 << 20),
        *_RESOURCE_FIELDS,
        Field("valid_for", float, min=0, max=86400),
        Field("heartbeat", float, min=0.01, max=600),
        Field("lease_ttl", float, min=0.05, max=3600),
    ),
)


@dataclass(frozen=True)
class TaskRequest:
    """A requester's call for offers (published on GossipSub, signed by ``requester``)."""

    request_id: bytes
    requester: str
    kind: str
    needs: Resources
    max_price: float
    count: int
    deadline_in: float
    input_bytes: int
    issued: float

    def body(self) -> bytes:
        return REQUEST.build(
            request_id=self.request_id,
            kind=self.kind,
            **self.needs.to_wire(),
            max_price=float(self.max_price),
            count=self.count,
            deadline_in=float(self.deadline_in),
            input_bytes=self.input_bytes,
            issued=float(self.issued),
        )


@dataclass(frozen=True)
class Offer:
    """A provider's signed quote for one request: price, start, how many concurrent leases.

    ``valid_for`` is how long (seconds from receipt) the requester may accept it;
    ``heartbeat`` and ``lease_ttl`` are the lease timing the provider will use.
    """

    offer_id: bytes
    request_id: bytes
    provider: str
    requester: str
    kind: str
    price: float
    expected_start: float
    slots: int
    free: int
    capacity: int
    resources: Resources
    valid_for: float
    heartbeat: float
    lease_ttl: float

    def body(self) -> bytes:
        return OFFER.build(
            offer_id=self.offer_id,
            request_id=self.request_id,
            requester=self.requester,
            kind=self.kind,
            price=float(self.price),
            expected_start=float(self.expected_start),
            slots=self.slots,
            free=self.free,
            capacity=self.capacity,
            **self.resources.to_wire(),
            valid_for=float(self.valid_for),
            heartbeat=float(self.heartbeat),
            lease_ttl=float(self.lease_ttl),
        )


def _resources(m: dict[str, Any]) -> Resources:
    return Resources(gpus=m["gpus"], gpu_memory=m["gpu_memory"], cpus=m["cpus"])


def seal_request(req: TaskRequest, signer: Signer) -> bytes:
    """Sign a request for publishing.

    Example::

        raw = seal_request(TaskRequest(os.urandom(16), me.peer_id, "matmul", Resources(), 1.0,
                                       1, 60.0, 0, time.time()), me)
    """
    return seal_signed(REQUEST_KIND, req.body(), signer)


def open_request(
    data: bytes | bytearray | memoryview,
    *,
    peer: str | None = None,
    wall: float | None = None,
    max_age: float = 300.0,
) -> TaskRequest:
    """Check and decode a gossiped request; ``peer`` (the gossip sender) must be its signer.

    With ``wall`` (this node's time.time()), a request issued more than ``max_age``
    seconds away from it is refused as :class:`StaleMessage` (replayed gossip).
    """
    msg = open_signed(data, kind=REQUEST_KIND, max_size=REQUEST_CAP, peer=peer, expected_signer=peer)
    m = REQUEST.validate(msg.body, peer=peer)
    if wall is not None and abs(wall - m["issued"]) > max_age:
        raise StaleMessage(f"task request issued {wall - m['issued']:.0f} s away from now", peer=peer)
    return TaskRequest(
        request_id=m["request_id"],
        requester=msg.signer,
        kind=m["kind"],
        needs=_resources(m),
        max_price=m["max_price"],
        count=m["count"],
        deadline_in=m["deadline_in"],
        input_bytes=m["input_bytes"],
        issued=m["issued"],
    )


def seal_offer(offer: Offer, signer: Signer) -> bytes:
    """Sign an offer (the signer must be ``offer.provider``)."""
    if signer_peer_id(signer) != offer.provider:
        raise LocalProtocolError("an offer is signed by its provider")
    return seal_signed(OFFER_KIND, offer.body(), signer)


def open_offer(
    data: bytes | bytearray | memoryview, *, peer: str | None, expected_requester: str | None = None
) -> Offer:
    """Check and decode an offer received from ``peer``, who must have signed it.

    ``expected_requester`` (our own peer id) guards against an offer made to
    someone else being replayed to us.

    Example::

        offer = open_offer(frame, peer=stream.peer, expected_requester=node.peer_id)
    """
    msg = open_signed(data, kind=OFFER_KIND, max_size=OFFER_CAP, peer=peer, expected_signer=peer)
    m = OFFER.validate(msg.body, peer=peer)
    if expected_requester is not None and m["requester"] != expected_requester:
        raise BadSignature("offer addressed to another requester", peer=peer)
    return Offer(
        offer_id=m["offer_id"],
        request_id=m["request_id"],
        provider=msg.signer,
        requester=m["requester"],
        kind=m["kind"],
        price=m["price"],
        expected_start=m["expected_start"],
        slots=m["slots"],
        free=m["free"],
        capacity=m["capacity"],
        resources=_resources(m),
        valid_for=m["valid_for"],
        heartbeat=m["heartbeat"],
        lease_ttl=m["lease_ttl"],
    )


def signer_peer_id(signer: Signer) -> str:
    from p2pcompute.wire.signing import peer_id_from_public_key

    return peer_id_from_public_key(signer.public_key)


# --------------------------------------------------------------------------- lease stream

LEASE_FRAME_CAP = 256 * 1024

#: The longest session a requester may ask for (seconds idle between its items).
MAX_SESSION = 3600.0

# v2 (sessions): ``session`` asks the provider to keep the offer open that many idle seconds
# after each lease, so that further items follow on the same stream without a new request.
# ``inputs`` (v2 too): the inputs' ``task-tensors`` frame when they fit INLINE_FRAME (no
# separate input frames follow), else empty.
ACCEPT = Schema(
    "task-accept",
    2,
    max_size=MAX_PARAMS + INLINE_FRAME + 1024,
    fields=(
        _id_field("lease_id"),
        _id_field("offer_id"),
        _id_field("request_id"),
        Field("params", bytes, max_len=MAX_PARAMS),
        Field("input_bytes", int, min=0, max=MAX_TENSOR_BYTES),
        Field("input_digest", bytes, exact_len=DIGEST_LEN),
        Field("lane", bool),
        Field("session", float, min=0, max=MAX_SESSION),
        Field("inputs", bytes, max_len=INLINE_FRAME),
    ),
)
# v2 (sessions): ``session`` is the idle time granted (0: none; the stream ends with the lease).
GRANT = Schema(
    "task-grant",
    2,
    max_size=256,
    fields=(
        _id_field("lease_id"),
        Field("lease_ttl", float, min=0.05, max=3600),
        Field("heartbeat", float, min=0.01, max=600),
        Field("lane", bool),
        Field("session", float, min=0, max=MAX_SESSION),
    ),
)
#: The requester ends its session on this stream (sent between leases, instead of an accept).
END = Schema(
    "task-end",
    1,
    max_size=MAX_REASON + 256,
    fields=(_id_field("offer_id"), Field("reason", str, max_len=MAX_REASON)),
)
REJECT = Schema(
    "task-reject",
    1,
    max_size=MAX_REASON + 256,
    fields=(
        _id_field("lease_id"),
        Field("reason", str, max_len=MAX_REASON),
        Field("retryable", bool),
    ),
)
HEARTBEAT = Schema(
    "task-heartbeat",
    1,
    max_size=128,
    fields=(_id_field("lease_id"), Field("seq", int, min=0, max=1 << 62)),
)
# v2 (small tasks fast): ``outputs`` is the outputs' ``task-tensors`` frame when it fits
# INLINE_FRAME (no separate output frames follow), else empty.
RESULT = Schema(
    "task-result",
    2,
    max_size=MAX_PARAMS + INLINE_FRAME + 4096,
    fields=(
        _id_field("lease_id"),
        Field("info", bytes, max_len=MAX_PARAMS),
        Field("output_bytes", int, min=0, max=MAX_TENSOR_BYTES),
        Field("output_digest", bytes, exact_len=DIGEST_LEN),
        Field("receipt_body", bytes, max_len=2048),
        Field("provider_sig", bytes, exact_len=64),
        Field("outputs", bytes, max_len=INLINE_FRAME),
    ),
)
ERROR = Schema(
    "task-error",
    1,
    max_size=MAX_REASON + 256,
    fields=(
        _id_field("lease_id"),
        Field("reason", str, max_len=MAX_REASON),
        Field("retryable", bool),
    ),
)
CANCEL = Schema(
    "task-cancel",
    1,
    max_size=MAX_REASON + 256,
    fields=(_id_field("lease_id"), Field("reason", str, max_len=MAX_REASON)),
)
RECEIPT_MSG = Schema(
    "task-receipt",
    1,
    max_size=4096,
    fields=(_id_field("lease_id"), Field("receipt", bytes, max_len=3072)),
)

LEASE_SCHEMAS: dict[str, Schema] = {
    s.type: s for s in (ACCEPT, GRANT, REJECT, HEARTBEAT, RESULT, ERROR, CANCEL, RECEIPT_MSG, END)
}


def parse_lease_message(
    data: bytes | bytearray | memoryview, *, peer: str | None, allowed: frozenset[str] | None = None
) -> dict[str, Any]:
    """Decode one lease-stream frame into a validated dict (``m["t"]`` says which type).

    ``allowed`` restricts the types this side may receive (a provider never receives
    a ``task-grant``); anything else is :class:`MalformedMessage` naming ``peer``.
    """
    obj = decode(data, max_size=LEASE_FRAME_CAP, peer=peer)
    kind = obj.get("t") if isinstance(obj, dict) else None
    schema = LEASE_SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None or (allowed is not None and kind not in allowed):
        raise MalformedMessage(f"unexpected lease message type {kind!r}", peer=peer)
    return schema.validate(obj, peer=peer)


def reason_text(reason: str) -> str:
    """``reason`` cut to what a ``task-error`` / ``task-reject`` / ``task-cancel`` may carry.

    The cut is at 1000 UTF-8 bytes (never inside a character), so that a reason in any
    script fits the message's byte cap and its building never fails.

    Example::

        >>> len(reason_text("x" * 5000)), len(reason_text("\u00e9" * 5000).encode())
        (1000, 1000)
    """
    return reason.encode("utf-8", "replace")[: min(1000, MAX_REASON)].decode("utf-8", "ignore")


# --------------------------------------------------------------------------- tensors in frames

#: dtypes a peer may send; anything else is refused before allocation.
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)

# v2 (small tasks fast): ``inline`` carries the tensors' bytes when they total at most
# INLINE_TENSORS (one frame instead of a header and a chunk per tensor); empty otherwise.
TENSORS_HEADER = Schema(
    "task-tensors",
    2,
    max_size=64 * 1024,
    fields=(
        Field("names", list, max_len=256, item=str),
        Field("dtypes", list, max_len=256, item=str),
        Field("shapes", list, max_len=256, item=list),
        Field("nbytes", int, min=0, max=MAX_TENSOR_BYTES),
        Field("inline", bytes, max_len=INLINE_TENSORS),
    ),
)
