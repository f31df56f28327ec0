"""Defences that have to reach inside py-libp2p 0.8.1 (used only by :mod:`p2pcompute.overlay.host`).

Each guard exists because py-libp2p leaves a hole an open swarm's attacker can use
(docs/design/threat-model.md, "Overlay"; docs/design/overlay.md has the upstream-style
write-ups):

* :class:`CappedBuffers`: yamux (``Yamux.handle_incoming``) appends every DATA frame to
  the stream's buffer even past the receive window, with only a warning, so one peer could
  grow our memory without bound. The muxer's ``stream_buffers`` dict is replaced by one
  whose buffers refuse bytes past a per-stream and a per-connection cap and report it.
* :func:`score_params`: GossipSub v1.1 peer scoring tuned for our topics, with the
  application-specific score fed from our offence counts.
* :func:`guard_signatures`: Pubsub drops a message whose signature fails without counting
  it against anyone; the guard counts it against the forwarding peer first.
* :func:`flood_own_messages`: py-libp2p has no flood publishing; our own messages on chosen
  topics go to every subscribed peer that passes the publish threshold, not just the mesh
  (and others' messages on low-rate topics to a capped number of well-scored peers).
* :func:`watch_deliveries`: py-libp2p never penalises a mesh peer that delivers nothing
  (GossipSub's P3); a :class:`DeliveryWatch` finds such droppers and they are pruned.

Imports :mod:`p2pcompute.errors`; py-libp2p lazily.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex

from p2pcompute.errors import BadSignature, RemoteProtocolError
from p2pcompute.overlay.delivery import DeliveryWatch

log = logging.getLogger(__name__)

# GossipSub score thresholds (see score_params and docs/design/threat-model.md)
PUBLISH_THRESHOLD = -50.0
GOSSIP_THRESHOLD = -25.0
GRAYLIST_THRESHOLD = -80.0
ACCEPT_PX_THRESHOLD = 10.0
DROPPER_DECAY = 0.99  # per heartbeat: a dropper verdict weighs half after about 70 s


class _Buffer(bytearray):
    """One stream's receive buffer inside :class:`CappedBuffers`."""

    owner: CappedBuffers

    def extend(self, data: Iterable[SupportsIndex]) -> None:
        chunk = bytes(data)  # yamux passes bytes; anything else is copied once
        owner = self.owner
        if owner.tripped:
            return  # the connection is being closed: drop what still arrives
        if len(self) + len(chunk) > owner.per_stream:
            owner.trip("stream")
            return
        if owner.total() + len(chunk) > owner.per_connection:
            owner.trip("connection")
            return
        super().extend(chunk)


class CappedBuffers(dict[int, bytearray]):
    """A yamux connection's ``stream_buffers`` whose buffers refuse bytes past the caps.

    ``on_exceeded(kind)`` is called once, with ``"stream"`` (one stream holds more unread
    bytes than any window allows: the peer broke flow control) or ``"connection"`` (the
    unread bytes of all streams passed ``per_connection``); afterwards every arriving byte
    is dropped, and the caller closes the connection.

    Example::

        muxer.stream_buffers = CappedBuffers(muxer.stream_buffers, per_stream=17 << 20,
                                             per_connection=128 << 20, on_exceeded=close)
    """

    def __init__(
        self,
        existing: dict[int, bytearray],
        *,
        per_stream: int,
        per_connection: int,
        on_exceeded: Callable[[str], None],
    ) -> None:
        super().__init__()
        self.per_stream = per_stream
        self.per_connection = per_connection
        self.on_exceeded = on_exceeded
        self.tripped = False
        for key, value in existing.items():
            self[key] = value

    def __setitem__(self, key: int, value: bytearray) -> None:
        if not isinstance(value, _Buffer):
            buf = _Buffer(value)
            buf.owner = self
            value = buf
        super().__setitem__(key, value)

    def total(self) -> int:
        """Unread bytes held for all streams of the connection.

        Example::

            muxer.stream_buffers.total()     # 0 on an idle connection
        """
        return sum(len(b) for b in self.values())

    def trip(self, kind: str) -> None:
        """Stop buffering and report ``kind`` (once).

        Example::

            buffers.trip("connection")
        """
        if not self.tripped:
            self.tripped = True
            self.on_exceeded(kind)


