"""Inbound transfers: authentication of incoming connections and the parking lot.

An incoming connection (direct TCP from the lane's listener, or an overlay stream on the relay
protocol) must name a known session and send an OPEN record that authenticates under fresh
transfer keys within ``auth_timeout``; anything else is dropped without a word. An
authenticated transfer is *parked*, its connection left unread, until a local ``receive``
claims it (or ``hold_timeout`` passes). A full lot (``max_parked`` in all,
``max_parked_per_peer`` per sender) refuses the transfer as busy: an ACK with ``busy`` that the
sender raises as :class:`~p2pcompute.errors.ResourceLimitExceeded`, blaming nobody.

Imports trio, :mod:`p2pcompute.wire`, :mod:`p2pcompute.deadlines`, :mod:`p2pcompute.errors`
and the lane's connections and sessions; never py-libp2p.
"""

from __future__ import annotations

import collections
import logging
import os
import socket as _stdsocket
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pcompute.deadlines import deadline, give_up_after
from p2pcompute.errors import PeerGone, PeerTimeout, ProtocolError
from p2pcompute.overlay.streams import FramedStream
from p2pcompute.tensors.conns import Conn, StreamConn, TcpConn, read_record
from p2pcompute.tensors.sessions import Sessions
from p2pcompute.wire.lanekeys import (
    CHALLENGE_SIZE,
    MAGIC,
    PREAMBLE_SIZE,
    RecordOpener,
    RecordSealer,
    transfer_keys,
)
from p2pcompute.wire.shards import ACK, KIND_ACK, KIND_OPEN, MAX_CONTROL_BODY, Manifest, parse_manifest

log = logging.getLogger(__name__)

PROTO_DATA = "/p2pcompute/lane-data/1.0.0"


@dataclass(eq=False)
class Incoming:
    """One authenticated inbound transfer: who sends what, on which connection, with which keys.

    Example::

        incoming = await inbox.claim(peer_id, "grads/3")
        incoming.manifest.total_bytes, incoming.path        # (4096, "direct")
    """

    peer: str
    manifest: Manifest
    conn: Conn
    opener: RecordOpener
    sealer: RecordSealer
    path: str
    claimed: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class InboundCounters:
    """What the parking lot counts (copied into :class:`~p2pcompute.tensors.lane.LaneStatistics`).

    Example::

        inbox.counters.refused_busy     # transfers refused because too many waited unclaimed
    """

    rejected_connections: int = 0
    refused_busy: int = 0
    expired_unclaimed: int = 0


async def refuse(incoming: Incoming, reason: str, *, timeout: float, busy: bool = False) -> None:
    """Tell the sender, best effort within ``timeout``, that its transfer is refused (``busy``: we are full).

    Example::

        await refuse(incoming, "shapes do not match", timeout=10)
    """
    fields: dict[str, Any] = {"ok": False, "error": reason[:1000]}
    if busy:
        fields["busy"] = True
    with give_up_after(timeout), suppress(PeerGone, PeerTimeout):
        await incoming.conn.send_all(incoming.sealer.seal(KIND_ACK, ACK.build(**fields)))


