"""The provider half (ProviderSide) on trio's MockClock, and the lease messages built through schemas.

The clock test runs a real ProviderCore behind a ProviderSide whose only collaborator
with the outside, ``send_offer``, records the offers: an hour of virtual time after one
request must cost a handful of wake-ups, not a spin.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
import trio.lowlevel
import trio.testing

from p2pcompute.errors import LocalProtocolError
from p2pcompute.identity import Identity
from p2pcompute.tasks import messages
from p2pcompute.tasks import negotiation as n
from p2pcompute.tasks.messages import Offer, Resources, TaskRequest, reason_text, seal_request
from p2pcompute.tasks.provider import ProviderContext, ProviderSide
from p2pcompute.tasks.receipts import Receipt
from p2pcompute.tasks.registry import TaskRegistry


class ClockSteps(trio.abc.Instrument):
    """Counts the steps of the provider clock; past ``limit`` it cancels ``scope`` (a spin)."""

    def __init__(self, scope: trio.CancelScope, limit: int = 1000) -> None:
        self.scope, self.limit = scope, limit
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("ProviderSide.clock"):
            self.steps += 1
            if self.steps > self.limit:
                self.scope.cancel()


async def test_provider_clock_sleeps_between_deadlines(autojump_clock: trio.testing.MockClock) -> None:
    me, buyer = Identity.generate(), Identity.generate()
    registry = TaskRegistry()
    registry.register("k", lambda tensors, params: {"y": torch.zeros(1)})
    offers: list[Offer] = []

    async def send_offer(offer: Offer) -> None:
        offers.append(offer)

    async def record(receipt: Receipt, role: str) -> None:
        raise AssertionError("no lease, no receipt")

    stats: Counter[str] = Counter()
    config = n.ProviderConfig(heartbeat=1.0, lease_ttl=5.0, offer_valid_for=10.0)
    core = n.ProviderCore(me.peer_id, {"k": n.KindTerms(Resources(), 0.0)}, config)
    ctx = ProviderContext(registry, me, None, lambda stat: stats.update([stat]), record)
    side = ProviderSide(core, ctx, send_offer=send_offer)
    request = TaskRequest(b"\x01" * 16, buyer.peer_id, "k", Resources(), 1.0, 1, 60.0, 0, time.time())
    with trio.CancelScope() as spin_guard:
        counter = ClockSteps(spin_guard)
        trio.lowlevel.add_instrument(counter)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(side.clock)
                await side.on_request(buyer.peer_id, seal_request(request, buyer))
                await trio.sleep(3600)  # virtual: one request, then an hour of nothing
                assert core.next_deadline() is None  # the offer expired; nothing is pending
                side.close()
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert not spin_guard.cancelled_caught, f"the clock spun: {counter.steps} steps"
    assert len(offers) == 1
    # woken by the request, then once at the offer's expiry, then asleep until closed
    assert counter.steps <= 6, counter.steps


def test_building_an_invalid_lease_message_is_a_local_protocol_error() -> None:
    lid = b"\x01" * 16
    assert messages.HEARTBEAT.parse(messages.HEARTBEAT.build(lease_id=lid, seq=1))["seq"] == 1
    bad: list[tuple[Any, dict[str, Any]]] = [
        (messages.HEARTBEAT, {"lease_id": b"short", "seq": 1}),
        (messages.HEARTBEAT, {"lease_id": lid, "seq": -1}),
        (messages.GRANT, {"lease_id": lid, "lane": False, "lease_ttl": 0.0, "heartbeat": 1.0}),
        (messages.REJECT, {"lease_id": lid, "reason": "x" * 5000, "retryable": True}),
        (messages.ERROR, {"lease_id": lid, "reason": 3, "retryable": False}),
        (messages.CANCEL, {"lease_id": lid}),
        (messages.RECEIPT_MSG, {"lease_id": lid, "receipt": b"x" * 4000}),
        (messages.RESULT, {"lease_id": lid, "info": b"", "output_bytes": 0}),
    ]
    for schema, fields in bad:
        with pytest.raises(LocalProtocolError):
            schema.build(**fields)
    # a long reason in any script is cut to fit, so building the message never fails
    for text in ("x" * 5000, "\u00e9" * 5000, "\u4f8b" * 5000, "\U0001f525" * 5000):
        cut = reason_text(f"RuntimeError: {text}")
        assert len(cut.encode()) <= 1000
        messages.ERROR.build(lease_id=lid, reason=cut, retryable=False)
        messages.CANCEL.build(lease_id=lid, reason=cut)


def test_no_lease_message_is_built_as_a_raw_dict() -> None:
    """Every task message goes through its Schema (local validation), none as a literal dict."""
    package = Path(messages.__file__).parent
    raw = re.compile(r"""\{\s*["']t["']\s*:""")
    offenders = [p.name for p in sorted(package.glob("*.py")) if raw.search(p.read_text())]
    assert offenders == []
