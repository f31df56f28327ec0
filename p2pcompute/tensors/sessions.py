"""Lane sessions: the key agreement between two lanes, over an overlay stream.

A session gives two peers directional base keys, a session id and each other's direct data
addresses (:class:`~p2pcompute.wire.lanekeys.Handshake`, sans-IO). :class:`Sessions` is its
trio driver: it opens a session lazily on first send (one handshake at a time per peer),
answers handshakes that peers open, and keeps the last few sessions per peer so that transfers
already under way keep their keys when a new session replaces theirs.

Imports trio, :mod:`p2pcompute.wire.lanekeys`, :mod:`p2pcompute.deadlines`,
:mod:`p2pcompute.errors` and the overlay's Node API; never py-libp2p.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2pcompute.deadlines import deadline
from p2pcompute.errors import PeerGone, PeerTimeout, ProtocolError
from p2pcompute.overlay.streams import FramedStream
from p2pcompute.wire.lanekeys import HELLO, Handshake, SessionKeys

if TYPE_CHECKING:
    from p2pcompute.overlay.node import Node

log = logging.getLogger(__name__)

PROTO_SESSION = "/p2pcompute/lane/1.0.0"

KEEP_PER_PEER = 4  # sessions kept per peer (docs/protocol/tensors.md)
MAX_SESSION_PEERS = 1024  # peers with sessions kept; past it the least recently used peer's go


class StaleSession(Exception):
    """No challenge came back for the preamble: the connection closed or reset (the receiver may
    not know the session, or it dropped the connection unread: a flood, a cap) or, with
    ``timed_out``, no answer came within the handshake time.

    Internal to the lane: the sender forgets the session and shakes hands once more, and falls
    back to the relay path when a direct connection fails so again (or times out). Example::

        raise StaleSession(timed_out=True)
    """

    def __init__(self, *, timed_out: bool = False) -> None:
        super().__init__("timed out" if timed_out else "closed before the challenge")
        self.timed_out = timed_out


@dataclass(eq=False)
class Session:
    """One agreed session with ``peer``: its keys, cipher, id and the peer's data addresses.

    Example::

        session = sessions.register(peer_id, keys)
        session.keys.cipher, session.keys.peer_addrs
    """

    peer: str
    keys: SessionKeys


class Sessions:
    """The sessions a lane has with its peers, and the trio driver of their handshakes.

    ``addrs`` returns the direct data addresses to tell peers (read at each handshake, as the
    listener may start after this object). ``speeds`` overrides the measured cipher figures
    (see :class:`~p2pcompute.wire.lanekeys.Handshake`). Sessions are kept for at most ``max_peers`` peers:
    past that, the peer whose sessions were used longest ago loses them (a swarm of identities
    that each shake hands once cannot grow the table; a peer that loses its session shakes
    hands again on its next transfer).

    Example::

        sessions = Sessions(node, ciphers=("aes-256-ocb3",), addrs=lambda: [("10.0.0.1", 4100)],
                            connect_timeout=5, auth_timeout=10)
        node.set_stream_handler(PROTO_SESSION, sessions.serve, max_frame=HELLO.max_size)
        session = await sessions.get(peer_id)      # shakes hands when none is known
    """

    def __init__(
        self,
        node: Node,
        *,
        ciphers: tuple[str, ...],
        addrs: Callable[[], list[tuple[str, int]]],
        connect_timeout: float,
        auth_timeout: float,
        max_peers: int = MAX_SESSION_PEERS,
        speeds: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        self.node = node
        self.speeds = speeds
        self.max_peers = max_peers
        self.local_id = node.peer_id
        self.ciphers = ciphers
        self.addrs = addrs
        self.connect_timeout = connect_timeout
        self.auth_timeout = auth_timeout
        self.by_id: dict[bytes, Session] = {}
        self.by_peer: dict[str, collections.deque[Session]] = {}
        self.locks: dict[str, trio.Lock] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self.by_id)

    def find(self, session_id: bytes) -> Session | None:
        """The session with this id, if it is still kept."""
        return self.by_id.get(session_id)

    def register(self, peer: str, keys: SessionKeys) -> Session:
        """Keep a new session with ``peer`` (the newest is used for sends); drop the oldest past the cap."""
        session = Session(peer, keys)
        queue = self.by_peer.setdefault(peer, collections.deque())
        queue.append(session)
        self.by_id[keys.session_id] = session
        while len(queue) > KEEP_PER_PEER:
            old = queue.popleft()
            self.by_id.pop(old.keys.session_id, None)
        self.touch(peer)
        while len(self.by_peer) > self.max_peers:
            stale = next(iter(self.by_peer))  # used longest ago
            for old in self.by_peer.pop(stale):
                self.by_id.pop(old.keys.session_id, None)
        return session

    def touch(self, peer: str) -> None:
        """Mark ``peer``'s sessions as just used (the least recently used peer's go first)."""
        queue = self.by_peer.pop(peer, None)
        if queue is not None:
            self.by_peer[peer] = queue

    def forget(self, session: Session) -> None:
        """Drop ``session`` (the peer no longer knows it)."""
        self.by_id.pop(session.keys.session_id, None)
        queue = self.by_peer.get(session.peer)
        if queue is not None and session in queue:
            queue.remove(session)
            if not queue:
                del self.by_peer[session.peer]

    def _handshake(self, peer: str, *, initiator: bool) -> Handshake:
        return Handshake(
            initiator=initiator,
            local_id=self.local_id,
            remote_id=peer,
            addrs=list(self.addrs()),
            ciphers=self.ciphers,
            speeds=self.speeds,
        )

    async def get(self, peer: str) -> Session:
        """The newest session with ``peer``; shakes hands first when there is none.

        Raises :class:`PeerUnreachable`/:class:`PeerTimeout` (no stream, or no answer within
        ``auth_timeout``) or a :class:`ProtocolError` from the peer's hello.
        """
        queue = self.by_peer.get(peer)
        if queue:
            self.touch(peer)
            return queue[-1]
        lock = self.locks.setdefault(peer, trio.Lock())
        try:
            async with lock:
                queue = self.by_peer.get(peer)
                if queue:
                    return queue[-1]
                stream = await self.node.open_stream(
                    peer, PROTO_SESSION, timeout=self.connect_timeout, max_frame=HELLO.max_size
                )
                try:
                    shake = self._handshake(peer, initiator=True)
                    with deadline(self.auth_timeout, "lane handshake", peer=peer):
                        await stream.send_frame(shake.hello)
                        keys = shake.finish(await stream.recv_frame(HELLO.max_size))
                finally:
                    await stream.close()
                return self.register(peer, keys)
        finally:
            if self.locks.get(peer) is lock and not lock.locked() and not lock.statistics().tasks_waiting:
                del self.locks[peer]  # one lock per peer being shaken hands with, not per peer ever seen

    async def serve(self, stream: FramedStream) -> None:
        """Answer a handshake a peer opened (the :data:`PROTO_SESSION` handler); failures are logged."""
        peer = stream.peer
        assert peer is not None  # the node names the remote side of every inbound stream
        try:
            with deadline(self.auth_timeout, "lane handshake", peer=peer):
                hello = await stream.recv_frame(HELLO.max_size)
                shake = self._handshake(peer, initiator=False)
                keys = shake.finish(hello)
                await stream.send_frame(shake.hello)
            if not self.closed:
                self.register(peer, keys)
        except (ProtocolError, PeerGone, PeerTimeout) as exc:
            log.info("lane handshake from %s failed: %r", peer, exc)


__all__ = ["PROTO_SESSION", "Session", "Sessions", "StaleSession"]
