"""State download for elastic join: a sans-IO core and a thin trio driver over node streams.

A peer that holds the training state serves a *snapshot* of it (the safe format of
:mod:`p2pcompute.training.state`, cut into fixed-size chunks). A joiner asks every peer it
knows for the snapshot's *manifest*: the outer step, the state digest, the state header
and the SHA-256 of every chunk, in an Ed25519-signed envelope (kind ``training-state``)
that must be signed by the peer serving it. The joiner picks one (step, digest) and
downloads its chunks from all the peers that vouch for it at once, checking every chunk
against the manifest as it arrives and the whole state against the digest at the end.
A peer that sends a bad chunk is blamed (:class:`~p2pcompute.errors.IntegrityError`
naming it) and dropped; its chunks are fetched from the others.

Choice of manifest (:meth:`StateDownload.choose`): among (step, digest) pairs vouched
for by at least ``min_agree`` distinct peers, the highest step, then the most vouchers,
then the smallest digest (so every joiner decides the same way).

Wire (protocol :data:`PROTOCOL`, one request per stream, frames capped):

* ``state-req`` v1 ``{what: "manifest"}`` -> one frame: the signed manifest envelope;
* ``state-req`` v1 ``{what: "chunk", digest, index}`` -> ``state-chunk`` v1
  ``{index, ok}`` then, when ``ok``, one raw frame of exactly the chunk's length.

Imports :mod:`p2pcompute.training.state`, :mod:`p2pcompute.wire`, :mod:`p2pcompute.overlay`
(driver only), errors, trio and hashlib.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.deadlines import deadline
from p2pcompute.errors import (
    ConfigError,
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    P2PComputeError,
    PeerGone,
    PeerUnreachable,
    RemoteProtocolError,
)
from p2pcompute.progress import Progress, ProgressFn, log_progress
from p2pcompute.training.state import MAX_HEADER, StateHeader, TrainingState, parse_header
from p2pcompute.wire.codec import Field, Schema, decode, encode
from p2pcompute.wire.signing import Signer, open_signed, seal_signed

if TYPE_CHECKING:
    from p2pcompute.overlay import FramedStream, Node

PROTOCOL = "/p2pcompute/training/state/1.0.0"
MANIFEST_KIND = "training-state"
DEFAULT_CHUNK = 512 << 10
MIN_CHUNK = 1 << 10
MAX_CHUNK = 1 << 19
MAX_CHUNKS = 1 << 16
MAX_MANIFEST = MAX_HEADER + 32 * MAX_CHUNKS + 4096
DEFAULT_MAX_STATE = 16 << 30

MANIFEST = Schema(
    "state-manifest",
    1,
    max_size=MAX_MANIFEST,
    fields=(
        Field("step", int, min=0),
        Field("digest", bytes, exact_len=32),
        Field("header", bytes, max_len=MAX_HEADER),
        Field("chunk_size", int, min=MIN_CHUNK, max=MAX_CHUNK),
        Field("chunks", list, max_len=MAX_CHUNKS, item=bytes),
    ),
)
REQUEST = Schema(
    "state-req",
    1,
    max_size=256,
    fields=(
        Field("what", str, max_len=16),
        Field("digest", bytes, optional=True, exact_len=32),
        Field("index", int, optional=True, min=0, max=MAX_CHUNKS),
    ),
)
CHUNK_HEAD = Schema(
    "state-chunk", 1, max_size=128, fields=(Field("index", int, min=0, max=MAX_CHUNKS), Field("ok", bool))
)
#: The answer to a manifest request from a peer that holds no state yet.
STATE_NONE = Schema("state-none", 1, max_size=32, fields=())


@dataclass(frozen=True)
class Manifest:
    """A validated description of one served snapshot."""

    step: int
    digest: bytes
    header_bytes: bytes
    header: StateHeader
    chunk_size: int
    chunk_digests: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return self.header.size

    def chunk_span(self, index: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``index`` within the state body."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def to_body(self) -> bytes:
        return MANIFEST.build(
            step=self.step, digest=self.digest, header=self.header_bytes, chunk_size=self.chunk_size,
            chunks=list(self.chunk_digests),
        )

    @classmethod
    def from_body(cls, body: Any, *, peer: str | None) -> Manifest:
        msg = MANIFEST.validate(body, peer=peer)
        header = parse_header(decode(msg["header"], max_size=MAX_HEADER, peer=peer), peer=peer)
        if header.digest != msg["digest"] or header.step != msg["step"]:
            raise MalformedMessage("manifest disagrees with its own header", peer=peer)
        expected = math.ceil(header.size / msg["chunk_size"])
        if len(msg["chunks"]) != expected or any(len(c) != 32 for c in msg["chunks"]):
            raise MalformedMessage(
                f"manifest lists {len(msg['chunks'])} chunks, expected {expected}", peer=peer
            )
        return cls(msg["step"], msg["digest"], msg["header"], header, msg["chunk_size"], tuple(msg["chunks"]))


@dataclass
class Snapshot:
    """What a serving peer holds: the state's raw body and its manifest.

    Example::

        snap = Snapshot.of(opt.export_state())
        data = snap.chunk(0)
    """

    manifest: Manifest
    body: bytes

    @classmethod
    def of(cls, state: TrainingState, *, chunk_size: int = DEFAULT_CHUNK) -> Snapshot:
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise ConfigError(f"chunk_size must be within {MIN_CHUNK}..{MAX_CHUNK}")
        blob = state.to_bytes()
        header_obj = state.header()
        header_bytes = encode(header_obj)
        body = blob[len(blob) - header_obj["size"] :]
        n = math.ceil(len(body) / chunk_size)
        if n > MAX_CHUNKS:
            raise ConfigError(f"state of {len(body)} bytes needs over {MAX_CHUNKS} chunks; raise chunk_size")
        digests = tuple(
            hashlib.sha256(body[i * chunk_size : (i + 1) * chunk_size]).digest() for i in range(n)
        )
        header = parse_header(header_obj)
        return cls(Manifest(state.step, header.digest, header_bytes, header, chunk_size, digests), body)

    def chunk(self, index: int) -> bytes:
        start, end = self.manifest.chunk_span(index)
        return self.body[start:end]


@dataclass
class DownloadReport:
    """Where the state came from: chunks per source peer, peers blamed, bytes and time."""

    step: int
    digest: bytes
    bytes: int
    seconds: float
    sources: dict[str, int] = field(default_factory=dict)
    blamed: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class StateDownload:
    """Sans-IO bookkeeping of one multi-source state download.

    Feed it manifests (:meth:`offer`), :meth:`choose`, then loop: ask :meth:`next_requests`
    which (peer, chunk) pairs to fetch, report each chunk with :meth:`chunk_received` or
    :meth:`request_failed`, until :attr:`done`; :meth:`result` gives the verified state.

    Example::

        dl = StateDownload(min_agree=1)
        for peer, m in manifests: dl.offer(peer, m)
        dl.choose()
        while not dl.done:
            for peer, index in dl.next_requests(): ...   # fetch, then chunk_received(...)
        state = dl.result()
    """

    def __init__(self, *, min_agree: int = 1, inflight_per_peer: int = 2, max_bytes: int = DEFAULT_MAX_STATE):
        if min_agree < 1 or inflight_per_peer < 1:
            raise ConfigError("min_agree and inflight_per_peer must be at least 1")
        self.min_agree = min_agree
        self.inflight_per_peer = inflight_per_peer
        self.max_bytes = max_bytes
        self.offers: dict[str, Manifest] = {}
        self.manifest: Manifest | None = None
        self.sources: list[str] = []
        self._buf = bytearray()
        self._missing: list[int] = []
        self._have: set[int] = set()
        self._inflight: dict[str, set[int]] = {}
        self.served: dict[str, int] = {}
        self.blamed: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def offer(self, peer: str, manifest: Manifest) -> None:
        """Record ``peer``'s manifest (one per peer; a later one replaces an earlier one)."""
        if self.manifest is not None:
            raise LocalProtocolError("offers are closed once a manifest is chosen")
        self.offers[peer] = manifest

    def choose(self) -> Manifest:
        """Pick the manifest to download; :class:`PeerUnreachable` when no candidate qualifies."""
        if self.manifest is not None:
            return self.manifest
        votes: dict[tuple[int, bytes], list[str]] = {}
        for peer, m in self.offers.items():
            votes.setdefault((m.step, m.digest), []).append(peer)
        ok = [(key, peers) for key, peers in votes.items() if len(peers) >= self.min_agree]
        if not ok:
            raise PeerUnreachable(
                f"no training state vouched for by {self.min_agree} peer(s) among {len(self.offers)} offers"
            )
        _key, peers = max(ok, key=lambda kv: (kv[0][0], len(kv[1]), [-b for b in kv[0][1]]))
        # Peers agreeing on (step, digest) must also agree on the layout they will serve.
        ref = self.offers[sorted(peers)[0]]
        same = sorted(p for p in peers if self.offers[p].chunk_digests == ref.chunk_digests
                      and self.offers[p].chunk_size == ref.chunk_size)
        if ref.size > self.max_bytes:
            raise ConfigError(f"training state of {ref.size} bytes exceeds the local cap of {self.max_bytes}")
        self.manifest = ref
        self.sources = same
        self._buf = bytearray(ref.size)
        self._missing = list(range(len(ref.chunk_digests)))
        self._inflight = {p: set() for p in same}
        return ref

    @property
    def done(self) -> bool:
        return self.manifest is not None and len(self._have) == len(self.manifest.chunk_digests)

    @property
    def stuck(self) -> bool:
        """No source is left and chunks are still missing."""
        return self.manifest is not None and not self.done and not self.sources

    def next_requests(self) -> list[tuple[str, int]]:
        """(peer, chunk) pairs to request now, spread over the sources; marks them in flight."""
        if self.manifest is None:
            raise LocalProtocolError("choose() first")
        out: list[tuple[str, int]] = []
        progress = True
        while self._missing and progress:
            progress = False
            for peer in sorted(self.sources, key=lambda p: len(self._inflight[p])):
                if not self._missing:
                    break
                if len(self._inflight[peer]) < self.inflight_per_peer:
                    index = self._missing.pop(0)
                    self._inflight[peer].add(index)
                    out.append((peer, index))
                    progress = True
        return out

    def chunk_received(self, peer: str, index: int, data: bytes | bytearray | memoryview) -> None:
        """Verify and store a chunk; a bad one blames ``peer`` (raises :class:`IntegrityError`)."""
        m = self.manifest
        if m is None or index not in self._inflight.get(peer, set()):
            raise IntegrityError(f"unrequested chunk {index}", peer=peer)
        self._inflight[peer].discard(index)
        start, end = m.chunk_span(index)
        if len(data) != end - start or hashlib.sha256(data).digest() != m.chunk_digests[index]:
            self._missing.insert(0, index)
            self._drop(peer, f"chunk {index} does not match the manifest")
            self.blamed[peer] = f"chunk {index} does not match the manifest"
            raise IntegrityError(f"training state chunk {index} does not match the manifest", peer=peer)
        self._buf[start:end] = data
        self._have.add(index)
        self.served[peer] = self.served.get(peer, 0) + 1

    def request_failed(self, peer: str, index: int, reason: str) -> None:
        """``peer`` could not deliver ``index`` (gone, timed out, no longer has it): drop it as a source."""
        if index in self._inflight.get(peer, set()):
            self._inflight[peer].discard(index)
            if index not in self._have:
                self._missing.insert(0, index)
        self._drop(peer, reason)
        self.failed.setdefault(peer, reason)

    def _drop(self, peer: str, reason: str) -> None:
        if peer in self.sources:
            self.sources.remove(peer)
        for index in self._inflight.pop(peer, set()):
            if index not in self._have:
                self._missing.insert(0, index)

    def result(self) -> TrainingState:
        """The downloaded state, after checking its digest (:class:`IntegrityError` otherwise)."""
        m = self.manifest
        if m is None or not self.done:
            raise LocalProtocolError("the download is not finished")
        state = m.header.assemble(self._buf)
        if state.digest() != m.digest:
            raise IntegrityError("downloaded training state does not match its digest")
        return state


