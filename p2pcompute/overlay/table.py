"""The peer table: who is alive, where to dial them, what they offer (sans-IO).

A peer enters the table only through a checked, signed advert
(:func:`~p2pcompute.capacity.adverts.open_advert`) with a sequence number above
the last one seen from it. It stays alive until its advert's lifetime runs out
(``min(received + ttl, issued + ttl + max_skew)``); the driver calls
:meth:`PeerTable.expire` periodically. Every rejected advert is counted against
the peer that handed it to us (:meth:`PeerTable.offences`).

Open swarms let anyone mint identities, so the table does not trust a signature alone
(docs/design/threat-model.md, "Overlay"):

* lifetimes are capped at ``max_ttl`` (a forged "valid for an hour" advert is not);
* a peer is *verified* once we held a connection to it (its identity was checked by the
  secure channel) and it has no offence counted; entries handed to us by a bootstrap node
  are *introduced*; all others are *unverified*. :meth:`PeerTable.trust` gives the tier;
  queries, peer-exchange samples and the dialer take higher tiers first;
* unverified entries are capped per IP address (``max_per_ip``) and per /24 (IPv6 /48)
  subnet (``max_per_subnet``) of the addresses they advertise (``exempt`` networks, by
  default loopback, are not counted). A relayed address (``.../p2p/<relay>/p2p-circuit``)
  shows the relay's IP, not the peer's: it counts under its relay (``max_per_relay``)
  instead, so one busy relay's NATed peers do not fill the relay's IP bucket;
* when the table is full a new entry may only evict an unverified one, taken from the
  most crowded subnet (newest first); it never evicts a verified or introduced one.

Time is passed in (``now``, wall-clock seconds), so tests drive expiry directly.
Imports :mod:`p2pcompute.capacity` and :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from p2pcompute.capacity.adverts import DEFAULT_MAX_SKEW, Advert, open_advert
from p2pcompute.capacity.model import Capacity, CapacityQuery
from p2pcompute.errors import BadSignature, RemoteProtocolError, StaleMessage

Outcome = Literal["new", "updated", "duplicate", "own", "dropped"]

VERIFIED, INTRODUCED, UNVERIFIED = 2, 1, 0
# entries without a counted address (none, or only exempt ones) form one crowd for eviction;
# the per-subnet cap does not apply to it (loopback test swarms run many nodes on one host)
_BARE = "-"
_RELAY = "relay:"  # the group key prefix of a relayed address (then the relay's peer id)
DEFAULT_MAX_TTL = 900.0
DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")

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
    introducer: str | None = None


def address_groups(
    addrs: Iterable[str], exempt: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
) -> tuple[set[str], set[str]]:
    """The IP addresses and subnets (/24 for IPv4, /48 for IPv6) that ``addrs`` advertise.

    Addresses inside an ``exempt`` network are left out; a DNS name counts as its own
    "address" and "subnet". A relayed address counts as ``relay:<relay id>`` in both sets,
    not under the relay's IP (that IP says nothing about the peer behind it). Example::

        >>> address_groups(["/ip4/203.0.113.7/tcp/1", "/ip4/203.0.113.9/tcp/1"])[1]
        {'203.0.113.0/24'}
        >>> address_groups(["/ip4/203.0.113.7/tcp/1/p2p/12D3KooWR/p2p-circuit/p2p/12D3KooWD"])[0]
        {'relay:12D3KooWR'}
    """
    ips: set[str] = set()
    nets: set[str] = set()
    for addr in list(addrs)[:16]:
        if "/p2p-circuit" in addr:
            relay = _relay_of(addr)
            ips.add(relay)
            nets.add(relay)
            continue
        parts = addr.split("/")
        if len(parts) < 3:
            continue
        kind, host = parts[1], parts[2]
        if kind in ("dns", "dns4", "dns6", "dnsaddr"):
            ips.add(f"dns:{host}")
            nets.add(f"dns:{host}")
            continue
        if kind not in ("ip4", "ip6"):
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if any(ip.version == net.version and ip in net for net in exempt):
            continue
        ips.add(str(ip))
        prefix = 24 if ip.version == 4 else 48
        nets.add(str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)))
    return ips, nets


def _relay_of(addr: str) -> str:
    """``relay:<id>`` for ``.../p2p/<id>/p2p-circuit...`` (``relay:?`` when no relay id is named)."""
    head = addr.split("/p2p-circuit")[0]
    relay = head.rsplit("/p2p/", 1)[1] if "/p2p/" in head else "?"
    return _RELAY + relay[:128]


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
        max_ttl: float = DEFAULT_MAX_TTL,
        max_per_ip: int = 8,
        max_per_subnet: int = 32,
        max_per_relay: int = 64,
        exempt: Sequence[str] = DEFAULT_EXEMPT,
    ) -> None:
        self.clock = clock
        self.self_id = self_id
        self.swarm = swarm
        self.max_skew = max_skew
        self.max_peers = max_peers
        self.max_ttl = max_ttl
        self.max_per_ip = max_per_ip
        self.max_per_subnet = max_per_subnet
        self.max_per_relay = max_per_relay
        self._exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt)
        # peers whose identity a connection of ours checked (bounded, LRU); they stay
        # verified after disconnecting, until an offence is counted against them
        self._connected: OrderedDict[str, None] = OrderedDict()
        self.introducers: set[str] = set()  # peers whose lists we trust more (bootstrap nodes)
        self._ip_count: Counter[str] = Counter()
        self._net_count: Counter[str] = Counter()
        self._groups: dict[str, tuple[set[str], set[str]]] = {}
        self._entered: dict[str, int] = {}  # insertion order of records, for eviction
        self._ticks = 0
        self.dropped = 0
        self._records: dict[str, PeerRecord] = {}
        self._by_raw: dict[bytes, Advert] = {}  # the advert bytes of each record
        # Highest sequence seen per peer, kept after expiry (bounded, LRU) to refuse replays.
        self._last_seq: OrderedDict[str, int] = OrderedDict()
        self._seq_memory = seq_memory
        self._offences: dict[str, Counter[str]] = {}
        self.accepted = 0
        self.rejected = 0
        self.rejected_by_kind: Counter[str] = Counter()  # every rejection, blamed on a peer or not
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
        introduced: bool = False,
    ) -> tuple[Outcome, Advert]:
        """Check an advert and, if it is new, enter it. Raises on rejection (and counts it).

        ``sender``: the peer that signed the carrying message (GossipSub origin), if any;
        ``blame``: the peer that handed us the bytes (default ``sender``).
        ``count_stale``: whether an old sequence number counts as an offence (it does not
        for lists received by peer exchange, which may legitimately lag).
        ``introduced``: ``blame`` vouches for the peer (a bootstrap node's verified peers);
        it counts only when ``blame`` is one of :attr:`introducers`.
        Returns ``"dropped"`` (not an offence) when the table keeps no room for the entry.
        """
        who = blame if blame is not None else sender
        now = self.clock() if now is None else now
        known = self._by_raw.get(bytes(raw))
        if known is not None and (sender is None or sender == known.peer_id) and known.expires > now:
            # byte-identical to an advert we checked and hold (peer exchange repeats them): no re-check
            if introduced:
                self._vouch(known.peer_id, who)
            return "duplicate", known
        try:
            advert = open_advert(
                raw, swarm=self.swarm, now=now, sender=sender, blame=who, max_skew=self.max_skew
            )
            outcome = self._enter(advert, now, who, introducer=who if introduced else None)
        except StaleMessage as exc:
            if count_stale:
                self._count(who, exc)
            raise
        except RemoteProtocolError as exc:
            self._count(who, exc)
            raise
        return outcome, advert

    def _enter(
        self, advert: Advert, now: float, who: str | None, *, introducer: str | None = None
    ) -> Outcome:
        if advert.peer_id == self.self_id:
            return "own"
        current = self._records.get(advert.peer_id)
        last = self._last_seq.get(advert.peer_id)
        if current is not None and advert.seq == current.seq:
            if advert.raw == current.advert:
                if introducer is not None:
                    self._vouch(advert.peer_id, introducer)
                return "duplicate"
            raise BadSignature(
                f"two different adverts with sequence {advert.seq} from {advert.peer_id}", peer=who
            )
        if last is not None and advert.seq <= last:
            if introducer is not None:  # an older advert still vouches for the same identity
                self._vouch(advert.peer_id, introducer)
            raise StaleMessage(
                f"advert sequence {advert.seq} not above {last} from {advert.peer_id}", peer=who
            )
        ttl = min(advert.ttl, self.max_ttl)
        expires = min(now + ttl, advert.issued + ttl + self.max_skew)
        if expires <= now:
            raise StaleMessage(f"advert from {advert.peer_id} already expired", peer=who)
        if current is None:
            tier = self._tier(advert.peer_id, introducer)
            groups = address_groups(advert.addrs, self._exempt)
            if tier == UNVERIFIED and self._crowded(groups):
                self.dropped += 1
                return "dropped"
            if len(self._records) >= self.max_peers and not self._make_room(tier, groups):
                self.dropped += 1
                return "dropped"
        else:
            self._by_raw.pop(current.advert, None)
            self._ungroup(advert.peer_id)
            introducer = current.introducer if current.introducer is not None else introducer
            groups = address_groups(advert.addrs, self._exempt)
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
            introducer=introducer,
        )
        self._group(advert.peer_id, groups)
        if current is None:
            self._ticks += 1
            self._entered[advert.peer_id] = self._ticks
        self._last_seq[advert.peer_id] = advert.seq
        self._last_seq.move_to_end(advert.peer_id)
        while len(self._last_seq) > self._seq_memory:
            self._last_seq.popitem(last=False)
        self.accepted += 1
        return "new" if current is None else "updated"

    # -- trust and crowding ------------------------------------------------------------------------

    def mark_connected(self, peer_ids: Iterable[str]) -> None:
        """Record that a connection of ours authenticated each of ``peer_ids`` (they become verified).

        Example::

            table.mark_connected(stack.connected_peers())
        """
        for p in peer_ids:
            self._connected[p] = None
            self._connected.move_to_end(p)
        while len(self._connected) > self._seq_memory:
            self._connected.popitem(last=False)

    def is_verified(self, peer_id: str) -> bool:
        """True when a connection of ours checked ``peer_id`` and no offence is counted against it.

        Example::

            table.is_verified(peer)     # False for a stranger known only by its advert
        """
        return peer_id in self._connected and self.offence_total(peer_id) == 0

    def _tier(self, peer_id: str, introducer: str | None) -> int:
        if self.is_verified(peer_id):
            return VERIFIED
        if introducer is not None and introducer in self.introducers and self.offence_total(introducer) == 0:
            return INTRODUCED
        return UNVERIFIED

    def trust(self, rec: PeerRecord) -> int:
        """``VERIFIED`` (2), ``INTRODUCED`` (1, handed on by a bootstrap node) or ``UNVERIFIED`` (0).

        Example::

            verified = [r for r in table.alive() if table.trust(r) == VERIFIED]
        """
        return self._tier(rec.peer_id, rec.introducer)

    def _vouch(self, peer_id: str, introducer: str | None) -> None:
        """A bootstrap node vouched for an entry we already hold (it may have come by gossip)."""
        rec = self._records.get(peer_id)
        if rec is not None and rec.introducer is None and introducer is not None:
            self._records[peer_id] = replace(rec, introducer=introducer)

    def _crowded(self, groups: tuple[set[str], set[str]]) -> bool:
        ips, nets = groups
        return any(self._ip_count[i] >= self._cap(i, self.max_per_ip) for i in ips) or any(
            self._net_count[n] >= self._cap(n, self.max_per_subnet) for n in nets
        )

    def _cap(self, key: str, cap: int) -> int:
        return self.max_per_relay if key.startswith(_RELAY) else cap

    def _group(self, peer_id: str, groups: tuple[set[str], set[str]]) -> None:
        self._groups[peer_id] = groups
        self._ip_count.update(groups[0])
        self._net_count.update(groups[1] or {_BARE})

    def _ungroup(self, peer_id: str) -> None:
        groups = self._groups.pop(peer_id, None)
        if groups is None:
            return
        nets = groups[1] or {_BARE}
        self._ip_count.subtract(groups[0])
        self._net_count.subtract(nets)
        for counter, keys in ((self._ip_count, groups[0]), (self._net_count, nets)):
            for k in keys:
                if counter[k] <= 0:
                    del counter[k]

    def _crowd_key(self, peer_id: str) -> tuple[int, int]:
        nets = self._groups.get(peer_id, (set(), set()))[1] or {_BARE}
        return (max(self._net_count[n] for n in nets), self._entered.get(peer_id, 0))

    def _make_room(self, tier: int, groups: tuple[set[str], set[str]]) -> bool:
        """Evict one unverified record so an entry of ``tier`` fits; False when the newcomer
        should be dropped instead (nothing evictable, or it is the most crowded itself)."""
        victims = [r for r in self._records.values() if self.trust(r) == UNVERIFIED]
        if not victims:
            return False
        victim = max(victims, key=lambda r: self._crowd_key(r.peer_id))
        if tier == UNVERIFIED:
            mine = max(self._net_count[n] + 1 for n in groups[1] or {_BARE})
            if mine > self._crowd_key(victim.peer_id)[0]:
                return False
        self.remove(victim.peer_id)
        return True

    def _count(self, peer: str | None, exc: RemoteProtocolError) -> None:
        self.rejected += 1
        self.rejected_by_kind[offence_kind(exc)] += 1
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
            self.remove(p)
        self.expired += len(gone)
        return gone

    def remove(self, peer_id: str) -> None:
        """Forget ``peer_id``'s record (its last sequence number is still remembered).

        Example::

            table.remove(banned_peer)
        """
        rec = self._records.pop(peer_id, None)
        if rec is not None:
            self._by_raw.pop(rec.advert, None)
            self._ungroup(peer_id)
            self._entered.pop(peer_id, None)

    def find(
        self,
        query: CapacityQuery,
        *,
        now: float | None = None,
        roles: tuple[str, ...] = ("peer",),
        limit: int | None = None,
    ) -> list[PeerRecord]:
        """Live records whose capacity matches ``query``: verified peers first, then introduced,
        then unverified ones; best capacity first within each tier (anyone can claim a big GPU)."""
        scored = []
        for rec in self.alive(now):
            if rec.role not in roles:
                continue
            score = query.score(rec.capacity)
            if score is not None:
                scored.append((self.trust(rec), score, rec.last_seen, rec))
        scored.sort(key=lambda s: (s[0], s[1], s[2]), reverse=True)
        out = [s[3] for s in scored]
        return out if limit is None else out[:limit]

    def sample_adverts(self, now: float | None, limit: int, rng: random.Random | None = None) -> list[bytes]:
        """Up to ``limit`` raw adverts of live peers for peer exchange: verified peers first, then
        introduced, then unverified ones, chosen at random within a tier."""
        return [r.advert for r in self.by_trust(now, rng)[:limit]]

    def verified_sample(
        self, now: float | None, limit: int, rng: random.Random | None = None
    ) -> tuple[list[bytes], int]:
        """Like :meth:`sample_adverts`, with how many of the adverts (all first) are verified.

        Example::

            adverts, vouched = table.verified_sample(None, 100)
        """
        recs = self.by_trust(now, rng)[:limit]
        return [r.advert for r in recs], sum(1 for r in recs if self.trust(r) == VERIFIED)

    def by_trust(self, now: float | None = None, rng: random.Random | None = None) -> list[PeerRecord]:
        """Live records, most trusted tier first, shuffled within each tier (the dial order).

        Example::

            for rec in table.by_trust():
                ...   # dial verified peers before strangers
        """
        live = self.alive(now)
        (rng or random).shuffle(live)
        live.sort(key=self.trust, reverse=True)
        return live

    def offences(self, peer_id: str) -> dict[str, int]:
        """Rejections counted against ``peer_id``, by kind."""
        return dict(self._offences.get(peer_id, {}))

    def offences_by_kind(self) -> dict[str, int]:
        """Rejections counted against all peers, by kind.

        Example::

            table.offences_by_kind()     # {'malformed': 3, 'forged': 1}
        """
        total: Counter[str] = Counter()
        for counts in self._offences.values():
            total.update(counts)
        return dict(total)

    def offence_total(self, peer_id: str, *, include_stale: bool = False) -> int:
        """How many rejections are counted against ``peer_id`` (stale ones only when asked).

        Example::

            table.offence_total(peer)     # 0
        """
        counts = self._offences.get(peer_id, Counter())
        return sum(n for kind, n in counts.items() if include_stale or kind != "stale")

    def statistics(self) -> dict[str, int]:
        return {
            "peers": len(self._records),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "expired": self.expired,
            "offending_peers": len(self._offences),
            "offences": sum(sum(c.values()) for c in self._offences.values()),
            "dropped": self.dropped,
            "verified": sum(1 for r in self._records.values() if self.is_verified(r.peer_id)),
        }


__all__ = [
    "DEFAULT_MAX_TTL",
    "INTRODUCED",
    "UNVERIFIED",
    "VERIFIED",
    "Outcome",
    "PeerRecord",
    "PeerTable",
    "address_groups",
    "offence_kind",
]
