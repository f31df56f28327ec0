"""Tasks among strangers (issue #14): greedy, stalling and malformed requesters, and the bench.

Sans-IO parts run the provider core with explicit times; the rest runs real py-libp2p nodes
on 127.0.0.1 with a requester that speaks the lease protocol by hand (:class:`Rogue`), so it
can stall, hoard slots or send garbage.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
import trio
from conftest import TEST_CAPACITY

from p2pcompute.errors import ConfigError, PeerGone, TaskFailed
from p2pcompute.overlay import FramedStream, Node, open_node
from p2pcompute.tasks import negotiation as n
from p2pcompute.tasks.builtin import (
    BENCH_PRICE,
    MAX_BENCH_BYTES,
    MAX_BENCH_FLOPS,
    bench_flops,
    bench_memory,
    builtin_registry,
    matmul_bench,
)
from p2pcompute.tasks.driver import (
    LEASE_PROTOCOL,
    OFFER_PROTOCOL,
    TOPIC,
    ProviderFaults,
    TaskService,
    open_tasks,
    serve_tasks,
)
from p2pcompute.tasks.frames import EMPTY_DIGEST, LEASE_MAX_FRAME
from p2pcompute.tasks.messages import (
    ACCEPT,
    HEARTBEAT,
    RECEIPT_MSG,
    Offer,
    Resources,
    TaskRequest,
    open_offer,
    parse_lease_message,
    seal_request,
)
from p2pcompute.tasks.receipts import ReceiptBody
from p2pcompute.tasks.registry import TaskError, TaskRegistry, call_cancellable, check_params

NODE_OPTS: dict[str, Any] = {"capacity": TEST_CAPACITY}
_FROM_PROVIDER = frozenset({"task-grant", "task-reject", "task-heartbeat", "task-result", "task-error"})


# --------------------------------------------------------------------------- sans-IO


def _core(capacity: int = 2, **config: Any) -> n.ProviderCore:
    counter = iter(range(1, 10_000))
    return n.ProviderCore(
        "p",
        {"k": n.KindTerms(Resources(cpus=1), 0.0)},
        n.ProviderConfig(capacity=capacity, heartbeat=1.0, lease_ttl=4.0, **config),
        new_id=lambda: next(counter).to_bytes(16, "big"),
    )


def _request(requester: str, count: int = 1, rid: int = 1) -> TaskRequest:
    return TaskRequest(rid.to_bytes(16, "big"), requester, "k", Resources(), 1.0, count, 60.0, 0, 0.0)


def _offer(core: n.ProviderCore, requester: str, count: int = 1, rid: int = 1) -> Offer | None:
    offers = [
        a.offer
        for a in core.handle_request(_request(requester, count, rid), 0.0)
        if isinstance(a, n.SendOffer)
    ]
    return offers[0] if offers else None


def test_heartbeats_do_not_keep_a_lease_waiting_for_inputs_alive() -> None:
    core = _core(capacity=1, input_deadline=5.0, input_rate=1000.0)
    offer = _offer(core, "r")
    assert offer is not None
    lid = b"L" * 16
    out = core.handle_accept("r", lid, offer.offer_id, 0.0, inputs=2000)  # due at 5 + 2000/1000 = 7 s
    assert any(isinstance(a, n.SendGrant) for a in out)
    t = 0.0
    ended: list[n.Action] = []
    while not ended:
        t += 0.5
        core.handle_heartbeat("r", lid, t)  # the requester heartbeats, but never sends its inputs
        ended = [a for a in core.tick(t) if isinstance(a, n.SendError | n.AbortRun)]
        assert t < 60, "the lease waits for its inputs forever"
    assert t == 7.0
    error = next(a for a in ended if isinstance(a, n.SendError))
    assert error.retryable
    assert "inputs not received" in error.reason
    assert core.outcome(lid) is n.Outcome.EXPIRED
    assert core.statistics()["input_timeouts"] == 1
    core.run_stopped(lid)
    assert core.free_slots() == 1


def test_inputs_that_arrived_lift_the_input_deadline() -> None:
    core = _core(capacity=1, input_deadline=1.0)
    offer = _offer(core, "r")
    assert offer is not None
    lid = b"L" * 16
    core.handle_accept("r", lid, offer.offer_id, 0.0, inputs=10)
    core.inputs_received(lid)
    for t in (0.5, 1.0, 1.5, 2.0, 3.0):
        core.handle_heartbeat("r", lid, t)
        assert not [a for a in core.tick(t) if isinstance(a, n.AbortRun)]
    assert core.active_leases == {lid}
    # an accept declaring more inputs than the provider takes is refused outright
    other = _offer(core, "s", rid=2)
    assert other is None  # no free slot now; a fresh core shows the refusal
    fresh = _core(capacity=1, max_input_bytes=100)
    offer2 = _offer(fresh, "r")
    assert offer2 is not None
    (reject,) = fresh.handle_accept("r", b"M" * 16, offer2.offer_id, 0.0, inputs=101)
    assert isinstance(reject, n.SendReject)
    assert not reject.retryable


def test_one_requester_cannot_hold_every_slot() -> None:
    core = _core(capacity=4)
    assert core.config.per_requester == 2  # half the slots, rounded up
    first = _offer(core, "greedy", count=4, rid=1)
    second = _offer(core, "greedy", count=4, rid=2)
    assert first is not None
    assert second is not None
    assert first.slots == 2  # never more than its share, however many it asks for
    grants = 0
    refusals: list[n.SendReject] = []
    for i, offer in enumerate([first, first, second, second]):
        out = core.handle_accept("greedy", bytes([i + 1]) * 16, offer.offer_id, 0.0)
        grants += sum(isinstance(a, n.SendGrant) for a in out)
        refusals += [a for a in out if isinstance(a, n.SendReject)]
    assert grants == 2
    busy = [r for r in refusals if r.reason.startswith("busy")]
    assert busy
    assert all(r.retryable for r in busy)
    assert _offer(core, "greedy", rid=3) is None  # at its share: no more offers
    honest = _offer(core, "honest", rid=4)
    assert honest is not None
    out = core.handle_accept("honest", b"H" * 16, honest.offer_id, 0.0)
    assert any(isinstance(a, n.SendGrant) for a in out)
    assert core.statistics()["busy_refusals"] >= 2


def test_a_single_slot_is_still_served_and_the_cap_is_configurable() -> None:
    assert n.ProviderConfig(capacity=1).per_requester == 1
    assert n.ProviderConfig(capacity=3).per_requester == 2
    assert n.ProviderConfig(capacity=8, max_leases_per_requester=8).per_requester == 8
    with pytest.raises(ConfigError):
        n.ProviderConfig(max_leases_per_requester=0)


def test_a_lingering_run_frees_its_slot_within_budget() -> None:
    core = _core(capacity=1, max_lingering_bytes=1000)

    def lease_then_abandon(i: int) -> bytes:
        offer = _offer(core, f"r{i}", rid=i)
        assert offer is not None
        lid = bytes([i]) * 16
        assert any(isinstance(a, n.SendGrant) for a in core.handle_accept(f"r{i}", lid, offer.offer_id, 0.0))
        core.handle_cancel(f"r{i}", lid, "bye", 0.1)
        core.run_abandoned(lid, 400)  # its worker thread still finishes a chunk
        return lid

    first = lease_then_abandon(1)
    assert core.free_slots() == 1
    assert core.statistics()["lingering_bytes"] == 400
    second = lease_then_abandon(2)
    assert core.free_slots() == 0  # two lingering runs on one slot: over budget, one keeps its slot
    core.run_stopped(first)
    assert core.free_slots() == 1  # the other is within budget again
    core.run_stopped(second)
    assert core.statistics()["lingering"] == 0
    assert core.free_slots() == 1


def test_a_request_flood_cannot_crowd_others_out_of_the_offer_table() -> None:
    core = _core(capacity=2, max_offers=20, max_offers_per_requester=8)
    flood = [_offer(core, "flooder", rid=i) for i in range(1, 101)]
    assert all(o is not None for o in flood)  # it keeps getting offers: its newest replace its oldest
    assert sum(r.offer.requester == "flooder" for r in core._offers.values()) == 8
    assert core.statistics()["offers_replaced"] == 92
    honest = _offer(core, "honest", rid=1000)
    assert honest is not None
    out = core.handle_accept("honest", b"H" * 16, honest.offer_id, 0.0)
    assert any(isinstance(a, n.SendGrant) for a in out)
    # a replaced offer is gone: accepting it is an honest refusal, not a grant
    assert flood[0] is not None
    (reject,) = core.handle_accept("flooder", b"F" * 16, flood[0].offer_id, 0.0)
    assert isinstance(reject, n.SendReject)


def test_a_provider_that_heartbeats_but_never_answers_is_set_aside() -> None:
    counter = iter(range(1, 10_000))
    new_id = lambda: next(counter).to_bytes(16, "big")  # noqa: E731
    spec = n.JobSpec("k", offer_window=0.0, result_timeout=20.0, deadline=300.0, retries=1)
    r = n.RequesterCore("r", spec, new_id=new_id)
    p = n.ProviderCore("p", {"k": n.KindTerms()}, n.ProviderConfig(lease_ttl=4.0), new_id=new_id)
    (pub,) = r.start(0.0)
    (offer,) = p.handle_request(pub.request, 0.0)
    assert isinstance(offer, n.SendOffer)
    (accept,) = [a for a in r.handle_offer(offer.offer, 0.0) + r.tick(0.0) if isinstance(a, n.SendAccept)]
    r.handle_grant("p", accept.lease_id, 1.0)
    t, lost = 1.0, []
    while not lost:
        t += 1.0
        r.handle_heartbeat("p", accept.lease_id, t)  # alive, but the result never comes
        lost = [a for a in r.tick(t) if isinstance(a, n.CloseLease)]
        assert t < 100, "the lease waits for its result until the job's deadline"
    assert t == 21.0
    assert "no result within 20 s" in lost[0].reason
    assert r.statistics()["excluded"] == 1


# --------------------------------------------------------------------------- matmul-bench


def test_matmul_bench_work_and_memory_are_bounded_and_priced() -> None:
    kind = builtin_registry().get("matmul-bench")
    assert kind.price == BENCH_PRICE > 0
    for params in ({"n": 8192, "repeats": 1}, {"n": 4096, "repeats": 1000}, {"n": 16384}):
        with pytest.raises(TaskError):
            matmul_bench({}, params)
    assert bench_flops(4096, 15) == MAX_BENCH_FLOPS
    assert bench_memory(4096, "bfloat16") <= MAX_BENCH_BYTES
    assert kind.run_memory({"n": 1024}, 0) == bench_memory(1024, "float32")


def test_a_cancelled_bench_stops_at_its_next_chunk() -> None:
    flag = threading.Event()
    flag.set()
    t0 = time.perf_counter()
    with pytest.raises(TaskError, match="cancelled"):
        call_cancellable(flag, matmul_bench, {}, {"n": 2048, "repeats": 100, "device": "cpu"})
    assert time.perf_counter() - t0 < 5
    # without a cancel the bench runs as before (outside a run there is no flag at all)
    out, info = matmul_bench({}, {"n": 64, "repeats": 2, "device": "cpu"})
    assert out["check"].shape == (8,)
    assert info["n"] == 64


# --------------------------------------------------------------------------- real nodes


def _echo_registry() -> TaskRegistry:
    reg = TaskRegistry()

    @reg.task("k")
    def plus_one(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"y": tensors["x"] + 1}

    return reg


async def _until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``condition`` (nothing signals these counters) until true, failing after ``timeout``."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


class Rogue:
    """A requester speaking the task protocols by hand: it can hoard, stall and send garbage."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.offers: dict[bytes, Offer] = {}
        self._offer_seen = trio.Event()
        node.set_stream_handler(OFFER_PROTOCOL, self._on_offer, max_frame=8192)

    async def _on_offer(self, stream: FramedStream) -> None:
        offer = open_offer(
            await stream.recv_frame(8192), peer=stream.peer, expected_requester=self.node.peer_id
        )
        self.offers[offer.request_id] = offer
        self._offer_seen.set()
        self._offer_seen = trio.Event()

    async def offer(self, kind: str, *, count: int = 1, input_bytes: int = 0) -> Offer:
        """Publish requests (gossip may drop the first) until one is answered."""
        with trio.fail_after(30):
            while True:
                rid = os.urandom(16)
                req = TaskRequest(
                    rid,
                    self.node.peer_id,
                    kind,
                    Resources(cpus=0.0),
                    1e18,
                    count,
                    60.0,
                    input_bytes,
                    time.time(),
                )
                await self.node.publish(TOPIC, seal_request(req, self.node.identity))
                with trio.move_on_after(0.5):
                    while rid not in self.offers:
                        await self._offer_seen.wait()
                if rid in self.offers:
                    return self.offers[rid]

    async def accept(
        self, offer: Offer, *, inputs: int = 1024, params: dict[str, Any] | None = None
    ) -> tuple[bytes, FramedStream]:
        lid = os.urandom(16)
        stream = await self.node.open_stream(
            offer.provider, LEASE_PROTOCOL, timeout=10, max_frame=LEASE_MAX_FRAME
        )
        await stream.send_frame(
            ACCEPT.build(
                lease_id=lid,
                offer_id=offer.offer_id,
                request_id=offer.request_id,
                params=check_params(params or {}),
                input_bytes=inputs,
                input_digest=b"\x01" * 32 if inputs else EMPTY_DIGEST,
                lane=False,
                session=0.0,
                inputs=b"",
            )
        )
        return lid, stream

    async def next_message(
        self, stream: FramedStream, skip: tuple[str, ...] = ("task-heartbeat",)
    ) -> dict[str, Any]:
        while True:
            m = parse_lease_message(await stream.recv_frame(), peer=stream.peer, allowed=_FROM_PROVIDER)
            if m["t"] not in skip:
                return m

    @staticmethod
    async def heartbeat(stream: FramedStream, lid: bytes) -> None:
        seq = 0
        with contextlib.suppress(PeerGone):
            while True:
                seq += 1
                await stream.send_frame(HEARTBEAT.build(lease_id=lid, seq=seq))
                await trio.sleep(0.3)


