"""Sans-IO key agreement and record sealing for the tensor data lane.

Session (once per peer pair, over an authenticated libp2p stream)::

    initiator -> responder   lane-hello {nonce: 32 B, kx: X25519 public key, addrs: [[host, port]...],
                                         ciphers: [name, ...] in order of preference}
    responder -> initiator   lane-hello {...}
    cipher = the first of the initiator's ciphers that the responder also lists
    transcript = SHA-256(label || initiator id || responder id || both hellos as sent)
    HKDF-SHA256(ikm = X25519(shared) || nonce_i || nonce_r, salt = transcript)
        -> key initiator->responder (32) | key responder->initiator (32) | session id (16)

Both peer ids and both hellos are in the transcript, so keys made with one peer
never work with another, and a hello replayed from another session gives other keys.
The cipher lists are in the transcript too, and the hellos travel on a stream that
libp2p has already authenticated, so nobody between the peers can push them to a
weaker choice.

Transfer (one per data connection): the receiver sends a fresh 32-byte challenge;
``HKDF(ikm = session key of the sender's direction, salt = challenge)`` gives the
two transfer keys (sender->receiver, receiver->sender). Every record is
sealed with the session's cipher (AES-256-OCB3 by default, AES-256-GCM where the
OpenSSL under ``cryptography`` lacks OCB) with nonce = the record's counter in that direction (never reused:
a fresh key per transfer) and the 5-byte record header as AAD, so records cannot
be reordered, replayed, truncated or moved to another transfer or direction.

Imports :mod:`p2pcompute.errors`, :mod:`p2pcompute.wire.codec`, :mod:`p2pcompute.wire.shards`
and ``cryptography``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pcompute.errors import IntegrityError, LocalProtocolError, MalformedMessage
from p2pcompute.wire.codec import Field, Schema
from p2pcompute.wire.shards import HEADER, HEADER_SIZE, TAG_SIZE

log = logging.getLogger(__name__)

MAGIC = b"P2PCLN01"
SESSION_ID_SIZE = 16
CHALLENGE_SIZE = 32
PREAMBLE_SIZE = len(MAGIC) + SESSION_ID_SIZE
MAX_RECORDS_PER_KEY = 1 << 48

HELLO = Schema(
    "lane-hello",
    2,
    max_size=4096,
    fields=(
        Field("nonce", bytes, exact_len=32),
        Field("kx", bytes, exact_len=32),
        Field("addrs", list, max_len=16, item=list),
        Field("ciphers", list, max_len=8, item=str),
    ),
)

# Record ciphers by name, fastest first. Both are AEADs with 256-bit keys, 96-bit nonces and
# 128-bit tags, so records have the same layout under either. OCB3 (RFC 7253) needs no GHASH
# and seals 1.7x faster than GCM on the 2-core machine we measure on (see
# docs/design/data-plane.md); GCM stays as the choice every OpenSSL build has.
CIPHERS: dict[str, Any] = {"aes-256-ocb3": AESOCB3, "aes-256-gcm": AESGCM}


@functools.cache
def available_ciphers() -> tuple[str, ...]:
    """The record ciphers this process can use, in order of preference.

    Example::

        assert "aes-256-gcm" in available_ciphers()
    """
    names = []
    for name, cls in CIPHERS.items():
        try:
            cls(bytes(32))
        except UnsupportedAlgorithm:  # the OpenSSL under cryptography was built without it
            log.info("lane cipher %s is not available here", name)
        else:
            names.append(name)
    return tuple(names)


def check_ciphers(ciphers: Any) -> tuple[str, ...]:
    """Validate a local preference list of cipher names (raises LocalProtocolError)."""
    names = tuple(ciphers)
    usable = available_ciphers()
    if not names or len(set(names)) != len(names) or any(n not in usable for n in names):
        raise LocalProtocolError(f"lane ciphers must be distinct names from {usable}, got {names!r}")
    return names


def _aead(cipher: str, key: bytes) -> Any:
    cls = CIPHERS.get(cipher)
    if cls is None:
        raise LocalProtocolError(f"unknown lane cipher {cipher!r}")
    return cls(key)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@dataclass(frozen=True)
class SessionKeys:
    """Keys of one lane session with one peer, from our point of view."""

    session_id: bytes
    send_base: bytes  # base key of transfers we send
    recv_base: bytes  # base key of transfers we receive
    peer_addrs: tuple[tuple[str, int], ...]
    cipher: str  # record cipher both sides agreed on


class Handshake:
    """One side of the lane session handshake.

    Example::

        a = Handshake(initiator=True, local_id="A", remote_id="B", addrs=[("127.0.0.1", 4000)])
        b = Handshake(initiator=False, local_id="B", remote_id="A", addrs=[])
        keys_b = b.finish(a.hello)          # bytes received from A
        keys_a = a.finish(b.hello)
        assert keys_a.send_base == keys_b.recv_base and keys_a.cipher == keys_b.cipher
    """

    def __init__(
        self,
        *,
        initiator: bool,
        local_id: str,
        remote_id: str,
        addrs: list[tuple[str, int]],
        ciphers: tuple[str, ...] | None = None,
    ) -> None:
        self.initiator = initiator
        self.local_id = local_id
        self.remote_id = remote_id
        self.ciphers = available_ciphers() if ciphers is None else check_ciphers(ciphers)
        self._secret = X25519PrivateKey.generate()
        kx = self._secret.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._nonce = os.urandom(32)
        self.hello = HELLO.build(
            nonce=self._nonce, kx=kx, addrs=[[h, p] for h, p in addrs], ciphers=list(self.ciphers)
        )

    def finish(self, peer_hello: bytes) -> SessionKeys:
        """Check the peer's hello and derive the session keys (raises MalformedMessage)."""
        peer = self.remote_id
        msg = HELLO.parse(peer_hello, peer=peer)
        addrs: list[tuple[str, int]] = []
        for item in msg["addrs"]:
            if (
                len(item) != 2
                or not isinstance(item[0], str)
                or len(item[0]) > 255
                or not isinstance(item[1], int)
                or isinstance(item[1], bool)
                or not 0 < item[1] < 65536
            ):
                raise MalformedMessage("lane-hello: bad address", peer=peer)
            addrs.append((item[0], item[1]))
        first, second = (self.ciphers, msg["ciphers"]) if self.initiator else (msg["ciphers"], self.ciphers)
        cipher = next((c for c in first if c in second), None)  # one list is ours: only known names
        if cipher is None:
            raise MalformedMessage(
                f"lane-hello: no record cipher in common (ours {list(self.ciphers)}, "
                f"theirs {msg['ciphers'][:8]})",
                peer=peer,
            )
        try:
            shared = self._secret.exchange(X25519PublicKey.from_public_bytes(msg["kx"]))
        except ValueError:
            raise MalformedMessage("lane-hello: unusable key-exchange value", peer=peer) from None
        if self.initiator:
            ids = (self.local_id, self.remote_id)
            hellos = (self.hello, bytes(peer_hello))
            nonces = (self._nonce, msg["nonce"])
        else:
            ids = (self.remote_id, self.local_id)
            hellos = (bytes(peer_hello), self.hello)
            nonces = (msg["nonce"], self._nonce)
        transcript = hashlib.sha256(
            b"p2pcompute-lane-v2"
            + _lp(ids[0].encode())
            + _lp(ids[1].encode())
            + _lp(hellos[0])
            + _lp(hellos[1])
        ).digest()
        okm = HKDF(
            algorithm=hashes.SHA256(), length=80, salt=transcript, info=b"p2pcompute lane session keys"
        ).derive(shared + nonces[0] + nonces[1])
        i2r, r2i, sid = okm[:32], okm[32:64], okm[64:80]
        send, recv = (i2r, r2i) if self.initiator else (r2i, i2r)
        return SessionKeys(sid, send, recv, tuple(addrs), cipher)


