"""Sessions in the sans-IO cores: a provider keeps a session's offer open between leases,
a requester seeded with open sessions leases at once without a request round."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.tasks import negotiation as n
from p2pcompute.tasks.messages import Resources

LEASE_TTL = 4.0
VALID_FOR = 10.0


def ids() -> n.IdFactory:
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(16, "big")


def provider(new_id: n.IdFactory, *, capacity: int = 2, session_idle: float = 20.0) -> n.ProviderCore:
    config = n.ProviderConfig(
        capacity=capacity,
        heartbeat=1.0,
        lease_ttl=LEASE_TTL,
        offer_valid_for=VALID_FOR,
        max_leases_per_requester=capacity,
        session_idle=session_idle,
    )
    return n.ProviderCore("p", {"k": n.KindTerms(Resources(cpus=1), 1.0)}, config, new_id=new_id)


def only(actions: list[n.Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def first_offer(p: n.ProviderCore, new_id: n.IdFactory, count: int = 4) -> n.Offer:
    r = n.RequesterCore("r", n.JobSpec("k", items=count, parallel=count), new_id=new_id)
    (pub,) = r.start(0.0)
    (sent,) = only(p.handle_request(pub.request, 0.0), n.SendOffer)
    return sent.offer


@settings(max_examples=150, deadline=None)
@given(
    ask=st.sampled_from([0.0, 5.0, 50.0]),
    steps=st.lists(
        st.tuples(st.floats(0.0, 40.0), st.integers(1, 3), st.floats(0.0, 3.0), st.booleans()),
        min_size=1,
        max_size=12,
    ),
)
def test_a_session_offer_stays_open_for_the_idle_time_granted(
    ask: float, steps: list[tuple[float, int, float, bool]]
) -> None:
    """Batches of accepts on one offer, each after an idle gap: granted iff the offer is still
    open (its first validity, or, in a session, the grant's idle time after the last lease
    ended); the offer's slots and the per-requester cap hold for every batch."""
    new_id = ids()
    p = provider(new_id)
    offer = first_offer(p, new_id)
    granted = min(ask, p.config.session_idle)
    open_until = VALID_FOR + LEASE_TTL  # what the provider keeps of a plain offer
    now = 0.0
    for gap, batch, run_for, fail in steps:
        now += gap
        p.tick(now)
        leases = []
        for _ in range(batch):
            lid = new_id()
            out = p.handle_accept("r", lid, offer.offer_id, now, session=ask)
            grants = only(out, n.SendGrant)
            expect = now < open_until and len(leases) < min(offer.slots, p.config.per_requester)
            assert bool(grants) == expect, (now, open_until, len(leases))
            if grants:
                assert grants[0].session == granted
                leases.append(lid)
            assert len(p.active_leases) <= min(offer.slots, p.config.capacity)
        now += run_for
        for lid in leases:
            if fail:
                p.run_failed(lid, "boom", True, now)
            else:
                p.run_succeeded(lid, now)
        if leases and granted > 0:
            open_until = max(open_until, now + granted + LEASE_TTL)
    assert p.free_slots() == p.config.capacity


def test_either_side_may_end_a_session() -> None:
    new_id = ids()
    p = provider(new_id)
    offer = first_offer(p, new_id)
    lid = new_id()
    assert only(p.handle_accept("r", lid, offer.offer_id, 0.0, session=30.0), n.SendGrant)
    p.end_session("someone else", offer.offer_id)  # only its requester may end it
    assert p.statistics()["sessions_ended"] == 0
    p.end_session("r", offer.offer_id)  # ends while a lease still runs: that lease runs on
    assert p.statistics()["sessions_ended"] == 1
    assert only(p.run_succeeded(lid, 1.0), n.SendResult)
    (reject,) = only(p.handle_accept("r", new_id(), offer.offer_id, 1.5, session=30.0), n.SendReject)
    assert reject.retryable
    # session_idle=0: the provider grants no session, the offer lives its plain validity
    q = provider(new_id, session_idle=0.0)
    offer = first_offer(q, new_id)
    (grant,) = only(q.handle_accept("r", new_id(), offer.offer_id, 0.0, session=30.0), n.SendGrant)
    assert grant.session == 0.0


def session_offer(
    provider_id: str, offer_id: int, *, slots: int = 2, price: float = 1.0, kind: str = "k"
) -> n.Offer:
    return n.Offer(
        offer_id=offer_id.to_bytes(16, "big"),
        request_id=b"\xee" * 16,
        provider=provider_id,
        requester="r",
        kind=kind,
        price=price,
        expected_start=0.0,
        slots=slots,
        free=slots,
        capacity=slots,
        resources=Resources(cpus=4),
        valid_for=VALID_FOR,
        heartbeat=1.0,
        lease_ttl=LEASE_TTL,
    )


@settings(max_examples=200, deadline=None)
@given(
    items=st.integers(1, 20),
    parallel=st.integers(1, 8),
    sessions=st.lists(
        st.tuples(st.integers(1, 4), st.floats(0.5, 3.0), st.sampled_from(["k", "other"]), st.floats(-5, 10)),
        max_size=4,
    ),
)
def test_a_job_seeded_with_sessions_leases_at_once(
    items: int, parallel: int, sessions: list[tuple[int, float, str, float]]
) -> None:
    """Usable sessions (right kind, price within max_price, still open) get accepts at start,
    no request is published when their slots cover the job's parallelism, and a job whose
    sessions do not suffice (or fit) publishes a request as before."""
    spec = n.JobSpec("k", items=items, parallel=parallel, max_price=2.0, lease_ttl=10.0)
    r = n.RequesterCore("r", spec, new_id=ids())
    seeds = [
        (session_offer(f"p{i}", 100 + i, slots=slots, price=price, kind=kind), until)
        for i, (slots, price, kind, until) in enumerate(sessions)
    ]
    usable = sum(o.slots for o, until in seeds if o.kind == "k" and o.price <= 2.0 and until > 0)
    out = r.start(0.0, sessions=seeds)
    accepts = only(out, n.SendAccept)
    assert len(accepts) == min(usable, parallel, items)
    assert all(a.offer.kind == "k" and a.offer.price <= 2.0 for a in accepts)
    published = bool(only(out, n.Publish))
    assert published == (usable < min(parallel, items))
    per_offer = {a.offer.offer_id for a in accepts}
    for oid in per_offer:
        slots = next(o.slots for o, _ in seeds if o.offer_id == oid)
        assert sum(a.offer.offer_id == oid for a in accepts) <= slots


def test_a_job_whose_sessions_fail_falls_back_to_a_request() -> None:
    """The provider rejects the session's accept (it lapsed): the job publishes a request."""
    r = n.RequesterCore("r", n.JobSpec("k", items=1, parallel=1, lease_ttl=10.0), new_id=ids())
    (accept,) = only(r.start(0.0, sessions=[(session_offer("p", 7, slots=1), 5.0)]), n.SendAccept)
    assert r.stats["rounds"] == 0
    r.handle_reject("p", accept.lease_id, "unknown or expired offer", 0.01)
    out = r.tick(0.02)
    assert only(out, n.Publish)
    assert r.items[0].attempts == 0  # a refused session costs the item no attempt