@contextlib.asynccontextmanager
async def _market(
    registry: TaskRegistry | None = None, **options: Any
) -> AsyncIterator[tuple[Node, TaskService, Rogue, Node]]:
    """A bootstrap node, a provider serving ``registry`` with ``options``, a rogue and an honest node."""
    async with (
        open_node(role="bootstrap", **NODE_OPTS) as boot,
        open_node(bootstrap=boot.addrs, **NODE_OPTS) as pnode,
        serve_tasks(pnode, registry, **options) as psvc,
        open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode,
        open_node(bootstrap=boot.addrs, **NODE_OPTS) as hnode,
    ):
        rogue = Rogue(rnode)
        await _until(lambda: pnode.peer_id in rnode.topic_peers(TOPIC), "provider in the rogue's view", 30)
        yield pnode, psvc, rogue, hnode


async def test_a_stalled_lease_is_ended_by_the_input_deadline() -> None:
    with trio.fail_after(90):
        async with _market(_echo_registry(), capacity=1, input_deadline=1.0) as (_p, psvc, rogue, _h):
            offer = await rogue.offer("k", input_bytes=1024)
            lid, stream = await rogue.accept(offer, inputs=1024)
            assert (await rogue.next_message(stream))["t"] == "task-grant"
            assert psvc.provider is not None
            assert psvc.provider.free_slots() == 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rogue.heartbeat, stream, lid)  # alive, but the inputs never come
                with trio.fail_after(15):
                    error = await rogue.next_message(stream)
                nursery.cancel_scope.cancel()
            assert error["t"] == "task-error"
            assert error["retryable"]
            assert "inputs not received" in error["reason"]
            await _until(
                lambda: psvc.provider is not None and psvc.provider.free_slots() == 1, "slot free", 10
            )
            await stream.close()


