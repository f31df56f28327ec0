"""DeliveryWatch, the sans-IO core that finds GossipSub mesh peers that drop (issue #14).

The live counterpart (droppers pruned from honest advert meshes in a swarm of sybils) is
tests/test_attack_sybil.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.overlay.delivery import DeliveryWatch

PEERS = ["a", "b", "c", "d", "e"]
TOPIC = "ads"

# one event: (kind, forwarder, origin); kind "first" = a valid message reached us first
# from the forwarder, "again" = a duplicate of one we had
events = st.lists(
    st.tuples(st.sampled_from(["first", "again"]), st.sampled_from(PEERS), st.sampled_from([*PEERS, "w"])),
    max_size=60,
)


def replay(watch: DeliveryWatch, log: list[tuple[str, str, str]], mesh: set[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for kind, forwarder, origin in log:
        if kind == "first":
            watch.accepted(TOPIC, forwarder, origin, mesh)
        else:
            watch.delivered(TOPIC, forwarder, origin)
        found += watch.droppers({TOPIC: mesh})
    return found


@settings(max_examples=100, deadline=None)
@given(log=events, misses=st.integers(1, 6))
def test_a_peer_is_a_dropper_only_after_missing_misses_relayed_messages_in_a_row(
    log: list[tuple[str, str, str]], misses: int
) -> None:
    mesh = set(PEERS)
    watch = DeliveryWatch(misses=misses)
    found = replay(watch, log, mesh)
    # recompute the rule independently: consecutive relayed messages a peer neither
    # brought first nor forwarded again since its last forward (or verdict)
    streak = dict.fromkeys(PEERS, 0)
    expected: list[tuple[str, str]] = []
    for kind, forwarder, origin in log:
        if kind == "first" and forwarder != origin:
            for p in PEERS:
                if p not in (forwarder, origin):
                    streak[p] += 1
        if forwarder != origin:
            streak[forwarder] = 0
        for p in sorted(PEERS):
            if streak[p] >= misses:
                expected.append((TOPIC, p))
                streak[p] = 0
    assert found == expected
    assert sum(watch.verdicts(p) for p in PEERS) == len(found)


def test_a_mesh_peer_that_never_forwards_is_found_and_an_honest_one_is_not() -> None:
    watch = DeliveryWatch(misses=8)
    mesh = {"honest", "sybil", "slow"}
    for i in range(8):
        assert watch.droppers({TOPIC: mesh}) == []
        watch.accepted(TOPIC, "honest", f"w{i}", mesh)  # honest brings each one first
        if i % 3 == 0:
            watch.delivered(TOPIC, "slow", f"w{i}")  # slow forwards some, late
    assert watch.pending(TOPIC, "sybil") == 8
    assert watch.droppers({TOPIC: mesh}) == [(TOPIC, "sybil")]
    assert watch.verdicts("sybil") == 1
    assert watch.verdicts("honest") == watch.verdicts("slow") == 0
    assert watch.pending(TOPIC, "sybil") == 0  # it starts again from zero


def test_its_own_messages_do_not_pay_and_messages_straight_from_their_writer_do_not_count() -> None:
    watch = DeliveryWatch(misses=2)
    mesh = {"x", "sybil"}
    watch.accepted(TOPIC, "w", "w", mesh)  # straight from its writer: nobody owes it
    assert watch.pending(TOPIC, "sybil") == 0
    watch.accepted(TOPIC, "x", "w", mesh)
    watch.delivered(TOPIC, "sybil", "sybil")  # the sybil's own spam is no forwarding
    watch.accepted(TOPIC, "x", "w2", mesh)
    assert watch.droppers({TOPIC: mesh}) == [(TOPIC, "sybil")]


def test_a_peer_that_left_the_mesh_owes_nothing() -> None:
    watch = DeliveryWatch(misses=2)
    watch.accepted(TOPIC, "x", "w", {"x", "gone"})
    assert watch.droppers({TOPIC: {"x"}}) == []  # "gone" left: forgotten
    watch.accepted(TOPIC, "x", "w2", {"x", "gone"})
    assert watch.pending(TOPIC, "gone") == 1
    watch.left(TOPIC, "gone")
    assert watch.pending(TOPIC, "gone") == 0
    assert watch.statistics()["verdicts"] == 0


def test_misses_must_be_positive() -> None:
    with pytest.raises(ValueError, match="misses"):
        DeliveryWatch(misses=0)


def test_the_penalty_is_one_verdict_at_most_and_decays() -> None:
    watch = DeliveryWatch(misses=1)
    for _ in range(3):
        watch.accepted(TOPIC, "x", "w", {"x", "sybil"})
        assert watch.droppers({TOPIC: {"x", "sybil"}}) == [(TOPIC, "sybil")]
    assert watch.verdicts("sybil") == 3
    assert watch.penalty("sybil") == 1.0
    assert watch.penalty("x") == 0.0
    for _ in range(200):
        watch.decay(0.99)
    assert 0 < watch.penalty("sybil") < 0.5
    for _ in range(400):
        watch.decay(0.99)
    assert watch.penalty("sybil") == 0.0
    assert watch.verdicts("sybil") == 3  # the count stays


# one message under the ``late`` rule: (forwarder, age in s, tenure of each mesh peer in s,
# the honest mesh peers that had it before us and so forwarded it to us too)
late_messages = st.lists(
    st.tuples(
        st.sampled_from(PEERS[:3]),
        st.floats(0.0, 10.0),
        st.fixed_dictionaries({p: st.floats(0.0, 10.0) for p in PEERS}),
        st.sets(st.sampled_from(PEERS[:3])),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None)
@given(msgs=late_messages, misses=st.integers(1, 4), late=st.floats(0.5, 5.0))
def test_under_the_late_rule_only_late_messages_count_and_only_against_old_mesh_peers(
    msgs: list[tuple[str, float, dict[str, float], set[str]]], misses: int, late: float
) -> None:
    """Honest peers a, b, c forward what they had before us (any message, in time or not);
    d and e drop everything. The rule's premise: a message that reached us ``late`` had
    reached an honest peer in our mesh since before it was written earlier than us. Then a
    peer is counted only for late messages and only if it sat in our mesh since before the
    message was written, exactly ``misses`` in a row make a verdict, and no honest peer is
    ever found, whatever the race of in-time messages."""
    mesh = set(PEERS)
    watch = DeliveryWatch(misses=misses, late=late)
    owed = dict.fromkeys(PEERS, 0)  # late messages each peer failed to forward, in a row
    for forwarder, age, tenure, had in msgs:
        if age >= late:  # the premise: honest old mesh peers had it before us
            had = had | {p for p in PEERS[:3] if tenure[p] >= age}
        watch.accepted(TOPIC, forwarder, "w", mesh, age=age, tenure=tenure)
        for p in had:
            watch.delivered(TOPIC, p, "w")
        for p in PEERS:
            if p == forwarder or p in had:
                owed[p] = 0
            elif age >= late and tenure[p] >= age:
                owed[p] += 1
        found = {peer for _, peer in watch.droppers({TOPIC: mesh})}
        assert found == {p for p in PEERS if owed[p] >= misses}
        assert not found & set(PEERS[:3])
        for p in found:
            owed[p] = 0


def test_in_time_messages_never_count_and_droppers_are_found_on_late_ones() -> None:
    watch = DeliveryWatch(misses=2, late=2.0)
    for _ in range(10):  # in time: the sybil may simply have had it from us
        watch.accepted(TOPIC, "a", "w", {"a", "sybil", "newcomer"}, age=0.5, tenure={"sybil": 60.0})
    assert watch.droppers() == []
    for _ in range(2):  # late: the sybil sat in our mesh all along and forwarded nothing
        watch.accepted(
            TOPIC, "a", "w", {"a", "sybil", "newcomer"}, age=3.0, tenure={"sybil": 60.0, "newcomer": 1.0}
        )
    assert watch.droppers() == [(TOPIC, "sybil")]  # the newcomer joined after the adverts left
    with pytest.raises(ValueError, match="late"):
        DeliveryWatch(late=-1.0)
