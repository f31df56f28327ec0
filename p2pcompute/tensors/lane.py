"""The tensor data lane: encrypted, verified tensor transfers between two peers.

Control (the session key agreement) runs over an authenticated overlay stream; bulk payload
goes over a direct TCP connection per transfer, in AEAD records of up to 1 MiB (the cipher
both sides measured fastest) that are sealed from and opened straight into tensor memory.
When no direct connection can be made, the same bytes travel over an overlay stream instead
("relay" path). See
docs/design/data-plane.md for the design and docs/protocol/tensors.md for the wire format.

One transfer, sender S and receiver R (all records sealed, see :mod:`p2pcompute.wire.lanekeys`)::

    S -> R   MAGIC | session id                      (plaintext; R drops unknown ids silently)
    R -> S   32-byte challenge                       (fresh; gives fresh transfer keys)
    S -> R   OPEN {tag, shards, record size}         (R authenticates S here, or drops it)
             ... R parks the connection unread until ``receive(S, tag)`` claims it ...
    R -> S   GO  (or ACK{ok: false} to refuse; ACK{busy: true} when R is full)
    S -> R   DATA * n, then END {records, total, digests}
    R -> S   ACK {ok}

This module is the facade (:class:`TensorLane`, :func:`open_lane`); the parts live beside it:
:mod:`~p2pcompute.tensors.conns` (byte connections), :mod:`~p2pcompute.tensors.sessions`
(key agreement), :mod:`~p2pcompute.tensors.inbound` (authentication, the parking lot),
:mod:`~p2pcompute.tensors.transfers` and :mod:`~p2pcompute.tensors.pipeline` (the record loops);
framing, keys and codecs live in :mod:`p2pcompute.wire.shards`, :mod:`p2pcompute.wire.lanekeys`
and :mod:`p2pcompute.tensors.codecs`. The lane speaks to peers only through the overlay's
:class:`~p2pcompute.overlay.node.Node`; it never imports py-libp2p.
"""

from __future__ import annotations

import logging
import os
import socket as _stdsocket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import trio

from p2pcompute.deadlines import deadline, give_up_after
from p2pcompute.errors import ConfigError, LocalProtocolError, PeerGone, ResourceLimitExceeded
from p2pcompute.tensors import codecs, conns
from p2pcompute.tensors.conns import Conn, StreamConn, TcpConn
from p2pcompute.tensors.inbound import PROTO_DATA, Inbox
from p2pcompute.tensors.sessions import (
    MAX_SESSION_PEERS,
    PROTO_SESSION,
    Session,
    Sessions,
    StaleSession,
)
from p2pcompute.tensors.transfers import OnChunk, receive_transfer, send_transfer
from p2pcompute.wire.lanekeys import HELLO, available_ciphers, check_ciphers
from p2pcompute.wire.shards import (
    DEFAULT_RECORD_SIZE,
    DIGESTS,
    MAX_RECORD_SIZE,
    MIN_RECORD_SIZE,
    Manifest,
    ShardSpec,
    effective_codec,
)

if TYPE_CHECKING:
    from p2pcompute.overlay.node import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferReport:
    """What one transfer moved: encoded payload ``bytes``, wall ``seconds``, ``path`` ("direct"/"relay"),
    the record ``cipher`` the two lanes agreed on and ``cipher_why``, the measured figures that
    chose it (the slowest of both sides' seal and open MB/s, and the runner-up). ``link`` says what
    carried a "relay" transfer's overlay stream: ``"direct"`` (a peer-to-peer libp2p connection),
    ``"punched"`` (a direct one made by hole punching through NATs) or ``"circuit"`` (through a
    circuit relay: a peer behind NAT); ``""`` for a direct transfer. :attr:`route` joins the two
    (``relay/circuit``, ``relay/punched``).

    Example::

        report = await lane.send(peer, "w", {"w": w})
        print(report.bytes / report.seconds / 1e9, "GB/s over", report.path, report.cipher)
    """

    bytes: int
    seconds: float
    path: str
    records: int = 0
    cipher: str = ""
    cipher_why: str = ""
    link: str = ""

    @property
    def route(self) -> str:
        """``direct``, ``relay/direct``, ``relay/punched`` or ``relay/circuit``: how the bytes went."""
        return self.path if not self.link else f"{self.path}/{self.link}"


