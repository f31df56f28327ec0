"""Signed capacity adverts: build, seal and check them (sans-IO).

An advert is a ``seal_signed("advert", body)`` envelope whose body is::

    {"t": "advert", "v": 1, "peer": str, "swarm": str, "seq": int, "issued": float,
     "ttl": float, "role": str, "addrs": [str], "cap": {capacity map}}

It tells the swarm that ``peer`` is alive, where to dial it, and what it offers.
:func:`open_advert` checks, in order: the size cap, the envelope schema, the
Ed25519 signature, that the signer is the advert's ``peer`` and (when known) the
peer that sent it, the swarm, and freshness (not issued in the future, not
expired, ``ttl`` within bounds). Sequence numbers are checked by the peer table,
which knows the last one seen. Every failure raises a typed
:class:`~p2pcompute.errors.RemoteProtocolError` naming the peer to blame.

Imports :mod:`p2pcompute.wire`, :mod:`p2pcompute.errors` and the capacity model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from p2pcompute.capacity.model import Capacity, capacity_from_wire
from p2pcompute.errors import BadSignature, MalformedMessage, StaleMessage
from p2pcompute.wire.codec import Field, Schema
from p2pcompute.wire.signing import Signer, open_signed, seal_signed

ADVERT_KIND = "advert"
MAX_ADVERT_SIZE = 16 * 1024
MAX_ADDRS = 8
MAX_TTL = 3600.0
MIN_TTL = 0.1
DEFAULT_MAX_SKEW = 10.0
ROLES = ("peer", "bootstrap")

ADVERT = Schema(
    ADVERT_KIND,
    1,
    max_size=MAX_ADVERT_SIZE,
    fields=(
        Field("peer", str, max_len=128),
        Field("swarm", str, max_len=64),
        Field("seq", int, min=0, max=(1 << 63) - 1),
        Field("issued", float, min=0, max=1e11),
        Field("ttl", float, min=MIN_TTL, max=MAX_TTL),
        Field("role", str, max_len=16),
        Field("addrs", list, max_len=MAX_ADDRS, item=str),
        Field("cap", dict, max_len=16),
    ),
)


@dataclass(frozen=True)
class Advert:
    """A checked advert. ``raw`` is the signed envelope, kept so it can be handed on verbatim."""

    peer_id: str
    swarm: str
    seq: int
    issued: float
    ttl: float
    role: str
    addrs: tuple[str, ...]
    capacity: Capacity
    raw: bytes

    @property
    def expires(self) -> float:
        return self.issued + self.ttl


def make_advert(
    signer: Signer,
    *,
    peer_id: str,
    swarm: str,
    seq: int,
    capacity: Capacity,
    addrs: list[str],
    ttl: float,
    role: str = "peer",
    issued: float | None = None,
) -> bytes:
    """Build and sign an advert; returns the envelope bytes.

    Example::

        raw = make_advert(ident, peer_id=ident.peer_id, swarm="default", seq=1,
                          capacity=probe_capacity(), addrs=node.addrs, ttl=30.0)
    """
    body = ADVERT.build(
        peer=peer_id,
        swarm=swarm,
        seq=seq,
        issued=time.time() if issued is None else float(issued),
        ttl=float(ttl),
        role=role,
        addrs=list(addrs)[:MAX_ADDRS],
        cap=capacity.to_wire(),
    )
    return seal_signed(ADVERT_KIND, body, signer)


def open_advert(
    data: bytes | bytearray | memoryview,
    *,
    swarm: str,
    now: float,
    sender: str | None = None,
    blame: str | None = None,
    max_skew: float = DEFAULT_MAX_SKEW,
) -> Advert:
    """Check an advert envelope and return the :class:`Advert`.

    ``sender``: the peer that published it, when known (the GossipSub origin);
    the signer must be that peer. ``blame``: whom errors name (default: ``sender``;
    for a list received by peer exchange, the peer that sent the list).
    ``now``: the local wall-clock time; ``max_skew`` the clock difference tolerated.

    Example::

        advert = open_advert(raw, swarm="default", now=time.time(), sender=origin)
    """
    who = blame if blame is not None else sender
    msg = open_signed(data, kind=ADVERT_KIND, max_size=MAX_ADVERT_SIZE, peer=who, expected_signer=sender)
    body = ADVERT.validate(msg.body, peer=who)
    if body["peer"] != msg.signer:
        raise BadSignature(f"advert for {body['peer']} signed by {msg.signer}", peer=who)
    if body["swarm"] != swarm:
        raise MalformedMessage(f"advert for swarm {body['swarm']!r}, we are in {swarm!r}", peer=who)
    if body["role"] not in ROLES:
        raise MalformedMessage(f"advert with unknown role {body['role']!r}", peer=who)
    for addr in body["addrs"]:
        if len(addr) > 256 or not addr.startswith("/"):
            raise MalformedMessage("advert with a malformed address", peer=who)
    issued, ttl = body["issued"], body["ttl"]
    if issued > now + max_skew:
        raise StaleMessage(f"advert issued {issued - now:.1f} s in the future", peer=who)
    if issued + ttl < now - max_skew:
        raise StaleMessage(f"advert expired {now - issued - ttl:.1f} s ago", peer=who)
    capacity = capacity_from_wire(body["cap"], peer=who)
    return Advert(
        peer_id=body["peer"],
        swarm=body["swarm"],
        seq=body["seq"],
        issued=issued,
        ttl=ttl,
        role=body["role"],
        addrs=tuple(body["addrs"]),
        capacity=capacity,
        raw=bytes(data),
    )


def advert_body(data: bytes) -> dict[str, Any]:
    """Decode an advert we built ourselves without checks (for logs and tests)."""
    msg = open_signed(data, kind=ADVERT_KIND, max_size=MAX_ADVERT_SIZE)
    return ADVERT.validate(msg.body)


__all__ = [
    "ADVERT",
    "ADVERT_KIND",
    "DEFAULT_MAX_SKEW",
    "MAX_ADVERT_SIZE",
    "Advert",
    "make_advert",
    "open_advert",
]
