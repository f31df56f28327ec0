"""The peer table among strangers (sans-IO): capped lifetimes, trust tiers, per-IP/subnet caps,
and eviction that never lets a crowd of fresh identities push out peers we verified.

Found by attacking: 2,000 fresh identities advertising huge GPUs with a 3,600 s lifetime
took almost every entry, because the table evicted the entry that expires soonest (the
honest 30 s ones) and discovery dialled at random from the poisoned table.
"""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.capacity import Capacity, GpuInfo, make_advert
from p2pcompute.capacity.model import CapacityQuery
from p2pcompute.errors import StaleMessage
from p2pcompute.identity import Identity
from p2pcompute.overlay.table import INTRODUCED, UNVERIFIED, VERIFIED, PeerTable, address_groups

NOW = 1_800_000_000.0
GIB = 1 << 30
ME = Identity.from_seed(b"m" * 32)
BOOT = Identity.from_seed(b"b" * 32)


def cap(gpu_gib: int) -> Capacity:
    gpus = (GpuInfo(index=0, name="X", uuid="GPU-0", memory_total=gpu_gib * GIB, memory_free=gpu_gib * GIB),)
    return Capacity(cpu_cores=4, ram_total=GIB, ram_available=GIB, platform="x", gpus=gpus)


@cache
def ident(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(4, "big") * 8)


def adv(who: Identity, *, addr: str, ttl: float = 30.0, gpu_gib: int = 24, seq: int = 1) -> bytes:
    return make_advert(
        who,
        peer_id=who.peer_id,
        swarm="s",
        seq=seq,
        capacity=cap(gpu_gib),
        addrs=[addr],
        ttl=ttl,
        issued=NOW,
    )


