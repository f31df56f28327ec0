"""Point-to-point control streams of the collective: requests, and one long-lived link per peer.

Matchmaking asks and waits for an answer (:meth:`ControlLinks.request`, one stream per
request); a round tells its partners its statuses and leaves (:meth:`ControlLinks.tell`), in
order, over one kept stream per peer: opening a libp2p stream costs several round trips of
multistream-select, and a status must beat the stream resets that follow it
(docs/design/averaging.md). :meth:`ControlLinks.serve_link` is the receiving end of such a link.

Collaborators are narrow: the node (``open_stream``, ``connected_peers``), a counter for
statistics, the fault plan (a muted peer says nothing) and a getter for the nursery that may
close idle links in the background. Imports :mod:`p2pcompute.collective.messages`,
:mod:`p2pcompute.deadlines`, :mod:`p2pcompute.errors` and trio.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import trio

from p2pcompute.collective.faults import FaultPlan
from p2pcompute.collective.messages import LEFT, MAX_REQUEST, PROTOCOL, STATUS
from p2pcompute.deadlines import deadline, give_up_after
from p2pcompute.errors import P2PComputeError, PeerGone, PeerUnreachable, RemoteProtocolError
from p2pcompute.overlay.streams import FramedStream
from p2pcompute.wire.codec import Schema

log = logging.getLogger(__name__)

_OPEN_TRIES = 3  # a control stream that would not open is tried this often while connected
_LINK_IDLE = 300.0  # a control link unused this long is closed and reopened on next use
_LINK_SERVE_IDLE = 900.0  # an inbound control link silent this long is reset

#: what a control link carries: one-way messages, routed by round
CONTROL_KINDS = {STATUS.type: STATUS, LEFT.type: LEFT}

Route = Callable[[str, str, dict[str, Any]], None]  # (round id, peer, validated message)


class ControlLinks:
    """Requests and kept one-way links to peers over the collective protocol.

    Example::

        links = ControlLinks(node, timeout=10.0, stats=collections.Counter(), faults=FaultPlan())
        ack = await links.request(peer, HELLO.build(...), HELLO_ACK)
        await links.tell(peer, STATUS.build(...))      # never raises; counted when undelivered
    """

    def __init__(
        self,
        node: Any,
        *,
        timeout: float,
        stats: collections.Counter[str],
        faults: FaultPlan,
        background: Callable[[], trio.Nursery | None] = lambda: None,
    ) -> None:
        self.node = node
        self.timeout = timeout
        self.stats = stats
        self.faults = faults
        self._background = background
        self._links: dict[str, tuple[FramedStream, float]] = {}  # peer -> (control stream, last use)
        self._link_locks: dict[str, trio.Lock] = {}
        self._next_prune = 0.0  # trio time of the next sweep of idle links

    async def open(self, peer: str, timeout: float) -> FramedStream:
        """A stream to ``peer``; one that would not open is retried while the peer stays connected.

        Example::

            stream = await links.open(peer, 10.0)
        """
        for attempt in range(_OPEN_TRIES):
            try:
                stream: FramedStream = await self.node.open_stream(
                    peer, PROTOCOL, timeout=timeout, max_frame=MAX_REQUEST
                )
                return stream
            except PeerUnreachable:
                if attempt == _OPEN_TRIES - 1 or peer not in self.node.connected_peers():
                    raise
                await trio.sleep(0.05 * 4**attempt)
        raise AssertionError("unreachable")

    async def request(
        self, peer: str, data: bytes, answer: Schema, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send ``data`` on a fresh stream and return the ``answer`` it gets; :class:`PeerTimeout`
        after ``timeout`` (default: the links' own).

        Example::

            ack = await links.request(peer, READY.build(run=r, round=k, digest=d), READY_ACK)
        """
        limit = self.timeout if timeout is None else timeout
        with deadline(limit, "a collective request", peer=peer):
            stream = await self.open(peer, limit)
            try:
                await stream.send_frame(data)
                reply: dict[str, Any] = await stream.recv_msg(answer)
                return reply
            finally:
                await stream.close()
        raise AssertionError("unreachable")  # deadline() raises when it cancels the body

    async def tell(self, peer: str, data: bytes) -> None:
        """One-way control message (a status, a leave) to ``peer``, in order, best effort.

        Messages to one peer share one long-lived stream. A stale link is replaced by a fresh
        one, and a stream that would not open while the peer stays connected (py-libp2p refuses
        one now and then under load) is retried; a message that still cannot go is counted
        (``tell_failures``) and logged, never raised: the round's timeouts cover a partner we
        cannot reach.

        Example::

            await links.tell(peer, LEFT.build(round=round_id))
        """
        if self.faults.muted:
            return
        self._prune()
        lock = self._link_locks.setdefault(peer, trio.Lock())
        try:
            with deadline(self.timeout, "a control message", peer=peer):
                async with lock:
                    await self._tell_locked(peer, data)
        except P2PComputeError as exc:
            self.stats["tell_failures"] += 1
            log.info("collective: message to %s not delivered: %r", peer, exc)

    async def _tell_locked(self, peer: str, data: bytes) -> None:
        for _ in range(2):  # a kept link that broke: once more on a fresh one
            link = self._links.get(peer)
            now = trio.current_time()
            if link is not None and now - link[1] > _LINK_IDLE:
                self._links.pop(peer, None)
                await link[0].close()
                link = None
            fresh = link is None
            if link is None:
                link = (await self.open(peer, self.timeout), now)
            try:
                await link[0].send_frame(data)
            except PeerGone:
                self._links.pop(peer, None)
                await link[0].reset()
                if fresh:
                    raise
                continue
            self._links[peer] = (link[0], now)
            log.debug("collective: told %s (fresh link: %s) in %.3f s",
                      peer, fresh, trio.current_time() - now)
            return

    def _prune(self) -> None:
        """Close control links idle past ``_LINK_IDLE`` and forget their locks (peers come and go:
        a link to one that left would otherwise stay open for the node's life)."""
        now = trio.current_time()
        if now < self._next_prune:
            return
        self._next_prune = now + _LINK_IDLE / 4
        background = self._background()
        for peer, (stream, last) in list(self._links.items()):
            lock = self._link_locks.get(peer)
            if now - last > _LINK_IDLE and (lock is None or not lock.locked()):
                del self._links[peer]
                if background is not None:
                    background.start_soon(stream.close)
        for peer, lock in list(self._link_locks.items()):
            if peer not in self._links and not lock.locked() and not lock.statistics().tasks_waiting:
                del self._link_locks[peer]

    async def close(self) -> None:
        """Close every kept link (the collective is shutting down).

        Example::

            await links.close()
        """
        links, self._links = self._links, {}
        for stream, _ in links.values():
            await stream.close()

    async def serve_link(self, stream: FramedStream, first: dict[str, Any], route: Route) -> None:
        """Receive one-way messages on an inbound link, starting with ``first``, until it closes.

        Each is validated and handed to ``route(round_id, peer, msg)``; anything but a status
        or a leave on a link is the sender's protocol error. A link silent for
        ``_LINK_SERVE_IDLE`` is reset.

        Example::

            await links.serve_link(stream, raw, rounds.route)
        """
        peer = stream.peer
        assert peer is not None
        raw: Any = first
        while True:
            kind = raw.get("t") if isinstance(raw, dict) else None
            schema = CONTROL_KINDS.get(kind) if isinstance(kind, str) else None
            if schema is None:
                self.stats["bad_messages"] += 1
                raise RemoteProtocolError(f"unexpected {kind!r} on a control link", peer=peer)
            if self.faults.muted:
                await trio.sleep_forever()
            msg = schema.validate(raw, peer=peer)
            route(msg["round"], peer, msg)
            with give_up_after(_LINK_SERVE_IDLE) as idle:
                try:
                    raw = await stream.recv_msg(max_size=MAX_REQUEST)
                except PeerGone:
                    return  # closed (or gone): the sender reopens when it has more to say
            if idle.cancelled_caught:
                await stream.reset()
                return


__all__ = ["CONTROL_KINDS", "ControlLinks", "Route"]
