"""The lane's admission rules without I/O: pending connections per source, and the parking lot
(p2pcompute.tensors.limits), driven by hypothesis over arrival and departure orders."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.tensors.limits import Admission, ParkingLot, source_of


def test_sources_group_ipv6_by_prefix() -> None:
    assert source_of("10.0.0.7") == "10.0.0.7"
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_of("2001:db8:0:1::1") != source_of("2001:db8::1")
    assert source_of("::ffff:10.0.0.7") == "10.0.0.7"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("not-an-ip") == "not-an-ip"


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=200))
def test_admission_never_passes_a_cap_and_one_source_never_fills_it(ops: list[tuple[bool, int]]) -> None:
    pending = Admission(max_total=8, max_per_source=3)
    held: list[str] = []
    for arrive, who in ops:
        source = f"10.0.0.{who}"
        if arrive:
            room = pending.total < 8 and held.count(source) < 3
            assert pending.admit(source) == room
            if room:
                held.append(source)
        elif source in held:
            held.remove(source)
            pending.release(source)
        assert pending.total == len(held) <= 8
        assert all(n <= 3 for n in pending.by_source.values())
    for source in list(held):
        pending.release(source)
    assert pending.total == 0
    assert not pending.by_source


def test_a_full_lot_evicts_the_oldest_of_the_heaviest_for_a_lighter_newcomer() -> None:
    lot: ParkingLot[str] = ParkingLot(max_total=4, max_per_peer=3)
    for entry in ("a1", "a2", "a3"):
        assert lot.offer("A", entry, entry).parked
    assert lot.offer("B", "b1", "b1").parked
    offer = lot.offer("C", "c1", "c1")  # full: C holds 0 and 0 + 1 < 3, so A's oldest goes
    assert offer.parked
    assert offer.evicted == "a1"
    assert not lot.has("A", "a1")
    refused = lot.offer("C", "c2", "c2")  # C would hold 2, as many as A: refused, nothing evicted
    assert not refused.parked
    assert refused.evicted is None
    assert "unclaimed" in refused.reason
    assert lot.offer("D", "d1", "d1").evicted == "a2"  # a peer holding nothing still gets in
    assert not lot.offer("E", "e1", "e1").parked  # everyone holds one: the lot is fairly full
    assert lot.take("C", "c1") == "c1"
    assert lot.offer("E", "e1", "e1").parked


def test_the_per_peer_cap_refuses_before_the_lot_is_full() -> None:
    lot: ParkingLot[int] = ParkingLot(max_total=64, max_per_peer=2)
    assert lot.offer("A", "t", 1).parked
    assert lot.offer("A", "t", 2).parked
    offer = lot.offer("A", "u", 3)
    assert not offer.parked
    assert "cap 2" in offer.reason
    assert lot.take("A", "t") == 1  # oldest first
    assert lot.discard("A", "t", 2)
    assert not lot.discard("A", "t", 2)
    assert len(lot) == 0


ops = st.lists(
    st.tuples(st.sampled_from(["offer", "take", "discard"]), st.integers(0, 6), st.integers(0, 2)),
    max_size=300,
)


@settings(max_examples=200)
@given(ops)
def test_the_lot_keeps_its_caps_and_lets_a_lighter_peer_in(steps: list[tuple[str, int, int]]) -> None:
    """Whatever arrives and leaves: the caps hold, nothing is lost or duplicated, and a peer that
    holds fewer than the heaviest minus one is never refused by a full lot."""
    total, per_peer = 6, 3
    lot: ParkingLot[int] = ParkingLot(max_total=total, max_per_peer=per_peer)
    parked: dict[int, tuple[str, str]] = {}
    serial = 0
    for op, who, tag_no in steps:
        peer, tag = f"p{who}", f"t{tag_no}"
        if op == "offer":
            serial += 1
            counts = {p: sum(1 for q, _ in parked.values() if q == p) for p, _ in parked.values()}
            mine = counts.get(peer, 0)
            heaviest = max(counts.values(), default=0)
            offer = lot.offer(peer, tag, serial)
            if mine < per_peer and (len(parked) < total or mine + 1 < heaviest):
                assert offer.parked
            if offer.parked:
                parked[serial] = (peer, tag)
            if offer.evicted is not None:
                victim = parked.pop(offer.evicted)
                assert counts[victim[0]] == heaviest  # from a peer holding the most
                assert mine + 1 < heaviest
        elif op == "take":
            got = lot.take(peer, tag)
            mine_here = sorted(s for s, k in parked.items() if k == (peer, tag))
            assert got == (mine_here[0] if mine_here else None)  # oldest first
            if got is not None:
                del parked[got]
        else:
            victims = [s for s, k in parked.items() if k == (peer, tag)]
            if victims:
                assert lot.discard(peer, tag, victims[-1])
                del parked[victims[-1]]
        assert len(lot) == len(parked) <= total
        for p in {q for q, _ in parked.values()}:
            assert lot.count(p) == sum(1 for q, _ in parked.values() if q == p) <= per_peer
