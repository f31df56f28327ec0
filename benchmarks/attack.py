"""Attack suite (issue #14): honest nodes outnumbered 4 to 1 by sybils that drop, spam and replay.

One process runs a bootstrap node, ``honest`` honest peers (one of them sells tasks, another
buys) and ``4 * honest`` sybils, all real py-libp2p hosts on 127.0.0.1, joined one after
another through the bootstrap node. Sybils are ordinary nodes (anyone may join): they
advertise, get dialed, sit in GossipSub meshes. Then two phases on the same swarm:

* ``quiet``: sybils behave (forward everything, publish nothing);
* ``attack``: every sybil drops every message it should forward on the advert and task
  topics (its GossipSub validator rejects them, so it neither delivers nor forwards), and
  once per ``period`` it publishes a junk advert, a junk task request, and replays an honest
  advert it captured (stale and relayed under its own signature).

Figures per phase:

* ``advert_reach``: for each honest node in turn, ``readvertise()``; the share of
  (advert, other honest node) pairs whose full advert check accepted it within ``window``
  seconds (target >= 0.99);
* ``lease_ms``: an honest task's request-to-lease time (``TaskResult.lease_seconds``),
  honest requester to honest provider (target: attack within 2x quiet);
* ``banned``: how many sybils the honest nodes have blacklisted by the end (sum over nodes);
* ``droppers_pruned``: mesh places the honest nodes took from peers that forwarded none of
  the last ``dropper_misses`` adverts (sum over nodes, cumulative);
* ``sybil_mesh_share``: share of the honest nodes' advert-mesh places held by sybils at the
  end of the phase.

Runnable as ``python -m benchmarks.attack [--quick] [--honest 8] [--out PATH]``;
tests/test_attack_sybil.py runs :func:`measure` at a small scale.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from p2pcompute.benchresults import SuiteResult, peak_rss_mib, print_table, write_results
from p2pcompute.capacity.model import Capacity
from p2pcompute.errors import P2PComputeError
from p2pcompute.overlay import Node, open_node
from p2pcompute.overlay.messages import topic_name
from p2pcompute.tasks.driver import TOPIC as TASK_TOPIC
from p2pcompute.tasks.driver import TaskService, open_tasks, serve_tasks

CAP = Capacity(cpu_cores=2, ram_total=8 << 30, ram_available=4 << 30, platform="attack-bench")
# dial_timeout: 80 hosts in one process on two loaded cores; joins at 5 and at 20 s timed out (16/64)
OPTS: dict[str, Any] = {
    "capacity": CAP, "advert_interval": 600.0, "advert_ttl": 1800.0, "max_advert_ttl": 1800.0,
    "dial_timeout": 30.0,
}
JOIN_TRIES = 3  # a join that times out on a starved event loop is tried again (not measured)


def _origin(msg: Any) -> str:
    from libp2p.peer.id import ID  # benchmarks may touch py-libp2p; the package may not

    return str(ID(bytes(msg.from_id)).to_base58())


@dataclass
class Sybil:
    """One sybil node: a switch between behaving and attacking, and the adverts it captured."""

    node: Node
    attacking: bool = False
    captured: list[bytes] = field(default_factory=list)

    def install(self) -> None:
        """Replace its validators: capture adverts; reject (= drop, never forward) while attacking."""
        node = self.node
        honest_check = node._validate_advert

        def adverts(forwarder: Any, msg: Any) -> bool:
            if len(self.captured) < 8:
                self.captured.append(bytes(msg.data))
            return False if self.attacking else bool(honest_check(forwarder, msg))

        def tasks(forwarder: Any, msg: Any) -> bool:
            return not self.attacking

        node.pubsub.set_topic_validator(node._advert_topic, adverts, False)
        node.pubsub.set_topic_validator(topic_name(node.swarm, TASK_TOPIC), tasks, False)

    async def misbehave_once(self) -> None:
        """One round of spam and replay on the advert and task topics."""
        node = self.node
        with contextlib.suppress(P2PComputeError):
            await node._stack.publish(node._advert_topic, os.urandom(300))
            await node.publish(TASK_TOPIC, os.urandom(200))
            if self.captured:
                await node._stack.publish(node._advert_topic, self.captured[0])


@dataclass
class Swarm:
    boot: Node
    honest: list[Node]
    sybils: list[Sybil]
    provider: TaskService
    requester: TaskService


async def _ignore(sender: str, data: bytes) -> None:
    return None


async def _join(stack: contextlib.AsyncExitStack, **opts: Any) -> Node:
    for attempt in range(JOIN_TRIES):
        try:
            return await stack.enter_async_context(open_node(**opts))
        except P2PComputeError:
            if attempt == JOIN_TRIES - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def open_attack_swarm(
    honest: int, sybils: int, *, join_timeout: float = 120.0, node_opts: dict[str, Any] | None = None
) -> Any:
    """Bootstrap + ``honest`` honest nodes (the first sells tasks, the last buys) + ``sybils`` sybils.

    ``node_opts`` go to the honest nodes and the bootstrap (on top of ``OPTS``).
    """
    opts = {**OPTS, **(node_opts or {})}
    async with contextlib.AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_node(role="bootstrap", **opts))
        good: list[Node] = []
        bad: list[Sybil] = []
        # interleave joins so honest nodes do not all sit before (or after) the sybils in tables
        ratio = max(1, sybils // max(1, honest))
        while len(good) < honest or len(bad) < sybils:
            if len(good) < honest:
                good.append(await _join(stack, bootstrap=boot.addrs, **opts))
            for _ in range(ratio):
                if len(bad) < sybils:
                    s = Sybil(await _join(stack, bootstrap=boot.addrs, **OPTS))
                    s.node.subscribe(TASK_TOPIC, _ignore)  # sits in the task topic's mesh too
                    s.install()
                    bad.append(s)
        provider = await stack.enter_async_context(serve_tasks(good[0]))
        requester = await stack.enter_async_context(open_tasks(good[-1]))
        with trio.move_on_after(join_timeout):
            for node in good:
                with contextlib.suppress(P2PComputeError):
                    await node.wait_for_peers(honest - 1, timeout=join_timeout, role="peer")
        await requester.wait_for_providers(1, timeout=join_timeout)
        yield Swarm(boot, good, bad, provider, requester)


def _hook(node: Node, seen: Callable[[str, str], None]) -> None:
    """Call ``seen(observer, origin)`` whenever ``node``'s full advert check accepts one."""
    original = node._validate_advert

    def wrapped(forwarder: Any, msg: Any) -> bool:
        ok = bool(original(forwarder, msg))
        if ok:
            seen(node.peer_id, _origin(msg))
        return ok

    node.pubsub.set_topic_validator(node._advert_topic, wrapped, False)


