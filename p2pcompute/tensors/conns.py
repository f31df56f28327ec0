"""Byte connections of the tensor lane: a direct TCP socket, or an overlay stream (relay).

Both give the record loops the same small interface (:class:`Conn`): exact reads into the
caller's buffer, whole writes, and a stall timeout per call that raises
:class:`~p2pcompute.errors.PeerTimeout`. A direct connection can also hand its bulk work to a
blocking loop in a worker thread (:meth:`TcpConn.run_blocking`), which the lane uses for
plain CPU tensors: the AEAD releases the GIL, and no event-loop round trip is paid per record.

Imports trio, torch, :mod:`p2pcompute.errors`, :mod:`p2pcompute.deadlines` and
:mod:`p2pcompute.overlay.streams`; never py-libp2p.
"""

from __future__ import annotations

import logging
import os
import socket as _stdsocket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

import torch
import trio

from p2pcompute.deadlines import deadline
from p2pcompute.errors import MalformedMessage, PeerGone, PeerTimeout
from p2pcompute.overlay.streams import FramedStream
from p2pcompute.wire.shards import HEADER, HEADER_SIZE, TAG_SIZE

log = logging.getLogger(__name__)

CONTROL_READ_CHUNK = 64 << 10  # a control record's body is read in pieces of at least this, doubling

DRAIN_TIMEOUT = 2.0  # at most this long a cancelled bulk transfer waits for its thread to stop

USER_THREADS = [torch.get_num_threads()]  # the setting the lane leaves behind (see in_worker)


class Conn(Protocol):
    """What the record loops need of a connection (direct or relay)."""

    peer: str | None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def recv_exactly_into(self, buf: memoryview, *, stall: float | None = None) -> None: ...

    async def aclose(self) -> None: ...