class Inbox:
    """Authenticates incoming transfers and parks them until claimed; runs in the lane's nursery.

    Example::

        inbox = Inbox(sessions, stall_timeout=30, auth_timeout=10, hold_timeout=60,
                      max_transfer_bytes=1 << 30, max_parked=64, max_parked_per_peer=16,
                      max_pending_auth=64)
        nursery.start_soon(inbox.accept_loop, listener)
        node.set_stream_handler(PROTO_DATA, inbox.serve_relay)
        incoming = await inbox.claim(peer_id, "grads/3")
    """

    def __init__(
        self,
        sessions: Sessions,
        *,
        stall_timeout: float,
        auth_timeout: float,
        hold_timeout: float,
        max_transfer_bytes: int,
        max_parked: int,
        max_parked_per_peer: int,
        max_pending_auth: int,
    ) -> None:
        self.sessions = sessions
        self.stall_timeout = stall_timeout
        self.auth_timeout = auth_timeout
        self.hold_timeout = hold_timeout
        self.max_transfer_bytes = max_transfer_bytes
        self.max_parked = max_parked
        self.max_parked_per_peer = max_parked_per_peer
        self.max_pending_auth = max_pending_auth
        self.counters = InboundCounters()
        self.parked: dict[tuple[str, str], collections.deque[Incoming]] = {}
        self.arrivals: dict[tuple[str, str], trio.Event] = {}
        self.pending_auth = 0
        self.nursery: trio.Nursery | None = None
        self.closed = False

    def parked_count(self) -> int:
        """How many authenticated transfers wait to be claimed."""
        return sum(len(q) for q in self.parked.values())

    # -- connections in ---------------------------------------------------------------------------

    async def accept_loop(self, listener: trio.socket.SocketType) -> None:
        """Accept direct data connections forever (bounded by ``max_pending_auth`` unauthenticated)."""
        assert self.nursery is not None
        with listener:
            while True:
                try:
                    sock, _addr = await listener.accept()
                except OSError as exc:
                    log.warning("lane accept failed: %r", exc)
                    await trio.sleep(0.1)
                    continue
                if self.pending_auth >= self.max_pending_auth:
                    self.counters.rejected_connections += 1
                    sock.close()
                    continue
                sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
                conn = TcpConn(sock, peer=None, stall=self.stall_timeout)
                self.nursery.start_soon(self.serve, conn, "direct", None)

    async def serve_relay(self, stream: FramedStream) -> None:
        """The :data:`PROTO_DATA` handler: serve the stream as a transfer, in the lane's nursery.

        Returns when the transfer is over (the node closes the stream then).
        """
        conn = StreamConn(stream, stall=self.stall_timeout)
        nursery = self.nursery
        if self.closed or nursery is None:
            await conn.aclose()
            return
        finished = trio.Event()

        async def serve() -> None:
            try:
                await self.serve(conn, "relay", stream.peer)
            finally:
                finished.set()

        nursery.start_soon(serve)
        await finished.wait()

    async def authenticate(self, conn: Conn, expected_peer: str | None) -> Incoming | None:
        """Read the preamble and OPEN; None when the session is unknown or belongs to someone else."""
        preamble = bytearray(PREAMBLE_SIZE)
        await conn.recv_exactly_into(memoryview(preamble))
        if bytes(preamble[: len(MAGIC)]) != MAGIC:
            return None
        session = self.sessions.find(bytes(preamble[len(MAGIC) :]))
        if session is None or (expected_peer is not None and session.peer != expected_peer):
            return None
        conn.peer = session.peer
        challenge = os.urandom(CHALLENGE_SIZE)
        await conn.send_all(challenge)
        s2r, r2s = transfer_keys(session.keys.recv_base, challenge)
        cipher = session.keys.cipher
        opener = RecordOpener(s2r, cipher, peer=session.peer)
        _, header, body = await read_record(conn, (KIND_OPEN,), MAX_CONTROL_BODY)
        manifest = parse_manifest(
            opener.open(header, body), peer=session.peer, max_bytes=self.max_transfer_bytes
        )
        return Incoming(session.peer, manifest, conn, opener, RecordSealer(r2s, cipher), "direct")

    async def serve(self, conn: Conn, path: str, expected_peer: str | None) -> None:
        """Authenticate one incoming transfer, park it until claimed, keep the connection until done."""
        incoming: Incoming | None = None
        key: tuple[str, str] | None = None
        self.pending_auth += 1
        try:
            try:
                with give_up_after(self.auth_timeout):
                    incoming = await self.authenticate(conn, expected_peer)
            finally:
                self.pending_auth -= 1
            if incoming is None:
                self.counters.rejected_connections += 1
                return
            incoming.path = path
            key = (incoming.peer, incoming.manifest.tag)
            if self._full(incoming.peer):
                log.warning("lane: too many unclaimed transfers; refusing one from %s", incoming.peer)
                self.counters.refused_busy += 1
                await refuse(incoming, "too many unclaimed transfers", timeout=self.auth_timeout, busy=True)
                return
            self.parked.setdefault(key, collections.deque()).append(incoming)
            arrival = self.arrivals.pop(key, None)
            if arrival is not None:
                arrival.set()
            with give_up_after(self.hold_timeout):
                await incoming.claimed.wait()
            if not incoming.claimed.is_set():
                self.counters.expired_unclaimed += 1
                log.info("lane: transfer %r from %s was not claimed in time", key[1], key[0])
                return
            await incoming.done.wait()
        except (ProtocolError, PeerGone, PeerTimeout) as exc:
            self.counters.rejected_connections += 1
            log.info("lane: inbound connection dropped: %r", exc)
        finally:
            if incoming is not None and key is not None:
                queue = self.parked.get(key)
                if queue is not None and incoming in queue:
                    queue.remove(incoming)
                    if not queue:
                        del self.parked[key]
            with trio.CancelScope(shield=True):
                await conn.aclose()

    def _full(self, peer: str) -> bool:
        parked_peer = sum(len(q) for (p, _), q in self.parked.items() if p == peer)
        return self.parked_count() >= self.max_parked or parked_peer >= self.max_parked_per_peer

    # -- claims -----------------------------------------------------------------------------------

    async def claim(self, peer: str, tag: str) -> Incoming:
        """Take the oldest parked transfer ``tag`` from ``peer``, waiting for one to arrive."""
        key = (peer, tag)
        while True:
            queue = self.parked.get(key)
            if queue:
                incoming = queue.popleft()
                if not queue:
                    del self.parked[key]
                incoming.claimed.set()
                return incoming
            await self._await_arrival(key)

    async def wait_for_arrival(self, peer: str, tag: str, *, timeout: float) -> None:
        """Wait (at most ``timeout`` s, then :class:`PeerTimeout`) until ``tag`` from ``peer`` is parked."""
        key = (peer, tag)
        with deadline(timeout, f"waiting for transfer {tag!r}", peer=peer):
            while not self.parked.get(key):
                await self._await_arrival(key)

    async def _await_arrival(self, key: tuple[str, str]) -> None:
        """Wait until a transfer for ``key`` is parked. The event is shared by every waiter on
        ``key``; the last waiter to give up (timeout, cancellation) removes it, so receivers
        that wait for peers who never send leave nothing behind."""
        event = self.arrivals.get(key)
        if event is None:
            event = self.arrivals[key] = trio.Event()
        try:
            await event.wait()
        finally:
            if self.arrivals.get(key) is event and not event.statistics().tasks_waiting:
                del self.arrivals[key]


__all__ = ["PROTO_DATA", "InboundCounters", "Inbox", "Incoming", "refuse"]