def cap_buffers(
    muxed_conn: Any, *, per_stream: int, per_connection: int, on_exceeded: Callable[[str], None]
) -> bool:
    """Put :class:`CappedBuffers` into a yamux connection; False for other muxers (mplex).

    Example::

        cap_buffers(conn.muxed_conn, per_stream=17 << 20, per_connection=128 << 20,
                    on_exceeded=lambda kind: nursery.start_soon(conn.close))
    """
    current = getattr(muxed_conn, "stream_buffers", None)
    if not isinstance(current, dict):
        return False
    if isinstance(current, CappedBuffers):
        return True
    muxed_conn.stream_buffers = CappedBuffers(
        current, per_stream=per_stream, per_connection=per_connection, on_exceeded=on_exceeded
    )
    return True


def remote_ip(conn: Any) -> str | None:
    """The remote IP address of a py-libp2p ``SwarmConn`` (None when unknown).

    Example::

        remote_ip(conn)    # '203.0.113.7'
    """
    try:
        addr = conn.muxed_conn.get_remote_address()
    except Exception:
        return None
    if not addr:
        return None
    try:
        return str(ipaddress.ip_address(addr[0]))
    except ValueError:
        return None


def is_exempt(ip: str, exempt: Iterable[str]) -> bool:
    """True when ``ip`` lies in one of the ``exempt`` networks (CIDR text).

    Example::

        >>> is_exempt("127.0.0.1", ["127.0.0.0/8"])
        True
    """
    addr = ipaddress.ip_address(ip)
    for net in exempt:
        network = ipaddress.ip_network(net, strict=False)
        if addr.version == network.version and addr in network:
            return True
    return False


def score_params(app_score: Callable[[str], float]) -> Any:
    """GossipSub v1.1 score parameters for our topics (py-libp2p's ``ScoreParams``).

    * P2 first deliveries of valid messages: 1 point each, capped at 10, decaying by 1 % per
      heartbeat (peers that deliver are preferred when forwarding past the mesh);
    * P4 invalid messages (our validators' rejections): 5 points each, capped at 50,
      decaying by 5 % per heartbeat (1 s);
    * P5 behaviour (py-libp2p's IHAVE/IWANT/GRAFT flood penalties): weight 1 past 20;
    * P6 application score: ``app_score(peer_id)`` (we give ``-offence_weight`` per offence);
    * P7 IP colocation: fed by the node for non-exempt addresses, 1 point per extra peer
      squared past 10 peers on one IP;
    * thresholds: publish -50 (messages from a worse forwarder are dropped), gossip -25,
      graylist -80 (GRAFTs refused), accept PX 10 (GossipSub PX stays off).

    py-libp2p 0.8.1 applies P6 and P7 only in its combined score (graylisting, mesh choice,
    PX), not in its per-topic publish and gossip gates: see docs/design/overlay.md.

    Example::

        GossipSub(..., score_params=score_params(lambda peer: -10.0 * offences(peer)))
    """
    from libp2p.peer.id import ID
    from libp2p.pubsub.score import ScoreParams, TopicScoreParams

    def _app(peer: ID) -> float:
        return app_score(str(peer.to_base58()))

    return ScoreParams(
        # P2: a peer that delivers valid messages first is worth forwarding to (flood_own_messages)
        p2_first_message_deliveries=TopicScoreParams(weight=1.0, cap=10.0, decay=0.99),
        p4_invalid_messages=TopicScoreParams(weight=5.0, cap=50.0, decay=0.95),
        p5_behavior_penalty_weight=1.0,
        p5_behavior_penalty_threshold=20.0,
        p5_behavior_penalty_decay=0.95,
        p6_appl_slack_weight=1.0,
        p6_appl_slack_decay=1.0,
        p7_ip_colocation_weight=1.0,
        p7_ip_colocation_threshold=10,
        publish_threshold=PUBLISH_THRESHOLD,
        gossip_threshold=GOSSIP_THRESHOLD,
        graylist_threshold=GRAYLIST_THRESHOLD,
        accept_px_threshold=ACCEPT_PX_THRESHOLD,
        app_specific_score_fn=_app,
    )


