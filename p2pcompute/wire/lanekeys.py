"""Sans-IO key agreement and record sealing for the tensor data lane.

Session (once per peer pair, over an authenticated libp2p stream)::

    initiator -> responder   lane-hello v3 {nonce: 32 B, kx: X25519 public key,
                                            addrs: [[host, port]...],
                                            ciphers: [[name, seal MB/s, open MB/s]...] fastest first}
    responder -> initiator   lane-hello v3 {...}
    cipher = choose_cipher(initiator's list, responder's list): of the names both list, the one
             whose slowest figure (either side's seal or open) is highest; ties by name
    transcript = SHA-256(label || initiator id || responder id || both hellos as sent || cipher)
    HKDF-SHA256(ikm = X25519(shared) || nonce_i || nonce_r, salt = transcript)
        -> key initiator->responder (32) | key responder->initiator (32) | session id (16)

Both peer ids and both hellos are in the transcript, so keys made with one peer
never work with another, and a hello replayed from another session gives other keys.
The cipher lists and their figures are in the transcript too (and the chosen name), and the
hellos travel on a stream that libp2p has already authenticated, so nobody between the
peers can push them to a weaker choice.

Each process measures its own seal and open speed per cipher once (:func:`cipher_speeds`, a
few milliseconds on 1 MiB records, cached), because the fastest AEAD depends on the CPU:
AES-256-GCM wins where the CPU has VAES and VPCLMULQDQ, AES-256-OCB3 on older AES-NI
parts, ChaCha20-Poly1305 where there is no AES instruction at all. A session is used in
both directions, so the choice maximises the slowest of the four figures (each side's seal
and open); both sides compute it from the same two hellos, so they always agree.

Transfer (one per data connection): the receiver sends a fresh 32-byte challenge;
``HKDF(ikm = session key of the sender's direction, salt = challenge)`` gives the
two transfer keys (sender->receiver, receiver->sender). Every record is
sealed with the session's cipher with nonce = the record's counter in that direction (never reused:
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
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3, ChaCha20Poly1305
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
MAX_CIPHERS = 8  # entries in a hello's cipher list
MAX_CIPHER_NAME = 32
MAX_SPEED = 10_000_000  # MB/s: 10 TB/s, far above any CPU; figures are clamped into [1, MAX_SPEED]
SPEED_TEST_BYTES = 256 << 10  # a quarter record: short enough to slip between a neighbour's bursts
SPEED_TEST_ROUNDS = 8  # best of, per operation and cipher

HELLO = Schema(
    "lane-hello",
    3,
    max_size=4096,
    fields=(
        Field("nonce", bytes, exact_len=32),
        Field("kx", bytes, exact_len=32),
        Field("addrs", list, max_len=16, item=list),
        Field("ciphers", list, max_len=MAX_CIPHERS, item=list),
    ),
)

# Record ciphers by name. All are AEADs with 256-bit keys, 96-bit nonces and 128-bit tags, so
# records have the same layout under each. Which is fastest depends on the CPU (GCM with VAES and
# VPCLMULQDQ, OCB3 on plain AES-NI, ChaCha20-Poly1305 without AES instructions), so the session
# picks by measurement (choose_cipher); this order only breaks nothing: names sort ties.
CIPHERS: dict[str, Any] = {
    "aes-256-gcm": AESGCM,
    "aes-256-ocb3": AESOCB3,
    "chacha20-poly1305": ChaCha20Poly1305,
}


class CipherSpeed(NamedTuple):
    """One side's measured speed of one record cipher, in MB/s (10**6 bytes a second).

    Example::

        CipherSpeed("aes-256-gcm", seal=9900, open=9800).slowest   # 9800
    """

    name: str
    seal: int
    open: int

    @property
    def slowest(self) -> int:
        """The lower of the two figures."""
        return min(self.seal, self.open)


@dataclass(frozen=True)
class CipherChoice:
    """The cipher a session agreed on: ``name``, ``mbps`` (the slowest of both sides' seal and open
    figures for it) and ``why`` (one line naming the figures and the runner-up).

    Example::

        choice = choose_cipher(ours, theirs)
        print(choice.name, choice.why)
    """

    name: str
    mbps: int
    why: str


@functools.cache
def available_ciphers() -> tuple[str, ...]:
    """The record ciphers this process can use (in :data:`CIPHERS` order; speed decides, not this).

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
    """Validate a local list of cipher names to offer (raises LocalProtocolError)."""
    names = tuple(ciphers)
    usable = available_ciphers()
    if not names or len(set(names)) != len(names) or any(n not in usable for n in names):
        raise LocalProtocolError(f"lane ciphers must be distinct names from {usable}, got {names!r}")
    return names