async def test_a_hoarding_requester_is_refused_and_an_honest_one_served() -> None:
    with trio.fail_after(120):
        async with _market(_echo_registry(), capacity=2, input_deadline=60.0) as (pnode, psvc, rogue, hnode):
            first = await rogue.offer("k", count=2, input_bytes=1024)
            second = await rogue.offer("k", count=2, input_bytes=1024)
            assert first.slots == 1  # its share of two slots
            lid1, s1 = await rogue.accept(first)
            assert (await rogue.next_message(s1))["t"] == "task-grant"
            _lid2, s2 = await rogue.accept(second)
            refusal = await rogue.next_message(s2)
            assert refusal["t"] == "task-reject"
            assert refusal["retryable"]
            assert refusal["reason"].startswith("busy")
            async with trio.open_nursery() as nursery, open_tasks(hnode) as honest:
                nursery.start_soon(rogue.heartbeat, s1, lid1)  # the rogue keeps its one lease stalled
                await honest.wait_for_providers(1, timeout=30)
                x = torch.arange(4.0)
                try:
                    result = await honest.run_task("k", {"x": x}, {}, deadline=20)
                except TaskFailed as exc:  # pragma: no cover - the failure this test guards against
                    raise AssertionError(f"the honest requester got no slot: {exc}") from None
                assert result.provider == pnode.peer_id
                assert torch.equal(result.outputs["y"], x + 1)
                nursery.cancel_scope.cancel()
            assert psvc.provider is not None
            assert psvc.provider.statistics()["busy_refusals"] >= 1
            await s1.close()
            await s2.close()