# ----------------------------------------------------------------------------- trio driver


class StateServer:
    """Serves the latest published snapshot on :data:`PROTOCOL` through a node.

    Example::

        server = StateServer(node, identity)
        server.publish(opt.export_state())     # after every outer step
    """

    def __init__(self, node: Node, signer: Signer, *, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.node = node
        self.signer = signer
        self.chunk_size = chunk_size
        self.snapshot: Snapshot | None = None
        self._envelope = b""
        self.served_chunks = 0
        #: manifest requests answered with a state (joiners and partners looking at our step)
        self.served_manifests = 0
        node.set_stream_handler(PROTOCOL, self._handle, max_frame=MAX_MANIFEST)

    def publish(self, state: TrainingState) -> Manifest:
        """Replace the served snapshot (older snapshots stop being served at once).

        Serializes and hashes the whole state on the calling thread: from trio code use
        :meth:`apublish`, which does that work in a worker thread.
        """
        return self._install(*self._prepare(state))

    async def apublish(self, state: TrainingState) -> Manifest:
        """:meth:`publish` without blocking the event loop (the state is serialized and hashed in a thread).

        ``state`` must not change until this returns (:meth:`DiLoCo.export_state` gives copies).

        Example::

            await server.apublish(opt.export_state())
        """
        return self._install(*await trio.to_thread.run_sync(self._prepare, state))

    def _prepare(self, state: TrainingState) -> tuple[Snapshot, bytes]:
        snap = Snapshot.of(state, chunk_size=self.chunk_size)
        return snap, seal_signed(MANIFEST_KIND, snap.manifest.to_body(), self.signer)

    def _install(self, snap: Snapshot, envelope: bytes) -> Manifest:
        self._envelope = envelope
        self.snapshot = snap
        return snap.manifest

    async def _handle(self, stream: FramedStream) -> None:
        req = await stream.recv_msg(REQUEST)
        snap = self.snapshot
        if req["what"] == "manifest":
            if snap is None:
                await stream.send_frame(STATE_NONE.build())
                return
            await stream.send_frame(self._envelope)
            self.served_manifests += 1
        elif req["what"] == "chunk":
            index = req["index"]
            if index is None or req["digest"] is None:
                raise MalformedMessage("chunk request without index or digest", peer=stream.peer)
            known = snap is not None and snap.manifest.digest == req["digest"]
            if snap is None or not known or index >= len(snap.manifest.chunk_digests):
                await stream.send_frame(CHUNK_HEAD.build(index=index, ok=False))
                return
            await stream.send_frame(CHUNK_HEAD.build(index=index, ok=True))
            await stream.send_frame(snap.chunk(index))
            self.served_chunks += 1
        else:
            raise MalformedMessage(f"unknown state request {req['what']!r}", peer=stream.peer)


async def fetch_manifest(node: Node, peer: str, *, timeout: float) -> Manifest | None:
    """Ask ``peer`` for its manifest; ``None`` when it has no state. Checks the signature and signer.

    Raises :class:`PeerTimeout` (never ``trio.TooSlowError``), :class:`PeerUnreachable`,
    :class:`PeerGone` or :class:`RemoteProtocolError` naming ``peer``.

    Example::

        manifest = await fetch_manifest(node, peer, timeout=5.0)
    """
    with deadline(timeout, "the state manifest request", peer=peer):
        stream = await node.open_stream(peer, PROTOCOL, timeout=timeout, max_frame=MAX_MANIFEST)
        try:
            await stream.send_frame(REQUEST.build(what="manifest"))
            raw = await stream.recv_frame(MAX_MANIFEST)
        finally:
            await stream.close()
    obj = decode(raw, max_size=MAX_MANIFEST, peer=peer)
    if isinstance(obj, dict) and obj.get("t") == STATE_NONE.type:
        STATE_NONE.validate(obj, peer=peer)
        return None
    msg = open_signed(raw, kind=MANIFEST_KIND, max_size=MAX_MANIFEST, peer=peer, expected_signer=peer)
    return Manifest.from_body(msg.body, peer=peer)


async def _fetch_chunk(node: Node, peer: str, digest: bytes, index: int, size: int, timeout: float) -> bytes:
    with deadline(timeout, f"state chunk {index}", peer=peer):
        stream = await node.open_stream(peer, PROTOCOL, timeout=timeout)
        try:
            await stream.send_frame(REQUEST.build(what="chunk", digest=digest, index=index))
            head = await stream.recv_msg(CHUNK_HEAD)
            if head["index"] != index:
                raise IntegrityError(f"asked for chunk {index}, got {head['index']}", peer=peer)
            if not head["ok"]:
                raise PeerGone(f"{peer} no longer serves that state", peer=peer)
            return await stream.recv_frame(size)
        finally:
            await stream.close()


async def download_state(
    node: Node,
    peers: Sequence[str],
    *,
    timeout: float = 60.0,
    request_timeout: float = 10.0,
    min_agree: int = 1,
    inflight_per_peer: int = 2,
    max_bytes: int = DEFAULT_MAX_STATE,
    progress: ProgressFn | None = None,
) -> tuple[TrainingState, DownloadReport]:
    """Download the training state from ``peers`` (all at once), verified chunk by chunk.

    ``progress`` gets a :class:`~p2pcompute.progress.ProgressUpdate` (bytes verified of the
    state's size) after each chunk; without it, plain INFO lines on the ``p2pcompute.progress``
    logger (:func:`~p2pcompute.progress.log_progress`).

    Raises :class:`PeerUnreachable` when no peer offers a qualifying state,
    :class:`IntegrityError` when every source failed or sent bad data,
    :class:`PeerTimeout` when the whole download takes longer than ``timeout``.

    Example::

        state, report = await download_state(node, [p.peer_id for p in node.peers.alive()],
                                             progress=progress_renderer())
        opt.load_state(state)
    """
    start = time.perf_counter()
    dl = StateDownload(min_agree=min_agree, inflight_per_peer=inflight_per_peer, max_bytes=max_bytes)
    with deadline(timeout, "the state download"):

        async def ask(peer: str) -> None:
            try:
                m = await fetch_manifest(node, peer, timeout=request_timeout)
            except P2PComputeError as exc:
                dl.failed[peer] = f"manifest: {type(exc).__name__}: {exc}"
                if isinstance(exc, RemoteProtocolError):
                    dl.blamed[peer] = str(exc)
                return
            if m is not None:
                dl.offer(peer, m)

        async with trio.open_nursery() as nursery:
            for p in dict.fromkeys(peers):
                nursery.start_soon(ask, p)
        manifest = dl.choose()
        report_to = progress or log_progress()
        shown = Progress("state download", total=manifest.size, unit="B", on_update=report_to)

        async def get(peer: str, index: int, wake: trio.MemorySendChannel[None]) -> None:
            s, e = manifest.chunk_span(index)
            try:
                data = await _fetch_chunk(node, peer, manifest.digest, index, e - s, request_timeout)
            except RemoteProtocolError as exc:
                dl.request_failed(peer, index, str(exc))
                dl.blamed[peer] = str(exc)
            except P2PComputeError as exc:
                dl.request_failed(peer, index, f"{type(exc).__name__}: {exc}")
            else:
                # A bad chunk is recorded in dl.blamed and goes back to the queue.
                with contextlib.suppress(IntegrityError):
                    dl.chunk_received(peer, index, data)
                    shown.advance(e - s)
            await wake.send(None)

        send, recv = trio.open_memory_channel[None](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                outstanding = 0
                while not dl.done:
                    for peer, index in dl.next_requests():
                        outstanding += 1
                        nursery.start_soon(get, peer, index, send)
                    if dl.stuck and outstanding == 0:
                        break
                    if outstanding == 0:
                        break
                    await recv.receive()
                    outstanding -= 1
        finally:
            shown.finish(ok=dl.done)
    if not dl.done:
        raise IntegrityError(f"state download failed: every source failed ({dl.failed})")
    state = dl.result()
    report = DownloadReport(
        manifest.step, manifest.digest, manifest.size, time.perf_counter() - start, dict(dl.served),
        dict(dl.blamed), dict(dl.failed),
    )
    return state, report
