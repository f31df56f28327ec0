"""The py-libp2p adapters: everything the overlay asks of py-libp2p goes through :class:`Libp2pStack`.

It builds the host (TCP, Noise, yamux; one connection per peer; py-libp2p's auto-connector
off, so our dialer chooses the topology), the GossipSub router and the Pubsub service
(docs/design/overlay.md gives the settings), serves the router's protocols through a
guarded handler, watches connections, and turns raw streams into
:class:`~p2pcompute.overlay.streams.FramedStream`. Peer ids leave it as base58 strings and
addresses as text, so the rest of the overlay never touches a py-libp2p type; its
exceptions are translated by :mod:`p2pcompute.overlay.failures`.

Imports :mod:`p2pcompute.identity`, :mod:`p2pcompute.errors` and the overlay's own modules.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio

from p2pcompute.errors import (
    ConfigError,
    MalformedMessage,
    P2PComputeError,
    PeerError,
    PeerUnreachable,
    RemoteProtocolError,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay import guards
from p2pcompute.overlay.config import NodeConfig
from p2pcompute.overlay.delivery import DeliveryWatch
from p2pcompute.overlay.failures import parse_multiaddr, peer_info, reaching, to_peer_id
from p2pcompute.overlay.limits import Occupancy, RateLimiter
from p2pcompute.overlay.relay import CircuitRelay, is_relayed_connection
from p2pcompute.overlay.streams import DEFAULT_MAX_FRAME, ByteTally, FramedStream

log = logging.getLogger(__name__)

StreamHandler = Callable[[FramedStream], Awaitable[None]]
GossipValidator = Callable[[Any, Any], bool]


def b58(raw: bytes) -> str:
    """The base58 text of a binary peer id (as py-libp2p's pubsub messages carry it).

    Example::

        sender = b58(msg.from_id)
    """
    from libp2p.peer.id import ID

    return str(ID(raw).to_base58())


def gossip_message(forwarder: Any, msg: Any) -> tuple[str, str, bytes]:
    """``(origin, forwarder, data)`` of a message handed to a GossipSub topic validator.

    Example::

        origin, via, data = gossip_message(forwarder, msg)
    """
    return b58(msg.from_id), str(forwarder.to_base58()), bytes(msg.data)


class Libp2pSubscription:
    """One topic subscription of the Pubsub service; :meth:`get` yields ``(sender, data)``.

    Example::

        sub = await stack.subscribe(full_topic)
        sender, data = await sub.get()
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    async def get(self) -> tuple[str, bytes]:
        """The next message: its origin peer id and its bytes."""
        msg = await self._raw.get()
        return b58(msg.from_id), bytes(msg.data)


class Libp2pStack:
    """A py-libp2p host with GossipSub, configured and guarded the way the overlay needs.

    ``stats`` is the node's counter dict (``dials``, ``dial_failures``, ``handler_errors``,
    ``streams_refused``, ``connections_refused`` and ``buffer_overflows`` are counted here);
    ``on_connections`` is called when a connection opens or closes;
    ``on_malformed_rpc(peer, error)`` whenever a peer is caught breaking a protocol (bytes
    that are no pubsub RPC, a gossip message with a bad signature, a stream handler's
    :class:`RemoteProtocolError`, a broken yamux window); ``app_score(peer)`` is GossipSub's
    application-specific score of a peer. Peers in :attr:`banned` are neither dialed nor
    served. The limits of :class:`NodeConfig` (connections, streams, buffers) apply here.

    Example::

        stack = Libp2pStack(identity, NodeConfig(), stats=Counter(), on_connections=wake,
                            on_malformed_rpc=blame)
        async with stack.run(["/ip4/127.0.0.1/tcp/0"]):
            await stack.dial(addr, timeout=5)
    """

    def __init__(
        self,
        identity: Identity,
        config: NodeConfig,
        *,
        stats: dict[str, int],
        on_connections: Callable[[], None],
        on_malformed_rpc: Callable[[str, RemoteProtocolError], None],
        app_score: Callable[[str], float] = lambda _peer: 0.0,
        advert_age: Callable[[str], float | None] = lambda _peer: None,
    ) -> None:
        from libp2p import new_host
        from libp2p.network.config import ConnectionConfig
        from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub

        self.peer_id = identity.peer_id
        self.config = config
        self.stats = stats
        self.banned: set[str] = set()
        self.bytes = ByteTally()  # bytes on our framed streams, by protocol
        self.listening = False
        self._on_malformed_rpc = on_malformed_rpc
        self._app_score_fn = app_score
        # mesh peers that forward nothing on the watched topics (GossipSub's P3, missing in 0.8.1)
        # off by default (dropper_misses 0): see NodeConfig and docs/design/threat-model.md
        self.deliveries = DeliveryWatch(misses=config.dropper_misses or 8, late=config.dropper_late or None)
        self.watched_topics: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._rates = RateLimiter(rate=config.stream_rate, burst=config.stream_burst)
        self._peer_streams = Occupancy(config.max_streams_per_peer)
        self._protocol_streams = Occupancy(config.max_streams_per_protocol)
        self._conn_ips: dict[int, str] = {}  # id(SwarmConn) -> remote IP, for the per-IP cap
        self._ip_conns: Counter[str] = Counter()
        conn_cfg = ConnectionConfig(
            max_connections_per_peer=1,  # else every dial waits 250 ms (notes P1)
            max_connections=config.max_connections,
            min_connections=0,
            low_watermark=min(512, config.max_connections),
            high_watermark=min(768, config.max_connections),
            dial_timeout=config.dial_timeout,
        )
        self.host: Any = new_host(
            key_pair=libp2p_key_pair(identity),
            connection_config=conn_cfg,
            muxer_preference="YAMUX",
            disable_identify_address_discovery=True,
        )
        # py-libp2p's auto-connector dials every peer in the peerstore up to ~600
        # connections; our dialer chooses the topology instead (docs/design/overlay.md).
        network: Any = self.host.get_network()

        async def _no_auto_connect(*_args: Any, **_kwargs: Any) -> None:
            return None

        network.auto_connector.maybe_connect = _no_auto_connect
        self.gossipsub: Any = GossipSub(
            protocols=[PROTOCOL_ID_V11],
            degree=config.degree,
            degree_low=config.degree_low,
            degree_high=config.degree_high,
            heartbeat_interval=config.heartbeat_interval,  # type: ignore[arg-type]
            spam_protection_enabled=True,
            max_messages_per_topic_per_second=config.topic_rate_limit,
            score_params=guards.score_params(self._app_score) if config.gossip_scoring else None,
        )
        self.pubsub: Any = Pubsub(
            self.host,
            self.gossipsub,
            strict_signing=True,
            max_inbound_rpc_size=config.max_message_size + 65536,
        )
        # py-libp2p 0.8.1 lets a protobuf DecodeError from one peer's RPC escape its pubsub
        # stream handler, and that ends the whole host: one malformed frame from any connected
        # peer took a node down (test_garbage_on_the_pubsub_protocol_leaves_the_node_running).
        # Our handler runs theirs and turns such an error into an offence of that peer.
        for protocol in self.gossipsub.get_protocols():
            self.host.set_stream_handler(protocol, self._guarded_pubsub_stream)
        guards.guard_signatures(self.pubsub, on_malformed_rpc)
        self._flood_own: set[str] = set()
        self._forward: set[str] = set()
        guards.flood_own_messages(
            self.gossipsub,
            self.host.get_id(),
            self._flood_own,
            forward_topics=self._forward,
            max_forward=config.flood_forward,
        )
        if config.dropper_misses:
            guards.watch_deliveries(
                self.pubsub,
                self.gossipsub,
                self.deliveries,
                lambda: self.watched_topics,
                self._on_dropper,
                age=advert_age,
            )
        network.register_notifee(_connection_watch(on_connections, self._on_connected, self._on_disconnected))
        self.relay = CircuitRelay(self.host, config)

    def flood_publish(self, topics: set[str], *, forward: set[str] | None = None) -> None:
        """Send our own messages on ``topics`` (full ids) to every subscribed peer above the
        publish threshold, not just our GossipSub mesh; others' messages on ``forward`` also
        to up to ``config.flood_forward`` well-scored peers outside the mesh, and watch the
        ``forward`` topics' mesh peers for droppers. Example::

            stack.flood_publish({advert_topic("lab")}, forward={advert_topic("lab")})
        """
        self._flood_own |= set(topics)
        self._forward |= set(forward or ())
        self.watched_topics |= set(forward or ())

    def flood_own(self, topic: str) -> None:
        """Flood-publish our own messages on ``topic`` (a full id), as :meth:`flood_publish`.
        Example::

            stack.flood_own(topic_name("lab", "tasks/1"))
        """
        self._flood_own.add(topic)

    def _app_score(self, peer: str) -> float:
        return self._app_score_fn(peer) - self.config.offence_weight * self.deliveries.penalty(peer)

    def _on_dropper(self, topic: str, peer: str) -> None:
        self.stats["droppers_pruned"] = self.stats.get("droppers_pruned", 0) + 1

    # -- connection admission -------------------------------------------------------------------

    def _on_connected(self, conn: Any) -> None:
        peer = str(conn.muxed_conn.peer_id.to_base58())
        if peer in self.banned:
            self._close_soon(conn, "banned")
            return
        guards.cap_buffers(
            conn.muxed_conn,
            per_stream=self.config.max_stream_buffer,
            per_connection=self.config.max_connection_buffer,
            on_exceeded=lambda kind: self._overflow(conn, peer, kind),
        )
        ip = guards.remote_ip(conn)
        if ip is None or guards.is_exempt(ip, self.config.exempt_networks) or is_relayed_connection(conn):
            return  # a relayed connection shows the relay's IP, not the peer's
        self._conn_ips[id(conn)] = ip
        self._ip_conns[ip] += 1
        if self.gossipsub.scorer is not None:
            with contextlib.suppress(Exception):
                self.gossipsub.scorer.add_peer_ip(conn.muxed_conn.peer_id, ip)
        if self._ip_conns[ip] > self.config.max_connections_per_ip:
            self._close_soon(conn, f"more than {self.config.max_connections_per_ip} connections from {ip}")

    def _on_disconnected(self, conn: Any) -> None:
        ip = self._conn_ips.pop(id(conn), None)
        if ip is not None:
            self._ip_conns[ip] -= 1
            if self._ip_conns[ip] <= 0:
                del self._ip_conns[ip]

    def _overflow(self, conn: Any, peer: str, kind: str) -> None:
        self.stats["buffer_overflows"] = self.stats.get("buffer_overflows", 0) + 1
        if kind == "stream":  # more unread bytes than any yamux window allows: flow control broken
            self._on_malformed_rpc(peer, MalformedMessage("sent past the yamux receive window", peer=peer))
        self._close_soon(conn, f"unread bytes past the {kind} cap")

    def _close_soon(self, conn: Any, why: str) -> None:
        self.stats["connections_refused"] = self.stats.get("connections_refused", 0) + 1
        log.info("closing the connection with %s: %s", conn.muxed_conn.peer_id, why)
        if self._nursery is None:
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await conn.close()

        self._nursery.start_soon(close)

    @contextlib.asynccontextmanager
    async def run(self, listen: Sequence[str]) -> AsyncIterator[None]:
        """Listen on ``listen`` and run the Pubsub and GossipSub services for the block.

        :attr:`listening` turns true once the host listens (an ``OSError`` before that is a
        bad listen address). Example::

            async with stack.run(["/ip4/0.0.0.0/tcp/4001"]):
                ...
        """
        from libp2p.tools.anyio_service import background_trio_service

        listen_addrs = [parse_multiaddr(a) for a in listen]
        async with self.host.run(listen_addrs=listen_addrs), trio.open_nursery() as nursery:
            self._nursery = nursery
            self.listening = True
            try:
                async with (
                    self.relay.run(),
                    background_trio_service(self.pubsub),
                    background_trio_service(self.gossipsub),
                ):
                    await self.pubsub.wait_until_ready()
                    yield
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    # -- addresses and connections ----------------------------------------------------------------

    def full_addrs(self, announce: Sequence[str] = ()) -> list[str]:
        """Up to 8 multiaddrs ending in ``/p2p/<our id>``: ``announce`` or the listen addresses
        (wildcards expanded). Example::

            stack.full_addrs()     # ['/ip4/127.0.0.1/tcp/40123/p2p/12D3KooW...']
        """
        if announce:
            base = [a.split("/p2p/")[0] for a in announce]
        else:
            from libp2p.utils.address_validation import expand_wildcard_address

            base = []
            for maddr in self.host.get_transport_addrs():
                text = str(maddr)
                if text.startswith(("/ip4/0.0.0.0/", "/ip6/::/")):
                    base.extend(str(m) for m in expand_wildcard_address(maddr))
                else:
                    base.append(text)
        out: list[str] = []
        for b in base:
            full = f"{b}/p2p/{self.peer_id}"
            if full not in out:
                out.append(full)
        return out[:8]

    def listen_ips(self) -> list[str]:
        """The IP addresses the transports listen on (wildcards kept), first seen first.

        Example::

            stack.listen_ips()      # ['127.0.0.1']
        """
        ips: list[str] = []
        for addr in self.host.get_addrs():
            parts = str(addr).split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in ips:
                ips.append(parts[2])
        return ips

    def connected_peers(self) -> list[str]:
        """Peer ids with a live connection to us.

        Example::

            links = len(stack.connected_peers())
        """
        return [p.to_base58() for p in self.host.get_connected_peers()]

    def direct_peers(self) -> dict[str, str]:
        """Peers with a direct (not relayed) connection, mapped to the multiaddr we reach them at
        (``/ip4/<ip>/tcp/<port>``; for a connection they opened, their source port). Example::

            stack.direct_peers()     # {'12D3KooW...': '/ip4/203.0.113.7/tcp/4001'}
        """
        out: dict[str, str] = {}
        for pid, conns in list(self.host.get_network().connections.items()):
            for conn in conns if isinstance(conns, list) else [conns]:
                if is_relayed_connection(conn):
                    continue
                remote = None
                with contextlib.suppress(Exception):
                    remote = conn.muxed_conn.get_remote_address()
                if not remote:
                    continue
                ip, port = remote
                family = "ip6" if ":" in str(ip) else "ip4"
                out[str(pid.to_base58())] = f"/{family}/{ip}/tcp/{port}"
        return out

    def relayed_peers(self) -> list[str]:
        """Peers whose only connection to us runs through a relay. Example::

            stack.relayed_peers()
        """
        direct = self.direct_peers()
        return [p for p in self.connected_peers() if p not in direct]

    def serves_relay(self, peer: str) -> bool:
        """True when identify says ``peer`` relays for others (circuit relay v2 "hop"). Example::

            stack.serves_relay(boot_id)
        """
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID

        with contextlib.suppress(Exception):
            protocols = self.host.get_peerstore().get_protocols(to_peer_id(peer))
            return str(PROTOCOL_ID) in [str(p) for p in protocols]
        return False

    async def dial(self, addr: str, *, timeout: float | None = None) -> str:
        """Connect to a full multiaddr (``.../p2p/<id>``) and return the peer id.

        ``timeout`` defaults to ``dial_timeout``. Raises :class:`ConfigError` (bad address),
        :class:`PeerUnreachable` or :class:`PeerTimeout`. Example::

            peer = await stack.dial("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW...", timeout=5)
        """
        info = peer_info(addr)
        peer = str(info.peer_id.to_base58())
        if peer in self.banned:
            raise PeerUnreachable(f"peer {peer} is blacklisted", peer=peer)
        self.stats["dials"] += 1
        try:
            with reaching(peer, "dialing", timeout=timeout or self.config.dial_timeout):
                if "/p2p-circuit" in addr:
                    if peer not in self.connected_peers():
                        await self.relay.dial(addr, peer)
                else:
                    await self.host.connect(info)
        except PeerError:
            self.stats["dial_failures"] += 1
            raise
        return peer

    def ban(self, peer: str) -> None:
        """Refuse ``peer`` from now on: no dials, no streams, no pubsub messages.

        Example::

            stack.ban(peer)
        """
        self.banned.add(peer)
        with contextlib.suppress(Exception):  # py-libp2p: best effort, the set above is what counts
            self.pubsub.add_to_blacklist(to_peer_id(peer))
        if self._nursery is not None and peer in self.connected_peers():
            self._nursery.start_soon(self._disconnect, peer)

    async def _disconnect(self, peer: str) -> None:
        with contextlib.suppress(Exception):  # best effort: the peer is refused anyway
            await self.host.disconnect(to_peer_id(peer))

    # -- streams ----------------------------------------------------------------------------------

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, *, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        """Serve ``protocol`` with ``await handler(stream)``; the stream is closed after it.

        A :class:`RemoteProtocolError` resets the stream and is counted against the peer
        (``on_malformed_rpc``); every error is logged and counted (``handler_errors``), never
        fatal. Banned peers are reset at once; so is a stream over the peer's rate
        (``stream_rate``/``stream_burst`` per peer and protocol) or over the caps of streams
        served at once per peer and per protocol (``streams_refused``; nobody is blamed).
        After the handler returns we close our side and read-and-discard at most
        ``max_frame`` bytes for ``dial_timeout`` seconds, then reset: nothing the peer keeps
        sending piles up in the muxer. Example::

            stack.set_stream_handler("/p2pcompute/echo/1", echo)
        """

        async def _wrapped(raw: Any) -> None:
            peer = b58(raw.muxed_conn.peer_id.to_bytes())
            stream = FramedStream(raw, peer=peer, max_frame=max_frame, protocol=protocol, tally=self.bytes)
            if peer in self.banned:
                await stream.reset()
                return
            if not self._rates.allow((peer, protocol), trio.current_time()):
                await self._refuse(stream, protocol, "rate")
                return
            if not self._peer_streams.acquire(peer):
                await self._refuse(stream, protocol, "streams per peer")
                return
            try:
                if not self._protocol_streams.acquire(protocol):
                    await self._refuse(stream, protocol, "streams per protocol")
                    return
                try:
                    await self._serve(stream, protocol, handler)
                finally:
                    self._protocol_streams.release(protocol)
            finally:
                self._peer_streams.release(peer)

        self.host.set_stream_handler(protocol, _wrapped)

    async def _refuse(self, stream: FramedStream, protocol: str, why: str) -> None:
        # ResourceLimitExceeded semantics: an honest "I am full", nobody is blamed
        self.stats["streams_refused"] = self.stats.get("streams_refused", 0) + 1
        log.debug("refusing a %s stream from %s: %s", protocol, stream.peer, why)
        await stream.reset()

    async def _serve(self, stream: FramedStream, protocol: str, handler: StreamHandler) -> None:
        peer = stream.peer or "?"
        try:
            await handler(stream)
        except RemoteProtocolError as exc:
            self.stats["handler_errors"] += 1
            log.info("stream %s from %s: %s", protocol, peer, exc)
            await stream.reset()
            self._on_malformed_rpc(peer, exc if exc.peer == peer else _blamed(exc, peer))
            return
        except P2PComputeError as exc:
            self.stats["handler_errors"] += 1
            log.info("stream %s from %s ended: %s", protocol, peer, exc)
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("handler for %s failed on a stream from %s", protocol, peer)
        await stream.close()
        await self._drain(stream)

    async def _drain(self, stream: FramedStream) -> None:
        """Read and discard what the peer still sends (bounded), then let the stream go."""
        budget = stream.max_frame
        with trio.move_on_after(self.config.dial_timeout):
            try:
                while budget > 0:
                    chunk = await stream.raw.read(65536)
                    if not chunk:
                        return
                    budget -= len(chunk)
            except Exception:  # EOF, reset, connection gone: the stream is finished
                return
        await stream.reset()

    def remove_stream_handler(self, protocol: str) -> None:
        """Stop serving ``protocol`` (a no-op when not served or when the host has stopped).

        Example::

            stack.remove_stream_handler("/p2pcompute/echo/1")
        """
        with contextlib.suppress(Exception):  # py-libp2p raises assorted types on a stopped host
            self.host.remove_stream_handler(protocol)

    async def open_stream(
        self,
        peer_id: str,
        protocol: str,
        *,
        timeout: float | None,
        max_frame: int = DEFAULT_MAX_FRAME,
        known_addrs: Sequence[str] = (),
    ) -> FramedStream:
        """A framed stream to ``peer_id`` speaking ``protocol``, dialing it (``known_addrs``) when needed.

        Raises :class:`PeerUnreachable` or :class:`PeerTimeout`, naming the peer. Example::

            stream = await stack.open_stream(peer, "/p2pcompute/echo/1", timeout=10)
        """
        pid = to_peer_id(peer_id)
        if peer_id in self.banned:
            raise PeerUnreachable(f"peer {peer_id} is blacklisted", peer=peer_id)
        relayed = [a for a in known_addrs if "/p2p-circuit" in a]
        direct = [a for a in known_addrs if "/p2p-circuit" not in a]
        with reaching(peer_id, f"opening {protocol}", timeout=timeout):
            if known_addrs and peer_id not in self.connected_peers():
                self._remember_addrs(pid, direct)
                if relayed:  # a private peer: its relays reach it when its own addresses do not
                    await self._dial_direct_then_relayed(peer_id, direct, relayed)
            raw = await self.host.new_stream(pid, [protocol])
        return FramedStream(raw, peer=peer_id, max_frame=max_frame, protocol=protocol, tally=self.bytes)

    async def _dial_direct_then_relayed(
        self, peer_id: str, direct: Sequence[str], relayed: Sequence[str]
    ) -> None:
        if direct:
            with trio.move_on_after(self.config.dial_timeout):
                try:
                    await self.host.connect(peer_info(f"{direct[0].split('/p2p/')[0]}/p2p/{peer_id}"))
                    return
                except Exception as exc:  # py-libp2p raises assorted types; the relay is the fallback
                    log.debug("direct dial to %s failed (%s); trying its relays", peer_id, exc)
        failure: PeerError | None = None
        for addr in relayed:
            try:
                await self.relay.dial(addr, peer_id)
                return
            except PeerError as exc:
                failure = exc
        if failure is not None:
            raise failure

    def _remember_addrs(self, pid: Any, addrs: Sequence[str]) -> None:
        maddrs = []
        for a in addrs:
            with contextlib.suppress(ConfigError):
                maddrs.append(parse_multiaddr(a.split("/p2p/")[0]))
        if maddrs:
            self.host.get_peerstore().add_addrs(pid, maddrs, 3600)

    # -- pubsub -----------------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on the full GossipSub ``topic`` id.

        Example::

            await stack.publish("/p2pcompute/lab/t/chat", b"hi")
        """
        await self.pubsub.publish(topic, bytes(data))

    async def subscribe(self, topic: str) -> Libp2pSubscription:
        """Subscribe to the full GossipSub ``topic`` id.

        Example::

            sub = await stack.subscribe("/p2pcompute/lab/t/chat")
        """
        return Libp2pSubscription(await self.pubsub.subscribe(topic))

    def set_topic_validator(self, topic: str, validator: GossipValidator) -> None:
        """Run ``validator(forwarder, msg)`` (py-libp2p objects, see :func:`gossip_message`) before
        a message of ``topic`` is delivered or forwarded. Example::

            stack.set_topic_validator(advert_topic("lab"), node._validate_advert)
        """
        self.pubsub.set_topic_validator(topic, validator, False)

    def topic_peers(self, topic: str) -> list[str]:
        """Peer ids (sorted) known to subscribe to the full GossipSub ``topic`` id.

        Example::

            stack.topic_peers("/p2pcompute/lab/t/tasks")
        """
        known = self.pubsub.peer_topics.get(topic, set())
        return sorted(str(p.to_base58()) for p in known)

    def mesh_size(self, topic: str) -> int:
        """How many peers are in our GossipSub mesh of the full ``topic`` id.

        Example::

            stack.mesh_size(advert_topic("lab"))
        """
        return len(self.gossipsub.mesh.get(topic, ()))

    async def _guarded_pubsub_stream(self, stream: Any) -> None:
        from google.protobuf.message import DecodeError  # py-libp2p's own dependency

        try:
            await self.pubsub.stream_handler(stream)
        except Exception as exc:  # any failure stays with this stream and its peer
            peer = str(stream.muxed_conn.peer_id.to_base58())
            log.info("pubsub stream from %s failed: %s: %s", peer, type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await stream.reset()
            if isinstance(exc, DecodeError):  # the peer sent bytes that are not an RPC
                self._on_malformed_rpc(peer, MalformedMessage(f"malformed pubsub RPC: {exc}", peer=peer))


def stream_remote_ip(stream: FramedStream) -> str | None:
    """The IP a stream's connection comes from, None when unknown or relayed (``/p2p-circuit``:
    the address would be the relay's). Example::

        stream_remote_ip(stream)     # '198.51.100.4'
    """
    try:
        muxed = stream.raw.muxed_conn  # type: ignore[attr-defined]
        addrs = muxed.get_transport_addresses() if hasattr(muxed, "get_transport_addresses") else []
        if any("/p2p-circuit" in str(a) for a in addrs or ()):
            return None
        remote = stream.raw.get_remote_address()  # type: ignore[attr-defined]
    except Exception:
        return None
    if not remote:
        return None
    try:
        import ipaddress

        return str(ipaddress.ip_address(remote[0]))
    except ValueError:
        return None


def _blamed(exc: RemoteProtocolError, peer: str) -> RemoteProtocolError:
    """``exc`` as the same kind of error naming ``peer`` (the stream's sender is the one to blame)."""
    try:
        return type(exc)(str(exc), peer=peer)
    except TypeError:
        return RemoteProtocolError(str(exc), peer=peer)


def _connection_watch(
    notify: Callable[[], None], opened: Callable[[Any], None], closed: Callable[[Any], None]
) -> Any:
    """A py-libp2p notifee: a connection that opens or closes calls ``opened(conn)`` or
    ``closed(conn)``, then ``notify()``."""
    from libp2p.abc import INotifee

    class ConnectionWatch(INotifee):
        async def connected(self, network: Any, conn: Any) -> None:
            opened(conn)
            notify()

        async def disconnected(self, network: Any, conn: Any) -> None:
            closed(conn)
            notify()

        async def opened_stream(self, network: Any, stream: Any) -> None:
            pass

        async def closed_stream(self, network: Any, stream: Any) -> None:
            pass

        async def listen(self, network: Any, multiaddr: Any) -> None:
            pass

        async def listen_close(self, network: Any, multiaddr: Any) -> None:
            pass

    return ConnectionWatch()


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """Every non-group exception inside ``group``, however deeply nested.

    Example::

        leaves(ExceptionGroup("x", [KeyError(1), ExceptionGroup("y", [OSError()])]))  # 2 leaves
    """
    found: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            found.append(exc)
    return found


def is_teardown_race(exc: BaseException) -> bool:
    """py-libp2p 0.8.1: a pubsub stream that delivers a message while the services stop schedules
    a task on a closed nursery. Harmless when the node is going away anyway.

    Example::

        is_teardown_race(RuntimeError("Nursery is closed to new arrivals"))   # True
    """
    return isinstance(exc, RuntimeError) and "closed to new arrivals" in str(exc)


def single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside ``group`` (py-libp2p's services and trio nurseries wrap it), or None.

    Example::

        single_leaf(ExceptionGroup("x", [ExceptionGroup("y", [KeyError(1)])]))   # KeyError(1)
    """
    found = leaves(group)
    return found[0] if len(found) == 1 else None


__all__ = [
    "GossipValidator",
    "Libp2pStack",
    "Libp2pSubscription",
    "StreamHandler",
    "b58",
    "gossip_message",
    "is_teardown_race",
    "leaves",
    "single_leaf",
    "stream_remote_ip",
]


def libp2p_key_pair(identity: Identity) -> Any:
    """``identity``'s key as a py-libp2p ``KeyPair``, so a host's peer id equals ``identity.peer_id``.

    Lives here, not on :class:`~p2pcompute.identity.Identity`, so that py-libp2p stays inside the overlay.

    Example::

        host = new_host(key_pair=libp2p_key_pair(Identity.generate()))
    """
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair(identity.seed())