@dataclass
class LaneStatistics:
    """Counters of a lane (see :meth:`TensorLane.statistics`).

    Receiving side: ``parked`` and ``pending_auth`` are current counts; ``rejected_connections``
    counts every inbound connection dropped before it authenticated, among them
    ``dropped_at_accept`` (a pending-authentication cap was full) and ``auth_timeouts`` (no
    preamble or OPEN in time); ``refused_busy`` (the lot or the sender's share was full),
    ``evicted_unclaimed`` (a parked transfer made room for a peer holding fewer) and
    ``refused_too_large`` (over ``max_transfer_bytes``) count busy refusals of authenticated
    transfers. Sending side: ``direct_fallbacks`` counts sends that gave up the direct path
    for the relay one. ``routes`` counts transfers both ways by :attr:`TransferReport.route`
    (``direct``, ``relay/direct``, ``relay/circuit``).

    Example::

        stats = lane.statistics()
        print(stats.sent, stats.bytes_received, stats.refused_busy)
    """

    sent: int = 0
    received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    sessions: int = 0
    parked: int = 0
    pending_auth: int = 0
    rejected_connections: int = 0
    dropped_at_accept: int = 0
    auth_timeouts: int = 0
    refused_busy: int = 0
    evicted_unclaimed: int = 0
    refused_too_large: int = 0
    expired_unclaimed: int = 0
    relay_transfers: int = 0
    direct_fallbacks: int = 0
    routes: dict[str, int] = field(default_factory=dict)  # transfers (both ways) by TransferReport.route


