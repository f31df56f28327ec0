"""The node: one py-libp2p host with GossipSub, peer discovery, adverts and the peer table.

:func:`open_node` is an async context manager that owns everything a peer runs
in the background: the py-libp2p host (TCP, Noise, yamux), the Pubsub service
and GossipSub router, the advert publisher, peer exchange, the dialer that keeps
several direct connections, table expiry and the topic dispatchers. Leaving the
``async with`` block cancels and joins all of them.

:class:`Node` is a thin facade that owns the nursery; the work is done by

* :class:`~p2pcompute.overlay.host.Libp2pStack`: every use of py-libp2p (host and
  GossipSub construction, guarded pubsub streams, connections, raw streams);
* :class:`~p2pcompute.overlay.discovery.Discovery`: joining, dialing more peers, the
  advert, discovery and expiry loops, peer exchange (how peers find each other is
  described there and in docs/design/overlay.md);
* :class:`~p2pcompute.overlay.topics.TopicRouter`: topic handlers and their queues;
* :class:`~p2pcompute.overlay.table.PeerTable`: who is alive and what they offer;
* :mod:`p2pcompute.overlay.failures`: the one mapping of py-libp2p's exceptions to ours.

A bootstrap node is a node like any other (role ``"bootstrap"``); when it goes
away the others keep their direct connections and their mesh.

Imports :mod:`p2pcompute.capacity`, :mod:`p2pcompute.wire`, :mod:`p2pcompute.identity`,
:mod:`p2pcompute.deadlines` and :mod:`p2pcompute.errors`; never a higher layer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from p2pcompute.capacity.model import CapacityQuery
from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import LocalProtocolError, P2PComputeError, PeerTimeout, RemoteProtocolError
from p2pcompute.identity import Identity
from p2pcompute.overlay._logging import quiet_libp2p_logs
from p2pcompute.overlay.config import NodeConfig, node_config
from p2pcompute.overlay.discovery import Discovery
from p2pcompute.overlay.failures import listen_failure, parse_multiaddr, peer_info
from p2pcompute.overlay.host import (
    Libp2pStack,
    StreamHandler,
    gossip_message,
    is_teardown_race,
    leaves,
    single_leaf,
    stream_remote_ip,
)
from p2pcompute.overlay.messages import check_swarm, topic_name
from p2pcompute.overlay.reach import (
    PRIVATE,
    REACH_PROTOCOL,
    UNKNOWN,
    Reachability,
    advertisable,
    ask_dial_back,
    is_loopback,
    serve_dial_back,
)
from p2pcompute.overlay.streams import DEFAULT_MAX_FRAME, FramedStream
from p2pcompute.overlay.table import PeerRecord, PeerTable
from p2pcompute.overlay.topics import TopicHandler, TopicRouter

log = logging.getLogger(__name__)


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
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.config = config
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self.stats: dict[str, int] = {
            "adverts_published": 0,
            "px_served": 0,
            "px_requested": 0,
            "dials": 0,
            "dial_failures": 0,
            "handler_errors": 0,
            "dropped_messages": 0,
            "banned": 0,
            "streams_refused": 0,
            "connections_refused": 0,
            "buffer_overflows": 0,
            "identity_conflicts": 0,
        }
        self.peers = PeerTable(
            self.peer_id,
            swarm,
            max_skew=config.max_skew,
            clock=clock,
            max_peers=config.max_peers,
            max_ttl=config.max_advert_ttl,
            max_per_ip=config.table_per_ip,
            max_per_subnet=config.table_per_subnet,
            max_per_relay=config.table_per_relay,
            exempt=config.exempt_networks,
        )
        self._stack = Libp2pStack(
            identity,
            config,
            stats=self.stats,
            on_connections=self._on_connections,
            on_malformed_rpc=lambda peer, exc: self._discovery.report_offence(peer, exc),
            app_score=lambda peer: -config.offence_weight * self.peers.offence_total(peer),
            advert_age=lambda peer: self._discovery.advert_age(peer),
        )
        self.host: Any = self._stack.host  # for the tensor lane and tests; prefer the methods below
        self.pubsub: Any = self._stack.pubsub
        self.gossipsub: Any = self._stack.gossipsub
        self._discovery = Discovery(
            identity,
            swarm,
            config,
            net=self._stack,
            peers=self.peers,
            addrs=lambda: self.addrs,
            notify=self._notify,
            stats=self.stats,
            clock=clock,
        )
        self._topics = TopicRouter(
            self._stack.subscribe,
            own_id=self.peer_id,
            queue=config.handler_queue,
            stats=self.stats,
            on_offence=self.report_offence,
        )
        self._advert_topic = self._discovery.advert_topic
        manual = None if config.reachability == "auto" else config.reachability
        self.reach = Reachability(manual=manual)
        self._stack.relay.observed_ips = lambda: sorted(set(self.reach.observed.values()))  # for DCUtR

    # -- addresses and connections ----------------------------------------------------------------

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs of this node, each ending in ``/p2p/<peer id>`` (``announce`` when set).

        Example::

            other = await stack.enter_async_context(open_node(bootstrap=boot.addrs))
        """
        if self.config.announce:
            return self._stack.full_addrs(self.config.announce)
        own = f"/p2p/{self.peer_id}"
        relayed = [f"{c}{own}" for c in self._stack.relay.reservations.values()]
        reached = [f"{a}{own}" for a in self.reach.reached]
        state = self.reach.state
        return advertisable(self._stack.full_addrs(), state=state, relayed=relayed, reached=reached)[:8]

    @property
    def reachability(self) -> str:
        """``public`` (a peer dialed us back), ``private`` (behind NAT or a firewall: reached
        through relays) or ``unknown``. See docs/design/nat.md.

        Example::

            if node.reachability == "private": print("reached through", node.addrs)
        """
        return self.reach.state

    def link(self, peer_id: str) -> str:
        """How we are connected to ``peer_id``: ``"direct"``, ``"punched"`` (direct, made by hole
        punching through NATs), ``"circuit"`` (through a relay) or ``""`` (not connected). Example::

            node.link(peer)      # 'circuit' for a peer behind NAT reached through a relay
        """
        if peer_id in self._stack.direct_peers():
            return "punched" if peer_id in self._stack.relay.punched else "direct"
        return "circuit" if peer_id in self._stack.connected_peers() else ""

    def reach_status(self) -> dict[str, Any]:
        """Reachability for status output: ``state``, ``observed`` IPs, dialed-back addresses
        (``reached``), ``relays`` we hold a reservation at, ``relay`` (whether we relay for
        others) and ``relay_reservations_served``. Example::

            print(node.reach_status()["state"])
        """
        out: dict[str, Any] = dict(self.reach.statistics())
        out["relays"] = sorted(self._stack.relay.reservations)
        out["relay"] = self.config.relay
        out["relay_reservations_served"] = self._stack.relay.served() if self.config.relay else 0
        out["relayed_peers"] = len(self._stack.relayed_peers())
        return out

    def topic_peers(self, topic: str) -> list[str]:
        """Peer ids (sorted) known through GossipSub to subscribe to our ``topic`` (unprefixed name).

        Example::

            providers = node.topic_peers("tasks")
        """
        return self._stack.topic_peers(topic_name(self.swarm, topic))

    def connected_peers(self) -> list[str]:
        """Peer ids this node has a live connection to.

        Example::

            direct = set(node.connected_peers())
        """
        return self._stack.connected_peers()

    async def connect(self, addr: str, *, timeout: float | None = None) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); return the peer id.

        Raises :class:`ConfigError` (bad address), :class:`PeerUnreachable` or
        :class:`PeerTimeout` (both name the peer). Example::

            peer = await node.connect("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW...", timeout=5)
        """
        return await self._stack.dial(addr, timeout=timeout)

    def listen_ips(self) -> list[str]:
        """The IP addresses this node's transports listen on (wildcards kept), first seen first.

        Unlike :attr:`addrs` these ignore ``announce``: they say where a socket of ours can
        bind beside the host. Example::

            node.listen_ips()      # ['127.0.0.1']
        """
        return self._stack.listen_ips()

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
        await self._stack.publish(topic_name(self.swarm, topic), bytes(data))

    def flood(self, topic: str) -> None:
        """Flood-publish our own messages on ``topic``: to every subscribed peer above the
        publish threshold, not just the GossipSub mesh (others' messages still go through
        the mesh only).

        For topics whose messages must not wait for a mesh that may hold peers that drop
        them (task requests reach every provider we are connected to); it costs one send
        per subscribed peer per message we publish. Example::

            node.flood("tasks/1")
        """
        self._stack.flood_own(topic_name(self.swarm, topic))

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
        if self._nursery is None:
            raise LocalProtocolError("subscribe() on a node that is not running")
        self._topics.add(self._nursery, full, handler)

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
        self._stack.set_stream_handler(protocol, handler, max_frame=max_frame)

    def remove_stream_handler(self, protocol: str) -> None:
        """Stop serving ``protocol`` (a no-op when it is not served or the host has stopped).

        Example::

            node.remove_stream_handler("/p2pcompute/echo/1")
        """
        self._stack.remove_stream_handler(protocol)

    async def open_stream(
        self, peer_id: str, protocol: str, *, timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME
    ) -> FramedStream:
        """Open a framed stream to ``peer_id`` speaking ``protocol``; dials it when not connected.

        Raises :class:`PeerUnreachable` or :class:`PeerTimeout`.

        Example::

            stream = await node.open_stream(peer, "/p2pcompute/echo/1")
            await stream.send_msg({"t": "ping", "v": 1})
        """
        rec = self.peers.get(peer_id)
        return await self._stack.open_stream(
            peer_id,
            protocol,
            timeout=timeout,
            max_frame=max_frame,
            known_addrs=rec.addrs if rec is not None else (),
        )

    async def exchange_peers(self, peer_id: str, *, timeout: float | None = None) -> int:
        """Push our advert to ``peer_id`` and pull its sample of adverts; return how many were accepted.

        Example::

            accepted = await node.exchange_peers(boot.peer_id)
        """
        return await self._discovery.exchange_peers(peer_id, timeout=timeout)

    async def readvertise(self) -> None:
        """Publish a fresh advert now (new sequence number, same capacity); a no-op for observers.

        Example::

            await node.readvertise()     # after changing what this node offers
        """
        await self._discovery.readvertise()

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
        """Live peers whose capacity matches: peers verified by a connection of ours first, then
        those a bootstrap node vouched for, then the rest (anyone can claim a big GPU); best
        first within each tier (most free memory on matching GPUs).

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
        found = [r for r in found if r.peer_id not in self._stack.banned]
        return found if limit is None else found[:limit]

    async def wait_for_peers(self, n: int, *, timeout: float, role: str | None = None) -> list[PeerRecord]:
        """Wait until at least ``n`` other live peers are in the table (optionally of ``role``).

        Raises :class:`PeerTimeout` after ``timeout`` seconds.

        Example::

            await node.wait_for_peers(3, timeout=30)
        """

        def current() -> list[PeerRecord]:
            return [r for r in self.peers.alive() if role is None or r.role == role]

        with give_up_after(timeout) as scope:
            while len(found := current()) < n:
                await self._changed.wait()
        if scope.cancelled_caught:
            raise PeerTimeout(f"only {len(current())} of {n} peers known after {timeout} s")
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
        with give_up_after(timeout) as scope:
            while not condition():
                await self._changed.wait()
        if scope.cancelled_caught:
            raise PeerTimeout(f"condition not met after {timeout} s")

    async def _serve_reach(self, stream: FramedStream) -> None:
        await serve_dial_back(stream, stream_remote_ip(stream), timeout=self.config.reach_timeout)

    async def check_reachability(self) -> str:
        """Ask up to three directly connected peers (bootstrap nodes first) to dial us back,
        reserve relay slots when that makes us private, and re-advertise when our addresses
        changed; return the state. The node does this by itself every ``reach_interval``.

        Example::

            state = await node.check_reachability()
        """
        before = self.addrs
        direct = self._stack.direct_peers()
        boot = {a.split("/p2p/")[-1] for a in self._discovery.bootstrap_addrs}
        servers = sorted(direct, key=lambda p: p not in boot)[:3]
        own = [a for a in self._stack.full_addrs() if not is_loopback(a)]
        if self.config.reachability == "auto" and own:
            for server in servers:
                try:
                    stream = await self._stack.open_stream(
                        server, REACH_PROTOCOL, timeout=self.config.dial_timeout
                    )
                    try:
                        with give_up_after(self.config.reach_timeout + self.config.dial_timeout):
                            reached, observed = await ask_dial_back(stream, own)
                            self.reach.record(server, reached=reached, observed=observed)
                    finally:
                        await stream.close()
                except P2PComputeError as exc:
                    log.info("dial-back by %s failed: %s", server, exc)
        if self.reach.state == PRIVATE:
            await self._reserve_relays(direct, boot)
        if self.addrs != before and self.config.advertise:
            await self.readvertise()
        self._notify()
        return self.reach.state

    async def _reserve_relays(self, direct: dict[str, str], boot: set[str]) -> None:
        relays = [p for p in direct if p in boot or self._stack.serves_relay(p)]
        relays.sort(key=lambda p: p not in boot)
        held = self._stack.relay.reservations
        for stale in [p for p in held if p not in direct]:
            held.pop(stale, None)
        for peer in relays[:2]:
            addr = direct[peer]
            # a bootstrap node's listen address beats the one we saw
            for a in self._discovery.bootstrap_addrs:
                if a.endswith(f"/p2p/{peer}"):
                    addr = a.split("/p2p/")[0]
            await self._stack.relay.reserve(peer, addr, timeout=self.config.dial_timeout)

    async def _reach_loop(self) -> None:
        retry = min(5.0, self.config.reach_interval)
        while True:
            if not self._stack.direct_peers():
                await self._changed.wait()
                continue
            state = await self.check_reachability()
            settled = state != UNKNOWN or self.config.reachability != "auto"
            if state == PRIVATE and not self._stack.relay.reservations:
                settled = False  # private without a relay slot: nobody reaches us; try again soon
            if settled:
                retry = min(5.0, self.config.reach_interval)
                await trio.sleep(self.config.reach_interval)
            else:  # no answer (busy, gone) or no relay slot: try again soon, backing off to reach_interval
                await trio.sleep(retry)
                retry = min(retry * 2, self.config.reach_interval)

    def _on_connections(self) -> None:
        # a connection authenticates its peer (secure channel): those peers become verified
        self.peers.mark_connected(self._stack.connected_peers())
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _validate_advert(self, forwarder: Any, msg: Any) -> bool:
        """GossipSub topic validator of the advert topic: only checked, new adverts pass."""
        origin, via, data = gossip_message(forwarder, msg)
        return self._discovery.accept_advert(data, origin=origin, via=via)

    @property
    def _current_advert(self) -> bytes | None:
        """Our newest sealed advert (``None`` for an observer); benchmarks read its size."""
        return self._discovery.current_advert

    @_current_advert.setter
    def _current_advert(self, raw: bytes | None) -> None:
        self._discovery.current_advert = raw

    def report_offence(self, peer: str, exc: RemoteProtocolError) -> None:
        """Count a protocol offence of ``peer`` (it feeds the peer's score; past ``offence_limit``
        the peer is blacklisted and disconnected).

        For offences no stream handler can raise: a bad reply on a stream *we* opened, a bad
        result. Handlers of streams and topics need not call it: raising ``RemoteProtocolError``
        naming the peer is counted for them.

        Example::

            node.report_offence(peer, MalformedMessage("result digest mismatch", peer=peer))
        """
        self._discovery.report_offence(peer, exc)

    def identity_clones(self) -> list[str]:
        """Addresses at which another process with this node's key was seen (newest first).

        Two processes sharing a key file have one peer id; every table keeps only the advert
        with the higher sequence number, so one of them is hidden from the swarm. The node
        notices when an advert signed with its key reaches it that it did not issue and that
        is newer than its own start (``statistics()["identity_conflicts"]`` counts them; each
        new address is logged as a warning). Example::

            if node.identity_clones():
                print("another process uses our key at", node.identity_clones()[0])
        """
        clones = self._discovery.clones
        return sorted(clones, key=lambda a: -clones[a])

    def statistics(self) -> dict[str, Any]:
        """Counters: adverts, exchanges, dials, drops, adverts of our key from another process
        (``identity_conflicts``, see :meth:`identity_clones`), offences (``offences`` in all and
        ``offences_by_kind``), refusals (``streams_refused``, ``connections_refused``,
        ``buffer_overflows``), rejections by kind (``rejected_by_kind``), connections, table size
        (``peers``, ``verified``, ``dropped``), bytes on framed streams by protocol
        (``bytes_by_protocol``: ``{proto: {"received": n, "sent": n}}``).

        Example::

            print(node.statistics()["connections"])
        """
        out: dict[str, Any] = dict(self.stats)
        out.update(self.peers.statistics())
        out["offences_by_kind"] = self.peers.offences_by_kind()
        out["rejected_by_kind"] = dict(self.peers.rejected_by_kind)
        out["connections"] = len(self._stack.connected_peers())
        out["advert_mesh"] = self._stack.mesh_size(self._advert_topic)
        out["bytes_by_protocol"] = self._stack.bytes.snapshot()
        return out


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
    config = node_config(**tuning)
    check_swarm(swarm)
    for a in listen:
        parse_multiaddr(a)
    for a in bootstrap:
        peer_info(a)
    for a in config.announce:
        parse_multiaddr(a)
    node = Node(identity or Identity.generate(), swarm, config, clock=clock)
    stack = node._stack
    body_done = False
    try:
        async with stack.run(listen):
            stack.set_topic_validator(node._advert_topic, node._validate_advert)
            stack.flood_publish({node._advert_topic}, forward={node._advert_topic})
            async with trio.open_nursery() as nursery:
                node._nursery = nursery
                node.set_stream_handler(REACH_PROTOCOL, node._serve_reach, max_frame=4096)
                await node._discovery.start(nursery, bootstrap)
                if config.reachability != "public" or config.relay:
                    nursery.start_soon(node._reach_loop)
                try:
                    yield node
                    body_done = True
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_done and all(is_teardown_race(e) for e in leaves(group)):
            # py-libp2p 0.8.1: a pubsub stream that delivers a message while the services
            # stop schedules a task on a closed nursery; the node is going away anyway
            log.debug("ignored a py-libp2p teardown race: %r", group)
            return
        # py-libp2p's services and our nursery wrap whatever the body raised; hand the
        # caller the exception itself when there is exactly one.
        leaf = single_leaf(group)
        if leaf is None:
            raise
        if isinstance(leaf, OSError) and not stack.listening:
            raise listen_failure(leaf, listen) from None
        raise leaf from None
    except OSError as exc:
        if stack.listening:
            raise
        raise listen_failure(exc, listen) from None


__all__ = ["Node", "NodeConfig", "open_node", "single_leaf"]