def _clamp_speed(nbytes: int, seconds: float) -> int:
    return max(1, min(MAX_SPEED, int(nbytes / max(seconds, 1e-9) / 1e6)))


def measure_ciphers(
    names: Sequence[str], *, nbytes: int = SPEED_TEST_BYTES, rounds: int = SPEED_TEST_ROUNDS
) -> tuple[CipherSpeed, ...]:
    """Measure this process's seal and open speed of each cipher in ``names`` on ``nbytes``
    records: best of ``rounds`` after one warm-up, the ciphers taking turns within each round,
    so that a burst of load from other processes lands on every cipher alike rather than on
    all of one cipher's tries (seen: a GCM figure halved by a neighbour's burst, which chose
    OCB3 for one session). In :data:`CIPHERS` order (rank them with :func:`rank_speeds`).

    Example::

        measure_ciphers(["aes-256-gcm"])[0].seal      # e.g. 9900 (MB/s)
    """
    aeads = [_aead(name, bytes(32)) for name in names]
    plain = bytes(nbytes)
    sealed = bytearray(nbytes + TAG_SIZE)
    opened = bytearray(nbytes)
    aad = bytes(HEADER_SIZE)
    best_seal = [float("inf")] * len(names)
    best_open = [float("inf")] * len(names)
    clock = time.perf_counter
    for i in range(rounds + 1):
        nonce = i.to_bytes(12, "big")
        for k, aead in enumerate(aeads):
            t0 = clock()
            aead.encrypt_into(nonce, plain, aad, sealed)
            t1 = clock()
            aead.decrypt_into(nonce, sealed, aad, opened)
            t2 = clock()
            if i:  # the first round warms caches and OpenSSL's tables
                best_seal[k] = min(best_seal[k], t1 - t0)
                best_open[k] = min(best_open[k], t2 - t1)
    return tuple(
        CipherSpeed(name, _clamp_speed(nbytes, best_seal[k]), _clamp_speed(nbytes, best_open[k]))
        for k, name in enumerate(names)
    )


@functools.cache
def cipher_speeds() -> tuple[CipherSpeed, ...]:
    """This process's measured speed of every cipher it has, fastest first (measured once, cached).

    Takes about 3 ms on first call (:func:`measure_ciphers`). Example::

        for s in cipher_speeds():
            print(s.name, s.seal, s.open)     # MB/s
    """
    return rank_speeds(measure_ciphers(available_ciphers()))


def rank_speeds(speeds: Iterable[CipherSpeed]) -> tuple[CipherSpeed, ...]:
    """``speeds`` fastest first (by the slower of seal and open; ties by name).

    Example::

        rank_speeds([CipherSpeed("b", 5, 5), CipherSpeed("a", 9, 4)])[0].name    # "b"
    """
    return tuple(sorted(speeds, key=lambda s: (-s.slowest, s.name)))


def choose_cipher(a: Sequence[CipherSpeed], b: Sequence[CipherSpeed]) -> CipherChoice | None:
    """The cipher two sides should use, from their advertised lists (sans-IO; symmetric in ``a``, ``b``).

    Of the names both list, the one whose slowest figure (either side's seal or open: a session
    carries transfers both ways) is highest; ties go to the name that sorts first. ``None`` when
    they share no cipher. Example::

        ours = [CipherSpeed("aes-256-gcm", 9900, 9800), CipherSpeed("aes-256-ocb3", 6200, 6100)]
        theirs = [CipherSpeed("aes-256-ocb3", 4300, 4200), CipherSpeed("aes-256-gcm", 2600, 2500)]
        choose_cipher(ours, theirs).name      # "aes-256-ocb3": 4200 beats 2500
    """
    theirs = {s.name: s for s in b}
    scored = sorted(
        ((min(s.slowest, theirs[s.name].slowest), s.name, s, theirs[s.name]) for s in a if s.name in theirs),
        key=lambda t: (-t[0], t[1]),
    )
    if not scored:
        return None
    mbps, name, x, y = scored[0]
    slow, fast = sorted(((x.slowest, x.seal, x.open), (y.slowest, y.seal, y.open)))  # same on both sides
    why = f"{name}: slowest side {mbps} MB/s (seal/open {slow[1]}/{slow[2]} and {fast[1]}/{fast[2]})"
    if len(scored) > 1:
        why += f"; next {scored[1][1]} at {scored[1][0]} MB/s"
    return CipherChoice(name, mbps, why)


