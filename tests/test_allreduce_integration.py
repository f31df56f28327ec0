"""All-reduce end to end: real py-libp2p nodes, real tensor lanes on 127.0.0.1, in one process.

Exactness for 2-6 peers with odd sizes, weights and every codec (within its documented bound);
each fault kind as a parameter, with a numeric check of every survivor's result and a bound on
the round's time. A "crash" tears the peer's node and lane down without a word; a "hang" leaves
them up but the peer's averaging stops answering; a "cancel" cancels one peer's call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import trio

from p2pcompute.collective import (
    Collective,
    Formed,
    RoundOutcome,
    RoundStatus,
    Timeouts,
    open_collective,
    tensors_layout,
)
from p2pcompute.collective.faults import FaultPlan
from p2pcompute.errors import P2PComputeError
from p2pcompute.overlay import Node, open_node
from p2pcompute.tensors import open_lane
from tests.conftest import TEST_CAPACITY

GUARD = 240  # absolute guard against hangs (not a speed bound; this machine is shared and loaded)
FAST = Timeouts(sender_timeout=3.0, reducer_timeout=6.0, status_timeout=10.0, suspect_grace=0.5)
NODE_OPTS: dict[str, Any] = {"capacity": TEST_CAPACITY}


@dataclass
class Peer:
    index: int
    node: Node | None = None
    lane: Any = None
    coll: Collective | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)  # the collective's test seam
    life: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancelled = the peer crashed
    call: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancelled = its call cancelled
    result: RoundOutcome | None = None
    round_started_at: float | None = None  # the group formed; the all-reduce begins
    finished_at: float | None = None
    tensors: list[torch.Tensor] = field(default_factory=list)


@contextlib.asynccontextmanager
async def swarm(n: int, *, bandwidths: list[float] | None = None) -> AsyncIterator[tuple[Node, list[Peer]]]:
    """A bootstrap node; peers are started by :func:`run_peers`."""
    async with open_node(role="bootstrap", **NODE_OPTS) as boot:
        yield boot, [Peer(i) for i in range(n)]


async def run_peers(
    boot: Node,
    peers: list[Peer],
    body: Callable[[Peer], Awaitable[RoundOutcome]],
    *,
    bandwidths: list[float] | None = None,
    timeouts: Timeouts = FAST,
    lane_opts: dict[str, Any] | None = None,
    lane_opts_of: dict[int, dict[str, Any]] | None = None,
) -> float:
    """Start every peer (node, lane, collective), run ``body`` on all at once; returns the start time.

    ``lane_opts`` go to every peer's lane, ``lane_opts_of[i]`` (on top) to peer ``i``'s only.
    """
    up = trio.Semaphore(0)
    go = trio.Event()
    done = trio.Event()
    remaining = [len(peers)]
    started = [0.0]

    async def one(p: Peer) -> None:
        with p.life:
            lane_kw = {**(lane_opts or {}), **(lane_opts_of or {}).get(p.index, {})}
            async with open_node(bootstrap=boot.addrs, **NODE_OPTS) as node, open_lane(
                node, **lane_kw
            ) as lane, open_collective(
                node, lane, timeouts=timeouts, settle=0.3,
                bandwidth=bandwidths[p.index] if bandwidths else 1.0, faults=p.faults,
            ) as coll:
                p.node, p.lane, p.coll = node, lane, coll
                up.release()
                await go.wait()
                with p.call:
                    p.result = await body(p)
                p.finished_at = trio.current_time()
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
                await done.wait()  # keep serving until every peer is through
        if p.result is None:  # crashed or cancelled
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(one, p)
        for _ in peers:
            await up.acquire()
        for p in peers:  # everyone knows everyone (the bootstrap introduces; we speed it up)
            assert p.node is not None
            await p.node.wait_for_peers(len(peers), timeout=30)
        for i, p in enumerate(peers):  # and is connected to everyone, as discovery would do in time
            for q in peers[i + 1 :]:
                assert p.node is not None
                assert q.node is not None
                if q.node.peer_id not in p.node.connected_peers():
                    with contextlib.suppress(P2PComputeError):  # best effort: a dial may time out
                        await p.node.connect(q.node.addrs[0])
        started[0] = trio.current_time()
        go.set()
    return started[0]


def expected_average(
    xs: list[list[torch.Tensor]], weights: list[float], idx: list[int]
) -> list[torch.Tensor]:
    w = torch.tensor([weights[i] for i in idx], dtype=torch.float64)
    out = []
    for k in range(len(xs[0])):
        stack = torch.stack([xs[i][k].double() for i in idx])
        out.append((stack * w.view(-1, *([1] * (stack.dim() - 1)))).sum(0) / w.sum())
    return out


def bound(codec: str, xs: list[list[torch.Tensor]], weights: list[float], idx: list[int],
          exp: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise error allowed by the codec's documented bound (contributions and result)."""
    wsum = sum(weights[i] for i in idx)
    out = []
    for k, e in enumerate(exp):
        mean_abs = sum(weights[i] * xs[i][k].double().abs() for i in idx) / wsum
        if codec == "none":
            out.append(1e-5 * (mean_abs + e.abs()) + 1e-7)
        elif codec == "fp16":
            out.append(2.0**-11 * (mean_abs + e.abs()) * 1.01 + 2.0**-24)
        elif codec == "bf16":
            out.append(2.0**-8 * (mean_abs + e.abs()) * 1.01 + 2.0**-126)
        else:  # int8: 1/254 of the block's largest magnitude; the whole tensor's max bounds it
            peak = sum(weights[i] * float(xs[i][k].abs().max()) for i in idx) / wsum
            out.append(torch.full_like(e, (peak + float(e.abs().max())) / 254 * 1.01 + 1e-7))
    return out


