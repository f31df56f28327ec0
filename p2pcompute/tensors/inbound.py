"""Inbound transfers: authentication of incoming connections and the parking lot.

An incoming connection (direct TCP from the lane's listener, or an overlay stream on the relay
protocol) must send its preamble (magic and a known session id) within ``preamble_timeout``
and then an OPEN record that authenticates under fresh transfer keys within ``auth_timeout``;
anything else is dropped without a word. Until then it is *pending*: at most
``max_pending_auth`` in all and ``max_pending_auth_per_source`` per source (an IPv4 address,
an IPv6 /64; relay streams count per peer, apart from direct connections), and a connection
over a cap is closed at accept (:class:`~p2pcompute.tensors.limits.Admission`).

An authenticated transfer is *parked*, its connection left unread, until a local ``receive``
claims it (or ``hold_timeout`` passes). The lot (:class:`~p2pcompute.tensors.limits.ParkingLot`)
holds ``max_parked`` in all and ``max_parked_per_peer`` per sender; a full lot evicts the oldest
transfer of the peer holding the most when the newcomer holds fewer, else refuses the newcomer.
Refused and evicted transfers, and those over ``max_transfer_bytes``, get an ACK with ``busy``
that the sender raises as :class:`~p2pcompute.errors.ResourceLimitExceeded`, blaming nobody.

Imports trio, :mod:`p2pcompute.wire`, :mod:`p2pcompute.deadlines`, :mod:`p2pcompute.errors`
and the lane's connections, sessions and limits; never py-libp2p.
"""

from __future__ import annotations

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
from p2pcompute.tensors.limits import Admission, ParkingLot, source_of
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

# parse_manifest's own sanity bound; the lane's max_transfer_bytes is checked after authentication,
# so that a transfer over it is refused as busy (ResourceLimitExceeded) instead of dropped
MANIFEST_SANITY_BYTES = 1 << 62