def parse_cipher_list(raw: list[Any], *, peer: str | None) -> tuple[CipherSpeed, ...]:
    """Strictly check a hello's ``ciphers`` list (``[[name, seal, open], ...]``; raises MalformedMessage).

    Names this process does not know are kept (a newer peer may offer more); they never match.
    Example::

        parse_cipher_list([["aes-256-gcm", 9900, 9800]], peer=peer_id)
    """
    if not raw:
        raise MalformedMessage("lane-hello: empty cipher list", peer=peer)
    out: list[CipherSpeed] = []
    for i, item in enumerate(raw):
        if (
            len(item) != 3
            or not isinstance(item[0], str)
            or not 0 < len(item[0]) <= MAX_CIPHER_NAME
            or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SPEED for v in item[1:])
        ):
            raise MalformedMessage(
                f"lane-hello: cipher entry {i} is not [name, seal MB/s, open MB/s]", peer=peer
            )
        out.append(CipherSpeed(item[0], item[1], item[2]))
    if len({s.name for s in out}) != len(out):
        raise MalformedMessage("lane-hello: a cipher is listed twice", peer=peer)
    return tuple(out)


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
    cipher_why: str = ""  # the figures that chose it (CipherChoice.why)


class Handshake:
    """One side of the lane session handshake.

    Example::

        a = Handshake(initiator=True, local_id="A", remote_id="B", addrs=[("127.0.0.1", 4000)])
        b = Handshake(initiator=False, local_id="B", remote_id="A", addrs=[])
        keys_b = b.finish(a.hello)          # bytes received from A
        keys_a = a.finish(b.hello)
        assert keys_a.send_base == keys_b.recv_base and keys_a.cipher == keys_b.cipher

    ``ciphers`` limits the names offered (default: every one this process has); ``speeds``
    replaces the measured figures (:func:`cipher_speeds`) for those names (tests, or a host
    that knows better).
    """

    def __init__(
        self,
        *,
        initiator: bool,
        local_id: str,
        remote_id: str,
        addrs: list[tuple[str, int]],
        ciphers: tuple[str, ...] | None = None,
        speeds: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.initiator = initiator
        self.local_id = local_id
        self.remote_id = remote_id
        offered = available_ciphers() if ciphers is None else check_ciphers(ciphers)
        if speeds is None:
            measured = {s.name: s for s in cipher_speeds()}
            self.speeds = rank_speeds(measured[n] for n in offered)
        else:
            if any(n not in speeds for n in offered):
                raise LocalProtocolError(f"speeds must give (seal, open) MB/s for each of {offered}")
            self.speeds = rank_speeds(
                CipherSpeed(n, *(max(1, min(MAX_SPEED, int(v))) for v in speeds[n])) for n in offered
            )
        self.ciphers = tuple(s.name for s in self.speeds)  # fastest first
        self._secret = X25519PrivateKey.generate()
        kx = self._secret.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._nonce = os.urandom(32)
        self.hello = HELLO.build(
            nonce=self._nonce, kx=kx, addrs=[[h, p] for h, p in addrs], ciphers=[list(s) for s in self.speeds]
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
        theirs = parse_cipher_list(msg["ciphers"], peer=peer)
        choice = choose_cipher(self.speeds, theirs)  # ours holds only names we know
        if choice is None:
            raise MalformedMessage(
                f"lane-hello: no record cipher in common (ours {list(self.ciphers)}, "
                f"theirs {[s.name for s in theirs]})",
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
            b"p2pcompute-lane-v3"
            + _lp(ids[0].encode())
            + _lp(ids[1].encode())
            + _lp(hellos[0])
            + _lp(hellos[1])
            + _lp(choice.name.encode())
        ).digest()
        okm = HKDF(
            algorithm=hashes.SHA256(), length=80, salt=transcript, info=b"p2pcompute lane session keys"
        ).derive(shared + nonces[0] + nonces[1])
        i2r, r2i, sid = okm[:32], okm[32:64], okm[64:80]
        send, recv = (i2r, r2i) if self.initiator else (r2i, i2r)
        return SessionKeys(sid, send, recv, tuple(addrs), choice.name, choice.why)


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

    __slots__ = ("_aead", "_count", "_key", "cipher")

    def __init__(self, key: bytes, cipher: str) -> None:
        self._aead = _aead(cipher, key)
        self._key = key
        self.cipher = cipher
        self._count = 0

    def reserve(self, n: int) -> int:
        """Take the next ``n`` record counters (for records sealed out of order by
        :meth:`fork` copies with ``counter=``); return the first.

        Example::

            first = sealer.reserve(len(plans))   # record i is sealed with counter=first + i
        """
        first = self._count
        if first + n > MAX_RECORDS_PER_KEY:
            raise LocalProtocolError("too many records under one transfer key")
        self._count += n
        return first

    def fork(self) -> RecordSealer:
        """Another sealer of the same key for another thread (its own AEAD context); use it only
        with ``counter=`` values from :meth:`reserve`."""
        return RecordSealer(self._key, self.cipher)

    def seal_into(self, kind: int, plaintext: Any, out: memoryview, counter: int | None = None) -> int:
        """Write header + sealed ``plaintext`` into ``out``; return the bytes written.

        ``counter``: a counter taken with :meth:`reserve` (default: the next one)."""
        n = len(plaintext)
        total = HEADER_SIZE + n + TAG_SIZE
        header = HEADER.pack(kind, n + TAG_SIZE)
        out[:HEADER_SIZE] = header
        if counter is None:
            if self._count >= MAX_RECORDS_PER_KEY:
                raise LocalProtocolError("too many records under one transfer key")
            counter = self._count
            self._count += 1
        self._aead.encrypt_into(counter.to_bytes(12, "big"), plaintext, header, out[HEADER_SIZE:total])
        return total

    def seal(self, kind: int, plaintext: bytes) -> bytes:
        """Seal a small (control) record into new bytes."""
        out = bytearray(HEADER_SIZE + len(plaintext) + TAG_SIZE)
        self.seal_into(kind, plaintext, memoryview(out))
        return bytes(out)


class RecordOpener:
    """Opens the records of one direction of one transfer, in order; raises IntegrityError."""

    __slots__ = ("_aead", "_count", "_key", "cipher", "peer")

    def __init__(self, key: bytes, cipher: str, *, peer: str | None) -> None:
        self._aead = _aead(cipher, key)
        self._key = key
        self.cipher = cipher
        self._count = 0
        self.peer = peer

    def reserve(self, n: int) -> int:
        """Take the next ``n`` record counters (records opened by :meth:`fork` copies with
        ``counter=``); return the first. Example::

            first = opener.reserve(len(plans))   # record i opens with counter=first + i
        """
        first = self._count
        self._count += n
        return first

    def fork(self) -> RecordOpener:
        """Another opener of the same key for another thread; use it only with ``counter=``."""
        return RecordOpener(self._key, self.cipher, peer=self.peer)

    def open_into(
        self,
        header: bytes | bytearray | memoryview,
        body: memoryview | bytearray,
        out: Any,
        counter: int | None = None,
    ) -> None:
        """Authenticate and decrypt ``body`` (ciphertext + tag) into ``out`` (len(body) - 16 bytes).

        ``counter``: a counter taken with :meth:`reserve` (default: the next one)."""
        if counter is None:
            counter = self._count
            self._count += 1
        try:
            self._aead.decrypt_into(counter.to_bytes(12, "big"), body, bytes(header), out)
        except InvalidTag:
            raise IntegrityError(
                f"lane record {counter} failed authentication (corrupt, reordered or forged)",
                peer=self.peer,
            ) from None

    def open(self, header: bytes | bytearray | memoryview, body: memoryview | bytearray) -> bytes:
        """Open a small (control) record into new bytes."""
        out = bytearray(len(body) - TAG_SIZE)
        self.open_into(header, body, out)
        return bytes(out)