def guard_signatures(pubsub: Any, on_offence: Callable[[str, RemoteProtocolError], None]) -> None:
    """Make ``pubsub`` count a message with a bad signature against the peer that forwarded it.

    py-libp2p 0.8.1's ``Pubsub.push_msg`` drops such a message silently. Only messages not
    seen before are checked (a valid one is then verified again by py-libp2p).

    Example::

        guard_signatures(stack.pubsub, lambda peer, exc: discovery.report_offence(peer, exc))
    """
    from libp2p.pubsub.validators import signature_validator

    original = pubsub.push_msg

    def verifies(msg: Any) -> bool:
        # py-libp2p's validator raises (protobuf DecodeError, ValueError ...) on a key or signature
        # that does not even parse; raised inside pubsub's task, that ended the whole node (found by
        # tests/test_fuzz_live.py). Such a message is a bad signature like any other.
        try:
            return bool(signature_validator(msg))
        except Exception:
            return False

    async def push_msg(msg_forwarder: Any, msg: Any) -> None:
        if (
            pubsub.strict_signing
            and msg_forwarder != pubsub.host.get_id()
            and not pubsub._is_msg_seen(msg)
            and not pubsub.is_peer_blacklisted(msg_forwarder)
            and not verifies(msg)
        ):
            peer = str(msg_forwarder.to_base58())
            on_offence(peer, BadSignature("gossip message with a bad signature", peer=peer))
            return
        await original(msg_forwarder, msg)

    pubsub.push_msg = push_msg


def flood_own_messages(
    gossipsub: Any,
    own_id: Any,
    topics: set[str],
    *,
    forward_topics: set[str] | None = None,
    own_wider_topics: set[str] | None = None,
    max_forward: int = 0,
) -> None:
    """Send our own messages on ``topics`` to every subscribed GossipSub peer above the publish
    threshold (flood publishing, GossipSub v1.1), not just to our mesh.

    Messages on ``forward_topics`` (others', and ours where not flooded) go, besides the
    mesh, to up to ``max_forward`` more subscribed peers with a score of at least 0, best
    scored first (ties in random order): peers that delivered valid messages first (P2) come
    before unknown ones, and peers caught spamming or dropping come last or not at all. A
    node whose mesh holds only sybils that drop everything still hears a message from an
    honest neighbour that picked it (docs/design/threat-model.md, "Overlay"); it costs up to
    ``max_forward`` more sends per message and node. On ``own_wider_topics`` only our own
    messages take that wider path (frequent topics, such as task requests).

    Example::

        flood_own_messages(stack.gossipsub, stack.host.get_id(), {advert_topic("lab")},
                           forward_topics={advert_topic("lab")}, max_forward=64)
    """
    import heapq
    import random

    original = gossipsub._get_peers_to_send
    forward = forward_topics if forward_topics is not None else set()  # read live: callers may add
    own_wider = own_wider_topics if own_wider_topics is not None else set()

    def peers_to_send(
        topic_ids: Iterable[str], msg_forwarder: Any, origin: Any, *args: Any, **kw: Any
    ) -> Any:
        topic_ids = list(topic_ids)
        chosen = set(original(topic_ids, msg_forwarder, origin, *args, **kw))
        if gossipsub.pubsub is None:
            return chosen
        scorer = gossipsub.scorer
        own = origin == own_id and msg_forwarder == own_id
        for topic in topic_ids:
            subscribed = gossipsub.pubsub.peer_topics.get(topic, ())
            if own and topic in topics:
                for peer in subscribed:
                    if scorer is None or scorer.allow_publish(peer, [topic]):
                        chosen.add(peer)
            elif (topic in forward or (own and topic in own_wider)) and max_forward > 0:
                extra = [p for p in subscribed if p not in chosen and p not in (msg_forwarder, origin)]
                if scorer is not None:  # per message: keep the best few, not a sort of every peer
                    rated = ((scorer.score(p, [topic]), random.random(), p) for p in extra)
                    best = heapq.nlargest(max_forward, (r for r in rated if r[0] >= 0))
                    chosen.update(p for _s, _r, p in best)
                else:
                    chosen.update(random.sample(extra, min(max_forward, len(extra))))
        return chosen

    gossipsub._get_peers_to_send = peers_to_send


