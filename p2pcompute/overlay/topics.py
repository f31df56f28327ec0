"""Topic subscription plumbing: one reader and one dispatcher task per subscribed topic.

Each topic has a bounded queue between the GossipSub subscription and its handlers, so a
slow handler drops messages (counted as ``dropped_messages``) instead of stalling the
router. Handlers of one topic run one message at a time, in arrival order; an exception
is logged and counted (``handler_errors``), never fatal. Our own messages are skipped.

Imports only trio; the subscription comes from :class:`~p2pcompute.overlay.host.Libp2pStack`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from p2pcompute.errors import RemoteProtocolError

log = logging.getLogger(__name__)

TopicHandler = Callable[[str, bytes], Awaitable[None]]


class Subscription(Protocol):
    """What a topic reader needs: the next ``(sender, data)``."""

    async def get(self) -> tuple[str, bytes]: ...


class TopicRouter:
    """Routes the messages of subscribed topics to their handlers.

    ``subscribe(topic)`` opens the GossipSub subscription of a full topic id; ``own_id``
    messages are not delivered; ``queue`` is how many messages may wait per topic. A handler
    that raises :class:`RemoteProtocolError` naming a peer has that peer's offence passed to
    ``on_offence`` (gossip is signed by its origin, so the blame is attributable).

    Example::

        router = TopicRouter(stack.subscribe, own_id=peer_id, queue=256, stats=stats)
        router.add(nursery, "/p2pcompute/lab/t/chat", on_chat)
    """

    def __init__(
        self,
        subscribe: Callable[[str], Awaitable[Subscription]],
        *,
        own_id: str,
        queue: int,
        stats: dict[str, int],
        on_offence: Callable[[str, RemoteProtocolError], None] | None = None,
    ) -> None:
        self._subscribe = subscribe
        self._on_offence = on_offence
        self._own_id = own_id
        self._queue = queue
        self._stats = stats
        self._handlers: dict[str, list[TopicHandler]] = {}

    def add(self, nursery: trio.Nursery, topic: str, handler: TopicHandler) -> None:
        """Deliver ``topic``'s messages to ``handler`` too; the first handler starts the topic's
        tasks in ``nursery``. Example::

            router.add(nursery, full_topic, handler)
        """
        handlers = self._handlers.get(topic)
        if handlers is not None:
            handlers.append(handler)
            return
        self._handlers[topic] = [handler]
        nursery.start_soon(self._run, topic)

    async def _run(self, topic: str) -> None:
        send, recv = trio.open_memory_channel[tuple[str, bytes]](self._queue)
        sub = await self._subscribe(topic)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dispatch, topic, recv)
            while True:
                sender, data = await sub.get()
                if sender == self._own_id:
                    continue
                try:
                    send.send_nowait((sender, data))
                except trio.WouldBlock:
                    self._stats["dropped_messages"] += 1

    async def _dispatch(self, topic: str, recv: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        async for sender, data in recv:
            for handler in list(self._handlers.get(topic, ())):
                try:
                    await handler(sender, data)
                except RemoteProtocolError as exc:
                    self._stats["handler_errors"] += 1
                    log.info("message on %s from %s refused: %s", topic, sender, exc)
                    if self._on_offence is not None:
                        self._on_offence(exc.peer or sender, exc)
                except Exception:
                    self._stats["handler_errors"] += 1
                    log.exception("handler for %s failed on a message from %s", topic, sender)


__all__ = ["Subscription", "TopicHandler", "TopicRouter"]
