"""The node: one py-libp2p host with GossipSub, peer discovery, adverts and the peer table.

:func:`open_node` is an async context manager that owns everything a peer runs
in the background: the py-libp2p host (TCP, Noise, yamux), the Pubsub service
and GossipSub router, the advert publisher, peer exchange, the dialer that keeps
several direct connections, table expiry and the topic dispatchers. Leaving the
``async with`` block cancels and joins all of them.

How peers find each other (see docs/design/overlay.md):

* a node given bootstrap addresses connects to them and runs peer exchange
  (:mod:`p2pcompute.overlay.messages`): it pushes its own signed advert and
  pulls a sample of the signed adverts the other side knows;
* it then dials ``target_connections`` random peers from its table, so GossipSub
  gets a mesh rather than a star, and repeats exchange + dial every
  ``discovery_interval`` while it has fewer direct connections than that;
* every node publishes its advert (capacity + listen addresses) on the advert
  topic at start, on change and every ``advert_interval``; a peer that stays
  silent for ``advert_ttl`` leaves every table.

A bootstrap node is a node like any other (role ``"bootstrap"``); when it goes
away the others keep their direct connections and their mesh.

Imports :mod:`p2pcompute.capacity`, :mod:`p2pcompute.wire`, :mod:`p2pcompute.identity`
and :mod:`p2pcompute.errors`; never a higher layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import trio

from p2pcompute.capacity.adverts import MAX_ADVERT_SIZE, make_advert
from p2pcompute.capacity.model import Capacity, CapacityQuery
from p2pcompute.capacity.probe import probe_capacity
from p2pcompute.errors import (
    ConfigError,
    LocalProtocolError,
    MalformedMessage,
    P2PComputeError,
    PeerTimeout,
    PeerUnreachable,
    RemoteProtocolError,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay._logging import quiet_libp2p_logs
from p2pcompute.overlay.messages import (
    MAX_PX_ADVERTS,
    PEERS_REQUEST,
    PEERS_RESPONSE,
    advert_topic,
    check_swarm,
    peers_protocol,
    topic_name,
)
from p2pcompute.overlay.streams import DEFAULT_MAX_FRAME, FramedStream
from p2pcompute.overlay.table import PeerRecord, PeerTable

log = logging.getLogger(__name__)

TopicHandler = Callable[[str, bytes], Awaitable[None]]
StreamHandler = Callable[[FramedStream], Awaitable[None]]


@dataclass(frozen=True)
class NodeConfig:
    """Tuning of a node; every field may be passed to :func:`open_node` as a keyword.

    GossipSub: ``degree``/``degree_low``/``degree_high`` (6/5/12, the values that
    delivered 100 % in notes/gossipsub-scale.md), ``heartbeat_interval`` (1 s;
    py-libp2p's default is 120 s), ``topic_rate_limit`` (messages per second per
    forwarding peer per topic before GossipSub drops them; py-libp2p's default of
    10 silently dropped adverts during joins), ``max_message_size``.
    Discovery: ``target_connections`` direct connections to non-bootstrap peers,
    ``discovery_interval``, ``dial_timeout``, ``px_limit`` adverts per exchange.
    Adverts: ``advertise``, ``role``, ``advert_interval``, ``advert_ttl``,
    ``probe_interval``, ``capacity`` (fixed, skips probing), ``announce`` (addresses
    to advertise instead of the listen addresses), ``max_skew`` (clock skew tolerated).
    Abuse: ``offence_limit`` rejected messages (not counting stale ones) before a
    peer is blacklisted.
    """

    degree: int = 6
    degree_low: int = 5
    degree_high: int = 12
    heartbeat_interval: float = 1.0
    topic_rate_limit: float = 256.0
    max_message_size: int = 1 << 20
    target_connections: int = 4
    discovery_interval: float = 5.0
    dial_timeout: float = 5.0
    px_limit: int = 100
    advertise: bool = True
    role: str = "peer"
    advert_interval: float = 10.0
    advert_ttl: float = 30.0
    probe_interval: float = 5.0
    capacity: Capacity | None = None
    announce: tuple[str, ...] = ()
    max_skew: float = 10.0
    expire_interval: float = 1.0
    offence_limit: int = 20
    handler_queue: int = 256
    max_connections: int = 1000

    def check(self) -> NodeConfig:
        if not (1 <= self.degree_low <= self.degree <= self.degree_high):
            raise ConfigError("need 1 <= degree_low <= degree <= degree_high")
        positive = (
            "heartbeat_interval",
            "topic_rate_limit",
            "discovery_interval",
            "dial_timeout",
            "advert_interval",
            "advert_ttl",
            "probe_interval",
            "expire_interval",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        if self.advert_ttl < self.advert_interval:
            raise ConfigError("advert_ttl must be at least advert_interval")
        if self.role not in ("peer", "bootstrap"):
            raise ConfigError(f"role must be 'peer' or 'bootstrap', not {self.role!r}")
        if not 0 <= self.px_limit <= MAX_PX_ADVERTS:
            raise ConfigError(f"px_limit must be within 0..{MAX_PX_ADVERTS}")
        if self.target_connections < 0 or self.handler_queue < 1 or self.max_message_size < 1:
            raise ConfigError("target_connections, handler_queue and max_message_size must be positive")
        return self


def _parse_multiaddr(text: str) -> Any:
    import multiaddr

    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ConfigError(f"bad multiaddr {text!r}: {exc}") from None


def _peer_info(addr: str) -> Any:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    maddr = _parse_multiaddr(addr)
    try:
        return info_from_p2p_addr(maddr)
    except Exception as exc:
        raise ConfigError(f"multiaddr {addr!r} does not end in /p2p/<peer id> ({exc})") from None


def _to_id(peer_id: str) -> Any:
    from libp2p.peer.id import ID

    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise LocalProtocolError(f"not a peer id: {peer_id!r}") from None


class Node:
    """A running peer. Create it with :func:`open_node`, never directly.

    Example::

        async with open_node(identity, bootstrap=[addr]) as node:
            node.subscribe("chat", on_chat)
            await node.wait_for_peers(3, timeout=10)
            await node.publish("chat", b"hello")
            best = node.find_peers(min_gpu_memory=24 << 30)
    """

    def __init__(self, identity: Identity, swarm: str, config: NodeConfig, *, clock: Callable[[], float]):
        from libp2p import new_host
        from libp2p.network.config import ConnectionConfig
        from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub

        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.config = config
        self._clock = clock
        conn_cfg = ConnectionConfig(
            max_connections_per_peer=1,  # else every dial waits 250 ms (notes P1)
            max_connections=config.max_connections,
            min_connections=0,
            low_watermark=min(512, config.max_connections),
            high_watermark=min(768, config.max_connections),
            dial_timeout=config.dial_timeout,
        )
        self.host: Any = new_host(
            key_pair=identity.libp2p_key_pair(),
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
        self.peers = PeerTable(self.peer_id, swarm, max_skew=config.max_skew, clock=clock)
        self._advert_topic = advert_topic(swarm)
        self._px_protocol = peers_protocol(swarm)
        self._nursery: trio.Nursery | None = None
        self._topics: dict[str, list[TopicHandler]] = {}
        self._bootstrap_ids: set[str] = set()
        self._bootstrap_addrs: list[str] = []
        self._banned: set[str] = set()
        self._changed = trio.Event()
        self.host.get_network().register_notifee(_connection_watch(self._notify))
        self._seq = time.time_ns() // 1000  # survives restarts without a state file
        self._current_advert: bytes | None = None
        self._published_capacity: Capacity | None = None
        self._last_publish = -math.inf
        self._rng = random.Random()
        self.stats: dict[str, int] = {
            "adverts_published": 0,
            "px_served": 0,
            "px_requested": 0,
            "dials": 0,
            "dial_failures": 0,
            "handler_errors": 0,
            "dropped_messages": 0,
            "banned": 0,
        }

    # -- addresses and connections ----------------------------------------------------------------

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs of this node, each ending in ``/p2p/<peer id>``."""
        if self.config.announce:
            base = [a.split("/p2p/")[0] for a in self.config.announce]
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

    def topic_peers(self, topic: str) -> list[str]:
        """Peer ids (sorted) known through GossipSub to subscribe to our ``topic`` (unprefixed name).

        Example::

            providers = node.topic_peers("tasks")
        """
        known = self.pubsub.peer_topics.get(topic_name(self.swarm, topic), set())
        return sorted(str(p.to_base58()) for p in known)

    def connected_peers(self) -> list[str]:
        """Peer ids this node has a live connection to."""
        return [p.to_base58() for p in self.host.get_connected_peers()]

    async def connect(self, addr: str, *, timeout: float | None = None) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); return the peer id (PeerUnreachable/PeerTimeout)."""
        info = _peer_info(addr)
        await self._dial(info, timeout=timeout)
        return str(info.peer_id.to_base58())

    async def _dial(self, info: Any, *, timeout: float | None = None) -> None:
        peer = info.peer_id.to_base58()
        if peer in self._banned:
            raise PeerUnreachable(f"peer {peer} is blacklisted")
        self.stats["dials"] += 1
        try:
            with trio.fail_after(timeout or self.config.dial_timeout):
                await self.host.connect(info)
        except trio.TooSlowError:
            self.stats["dial_failures"] += 1
            raise PeerTimeout(f"dialing {peer} timed out") from None
        except Exception as exc:  # py-libp2p raises many unrelated types for a failed dial
            self.stats["dial_failures"] += 1
            raise PeerUnreachable(f"cannot connect to {peer}: {exc.__class__.__name__}: {exc}") from None

    # -- pubsub -----------------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on the swarm's ``topic`` (a short name such as ``"tasks/1"``).

        Example::

            await node.publish("tasks/1", encode({"t": "offer", "v": 1}))
        """
        if len(data) > self.config.max_message_size:
            raise LocalProtocolError(
                f"{len(data)}-byte message over the cap of {self.config.max_message_size}"
            )
        await self.pubsub.publish(topic_name(self.swarm, topic), bytes(data))

    def subscribe(self, topic: str, handler: TopicHandler) -> None:
        """Call ``await handler(sender_peer_id, data)`` for every message on ``topic`` from another peer.

        Handlers of one topic run one message at a time, in arrival order, in the
        node's nursery; an exception is logged and counted, never fatal. Messages
        beyond ``handler_queue`` waiting ones are dropped and counted.

        Example::

            async def on_offer(sender: str, data: bytes) -> None: ...
            node.subscribe("tasks/1", on_offer)
        """
        full = topic_name(self.swarm, topic)
        handlers = self._topics.get(full)
        if handlers is not None:
            handlers.append(handler)
            return
        self._topics[full] = [handler]
        assert self._nursery is not None, "subscribe() on a node that is not running"
        self._nursery.start_soon(self._run_topic, full)

    async def _run_topic(self, full: str) -> None:
        send, recv = trio.open_memory_channel[tuple[str, bytes]](self.config.handler_queue)
        sub = await self.pubsub.subscribe(full)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dispatch, full, recv)
            while True:
                msg = await sub.get()
                sender = _b58(msg.from_id)
                if sender == self.peer_id:
                    continue
                try:
                    send.send_nowait((sender, bytes(msg.data)))
                except trio.WouldBlock:
                    self.stats["dropped_messages"] += 1

    async def _dispatch(self, full: str, recv: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        async for sender, data in recv:
            for handler in list(self._topics.get(full, ())):
                try:
                    await handler(sender, data)
                except Exception:
                    self.stats["handler_errors"] += 1
                    log.exception("handler for %s failed on a message from %s", full, sender)

    # -- streams ----------------------------------------------------------------------------------

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, *, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        """Serve ``protocol``: ``await handler(stream)`` per inbound stream (``stream.peer`` = remote id).

        The stream is closed when the handler returns; exceptions are logged, never fatal.

        Example::

            async def echo(stream: FramedStream) -> None:
                await stream.send_msg(await stream.recv_msg(max_size=1024))
            node.set_stream_handler("/p2pcompute/echo/1", echo)
        """

        async def _wrapped(raw: Any) -> None:
            peer = _b58(raw.muxed_conn.peer_id.to_bytes())
            stream = FramedStream(raw, peer=peer, max_frame=max_frame)
            if peer in self._banned:
                await stream.reset()
                return
            try:
                await handler(stream)
            except RemoteProtocolError as exc:
                self.stats["handler_errors"] += 1
                log.info("stream %s from %s: %s", protocol, peer, exc)
                await stream.reset()
                return
            except P2PComputeError as exc:
                self.stats["handler_errors"] += 1
                log.info("stream %s from %s ended: %s", protocol, peer, exc)
            except Exception:
                self.stats["handler_errors"] += 1
                log.exception("handler for %s failed on a stream from %s", protocol, peer)
            await stream.close()

        self.host.set_stream_handler(protocol, _wrapped)

    def remove_stream_handler(self, protocol: str) -> None:
        """Stop serving ``protocol`` (a no-op when it is not served or the host has stopped).

        Example::

            node.remove_stream_handler("/p2pcompute/echo/1")
        """
        with contextlib.suppress(Exception):  # py-libp2p raises assorted types on a stopped host
            self.host.remove_stream_handler(protocol)

    def listen_ips(self) -> list[str]:
        """The IP addresses this node's transports listen on (wildcards kept), first seen first.

        Unlike :attr:`addrs` these ignore ``announce``: they say where a socket of ours can
        bind beside the host. Example::

            node.listen_ips()      # ['127.0.0.1']
        """
        ips: list[str] = []
        for addr in self.host.get_addrs():
            parts = str(addr).split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in ips:
                ips.append(parts[2])
        return ips

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME
    ) -> FramedStream:
        """Open a framed stream to ``peer_id`` speaking ``protocol``; dials it when not connected.

        Raises :class:`PeerUnreachable` or :class:`PeerTimeout`.

        Example::

            stream = await node.open_stream(peer, "/p2pcompute/echo/1")
            await stream.send_msg({"t": "ping", "v": 1})
        """
        pid = _to_id(peer_id)
        if peer_id in self._banned:
            raise PeerUnreachable(f"peer {peer_id} is blacklisted")
        rec = self.peers.get(peer_id)
        if rec is not None and peer_id not in self.connected_peers():
            self._remember_addrs(peer_id, rec.addrs)
        try:
            with trio.fail_after(timeout):
                raw = await self.host.new_stream(pid, [protocol])
        except trio.TooSlowError:
            raise PeerTimeout(f"opening {protocol} to {peer_id} timed out") from None
        except Exception as exc:  # py-libp2p: SwarmException, StreamFailure, MultiselectError ...
            raise PeerUnreachable(
                f"cannot open {protocol} to {peer_id}: {exc.__class__.__name__}: {exc}"
            ) from None
        return FramedStream(raw, peer=peer_id, max_frame=max_frame)

    def _remember_addrs(self, peer_id: str, addrs: Sequence[str]) -> None:
        maddrs = []
        for a in addrs:
            with contextlib.suppress(ConfigError):
                maddrs.append(_parse_multiaddr(a.split("/p2p/")[0]))
        if maddrs:
            self.host.get_peerstore().add_addrs(_to_id(peer_id), maddrs, 3600)

    # -- peer table -------------------------------------------------------------------------------

    def find_peers(
        self,
        *,
        gpus: int = 0,
        min_gpu_memory: int = 0,
        min_free_memory: int = 0,
        min_compute_capability: str | None = None,
        gpu_name: str | None = None,
        min_ram: int = 0,
        cuda: bool | None = None,
        limit: int | None = None,
        include_bootstrap: bool = False,
    ) -> list[PeerRecord]:
        """Live peers whose capacity matches, best first (most free memory on matching GPUs).

        Memory figures are bytes; ``gpus`` is how many GPUs must match the per-GPU
        criteria. See :class:`~p2pcompute.capacity.model.CapacityQuery`.

        Example::

            two_big = node.find_peers(gpus=2, min_gpu_memory=40 << 30)
        """
        query = CapacityQuery(
            gpus=gpus,
            min_gpu_memory=min_gpu_memory,
            min_free_memory=min_free_memory,
            min_compute_capability=min_compute_capability,
            gpu_name=gpu_name,
            min_ram=min_ram,
            cuda=cuda,
        )
        roles = ("peer", "bootstrap") if include_bootstrap else ("peer",)
        found = self.peers.find(query, roles=roles, limit=None)
        found = [r for r in found if r.peer_id not in self._banned]
        return found if limit is None else found[:limit]

    async def wait_for_peers(self, n: int, *, timeout: float, role: str | None = None) -> list[PeerRecord]:
        """Wait until at least ``n`` other live peers are in the table (optionally of ``role``).

        Raises :class:`PeerTimeout` after ``timeout`` seconds.

        Example::

            await node.wait_for_peers(3, timeout=30)
        """

        def current() -> list[PeerRecord]:
            return [r for r in self.peers.alive() if role is None or r.role == role]

        try:
            with trio.fail_after(timeout):
                while len(found := current()) < n:
                    await self._changed.wait()
        except trio.TooSlowError:
            raise PeerTimeout(f"only {len(current())} of {n} peers known after {timeout} s") from None
        return found

    async def wait_until(self, condition: Callable[[], bool], *, timeout: float) -> None:
        """Wait until ``condition()`` is true; it is checked again whenever the peer table or
        the set of connections changes. Raises :class:`PeerTimeout` after ``timeout`` seconds.

        Example::

            # at least three direct links besides the bootstrap node
            await node.wait_until(lambda: len(node.connected_peers()) >= 4, timeout=30)
            # a peer that left has expired here
            await node.wait_until(lambda: gone not in node.peers, timeout=60)
        """
        try:
            with trio.fail_after(timeout):
                while not condition():
                    await self._changed.wait()
        except trio.TooSlowError:
            raise PeerTimeout(f"condition not met after {timeout} s") from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

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
                self.peers.count_offence(peer, MalformedMessage(f"malformed pubsub RPC: {exc}", peer=peer))
                self._blame(peer)

    def _blame(self, peer: str | None) -> None:
        if peer is None or peer in self._banned or peer == self.peer_id:
            return
        self._notify()  # an offence was counted: the table changed
        if self.peers.offence_total(peer) >= self.config.offence_limit:
            self._banned.add(peer)
            self.stats["banned"] += 1
            self.peers.remove(peer)
            log.warning("blacklisting %s after %d rejected messages", peer, self.peers.offence_total(peer))
            with contextlib.suppress(Exception):
                self.pubsub.add_to_blacklist(_to_id(peer))

    def _validate_advert(self, forwarder: Any, msg: Any) -> bool:
        """GossipSub topic validator: only checked, new adverts are delivered and forwarded."""
        origin = _b58(msg.from_id)
        if origin == self.peer_id:
            return True
        blame = forwarder.to_base58()
        try:
            outcome, _advert = self.peers.offer(msg.data, sender=origin, blame=blame)
        except RemoteProtocolError as exc:
            log.debug("rejected advert via %s: %s", blame, exc)
            self._blame(blame)
            return False
        if outcome in ("new", "updated"):
            self._notify()
        return True

    # -- peer exchange ----------------------------------------------------------------------------

    async def _serve_px(self, stream: FramedStream) -> None:
        try:
            await self._serve_px_inner(stream)
        except trio.TooSlowError:
            raise PeerTimeout(f"peer exchange with {stream.peer} timed out") from None

    async def _serve_px_inner(self, stream: FramedStream) -> None:
        with trio.fail_after(self.config.dial_timeout):
            req = await stream.recv_msg(PEERS_REQUEST)
            if req["advert"] is not None:
                self._offer_px(req["advert"], sender=stream.peer, blame=stream.peer)
            self.stats["px_served"] += 1
            limit = req["limit"]
            candidates = [] if self._current_advert is None else [self._current_advert]
            candidates += self.peers.sample_adverts(None, limit, self._rng)
            adverts: list[bytes] = []
            room = PEERS_RESPONSE.max_size - 1024  # msgpack framing of the list stays well inside
            for raw in candidates[: limit + 1]:
                if len(raw) + 8 > room:
                    break
                adverts.append(raw)
                room -= len(raw) + 8
            await stream.send_msg(PEERS_RESPONSE.validate({"t": "peers", "v": 1, "adverts": adverts}))

    def _offer_px(self, raw: bytes, *, sender: str | None, blame: str | None) -> bool:
        try:
            outcome, _ = self.peers.offer(raw, sender=sender, blame=blame, count_stale=False)
        except RemoteProtocolError as exc:
            log.debug("rejected advert from peer exchange with %s: %s", blame, exc)
            self._blame(blame)
            return False
        if outcome in ("new", "updated"):
            self._notify()
        return True

    async def exchange_peers(self, peer_id: str, *, timeout: float | None = None) -> int:
        """Push our advert to ``peer_id`` and pull its sample of adverts; return how many were accepted."""
        timeout = timeout or self.config.dial_timeout
        self.stats["px_requested"] += 1
        stream = await self.open_stream(
            peer_id, self._px_protocol, timeout=timeout, max_frame=PEERS_RESPONSE.max_size
        )
        accepted = 0
        try:
            with trio.fail_after(timeout):
                await stream.send_msg(
                    {
                        "t": "peers_req",
                        "v": 1,
                        "limit": self.config.px_limit,
                        **({"advert": self._current_advert} if self._current_advert else {}),
                    }
                )
                resp = await stream.recv_msg(PEERS_RESPONSE)
        except trio.TooSlowError:
            await stream.reset()
            raise PeerTimeout(f"peer exchange with {peer_id} timed out") from None
        except RemoteProtocolError:
            await stream.reset()
            raise
        finally:
            await stream.close()
        for raw in resp["adverts"][: self.config.px_limit + 1]:
            if len(raw) <= MAX_ADVERT_SIZE and self._offer_px(raw, sender=None, blame=peer_id):
                accepted += 1
        return accepted

    # -- background work --------------------------------------------------------------------------

    async def _join(self, bootstrap: Sequence[str]) -> None:
        infos = [_peer_info(a) for a in bootstrap]
        self._bootstrap_addrs = list(bootstrap)
        errors: list[str] = []
        reached = []
        for info in infos:
            peer = info.peer_id.to_base58()
            if peer == self.peer_id:
                continue
            self._bootstrap_ids.add(peer)
            try:
                await self._dial(info)
            except (PeerUnreachable, PeerTimeout) as exc:
                errors.append(str(exc))
                continue
            reached.append(peer)
        if infos and not reached and errors:
            raise PeerUnreachable(f"no bootstrap node reachable ({'; '.join(errors)})")
        for peer in reached:
            with contextlib.suppress(P2PComputeError):
                await self.exchange_peers(peer)

    async def _dial_more(self) -> None:
        connected = set(self.connected_peers())
        others = connected - self._bootstrap_ids
        need = self.config.target_connections - len(others)
        if need <= 0:
            return
        candidates = [
            r
            for r in self.peers.alive()
            if r.peer_id not in connected
            and r.peer_id not in self._banned
            and r.peer_id not in self._bootstrap_ids
        ]
        chosen = self._rng.sample(candidates, min(need, len(candidates)))
        if not chosen:
            return

        async def one(rec: PeerRecord) -> None:
            addrs = [a if "/p2p/" in a else f"{a}/p2p/{rec.peer_id}" for a in rec.addrs]
            for addr in addrs:
                try:
                    info = _peer_info(addr)
                    await self._dial(info)
                except P2PComputeError as exc:
                    log.debug("dial %s failed: %s", addr, exc)
                    continue
                with contextlib.suppress(P2PComputeError):
                    await self.exchange_peers(rec.peer_id)
                return

        async with trio.open_nursery() as nursery:
            for rec in chosen:
                nursery.start_soon(one, rec)

    async def _discovery_loop(self) -> None:
        while True:
            await trio.sleep(self.config.discovery_interval * self._rng.uniform(0.75, 1.25))
            connected = self.connected_peers()
            if not connected and self._bootstrap_addrs:
                for addr in self._bootstrap_addrs:
                    with contextlib.suppress(P2PComputeError):
                        await self.connect(addr)
                connected = self.connected_peers()
            # anti-entropy: one push-pull exchange per round with a random neighbour, so tables
            # stay fresh even where GossipSub's mesh is thin (back-off after pruning, see notes)
            if connected:
                with contextlib.suppress(P2PComputeError):
                    await self.exchange_peers(self._rng.choice(connected))
            await self._dial_more()

    def _build_advert(self, capacity: Capacity) -> bytes:
        self._seq += 1
        return make_advert(
            self.identity,
            peer_id=self.peer_id,
            swarm=self.swarm,
            seq=self._seq,
            capacity=capacity,
            addrs=self.addrs,
            ttl=self.config.advert_ttl,
            role=self.config.role,
            issued=self._clock(),
        )

    async def _probe(self) -> Capacity:
        if self.config.capacity is not None:
            return self.config.capacity
        return await trio.to_thread.run_sync(probe_capacity)

    async def _advert_loop(self, capacity: Capacity) -> None:
        # First adverts come quickly (a mesh may not exist yet when we join), then every interval.
        early = [0.5, 1.5]
        while True:
            due = self._clock() - self._last_publish >= self.config.advert_interval * 0.95
            changed = self._published_capacity is None or not capacity.roughly_equals(
                self._published_capacity
            )
            if due or changed or early:
                await self._publish_advert(capacity)
            delay = early.pop(0) if early else min(self.config.probe_interval, self.config.advert_interval)
            await trio.sleep(delay)
            if self.config.capacity is None:
                capacity = await self._probe()

    async def readvertise(self) -> None:
        """Publish a fresh advert now (new sequence number, same capacity); a no-op for observers.

        Example::

            await node.readvertise()     # after changing what this node offers
        """
        if self._published_capacity is not None:
            await self._publish_advert(await self._probe())

    async def _publish_advert(self, capacity: Capacity) -> None:
        self._current_advert = self._build_advert(capacity)
        self._published_capacity = capacity
        self._last_publish = self._clock()
        try:
            await self.pubsub.publish(self._advert_topic, self._current_advert)
            self.stats["adverts_published"] += 1
        except Exception as exc:  # publishing must never take the node down
            log.warning("publishing our advert failed: %r", exc)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(self.config.expire_interval)
            gone = self.peers.expire()
            if gone:
                log.info("peers expired: %s", ", ".join(gone))
                self._notify()

    async def _drain_adverts(self) -> None:
        sub = await self.pubsub.subscribe(self._advert_topic)
        while True:
            await sub.get()  # the validator already entered the advert; keep the channel empty

    def statistics(self) -> dict[str, Any]:
        """Counters: adverts, exchanges, dials, drops, offences, connections, table size."""
        out: dict[str, Any] = dict(self.stats)
        out.update(self.peers.statistics())
        out["connections"] = len(self.host.get_connected_peers())
        mesh = self.gossipsub.mesh.get(self._advert_topic, ())
        out["advert_mesh"] = len(mesh)
        return out


