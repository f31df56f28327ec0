"""The lease life cycles as data: the transition tables of both negotiation cores."""

from __future__ import annotations

from p2pcompute.tasks import negotiation as n

A, G = n.LeaseState.ACCEPTING, n.LeaseState.ACTIVE
E = n.LeaseEvent


def test_requester_table_matches_the_documented_life() -> None:
    table = n.REQUESTER_LEASE
    assert table[(A, E.GRANT)] is G
    assert (G, E.GRANT) not in table  # a duplicate grant is ignored
    assert (A, E.HEARTBEAT) not in table  # no heartbeat before the grant
    assert (G, E.REJECT) not in table  # a reject after the grant is ignored
    for state in (A, G):  # these end a lease in any state
        assert table[(state, E.RESULT)] is n.Outcome.DONE
        assert table[(state, E.ERROR)] is n.Outcome.FAILED
        assert table[(state, E.LOST)] is n.Outcome.LOST
        assert table[(state, E.CANCEL)] is n.Outcome.CANCELLED
    # every target is a live state or an outcome
    assert all(isinstance(t, n.LeaseState | n.Outcome) for t in table.values())


def test_provider_table_ends_a_live_lease_once() -> None:
    assert set(n.PROVIDER_LEASE) == set(n.ProviderEvent)
    assert len(set(n.PROVIDER_LEASE.values())) == len(n.ProviderEvent)


def test_an_event_the_table_does_not_list_is_ignored_and_counted() -> None:
    counter = iter(range(1, 1000))
    new_id = lambda: next(counter).to_bytes(16, "big")  # noqa: E731
    p = n.ProviderCore("p", {"k": n.KindTerms()}, new_id=new_id)
    r = n.RequesterCore("r", n.JobSpec("k", offer_window=0.0), new_id=new_id)
    (pub,) = r.start(0.0)
    (offer,) = p.handle_request(pub.request, 0.0)
    assert isinstance(offer, n.SendOffer)
    (accept,) = [a for a in r.handle_offer(offer.offer, 0.0) + r.tick(0.1) if isinstance(a, n.SendAccept)]
    before = r.stats["ignored"]
    assert r.handle_heartbeat("p", accept.lease_id, 0.2) == []  # ACCEPTING: not in the table
    assert r.stats["ignored"] == before + 1
    assert [type(a) for a in r.handle_grant("p", accept.lease_id, 0.3)] == [n.SendInputs]
    assert r.handle_grant("p", accept.lease_id, 0.4) == []  # ACTIVE + GRANT: not in the table
    assert r.handle_reject("p", accept.lease_id, "late", 0.5) == []
    assert r.stats["ignored"] == before + 3
