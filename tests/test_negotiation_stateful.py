"""Hypothesis stateful tests of the negotiation cores on a simulated network and a manual clock.

One requester job and 1-3 providers exchange messages through an in-memory
network that drops, duplicates and reorders them; the clock jumps; providers
die; runs finish, fail or are slow to stop after an abort. After every step:
no provider over capacity, no lease run twice, no item delivered twice. At the
end, with faults stopped and time run forward: every lease and the job have ended.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from p2pcompute.tasks import negotiation as n
from p2pcompute.tasks.messages import Resources

R = "requester"


@dataclass
class Msg:
    src: str
    dst: str
    kind: str
    args: tuple[Any, ...]


class NegotiationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.net: list[Msg] = []
        self.dead: set[str] = set()
        self.runs: list[tuple[str, bytes]] = []  # runs in progress (provider, lease)
        self.aborting: list[tuple[str, bytes]] = []  # aborted, not yet stopped
        self.lingering: list[tuple[str, bytes]] = []  # aborted, slot handed back, thread still running
        self.started: Counter[bytes] = Counter()
        self.delivered: Counter[int] = Counter()
        self.failed: set[int] = set()
        counter = itertools.count()
        self.new_id = lambda: next(counter).to_bytes(16, "big")
        self.providers: dict[str, n.ProviderCore] = {}

    @initialize(
        n_providers=st.integers(1, 3),
        capacity=st.integers(1, 2),
        items=st.integers(1, 4),
        parallel=st.integers(1, 3),
        retries=st.integers(0, 3),
    )
    def setup(self, n_providers: int, capacity: int, items: int, parallel: int, retries: int) -> None:
        for i in range(n_providers):
            pid = f"p{i}"
            self.providers[pid] = n.ProviderCore(
                pid,
                {"k": n.KindTerms(Resources(cpus=1), price=float(i))},
                n.ProviderConfig(
                    capacity=capacity, heartbeat=1.0, lease_ttl=4.0, offer_valid_for=5.0, input_deadline=3.0
                ),
                new_id=self.new_id,
            )
        spec = n.JobSpec(
            "k",
            items=items,
            parallel=parallel,
            retries=retries,
            deadline=120.0,
            offer_window=0.5,
            accept_timeout=3.0,
            lease_ttl=4.0,
            rerequest_interval=0.5,
            result_timeout=10.0,
        )
        self.requester = n.RequesterCore(R, spec, new_id=self.new_id)
        self.items = items
        self._requester_out(self.requester.start(self.now))

    # -- plumbing

    def _send(self, src: str, dst: str, kind: str, *args: Any) -> None:
        self.net.append(Msg(src, dst, kind, args))

    def _requester_out(self, actions: list[n.Action]) -> None:
        for a in actions:
            if isinstance(a, n.Publish):
                for pid in self.providers:
                    self._send(R, pid, "request", a.request)
            elif isinstance(a, n.SendAccept):
                self._send(R, a.to, "accept", a.lease_id, a.offer.offer_id)
            elif isinstance(a, n.SendHeartbeat):
                self._send(R, a.to, "hb", a.lease_id)
            elif isinstance(a, n.SendCancel):
                self._send(R, a.to, "cancel", a.lease_id, a.reason)
            elif isinstance(a, n.SendInputs):
                self._send(R, a.to, "inputs", a.lease_id)
            elif isinstance(a, n.ItemDone):
                self.delivered[a.item] += 1
                assert a.item not in self.failed
            elif isinstance(a, n.ItemFailed):
                assert self.delivered[a.item] == 0, "an item both delivered and failed"
                assert a.item not in self.failed, "an item failed twice"
                self.failed.add(a.item)
            elif isinstance(a, n.CloseLease):
                pass
            else:  # pragma: no cover - a requester never emits provider actions
                raise AssertionError(f"unexpected requester action {a}")

    def _provider_out(self, pid: str, actions: list[n.Action]) -> None:
        for a in actions:
            if isinstance(a, n.SendOffer):
                self._send(pid, R, "offer", a.offer)
            elif isinstance(a, n.SendGrant):
                self._send(pid, R, "grant", a.lease_id)
            elif isinstance(a, n.SendReject):
                self._send(pid, R, "reject", a.lease_id, a.reason)
            elif isinstance(a, n.SendHeartbeat):
                self._send(pid, R, "hb", a.lease_id)
            elif isinstance(a, n.SendResult):
                self._send(pid, R, "result", a.lease_id)
            elif isinstance(a, n.SendError):
                self._send(pid, R, "error", a.lease_id, a.reason, a.retryable)
            elif isinstance(a, n.StartRun):
                self.started[a.lease_id] += 1
                assert self.started[a.lease_id] == 1, "a lease was run twice"
                self.runs.append((pid, a.lease_id))
            elif isinstance(a, n.AbortRun):
                if (pid, a.lease_id) in self.runs:
                    self.runs.remove((pid, a.lease_id))
                    self.aborting.append((pid, a.lease_id))
            else:  # pragma: no cover
                raise AssertionError(f"unexpected provider action {a}")

    def _deliver(self, m: Msg) -> None:
        now = self.now
        if m.dst == R:
            if R in self.dead:
                return
            core = self.requester
            if m.kind == "offer":
                out = core.handle_offer(m.args[0], now)
            elif m.kind == "grant":
                out = core.handle_grant(m.src, m.args[0], now)
            elif m.kind == "reject":
                out = core.handle_reject(m.src, m.args[0], m.args[1], now)
            elif m.kind == "hb":
                out = core.handle_heartbeat(m.src, m.args[0], now)
            elif m.kind == "result":
                out = core.handle_result(m.src, m.args[0], now)
            elif m.kind == "error":
                out = core.handle_error(m.src, m.args[0], m.args[1], m.args[2], now)
            else:  # pragma: no cover
                raise AssertionError(m.kind)
            self._requester_out(out)
            return
        if m.dst in self.dead:
            return
        p = self.providers[m.dst]
        if m.kind == "request":
            out = p.handle_request(m.args[0], now)
        elif m.kind == "accept":
            out = p.handle_accept(m.src, m.args[0], m.args[1], now, inputs=64)
        elif m.kind == "inputs":
            if p.lease_requester(m.args[0]) == m.src:
                p.inputs_received(m.args[0])
            out = p.handle_heartbeat(m.src, m.args[0], now)
        elif m.kind == "hb":
            out = p.handle_heartbeat(m.src, m.args[0], now)
        elif m.kind == "cancel":
            out = p.handle_cancel(m.src, m.args[0], m.args[1], now)
        else:  # pragma: no cover
            raise AssertionError(m.kind)
        self._provider_out(m.dst, out)

    def _tick(self) -> None:
        for pid, p in self.providers.items():
            if pid not in self.dead:
                self._provider_out(pid, p.tick(self.now))
        if R not in self.dead:
            self._requester_out(self.requester.tick(self.now))

    # -- rules: the network

    @precondition(lambda self: self.net)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        m = self.net.pop(data.draw(st.integers(0, len(self.net) - 1)))
        self._deliver(m)

    @precondition(lambda self: self.net)
    @rule(k=st.integers(1, 8))
    def deliver_in_order(self, k: int) -> None:
        for _ in range(min(k, len(self.net))):
            self._deliver(self.net.pop(0))

    @precondition(lambda self: self.net)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self._deliver(self.net[data.draw(st.integers(0, len(self.net) - 1))])

    @precondition(lambda self: self.net)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.net.pop(data.draw(st.integers(0, len(self.net) - 1)))

    # -- rules: time

    @rule(dt=st.one_of(st.floats(0.0, 1.5), st.floats(0.0, 1.5), st.floats(0.0, 1.5), st.floats(0.0, 30.0)))
    def advance(self, dt: float) -> None:
        self.now += dt
        self._tick()

    # -- rules: runs and providers

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), ok=st.booleans(), retryable=st.booleans())
    def finish_run(self, data: st.DataObject, ok: bool, retryable: bool) -> None:
        pid, lease = self.runs.pop(data.draw(st.integers(0, len(self.runs) - 1)))
        if pid in self.dead:
            return
        p = self.providers[pid]
        out = p.run_succeeded(lease, self.now) if ok else p.run_failed(lease, "boom", retryable, self.now)
        self._provider_out(pid, out)

    @precondition(lambda self: self.aborting)
    @rule(data=st.data())
    def stop_aborted(self, data: st.DataObject) -> None:
        pid, lease = self.aborting.pop(data.draw(st.integers(0, len(self.aborting) - 1)))
        self.providers[pid].run_stopped(lease)

    @precondition(lambda self: self.aborting)
    @rule(data=st.data())
    def abandon_aborted(self, data: st.DataObject) -> None:
        """An aborted run's worker thread is still finishing a chunk: its slot is handed back."""
        pid, lease = self.aborting.pop(data.draw(st.integers(0, len(self.aborting) - 1)))
        self.providers[pid].run_abandoned(lease, 100)
        self.lingering.append((pid, lease))

    @precondition(lambda self: self.lingering)
    @rule(data=st.data())
    def stop_lingering(self, data: st.DataObject) -> None:
        pid, lease = self.lingering.pop(data.draw(st.integers(0, len(self.lingering) - 1)))
        self.providers[pid].run_stopped(lease)

    @rule(data=st.data(), chance=st.integers(0, 3))
    def kill_provider(self, data: st.DataObject, chance: int) -> None:
        if chance == 0:  # rarer than other faults, so that work also gets done
            self.dead.add(data.draw(st.sampled_from(sorted(self.providers))))

    @rule(chance=st.integers(0, 7))
    def kill_requester(self, chance: int) -> None:
        if chance == 0:
            self.dead.add(R)

    # -- invariants

    @invariant()
    def provider_never_over_capacity(self) -> None:
        for p in self.providers.values():
            assert len(p.running) <= p.config.capacity
            assert p.free_slots() >= 0
            # lingering threads beyond the budget keep their slots: never over twice the capacity
            assert len(p.running) + len(p.lingering) <= 2 * p.config.capacity

    @invariant()
    def nothing_twice(self) -> None:
        assert all(c == 1 for c in self.started.values())
        assert all(c <= 1 for c in self.delivered.values())
        assert len(self.requester.active_leases) <= self.requester.spec.parallel

    # -- the end: stop the faults, let time run; everything must end

    def teardown(self) -> None:
        """Stop the faults; runs now hang until aborted. Everything must still end."""
        if not self.providers:
            return
        requester_alive = R not in self.dead
        for _ in range(600):
            while self.net:
                self._deliver(self.net.pop(0))
            for pid, lease in list(self.aborting) + list(self.lingering):
                self.providers[pid].run_stopped(lease)
            self.aborting.clear()
            self.lingering.clear()
            live = [p for pid, p in self.providers.items() if pid not in self.dead]
            if (
                (self.requester.done or not requester_alive)
                and not self.net
                and not any(p.active_leases or p.running for p in live)
            ):
                break
            self.now += 0.5
            self._tick()
        if requester_alive:
            assert self.requester.done, "the job never ended"
            assert not self.requester.active_leases
            for item in range(self.items):
                assert (self.delivered[item] == 1) != (item in self.failed), (
                    f"item {item} neither done nor failed"
                )
        for pid, p in self.providers.items():
            if pid not in self.dead:
                assert not p.active_leases, f"{pid} kept a lease forever"
                assert not p.running, f"{pid} kept a slot forever"
                assert not p.lingering, f"{pid} kept a lingering run forever"


NegotiationMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestNegotiation = NegotiationMachine.TestCase
