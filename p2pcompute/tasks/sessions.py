"""The requester's open sessions: offers its providers keep open, and their idle lease streams.

A *session* (docs/design/sessions.md) is an offer that its provider keeps acceptable after
each lease, for an idle time it granted, so that later items of the same kind and terms are
leased by an accept on an already open lease stream: no request on GossipSub, no offer window,
no stream to open. Each item is still its own lease with its own dual-signed receipt.

:class:`SessionPool` holds, per offer, the streams that finished a lease cleanly and may carry
the next one. A job asks it for the offers to seed its core with
(:meth:`~p2pcompute.tasks.negotiation.RequesterCore.start`), borrows a stream per accept and
gives it back after the receipt. Its :meth:`~SessionPool.janitor` sleeps until the earliest
idle session lapses (forever while there is none), then ends it with ``task-end``.

Imports messages, :mod:`p2pcompute.deadlines`, errors; the overlay as types only.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import P2PComputeError
from p2pcompute.tasks.messages import END, Offer, reason_text

if TYPE_CHECKING:
    from p2pcompute.overlay import FramedStream


@dataclass
class _Session:
    offer: Offer
    granted: float  # idle seconds the provider granted
    idle_until: float  # (trio clock) when the session lapses if nothing uses it
    streams: list[FramedStream] = field(default_factory=list)  # idle, ready for an accept
    lent: int = 0  # streams carrying a lease now


class SessionPool:
    """Open sessions of one requester, keyed by offer id; at most ``max_sessions`` of them.

    ``idle`` caps how long an unused session is kept (the provider's grant may be shorter).

    Example::

        pool = SessionPool(idle=10.0)
        nursery.start_soon(pool.janitor)
        core.start(now, sessions=pool.offers(now))
        stream, lent = pool.take(offer.offer_id)   # stream None: open a new lease stream
        ...
        pool.give_back(offer, stream, granted, now, lent=lent)
    """

    def __init__(
        self,
        idle: float = 10.0,
        max_sessions: int = 256,
        max_idle_streams: int = 4,
        *,
        connected: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.idle = idle
        # the peers we hold a connection to: a session with any other is over (its provider left)
        self._connected = connected
        self.max_sessions = max_sessions
        # idle streams kept per provider: a provider caps the lease streams one peer holds open
        # (ProviderConfig.streams_per_requester), so the pool must not hoard them
        self.max_idle_streams = max_idle_streams
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._changed = trio.Event()
        self._closing: list[tuple[bytes | None, FramedStream]] = []  # (None: close, no task-end)
        self.stats: dict[str, int] = {"opened": 0, "reused": 0, "lapsed": 0, "dropped": 0}

    def __len__(self) -> int:
        return len(self._sessions)

    def offers(self, now: float) -> list[tuple[Offer, float]]:
        """The open sessions' offers, each with the time (trio clock) until which it may be accepted.

        A session whose provider we are no longer connected to is ended here: its stream is
        dead, and a job that accepted on it would only wait for its accept timeout.
        """
        if self._connected is not None and self._sessions:
            live = set(self._connected())
            for offer_id in [o for o, s in self._sessions.items() if s.offer.provider not in live]:
                self.stats["dropped"] += 1
                self._end(offer_id)
        out = []
        for s in self._sessions.values():
            until = s.idle_until if not s.lent else max(s.idle_until, now + min(self.idle, s.granted))
            if until > now:
                out.append((s.offer, until))
        return out

    def take(self, offer_id: bytes) -> tuple[FramedStream | None, bool]:
        """An idle stream of the session on ``offer_id`` for the next accept (``None``: open one),
        and whether the lease is counted as lent (pass it back to :meth:`give_back` / :meth:`returned`)."""
        s = self._sessions.get(offer_id)
        if s is None:
            return None, False
        s.lent += 1
        if s.streams:
            self.stats["reused"] += 1
            return s.streams.pop(), True
        return None, True

    def returned(self, offer_id: bytes, *, lent: bool) -> None:
        """A lease that :meth:`take` counted ended without giving its stream back."""
        s = self._sessions.get(offer_id)
        if lent and s is not None and s.lent:
            s.lent -= 1
            self._changed.set()

    def give_back(
        self, offer: Offer, stream: FramedStream, granted: float, now: float, *, lent: bool
    ) -> None:
        """``stream`` finished a lease on ``offer`` cleanly with a session of ``granted`` idle seconds.

        Synchronous, so that the caller hands the stream over with no checkpoint after the
        lease's last frame.
        """
        s = self._sessions.get(offer.offer_id)
        if s is None:
            s = _Session(offer, granted, now)
            self._sessions[offer.offer_id] = s
            self.stats["opened"] += 1
            while len(self._sessions) > self.max_sessions:
                oldest, _ = next(iter(self._sessions.items()))
                self._end(oldest)
        elif lent and s.lent:
            s.lent -= 1
        s.granted = granted
        s.idle_until = now + min(self.idle, granted)  # the latest grant counts
        idle = sum(len(o.streams) for o in self._sessions.values() if o.offer.provider == offer.provider)
        if idle < self.max_idle_streams:
            s.streams.append(stream)
        else:  # enough idle streams to this provider: close this one (the session stays open)
            self._closing.append((None, stream))
        self._changed.set()

    def drop(self, offer_id: bytes) -> None:
        """Forget the session on ``offer_id`` (its provider refused it, or it failed); its idle
        streams are ended by the janitor."""
        if offer_id in self._sessions:
            self.stats["dropped"] += 1
            self._end(offer_id)

    def _end(self, offer_id: bytes) -> None:
        s = self._sessions.pop(offer_id)
        self._closing += [(offer_id, stream) for stream in s.streams]
        self._changed.set()

    def _next_lapse(self) -> float:
        idle = [s.idle_until for s in self._sessions.values() if not s.lent]
        return min(idle, default=math.inf)

    async def janitor(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """End sessions as they lapse; sleep in between (forever while no session is open)."""
        task_status.started()
        while True:
            with trio.move_on_at(self._next_lapse()):
                await self._changed.wait()
            self._changed = trio.Event()
            now = trio.current_time()
            for offer_id, s in list(self._sessions.items()):
                if not s.lent and s.idle_until <= now:
                    self.stats["lapsed"] += 1
                    self._end(offer_id)
            closing, self._closing = self._closing, []
            for ending, stream in closing:
                await _end_stream(ending, stream, "session idle")

    async def aclose(self) -> None:
        """End every session (the task service is closing)."""
        for offer_id in list(self._sessions):
            self._end(offer_id)
        closing, self._closing = self._closing, []
        for ending, stream in closing:
            await _end_stream(ending, stream, "requester closing")


async def _end_stream(offer_id: bytes | None, stream: FramedStream, reason: str) -> None:
    with trio.CancelScope(shield=True), give_up_after(1), contextlib.suppress(P2PComputeError):
        try:
            if offer_id is not None:
                await stream.send_frame(END.build(offer_id=offer_id, reason=reason_text(reason)))
        finally:
            await stream.close()


__all__ = ["SessionPool"]
