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
  end of the phase;
* ``verdicts_sybil`` / ``verdicts_honest`` (``--procs``): dropper verdicts the honest nodes
  and the bootstrap gave against sybils / honest peers so far (``--dropper-misses N`` turns
  the rule on; 0, the default, leaves it off);
* ``load_avg``: the machine's one-minute load average at the end of the phase (two cores
  here: far above 2, the figures measure CPU starvation more than the protocol).

``--procs N`` spreads the honest nodes and the sybils over N worker processes (one trio loop
and several hosts each, JSON lines to this process, which only orchestrates), so the swarm
is not limited by one Python thread validating every advert for 80 hosts.

Runnable as ``python -m benchmarks.attack [--quick] [--honest 8] [--procs N]
[--dropper-misses N] [--out PATH]``; tests/test_attack_sybil.py runs :func:`measure` at a
small scale.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from benchmarks.procs import Worker, say, stop_all
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
    return await lease_times_of(swarm.requester, n)


async def lease_times_of(requester: TaskService, n: int) -> tuple[list[float], int]:
    """``n`` matmul tasks from ``requester``; (request-to-lease times in ms of those that ran, failures)."""
    a = torch.ones(2, 2)
    out: list[float] = []
    failed = 0
    for _ in range(n):
        try:
            r = await requester.run_task("matmul", {"a": a, "b": a}, {}, deadline=20)
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
                    "load_avg": os.getloadavg()[0],  # the box's run queue: is this CPU starvation?
                }
                log(f"{phase}: {out[phase]}")
                nursery.cancel_scope.cancel()
    out["rss_mib"] = peak_rss_mib()
    return out


# ---------------------------------------------------------------------------------------------
# --procs N: the same swarm spread over N worker processes (one trio loop each), so the figures
# measure the protocol and not one starved thread. Honest node i lives in worker i % N (the
# provider, honest 0, and the requester, the last honest node, land in different workers when
# N > 1), sybils are dealt round robin too, and worker 0 also runs the bootstrap node.
#
# Worker protocol (stdin lines; each answered by one JSON line, watchers answer later):
#   sybils ID...        the sybils' peer ids (for the ban and mesh counts)       -> {"noted": n}
#   serve / buy         the local provider serves tasks / the requester opens     -> {"tasks": role}
#   settle H            local honest nodes wait for H-1 honest peers; a requester
#                       also waits for a provider and runs one warm-up task       -> {"settled": ok}
#   phase NAME          local sybils behave (quiet*) or attack (start misbehaving) -> {"phase": NAME}
#   arm ORIGIN          count first acceptances of ORIGIN's advert on the local honest nodes
#                       -> {"armed": ORIGIN}, later {"arrivals": ORIGIN, "times": {observer: t}}
#                       once every local honest node but ORIGIN has it, or after the window
#   advertise ID        the local honest node ID re-advertises                    -> {"t0": t}
#   leases N            the local requester runs N tasks -> {"lease_ms": [...], "failures": k}
#   stats               -> {"banned": n, "pruned": n, "mesh_held": n, "mesh_total": n, "rss_mib": x}
# Times are time.monotonic(): one clock for every process on the machine.


def _split(count: int, procs: int, k: int) -> list[int]:
    """The indexes (of ``count``) that worker ``k`` of ``procs`` holds: every procs-th one."""
    return list(range(k, count, procs))