def transfer_keys(base: bytes, challenge: bytes) -> tuple[bytes, bytes]:
    """(sender->receiver, receiver->sender) keys of one transfer under session key ``base``."""
    if len(challenge) != CHALLENGE_SIZE:
        raise LocalProtocolError("a transfer challenge is 32 bytes")
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=challenge, info=b"p2pcompute lane transfer keys"
    ).derive(base)
    return okm[:32], okm[32:]


def sealed_size(plaintext_len: int) -> int:
    """Bytes one record of ``plaintext_len`` takes on the wire (header + ciphertext + tag)."""
    return HEADER_SIZE + plaintext_len + TAG_SIZE


class RecordSealer:
    """Seals the records of one direction of one transfer (counter nonces, header as AAD).

    Example::

        sealer = RecordSealer(key, keys.cipher)
        n = sealer.seal_into(KIND_DATA, payload_view, out_buffer)   # out_buffer[:n] goes on the wire
    """

    __slots__ = ("_aead", "_count", "cipher")

    def __init__(self, key: bytes, cipher: str) -> None:
        self._aead = _aead(cipher, key)
        self.cipher = cipher
        self._count = 0

    def seal_into(self, kind: int, plaintext: Any, out: memoryview) -> int:
        """Write header + sealed ``plaintext`` into ``out``; return the bytes written."""
        n = len(plaintext)
        total = HEADER_SIZE + n + TAG_SIZE
        header = HEADER.pack(kind, n + TAG_SIZE)
        out[:HEADER_SIZE] = header
        if self._count >= MAX_RECORDS_PER_KEY:
            raise LocalProtocolError("too many records under one transfer key")
        nonce = self._count.to_bytes(12, "big")
        self._count += 1
        self._aead.encrypt_into(nonce, plaintext, header, out[HEADER_SIZE:total])
        return total

    def seal(self, kind: int, plaintext: bytes) -> bytes:
        """Seal a small (control) record into new bytes."""
        out = bytearray(HEADER_SIZE + len(plaintext) + TAG_SIZE)
        self.seal_into(kind, plaintext, memoryview(out))
        return bytes(out)


class RecordOpener:
    """Opens the records of one direction of one transfer, in order; raises IntegrityError."""

    __slots__ = ("_aead", "_count", "cipher", "peer")

    def __init__(self, key: bytes, cipher: str, *, peer: str | None) -> None:
        self._aead = _aead(cipher, key)
        self.cipher = cipher
        self._count = 0
        self.peer = peer

    def open_into(
        self, header: bytes | bytearray | memoryview, body: memoryview | bytearray, out: Any
    ) -> None:
        """Authenticate and decrypt ``body`` (ciphertext + tag) into ``out`` (len(body) - 16 bytes)."""
        nonce = self._count.to_bytes(12, "big")
        self._count += 1
        try:
            self._aead.decrypt_into(nonce, body, bytes(header), out)
        except InvalidTag:
            raise IntegrityError(
                f"lane record {self._count - 1} failed authentication (corrupt, reordered or forged)",
                peer=self.peer,
            ) from None

    def open(self, header: bytes | bytearray | memoryview, body: memoryview | bytearray) -> bytes:
        """Open a small (control) record into new bytes."""
        out = bytearray(len(body) - TAG_SIZE)
        self.open_into(header, body, out)
        return bytes(out)