def check(peers: list[Peer], xs: list[list[torch.Tensor]], weights: list[float], codec: str,
          survivors: list[int], *, excluded: list[int]) -> None:
    ids = {p.node.peer_id: p.index for p in peers if p.node is not None}

    def story() -> str:  # every peer's outcome, peers named by index, for a failure message
        lines = []
        for q in peers:
            r = q.result
            text = "no result" if r is None else (
                f"{r.status.value} with {sorted(ids.get(x, -1) for x in r.participants)} after "
                f"{r.attempts} attempt(s): {r.reason}"
            )
            for pid, k in ids.items():
                text = text.replace(pid, f"peer {k}")
            lines.append(f"  peer {q.index}: {text}")
        return "\n" + "\n".join(lines)

    first: list[torch.Tensor] | None = None
    for i in survivors:
        p = peers[i]
        assert p.result is not None, f"peer {i} got no result" + story()
        assert p.result.status is RoundStatus.AVERAGED, story()
        idx = sorted(ids[q] for q in p.result.participants)
        assert idx == sorted(survivors), story()
        assert sorted(ids[q] for q in p.result.excluded) == sorted(excluded), story()
        exp = expected_average(xs, weights, idx)
        for got, e, b in zip(p.tensors, exp, bound(codec, xs, weights, idx, exp), strict=True):
            err = (got.double() - e).abs()
            assert bool((err <= b).all()), f"peer {i}: max error {float(err.max())} over the bound"
        if first is None:
            first = p.tensors
        else:  # every part was reduced once and round-tripped through the codec: identical bits
            assert all(torch.equal(a, b) for a, b in zip(first, p.tensors, strict=True))


def make_inputs(n: int, shapes: list[tuple[int, ...]], seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * (1 + i) for s in shapes] for i in range(n)]


