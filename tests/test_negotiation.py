"""Deterministic scenarios of the negotiation cores (sans-IO, manual clock)."""

from __future__ import annotations

import itertools

from p2pcompute.tasks import negotiation as n
from p2pcompute.tasks.messages import Resources


def ids() -> n.IdFactory:
    counter = itertools.count(1)
    return lambda: next(counter).to_bytes(16, "big")


def provider(
    pid: str, new_id: n.IdFactory, *, capacity: int = 1, price: float = 0.0, per_requester: int | None = None
) -> n.ProviderCore:
    config = n.ProviderConfig(
        capacity=capacity, heartbeat=1.0, lease_ttl=4.0, max_leases_per_requester=per_requester
    )
    return n.ProviderCore(pid, {"k": n.KindTerms(Resources(cpus=1), price)}, config, new_id=new_id)


def only(actions: list[n.Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def test_happy_path_request_offer_accept_grant_result() -> None:
    new_id = ids()
    p = provider("p", new_id)
    r = n.RequesterCore("r", n.JobSpec("k", offer_window=0.5), new_id=new_id)
    (pub,) = r.start(0.0)
    assert isinstance(pub, n.Publish)
    (offer,) = only(p.handle_request(pub.request, 0.1), n.SendOffer)
    # one offer is enough for one item: the window closes early and the offer is accepted at once
    (accept,) = only(r.handle_offer(offer.offer, 0.1), n.SendAccept)
    assert r.handle_offer(offer.offer, 0.2) == []  # a duplicate offer changes nothing
    out = p.handle_accept("r", accept.lease_id, accept.offer.offer_id, 0.3)
    assert only(out, n.SendGrant)
    assert only(out, n.StartRun)
    assert p.free_slots() == 0
    (inputs,) = only(r.handle_grant("p", accept.lease_id, 0.4), n.SendInputs)
    assert inputs.item == 0
    (res,) = only(p.run_succeeded(accept.lease_id, 1.0), n.SendResult)
    assert p.free_slots() == 1
    (done,) = only(r.handle_result("p", res.lease_id, 1.1), n.ItemDone)
    assert done.provider == "p"
    assert r.done
    # late duplicates are ignored
    assert r.handle_result("p", res.lease_id, 1.2) == []
    assert p.handle_accept("r", accept.lease_id, accept.offer.offer_id, 1.3) == []


def _to_lease(r: n.RequesterCore, p: n.ProviderCore, now: float) -> n.SendAccept:
    (pub,) = r.start(now)
    (offer,) = only(p.handle_request(pub.request, now), n.SendOffer)
    out = r.handle_offer(offer.offer, now) + r.tick(now + 0.1)
    (accept,) = only(out, n.SendAccept)
    return accept


def test_offer_window_then_best_price_wins() -> None:
    new_id = ids()
    cheap, dear = provider("cheap", new_id, price=1.0), provider("dear", new_id, price=2.0)
    r = n.RequesterCore("r", n.JobSpec("k", offer_window=0.5, enough_offers=5), new_id=new_id)
    (pub,) = r.start(0.0)
    for p in (dear, cheap):
        (o,) = only(p.handle_request(pub.request, 0.1), n.SendOffer)
        assert r.handle_offer(o.offer, 0.1) == []  # window still open
    (accept,) = only(r.tick(0.6), n.SendAccept)
    assert accept.to == "cheap"


def test_over_max_price_and_unknown_kind_get_no_offer() -> None:
    new_id = ids()
    p = provider("p", new_id, price=5.0)
    r = n.RequesterCore("r", n.JobSpec("k", max_price=1.0), new_id=new_id)
    (pub,) = r.start(0.0)
    assert p.handle_request(pub.request, 0.0) == []
    r2 = n.RequesterCore("r", n.JobSpec("other"), new_id=new_id)
    (pub2,) = r2.start(0.0)
    assert p.handle_request(pub2.request, 0.0) == []


def test_provider_death_renegotiates_elsewhere() -> None:
    new_id = ids()
    a, b = provider("a", new_id), provider("b", new_id, price=1.0)
    r = n.RequesterCore(
        "r", n.JobSpec("k", offer_window=0.5, enough_offers=2, lease_ttl=4.0, retries=2), new_id=new_id
    )
    (pub,) = r.start(0.0)
    out: list[n.Action] = []
    for p in (a, b):
        (o,) = only(p.handle_request(pub.request, 0.1), n.SendOffer)
        out += r.handle_offer(o.offer, 0.1)
    (acc,) = only(out + r.tick(0.6), n.SendAccept)
    assert acc.to == "a"
    a.handle_accept("r", acc.lease_id, acc.offer.offer_id, 0.7)
    r.handle_grant("a", acc.lease_id, 0.8)
    # a dies: no heartbeat; after lease_ttl the requester cancels and moves to b
    out = r.tick(5.0)
    assert only(out, n.SendCancel)[0].to == "a"
    (acc2,) = only(out, n.SendAccept)
    assert acc2.to == "b"
    b.handle_accept("r", acc2.lease_id, acc2.offer.offer_id, 5.1)
    r.handle_grant("b", acc2.lease_id, 5.2)
    b.run_succeeded(acc2.lease_id, 6.0)
    (done,) = only(r.handle_result("b", acc2.lease_id, 6.1), n.ItemDone)
    assert done.provider == "b"
    assert r.done
    # a late result from a is ignored
    assert r.handle_result("a", acc.lease_id, 7.0) == []


def test_requester_death_frees_provider_at_expiry() -> None:
    new_id = ids()
    p = provider("p", new_id)
    r = n.RequesterCore("r", n.JobSpec("k"), new_id=new_id)
    acc = _to_lease(r, p, 0.0)
    p.handle_accept("r", acc.lease_id, acc.offer.offer_id, 1.0)
    assert p.free_slots() == 0
    assert only(p.tick(2.0), n.SendHeartbeat)
    (abort,) = only(p.tick(5.1), n.AbortRun)
    assert abort.lease_id == acc.lease_id
    assert not p.active_leases
    assert p.free_slots() == 0  # the run still holds the slot until it stops
    p.run_stopped(acc.lease_id)
    assert p.free_slots() == 1
    assert p.run_succeeded(acc.lease_id, 6.0) == []  # a late result after expiry goes nowhere


def test_capacity_rejects_extra_accepts() -> None:
    new_id = ids()
    p = provider("p", new_id, capacity=1)
    r = n.RequesterCore("r", n.JobSpec("k", items=2, parallel=2), new_id=new_id)
    (pub,) = r.start(0.0)
    (o,) = only(p.handle_request(pub.request, 0.0), n.SendOffer)
    assert o.offer.slots == 1
    assert only(p.handle_accept("r", b"\x01" * 16, o.offer.offer_id, 0.1), n.StartRun)
    (rej,) = only(p.handle_accept("r", b"\x02" * 16, o.offer.offer_id, 0.1), n.SendReject)
    assert rej.retryable
    assert len(p.running) == 1


def test_accept_by_a_stranger_is_rejected() -> None:
    new_id = ids()
    p = provider("p", new_id)
    r = n.RequesterCore("r", n.JobSpec("k"), new_id=new_id)
    (pub,) = r.start(0.0)
    (o,) = only(p.handle_request(pub.request, 0.0), n.SendOffer)
    assert only(p.handle_accept("mallory", b"\x01" * 16, o.offer.offer_id, 0.1), n.SendReject)
    assert not p.running


def test_non_retryable_error_fails_item_without_retry() -> None:
    new_id = ids()
    p = provider("p", new_id)
    r = n.RequesterCore("r", n.JobSpec("k"), new_id=new_id)
    acc = _to_lease(r, p, 0.0)
    p.handle_accept("r", acc.lease_id, acc.offer.offer_id, 1.0)
    r.handle_grant("p", acc.lease_id, 1.0)
    (err,) = only(p.run_failed(acc.lease_id, "bad params", False, 2.0), n.SendError)
    (failed,) = only(r.handle_error("p", acc.lease_id, err.reason, err.retryable, 2.1), n.ItemFailed)
    assert "bad params" in failed.reason
    assert r.done


def test_deadline_ends_job_with_no_providers() -> None:
    r = n.RequesterCore("r", n.JobSpec("k", deadline=10.0, rerequest_interval=0.5), new_id=ids())
    r.start(0.0)
    publishes = 0
    t = 0.0
    while not r.done:
        t += 0.25
        publishes += len(only(r.tick(t), n.Publish))
        assert t < 20
    assert 2 <= publishes <= 10  # renegotiation backs off
    assert r.items[0].status is n.ItemStatus.FAILED


def test_map_spreads_items_over_providers() -> None:
    new_id = ids()
    # every slot may go to this one requester (the default would leave one of two free)
    ps = {name: provider(name, new_id, capacity=2, per_requester=2) for name in ("a", "b", "c")}
    r = n.RequesterCore("r", n.JobSpec("k", items=6, parallel=6, offer_window=0.2), new_id=new_id)
    (pub,) = r.start(0.0)
    out: list[n.Action] = []
    for p in ps.values():
        for o in only(p.handle_request(pub.request, 0.0), n.SendOffer):
            out += r.handle_offer(o.offer, 0.0)
    accepts = only(out + r.tick(0.3), n.SendAccept)
    assert len(accepts) == 6
    assert {a.to for a in accepts} == {"a", "b", "c"}


def test_transient_failure_sets_a_provider_aside_only_for_a_while() -> None:
    new_id = ids()
    p = provider("p", new_id)
    r = n.RequesterCore("r", n.JobSpec("k", exclude_for=5.0, retries=3, deadline=60.0), new_id=new_id)
    acc = _to_lease(r, p, 0.0)
    out = r.lease_lost(acc.lease_id, "stream failed", 1.0)  # e.g. a flaky stream open
    assert only(out, n.CloseLease)
    assert not only(out, n.SendAccept)  # its offer is set aside for now
    t, accepts = 1.0, []
    while not accepts:
        t += 0.5
        for action in r.tick(t):
            if isinstance(action, n.Publish):
                for o in only(p.handle_request(action.request, t), n.SendOffer):
                    accepts += only(r.handle_offer(o.offer, t), n.SendAccept)
            elif isinstance(action, n.SendAccept):
                accepts.append(action)
        assert t < 30
    assert accepts[0].to == "p"
    assert t >= 6.0  # not before the exclusion ran out
