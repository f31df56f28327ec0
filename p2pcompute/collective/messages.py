"""Wire messages of the collective protocol (schemas only; see docs/protocol/collective.md).

* ``coll.join`` (v1): the body of a signed envelope of kind :data:`JOIN_KIND`, published on the
  run's topic: who wants to average, with what weight, bandwidth and tensor layout, until when.
* ``coll.hello`` / ``coll.hello_ack``, ``coll.ready`` / ``coll.ready_ack``: matchmaking, one
  request and one answer per stream of :data:`PROTOCOL`.
* ``coll.status`` and ``coll.left``: the round's control messages, one per stream, no answer.
* ``coll.presence`` / ``coll.presence_ack``: a peer says it joined a run or is leaving it.

Point-to-point messages travel on authenticated py-libp2p streams, so their sender is the
stream's remote peer; only the join advert (forwarded by gossip and in hellos) is signed.
Imports :mod:`p2pcompute.wire` only.
"""

from __future__ import annotations

from typing import Any

from p2pcompute.errors import BadSignature
from p2pcompute.wire.codec import Field, Schema
from p2pcompute.wire.signing import open_signed

PROTOCOL = "/p2pcompute/collective/1.0.0"
JOIN_KIND = "p2pcompute.collective.join"
MAX_GROUP = 256
MAX_ID = 64  # a base58 Ed25519 peer id is 52 characters
MAX_NAME = 128
MAX_ADVERT = 2048

JOIN = Schema(
    "coll.join",
    1,
    max_size=MAX_ADVERT,
    fields=(
        Field("run", str, max_len=MAX_NAME),
        Field("round", str, max_len=MAX_NAME),
        Field("peer", str, max_len=MAX_ID),
        Field("weight", float, min=0, max=1e15),
        Field("bandwidth", float, min=0, max=1e15),
        Field("layout", bytes, exact_len=32),
        Field("expires", float, min=0),
        Field("addrs", list, max_len=8, item=str),
    ),
)

HELLO = Schema(
    "coll.hello",
    1,
    max_size=MAX_GROUP * (MAX_ADVERT + 80) + 4096,
    fields=(
        Field("run", str, max_len=MAX_NAME),
        Field("round", str, max_len=MAX_NAME),
        Field("digest", str, max_len=MAX_ID),
        Field("seq", int, min=0, max=1 << 31),
        Field("members", list, max_len=MAX_GROUP, item=str),
        Field("adverts", list, max_len=MAX_GROUP, item=bytes),
    ),
)

HELLO_ACK = Schema(
    "coll.hello_ack",
    1,
    max_size=MAX_GROUP * (MAX_ADVERT + 16) + 1024,
    fields=(
        Field("state", str, max_len=8),  # "ok", "busy" or "idle" (not matching this round yet)
        Field("digest", str, max_len=MAX_ID),
        Field("seq", int, min=0, max=1 << 31),
        Field("adverts", list, max_len=MAX_GROUP, item=bytes),
    ),
)

READY = Schema(
    "coll.ready",
    1,
    max_size=512,
    fields=(
        Field("run", str, max_len=MAX_NAME),
        Field("round", str, max_len=MAX_NAME),
        Field("digest", str, max_len=MAX_ID),
    ),
)

# v2: ``committed`` (the answerer is locked on, or formed with, that digest: it counts as ready)
READY_ACK = Schema(
    "coll.ready_ack", 2, max_size=64, fields=(Field("ok", bool), Field("committed", bool))
)

STATUS = Schema(
    "coll.status",
    1,
    max_size=2 * MAX_GROUP * (MAX_ID + 2) + 1024,
    fields=(
        Field("round", str, max_len=3 * MAX_NAME),
        Field("attempt", int, min=1, max=64),
        Field("digest", str, max_len=MAX_ID),
        Field("ok", bool),
        Field("leaving", bool),
        Field("suspects", list, max_len=MAX_GROUP, item=str),
        Field("blamed", list, max_len=MAX_GROUP, item=str),
    ),
)

LEFT = Schema("coll.left", 1, max_size=3 * MAX_NAME + 64, fields=(Field("round", str, max_len=3 * MAX_NAME),))

#: ``coll.presence``: "I joined this run (I hold its state and will be in its next round)" or
#: "I am leaving it" (a clean exit), so partners expect us, or stop expecting us, at once
PRESENCE_STATES = ("join", "leave")
PRESENCE = Schema(
    "coll.presence",
    1,
    max_size=MAX_NAME + 64,
    fields=(Field("run", str, max_len=MAX_NAME), Field("state", str, max_len=8)),
)
PRESENCE_ACK = Schema("coll.presence_ack", 1, max_size=32, fields=(Field("ok", bool),))

#: largest first frame a collective stream may carry
MAX_REQUEST = max(HELLO.max_size, STATUS.max_size, READY.max_size, LEFT.max_size, PRESENCE.max_size)


def open_join(raw: bytes, *, via: str | None) -> dict[str, Any]:
    """Verify a signed join advert (forwarded by ``via``) and return its validated body.

    Raises :class:`~p2pcompute.errors.MalformedMessage` (bad bytes, schema or size) or
    :class:`~p2pcompute.errors.BadSignature` (bad signature, or signed by someone other than
    the ``peer`` it names), each naming ``via``.

    Example::

        body = open_join(raw, via=sender)      # body["peer"] signed it
    """
    signed = open_signed(raw, kind=JOIN_KIND, max_size=MAX_ADVERT + 256, peer=via)
    body = JOIN.validate(signed.body, peer=via)
    if body["peer"] != signed.signer:
        raise BadSignature("join advert names another peer than its signer", peer=via)
    return body