@pytest.mark.parametrize(
    ("n", "codec", "shapes", "weights", "bandwidths"),
    [
        (2, "none", [(1,), (7, 3)], [1.0, 3.0], None),
        (3, "fp16", [(1001,), (5,)], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]),
        (4, "int8", [(2, 517)], [1.0, 1.0, 2.0, 0.5], None),
        (4, "bf16", [(333,), (1,), (64, 3)], [1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 3.0]),
        pytest.param(6, "none", [(12_345,)], [1.0, 1.0, 1.0, 1.0, 1.0, 5.0], None, marks=pytest.mark.slow),
    ],
)
async def test_exact_weighted_average(
    n: int, codec: str, shapes: list[tuple[int, ...]], weights: list[float], bandwidths: list[float] | None
) -> None:
    xs = make_inputs(n, shapes, seed=n)
    with trio.fail_after(GUARD):
        async with swarm(n) as (boot, peers):
            async def body(p: Peer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                return await p.coll.average(
                    "exact", "round-1", p.tensors, weight=weights[p.index], target=n, min_size=2,
                    matchmaking_timeout=60, codec=codec,
                )
            # default timeouts: a fault-free round must not retry, even on a loaded 2-core box
            await run_peers(boot, peers, body, bandwidths=bandwidths, timeouts=Timeouts())
    check(peers, xs, weights, codec, list(range(n)), excluded=[])
    for p in peers:
        assert p.result is not None
        assert p.result.attempts == 1, p.result


async def test_average_over_the_relay_path() -> None:
    # no direct connections: the lane falls back to libp2p streams and its pipelined path calls
    # the reducer's on_chunk on the event loop (a bug once: progress went through from_thread)
    n = 2
    xs = make_inputs(n, [(3_000_001,)], seed=3)
    with trio.fail_after(GUARD):
        async with swarm(n) as (boot, peers):
            async def body(p: Peer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                return await p.coll.average("relay", "r", p.tensors, target=n, min_size=2,
                                            matchmaking_timeout=60)
            await run_peers(boot, peers, body, lane_opts={"direct": False},
                            timeouts=Timeouts(sender_timeout=30, reducer_timeout=60, status_timeout=30))
    check(peers, xs, [1.0] * n, "none", list(range(n)), excluded=[])


FAULTS = [
    "crash_before",
    "crash_sending",
    "hang_sending",
    "crash_reducing",
    "cancel",
    "cancel_before",
]


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_survivors_finish_exactly(fault: str) -> None:
    n, bad = 4, 2
    weights = [1.0, 2.0, 3.0, 4.0]
    xs = make_inputs(n, [(300_001,), (3,)], seed=11)
    with trio.fail_after(GUARD):
        async with swarm(n) as (boot, peers):
            async def crash(p: Peer) -> None:
                p.faults.silent_exit = True
                p.life.cancel()
                await trio.sleep_forever()

            sent = [0]

            async def hang(p: Peer) -> None:
                # the first contribution goes out, then the peer's averaging freezes: no more
                # sends, no reduction, no answers (its node and lane stay up)
                sent[0] += 1
                if sent[0] > 1:
                    p.faults.muted = True
                    await trio.sleep_forever()

            async def frozen(p: Peer) -> None:
                if p.faults.muted:
                    await trio.sleep_forever()

            async def cancel(p: Peer) -> None:
                p.call.cancel()
                await trio.sleep_forever()

            async def body(p: Peer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                if p.index == bad:
                    hooks: dict[str, Callable[[], Awaitable[None]]] = {
                        "crash_before": {"round_start": lambda: crash(p)},
                        "crash_sending": {"contribution_sent": lambda: crash(p)},
                        "hang_sending": {"contribution_start": lambda: hang(p), "reduce": lambda: frozen(p)},
                        "crash_reducing": {"reduce": lambda: crash(p)},
                        "cancel": {"contribution_sent": lambda: cancel(p)},
                        # cancelled before its first attempt began (while copying its input)
                        "cancel_before": {"snapshot": lambda: cancel(p)},
                    }[fault]
                    for point, hook in hooks.items():
                        p.faults.on(point, hook)
                group = await p.coll.form_group(
                    "faults", "round-1", layout=tensors_layout(p.tensors), weight=weights[p.index],
                    target=n, min_size=2, timeout=60,
                )
                assert isinstance(group, Formed), group
                p.round_started_at = trio.current_time()
                return await p.coll.all_reduce(group, "faults", "round-1", p.tensors)
            await run_peers(boot, peers, body)
    survivors = [i for i in range(n) if i != bad]
    check(peers, xs, weights, "none", survivors, excluded=[bad])
    for i in survivors:
        took = peers[i].finished_at - peers[i].round_started_at  # type: ignore[operator]
        # one failed attempt (detection within the timeouts) + statuses + one clean attempt
        bound_s = 2 * (FAST.reducer_timeout + FAST.status_timeout) + 20
        assert took < bound_s, f"survivor {i} took {took:.1f} s"
    if fault in ("cancel", "cancel_before"):
        # the cancelled peer's tensors are back to its own values
        assert all(torch.equal(a, b) for a, b in zip(peers[bad].tensors, xs[bad], strict=True))
    if fault == "cancel_before":  # it said so: nobody waited for a timeout to find out
        for i in survivors:
            assert "left the round" in peers[i].result.reason, peers[i].result  # type: ignore[union-attr]


async def test_concurrent_joiners_end_as_one_swarm_and_no_group_is_clear() -> None:
    """Four peers join one run at once: one group of four (Hivemind formed two groups of two)."""
    n = 4
    xs = make_inputs(n, [(10,)], seed=5)
    lonely: dict[str, Any] = {}
    with trio.fail_after(GUARD):
        async with swarm(n) as (boot, peers):
            async def body(p: Peer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                result = await p.coll.average("one-swarm", "r", p.tensors, target=4, min_size=2,
                                              matchmaking_timeout=60)
                if p.index == 0:
                    # alone under a run nobody else joins: a clear NO_GROUP at the deadline
                    t = torch.ones(3)
                    start = trio.current_time()
                    lonely["result"] = await p.coll.average("nobody-else", "r", [t], min_size=2,
                                                            matchmaking_timeout=2.0)
                    lonely["took"] = trio.current_time() - start
                    lonely["tensor"] = t
                return result
            await run_peers(boot, peers, body)
    check(peers, xs, [1.0] * n, "none", list(range(n)), excluded=[])
    groups = {p.result.group for p in peers if p.result is not None}
    assert len(groups) == 1
    assert math.isclose(peers[0].result.weight_total, 4.0)  # type: ignore[union-attr]
    assert lonely["result"].status is RoundStatus.NO_GROUP
    assert "deadline" in lonely["result"].reason
    assert lonely["took"] < 2.0 + 5.0  # the deadline, plus a loaded machine
    assert torch.equal(lonely["tensor"], torch.ones(3))


async def test_idle_control_links_are_closed_and_forgotten() -> None:
    """A control link to a peer we stopped talking to is closed by the next sweep (peers come
    and go; it would otherwise stay open for the node's life)."""
    from p2pcompute.collective.links import _LINK_IDLE
    from p2pcompute.collective.messages import LEFT

    with trio.fail_after(GUARD):
        async with open_node(role="bootstrap", **NODE_OPTS) as boot, contextlib.AsyncExitStack() as stack:
            colls: list[Collective] = []
            for _ in range(3):
                node = await stack.enter_async_context(open_node(bootstrap=boot.addrs, **NODE_OPTS))
                lane = await stack.enter_async_context(open_lane(node))
                colls.append(await stack.enter_async_context(open_collective(node, lane)))
            a, b, c = colls
            links = a.links
            note = LEFT.build(round="nobody's")  # routed to no round: ignored by the receiver
            await links.tell(b.peer_id, note)
            assert set(links._links) == {b.peer_id}
            stream, _ = links._links[b.peer_id]
            links._links[b.peer_id] = (stream, trio.current_time() - 2 * _LINK_IDLE)  # long idle
            links._next_prune = 0.0  # and the sweep (at most every _LINK_IDLE / 4) is due
            await links.tell(c.peer_id, note)
            assert set(links._links) == {c.peer_id}
            assert set(links._link_locks) == {c.peer_id}
            assert a.statistics().get("tell_failures", 0) == 0


@pytest.mark.parametrize(("blame_after", "codec"), [(None, "none"), (1, "none"), (None, "bf16")])
async def test_a_byzantine_thousandfold_contribution_is_clipped(blame_after: int | None, codec: str) -> None:
    """One of four members sends -1000x a plausible contribution. With CenteredClip every honest
    member ends bit-identical and close to the honest mean (the plain mean would be ~250x off);
    every honest reducer clipped it. With ``blame_after=1`` it is blamed at once and the retry
    runs without it. With a lossy codec each reducer keeps what the others decode."""
    from p2pcompute.collective import Aggregator

    n, byz = 4, 3
    gen = torch.Generator().manual_seed(21)
    base = torch.randn(40_001, generator=gen)
    xs = [[base + 0.1 * torch.randn(40_001, generator=gen)] for _ in range(n)]
    xs[byz] = [-1000 * xs[byz][0]]
    spec = Aggregator("centered_clip", blame_after=blame_after)
    with trio.fail_after(GUARD):
        async with swarm(n) as (boot, peers):
            async def body(p: Peer) -> RoundOutcome:
                p.tensors = [t.clone() for t in xs[p.index]]
                assert p.coll is not None
                return await p.coll.average("robust", "r1", p.tensors, target=n, min_size=2,
                                            matchmaking_timeout=60, aggregator=spec, codec=codec)
            await run_peers(boot, peers, body, timeouts=Timeouts())
    honest = [p for p in peers if p.index != byz]
    byz_id = peers[byz].node.peer_id  # type: ignore[union-attr]
    honest_mean = torch.stack([xs[p.index][0] for p in honest]).mean(0)
    spread = max(float(torch.linalg.vector_norm(xs[p.index][0] - honest_mean)) for p in honest)
    plain = torch.stack([xs[i][0] for i in range(n)]).mean(0)
    assert float(torch.linalg.vector_norm(plain - honest_mean)) > 100 * spread
    for p in honest:
        r = p.result
        assert r is not None
        assert r.ok, r
        assert torch.equal(p.tensors[0], honest[0].tensors[0])  # one reducer, the same bytes
        assert float(torch.linalg.vector_norm(p.tensors[0] - honest_mean)) < spread
        assert p.coll is not None
        assert p.coll.clip_counts().get(byz_id) == 1, p.coll.clip_counts()
        others = {q.node.peer_id for q in honest if q is not p}  # type: ignore[union-attr]
        assert not others & set(p.coll.clip_counts())  # no honest sender was clipped
        if blame_after is None:
            assert r.attempts == 1
            assert byz_id in r.participants
            assert byz_id in r.clipped
        else:
            assert byz_id in r.excluded
            assert "clipped" in r.reason
            assert p.coll.statistics().get("clip_blamed") == 1
