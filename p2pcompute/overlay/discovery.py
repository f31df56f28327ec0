"""Discovery: joining, dialing more peers, adverts, expiry and peer exchange.

How peers find each other (docs/design/overlay.md):

* a node given bootstrap addresses connects to them and runs peer exchange
  (:mod:`p2pcompute.overlay.messages`): it pushes its own signed advert and
  pulls a sample of the signed adverts the other side knows;
* it then dials ``target_connections`` random peers from its table, so GossipSub
  gets a mesh rather than a star, and repeats exchange + dial every
  ``discovery_interval`` while it has fewer direct connections than that;
* every node publishes its advert (capacity + listen addresses) on the advert
  topic at start, on change and every ``advert_interval``; a peer that stays
  silent for ``advert_ttl`` leaves every table.

:class:`Discovery` drives this through narrow collaborators: a :class:`Network` (dial,
streams, publish, ban; :class:`~p2pcompute.overlay.host.Libp2pStack` is one), the
:class:`~p2pcompute.overlay.table.PeerTable`, and a ``notify`` callback that wakes waiters
when the table changes. Its background loops run in a nursery its owner passes in.

Imports :mod:`p2pcompute.capacity`, :mod:`p2pcompute.deadlines`, :mod:`p2pcompute.errors`,
:mod:`p2pcompute.identity` and the overlay's sans-IO modules; never py-libp2p.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from p2pcompute.capacity.adverts import MAX_ADVERT_SIZE, Advert, make_advert
from p2pcompute.capacity.model import Capacity
from p2pcompute.capacity.probe import probe_capacity
from p2pcompute.deadlines import deadline
from p2pcompute.errors import (
    P2PComputeError,
    PeerTimeout,
    PeerUnreachable,
    RemoteProtocolError,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay.config import NodeConfig
from p2pcompute.overlay.failures import peer_of
from p2pcompute.overlay.messages import (
    MAX_PX_ADVERTS,
    PEERS_REQUEST,
    PEERS_RESPONSE,
    advert_topic,
    peers_protocol,
)
from p2pcompute.overlay.streams import DEFAULT_MAX_FRAME, FramedStream
from p2pcompute.overlay.table import PeerRecord, PeerTable
from p2pcompute.overlay.topics import Subscription

log = logging.getLogger(__name__)
_ISSUED_MEMORY = 64  # adverts of ours remembered byte for byte (older ones: by sequence range)
_BORN_MEMORY = 8192  # peers whose newest advert's issue time we keep (the dropper rule)
_CLONE_MEMORY = 16  # addresses of other processes with our key kept for status pages


class Network(Protocol):
    """What discovery needs of the network (implemented by :class:`~p2pcompute.overlay.host.Libp2pStack`)."""

    banned: set[str]

    def connected_peers(self) -> list[str]: ...

    async def dial(self, addr: str, *, timeout: float | None = None) -> str: ...

    async def open_stream(
        self,
        peer_id: str,
        protocol: str,
        *,
        timeout: float | None,
        max_frame: int = DEFAULT_MAX_FRAME,
        known_addrs: Sequence[str] = (),
    ) -> FramedStream: ...

    def set_stream_handler(
        self,
        protocol: str,
        handler: Callable[[FramedStream], Awaitable[None]],
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None: ...

    async def publish(self, topic: str, data: bytes) -> None: ...

    async def subscribe(self, topic: str) -> Subscription: ...

    def ban(self, peer: str) -> None: ...


class Discovery:
    """Finds peers and keeps this node's advert, table and direct connections fresh.

    ``addrs()`` gives the addresses to advertise; ``clock`` is wall-clock seconds (adverts
    carry it); ``stats`` is the node's counter dict (``adverts_published``, ``px_served``,
    ``px_requested`` and ``banned`` are counted here).

    Example::

        discovery = Discovery(identity, "lab", config, net=stack, peers=table,
                              addrs=stack.full_addrs, notify=wake, stats=stats, clock=time.time)
        await discovery.start(nursery, bootstrap=["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."])
    """

    def __init__(
        self,
        identity: Identity,
        swarm: str,
        config: NodeConfig,
        *,
        net: Network,
        peers: PeerTable,
        addrs: Callable[[], list[str]],
        notify: Callable[[], None],
        stats: dict[str, int],
        clock: Callable[[], float],
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.swarm = swarm
        self.config = config
        self.net = net
        self.peers = peers
        self._addrs = addrs
        self._notify = notify
        self.stats = stats
        self._clock = clock
        self.advert_topic = advert_topic(swarm)
        self.px_protocol = peers_protocol(swarm)
        self.bootstrap_ids: set[str] = set()
        self.bootstrap_addrs: list[str] = []
        self.current_advert: bytes | None = None
        self._seq = time.time_ns() // 1000  # survives restarts without a state file
        # what we issued, to tell our adverts from those of another process with our key
        self._first_seq = self._seq
        self._issued: OrderedDict[int, bytes] = OrderedDict()  # seq -> raw, the newest few
        self._born: dict[str, float] = {}  # peer -> issue time of its newest accepted advert
        self._started = clock()
        self.clones: dict[str, float] = {}  # address of another process with our key -> last seen
        self._published_capacity: Capacity | None = None
        self._last_publish = -math.inf
        self._rng = random.Random()

    async def start(self, nursery: trio.Nursery, bootstrap: Sequence[str]) -> None:
        """Serve peer exchange, join through ``bootstrap`` (see :meth:`join`), then run the advert,
        dial, discovery and expiry loops in ``nursery``. Example::

            await discovery.start(nursery, bootstrap=boot_addrs)
        """
        nursery.start_soon(self._drain_adverts)
        # requests are capped by the PEERS_REQUEST schema; the frame cap must fit the reply
        self.net.set_stream_handler(self.px_protocol, self.serve_px, max_frame=PEERS_RESPONSE.max_size)
        capacity = None
        if self.config.advertise:
            capacity = await self.probe()
            self.current_advert = self.build_advert(capacity)
        await self.join(bootstrap)
        if capacity is not None:
            nursery.start_soon(self._advert_loop, capacity)
        nursery.start_soon(self.dial_more)  # direct links to several peers, in the background
        nursery.start_soon(self._discovery_loop)
        nursery.start_soon(self._expire_loop)

    # -- joining and dialing ----------------------------------------------------------------------

    async def join(self, bootstrap: Sequence[str]) -> None:
        """Dial every bootstrap node and exchange peers with those reached.

        Raises :class:`PeerUnreachable` when none answers. Example::

            await discovery.join(["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."])
        """
        peers = [peer_of(a) for a in bootstrap]
        self.bootstrap_addrs = list(bootstrap)
        errors: list[str] = []
        reached = []
        for addr, peer in zip(bootstrap, peers, strict=True):
            if peer == self.peer_id:
                continue
            self.bootstrap_ids.add(peer)
            self.peers.introducers.add(peer)
            try:
                await self.net.dial(addr)
            except (PeerUnreachable, PeerTimeout) as exc:
                errors.append(str(exc))
                continue
            reached.append(peer)
        if peers and not reached and errors:
            raise PeerUnreachable(f"no bootstrap node reachable ({'; '.join(errors)})")
        for peer in reached:
            with contextlib.suppress(P2PComputeError):
                await self.exchange_peers(peer)

    async def dial_more(self) -> None:
        """Dial random live peers (not bootstrap nodes) until ``target_connections`` are direct.

        Example::

            await discovery.dial_more()
        """
        connected = set(self.net.connected_peers())
        others = connected - self.bootstrap_ids
        need = self.config.target_connections - len(others)
        if need <= 0:
            return
        # verified peers first, then those a bootstrap node introduced, then strangers (whom
        # anyone can mint by the thousand); random within each tier
        candidates = [
            r
            for r in self.peers.by_trust(rng=self._rng)
            if r.peer_id not in connected
            and r.peer_id not in self.net.banned
            and r.peer_id not in self.bootstrap_ids
        ]
        chosen = candidates[:need]
        if not chosen:
            return

        async def one(rec: PeerRecord) -> None:
            addrs = [a if "/p2p/" in a else f"{a}/p2p/{rec.peer_id}" for a in rec.addrs]
            for addr in addrs:
                try:
                    await self.net.dial(addr)
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
            connected = self.net.connected_peers()
            if not connected and self.bootstrap_addrs:
                for addr in self.bootstrap_addrs:
                    with contextlib.suppress(P2PComputeError):
                        await self.net.dial(addr)
                connected = self.net.connected_peers()
            # anti-entropy: one push-pull exchange per round with a random neighbour, so tables
            # stay fresh even where GossipSub's mesh is thin (back-off after pruning, see notes)
            if connected:
                with contextlib.suppress(P2PComputeError):
                    await self.exchange_peers(self._rng.choice(connected))
            await self.dial_more()

    # -- adverts ----------------------------------------------------------------------------------

    def build_advert(self, capacity: Capacity) -> bytes:
        """Seal a fresh advert of ``capacity`` (next sequence number, current addresses).

        Example::

            raw = discovery.build_advert(capacity)
        """
        self._seq += 1
        raw = make_advert(
            self.identity,
            peer_id=self.peer_id,
            swarm=self.swarm,
            seq=self._seq,
            capacity=capacity,
            addrs=self._addrs(),
            ttl=self.config.advert_ttl,
            role=self.config.role,
            issued=self._clock(),
        )
        self._issued[self._seq] = raw
        while len(self._issued) > _ISSUED_MEMORY:
            self._issued.popitem(last=False)
        return raw

    async def probe(self) -> Capacity:
        """The configured capacity, or a fresh probe (in a worker thread).

        Example::

            capacity = await discovery.probe()
        """
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
                capacity = await self.probe()

    async def readvertise(self) -> None:
        """Publish a fresh advert now (new sequence number, same capacity); a no-op for observers.

        Example::

            await discovery.readvertise()
        """
        if self._published_capacity is not None:
            await self._publish_advert(await self.probe())

    async def _publish_advert(self, capacity: Capacity) -> None:
        self.current_advert = self.build_advert(capacity)
        self._published_capacity = capacity
        self._last_publish = self._clock()
        try:
            await self.net.publish(self.advert_topic, self.current_advert)
            self.stats["adverts_published"] += 1
        except Exception as exc:  # publishing must never take the node down
            log.warning("publishing our advert failed: %r", exc)

    async def _drain_adverts(self) -> None:
        sub = await self.net.subscribe(self.advert_topic)
        while True:
            await sub.get()  # the validator already entered the advert; keep the channel empty

    def accept_advert(self, data: bytes, *, origin: str, via: str) -> bool:
        """GossipSub's verdict on an advert from ``origin`` forwarded by ``via``: only checked,
        new adverts are delivered and forwarded; a rejected one is blamed on ``via``.

        Example::

            ok = discovery.accept_advert(raw, origin=sender, via=forwarder)
        """
        if origin == self.peer_id:
            if data in self._issued.values():
                return True
            # signed by our key but not issued by us: from before a restart, or another process's
            try:
                outcome, advert = self.peers.offer(data, sender=origin, blame=via)
            except RemoteProtocolError as exc:
                log.debug("rejected an advert of our own peer id via %s: %s", via, exc)
                return False
            if outcome == "own":
                self.check_own(advert, via=via)
            return True
        try:
            outcome, advert = self.peers.offer(data, sender=origin, blame=via)
        except RemoteProtocolError as exc:
            log.debug("rejected advert via %s: %s", via, exc)
            self.blame(via)
            return False
        self._accepted(advert, outcome, via)
        return True

    def _accepted(self, advert: Advert, outcome: str, via: str | None) -> None:
        """After a valid advert from gossip or peer exchange: note when it was born, tell listeners."""
        if outcome in ("new", "updated"):
            self._born.pop(advert.peer_id, None)  # newest last: the oldest goes first past the cap
            self._born[advert.peer_id] = advert.issued
            if len(self._born) > _BORN_MEMORY:
                self._born.pop(next(iter(self._born)))
            self._notify()
        elif outcome == "own":
            self.check_own(advert, via=via)

    def advert_age(self, peer: str) -> float | None:
        """Seconds since ``peer`` issued its newest advert we accepted (by its clock against
        ours), or ``None``; the dropper rule counts only adverts that reached us late. Example::

            discovery.advert_age(peer)     # 0.3
        """
        issued = self._born.get(peer)
        return None if issued is None else self._clock() - issued

    def check_own(self, advert: Advert, *, via: str | None) -> bool:
        """Whether ``advert`` (checked, for our peer id) came from another process with our key.

        It did when we never issued it and it was issued after we started (an advert of ours
        from before a restart is older). Each sighting is counted in ``identity_conflicts``,
        its addresses are kept in :attr:`clones` and logged (a warning the first time each
        address is seen). The table keeps only the advert with the higher sequence number, so
        one of the two processes is hidden from the swarm. Example::

            if discovery.check_own(advert, via=forwarder):
                print("another process uses our key at", sorted(discovery.clones))
        """
        ours = self._first_seq < advert.seq <= self._seq
        if ours and self._issued.get(advert.seq, advert.raw) == advert.raw:
            return False  # ours (perhaps older than the memory of what we issued)
        if advert.issued < self._started:
            return False  # an earlier run of this node, still in some table until it expires
        now = self._clock()
        where = advert.addrs or ("(no address)",)
        new = [a for a in where if a not in self.clones]
        for addr in where:
            self.clones[addr] = now
        while len(self.clones) > _CLONE_MEMORY:
            del self.clones[min(self.clones, key=self.clones.__getitem__)]
        self.stats["identity_conflicts"] = self.stats.get("identity_conflicts", 0) + 1
        if new:
            log.warning(
                "another process uses this node's key (peer id %s) at %s (advert seen via %s); "
                "the swarm keeps only one of them: give each process its own key",
                self.peer_id,
                ", ".join(where),
                via or "?",
            )
            self._notify()
        return True

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(self.config.expire_interval)
            gone = self.peers.expire()
            if gone:
                log.info("peers expired: %s", ", ".join(gone))
                self._notify()

    # -- offences ---------------------------------------------------------------------------------

    def report_offence(self, peer: str, exc: RemoteProtocolError) -> None:
        """Count ``exc`` against ``peer`` and blacklist it past ``offence_limit``.

        Example::

            discovery.report_offence(peer, MalformedMessage("junk", peer=peer))
        """
        self.peers.count_offence(peer, exc)
        self.blame(peer)

    def blame(self, peer: str | None) -> None:
        """An offence of ``peer`` was counted: wake waiters, and ban it once it has too many.

        Example::

            discovery.blame(forwarder)
        """
        if peer is None or peer in self.net.banned or peer == self.peer_id:
            return
        self._notify()  # an offence was counted: the table changed
        if self.peers.offence_total(peer) >= self.config.offence_limit:
            self.net.ban(peer)
            self.stats["banned"] += 1
            self.peers.remove(peer)
            log.warning("blacklisting %s after %d rejected messages", peer, self.peers.offence_total(peer))

    # -- peer exchange ----------------------------------------------------------------------------

    async def serve_px(self, stream: FramedStream) -> None:
        """Answer one peer exchange: enter the asker's advert, reply with ours and a sample.

        Example::

            net.set_stream_handler(peers_protocol("lab"), discovery.serve_px)
        """
        with deadline(self.config.dial_timeout, "peer exchange", peer=stream.peer):
            req = await stream.recv_msg(PEERS_REQUEST)
            if req["advert"] is not None:
                self._offer_px(req["advert"], sender=stream.peer, blame=stream.peer)
            self.stats["px_served"] += 1
            own = [] if self.current_advert is None else [self.current_advert]
            # our own advert plus ``limit`` others must still fit the reply's schema
            limit = min(req["limit"], MAX_PX_ADVERTS - len(own))
            sample, vouched = self.peers.verified_sample(None, limit, self._rng)
            adverts: list[bytes] = []
            room = PEERS_RESPONSE.max_size - 1024  # msgpack framing of the list stays well inside
            for raw in own + sample:
                if len(raw) + 8 > room:
                    break
                adverts.append(raw)
                room -= len(raw) + 8
            vouched = min(vouched, len(adverts) - len(own))
            await stream.send_frame(PEERS_RESPONSE.build(adverts=adverts, vouched=vouched or None))

    def _offer_px(
        self, raw: bytes, *, sender: str | None, blame: str | None, introduced: bool = False
    ) -> bool:
        try:
            outcome, advert = self.peers.offer(
                raw, sender=sender, blame=blame, count_stale=False, introduced=introduced
            )
        except RemoteProtocolError as exc:
            log.debug("rejected advert from peer exchange with %s: %s", blame, exc)
            self.blame(blame)
            return False
        self._accepted(advert, outcome, blame)
        return True

    async def exchange_peers(self, peer_id: str, *, timeout: float | None = None) -> int:
        """Push our advert to ``peer_id`` and pull its sample of adverts; return how many were accepted.

        Raises :class:`LocalProtocolError` (before anything is sent) when our request would
        not pass its own schema. Example::

            accepted = await discovery.exchange_peers(peer)
        """
        timeout = timeout or self.config.dial_timeout
        request = PEERS_REQUEST.build(limit=self.config.px_limit, advert=self.current_advert)
        self.stats["px_requested"] += 1
        rec = self.peers.get(peer_id)
        stream = await self.net.open_stream(
            peer_id,
            self.px_protocol,
            timeout=timeout,
            max_frame=PEERS_RESPONSE.max_size,
            known_addrs=rec.addrs if rec is not None else (),
        )
        accepted = 0
        try:
            with deadline(timeout, "peer exchange", peer=peer_id):
                await stream.send_frame(request)
                resp = await stream.recv_msg(PEERS_RESPONSE)
        except (PeerTimeout, RemoteProtocolError):
            await stream.reset()
            raise
        finally:
            await stream.close()
        if self.peers.offence_total(peer_id) > 0:
            # lists are taken only from peers in good standing (like GossipSub's accept-PX
            # threshold); its own advert, first in the list, is still checked on its own
            resp["adverts"] = resp["adverts"][:1]
        # a bootstrap node vouches for its own advert and the verified peers it lists first
        vouched = 1 + (resp["vouched"] or 0) if peer_id in self.bootstrap_ids else 0
        for i, raw in enumerate(resp["adverts"][: self.config.px_limit + 1]):
            if len(raw) <= MAX_ADVERT_SIZE and self._offer_px(
                raw, sender=None, blame=peer_id, introduced=i < vouched
            ):
                accepted += 1
        return accepted


__all__ = ["Discovery", "Network"]