def table(**kw: object) -> PeerTable:
    return PeerTable(ME.peer_id, "s", clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def fake_addr(i: int) -> str:
    # the attacker spreads its claimed addresses over many subnets
    return f"/ip4/10.{i // 200}.{i % 200}.1/tcp/4001"


def test_lifetime_is_capped() -> None:
    t = table(max_ttl=60.0)
    liar = ident(1)
    t.offer(adv(liar, addr=fake_addr(1), ttl=3600.0), sender=liar.peer_id)
    assert t.get(liar.peer_id).expires == NOW + 60.0  # type: ignore[union-attr]


def test_address_groups() -> None:
    ips, nets = address_groups(
        ["/ip4/203.0.113.7/tcp/1", "/ip6/2001:db8:1:2::5/tcp/1", "/dns4/a.example/tcp/1"]
    )
    assert "203.0.113.7" in ips
    assert "203.0.113.0/24" in nets
    assert "2001:db8:1::/48" in nets
    assert "dns:a.example" in ips
    assert address_groups(["/ip4/127.0.0.1/tcp/1"], table()._exempt) == (set(), set())
    relayed = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWR/p2p-circuit/p2p/12D3KooWD"
    assert address_groups([relayed]) == ({"relay:12D3KooWR"}, {"relay:12D3KooWR"})


def test_a_flood_of_fresh_identities_does_not_evict_verified_or_introduced_peers() -> None:
    t = table(max_peers=64)
    t.introducers.add(BOOT.peer_id)
    honest = [ident(10_000 + i) for i in range(6)]
    for i, h in enumerate(honest[:3]):  # peers we held a connection to
        t.mark_connected([h.peer_id])
        t.offer(adv(h, addr=f"/ip4/198.51.100.{i}/tcp/1"), sender=h.peer_id)
    for i, h in enumerate(honest[3:]):  # peers a bootstrap node vouched for
        t.offer(adv(h, addr=f"/ip4/192.0.2.{i}/tcp/1"), blame=BOOT.peer_id, introduced=True)
    outcomes = []
    for i in range(400):
        fake = ident(i)
        outcomes.append(
            t.offer(adv(fake, addr=fake_addr(i), ttl=3600.0, gpu_gib=512 << 10), sender=fake.peer_id)[0]
        )
    assert len(t) <= 64
    assert all(h.peer_id in t for h in honest)
    assert "dropped" in outcomes or len(t) == 64
    # queries, peer exchange and the dialer take the honest peers first despite their smaller GPUs
    best = t.find(CapacityQuery(gpus=1))
    assert {r.peer_id for r in best[:6]} == {h.peer_id for h in honest}
    assert {r.peer_id for r in t.by_trust()[:6]} == {h.peer_id for h in honest}
    adverts, vouched = t.verified_sample(None, 10)
    assert vouched == 3
    assert len(adverts) == 10
    tiers = sorted(t.trust(t.get(h.peer_id)) for h in honest)  # type: ignore[arg-type]
    assert tiers == [INTRODUCED] * 3 + [VERIFIED] * 3


def test_unverified_entries_are_capped_per_ip_and_subnet() -> None:
    t = table(max_per_ip=2, max_per_subnet=5)
    same_ip = [
        t.offer(adv(ident(i), addr="/ip4/203.0.113.9/tcp/1"), sender=ident(i).peer_id)[0] for i in range(4)
    ]
    assert same_ip == ["new", "new", "dropped", "dropped"]
    same_net = [
        t.offer(adv(ident(100 + i), addr=f"/ip4/203.0.113.{20 + i}/tcp/1"), sender=ident(100 + i).peer_id)[0]
        for i in range(5)
    ]
    assert same_net.count("new") == 3  # 2 + 3 = the subnet's cap of 5
    # a verified peer is not held back by the crowd it shares a subnet with
    v = ident(200)
    t.mark_connected([v.peer_id])
    assert t.offer(adv(v, addr="/ip4/203.0.113.9/tcp/1"), sender=v.peer_id)[0] == "new"
    # loopback (exempt by default) is not counted
    local = [
        t.offer(adv(ident(300 + i), addr="/ip4/127.0.0.1/tcp/1"), sender=ident(300 + i).peer_id)[0]
        for i in range(4)
    ]
    assert local == ["new"] * 4


def test_relayed_adverts_count_under_their_relay_not_the_relays_ip() -> None:
    """Issue #20: a NATed peer's advert holds only ``<relay addr>/p2p/<relay>/p2p-circuit``;
    its IP is the relay's, so counting it there let one relay vouch for only ``max_per_ip``
    NATed strangers, and crowded out the relay's own IP. Now each relay has its own cap."""
    t = table(max_per_ip=2, max_per_subnet=5, max_per_relay=3)
    relay_ip = "/ip4/203.0.113.9/tcp/4001"

    def circuit(relay: int, who: int) -> str:
        return f"{relay_ip}/p2p/{ident(900 + relay).peer_id}/p2p-circuit/p2p/{ident(who).peer_id}"

    first = [t.offer(adv(ident(i), addr=circuit(0, i)), sender=ident(i).peer_id)[0] for i in range(5)]
    assert first == ["new"] * 3 + ["dropped"] * 2  # the relay's own cap, above max_per_ip
    second = [
        t.offer(adv(ident(10 + i), addr=circuit(1, 10 + i)), sender=ident(10 + i).peer_id)[0]
        for i in range(3)
    ]
    assert second == ["new"] * 3  # another relay on the same IP has a cap of its own
    # the relay's IP and subnet were not filled by its NATed peers
    direct = [t.offer(adv(ident(20 + i), addr=relay_ip), sender=ident(20 + i).peer_id)[0] for i in range(3)]
    assert direct == ["new", "new", "dropped"]


def test_an_offence_takes_verification_away() -> None:
    from p2pcompute.errors import MalformedMessage

    t = table()
    p = ident(1)
    t.mark_connected([p.peer_id])
    t.offer(adv(p, addr=fake_addr(1)), sender=p.peer_id)
    assert t.trust(t.get(p.peer_id)) == VERIFIED  # type: ignore[arg-type]
    t.count_offence(p.peer_id, MalformedMessage("junk", peer=p.peer_id))
    assert t.trust(t.get(p.peer_id)) == UNVERIFIED  # type: ignore[arg-type]


# -- properties -------------------------------------------------------------------------------------

POOL = 40
ADDRS = [f"/ip4/10.{n}.0.{h}/tcp/1" for n in range(4) for h in range(3)]


@cache
def pooled_advert(i: int) -> bytes:
    return adv(ident(5000 + i), addr=ADDRS[i % len(ADDRS)], ttl=30.0 + i)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, POOL - 1), st.booleans()), min_size=1, max_size=80))