async def test_a_cancelled_bench_frees_its_slot_at_once() -> None:
    with trio.fail_after(120):
        async with _market(capacity=1) as (pnode, psvc, _rogue, hnode), open_tasks(hnode) as tasks:
            await tasks.wait_for_providers(1, timeout=30)
            core = psvc.provider
            assert core is not None
            heavy = {"n": 2048, "repeats": 100, "device": "cpu", "seed": 1}  # tens of seconds on a CPU
            with trio.CancelScope() as buyer:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tasks.run_task, "matmul-bench", {}, heavy)
                    await _until(lambda: bool(core.running), "the bench running", 30)
                    buyer.cancel()  # the requester gives up: its lease stream closes
            await _until(lambda: core.free_slots() == 1, "the slot free again", 5)
            # the worker thread stops at its next chunk; until then it is accounted as lingering
            await _until(lambda: core.statistics()["lingering"] == 0, "the thread stopped", 20)
            small = await tasks.run_task("matmul-bench", {}, {"n": 64, "seed": 2}, deadline=30)
            assert small.provider == pnode.peer_id


async def test_offences_on_lease_streams_reach_the_node_and_are_counted() -> None:
    with trio.fail_after(90):
        async with _market(_echo_registry(), capacity=2) as (pnode, psvc, rogue, _h):
            errors = pnode.statistics()["handler_errors"]
            # garbage on a granted lease: counted as a bad request, raised to the node's handler
            offer = await rogue.offer("k", input_bytes=1024)
            lid, stream = await rogue.accept(offer)
            assert (await rogue.next_message(stream))["t"] == "task-grant"
            await stream.send_frame(b"\xc1 not msgpack")
            await psvc.wait_for_stat("bad_requests", 1, timeout=10)
            await _until(lambda: pnode.statistics()["handler_errors"] == errors + 1, "handler saw it", 10)
            await stream.close()
            # a bad receipt after a good result: counted and raised too
            bench = await rogue.offer("matmul-bench")
            lid, stream = await rogue.accept(bench, inputs=0, params={"n": 8})
            assert (await rogue.next_message(stream))["t"] == "task-grant"
            assert (await rogue.next_message(stream))["t"] == "task-result"
            await stream.send_frame(RECEIPT_MSG.build(lease_id=lid, receipt=b"not a receipt"))
            await psvc.wait_for_stat("bad_receipts", 1, timeout=10)
            await _until(lambda: pnode.statistics()["handler_errors"] == errors + 2, "handler saw it", 10)
            await stream.close()


