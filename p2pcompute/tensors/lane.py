"""The tensor data lane: encrypted, verified tensor transfers between two peers.

Control (the session key agreement) runs over an authenticated py-libp2p stream;
bulk payload goes over a direct TCP connection per transfer, in AES-256-OCB3 (or -GCM)
records of up to 1 MiB that are sealed from and opened straight into tensor
memory. When no direct connection can be made, the same bytes travel over a
py-libp2p stream instead ("relay" path). See docs/design/data-plane.md for the
design and docs/protocol/tensors.md for the wire format.

One transfer, sender S and receiver R (all records sealed, see :mod:`p2pcompute.wire.lanekeys`)::

    S -> R   MAGIC | session id                      (plaintext; R drops unknown ids silently)
    R -> S   32-byte challenge                       (fresh; gives fresh transfer keys)
    S -> R   OPEN {tag, shards, record size}         (R authenticates S here, or drops it)
             ... R parks the connection unread until ``receive(S, tag)`` claims it ...
    R -> S   GO  (or ACK{ok: false} to refuse)
    S -> R   DATA * n, then END {records, total, digests}
    R -> S   ACK {ok}

This module owns the trio drivers; framing, keys and codecs live in
:mod:`p2pcompute.wire.shards`, :mod:`p2pcompute.wire.lanekeys` and
:mod:`p2pcompute.tensors.codecs`. It imports :mod:`p2pcompute.wire`,
:mod:`p2pcompute.errors`, :mod:`p2pcompute.identity`, :mod:`p2pcompute.overlay.streams`,
torch, trio and py-libp2p.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import socket as _stdsocket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio

from p2pcompute.errors import (
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    P2PComputeError,
    PeerGone,
    PeerTimeout,
    PeerUnreachable,
    ProtocolError,
    RemoteProtocolError,
    ResourceLimitExceeded,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay.streams import FramedStream
from p2pcompute.tensors import codecs
from p2pcompute.tensors.staging import Stager
from p2pcompute.wire.lanekeys import (
    CHALLENGE_SIZE,
    HELLO,
    MAGIC,
    PREAMBLE_SIZE,
    Handshake,
    RecordOpener,
    RecordSealer,
    SessionKeys,
    available_ciphers,
    check_ciphers,
    sealed_size,
    transfer_keys,
)
from p2pcompute.wire.shards import (
    ACK,
    DEFAULT_RECORD_SIZE,
    DIGESTS,
    END,
    GO,
    HEADER,
    HEADER_SIZE,
    KIND_ACK,
    KIND_DATA,
    KIND_END,
    KIND_GO,
    KIND_OPEN,
    MAX_CONTROL_BODY,
    MAX_RECORD_SIZE,
    MIN_RECORD_SIZE,
    TAG_SIZE,
    Manifest,
    RecordPlan,
    ShardSpec,
    effective_codec,
    parse_header,
    parse_manifest,
    plan_records,
)

log = logging.getLogger(__name__)

PROTO_SESSION = "/p2pcompute/lane/1.0.0"
PROTO_DATA = "/p2pcompute/lane-data/1.0.0"

OnChunk = Callable[[str, int, torch.Tensor], Any]


@dataclass(frozen=True)
class TransferReport:
    """What one transfer moved: encoded payload ``bytes``, wall ``seconds``, ``path`` ("direct"/"relay"),
    and the record ``cipher`` the two lanes agreed on."""

    bytes: int
    seconds: float
    path: str
    records: int = 0
    cipher: str = ""


@dataclass
class LaneStatistics:
    """Counters of a lane (see :meth:`TensorLane.statistics`)."""

    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    sessions: int = 0
    parked: int = 0
    rejected_connections: int = 0
    refused_busy: int = 0
    expired_unclaimed: int = 0
    relay_transfers: int = 0


# --- byte connections ---------------------------------------------------------------------------------


class _Conn(Protocol):
    peer: str | None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def recv_exactly_into(self, buf: memoryview, *, stall: float | None = None) -> None: ...

    async def aclose(self) -> None: ...


class _TcpConn:
    """A trio TCP socket with exact reads into caller buffers and a per-call stall timeout."""

    __slots__ = ("peer", "sock", "stall")

    def __init__(self, sock: trio.socket.SocketType, *, peer: str | None, stall: float) -> None:
        self.sock = sock
        self.peer = peer
        self.stall = stall

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        with trio.move_on_after(self.stall) as scope:
            try:
                while view:
                    sent = await self.sock.send(view)
                    view = view[sent:]
            except OSError as exc:
                raise PeerGone(f"data connection to {self.peer} failed: {exc}") from None
        if scope.cancelled_caught:
            raise PeerTimeout(f"{self.peer} stopped reading for {self.stall} s")

    async def recv_exactly_into(self, buf: memoryview, *, stall: float | None = None) -> None:
        need = len(buf)
        got = 0
        limit = self.stall if stall is None else stall
        with trio.move_on_after(limit) as scope:
            try:
                while got < need:
                    n = await self.sock.recv_into(buf[got:], need - got)
                    if n == 0:
                        raise PeerGone(f"data connection from {self.peer} closed mid-transfer")
                    got += n
            except OSError as exc:
                raise PeerGone(f"data connection from {self.peer} failed: {exc}") from None
        if scope.cancelled_caught:
            raise PeerTimeout(f"{self.peer} sent nothing for {limit} s")

    async def aclose(self) -> None:
        self.sock.close()

    async def run_blocking(
        self, fn: Callable[[_stdsocket.socket], Any], limiter: trio.CapacityLimiter
    ) -> Any:
        """Run ``fn(sock)`` in a worker thread on a blocking twin of this connection.

        The bulk of a transfer moves this way: one tight loop of seal-and-send (or
        receive-and-open) per record, with no event-loop round trip per record, which
        measured about 1.5x the throughput of the same loop on trio's non-blocking socket
        (docs/design/data-plane.md). The twin shares the connection and keeps the stall
        timeout per call (``socket.timeout`` becomes :class:`PeerTimeout`, other OS errors
        :class:`PeerGone`). Cancelling the caller shuts the connection down, which ends the
        thread's loop at once; the transfer is then over for both sides. ``limiter`` is the
        lane's own (not trio's default of 40 threads): a thread that waits on a slow peer
        must not hold back a transfer that would unblock it.

        When this returns or raises, cancellation included, ``fn`` has stopped: the caller may
        reuse every buffer it handed over (a cancelled call waits for the thread to notice the
        shut connection, which takes at most one record's work).
        """
        twin = _stdsocket.socket(fileno=os.dup(self.sock.fileno()))
        twin.settimeout(self.stall)  # poll()-based waits; the shared descriptor stays non-blocking

        owner = threading.Lock()  # whoever takes it closes the twin: the thread, or we if it never ran
        finished = threading.Event()

        def body() -> Any:
            if not owner.acquire(blocking=False):
                raise PeerGone("transfer cancelled before it started")  # nobody waits for this
            try:
                return fn(twin)
            except TimeoutError:
                raise PeerTimeout(f"{self.peer} stalled for {self.stall} s") from None
            except OSError as exc:
                raise PeerGone(f"data connection with {self.peer} failed: {exc}") from None
            finally:
                twin.close()  # here, not in the caller: a cancelled caller must not close under us
                finished.set()

        try:
            # (mypy misreads run_sync's keyword-only arguments after *args: Unpack[Ts])
            return await trio.to_thread.run_sync(  # type: ignore[call-arg]
                lambda: _in_worker(body), abandon_on_cancel=True, limiter=limiter
            )
        except trio.Cancelled:
            with suppress(OSError):
                # abort, not a polite close: shutdown(SHUT_RD) discards what the peer already
                # sent, so a plain close would send FIN while our window stays shut, and a
                # sender blocked on it would wait for its stall timeout (seen: 30 s) instead
                # of getting a reset at once. Linger 0 makes the last close send RST.
                twin.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
                twin.shutdown(_stdsocket.SHUT_RDWR)
            if owner.acquire(blocking=False):  # cancelled before the thread started
                twin.close()
            elif not finished.wait(_DRAIN_TIMEOUT):
                # the thread owns buffers of the caller's; it should have seen the shutdown within
                # one record's work. Say so rather than hang the event loop on it.
                log.warning("lane: a cancelled transfer with %s is still running after %.1f s",
                            self.peer, _DRAIN_TIMEOUT)
            raise


class _StreamConn:
    """The same byte interface over a py-libp2p stream (the relay fallback).

    The byte I/O and its error translation are :class:`FramedStream`'s; this adds the
    stall timeouts the direct connection has.
    """

    def __init__(self, stream: Any, *, peer: str | None, stall: float) -> None:
        self.stream = FramedStream(stream, peer=peer)
        self.peer = peer
        self.stall = stall

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with trio.move_on_after(self.stall) as scope:
            await self.stream.write_raw(data)
        if scope.cancelled_caught:
            raise PeerTimeout(f"{self.peer} stopped reading for {self.stall} s")

    async def recv_exactly_into(self, buf: memoryview, *, stall: float | None = None) -> None:
        limit = self.stall if stall is None else stall
        with trio.move_on_after(limit) as scope:
            await self.stream.read_exactly_into(buf)
        if scope.cancelled_caught:
            raise PeerTimeout(f"{self.peer} sent nothing for {limit} s")

    async def aclose(self) -> None:
        await self.stream.reset()


# --- sessions and parked transfers ------------------------------------------------------------------


class _StaleSession(Exception):
    """The receiver closed the connection instead of sending a challenge: it does not know the session."""


@dataclass(eq=False)
class _Session:
    peer: str
    keys: SessionKeys


@dataclass(eq=False)
class _Incoming:
    peer: str
    manifest: Manifest
    conn: _Conn
    opener: RecordOpener
    sealer: RecordSealer
    path: str
    claimed: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


async def _read_record(
    conn: _Conn, kinds: tuple[int, ...], max_body: int, *, first_stall: float | None = None
) -> tuple[int, bytes, bytearray]:
    """Read one whole record; ``first_stall`` allows a longer wait for its header (the claim wait)."""
    header = bytearray(HEADER_SIZE)
    await conn.recv_exactly_into(memoryview(header), stall=first_stall)
    kind, length = HEADER.unpack(header)
    if kind not in kinds:
        raise MalformedMessage(f"lane record of kind {kind}, expected one of {kinds}", peer=conn.peer)
    if length < TAG_SIZE or length > max_body:
        raise MalformedMessage(f"lane record body of {length} bytes (cap {max_body})", peer=conn.peer)
    body = bytearray(length)
    await conn.recv_exactly_into(memoryview(body))
    return kind, bytes(header), body


@contextmanager
def _deadline(timeout: float | None, what: str) -> Any:
    if timeout is None:
        yield
        return
    with trio.move_on_after(timeout) as scope:
        yield
    if scope.cancelled_caught:
        raise PeerTimeout(f"{what} did not finish within {timeout} s")


def _peer_of_stream(stream: Any) -> str:
    return str(stream.muxed_conn.peer_id)


class TensorLane:
    """Sends and receives named groups of tensors to and from peers; create with :func:`open_lane`.

    Example::

        async with open_lane(host, identity) as lane:
            report = await lane.send(peer_id, "grads/7", {"w": w, "b": b}, codec="bf16")
            got = await lane.receive(peer_id, "params/7")      # {"w": tensor, ...}
    """

    def __init__(
        self,
        host: Any,
        identity: Identity,
        *,
        bind: str | None = None,
        ciphers: tuple[str, ...] | None = None,
        direct: bool = True,
        advertise: list[tuple[str, int]] | None = None,
        record_size: int = DEFAULT_RECORD_SIZE,
        stall_timeout: float = 30.0,
        auth_timeout: float = 10.0,
        hold_timeout: float = 60.0,
        claim_timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_transfer_bytes: int = 64 << 30,
        max_parked: int = 64,
        max_parked_per_peer: int = 16,
        max_pending_auth: int = 64,
        force_staging: bool = False,
    ) -> None:
        self.ciphers = available_ciphers() if ciphers is None else check_ciphers(ciphers)
        if not MIN_RECORD_SIZE <= record_size <= MAX_RECORD_SIZE:
            raise LocalProtocolError(f"record_size must be in [{MIN_RECORD_SIZE}, {MAX_RECORD_SIZE}]")
        _USER_THREADS[0] = torch.get_num_threads()  # the user's thread: what workers restore
        self.host = host
        self.identity = identity
        self.peer_id = identity.peer_id
        self.bind = bind
        self.direct = direct
        self.advertise = advertise
        self.record_size = record_size
        self.stall_timeout = stall_timeout
        self.auth_timeout = auth_timeout
        self.hold_timeout = hold_timeout
        self.claim_timeout = claim_timeout
        self.connect_timeout = connect_timeout
        self.max_transfer_bytes = max_transfer_bytes
        self.max_parked = max_parked
        self.max_parked_per_peer = max_parked_per_peer
        self.max_pending_auth = max_pending_auth
        self.force_staging = force_staging
        self.data_addrs: list[tuple[str, int]] = []
        self._stats = LaneStatistics()
        self._by_id: dict[bytes, _Session] = {}
        self._by_peer: dict[str, collections.deque[_Session]] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._inbox: dict[tuple[str, str], collections.deque[_Incoming]] = {}
        self._arrivals: dict[tuple[str, str], trio.Event] = {}
        # bulk loops (one per direct transfer) block on their peers; bounded by max_parked, sessions
        self._bulk_threads = trio.CapacityLimiter(1024)
        self._pending_auth = 0
        self._nursery: trio.Nursery | None = None
        self._listener: trio.socket.SocketType | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------

    async def _run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if self.bind is None:
            self.bind = self._bind_like_host()
        if self.direct:
            listener = trio.socket.socket(_stdsocket.AF_INET6 if ":" in self.bind else _stdsocket.AF_INET)
            listener.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
            await listener.bind((self.bind, 0))
            listener.listen(128)
            self._listener = listener
            port = listener.getsockname()[1]
            self.data_addrs = self.advertise if self.advertise is not None else self._guess_addrs(port)
            nursery.start_soon(self._accept_loop, listener)
        elif self.advertise is not None:
            self.data_addrs = list(self.advertise)
        self.host.set_stream_handler(PROTO_SESSION, self._on_session_stream)
        self.host.set_stream_handler(PROTO_DATA, self._on_data_stream)

    def _host_ips(self) -> list[str]:
        hosts: list[str] = []
        for addr in self.host.get_addrs():
            parts = str(addr).split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in hosts:
                hosts.append(parts[2])
        return hosts

    def _bind_like_host(self) -> str:
        """Default ``bind``: where the libp2p host listens (one IP: that one; several: all)."""
        ips = self._host_ips()
        if len(ips) == 1:
            return ips[0]
        return "0.0.0.0" if ips else "127.0.0.1"

    def _guess_addrs(self, port: int) -> list[tuple[str, int]]:
        assert self.bind is not None
        if self.bind not in ("0.0.0.0", "::"):
            return [(self.bind, port)]
        hosts = [h for h in self._host_ips() if h not in ("0.0.0.0", "::")]
        return [(h, port) for h in hosts] or [("127.0.0.1", port)]

    async def _close(self) -> None:
        self._closed = True
        for proto in (PROTO_SESSION, PROTO_DATA):
            try:
                self.host.remove_stream_handler(proto)
            except Exception:  # an already stopped host has nothing to remove
                log.debug("removing %s handler failed", proto, exc_info=True)

    def statistics(self) -> LaneStatistics:
        """Counters: transfers, bytes, sessions, parked and rejected connections."""
        self._stats.sessions = len(self._by_id)
        self._stats.parked = sum(len(q) for q in self._inbox.values())
        return LaneStatistics(**vars(self._stats))

    # -- sessions -------------------------------------------------------------------------------------

    def _register(self, peer: str, keys: SessionKeys) -> None:
        session = _Session(peer, keys)
        queue = self._by_peer.setdefault(peer, collections.deque())
        queue.append(session)
        self._by_id[keys.session_id] = session
        while len(queue) > 4:
            old = queue.popleft()
            self._by_id.pop(old.keys.session_id, None)

    def _forget(self, session: _Session) -> None:
        self._by_id.pop(session.keys.session_id, None)
        queue = self._by_peer.get(session.peer)
        if queue is not None and session in queue:
            queue.remove(session)
            if not queue:
                del self._by_peer[session.peer]

    async def _session(self, peer: str) -> _Session:
        queue = self._by_peer.get(peer)
        if queue:
            return queue[-1]
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:
            queue = self._by_peer.get(peer)
            if queue:
                return queue[-1]
            from libp2p.peer.id import ID

            try:
                with trio.fail_after(self.connect_timeout):
                    raw = await self.host.new_stream(ID.from_base58(peer), [PROTO_SESSION])
            except trio.TooSlowError:
                raise PeerUnreachable(f"no lane session with {peer}: timed out") from None
            except Exception as exc:
                if isinstance(exc, P2PComputeError | trio.Cancelled):
                    raise
                raise PeerUnreachable(f"no lane session with {peer}: {exc!r}") from None
            stream = FramedStream(raw, peer=peer, max_frame=HELLO.max_size)
            try:
                shake = Handshake(
                    initiator=True,
                    local_id=self.peer_id,
                    remote_id=peer,
                    addrs=list(self.data_addrs),
                    ciphers=self.ciphers,
                )
                with trio.fail_after(self.auth_timeout):
                    await stream.send_frame(shake.hello)
                    keys = shake.finish(await stream.recv_frame(HELLO.max_size))
            except trio.TooSlowError:
                raise PeerTimeout(f"lane handshake with {peer} timed out") from None
            finally:
                await stream.close()
            self._register(peer, keys)
            return self._by_peer[peer][-1]

    async def _on_session_stream(self, raw: Any) -> None:
        peer = _peer_of_stream(raw)
        stream = FramedStream(raw, peer=peer, max_frame=HELLO.max_size)
        try:
            with trio.fail_after(self.auth_timeout):
                hello = await stream.recv_frame(HELLO.max_size)
                shake = Handshake(
                    initiator=False,
                    local_id=self.peer_id,
                    remote_id=peer,
                    addrs=list(self.data_addrs),
                    ciphers=self.ciphers,
                )
                keys = shake.finish(hello)
                await stream.send_frame(shake.hello)
            if not self._closed:
                self._register(peer, keys)
        except (ProtocolError, PeerGone, trio.TooSlowError) as exc:
            log.info("lane handshake from %s failed: %r", peer, exc)
        finally:
            await stream.close()

    # -- inbound --------------------------------------------------------------------------------------

    async def _accept_loop(self, listener: trio.socket.SocketType) -> None:
        assert self._nursery is not None
        with listener:
            while True:
                try:
                    sock, _addr = await listener.accept()
                except OSError as exc:
                    log.warning("lane accept failed: %r", exc)
                    await trio.sleep(0.1)
                    continue
                if self._pending_auth >= self.max_pending_auth:
                    self._stats.rejected_connections += 1
                    sock.close()
                    continue
                sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
                self._nursery.start_soon(
                    self._serve_inbound, _TcpConn(sock, peer=None, stall=self.stall_timeout), "direct", None
                )

    async def _on_data_stream(self, raw: Any) -> None:
        peer = _peer_of_stream(raw)
        conn = _StreamConn(raw, peer=peer, stall=self.stall_timeout)
        nursery = self._nursery
        if self._closed or nursery is None:
            await conn.aclose()
            return
        finished = trio.Event()

        async def serve() -> None:
            try:
                await self._serve_inbound(conn, "relay", peer)
            finally:
                finished.set()

        nursery.start_soon(serve)
        await finished.wait()

    async def _authenticate(self, conn: _Conn, expected_peer: str | None) -> _Incoming | None:
        preamble = bytearray(PREAMBLE_SIZE)
        await conn.recv_exactly_into(memoryview(preamble))
        if bytes(preamble[: len(MAGIC)]) != MAGIC:
            return None
        session = self._by_id.get(bytes(preamble[len(MAGIC) :]))
        if session is None or (expected_peer is not None and session.peer != expected_peer):
            return None
        conn.peer = session.peer
        challenge = os.urandom(CHALLENGE_SIZE)
        await conn.send_all(challenge)
        s2r, r2s = transfer_keys(session.keys.recv_base, challenge)
        cipher = session.keys.cipher
        opener = RecordOpener(s2r, cipher, peer=session.peer)
        _, header, body = await _read_record(conn, (KIND_OPEN,), MAX_CONTROL_BODY)
        manifest = parse_manifest(
            opener.open(header, body), peer=session.peer, max_bytes=self.max_transfer_bytes
        )
        return _Incoming(session.peer, manifest, conn, opener, RecordSealer(r2s, cipher), "direct")

    async def _serve_inbound(self, conn: _Conn, path: str, expected_peer: str | None) -> None:
        """Authenticate one incoming transfer, park it until claimed, keep the connection until done."""
        incoming: _Incoming | None = None
        key: tuple[str, str] | None = None
        self._pending_auth += 1
        try:
            try:
                with trio.move_on_after(self.auth_timeout):
                    incoming = await self._authenticate(conn, expected_peer)
            finally:
                self._pending_auth -= 1
            if incoming is None:
                self._stats.rejected_connections += 1
                return
            incoming.path = path
            key = (incoming.peer, incoming.manifest.tag)
            parked_total = sum(len(q) for q in self._inbox.values())
            parked_peer = sum(len(q) for (p, _), q in self._inbox.items() if p == incoming.peer)
            if parked_total >= self.max_parked or parked_peer >= self.max_parked_per_peer:
                log.warning("lane: too many unclaimed transfers; refusing one from %s", incoming.peer)
                self._stats.refused_busy += 1
                await self._refuse(incoming, "too many unclaimed transfers", busy=True)
                return
            self._inbox.setdefault(key, collections.deque()).append(incoming)
            arrival = self._arrivals.pop(key, None)
            if arrival is not None:
                arrival.set()
            with trio.move_on_after(self.hold_timeout):
                await incoming.claimed.wait()
            if not incoming.claimed.is_set():
                self._stats.expired_unclaimed += 1
                log.info("lane: transfer %r from %s was not claimed in time", key[1], key[0])
                return
            await incoming.done.wait()
        except (ProtocolError, PeerGone, PeerTimeout) as exc:
            self._stats.rejected_connections += 1
            log.info("lane: inbound connection dropped: %r", exc)
        finally:
            if incoming is not None and key is not None:
                queue = self._inbox.get(key)
                if queue is not None and incoming in queue:
                    queue.remove(incoming)
                    if not queue:
                        del self._inbox[key]
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _refuse(self, incoming: _Incoming, reason: str, *, busy: bool = False) -> None:
        fields: dict[str, Any] = {"ok": False, "error": reason[:1000]}
        if busy:
            fields["busy"] = True
        with trio.move_on_after(self.auth_timeout):
            with suppress(PeerGone, PeerTimeout):
                await incoming.conn.send_all(incoming.sealer.seal(KIND_ACK, ACK.build(**fields)))

    async def _claim(self, peer: str, tag: str) -> _Incoming:
        key = (peer, tag)
        while True:
            queue = self._inbox.get(key)
            if queue:
                incoming = queue.popleft()
                if not queue:
                    del self._inbox[key]
                incoming.claimed.set()
                return incoming
            await self._await_arrival(key)

    async def _await_arrival(self, key: tuple[str, str]) -> None:
        """Wait until a transfer for ``key`` is parked. The event is shared by every waiter on
        ``key``; the last waiter to give up (timeout, cancellation) removes it, so receivers
        that wait for peers who never send leave nothing behind."""
        event = self._arrivals.get(key)
        if event is None:
            event = self._arrivals[key] = trio.Event()
        try:
            await event.wait()
        finally:
            if self._arrivals.get(key) is event and not event.statistics().tasks_waiting:
                del self._arrivals[key]

    # -- public API -----------------------------------------------------------------------------------

    async def wait_for_arrival(self, peer_id: str, tag: str, *, timeout: float) -> None:
        """Wait until a transfer from ``peer_id`` under ``tag`` has arrived and waits to be
        received (it is not claimed: :meth:`receive` still takes it). Raises
        :class:`PeerTimeout` after ``timeout`` seconds.

        Example::

            await lane.wait_for_arrival(peer, "grads/3", timeout=30)
            tensors = await lane.receive(peer, "grads/3")
        """
        key = (peer_id, tag)
        try:
            with trio.fail_after(timeout):
                while not self._inbox.get(key):
                    await self._await_arrival(key)
        except trio.TooSlowError:
            raise PeerTimeout(f"no transfer {tag!r} from {peer_id} within {timeout} s") from None

    async def send(
        self,
        peer_id: str,
        tag: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        codec: str = "none",
        timeout: float | None = None,
        digest: str = "none",
    ) -> TransferReport:
        """Send ``tensors`` to ``peer_id`` under ``tag``; return when the receiver has verified them.

        ``codec`` ("none", "fp16", "bf16", "int8") applies to floating tensors only.
        ``digest="sha256"`` adds an end-to-end SHA-256 per shard on top of the AEAD
        (costs about 1 CPU-s/GB per side). The sender may start before the receiver
        asks; it waits (holding no payload in flight) until the receiver claims the
        transfer. Raises PeerUnreachable, PeerGone, PeerTimeout or RemoteProtocolError.

        Example::

            report = await lane.send(peer, "grads/3", {"w": torch.randn(1024)}, codec="bf16")
            print(report.bytes / report.seconds / 1e9, "GB/s over", report.path)
        """
        if digest not in DIGESTS:
            raise LocalProtocolError(f"unknown digest {digest!r}; choose one of {DIGESTS}")
        specs: list[ShardSpec] = []
        sources: list[torch.Tensor] = []
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise LocalProtocolError("send() takes a mapping of str names to tensors")
            dtype = codecs.dtype_name(tensor.dtype)
            spec = ShardSpec(name, dtype, tuple(tensor.shape), effective_codec(codec, dtype))
            specs.append(spec)
            sources.append(tensor.detach().contiguous().reshape(-1))
        manifest = Manifest(tag, tuple(specs), self.record_size, digest)
        open_body = manifest.build()
        start = time.perf_counter()
        with _deadline(timeout, f"sending {tag!r} to {peer_id}"):
            for attempt in (1, 2):
                session = await self._session(peer_id)
                conn, path = await self._connect(peer_id, session)
                try:
                    report = await self._send_on(conn, session, manifest, open_body, sources)
                    break
                except _StaleSession:
                    # The peer no longer knows this session (it restarted): forget it, shake hands again.
                    self._forget(session)
                    if attempt == 2:
                        raise PeerGone(f"{peer_id} refused the lane session twice") from None
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
        self._stats.sent += 1
        self._stats.bytes_sent += report[0]
        if path == "relay":
            self._stats.relay_transfers += 1
        return TransferReport(
            report[0], time.perf_counter() - start, path, report[1], session.keys.cipher
        )

    async def _connect(self, peer: str, session: _Session) -> tuple[_Conn, str]:
        for host, port in session.keys.peer_addrs if self.direct else ():
            family = _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET
            sock = trio.socket.socket(family)
            try:
                with trio.fail_after(self.connect_timeout):
                    await sock.connect((host, port))
            except (OSError, trio.TooSlowError) as exc:
                sock.close()
                log.info("lane: direct dial to %s at %s:%d failed (%r)", peer, host, port, exc)
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            return _TcpConn(sock, peer=peer, stall=self.stall_timeout), "direct"
        from libp2p.peer.id import ID

        try:
            with trio.fail_after(self.connect_timeout):
                raw = await self.host.new_stream(ID.from_base58(peer), [PROTO_DATA])
        except trio.TooSlowError:
            raise PeerUnreachable(f"no data path to {peer}: timed out") from None
        except Exception as exc:
            if isinstance(exc, P2PComputeError):
                raise
            raise PeerUnreachable(f"no data path to {peer}: {exc!r}") from None
        return _StreamConn(raw, peer=peer, stall=self.stall_timeout), "relay"

    async def _send_on(
        self,
        conn: _Conn,
        session: _Session,
        manifest: Manifest,
        open_body: bytes,
        sources: list[torch.Tensor],
    ) -> tuple[int, int]:
        peer = session.peer
        await conn.send_all(MAGIC + session.keys.session_id)
        challenge = bytearray(CHALLENGE_SIZE)
        try:
            await conn.recv_exactly_into(memoryview(challenge), stall=self.auth_timeout)
        except PeerGone:
            raise _StaleSession from None
        s2r, r2s = transfer_keys(session.keys.send_base, bytes(challenge))
        sealer = RecordSealer(s2r, session.keys.cipher)
        opener = RecordOpener(r2s, session.keys.cipher, peer=peer)
        await conn.send_all(sealer.seal(KIND_OPEN, open_body))
        # Wait (with no payload in flight) until the receiver claims the transfer.
        kind, header, body = await _read_record(
            conn, (KIND_GO, KIND_ACK), ACK.max_size + TAG_SIZE, first_stall=self.claim_timeout
        )
        if kind == KIND_ACK:
            refusal = ACK.parse(opener.open(header, body), peer=peer)
            if refusal.get("busy"):
                # The receiver is full: an honest answer, so nobody is blamed for it.
                raise ResourceLimitExceeded(
                    f"{peer} is full and refused transfer {manifest.tag!r}: {refusal.get('error', '')}",
                    peer=peer,
                )
            raise RemoteProtocolError(f"receiver refused transfer: {refusal['error']}", peer=peer)
        GO.parse(opener.open(header, body), peer=peer)

        record_size = manifest.record_size
        out_views = [memoryview(bytearray(sealed_size(record_size))) for _ in range(2)]
        stager = Stager(sources, manifest.shards, record_size, force_staging=self.force_staging)
        hashers = [hashlib.sha256() for _ in manifest.shards] if manifest.digest == "sha256" else None

        def produce(plan: RecordPlan, slot: int) -> int:
            payload = stager.payload(plan, slot)
            if hashers is not None:
                _hash_pieces(hashers, plan, payload)
            return sealer.seal_into(KIND_DATA, payload, out_views[slot])

        plans = list(plan_records(manifest.shards, record_size))
        if isinstance(conn, _TcpConn) and all(stager.is_direct(p) for p in plans):
            # plain CPU tensors on a direct connection: one blocking loop in a worker thread
            def bulk(sock: _stdsocket.socket) -> tuple[int, int]:
                sent = 0
                view = out_views[0]
                for plan in plans:
                    sock.sendall(view[: produce(plan, 0)])
                    sent += plan.nbytes
                return len(plans), sent

            records, total = await conn.run_blocking(bulk, self._bulk_threads)
        else:
            records, total = await self._send_pipelined(conn, plans, produce, out_views, stager)
        digests = [h.digest() for h in hashers] if hashers is not None else []
        await conn.send_all(sealer.seal(KIND_END, END.build(records=records, total=total, digests=digests)))
        _, header, body = await _read_record(conn, (KIND_ACK,), ACK.max_size + TAG_SIZE)
        ack = ACK.parse(opener.open(header, body), peer=peer)
        if not ack["ok"]:
            raise RemoteProtocolError(f"receiver rejected transfer: {ack['error']}", peer=peer)
        return total, records

    async def _send_pipelined(
        self,
        conn: _Conn,
        plans: list[RecordPlan],
        produce: Callable[[RecordPlan, int], int],
        out_views: list[memoryview],
        stager: Stager,
    ) -> tuple[int, int]:
        records = 0
        total = 0
        # Two slots: record i+1 is staged and sealed in a worker thread while record i is sent.
        free = trio.Semaphore(2)
        ready_in, ready_out = trio.open_memory_channel[tuple[int, int, int]](2)

        async def producer() -> None:
            async with ready_in:
                for index, plan in enumerate(plans):
                    await free.acquire()
                    slot = index % 2
                    heavy = not stager.is_direct(plan)
                    n = await _maybe_in_thread(plan.nbytes, heavy, produce, plan, slot)
                    await ready_in.send((slot, n, plan.nbytes))

        async def writer() -> None:
            nonlocal records, total
            async with ready_out:
                async for slot, n, nbytes in ready_out:
                    await conn.send_all(out_views[slot][:n])
                    free.release()
                    records += 1
                    total += nbytes

        await _run_together(producer, writer)
        return records, total

    async def receive(
        self,
        peer_id: str,
        tag: str,
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        timeout: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Receive the transfer ``peer_id`` sends under ``tag``; return its tensors by name.

        With ``into``, shards land in those tensors (same shape and dtype; any device,
        contiguous or not); other shards are allocated on ``device`` (default CPU).
        No tensor is returned unless every record authenticated, the record count and
        total matched, and (when the sender asked) every SHA-256 digest matched.
        On error the contents of ``into`` are unspecified.

        Example::

            params = await lane.receive(peer, "params/3", into=model.state_dict())
        """
        with _deadline(timeout, f"receiving {tag!r} from {peer_id}"):
            incoming = await self._claim(peer_id, tag)
            try:
                return await self._receive_body(incoming, into, device, None)
            finally:
                incoming.done.set()

    async def receive_chunks(
        self,
        peer_id: str,
        tag: str,
        on_chunk: OnChunk,
        *,
        timeout: float | None = None,
        threaded: bool = False,
    ) -> TransferReport:
        """Receive a transfer as a stream of decoded chunks, for reducers.

        ``on_chunk(name, start_element, values)`` runs for each run of elements in
        order, after its record authenticated; ``values`` is a flat tensor valid only
        during the call (copy it to keep it). It may be a coroutine function. Note that
        chunks are handed out as they arrive: a later failure (IntegrityError, PeerGone,
        PeerTimeout) means the chunks seen so far must be discarded by the caller.

        ``threaded=True`` promises that ``on_chunk`` is a plain function that may run in a
        worker thread (guard state it shares with other threads yourself; reach trio with
        ``TrioToken.run_sync_soon``, never by waiting on the event loop: a cancelled transfer
        holds the loop until its thread has stopped). A direct transfer then runs in the
        lane's blocking loop, receive, open and ``on_chunk`` per record, with no event-loop
        hop. When the call returns or raises, ``on_chunk`` is no longer running.

        Example::

            acc = torch.zeros(n)
            def add(name, start, values):
                acc[start : start + values.numel()] += values
            await lane.receive_chunks(peer, "grads/3", add)
        """
        start = time.perf_counter()
        with _deadline(timeout, f"receiving {tag!r} from {peer_id}"):
            incoming = await self._claim(peer_id, tag)
            try:
                await self._receive_body(incoming, None, None, on_chunk, threaded=threaded)
            finally:
                incoming.done.set()
        return TransferReport(
            incoming.manifest.total_bytes,
            time.perf_counter() - start,
            incoming.path,
            cipher=incoming.opener.cipher,
        )

    async def _receive_body(
        self,
        incoming: _Incoming,
        into: Mapping[str, torch.Tensor] | None,
        device: torch.device | str | None,
        on_chunk: OnChunk | None,
        *,
        threaded: bool = False,
    ) -> dict[str, torch.Tensor]:
        from p2pcompute.tensors.staging import Lander

        manifest = incoming.manifest
        conn = incoming.conn
        peer = incoming.peer
        opener = incoming.opener
        try:
            lander = (
                Lander(manifest.shards, into, device, peer=peer, force_staging=self.force_staging)
                if on_chunk is None
                else None
            )
        except ProtocolError as exc:
            await self._refuse(incoming, str(exc))
            raise
        await conn.send_all(incoming.sealer.seal(KIND_GO, GO.build()))
        record_size = manifest.record_size
        views = [memoryview(bytearray(sealed_size(record_size))) for _ in range(2)]
        if lander is not None:
            plains = lander.buffers(record_size)
        else:
            plains = [torch.empty(record_size, dtype=torch.uint8) for _ in range(2)]
        plain_views = [codecs.byte_memoryview(p) for p in plains]
        hashers = [hashlib.sha256() for _ in manifest.shards] if manifest.digest == "sha256" else None
        header = bytearray(HEADER_SIZE)
        await conn.recv_exactly_into(memoryview(header))

        def open_record(plan: RecordPlan, slot: int, record_header: bytes) -> None:
            body = views[slot][: plan.nbytes + TAG_SIZE]
            target = lander.direct_target(plan) if lander is not None else None
            if target is None:
                target = plain_views[slot][: plan.nbytes]
                opener.open_into(record_header, body, target)
                if lander is not None:
                    lander.scatter(plan, plains[slot])
            else:
                opener.open_into(record_header, body, target)
            if hashers is not None:
                _hash_pieces(hashers, plan, target)

        plans = list(plan_records(manifest.shards, record_size))
        plain_landing = lander is not None and all(lander.direct_target(p) is not None for p in plans)
        if isinstance(conn, _TcpConn) and (plain_landing or (on_chunk is not None and threaded)):
            # plain CPU destinations, or an on_chunk that may run in a worker thread: the whole
            # transfer runs as one blocking loop in a worker thread
            def bulk(sock: _stdsocket.socket) -> tuple[int, int]:
                got_total = 0
                for index, plan in enumerate(plans):
                    body_len = _expect_data(header, index, plan, peer)
                    _recv_exactly(sock, views[0][: body_len + HEADER_SIZE], peer)
                    record_header = bytes(header)
                    header[:] = views[0][body_len : body_len + HEADER_SIZE]
                    open_record(plan, 0, record_header)
                    if on_chunk is not None:
                        for name, start, values in _chunks(manifest, plan, plains[0]):
                            on_chunk(name, start, values)
                    got_total += plan.nbytes
                return len(plans), got_total

            records, total = await conn.run_blocking(bulk, self._bulk_threads)
        else:
            records, total = await self._receive_pipelined(
                conn, plans, header, views, open_record, lander, plains, on_chunk, manifest, peer
            )
        end_len = parse_header(header, expect=KIND_END, max_body=END.max_size + TAG_SIZE, peer=peer)
        end_body = bytearray(end_len)
        await conn.recv_exactly_into(memoryview(end_body))
        end = END.parse(opener.open(header, end_body), peer=peer)
        if end["records"] != records or end["total"] != total:
            raise IntegrityError(
                f"transfer ended after {end['records']} records / {end['total']} bytes; "
                f"received {records} / {total}",
                peer=peer,
            )
        if hashers is not None:
            if len(end["digests"]) != len(hashers):
                raise IntegrityError("wrong number of shard digests", peer=peer)
            for spec, hasher, claimed in zip(manifest.shards, hashers, end["digests"], strict=True):
                if hasher.digest() != claimed:
                    raise IntegrityError(f"shard {spec.name!r}: SHA-256 digest mismatch", peer=peer)
        result = lander.finish() if lander is not None else {}
        await conn.send_all(incoming.sealer.seal(KIND_ACK, ACK.build(ok=True)))
        self._stats.received += 1
        self._stats.bytes_received += total
        if incoming.path == "relay":
            self._stats.relay_transfers += 1
        return result


    async def _receive_pipelined(
        self,
        conn: _Conn,
        plans: list[RecordPlan],
        header: bytearray,
        views: list[memoryview],
        open_record: Callable[[RecordPlan, int, bytes], None],
        lander: Any,
        plains: list[torch.Tensor],
        on_chunk: OnChunk | None,
        manifest: Manifest,
        peer: str,
    ) -> tuple[int, int]:
        records = 0
        total = 0
        # Two slots: record i is opened and landed in a worker thread while record i+1 is received.
        free = trio.Semaphore(2)
        got_in, got_out = trio.open_memory_channel[tuple[RecordPlan, int, bytes]](2)

        async def reader() -> None:
            async with got_in:
                for index, plan in enumerate(plans):
                    body_len = _expect_data(header, index, plan, peer)
                    await free.acquire()
                    slot = index % 2
                    await conn.recv_exactly_into(views[slot][: body_len + HEADER_SIZE])
                    record_header = bytes(header)
                    header[:] = views[slot][body_len : body_len + HEADER_SIZE]
                    await got_in.send((plan, slot, record_header))

        async def landing() -> None:
            nonlocal records, total
            async with got_out:
                async for plan, slot, record_header in got_out:
                    heavy = lander is None or lander.direct_target(plan) is None
                    await _maybe_in_thread(plan.nbytes, heavy, open_record, plan, slot, record_header)
                    if on_chunk is not None:
                        await _deliver_chunks(manifest, plan, plains[slot], on_chunk)
                    free.release()
                    records += 1
                    total += plan.nbytes

        await _run_together(reader, landing)
        return records, total

def _expect_data(header: bytearray, index: int, plan: RecordPlan, peer: str) -> int:
    """Check that ``header`` announces record ``index`` as planned; return its body length."""
    body_len = plan.nbytes + TAG_SIZE
    kind, length = HEADER.unpack(header)
    if kind != KIND_DATA or length != body_len:
        raise IntegrityError(
            f"record {index}: got kind {kind} length {length}, expected data of {body_len}", peer=peer
        )
    return body_len


def _recv_exactly(sock: _stdsocket.socket, buf: memoryview, peer: str) -> None:
    """Blocking: fill ``buf`` from ``sock`` (a worker thread's bulk loop)."""
    got = 0
    need = len(buf)
    while got < need:
        n = sock.recv_into(buf[got:], need - got)
        if n == 0:
            raise PeerGone(f"data connection from {peer} closed mid-transfer")
        got += n


_INLINE_BELOW = 64 << 10


_USER_THREADS = [torch.get_num_threads()]  # the setting the lane leaves behind (see _in_worker)


_DRAIN_TIMEOUT = 2.0  # at most this long a cancelled bulk transfer waits for its thread to stop


def _in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    # torch's intra-op pool spins on small (1 MiB) codec ops and collapses under CPU
    # contention (measured 10-20x slower with 2 threads on a loaded 2-core machine),
    # so the lane's work runs torch single-threaded. torch also takes a thread's setting as
    # the default for threads created afterwards, so after every call it is set back to the
    # user's value, read when the lane opened in the user's thread (not each worker's own
    # "previous" value: concurrent workers would hand 1 to each other); 0.3 us a pair.
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(_USER_THREADS[0])


async def _maybe_in_thread(nbytes: int, heavy: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a record's blocking work in a worker thread when it is large and ``heavy`` (codec or CUDA).

    AEAD alone on a record that is sealed from / opened into tensor memory stays on
    the event loop: the thread hop measured slower there (see docs/design/data-plane.md).
    """
    if nbytes < _INLINE_BELOW or not heavy:
        return fn(*args)
    return await trio.to_thread.run_sync(_in_worker, fn, *args)


async def _run_together(*tasks: Callable[[], Any]) -> None:
    """Run ``tasks`` in a nursery; re-raise a lone error (typed) rather than an ExceptionGroup."""
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        typed = [e for e in errors if isinstance(e, P2PComputeError)]
        if typed:
            raise typed[0] from None
        if len(errors) == 1:
            raise errors[0] from None
        raise


def _hash_pieces(hashers: list[Any], plan: RecordPlan, payload: memoryview) -> None:
    offset = 0
    for piece in plan.pieces:
        hashers[piece.shard].update(payload[offset : offset + piece.nbytes])
        offset += piece.nbytes


def _chunks(
    manifest: Manifest, plan: RecordPlan, plain: torch.Tensor
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """The decoded runs of elements in an opened record: (shard name, first element, values)."""
    offset = 0
    for piece in plan.pieces:
        spec = manifest.shards[piece.shard]
        raw = plain[offset : offset + piece.nbytes]
        offset += piece.nbytes
        dtype = codecs.torch_dtype(spec.dtype)
        if spec.codec == "none" and raw.data_ptr() % max(1, raw.numel() and dtype.itemsize) == 0:
            values = raw.view(dtype)
        else:
            values = codecs.empty((piece.count,), dtype)
            codecs.decode_into(spec.codec, raw if spec.codec != "none" else raw.clone(), values)
        yield spec.name, piece.start, values


async def _deliver_chunks(
    manifest: Manifest, plan: RecordPlan, plain: torch.Tensor, on_chunk: OnChunk
) -> None:
    for name, start, values in _chunks(manifest, plan, plain):
        result = on_chunk(name, start, values)
        if hasattr(result, "__await__"):
            await result


@asynccontextmanager
async def open_lane(
    host: Any,
    identity: Identity,
    *,
    bind: str | None = None,
    ciphers: tuple[str, ...] | None = None,
    **options: Any,
) -> AsyncIterator[TensorLane]:
    """Run a tensor lane on a started py-libp2p ``host`` whose key is ``identity``'s.

    Listens for direct data connections on ``bind`` (port chosen by the OS; by default the IP
    the host listens on, or all interfaces when it listens on several, so peers that can reach
    the host can also reach the lane) and
    registers the lane's libp2p protocols; everything stops on exit. Options:
    ``ciphers=("aes-256-gcm",)`` (record ciphers to offer, in order of preference; default: every
    one this process has, AES-256-OCB3 first), ``direct=False`` (never dial or accept direct TCP:
    relay path only), ``advertise=[(host, port)]``, ``record_size``, ``stall_timeout``, ``hold_timeout``,
    ``claim_timeout``, ``max_transfer_bytes``, ``max_parked`` (see :class:`TensorLane`).

    Example::

        async with host.run(listen_addrs=addrs), open_lane(host, identity) as lane:
            await lane.send(other_peer, "hello", {"x": torch.arange(10)})
    """
    if str(host.get_id()) != identity.peer_id:
        raise LocalProtocolError("the lane's identity must be the host's key (Identity.libp2p_key_pair())")
    lane = TensorLane(host, identity, bind=bind, ciphers=ciphers, **options)
    try:
        async with trio.open_nursery() as nursery:
            await lane._run(nursery)
            try:
                yield lane
            finally:
                await lane._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Only our own cancellation can reach here besides the body's error; unwrap single errors.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


__all__ = [
    "PROTO_DATA",
    "PROTO_SESSION",
    "LaneStatistics",
    "ResourceLimitExceeded",
    "TensorLane",
    "TransferReport",
    "open_lane",
]