async def advert_reach(swarm: Swarm, window: float) -> tuple[float, list[float]]:
    """Each honest node re-advertises in turn; (share of honest pairs reached in ``window``, delays)."""
    arrivals: dict[str, dict[str, float]] = {}
    armed: set[str] = set()

    def seen(observer: str, origin: str) -> None:
        if origin in armed:
            arrivals.setdefault(origin, {}).setdefault(observer, time.perf_counter())

    for node in swarm.honest:
        _hook(node, seen)
    reached = total = 0
    delays: list[float] = []
    for src in swarm.honest:
        others = {n.peer_id for n in swarm.honest if n is not src}
        arrivals.pop(src.peer_id, None)
        armed.add(src.peer_id)
        t0 = time.perf_counter()
        await src.readvertise()
        with trio.move_on_after(window):
            while not others <= set(arrivals.get(src.peer_id, {})):
                await trio.sleep(0.01)
        armed.discard(src.peer_id)
        times = arrivals.get(src.peer_id, {})
        got = {o: t - t0 for o, t in times.items() if o in others and t - t0 <= window}
        reached += len(got)
        total += len(others)
        delays.extend(got.values())
    return reached / max(1, total), delays


async def lease_times(swarm: Swarm, n: int) -> tuple[list[float], int]:
    """``n`` honest matmul tasks; (request-to-lease times in ms of those that ran, failures)."""
    a = torch.ones(2, 2)
    out: list[float] = []
    failed = 0
    for _ in range(n):
        try:
            r = await swarm.requester.run_task("matmul", {"a": a, "b": a}, {}, deadline=20)
        except P2PComputeError:
            failed += 1
            continue
        out.append(r.lease_seconds * 1000)
    return out, failed


async def _misbehave(sybils: list[Sybil], period: float) -> None:
    while True:
        for s in sybils:
            await s.misbehave_once()
        await trio.sleep(period)


def _banned(swarm: Swarm) -> int:
    bad = {s.node.peer_id for s in swarm.sybils}
    return sum(len(bad & n._stack.banned) for n in [swarm.boot, *swarm.honest])


def _pruned(swarm: Swarm) -> int:
    """Droppers the honest nodes (and the bootstrap) pruned from their advert meshes so far."""
    return sum(n.stats.get("droppers_pruned", 0) for n in [swarm.boot, *swarm.honest])