async def _worker_main(
    k: int,
    procs: int,
    honest: int,
    sybils: int,
    boot_addr: str,
    window: float,
    node_opts: dict[str, Any] | None = None,
) -> None:
    mine = _split(honest, procs, k)
    n_sybils = len(_split(sybils, procs, k))
    arrivals: dict[str, dict[str, float]] = {}
    sybil_ids: set[str] = set()
    honest_ids: set[str] = set()
    opts = {**OPTS, **(node_opts or {})}

    def seen(observer: str, origin: str) -> None:
        if origin in arrivals:
            arrivals[origin].setdefault(observer, time.monotonic())

    async with contextlib.AsyncExitStack() as stack:
        boot: Node | None = None
        if not boot_addr:
            boot = await stack.enter_async_context(open_node(role="bootstrap", **opts))
            boot_addr = boot.addrs[0]
            say({"boot": boot_addr})
        t0 = time.monotonic()
        good: dict[int, Node] = {}
        bad: list[Sybil] = []
        ratio = max(1, n_sybils // max(1, len(mine)))
        todo = list(mine)
        while todo or len(bad) < n_sybils:  # interleaved, as in one process
            if todo:
                i = todo.pop(0)
                good[i] = await _join(stack, bootstrap=[boot_addr], **opts)
            for _ in range(ratio):
                if len(bad) < n_sybils:
                    s = Sybil(await _join(stack, bootstrap=[boot_addr], **OPTS))
                    s.node.subscribe(TASK_TOPIC, _ignore)
                    s.install()
                    bad.append(s)
        for node in good.values():
            _hook(node, seen)
        say({
            "joined": {str(i): n.peer_id for i, n in good.items()},
            "sybil_ids": [s.node.peer_id for s in bad],
            "join_s": time.monotonic() - t0,
        })
        requester: TaskService | None = None
        local_ids = {n.peer_id for n in good.values()}

        async def watch(origin: str) -> None:
            others = local_ids - {origin}
            with trio.move_on_after(window + 1.0):  # armed before the advert left
                while not others <= arrivals[origin].keys():  # validators signal nothing: poll
                    await trio.sleep(0.01)
            got = arrivals.pop(origin)
            say({"arrivals": origin, "times": {o: t for o, t in got.items() if o in others}})

        async with trio.open_nursery() as nursery:
            attack: trio.CancelScope | None = None
            while cmd := (await trio.to_thread.run_sync(sys.stdin.readline)).split():
                if cmd[0] == "sybils":
                    sybil_ids = set(cmd[1:])
                    say({"noted": len(sybil_ids)})
                elif cmd[0] == "honest":
                    honest_ids = set(cmd[1:])
                    say({"noted": len(honest_ids)})
                elif cmd[0] == "serve":
                    await stack.enter_async_context(serve_tasks(good[0]))
                    say({"tasks": "provider"})
                elif cmd[0] == "buy":
                    requester = await stack.enter_async_context(open_tasks(good[honest - 1]))
                    say({"tasks": "requester"})
                elif cmd[0] == "settle":
                    ok = True
                    with trio.move_on_after(120):
                        for node in good.values():
                            try:
                                await node.wait_for_peers(int(cmd[1]) - 1, timeout=120, role="peer")
                            except P2PComputeError:
                                ok = False
                        if requester is not None:
                            await requester.wait_for_providers(1, timeout=120)
                            ones = torch.ones(2, 2)
                            await requester.run_task("matmul", {"a": ones, "b": ones}, {})
                    say({"settled": ok})
                elif cmd[0] == "phase":
                    if attack is not None:
                        attack.cancel()
                        attack = None
                    for s in bad:
                        s.attacking = cmd[1] == "attack"
                    if cmd[1] == "attack":
                        attack = trio.CancelScope()

                        async def misbehave(scope: trio.CancelScope = attack) -> None:
                            with scope:
                                await _misbehave(bad, 1.0)

                        nursery.start_soon(misbehave)
                    say({"phase": cmd[1]})
                elif cmd[0] == "arm":
                    arrivals[cmd[1]] = {}
                    nursery.start_soon(watch, cmd[1])
                    say({"armed": cmd[1]})
                elif cmd[0] == "advertise":
                    src = next(n for n in good.values() if n.peer_id == cmd[1])
                    t = time.monotonic()
                    await src.readvertise()
                    say({"t0": t})
                elif cmd[0] == "leases":
                    assert requester is not None
                    lease, failed = await lease_times_of(requester, int(cmd[1]))
                    say({"lease_ms": lease, "failures": failed})
                elif cmd[0] == "stats":
                    watched = [*good.values(), *([boot] if boot is not None else [])]
                    held = total = 0
                    for n in good.values():
                        mesh = [str(p.to_base58()) for p in n.gossipsub.mesh.get(n._advert_topic, ())]
                        held += sum(p in sybil_ids for p in mesh)
                        total += len(mesh)
                    say({
                        "banned": sum(len(sybil_ids & n._stack.banned) for n in watched),
                        "pruned": sum(n.stats.get("droppers_pruned", 0) for n in watched),
                        "verdicts_sybil": sum(
                            n._stack.deliveries.verdicts(p) for n in watched for p in sybil_ids
                        ),
                        "verdicts_honest": sum(
                            n._stack.deliveries.verdicts(p) for n in watched for p in honest_ids
                        ),
                        "mesh_held": held,
                        "mesh_total": total,
                        "rss_mib": peak_rss_mib(),
                    })
            nursery.cancel_scope.cancel()


def measure_procs(
    honest: int = 16,
    sybils: int = 64,
    procs: int = 2,
    *,
    window: float = 2.0,
    leases: int = 10,
    phases: tuple[str, ...] = ("quiet", "attack"),
    log: Callable[[str], None] = lambda line: None,
    dropper_misses: int = 0,
) -> dict[str, Any]:
    """Like :func:`measure`, with the nodes spread over ``procs`` worker processes
    (``dropper_misses``: the honest nodes' and the bootstrap's dropper rule).

    Example::

        figures = measure_procs(16, 64, procs=2)
        print(figures["attack"]["advert_reach"])
    """
    me = "benchmarks.attack"
    out: dict[str, Any] = {"honest": honest, "sybils": sybils, "procs": procs}
    common = ["--honest", str(honest), "--sybils", str(sybils), "--procs", str(procs)]
    common += ["--window", str(window), "--dropper-misses", str(dropper_misses)]
    workers: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="p2pc-attack-") as tmp:
        logs = Path(tmp)
        site: dict[str, Any] = {"exec": [], "addr": None, "index": 0}
        try:
            first = Worker(site, me, ["--worker", "0", *common], logs, name="attack")
            workers.append(first)
            boot = first.need("boot", 120)["boot"]
            for k in range(1, procs):
                args = ["--worker", str(k), "--boot", boot, *common]
                workers.append(Worker({**site, "index": k}, me, args, logs, name="attack"))
            join_wait = 60 + 20 * (honest + sybils)
            joined = [w.need("joined", join_wait) for w in workers]
            out["join_s"] = max(j["join_s"] for j in joined)
            log(f"{honest} honest and {sybils} sybils joined in {out['join_s']:.1f} s over {procs} processes")
            pairs_of = [(w, j["joined"]) for w, j in zip(workers, joined, strict=True)]
            owner = {int(i): (w, pid) for w, local in pairs_of for i, pid in local.items()}
            ids = [pid for j in joined for pid in j["sybil_ids"]]
            for w in workers:
                w.send("sybils " + " ".join(ids))
                w.need("noted", 60)
                w.send("honest " + " ".join(pid for _, pid in owner.values()))
                w.need("noted", 60)
            owner[0][0].send("serve")
            owner[0][0].need("tasks", 60)
            buyer = owner[honest - 1][0]
            buyer.send("buy")
            buyer.need("tasks", 60)
            for w in workers:
                w.send(f"settle {honest}")
            out["settled"] = all(w.need("settled", 300)["settled"] for w in workers)
            time.sleep(3.0)  # three heartbeats: meshes settle after the last joins
            for phase in phases:
                for w in workers:
                    w.send(f"phase {phase}")
                    w.need("phase", 60)
                if phase == "attack":
                    time.sleep(3.0)  # the attack is under way before we measure
                reached = pairs = 0
                delays: list[float] = []
                for i in range(honest):
                    src, origin = owner[i]
                    for w in workers:
                        w.send(f"arm {origin}")
                    for w in workers:
                        w.need("armed", 60)
                    src.send(f"advertise {origin}")
                    t0 = src.need("t0", 60)["t0"]
                    for w in workers:
                        times = w.need("arrivals", window + 60)["times"]
                        got = [t - t0 for t in times.values() if t - t0 <= window]
                        reached += len(got)
                        delays.extend(got)
                    pairs += honest - 1
                buyer.send(f"leases {leases}")
                lease = buyer.need("lease_ms", 60 + 30 * leases)
                stats = []
                for w in workers:
                    w.send("stats")
                    stats.append(w.need("banned", 60))
                held = sum(s["mesh_held"] for s in stats)
                total = sum(s["mesh_total"] for s in stats)
                out[phase] = {
                    "advert_reach": reached / max(1, pairs),
                    "advert_delay_s": delays,
                    "lease_ms": lease["lease_ms"],
                    "lease_failures": lease["failures"],
                    "banned": sum(s["banned"] for s in stats),
                    "droppers_pruned": sum(s["pruned"] for s in stats),
                    "verdicts_sybil": sum(s["verdicts_sybil"] for s in stats),
                    "verdicts_honest": sum(s["verdicts_honest"] for s in stats),
                    "load_avg": os.getloadavg()[0],  # the box's run queue: is this CPU starvation?
                    "sybil_mesh_share": held / max(1, total),
                }
                out["rss_mib"] = max(s["rss_mib"] for s in stats)
                log(f"{phase}: {out[phase]}")
            return out
        finally:
            stop_all(workers)


