"""Matchmaking under churn on real nodes (127.0.0.1, one process): a partner that leaves cleanly
says so, and one whose connection closes is forgotten at once; the others form without it
instead of waiting out ``patience`` (here 60 s; the bounds below, 30 s, leave room for a loaded machine).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import trio

from p2pcompute.collective import Collective, Timeouts, open_collective, tensors_layout
from p2pcompute.collective.matchcore import Formed
from p2pcompute.overlay import Node, open_node
from p2pcompute.overlay.host import to_peer_id
from p2pcompute.tensors import open_lane
from tests.conftest import TEST_CAPACITY

GUARD = 240  # absolute guard against hangs (not a speed bound)
OPTS: dict[str, Any] = {"capacity": TEST_CAPACITY}
LAYOUT = tensors_layout([torch.zeros(4)])


async def _peer(stack: contextlib.AsyncExitStack, boot: Node) -> tuple[Node, Collective]:
    node = await stack.enter_async_context(open_node(bootstrap=boot.addrs, **OPTS))
    lane = await stack.enter_async_context(open_lane(node))
    coll = await stack.enter_async_context(open_collective(node, lane, timeouts=Timeouts(), settle=0.3))
    return node, coll


async def _pair_forms(b: Collective, c: Collective, key: str, expected: dict[Collective, set[str]]) -> float:
    """B and C match ``key`` expecting ``expected``; both must form {B, C}; the seconds it took."""
    results: dict[str, Any] = {}
    start = trio.current_time()

    async def one(coll: Collective) -> None:
        results[coll.peer_id] = await coll.form_group(
            "run", key, layout=LAYOUT, target=8, min_size=2, timeout=90.0, patience=60.0,
            expected=expected[coll],
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, b)
        nursery.start_soon(one, c)
    for r in results.values():
        assert isinstance(r, Formed), r
        assert {m.peer_id for m in r.members} == {b.peer_id, c.peer_id}
    return trio.current_time() - start


async def _doomed_peer(boot: Node, die: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A peer that lives (in its own task, which owns its node) until ``die`` is set.

    A killed process's connections close with it (the kernel resets them); a node closed in
    this process may leave its sockets open, so it drops its connections first, as death would.
    """
    async with contextlib.AsyncExitStack() as stack:
        node, coll = await _peer(stack, boot)
        task_status.started((node, coll))
        await die.wait()
        for peer in node.connected_peers():
            await node.host.disconnect(to_peer_id(peer))


@pytest.mark.slow
async def test_partners_that_leave_or_die_are_not_waited_for() -> None:
    with trio.fail_after(GUARD):
        async with open_node(role="bootstrap", **OPTS) as boot, contextlib.AsyncExitStack() as stack:
            (nb, b), (nc, c), (na, a) = [await _peer(stack, boot) for _ in range(3)]
            async with trio.open_nursery() as nursery:
                die = trio.Event()
                nd, d = await nursery.start(_doomed_peer, boot, die)
                for node in (nb, nc, na, nd):
                    await node.wait_for_peers(4, timeout=60)
                    for other in (nb, nc, na, nd):
                        if other is not node and other.peer_id not in node.connected_peers():
                            await node.connect(other.addrs[0], timeout=20)

                # A leaves cleanly: it tells B and C, who then match without waiting for it
                assert await a.announce("run", [b.peer_id, c.peer_id], "leave", timeout=20.0) == 2
                assert a.peer_id in b.noted("run", "leave")
                expect = {b: {a.peer_id, c.peer_id}, c: {a.peer_id, b.peer_id}}
                assert await _pair_forms(b, c, "round-1", expect) < 30.0

                # D dies (its node closes) while B and C wait for it: forgotten on the disconnect
                async def kill_d() -> None:
                    await trio.sleep(1.0)
                    die.set()

                expect = {b: {d.peer_id, c.peer_id}, c: {d.peer_id, b.peer_id}}
                nursery.start_soon(kill_d)
                assert await _pair_forms(b, c, "round-2", expect) < 30.0


@pytest.mark.slow
def test_a_swarm_that_closes_tells_its_partner_which_does_not_wait_for_it() -> None:
    """Two trainers average one round; A closes (its ``with`` ends); B's next outer step does not
    wait for A (before: patience, then the whole matchmaking timeout, 20 s here)."""
    import threading
    import time

    from p2pcompute.training.swarm import Swarm

    def train(swarm: Swarm, steps: int, out: list[Any]) -> None:
        try:
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 1)
            opt = swarm.diloco(model, torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=2, join=False)
            for _ in range(steps):
                model(torch.ones(3, 4)).sum().backward()
                if (report := opt.step()) is not None:
                    out.append(report)
                opt.zero_grad()
            out.append(opt)
        except BaseException as exc:
            out.append(exc)

    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common = {"bootstrap": boot.addrs, "patience": 10.0, "matchmaking_timeout": 20.0,
                  "advert_interval": 1.0}
        with Swarm(**common) as b:
            got_a: list[Any] = []
            got_b: list[Any] = []
            with Swarm(**common) as a:
                a.wait_for_peers(1, timeout=30)
                b.wait_for_peers(1, timeout=30)
                t = threading.Thread(target=train, args=(a, 2, got_a))
                t.start()
                train(b, 2, got_b)
                t.join(60)
                assert len(got_a[0].participants) == 2, got_a
                assert len(got_b[0].participants) == 2, got_b
            # A's with block ended: it said it was leaving
            opt = got_b[-1]
            start = time.monotonic()
            for _ in range(2):
                for p in opt.params:
                    p.grad = torch.ones_like(p)
                report = opt.step()
            assert report is not None
            assert report.solo
            assert time.monotonic() - start < 5.0, report
