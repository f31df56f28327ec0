"""The peer table: who is alive, where to dial them, what they offer (sans-IO).

A peer enters the table only through a checked, signed advert
(:func:`~p2pcompute.capacity.adverts.open_advert`) with a sequence number above
the last one seen from it. It stays alive until its advert's lifetime runs out
(``min(received + ttl, issued + ttl + max_skew)``); the driver calls
:meth:`PeerTable.expire` periodically. Every rejected advert is counted against
the peer that handed it to us (:meth:`PeerTable.offences`).

Time is passed in (``now``, wall-clock seconds), so tests drive expiry directly.
Imports :mod:`p2pcompute.capacity` and :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from p2pcompute.capacity.adverts import DEFAULT_MAX_SKEW, Advert, open_advert
from p2pcompute.capacity.model import Capacity, CapacityQuery
from p2pcompute.errors import BadSignature, RemoteProtocolError, StaleMessage

Outcome = Literal["new", "updated", "duplicate", "own"]

_OFFENCE_KIND = {
    "MessageTooLarge": "oversized",
    "UnsupportedVersion": "version",
    "MalformedMessage": "malformed",
    "BadSignature": "forged",
    "StaleMessage": "stale",
}


@dataclass(frozen=True)
class PeerRecord:
    """One live peer as the table knows it.

    ``last_seen`` is the local wall-clock time its newest advert arrived;
    ``expires`` when it leaves the table unless a newer advert comes.
    """

    peer_id: str
    addrs: tuple[str, ...]
    last_seen: float
    capacity: Capacity
    role: str
    seq: int
    expires: float
    advert: bytes


def offence_kind(exc: RemoteProtocolError) -> str:
    """A short label for a rejection: oversized, version, malformed, forged, stale, other."""
    for cls in type(exc).__mro__:
        kind = _OFFENCE_KIND.get(cls.__name__)
        if kind:
            return kind
    return "other"


class PeerTable:
    """Checked adverts, keyed by peer id, with expiry and per-peer offence counts.

    Example::

        table = PeerTable(self_id=me, swarm="default")
        table.offer(raw_advert, sender=origin, blame=forwarder, now=time.time())
        for rec in table.alive(now=time.time()):
            print(rec.peer_id, rec.capacity.gpu_memory_free)
    """

    def __init__(
        self,
        self_id: str,
        swarm: str,
        *,
        max_skew: float = DEFAULT_MAX_SKEW,
        max_peers: int = 4096,
        seq_memory: int = 16384,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.self_id = self_id
        self.swarm = swarm
        self.max_skew = max_skew
        self.max_peers = max_peers
        self._records: dict[str, PeerRecord] = {}
        self._by_raw: dict[bytes, Advert] = {}  # the advert bytes of each record
        # Highest sequence seen per peer, kept after expiry (bounded, LRU) to refuse replays.
        self._last_seq: OrderedDict[str, int] = OrderedDict()
        self._seq_memory = seq_memory
        self._offences: dict[str, Counter[str]] = {}
        self.accepted = 0
        self.rejected = 0
        self.expired = 0

    # -- intake -----------------------------------------------------------------------------------

    def offer(
        self,
        raw: bytes | bytearray | memoryview,
        *,
        now: float | None = None,
        sender: str | None = None,
        blame: str | None = None,
        count_stale: bool = True,
    ) -> tuple[Outcome, Advert]:
        """Check an advert and, if it is new, enter it. Raises on rejection (and counts it).

        ``sender``: the peer that signed the carrying message (GossipSub origin), if any;
        ``blame``: the peer that handed us the bytes (default ``sender``).
        ``count_stale``: whether an old sequence number counts as an offence (it does not
        for lists received by peer exchange, which may legitimately lag).
        """
        who = blame if blame is not None else sender
        now = self.clock() if now is None else now
        known = self._by_raw.get(bytes(raw))
        if known is not None and (sender is None or sender == known.peer_id) and known.expires > now:
            # byte-identical to an advert we checked and hold (peer exchange repeats them): no re-check
            return "duplicate", known
        try:
            advert = open_advert(
                raw, swarm=self.swarm, now=now, sender=sender, blame=who, max_skew=self.max_skew
            )
            outcome = self._enter(advert, now, who)
        except StaleMessage as exc:
            if count_stale:
                self._count(who, exc)
            raise
        except RemoteProtocolError as exc:
            self._count(who, exc)
            raise
        return outcome, advert

    def _enter(self, advert: Advert, now: float, who: str | None) -> Outcome:
        if advert.peer_id == self.self_id:
            return "own"
        current = self._records.get(advert.peer_id)
        last = self._last_seq.get(advert.peer_id)
        if current is not None and advert.seq == current.seq:
            if advert.raw == current.advert:
                return "duplicate"
            raise BadSignature(
                f"two different adverts with sequence {advert.seq} from {advert.peer_id}", peer=who
            )
        if last is not None and advert.seq <= last:
            raise StaleMessage(
                f"advert sequence {advert.seq} not above {last} from {advert.peer_id}", peer=who
            )
        expires = min(now + advert.ttl, advert.expires + self.max_skew)
        if expires <= now:
            raise StaleMessage(f"advert from {advert.peer_id} already expired", peer=who)
        if current is None and len(self._records) >= self.max_peers:
            self._evict_one()
        if current is not None:
            self._by_raw.pop(current.advert, None)
        self._by_raw[advert.raw] = advert
        self._records[advert.peer_id] = PeerRecord(
            peer_id=advert.peer_id,
            addrs=advert.addrs,
            last_seen=now,
            capacity=advert.capacity,
            role=advert.role,
            seq=advert.seq,
            expires=expires,
            advert=advert.raw,
        )
        self._last_seq[advert.peer_id] = advert.seq
        self._last_seq.move_to_end(advert.peer_id)
        while len(self._last_seq) > self._seq_memory:
            self._last_seq.popitem(last=False)
        self.accepted += 1
        return "new" if current is None else "updated"

    def _evict_one(self) -> None:
        victim = min(self._records.values(), key=lambda r: r.expires)
        self.remove(victim.peer_id)

    def _count(self, peer: str | None, exc: RemoteProtocolError) -> None:
        self.rejected += 1
        if peer is None:
            return
        self._offences.setdefault(peer, Counter())[offence_kind(exc)] += 1

    def count_offence(self, peer: str, exc: RemoteProtocolError) -> None:
        """Record a rejection found outside :meth:`offer` (for example a bad peer-exchange reply)."""
        self._count(peer, exc)

    # -- queries ----------------------------------------------------------------------------------

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._records.get(peer_id)

    def alive(self, now: float | None = None) -> list[PeerRecord]:
        """Records whose advert has not expired at ``now`` (default: the table's clock)."""
        now = self.clock() if now is None else now
        return [r for r in self._records.values() if r.expires > now]

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._records

    def expire(self, now: float | None = None) -> list[str]:
        """Drop records that expired at ``now``; return their peer ids."""
        now = self.clock() if now is None else now
        gone = [p for p, r in self._records.items() if r.expires <= now]
        for p in gone:
            self._by_raw.pop(self._records.pop(p).advert, None)
        self.expired += len(gone)
        return gone

    def remove(self, peer_id: str) -> None:
        rec = self._records.pop(peer_id, None)
        if rec is not None:
            self._by_raw.pop(rec.advert, None)

    def find(
        self,
        query: CapacityQuery,
        *,
        now: float | None = None,
        roles: tuple[str, ...] = ("peer",),
        limit: int | None = None,
    ) -> list[PeerRecord]:
        """Live records whose capacity matches ``query``, best first."""
        scored = []
        for rec in self.alive(now):
            if rec.role not in roles:
                continue
            score = query.score(rec.capacity)
            if score is not None:
                scored.append((score, rec.last_seen, rec.peer_id, rec))
        scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
        out = [s[3] for s in scored]
        return out if limit is None else out[:limit]

    def sample_adverts(self, now: float | None, limit: int, rng: random.Random | None = None) -> list[bytes]:
        """Up to ``limit`` raw adverts of live peers, chosen at random (for peer exchange)."""
        live = self.alive(now)
        if len(live) > limit:
            live = (rng or random).sample(live, limit)
        return [r.advert for r in live]

    def offences(self, peer_id: str) -> dict[str, int]:
        """Rejections counted against ``peer_id``, by kind."""
        return dict(self._offences.get(peer_id, {}))

    def offence_total(self, peer_id: str, *, include_stale: bool = False) -> int:
        counts = self._offences.get(peer_id, Counter())
        return sum(n for kind, n in counts.items() if include_stale or kind != "stale")

    def statistics(self) -> dict[str, int]:
        return {
            "peers": len(self._records),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "expired": self.expired,
            "offending_peers": len(self._offences),
        }


__all__ = ["Outcome", "PeerRecord", "PeerTable", "offence_kind"]
