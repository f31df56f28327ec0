"""Shared vocabulary of the negotiation cores: the actions they return and how a lease ended.

The cores (:mod:`p2pcompute.tasks.provider_core`, :mod:`p2pcompute.tasks.requester_core`)
return lists of these frozen dataclasses; the trio drivers carry them out.

Imports :mod:`p2pcompute.tasks.messages` only.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from p2pcompute.tasks.messages import Offer, TaskRequest

IdFactory = Callable[[], bytes]


def random_id() -> bytes:
    """A fresh random 16-byte id (offers, leases, requests)."""
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
    session: float = 0.0  # idle seconds the offer stays open for further accepts (0: no session)


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


class Bounded(OrderedDict[bytes, Outcome]):
    """An insertion-ordered map that forgets its oldest entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: bytes, value: Outcome) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


__all__ = [
    "AbortRun",
    "Action",
    "Bounded",
    "CloseLease",
    "IdFactory",
    "ItemDone",
    "ItemFailed",
    "Outcome",
    "Publish",
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
    "random_id",
]
