"""The lane's admission limits, without I/O: pending connections per source, and the parking lot.

Both are plain bookkeeping that the trio drivers in :mod:`p2pcompute.tensors.inbound` consult;
neither sleeps, reads a clock or touches a socket, so their rules are tested directly
(``tests/test_tensors_limits.py``, hypothesis over arrival orders).

* :class:`Admission` counts connections that have not authenticated yet, in all and per
  source (an IPv4 address, an IPv6 /64, or an authenticated peer id for relay streams). A
  connection over either cap is refused at once, so one source cannot fill the queue that
  every stranger shares.
* :class:`ParkingLot` holds authenticated transfers that no local ``receive`` has claimed
  yet, at most ``max_total`` in all and ``max_per_peer`` per sender. When the lot is full, a
  newcomer that would still hold fewer than the peer holding the most evicts that peer's
  oldest unclaimed transfer (max-min fairness): a few identities that park their maximum
  cannot lock others out; to refuse a peer that holds nothing, the lot must be held by
  ``max_total`` different peers with one transfer each.

Imports only the standard library.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def source_of(host: str) -> str:
    """The source a direct connection is counted under: the IPv4 address, or the IPv6 /64.

    A host that owns an IPv6 /64 has 2**64 addresses to connect from, so its whole prefix counts
    as one source; an IPv4-mapped IPv6 address counts as its IPv4 address.

    Example::

        source_of("10.0.0.7")                      # "10.0.0.7"
        source_of("2001:db8::1") == source_of("2001:db8::2")   # True
    """
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Admission:
    """Connections waiting to authenticate: at most ``max_total`` in all, ``max_per_source`` per source.

    Example::

        pending = Admission(max_total=64, max_per_source=8)
        if pending.admit("10.0.0.7"):
            try:
                ...                      # authenticate
            finally:
                pending.release("10.0.0.7")
    """

    def __init__(self, *, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.total = 0
        self.by_source: collections.Counter[str] = collections.Counter()

    def admit(self, source: str) -> bool:
        """Count one more pending connection from ``source``; False (and nothing counted) past a cap."""
        if self.total >= self.max_total or self.by_source[source] >= self.max_per_source:
            return False
        self.total += 1
        self.by_source[source] += 1
        return True

    def release(self, source: str) -> None:
        """The connection from ``source`` authenticated or went away."""
        self.total -= 1
        self.by_source[source] -= 1
        if self.by_source[source] <= 0:
            del self.by_source[source]


@dataclass(frozen=True)
class Offer(Generic[T]):
    """The lot's answer to :meth:`ParkingLot.offer`: parked or not, and the transfer it evicted.

    Example::

        offer = lot.offer(peer, tag, entry)
        if not offer.parked: ...             # refuse as busy (offer.reason says why)
        if offer.evicted is not None: ...    # tell that transfer's sender we are busy
    """

    parked: bool
    evicted: T | None = None
    reason: str = ""


class ParkingLot(Generic[T]):
    """Unclaimed transfers by (peer, tag), oldest first, with a total and a per-peer cap.

    Example::

        lot: ParkingLot[str] = ParkingLot(max_total=64, max_per_peer=8)
        lot.offer("peer-a", "grads/1", "transfer-1").parked     # True
        lot.take("peer-a", "grads/1")                            # "transfer-1"
    """

    def __init__(self, *, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._queues: dict[tuple[str, str], collections.deque[tuple[int, T]]] = {}
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(self._per_peer.values())

    def count(self, peer: str) -> int:
        """How many transfers from ``peer`` are parked."""
        return self._per_peer[peer]

    def has(self, peer: str, tag: str) -> bool:
        """Whether a transfer ``tag`` from ``peer`` is parked."""
        return bool(self._queues.get((peer, tag)))

    def offer(self, peer: str, tag: str, entry: T) -> Offer[T]:
        """Park ``entry`` unless a cap refuses it; when the lot is full, maybe evict (see the module)."""
        mine = self._per_peer[peer]
        if mine >= self.max_per_peer:
            return Offer(False, reason=f"{mine} unclaimed transfers from this peer (cap {self.max_per_peer})")
        evicted: T | None = None
        if len(self) >= self.max_total:
            victim = self._heaviest()
            if victim is None or mine + 1 >= self._per_peer[victim]:
                return Offer(False, reason=f"too many unclaimed transfers (cap {self.max_total})")
            evicted = self._pop_oldest(victim)
        self._queues.setdefault((peer, tag), collections.deque()).append((next(self._seq), entry))
        self._per_peer[peer] += 1
        return Offer(True, evicted)

    def take(self, peer: str, tag: str) -> T | None:
        """Remove and return the oldest transfer ``tag`` from ``peer`` (None when there is none)."""
        queue = self._queues.get((peer, tag))
        if not queue:
            return None
        _, entry = queue.popleft()
        self._forget(peer, tag, queue)
        return entry

    def discard(self, peer: str, tag: str, entry: T) -> bool:
        """Remove ``entry`` (it expired or its connection failed); False when it is not parked."""
        queue = self._queues.get((peer, tag))
        if not queue:
            return False
        for item in queue:
            if item[1] is entry:
                queue.remove(item)
                self._forget(peer, tag, queue)
                return True
        return False

    def _forget(self, peer: str, tag: str, queue: collections.deque[tuple[int, T]]) -> None:
        self._per_peer[peer] -= 1
        if self._per_peer[peer] <= 0:
            del self._per_peer[peer]
        if not queue:
            del self._queues[(peer, tag)]

    def _heaviest(self) -> str | None:
        """The peer holding the most (ties: the one whose oldest transfer is oldest)."""
        if not self._per_peer:
            return None
        oldest = {
            peer: min(queue[0][0] for (p, _), queue in self._queues.items() if p == peer)
            for peer in self._per_peer
        }
        return max(self._per_peer, key=lambda peer: (self._per_peer[peer], -oldest[peer]))

    def _pop_oldest(self, peer: str) -> T:
        key = min(
            (k for k in self._queues if k[0] == peer), key=lambda k: self._queues[k][0][0]
        )
        queue = self._queues[key]
        _, entry = queue.popleft()
        self._forget(peer, key[1], queue)
        return entry


__all__ = ["Admission", "Offer", "ParkingLot", "source_of"]