class TcpConn:
    """A trio TCP socket with exact reads into caller buffers and a per-call stall timeout.

    Example::

        conn = TcpConn(sock, peer=peer_id, stall=30.0)
        await conn.send_all(b"hello")
        await conn.recv_exactly_into(memoryview(bytearray(32)))
    """

    __slots__ = ("peer", "sock", "stall")

    def __init__(self, sock: trio.socket.SocketType, *, peer: str | None, stall: float) -> None:
        self.sock = sock
        self.peer = peer
        self.stall = stall

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; :class:`PeerTimeout` when the peer stops reading for ``stall`` s."""
        view = memoryview(data)
        with deadline(self.stall, "a write on the data connection", peer=self.peer):
            try:
                while view:
                    sent = await self.sock.send(view)
                    view = view[sent:]
            except OSError as exc:
                raise PeerGone(f"data connection to {self.peer} failed: {exc}", peer=self.peer) from None

    async def recv_exactly_into(self, buf: memoryview, *, stall: float | None = None) -> None:
        """Fill ``buf``; :class:`PeerGone` when the connection ends first, :class:`PeerTimeout` on a stall."""
        need = len(buf)
        got = 0
        limit = self.stall if stall is None else stall
        with deadline(limit, "a read on the data connection", peer=self.peer):
            try:
                while got < need:
                    n = await self.sock.recv_into(buf[got:], need - got)
                    if n == 0:
                        raise PeerGone(
                            f"data connection from {self.peer} closed mid-transfer", peer=self.peer
                        )
                    got += n
            except OSError as exc:
                raise PeerGone(f"data connection from {self.peer} failed: {exc}", peer=self.peer) from None

    async def aclose(self) -> None:
        """Close the socket."""
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

        Example::

            total = await conn.run_blocking(lambda sock: sock.sendall(payload), limiter)
        """
        twin = _stdsocket.socket(fileno=os.dup(self.sock.fileno()))
        twin.settimeout(self.stall)  # poll()-based waits; the shared descriptor stays non-blocking

        owner = threading.Lock()  # whoever takes it closes the twin: the thread, or we if it never ran
        finished = threading.Event()
        peer = self.peer

        def body() -> Any:
            if not owner.acquire(blocking=False):
                raise PeerGone("transfer cancelled before it started", peer=peer)  # nobody waits for this
            try:
                return fn(twin)
            except TimeoutError:
                raise PeerTimeout(f"{peer} stalled for {self.stall} s", peer=peer) from None
            except OSError as exc:
                raise PeerGone(f"data connection with {peer} failed: {exc}", peer=peer) from None
            finally:
                twin.close()  # here, not in the caller: a cancelled caller must not close under us
                finished.set()

        try:
            # (mypy misreads run_sync's keyword-only arguments after *args: Unpack[Ts])
            return await trio.to_thread.run_sync(  # type: ignore[call-arg]
                lambda: in_worker(body), abandon_on_cancel=True, limiter=limiter
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
            elif not finished.wait(DRAIN_TIMEOUT):
                # the thread owns buffers of the caller's; it should have seen the shutdown within
                # one record's work. Say so rather than hang the event loop on it.
                log.warning("lane: a cancelled transfer with %s is still running after %.1f s",
                            peer, DRAIN_TIMEOUT)
            raise


class StreamConn:
    """The same byte interface over an overlay stream (the relay fallback).

    The byte I/O and its error translation are :class:`FramedStream`'s (its raw bytes, no
    framing); this adds the stall timeouts the direct connection has.

    Example::

        conn = StreamConn(await node.open_stream(peer, PROTO_DATA), stall=30.0)
    """

    def __init__(self, stream: FramedStream, *, stall: float) -> None:
        self.stream = stream
        self.peer = stream.peer
        self.stall = stall

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; :class:`PeerTimeout` when the peer stops reading for ``stall`` s."""
        with deadline(self.stall, "a write on the relay stream", peer=self.peer):
            await self.stream.write_raw(data)

    async def recv_exactly_into(self, buf: memoryview, *, stall: float | None = None) -> None:
        """Fill ``buf``; :class:`PeerGone` when the stream ends first, :class:`PeerTimeout` on a stall."""
        limit = self.stall if stall is None else stall
        with deadline(limit, "a read on the relay stream", peer=self.peer):
            await self.stream.read_exactly_into(buf)

    async def aclose(self) -> None:
        """Abort the stream (a transfer that ends early is over for both sides)."""
        await self.stream.reset()


async def read_record(
    conn: Conn, kinds: tuple[int, ...], max_body: int, *, first_stall: float | None = None
) -> tuple[int, bytes, bytearray]:
    """Read one whole control record; ``first_stall`` allows a longer wait for its header (the claim wait).

    The body is read in pieces (64 KiB, then doubling), so memory follows the bytes received,
    not the length the header claims.

    Example::

        kind, header, body = await read_record(conn, (KIND_ACK,), ACK.max_size + TAG_SIZE)
    """
    header = bytearray(HEADER_SIZE)
    await conn.recv_exactly_into(memoryview(header), stall=first_stall)
    kind, length = HEADER.unpack(header)
    if kind not in kinds:
        raise MalformedMessage(f"lane record of kind {kind}, expected one of {kinds}", peer=conn.peer)
    if length < TAG_SIZE or length > max_body:
        raise MalformedMessage(f"lane record body of {length} bytes (cap {max_body})", peer=conn.peer)
    # Control records only (OPEN may claim up to 8 MiB before it authenticates): the buffer grows
    # with the bytes that arrive, so a stranger's claimed length costs us nothing it did not send.
    body = bytearray()
    while len(body) < length:
        piece = bytearray(min(length - len(body), max(CONTROL_READ_CHUNK, len(body))))
        await conn.recv_exactly_into(memoryview(piece))
        body += piece
    return kind, bytes(header), body


def recv_exactly(sock: _stdsocket.socket, buf: memoryview, peer: str) -> None:
    """Blocking: fill ``buf`` from ``sock`` (a worker thread's bulk loop).

    Example::

        recv_exactly(sock, memoryview(bytearray(5)), peer)
    """
    got = 0
    need = len(buf)
    while got < need:
        n = sock.recv_into(buf[got:], need - got)
        if n == 0:
            raise PeerGone(f"data connection from {peer} closed mid-transfer", peer=peer)
        got += n


def in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` (in a worker thread) with torch single-threaded, then restore the user's setting.

    torch's intra-op pool spins on small (1 MiB) codec ops and collapses under CPU
    contention (measured 10-20x slower with 2 threads on a loaded 2-core machine),
    so the lane's work runs torch single-threaded. torch also takes a thread's setting as
    the default for threads created afterwards, so after every call it is set back to the
    user's value, read when the lane opened in the user's thread (not each worker's own
    "previous" value: concurrent workers would hand 1 to each other); 0.3 us a pair.

    Example::

        await trio.to_thread.run_sync(in_worker, codecs.encode_into, "bf16", src, dst)
    """
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(USER_THREADS[0])


__all__ = ["Conn", "StreamConn", "TcpConn", "in_worker", "read_record", "recv_exactly"]