def test_verified_peers_are_never_evicted_and_caps_hold(steps: list[tuple[int, bool]]) -> None:
    t = table(max_peers=10, max_per_ip=2, max_per_subnet=4)
    entered_verified: set[str] = set()
    for i, verify in steps:
        peer = ident(5000 + i).peer_id
        if verify:
            t.mark_connected([peer])
        try:
            outcome, _ = t.offer(pooled_advert(i), sender=peer)
        except StaleMessage:  # evicted earlier: the same advert does not bring it back
            outcome = "stale"
        if outcome == "new" and t.is_verified(peer):
            entered_verified.add(peer)
        if t.is_verified(peer) and peer in t:
            entered_verified.add(peer)
        # invariants
        assert len(t) <= 10
        assert entered_verified <= {r.peer_id for r in t.alive()}
        per_ip: dict[str, int] = {}
        for rec in t.alive():
            if t.trust(rec) == UNVERIFIED:
                for ip in address_groups(rec.addrs)[0]:
                    per_ip[ip] = per_ip.get(ip, 0) + 1
        assert all(n <= 2 for n in per_ip.values())


def test_junk_without_counted_addresses_is_one_crowd() -> None:
    """Entries with no counted address (none, or loopback) are evicted as one crowd, so they
    cannot keep an unverified newcomer with a real address out of a full table."""
    t = table(max_peers=20)
    for i in range(40):
        t.offer(adv(ident(i), addr="/ip4/127.0.0.1/tcp/1"), sender=ident(i).peer_id)
    assert len(t) == 20
    newcomer = ident(999)
    assert t.offer(adv(newcomer, addr="/ip4/203.0.113.5/tcp/1"), sender=newcomer.peer_id)[0] == "new"
    assert newcomer.peer_id in t


def test_vouching_applies_to_an_entry_that_came_by_gossip_first() -> None:
    """A bootstrap node's list often repeats an advert gossip delivered already (same bytes, or
    an older sequence): the vouch must still count."""
    t = table()
    t.introducers.add(BOOT.peer_id)
    p, q = ident(1), ident(2)
    first = adv(p, addr=fake_addr(1))
    t.offer(first, sender=p.peer_id)  # by gossip: unverified
    assert t.trust(t.get(p.peer_id)) == UNVERIFIED  # type: ignore[arg-type]
    assert t.offer(first, blame=BOOT.peer_id, introduced=True, count_stale=False)[0] == "duplicate"
    assert t.trust(t.get(p.peer_id)) == INTRODUCED  # type: ignore[arg-type]
    t.offer(adv(q, addr=fake_addr(2), seq=2), sender=q.peer_id)
    with pytest.raises(StaleMessage):
        t.offer(adv(q, addr=fake_addr(2), seq=1), blame=BOOT.peer_id, introduced=True, count_stale=False)
    assert t.trust(t.get(q.peer_id)) == INTRODUCED  # type: ignore[arg-type]
    # a list from anyone else vouches for nothing
    r = ident(3)
    t.offer(adv(r, addr=fake_addr(3)), blame=ident(4).peer_id, introduced=True)
    assert t.trust(t.get(r.peer_id)) == UNVERIFIED  # type: ignore[arg-type]
