"""A receiver that refuses a transfer because it is full is honest: nobody is blamed for it.

Real py-libp2p nodes and tensor lanes on 127.0.0.1, in one process. One reducer's lane may
park a single unclaimed transfer (``max_parked=1``), and that reducer starts its transfers only
once a sender was refused: the others' contributions reach it before it asks for them, the
first is parked and the next is refused as busy. The senders back off and send again; the
round completes in one attempt with every member, and no peer blames another. (Before the lane
answered "busy", the refusal read as a protocol error and the full reducer was blamed and
dropped from the round.)
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from p2pcompute.collective import Collective, RoundOutcome, RoundStatus, Timeouts, open_collective
from p2pcompute.collective.faults import FaultPlan
from p2pcompute.deadlines import give_up_after
from p2pcompute.errors import P2PComputeError
from p2pcompute.overlay import Node, open_node
from p2pcompute.tensors import open_lane
from tests.test_allreduce_integration import GUARD, NODE_OPTS, Peer, check, make_inputs


async def test_a_full_reducer_is_not_blamed_and_the_round_completes() -> None:
    n, full = 3, 2
    weights = [1.0, 2.0, 3.0]
    xs = make_inputs(n, [(40_001,), (3,)], seed=21)
    refused = trio.Event()

    async def note_refusal() -> None:  # a sender's send was refused because the receiver is full
        refused.set()

    async def start_late() -> None:
        # the full reducer asks for nothing until the others were refused once (a guard only:
        # the refusal comes as soon as the second contribution reaches it)
        with give_up_after(30):
            await refused.wait()

    plans = [FaultPlan({"send_refused": note_refusal}) for _ in range(n)]
    plans[full] = FaultPlan({"round_start": start_late})
    peers = [Peer(i) for i in range(n)]
    lanes: list[Any] = []
    colls: list[Collective] = []
    with trio.fail_after(GUARD):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot, contextlib.AsyncExitStack() as stack:
            nodes: list[Node] = []
            for i in range(n):
                node = await stack.enter_async_context(open_node(bootstrap=boot.addrs, **NODE_OPTS))
                tight = {"max_parked": 1, "max_parked_per_peer": 1} if i == full else {}
                lane = await stack.enter_async_context(open_lane(node, **tight))
                coll = await stack.enter_async_context(
                    open_collective(node, lane, timeouts=Timeouts(), settle=0.3, faults=plans[i])
                )
                nodes.append(node)
                lanes.append(lane)
                colls.append(coll)
                peers[i].node, peers[i].coll = node, coll
            for i, node in enumerate(nodes):
                await node.wait_for_peers(n, timeout=30)
                for other in nodes[i + 1 :]:
                    if other.peer_id not in node.connected_peers():
                        with contextlib.suppress(P2PComputeError):  # best effort: a dial may time out
                            await node.connect(other.addrs[0])

            async def one(p: Peer) -> None:
                p.tensors = [t.clone() for t in xs[p.index]]
                result: RoundOutcome = await colls[p.index].average(
                    "busy", "round-1", p.tensors, weight=weights[p.index], target=n, min_size=2,
                    matchmaking_timeout=60,
                )
                p.result = result

            async with trio.open_nursery() as nursery:  # every peer serves until all are through
                for p in peers:
                    nursery.start_soon(one, p)

    check(peers, xs, weights, "none", list(range(n)), excluded=[])
    for p, coll in zip(peers, colls, strict=True):
        assert p.result is not None
        assert p.result.status is RoundStatus.AVERAGED
        assert p.result.attempts == 1, p.result  # the refusal cost no attempt
        assert coll.statistics().get("blamed", 0) == 0, coll.statistics()
    assert lanes[full].statistics().refused_busy >= 1  # the full reducer did refuse a transfer
    assert sum(c.statistics().get("busy_refusals", 0) for c in colls) >= 1