def _sybils_in_meshes(swarm: Swarm) -> float:
    """Share of the honest nodes' advert-mesh places held by sybils."""
    bad = {s.node.peer_id for s in swarm.sybils}
    held = total = 0
    for n in swarm.honest:
        mesh = [str(p.to_base58()) for p in n.gossipsub.mesh.get(n._advert_topic, ())]
        held += sum(p in bad for p in mesh)
        total += len(mesh)
    return held / max(1, total)


async def measure(
    honest: int = 16,
    sybils: int = 64,
    *,
    window: float = 2.0,
    leases: int = 10,
    period: float = 1.0,
    phases: tuple[str, ...] = ("quiet", "attack"),
    log: Callable[[str], None] = lambda line: None,
    node_opts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Join the swarm, then measure the quiet phase and the attack phase (see the module docstring).

    Example::

        figures = trio.run(measure, 4, 16)
        print(figures["attack"]["advert_reach"])
    """
    out: dict[str, Any] = {"honest": honest, "sybils": sybils}
    t0 = time.perf_counter()
    async with open_attack_swarm(honest, sybils, node_opts=node_opts) as swarm:
        out["join_s"] = time.perf_counter() - t0
        log(f"{honest} honest and {sybils} sybils joined in {out['join_s']:.1f} s")
        ones = torch.ones(2, 2)
        await swarm.requester.run_task("matmul", {"a": ones, "b": ones}, {})  # warm-up: connections, mesh
        await trio.sleep(3.0)  # three heartbeats: meshes settle after the last joins
        for phase in phases:
            async with trio.open_nursery() as nursery:
                for s in swarm.sybils:
                    s.attacking = phase == "attack"
                if phase == "attack":
                    nursery.start_soon(_misbehave, swarm.sybils, period)
                    await trio.sleep(3 * period)  # the attack is under way before we measure
                share, delays = await advert_reach(swarm, window)
                lease, failed = await lease_times(swarm, leases)
                out[phase] = {
                    "advert_reach": share,
                    "advert_delay_s": delays,
                    "lease_ms": lease,
                    "lease_failures": failed,
                    "banned": _banned(swarm),
                    "droppers_pruned": _pruned(swarm),
                    "sybil_mesh_share": _sybils_in_meshes(swarm),
                }
                log(f"{phase}: {out[phase]}")
                nursery.cancel_scope.cancel()
    out["rss_mib"] = peak_rss_mib()
    return out


def run(quick: bool = False, honest: int = 8, **options: Any) -> SuiteResult:
    """Run the suite and return its result. Example::

    result = run(quick=True)
    """
    if quick:
        honest = min(honest, 4)
    progress = functools.partial(print, flush=True)
    phases = ("quiet", "attack", "quiet-after")
    figures = trio.run(functools.partial(measure, honest, 4 * honest, phases=phases, log=progress))
    result = SuiteResult(
        "attack",
        primary_metric="lease_ms",
        higher_is_better=False,
        options={"quick": quick, "honest": honest, "sybils": 4 * honest, "processes": 1},
    )
    for phase in phases:
        f = figures[phase]
        row = result.config(phase, size="tiny", honest=honest, sybils=4 * honest)
        if phase == "quiet":
            row.baseline = "quiet"
        for v in f["lease_ms"]:
            row.add("lease_ms", v)
        row.add("advert_reach", f["advert_reach"])
        if f["advert_delay_s"]:
            row.add("advert_p50_s", statistics.median(f["advert_delay_s"]))
            row.add("advert_max_s", max(f["advert_delay_s"]))
        row.add("lease_failures", f["lease_failures"])
        row.add("banned", f["banned"])
        row.add("droppers_pruned", f["droppers_pruned"])
        row.add("sybil_mesh_share", f["sybil_mesh_share"])
        row.add("join_s", figures["join_s"])
        row.add("rss_mib", figures["rss_mib"])
    result.configs[2].notes.append("the quiet phase again, after the attack (sybils behave, may be banned)")
    result.configs[1].notes.append(
        "sybils drop every advert and task message they should forward, and each second publish a junk "
        "advert, a junk task request and a replayed honest advert"
    )
    result.add_ratios()
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.attack [--quick] [--honest N] [--out PATH]``."""
    parser = argparse.ArgumentParser(prog="benchmarks.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 honest nodes and 16 sybils")
    parser.add_argument(
        "--honest", type=int, default=8, help="honest nodes (sybils: 4 times as many; default 8)"
    )
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    args = parser.parse_args(argv)
    result = run(args.quick, honest=args.honest)
    metrics = [
        "advert_reach", "advert_p50_s", "advert_max_s", "lease_ms", "lease_failures", "banned",
        "droppers_pruned", "sybil_mesh_share",
    ]
    print_table(result, [*metrics, "join_s", "rss_mib"])
    path = write_results(result, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