@dataclass(eq=False)
class Incoming:
    """One authenticated inbound transfer: who sends what, on which connection, with which keys.

    ``decided`` is set when the transfer leaves the lot: ``claimed`` (a receive took it) or
    ``evicted`` (a newcomer needed its place).

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
    decided: trio.Event = field(default_factory=trio.Event)
    evicted: bool = False
    cipher_why: str = ""  # the figures that chose the session's cipher


@dataclass
class InboundCounters:
    """What the inbox counts (copied into :class:`~p2pcompute.tensors.lane.LaneStatistics`).

    Example::

        inbox.counters.refused_busy     # transfers refused because too many waited unclaimed
    """

    rejected_connections: int = 0  # every connection dropped before it authenticated (all reasons)
    dropped_at_accept: int = 0  # ... of which: closed at once, a pending-authentication cap was full
    auth_timeouts: int = 0  # ... of which: no preamble / OPEN in time
    refused_busy: int = 0  # authenticated transfers refused: the lot (or that peer's share) was full
    evicted_unclaimed: int = 0  # parked transfers evicted for a peer that held fewer
    refused_too_large: int = 0  # authenticated transfers over max_transfer_bytes
    expired_unclaimed: int = 0


async def refuse(
    incoming: Incoming, reason: str, *, timeout: float, busy: bool = False, too_large: bool = False
) -> None:
    """Tell the sender, best effort within ``timeout``, that its transfer is refused (``busy``: we are full).

    Example::

        await refuse(incoming, "shapes do not match", timeout=10)
    """
    fields: dict[str, Any] = {"ok": False, "error": reason[:1000]}
    if busy:
        fields["busy"] = True
    if too_large:
        fields["busy"] = fields["too_large"] = True
    with give_up_after(timeout), suppress(PeerGone, PeerTimeout):
        await incoming.conn.send_all(incoming.sealer.seal(KIND_ACK, ACK.build(**fields)))


class Inbox:
    """Authenticates incoming transfers and parks them until claimed; runs in the lane's nursery.

    Example::

        inbox = Inbox(sessions, stall_timeout=30, preamble_timeout=2, auth_timeout=10,
                      hold_timeout=30, max_transfer_bytes=1 << 30, max_parked=64,
                      max_parked_per_peer=8, max_pending_auth=64, max_pending_auth_per_source=8)
        nursery.start_soon(inbox.accept_loop, listener)
        node.set_stream_handler(PROTO_DATA, inbox.serve_relay)
        incoming = await inbox.claim(peer_id, "grads/3")
    """

    def __init__(
        self,
        sessions: Sessions,
        *,
        stall_timeout: float,
        preamble_timeout: float,
        auth_timeout: float,
        hold_timeout: float,
        max_transfer_bytes: int,
        max_parked: int,
        max_parked_per_peer: int,
        max_pending_auth: int,
        max_pending_auth_per_source: int,
    ) -> None:
        self.sessions = sessions
        self.stall_timeout = stall_timeout
        self.preamble_timeout = preamble_timeout
        self.auth_timeout = auth_timeout
        self.hold_timeout = hold_timeout
        self.max_transfer_bytes = max_transfer_bytes
        self.counters = InboundCounters()
        self.lot: ParkingLot[Incoming] = ParkingLot(max_total=max_parked, max_per_peer=max_parked_per_peer)
        # direct connections (strangers) and relay streams (Noise-authenticated peers) have separate
        # queues: a flood of TCP connections must not also close the relay path honest senders fall back to
        caps = {"max_total": max_pending_auth, "max_per_source": max_pending_auth_per_source}
        self.pending_direct = Admission(**caps)
        self.pending_relay = Admission(**caps)
        self.arrivals: dict[tuple[str, str], trio.Event] = {}
        self.nursery: trio.Nursery | None = None
        self.closed = False

    def parked_count(self) -> int:
        """How many authenticated transfers wait to be claimed."""
        return len(self.lot)

    def pending_count(self) -> int:
        """How many connections (direct and relay) are still authenticating."""
        return self.pending_direct.total + self.pending_relay.total

    # -- connections in ---------------------------------------------------------------------------

    def _drop_at_accept(self) -> None:
        self.counters.rejected_connections += 1
        self.counters.dropped_at_accept += 1

    async def accept_loop(self, listener: trio.socket.SocketType) -> None:
        """Accept direct data connections forever; one over a pending-authentication cap is closed at once."""
        assert self.nursery is not None
        with listener:
            while True:
                try:
                    sock, addr = await listener.accept()
                except OSError as exc:
                    log.warning("lane accept failed: %r", exc)
                    await trio.sleep(0.1)
                    continue
                source = source_of(str(addr[0]))
                if not self.pending_direct.admit(source):
                    self._drop_at_accept()
                    sock.close()
                    continue
                try:
                    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
                except OSError:  # reset between accept and here
                    self.pending_direct.release(source)
                    self._drop_at_accept()
                    sock.close()
                    continue
                conn = TcpConn(sock, peer=None, stall=self.stall_timeout)
                self.nursery.start_soon(
                    self._serve_admitted, conn, "direct", None, self.pending_direct, source
                )

    async def serve_relay(self, stream: FramedStream) -> None:
        """The :data:`PROTO_DATA` handler: serve the stream as a transfer, in the lane's nursery.

        Returns when the transfer is over (the node closes the stream then).
        """
        conn = StreamConn(stream, stall=self.stall_timeout)
        nursery = self.nursery
        source = f"peer:{stream.peer}"
        if self.closed or nursery is None:
            await conn.aclose()
            return
        if not self.pending_relay.admit(source):
            self._drop_at_accept()
            await conn.aclose()
            return
        finished = trio.Event()

        async def serve() -> None:
            try:
                await self._serve_admitted(conn, "relay", stream.peer, self.pending_relay, source)
            finally:
                finished.set()

        nursery.start_soon(serve)
        await finished.wait()

    async def authenticate(
        self, conn: Conn, expected_peer: str | None, *, preamble_timeout: float | None = None
    ) -> Incoming | None:
        """Read the preamble (within ``preamble_timeout``) and OPEN; None when the session is unknown
        or belongs to someone else. The caller bounds the whole (``auth_timeout``)."""
        preamble = bytearray(PREAMBLE_SIZE)
        await conn.recv_exactly_into(memoryview(preamble), stall=preamble_timeout)
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
        plain = opener.open(header, body)
        manifest = parse_manifest(plain, peer=session.peer, max_bytes=MANIFEST_SANITY_BYTES)
        self.sessions.touch(session.peer)
        return Incoming(
            session.peer,
            manifest,
            conn,
            opener,
            RecordSealer(r2s, cipher),
            "direct",
            cipher_why=session.keys.cipher_why,
        )

    async def serve(self, conn: Conn, path: str, expected_peer: str | None) -> None:
        """Authenticate one incoming transfer, park it until claimed, keep the connection until done.

        (Counts it under no admission cap: the accept loop and :meth:`serve_relay` admit first.)
        """
        await self._serve_admitted(conn, path, expected_peer, None, "")

    async def _serve_admitted(
        self, conn: Conn, path: str, expected_peer: str | None, admission: Admission | None, source: str
    ) -> None:
        incoming: Incoming | None = None
        try:
            try:
                # a stranger's first bytes are due at once (the sender writes them right after
                # connecting); a relay stream comes from an authenticated peer and gets auth_timeout
                first = self.preamble_timeout if path == "direct" else self.auth_timeout
                with give_up_after(self.auth_timeout) as scope:
                    incoming = await self.authenticate(conn, expected_peer, preamble_timeout=first)
                if scope.cancelled_caught:
                    self.counters.auth_timeouts += 1
            except PeerTimeout:
                self.counters.auth_timeouts += 1
                raise
            finally:
                if admission is not None:
                    admission.release(source)
            if incoming is None:
                self.counters.rejected_connections += 1
                return
            incoming.path = path
            await self._park_and_hold(incoming)
        except (ProtocolError, PeerGone, PeerTimeout) as exc:
            if incoming is None:
                self.counters.rejected_connections += 1
            log.info("lane: inbound connection dropped: %r", exc)
        finally:
            if incoming is not None:
                self.lot.discard(incoming.peer, incoming.manifest.tag, incoming)
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _park_and_hold(self, incoming: Incoming) -> None:
        peer, tag = incoming.peer, incoming.manifest.tag
        total = incoming.manifest.total_bytes
        if total > self.max_transfer_bytes:
            self.counters.refused_too_large += 1
            reason = f"transfer of {total} bytes is over the cap of {self.max_transfer_bytes}"
            await refuse(incoming, reason, timeout=self.auth_timeout, too_large=True)
            return
        offer = self.lot.offer(peer, tag, incoming)
        if not offer.parked:
            log.warning("lane: refusing a transfer from %s: %s", peer, offer.reason)
            self.counters.refused_busy += 1
            await refuse(incoming, offer.reason, timeout=self.auth_timeout, busy=True)
            return
        if offer.evicted is not None:
            offer.evicted.evicted = True
            offer.evicted.decided.set()
        arrival = self.arrivals.pop((peer, tag), None)
        if arrival is not None:
            arrival.set()
        with give_up_after(self.hold_timeout):
            await incoming.decided.wait()
        if incoming.evicted:
            self.counters.evicted_unclaimed += 1
            log.info("lane: unclaimed transfer %r from %s evicted for a peer holding fewer", tag, peer)
            reason = "evicted: too many unclaimed transfers"
            await refuse(incoming, reason, timeout=self.auth_timeout, busy=True)
            return
        if not incoming.claimed.is_set():
            self.counters.expired_unclaimed += 1
            log.info("lane: transfer %r from %s was not claimed in time", tag, peer)
            return
        await incoming.done.wait()

    # -- claims -----------------------------------------------------------------------------------

    async def claim(self, peer: str, tag: str) -> Incoming:
        """Take the oldest parked transfer ``tag`` from ``peer``, waiting for one to arrive."""
        key = (peer, tag)
        while True:
            incoming = self.lot.take(peer, tag)
            if incoming is not None:
                incoming.claimed.set()
                incoming.decided.set()
                return incoming
            await self._await_arrival(key)

    async def wait_for_arrival(self, peer: str, tag: str, *, timeout: float) -> None:
        """Wait (at most ``timeout`` s, then :class:`PeerTimeout`) until ``tag`` from ``peer`` is parked."""
        key = (peer, tag)
        with deadline(timeout, f"waiting for transfer {tag!r}", peer=peer):
            while not self.lot.has(peer, tag):
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
