"""Signed envelopes: what a peer claims about itself, bound to its Ed25519 key.

An envelope is a msgpack map::

    {"t": "signed", "v": 1, "kind": str, "body": bin, "key": bin[32], "sig": bin[64]}

``sig`` is Ed25519 (via ``cryptography``) over ``DOMAIN || kind || 0x00 || body``,
so a signature made for one message kind can never be replayed as another.
The signer's libp2p peer id is derived from ``key``; the caller compares it with
the peer that sent the bytes (:func:`open_signed` does it when told whom to expect).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pcompute.errors import BadSignature, LocalProtocolError
from p2pcompute.wire.codec import Field, Schema, decode

DOMAIN = b"p2pcompute-signed-v1\x00"

# libp2p peer id of an Ed25519 key: identity multihash (0x00, len 36) of the
# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}.
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


class Signer(Protocol):
    """Anything that can sign with an Ed25519 key (see :class:`p2pcompute.identity.Identity`)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id of a raw 32-byte Ed25519 public key.

    Example::

        >>> peer_id_from_public_key(bytes(32)).startswith("12D3KooW")
        True
    """
    if len(public_key) != 32:
        raise LocalProtocolError("an Ed25519 public key is 32 bytes")
    return _peer_id(bytes(public_key))


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@functools.lru_cache(maxsize=4096)
def _peer_id(public_key: bytes) -> str:
    # base58btc of the multihash, written here so that checking a signature (a ledger, an advert)
    # needs no py-libp2p import (about 1 s); tests compare it with libp2p's own ID
    raw = _PEER_ID_PREFIX + public_key
    n = int.from_bytes(raw, "big")
    digits = []
    while n:
        n, r = divmod(n, 58)
        digits.append(_B58[r])
    zeros = len(raw) - len(raw.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(digits))


def _signed_payload(kind: str, body: bytes) -> bytes:
    return DOMAIN + kind.encode("utf-8") + b"\x00" + body


def verify_signature(public_key: bytes, signature: bytes, kind: str, body: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``body`` as ``kind``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, _signed_payload(kind, body))
    except (InvalidSignature, ValueError):
        return False
    return True


ENVELOPE = Schema(
    "signed",
    1,
    max_size=1 << 20,
    fields=(
        Field("kind", str, max_len=64),
        Field("body", bytes),
        Field("key", bytes, exact_len=32),
        Field("sig", bytes, exact_len=64),
    ),
)


@dataclass(frozen=True)
class SignedMessage:
    """A verified envelope: who signed it and the (decoded, not yet schema-checked) body."""

    kind: str
    signer: str
    public_key: bytes
    body: Any
    body_bytes: bytes
    signature: bytes


def seal_signed(kind: str, body: bytes, signer: Signer) -> bytes:
    """Wrap msgpack ``body`` (already encoded) in an envelope signed by ``signer``.

    Example::

        raw = seal_signed("capacity", CAPACITY.build(...), identity)
    """
    sig = signer.sign(_signed_payload(kind, body))
    return ENVELOPE.build(kind=kind, body=body, key=signer.public_key, sig=sig)


def open_signed(
    data: bytes | bytearray | memoryview,
    *,
    kind: str,
    max_size: int,
    peer: str | None = None,
    expected_signer: str | None = None,
) -> SignedMessage:
    """Decode an envelope of ``kind``, check its size, signature and signer.

    ``peer`` names whom to blame in errors (the sender or forwarder);
    ``expected_signer``, when given, must equal the peer id of the signing key.
    The body is msgpack-decoded under the same cap but not schema-checked:
    validate it with the body's :class:`Schema`.

    Example::

        msg = open_signed(raw, kind="capacity", max_size=16384, peer=sender,
                          expected_signer=sender)
        advert = CAPACITY.validate(msg.body, peer=sender)
    """
    env = ENVELOPE.validate(decode(data, max_size=max_size, peer=peer), peer=peer)
    if env["kind"] != kind:
        raise BadSignature(f"envelope of kind {env['kind']!r} where {kind!r} expected", peer=peer)
    if not verify_signature(env["key"], env["sig"], kind, env["body"]):
        raise BadSignature(f"{kind}: signature does not verify", peer=peer)
    signer = peer_id_from_public_key(env["key"])
    if expected_signer is not None and signer != expected_signer:
        raise BadSignature(f"{kind}: signed by {signer}, not by the sender", peer=peer)
    body = decode(env["body"], max_size=max_size, peer=peer)
    return SignedMessage(kind, signer, env["key"], body, env["body"], env["sig"])