class TensorLane:
    """Sends and receives named groups of tensors to and from peers; create with :func:`open_lane`.

    Example::

        async with open_lane(node) as lane:
            report = await lane.send(peer_id, "grads/7", {"w": w, "b": b}, codec="bf16")
            got = await lane.receive(peer_id, "params/7")      # {"w": tensor, ...}
    """

    def __init__(
        self,
        node: Node,
        *,
        bind: str | None = None,
        ciphers: tuple[str, ...] | None = None,
        cipher_speeds: Mapping[str, tuple[int, int]] | None = None,
        direct: bool = True,
        advertise: list[tuple[str, int]] | None = None,
        record_size: int = DEFAULT_RECORD_SIZE,
        stall_timeout: float = 30.0,
        preamble_timeout: float = 2.0,
        auth_timeout: float = 10.0,
        hold_timeout: float = 30.0,
        claim_timeout: float = 120.0,
        connect_timeout: float = 5.0,
        max_transfer_bytes: int = 64 << 30,
        max_parked: int = 64,
        max_parked_per_peer: int = 8,
        max_pending_auth: int = 64,
        max_pending_auth_per_source: int = 8,
        max_session_peers: int = MAX_SESSION_PEERS,
        force_staging: bool = False,
        seal_threads: int | None = None,
    ) -> None:
        self.ciphers = available_ciphers() if ciphers is None else check_ciphers(ciphers)
        if not MIN_RECORD_SIZE <= record_size <= MAX_RECORD_SIZE:
            raise LocalProtocolError(f"record_size must be in [{MIN_RECORD_SIZE}, {MAX_RECORD_SIZE}]")
        caps: dict[str, int] = {
            "max_parked": max_parked,
            "max_parked_per_peer": max_parked_per_peer,
            "max_pending_auth": max_pending_auth,
            "max_pending_auth_per_source": max_pending_auth_per_source,
            "max_transfer_bytes": max_transfer_bytes,
            "max_session_peers": max_session_peers,
        }
        for name, cap in caps.items():
            if not isinstance(cap, int) or cap < 1:
                raise ConfigError(f"{name} must be a positive integer, not {cap!r}")
        times: dict[str, float] = {
            "stall_timeout": stall_timeout,
            "preamble_timeout": preamble_timeout,
            "auth_timeout": auth_timeout,
            "hold_timeout": hold_timeout,
            "claim_timeout": claim_timeout,
            "connect_timeout": connect_timeout,
        }
        for name, seconds in times.items():
            if not isinstance(seconds, int | float) or not seconds > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, not {seconds!r}")
        if seal_threads is None:
            seal_threads = auto_seal_threads()
        if not isinstance(seal_threads, int) or isinstance(seal_threads, bool) or not 1 <= seal_threads <= 64:
            raise ConfigError(f"seal_threads must be an integer in [1, 64], not {seal_threads!r}")
        self.seal_threads = seal_threads
        conns.USER_THREADS[0] = torch.get_num_threads()  # the user's thread: what workers restore
        self.node = node
        self.identity = node.identity
        self.peer_id = node.peer_id
        self.bind = bind
        self.direct = direct
        self.advertise = advertise
        self.record_size = record_size
        self.stall_timeout = stall_timeout
        self.preamble_timeout = preamble_timeout
        self.auth_timeout = auth_timeout
        self.hold_timeout = hold_timeout
        self.claim_timeout = claim_timeout
        self.connect_timeout = connect_timeout
        self.max_transfer_bytes = max_transfer_bytes
        self.force_staging = force_staging
        self._port: int | None = None
        self._stats = LaneStatistics()
        self._sessions = Sessions(
            node,
            ciphers=self.ciphers,
            addrs=lambda: self.data_addrs,
            connect_timeout=connect_timeout,
            auth_timeout=auth_timeout,
            max_peers=max_session_peers,
            speeds=cipher_speeds,
        )
        self._inbox = Inbox(
            self._sessions,
            stall_timeout=stall_timeout,
            preamble_timeout=preamble_timeout,
            auth_timeout=auth_timeout,
            hold_timeout=hold_timeout,
            max_transfer_bytes=max_transfer_bytes,
            max_parked=max_parked,
            max_parked_per_peer=max_parked_per_peer,
            max_pending_auth=max_pending_auth,
            max_pending_auth_per_source=max_pending_auth_per_source,
        )
        # bulk loops (one per direct transfer) block on their peers; bounded by max_parked, sessions
        self._bulk_threads = trio.CapacityLimiter(1024)
        self._listener: trio.socket.SocketType | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def _run(self, nursery: trio.Nursery) -> None:
        self._inbox.nursery = nursery
        if self.bind is None:
            self.bind = self._bind_like_node()
        if self.direct:
            listener = trio.socket.socket(_stdsocket.AF_INET6 if ":" in self.bind else _stdsocket.AF_INET)
            listener.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
            await listener.bind((self.bind, 0))
            listener.listen(128)
            self._listener = listener
            self._port = listener.getsockname()[1]
            nursery.start_soon(self._inbox.accept_loop, listener)
        self.node.set_stream_handler(PROTO_SESSION, self._sessions.serve, max_frame=HELLO.max_size)
        self.node.set_stream_handler(PROTO_DATA, self._inbox.serve_relay)

    def _bind_like_node(self) -> str:
        """Default ``bind``: where the node listens (one IP: that one; several: all)."""
        ips = self.node.listen_ips()
        if len(ips) == 1:
            return ips[0]
        return "0.0.0.0" if ips else "127.0.0.1"

    @property
    def data_addrs(self) -> list[tuple[str, int]]:
        """The direct data addresses we tell a peer at each handshake: ``advertise`` when given;
        none when the node is private (behind NAT: senders go straight to the stream path);
        else the bind address, or for a wildcard bind the IPs the node advertises (never
        loopback next to others, see :mod:`p2pcompute.overlay.reach`).
        """
        if self.advertise is not None:
            return list(self.advertise)
        port, bind = self._port, self.bind
        if port is None or bind is None or getattr(self.node, "reachability", "unknown") == "private":
            return []
        if bind not in ("0.0.0.0", "::"):
            return [(bind, port)]
        hosts: list[str] = []
        for addr in self.node.addrs:
            parts = addr.split("/")
            if "/p2p-circuit" in addr or len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
                continue
            if (parts[1] == "ip6") == (bind == "::") and parts[2] not in hosts:
                hosts.append(parts[2])
        return [(h, port) for h in hosts] or [("127.0.0.1", port)]

    async def _close(self) -> None:
        self._sessions.closed = True
        self._inbox.closed = True
        for proto in (PROTO_SESSION, PROTO_DATA):
            self.node.remove_stream_handler(proto)

    def statistics(self) -> LaneStatistics:
        """Counters: transfers, bytes, sessions, parked and rejected connections, busy refusals
        (see :class:`LaneStatistics`).

        Example::

            assert lane.statistics().parked == 0
        """
        counters = self._inbox.counters
        stats = self._stats
        stats.sessions = len(self._sessions)
        stats.parked = self._inbox.parked_count()
        stats.pending_auth = self._inbox.pending_count()
        for name, value in vars(counters).items():
            setattr(stats, name, value)
        out = LaneStatistics(**vars(stats))
        out.routes = dict(stats.routes)
        return out

    # -- public API -----------------------------------------------------------------------------------

    async def wait_for_arrival(self, peer_id: str, tag: str, *, timeout: float) -> None:
        """Wait until a transfer from ``peer_id`` under ``tag`` has arrived and waits to be
        received (it is not claimed: :meth:`receive` still takes it). Raises
        :class:`PeerTimeout` after ``timeout`` seconds.

        Example::

            await lane.wait_for_arrival(peer, "grads/3", timeout=30)
            tensors = await lane.receive(peer, "grads/3")
        """
        await self._inbox.wait_for_arrival(peer_id, tag, timeout=timeout)

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
        transfer. Raises PeerUnreachable, PeerGone, PeerTimeout, RemoteProtocolError, or
        ResourceLimitExceeded when the receiver is full (too many unclaimed transfers, or the
        transfer is over its ``max_transfer_bytes``).

        The transfer goes over a direct connection when one of the receiver's addresses
        connects and answers; when the direct connection fails before the receiver has
        answered anything (closed or reset unread even after a fresh session, or no answer
        within ``auth_timeout``: the receiver's port may be flooded or filtered), the same
        bytes go over the relay path (an overlay stream). ``report.path`` says which.

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
        with deadline(timeout, f"sending {tag!r}", peer=peer_id):
            direct = self.direct
            renewed = False
            while True:
                session = await self._sessions.get(peer_id)
                conn, path = await self._connect(peer_id, session, direct=direct)
                try:
                    total, records = await send_transfer(
                        conn,
                        session,
                        manifest,
                        open_body,
                        sources,
                        auth_timeout=self.auth_timeout,
                        claim_timeout=self.claim_timeout,
                        force_staging=self.force_staging,
                        limiter=self._bulk_threads,
                        workers=self.seal_threads,
                    )
                    break
                except StaleSession as exc:
                    # No challenge came back: not a verdict on this transfer (that would be sealed).
                    if path == "direct" and (exc.timed_out or renewed):
                        # The direct path is blocked (a flooded or filtered port): relay instead.
                        log.info("lane: direct path to %s failed (%s); sending %r relayed", peer_id, exc, tag)
                        self._stats.direct_fallbacks += 1
                        direct = False
                        continue
                    if renewed:
                        raise PeerGone(f"{peer_id} refused the lane session twice", peer=peer_id) from None
                    # The peer may no longer know this session (it restarted): shake hands again.
                    self._sessions.forget(session)
                    renewed = True
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()
        self._stats.sent += 1
        self._stats.bytes_sent += total
        if path == "relay":
            self._stats.relay_transfers += 1
        keys = session.keys
        report = TransferReport(
            total, time.perf_counter() - start, path, records, keys.cipher, keys.cipher_why,
            self._link(peer_id, path),
        )
        self._stats.routes[report.route] = self._stats.routes.get(report.route, 0) + 1
        return report

    def _link(self, peer_id: str, path: str) -> str:
        if path == "direct":
            return ""
        link = getattr(self.node, "link", None)
        return str(link(peer_id)) if callable(link) else ""

    async def _connect(self, peer: str, session: Session, *, direct: bool) -> tuple[Conn, str]:
        """A direct connection to one of the peer's data addresses, else a relay stream."""
        for host, port in session.keys.peer_addrs if direct else ():
            sock = await self._dial(peer, host, port)
            if sock is not None:
                return TcpConn(sock, peer=peer, stall=self.stall_timeout), "direct"
        stream = await self.node.open_stream(peer, PROTO_DATA, timeout=self.connect_timeout)
        return StreamConn(stream, stall=self.stall_timeout), "relay"

    async def _dial(self, peer: str, host: str, port: int) -> trio.socket.SocketType | None:
        sock = trio.socket.socket(_stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET)
        failure: BaseException | None = None
        try:
            with give_up_after(self.connect_timeout) as scope:
                try:
                    await sock.connect((host, port))
                except OSError as exc:
                    failure = exc
        except BaseException:
            sock.close()
            raise
        if failure is not None or scope.cancelled_caught:
            sock.close()
            why = repr(failure) if failure is not None else f"no answer in {self.connect_timeout} s"
            log.info("lane: direct dial to %s at %s:%d failed (%s)", peer, host, port, why)
            return None
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        return sock

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
        with deadline(timeout, f"receiving {tag!r}", peer=peer_id):
            result, _ = await self._receive(peer_id, tag, into, device, None, threaded=False)
        return result

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
        with deadline(timeout, f"receiving {tag!r}", peer=peer_id):
            _, report = await self._receive(peer_id, tag, None, None, on_chunk, threaded=threaded)
        return TransferReport(
            report.bytes,
            time.perf_counter() - start,
            report.path,
            cipher=report.cipher,
            cipher_why=report.cipher_why,
            link=report.link,
        )

    async def _receive(
        self,
        peer_id: str,
        tag: str,
        into: Mapping[str, torch.Tensor] | None,
        device: torch.device | str | None,
        on_chunk: OnChunk | None,
        *,
        threaded: bool,
    ) -> tuple[dict[str, torch.Tensor], TransferReport]:
        incoming = await self._inbox.claim(peer_id, tag)
        try:
            result, total = await receive_transfer(
                incoming,
                into,
                device,
                on_chunk,
                threaded=threaded,
                force_staging=self.force_staging,
                auth_timeout=self.auth_timeout,
                limiter=self._bulk_threads,
                workers=self.seal_threads,
            )
        finally:
            incoming.done.set()
        self._stats.received += 1
        self._stats.bytes_received += total
        if incoming.path == "relay":
            self._stats.relay_transfers += 1
        report = TransferReport(
            incoming.manifest.total_bytes,
            0.0,
            incoming.path,
            cipher=incoming.opener.cipher,
            cipher_why=incoming.cipher_why,
            link=self._link(peer_id, incoming.path),
        )
        self._stats.routes[report.route] = self._stats.routes.get(report.route, 0) + 1
        return result, report


def auto_seal_threads(cores: int | None = None) -> int:
    """Threads that seal (or open) one transfer's records by default: 1 below 8 cores, else a
    quarter of the cores, at most 4.

    On the 2-core machines we measure on, both peers' processes already keep both cores busy
    (kernel copies and the AEAD), so a pool only adds hand-offs; a GPU host with 16 cores has
    cores to spare for the cipher while one thread drives the socket (docs/design/data-plane.md,
    "Threads"). ``open_lane(seal_threads=n)`` overrides it.

    Example::

        assert auto_seal_threads(2) == 1 and auto_seal_threads(16) == 4
    """
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    return 1 if cores < 8 else min(4, cores // 4)


@asynccontextmanager
async def open_lane(
    node: Node,
    *,
    bind: str | None = None,
    ciphers: tuple[str, ...] | None = None,
    **options: Any,
) -> AsyncIterator[TensorLane]:
    """Run a tensor lane on a running overlay ``node`` (:func:`~p2pcompute.overlay.open_node`).

    The lane's identity is the node's. It listens for direct data connections on ``bind`` (port
    chosen by the OS; by default the IP the node listens on, or all interfaces when it listens
    on several, so peers that can reach the node can also reach the lane) and serves the lane's
    protocols on the node; everything stops on exit. Options:
    ``ciphers=("aes-256-gcm",)`` (record ciphers to offer; default: every one this process has;
    the session takes the one whose slower side measured fastest, see
    :func:`~p2pcompute.wire.lanekeys.cipher_speeds`), ``cipher_speeds={name: (seal, open)}``
    (MB/s figures to advertise instead of measuring), ``direct=False`` (never dial or accept direct TCP:
    relay path only), ``advertise=[(host, port)]``, ``record_size``, ``stall_timeout`` (30 s without
    progress on a connection), ``connect_timeout`` (5 s per direct dial), ``claim_timeout`` (120 s a
    sender waits for the receiver to claim), ``force_staging``, ``seal_threads`` (threads that
    seal or open one direct CPU transfer's records; default :func:`auto_seal_threads`: 1 below
    8 cores).

    Caps that keep an open swarm from exhausting the lane (docs/design/data-plane.md, "Caps";
    each refuses only the newest excess, and honest work goes on):

    * ``preamble_timeout=2.0``: seconds a new connection has to send its first 24 bytes;
      ``auth_timeout=10.0``: seconds to finish authenticating (preamble, challenge, OPEN).
    * ``max_pending_auth=64`` connections authenticating at once, ``max_pending_auth_per_source=8``
      from one IPv4 address / IPv6 /64 (relay streams: per peer, in a queue of their own); one
      over a cap is closed at accept, and a sender whose direct connection is closed so
      falls back to the relay path.
    * ``max_parked=64`` unclaimed transfers, ``max_parked_per_peer=8`` from one sender,
      ``hold_timeout=30.0`` s each; a full lot evicts the oldest of the peer holding the most
      for a newcomer holding fewer. Refused or evicted senders get ``ResourceLimitExceeded``.
    * ``max_transfer_bytes=64 GiB`` per transfer (larger: ``ResourceLimitExceeded``).
    * ``max_session_peers=1024`` peers whose lane sessions are kept (least recently used go
      first; such a peer shakes hands again on its next transfer).

    Example::

        async with open_node(identity) as node, open_lane(node) as lane:
            await lane.send(other_peer, "hello", {"x": torch.arange(10)})
    """
    lane = TensorLane(node, bind=bind, ciphers=ciphers, **options)
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
    "OnChunk",
    "ResourceLimitExceeded",
    "TensorLane",
    "TransferReport",
    "open_lane",
]