async def test_a_bad_gossiped_request_is_blamed_on_its_sender() -> None:
    with trio.fail_after(60):
        async with _market(_echo_registry()) as (_p, psvc, rogue, _h):
            with trio.move_on_after(30):
                while psvc.stats["bad_requests"] == 0:
                    await rogue.node.publish(TOPIC, b"\x93not a signed request")
                    with trio.move_on_after(0.5):
                        await psvc.wait_for_stat("bad_requests", 1, timeout=1)
            assert psvc.stats["bad_requests"] >= 1
            assert psvc.stats["blamed"] == psvc.stats["bad_requests"]


async def test_a_lying_provider_is_blamed_by_the_requester() -> None:
    def inflate(body: ReceiptBody) -> bytes:
        return replace(body, price=body.price + 100.0).encode()

    with trio.fail_after(90):
        async with (
            open_node(role="bootstrap", **NODE_OPTS) as boot,
            open_node(bootstrap=boot.addrs, **NODE_OPTS) as pnode,
            serve_tasks(pnode, faults=ProviderFaults(receipt_body=inflate)),
            open_node(bootstrap=boot.addrs, **NODE_OPTS) as rnode,
            open_tasks(rnode) as tasks,
        ):
            await tasks.wait_for_providers(1, timeout=30)
            with pytest.raises(TaskFailed):
                await tasks.run_task(
                    "matmul", {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, retries=0, deadline=30
                )
            assert tasks.stats["bad_receipts"] == 1
            assert tasks.stats["blamed"] == 1  # the stream was ours: no handler of ours saw it


async def test_a_peer_cannot_park_unlimited_lease_streams() -> None:
    with trio.fail_after(90):
        async with _market(_echo_registry(), capacity=1, accept_deadline=60.0) as (pnode, psvc, rogue, _h):
            assert psvc.provider is not None
            limit = psvc.provider.config.streams_per_requester  # 8 for one slot
            parked = []
            for _ in range(limit + 2):
                parked.append(await rogue.node.open_stream(pnode.peer_id, LEASE_PROTOCOL, timeout=10))
            closed: list[FramedStream] = []

            async def watch_closed(stream: FramedStream) -> None:
                with trio.move_on_after(5):
                    try:
                        await stream.recv_frame()
                    except PeerGone:
                        closed.append(stream)  # closed by the provider at once, not after 60 s

            async with trio.open_nursery() as nursery:
                for stream in parked:
                    nursery.start_soon(watch_closed, stream)
            assert len(closed) == 2
            assert psvc.provider.statistics()["busy_refusals"] == 2
            for stream in parked:
                await stream.close()