def _b58(raw: bytes) -> str:
    from libp2p.peer.id import ID

    return str(ID(raw).to_base58())


@contextlib.asynccontextmanager
async def open_node(
    identity: Identity | None = None,
    *,
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    bootstrap: Sequence[str] = (),
    swarm: str = "default",
    clock: Callable[[], float] = time.time,
    **tuning: Any,
) -> AsyncIterator[Node]:
    """Run a node for the duration of the ``async with`` block.

    ``identity``: the node's key (default: a fresh one). ``listen``: multiaddrs to
    listen on. ``bootstrap``: full multiaddrs (``.../p2p/<id>``) of nodes to join
    through; when none of them answers, :class:`PeerUnreachable` is raised. A bad
    multiaddr or option raises :class:`ConfigError`. ``tuning``: fields of
    :class:`NodeConfig`.

    Example::

        async with open_node(Identity.load_or_create("peer.key"),
                             bootstrap=["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."]) as node:
            await node.wait_for_peers(2, timeout=30)
            print([p.peer_id for p in node.find_peers(gpus=1)])
    """
    quiet_libp2p_logs()
    from libp2p.tools.anyio_service import background_trio_service

    names = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(tuning) - names)
    if unknown:
        raise ConfigError(f"unknown node option(s): {', '.join(unknown)}")
    if "announce" in tuning:
        tuning["announce"] = tuple(tuning["announce"])
    config = replace(NodeConfig(), **tuning).check()
    check_swarm(swarm)
    listen_addrs = [_parse_multiaddr(a) for a in listen]
    for a in bootstrap:
        _peer_info(a)
    for a in config.announce:
        _parse_multiaddr(a)
    node = Node(identity or Identity.generate(), swarm, config, clock=clock)
    listening = False
    body_done = False
    try:
        async with node.host.run(listen_addrs=listen_addrs):
            listening = True
            async with background_trio_service(node.pubsub), background_trio_service(node.gossipsub):
                await node.pubsub.wait_until_ready()
                node.pubsub.set_topic_validator(node._advert_topic, node._validate_advert, False)
                async with trio.open_nursery() as nursery:
                    node._nursery = nursery
                    nursery.start_soon(node._drain_adverts)
                    # requests are capped by the PEERS_REQUEST schema; the frame cap must fit the reply
                    node.set_stream_handler(
                        node._px_protocol, node._serve_px, max_frame=PEERS_RESPONSE.max_size
                    )
                    capacity = None
                    if config.advertise:
                        capacity = await node._probe()
                        node._current_advert = node._build_advert(capacity)
                    await node._join(bootstrap)
                    if capacity is not None:
                        nursery.start_soon(node._advert_loop, capacity)
                    nursery.start_soon(node._dial_more)  # direct links to several peers, in the background
                    nursery.start_soon(node._discovery_loop)
                    nursery.start_soon(node._expire_loop)
                    try:
                        yield node
                        body_done = True
                    finally:
                        nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_done and all(_is_teardown_race(e) for e in _leaves(group)):
            # py-libp2p 0.8.1: a pubsub stream that delivers a message while the services
            # stop schedules a task on a closed nursery; the node is going away anyway
            log.debug("ignored a py-libp2p teardown race: %r", group)
            return
        # py-libp2p's services and our nursery wrap whatever the body raised; hand the
        # caller the exception itself when there is exactly one.
        leaf = single_leaf(group)
        if leaf is None:
            raise
        if isinstance(leaf, OSError) and not listening:
            raise ConfigError(f"cannot listen on {', '.join(listen)}: {leaf.strerror or leaf}") from None
        raise leaf from None
    except OSError as exc:
        if listening:
            raise
        raise ConfigError(f"cannot listen on {', '.join(listen)}: {exc.strerror or exc}") from None


def _connection_watch(notify: Callable[[], None]) -> Any:
    """A py-libp2p notifee: a connection that opens or closes wakes :meth:`Node.wait_until`."""
    from libp2p.abc import INotifee

    class ConnectionWatch(INotifee):
        async def connected(self, network: Any, conn: Any) -> None:
            notify()

        async def disconnected(self, network: Any, conn: Any) -> None:
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


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves


def _is_teardown_race(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "closed to new arrivals" in str(exc)


def single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves = _leaves(group)
    return leaves[0] if len(leaves) == 1 else None


__all__ = ["Node", "NodeConfig", "open_node"]