def watch_deliveries(
    pubsub: Any,
    gossipsub: Any,
    watch: DeliveryWatch,
    topics: Callable[[], set[str]],
    on_dropper: Callable[[str, str], None] = lambda _topic, _peer: None,
    *,
    age: Callable[[str], float | None] = lambda _origin: None,
) -> None:
    """Feed ``watch`` from ``pubsub`` and prune the droppers it finds at every GossipSub heartbeat.

    ``age(origin)``: seconds since ``origin`` wrote its newest message we accepted (the
    advert's issue time); with the mesh peers' tenure (how long each has been in our mesh,
    seen at messages and heartbeats) it feeds :class:`DeliveryWatch`'s ``late`` rule.

    Every valid message on ``topics()`` that reaches us (first or again) is reported with
    its forwarder, origin and our mesh at that moment. Before each heartbeat's mesh upkeep,
    each dropper still in a mesh is removed from it, sent a PRUNE, backed off for
    GossipSub's prune back-off (a GRAFT from it in that time is penalised as a flood), and
    ``on_dropper(topic, peer)`` is called; the heartbeat then refills the mesh from the
    other peers. Its application score is the caller's to lower (see :func:`score_params`).

    Example::

        watch_deliveries(stack.pubsub, stack.gossipsub, DeliveryWatch(), lambda: {advert_topic("lab")})
    """
    import time as _time

    from libp2p.peer.id import ID

    own = pubsub.host.get_id()
    original_push = pubsub.push_msg
    joined: dict[str, dict[str, float]] = {}  # topic -> mesh peer -> when we first saw it there

    def tenure(topic: str, mesh: set[str]) -> dict[str, float]:
        now = _time.monotonic()
        since = joined.setdefault(topic, {})
        for gone in set(since) - mesh:
            del since[gone]
        for peer in mesh:
            since.setdefault(peer, now)
        return {peer: now - t for peer, t in since.items()}

    async def push_msg(msg_forwarder: Any, msg: Any) -> None:
        watched = topics()
        mine = [t for t in msg.topicIDs if t in watched]
        if not mine or msg_forwarder == own:
            await original_push(msg_forwarder, msg)
            return
        seen_before = pubsub._is_msg_seen(msg)
        await original_push(msg_forwarder, msg)
        if not (seen_before or pubsub._is_msg_seen(msg)):
            return  # dropped: invalid, refused, or its forwarder is blacklisted
        forwarder = str(msg_forwarder.to_base58())
        try:
            origin = str(ID(bytes(msg.from_id)).to_base58())
        except Exception:
            return
        for topic in mine:
            if seen_before:
                watch.delivered(topic, forwarder, origin)
            else:
                mesh = {str(p.to_base58()) for p in gossipsub.mesh.get(topic, ())}
                watch.accepted(topic, forwarder, origin, mesh, age=age(origin), tenure=tenure(topic, mesh))

    pubsub.push_msg = push_msg
    original_heartbeat = gossipsub.mesh_heartbeat

    def mesh_heartbeat() -> Any:
        meshes = {t: {str(p.to_base58()): p for p in peers} for t, peers in gossipsub.mesh.items()}
        pruned: list[tuple[str, Any]] = []
        for topic, name in watch.droppers(meshes):
            peer = meshes[topic][name]
            gossipsub.mesh[topic].discard(peer)
            if gossipsub.scorer is not None:
                gossipsub.scorer.on_leave_mesh(peer, topic)
            gossipsub._add_back_off(peer, topic, False)
            gossipsub.graft_flood_tracking[peer][topic] = _time.time()
            pruned.append((topic, peer))
            log.info("pruned %s from the %s mesh: it forwarded none of %d", name, topic, watch.misses)
            on_dropper(topic, name)
        watch.decay(DROPPER_DECAY)
        to_graft, to_prune = original_heartbeat()
        for topic in topics():
            tenure(topic, {str(p.to_base58()) for p in gossipsub.mesh.get(topic, ())})
        for topic, peer in pruned:
            if topic not in to_prune[peer]:
                to_prune[peer].append(topic)
        return to_graft, to_prune

    gossipsub.mesh_heartbeat = mesh_heartbeat


__all__ = [
    "CappedBuffers",
    "cap_buffers",
    "flood_own_messages",
    "guard_signatures",
    "is_exempt",
    "remote_ip",
    "score_params",
    "watch_deliveries",
]