def run(
    quick: bool = False, honest: int = 8, procs: int = 1, dropper_misses: int = 0, **options: Any
) -> SuiteResult:
    """Run the suite and return its result (``procs`` > 1: over that many worker processes).

    Example::

        result = run(quick=True, procs=2)
    """
    if quick:
        honest = min(honest, 4)
    progress = functools.partial(print, flush=True)
    phases = ("quiet", "attack", "quiet-after")
    if procs > 1:
        figures = measure_procs(
            honest, 4 * honest, procs, phases=phases, log=progress, dropper_misses=dropper_misses
        )
    else:
        opts = {"dropper_misses": dropper_misses}
        figures = trio.run(
            functools.partial(measure, honest, 4 * honest, phases=phases, log=progress, node_opts=opts)
        )
    result = SuiteResult(
        "attack",
        primary_metric="lease_ms",
        higher_is_better=False,
        options={
            "quick": quick,
            "honest": honest,
            "sybils": 4 * honest,
            "processes": procs,
            "dropper_misses": dropper_misses,
        },
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
        for key in ("verdicts_sybil", "verdicts_honest", "load_avg"):
            if key in f:
                row.add(key, f[key])
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
    """Command line: ``python -m benchmarks.attack [--quick] [--honest N] [--procs N] [--out PATH]``."""
    parser = argparse.ArgumentParser(prog="benchmarks.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 honest nodes and 16 sybils")
    parser.add_argument(
        "--honest", type=int, default=8, help="honest nodes (sybils: 4 times as many; default 8)"
    )
    parser.add_argument(
        "--procs", type=int, default=1, help="worker processes to spread the nodes over (default 1: all here)"
    )
    parser.add_argument(
        "--dropper-misses",
        type=int,
        default=0,
        help="honest nodes prune mesh peers that missed this many late adverts in a row (0: off)",
    )
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    # a worker of --procs (started by the parent, not by hand)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--boot", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sybils", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.procs < 1 or args.honest < 2:
        parser.error("--procs must be at least 1 and --honest at least 2")
    if args.worker is not None:
        opts = {"dropper_misses": args.dropper_misses}
        worker = functools.partial(_worker_main, node_opts=opts)
        trio.run(worker, args.worker, args.procs, args.honest, args.sybils, args.boot, args.window)
        return 0
    result = run(args.quick, honest=args.honest, procs=args.procs, dropper_misses=args.dropper_misses)
    metrics = [
        "advert_reach", "advert_p50_s", "advert_max_s", "lease_ms", "lease_failures", "banned",
        "droppers_pruned", "verdicts_sybil", "verdicts_honest", "sybil_mesh_share", "load_avg",
    ]
    print_table(result, [*metrics, "join_s", "rss_mib"])
    path = write_results(result, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
