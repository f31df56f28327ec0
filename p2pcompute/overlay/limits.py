"""Per-peer admission control for what a node serves (sans-IO; time is passed in).

:class:`RateLimiter` keeps one token bucket per key (``(peer, protocol)`` in the stream
handler wrapper): a stream costs one token, tokens refill at ``rate`` per second up to
``burst``. :class:`Occupancy` counts what is in use per key against a cap (streams being
served per peer and per protocol, connections per IP). A refusal from either is the honest
"I am full" of :class:`~p2pcompute.errors.ResourceLimitExceeded`: the stream is reset and
nobody is blamed. Both are bounded: idle buckets and empty counters are forgotten.

Imports nothing of ours.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable


class RateLimiter:
    """Token buckets per key: ``allow(key, now)`` spends one token or refuses.

    ``max_keys`` bounds memory: the least recently used bucket is dropped past it (a dropped
    bucket comes back full, which only errs towards serving).

    Example::

        limiter = RateLimiter(rate=20.0, burst=40)
        if not limiter.allow((peer, protocol), now=trio.current_time()):
            ...   # refuse: reset the stream, blame nobody
    """

    def __init__(self, *, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self.refused = 0

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens of ``key``'s bucket at time ``now``; False (and counted) when short.

        Example::

            RateLimiter(rate=1.0, burst=1).allow("peer", now=0.0)     # True
        """
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        ok = tokens >= cost
        if ok:
            tokens -= cost
        else:
            self.refused += 1
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)


class Occupancy:
    """Counts of things in use per key, each capped at ``cap``.

    Example::

        streams = Occupancy(cap=64)
        if streams.acquire(peer):
            try:
                ...
            finally:
                streams.release(peer)
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._used: Counter[Hashable] = Counter()
        self.refused = 0

    def acquire(self, key: Hashable) -> bool:
        """Take one slot of ``key``; False (and counted) when it already holds ``cap``.

        Example::

            Occupancy(cap=1).acquire("peer")     # True
        """
        if self._used[key] >= self.cap:
            self.refused += 1
            if not self._used[key]:
                del self._used[key]
            return False
        self._used[key] += 1
        return True

    def release(self, key: Hashable) -> None:
        """Give back one slot of ``key`` (forgetting the key when it reaches zero).

        Example::

            streams.release(peer)
        """
        self._used[key] -= 1
        if self._used[key] <= 0:
            del self._used[key]

    def used(self, key: Hashable) -> int:
        """Slots of ``key`` in use.

        Example::

            streams.used(peer)     # 0
        """
        return self._used.get(key, 0)

    def __len__(self) -> int:
        return len(self._used)


__all__ = ["Occupancy", "RateLimiter"]
