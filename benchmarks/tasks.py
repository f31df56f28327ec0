"""Task negotiation: request-to-lease latency, small tasks per second, recovery from a killed provider.

Setup: one bootstrap node, four providers (capacity 2 each, built-in kinds) and one
requester, all real py-libp2p hosts on 127.0.0.1 in this process (one core's worth
of Python for everything, so the figures are CPU-bound and pessimistic).

Rows:

* ``libp2p_rtt`` (baseline): open a stream to a provider and do one framed round
  trip -- the floor under any negotiation, which needs a gossip hop plus two streams;
* ``request_to_lease``: sequential ``run_task("matmul")`` on 2x2 inputs; ``lease_ms``
  is from the request being published to the grant (p50 and p99 over the samples);
* ``small_tasks``: ``map_tasks`` of many 2x2 matmuls spread over the four providers;
  ``tasks_per_s`` end to end, including signing and countersigning every receipt;
* both rows twice: ``*_nosession`` with one-shot leases (``session=0``: a request, an offer
  and a new lease stream per call, the path before sessions) and then with sessions (the
  default: later calls lease on the open sessions' streams, docs/design/sessions.md);
* ``recover_killed``: the cheapest provider takes the lease and is killed while the
  task runs; ``recover_s`` is from the kill to the result arriving from another provider.

Under ``--wan`` (``python -m benchmarks tasks --wan 50ms,200mbit``) every node is a process in
its own namespace instead: bootstrap node and requester in peer 0's, one provider in each other
peer's, and each recovery's victim a fresh process that SIGKILLs itself when its run starts.

With ``--procs`` every node is a process on 127.0.0.1 the same way, without namespaces
(the set-up of issue #15's small-task target: 1 requester and 4 providers).

Run: ``python -m benchmarks.tasks [--quick] [--procs] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import trio

from benchmarks.procs import Worker, listen_addrs, say, stop_all
from p2pcompute.benchresults import SuiteResult, peak_rss_mib, print_table, wan_layout, write_results
from p2pcompute.capacity.model import Capacity
from p2pcompute.overlay import FramedStream, Node, open_node
from p2pcompute.tasks import TaskRegistry
from p2pcompute.tasks.driver import TaskService, open_tasks, serve_tasks

CAP = Capacity(cpu_cores=2, ram_total=8 << 30, ram_available=4 << 30, platform="bench")
OPTS: dict[str, Any] = {"capacity": CAP}
ECHO = "/p2pcompute/bench-echo/1"
PARALLEL = 8  # leases at once in the small-task map (4 providers x capacity 2)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _fallback() -> TaskRegistry:
    """The healthy provider's "spin": pricier than the victim's, and quick."""
    good = TaskRegistry()

    @good.task("spin", price=1.0)
    def quick_spin(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"y": tensors["x"] + 1}

    return good


@contextlib.asynccontextmanager
async def _provider(
    bootstrap: list[str], registry: TaskRegistry | None = None
) -> AsyncIterator[tuple[Node, TaskService]]:
    """A provider node (built-in kinds plus ``registry``) that also answers the echo baseline."""
    async with (
        open_node(bootstrap=bootstrap, listen=listen_addrs(), **OPTS) as node,
        serve_tasks(node, registry, capacity=2, max_leases_per_requester=2) as svc,
    ):

        async def echo(stream: FramedStream) -> None:
            await stream.send_frame(await stream.recv_frame(64))

        node.set_stream_handler(ECHO, echo)
        yield node, svc


async def _one_recovery(boot: Node, tasks: TaskService) -> float | None:
    """The cheap provider takes the lease and dies mid-run; seconds from the kill to the result."""
    started = trio.Event()
    killed_at: list[float] = []
    slow = TaskRegistry()

    @slow.task("spin", price=0.0)
    async def spin(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    victim_scope = trio.CancelScope()

    async def victim(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with victim_scope:
            async with _provider(boot.addrs, slow):
                task_status.started()
                await trio.sleep_forever()

    async def killer() -> None:
        await started.wait()
        killed_at.append(trio.current_time())
        victim_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(victim)
        async with _provider(boot.addrs, _fallback()):
            await tasks.wait_for_providers(6, timeout=60)
            nursery.start_soon(killer)
            x = torch.ones(2, 2)
            await tasks.run_task(
                "spin", {"x": x}, {}, enough_offers=2, offer_window=15.0, lease_ttl=4.0, deadline=120
            )
            done = trio.current_time()
        nursery.cancel_scope.cancel()
    # None: the victim's offer did not arrive in time, so the healthy provider ran it at once
    return done - killed_at[0] if killed_at else None


def _samples(quick: bool) -> dict[str, int]:
    return {
        "lease": 10 if quick else 60,
        "map_items": 48 if quick else 192,
        "map_reps": 1 if quick else 3,
        "kills": 1 if quick else 3,
    }


async def _steady(
    rnode: Node, tasks: TaskService, targets: list[str], quick: bool, out: dict[str, Any]
) -> None:
    """The rows that need no fault: stream round trips to ``targets``, leases, a map of small tasks."""
    n = _samples(quick)
    a = torch.ones(2, 2)
    await tasks.run_task("matmul", {"a": a, "b": a}, {})  # warm-up: connections, mesh
    for i in range(n["lease"]):
        t0 = trio.current_time()
        s = await rnode.open_stream(targets[i % len(targets)], ECHO)
        await s.send_frame(b"x")
        await s.recv_frame(64)
        out["rtt_ms"].append((trio.current_time() - t0) * 1000)
        await s.close()

    items = [({"a": a, "b": a}, {}) for _ in range(n["map_items"])]
    for session, tag in ((0.0, "_nosession"), (None, "")):  # one-shot leases first: the old path
        for _ in range(n["lease"]):
            r = await tasks.run_task("matmul", {"a": a, "b": a}, {}, session=session)
            out["lease_ms" + tag].append(r.lease_seconds * 1000)
        for _ in range(n["map_reps"]):
            t0, cpu0 = trio.current_time(), time.process_time()
            results = await tasks.map_tasks(
                "matmul", items, parallel=PARALLEL, offer_window=0.3, enough_offers=4, session=session
            )
            out["tasks_per_s" + tag].append(len(results) / (trio.current_time() - t0))
            # the requester's own CPU per task: what bounds tasks_per_s on a core of its own
            out["cpu_ms" + tag].append((time.process_time() - cpu0) * 1000 / len(results))
            out["providers_used"] = len({r.provider for r in results})  # type: ignore[union-attr]


def _empty() -> dict[str, Any]:
    return {
        "rtt_ms": [],
        "lease_ms": [],
        "lease_ms_nosession": [],
        "tasks_per_s": [],
        "tasks_per_s_nosession": [],
        "cpu_ms": [],
        "cpu_ms_nosession": [],
        "recover_s": [],
        "recover_misses": 0,
    }


async def _measure(quick: bool) -> dict[str, Any]:
    kills = _samples(quick)["kills"]
    out = _empty()
    async with open_node(role="bootstrap", **OPTS) as boot, contextlib.AsyncExitStack() as stack:
        providers = [await stack.enter_async_context(_provider(boot.addrs)) for _ in range(4)]
        rnode = await stack.enter_async_context(open_node(bootstrap=boot.addrs, **OPTS))
        tasks = await stack.enter_async_context(open_tasks(rnode))
        await tasks.wait_for_providers(4, timeout=60)
        await _steady(rnode, tasks, [str(p[0].peer_id) for p in providers], quick, out)
        for _ in range(3 * kills):
            if len(out["recover_s"]) == kills:
                break
            seconds = await _one_recovery(boot, tasks)
            if seconds is None:
                out["recover_misses"] += 1
            else:
                out["recover_s"].append(seconds)
    out["rss_mib"] = peak_rss_mib()
    return out


# ---------------------------------------------------------------------------------------------
# Under --wan: every node a process in its own namespace
#
# The suite process (host namespace) only starts workers and reads their JSON lines. Peer 0
# holds the bootstrap node and the requester; peers 1..k each hold one provider (peer 1's also
# sells "spin" at price 1.0, the fallback); each recovery starts a victim process that sells
# "spin" at price 0.0 and SIGKILLs itself, after printing the time, when its run starts.


async def _requester_main(quick: bool, providers: int) -> None:
    out = _empty()
    async with (
        open_node(role="bootstrap", listen=listen_addrs(), **OPTS) as boot,
        open_node(bootstrap=boot.addrs, listen=listen_addrs(), **OPTS) as rnode,
        open_tasks(rnode) as tasks,
    ):
        say({"boot": boot.addrs[0]})
        targets = await tasks.wait_for_providers(providers, timeout=120)
        await _steady(rnode, tasks, targets, quick, out)
        say({"steady": out})
        while (line := (await trio.to_thread.run_sync(sys.stdin.readline)).split()) and line[0] == "recover":
            victim = line[1]
            with trio.fail_after(120):
                while victim not in tasks.providers():  # py-libp2p signals no change of peer_topics
                    await trio.sleep(0.05)
            x = torch.ones(2, 2)
            await tasks.run_task(
                "spin", {"x": x}, {}, enough_offers=2, offer_window=15.0, lease_ttl=4.0, deadline=120
            )
            say({"done_at": time.monotonic()})  # one clock for every process here
    say({"rss_mib": peak_rss_mib()})


async def _provider_main(boot: str, *, spin: bool, victim: bool) -> None:
    reg = _fallback() if spin else TaskRegistry()
    if victim:

        @reg.task("spin", price=0.0)
        def crash(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
            say({"killed_at": time.monotonic()})
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no goodbye on any stream
            raise AssertionError("unreachable")

    async with _provider([boot], reg) as (node, _):
        say({"peer": str(node.peer_id)})
        await trio.to_thread.run_sync(sys.stdin.read)  # until the suite closes our stdin


def _measure_wan(quick: bool, layout: dict[str, Any], *, recover: bool = True) -> dict[str, Any]:
    peers = layout["peers"]
    if len(peers) < 3:
        raise ValueError("the tasks suite under --wan needs at least 3 peers (--wan-peers)")
    kills = _samples(quick)["kills"] if recover else 0
    flag = ["--quick"] if quick else []
    me = "benchmarks.tasks"
    workers: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="p2pc-tasks-") as tmp:
        logs = Path(tmp)
        try:
            providers = ["--providers", str(len(peers) - 1)]
            req = Worker(peers[0], me, ["--worker", "requester", *providers, *flag], logs, name="requester")
            workers.append(req)
            boot = req.need("boot", 60)["boot"]
            for p in peers[1:]:
                spin = ["--spin"] if p["index"] == 1 else []
                args = ["--worker", "provider", "--boot", boot, *spin]
                workers.append(Worker(p, me, args, logs, name="provider"))
            out: dict[str, Any] = req.need("steady", 600)["steady"]
            for attempt in range(3 * kills):
                if len(out["recover_s"]) == kills:
                    break
                place = peers[1 + attempt % (len(peers) - 1)]
                victim = Worker(place, me, ["--worker", "victim", "--boot", boot], logs, name="victim")
                workers.append(victim)
                req.send(f"recover {victim.need('peer', 60)['peer']}")
                done = req.need("done_at", 180)["done_at"]
                killed = victim.expect("killed_at", 5)
                if killed is None:  # its offer came too late: the fallback ran it at once
                    out["recover_misses"] += 1
                else:
                    out["recover_s"].append(done - killed["killed_at"])
                victim.kill()
            req.send("quit")
            out["rss_mib"] = req.need("rss_mib", 60)["rss_mib"]
            return out
        finally:
            stop_all(workers)


def loopback_layout(providers: int = 4) -> dict[str, Any]:
    """A layout that puts each node in its own process on 127.0.0.1 (no namespaces): peer 0
    holds the bootstrap node and the requester, peers 1..``providers`` one provider each.

    Example::

        figures = _measure_wan(True, loopback_layout(4))
    """
    return {"peers": [{"index": i, "addr": None, "exec": []} for i in range(providers + 1)]}


def run(quick: bool = False, procs: bool = False, **options: Any) -> SuiteResult:
    """Run the suite and return its result (see the module docstring).

    Under ``--wan`` (a layout from the runner) every node is a process in its own namespace;
    with ``procs`` every node is a process on loopback (1 requester, 4 providers).
    Example::

        result = run(quick=True)
    """
    layout = wan_layout() or (loopback_layout(4) if procs else None)
    if layout is None:
        figures = trio.run(_measure, quick)
        procs, providers = 1, 4
    else:
        figures = _measure_wan(quick, layout)
        providers = len(layout["peers"]) - 1
        procs = providers + 1
    result = SuiteResult(
        "tasks",
        primary_metric="lease_ms",
        higher_is_better=False,
        options={"quick": quick, "providers": providers, "capacity_each": 2, "processes": procs},
    )
    base = result.config("libp2p_rtt", size="tiny", what="open stream + one framed round trip")
    base.baseline = "libp2p_rtt"
    for v in figures["rtt_ms"]:
        base.add("lease_ms", v)
    for tag, how in (("_nosession", "one-shot leases (session=0)"), ("", "sessions (the default)")):
        lease = result.config("request_to_lease" + tag, size="tiny", kind="matmul 2x2")
        lease.notes.append(how)
        for v in figures["lease_ms" + tag]:
            lease.add("lease_ms", v)
        lease.add("lease_ms_p50", statistics.median(figures["lease_ms" + tag]))
        lease.add("lease_ms_p99", percentile(figures["lease_ms" + tag], 99))
        small = result.config("small_tasks" + tag, size="map", kind="matmul 2x2", parallel=PARALLEL)
        small.notes.append(how)
        for v in figures["tasks_per_s" + tag]:
            small.add("tasks_per_s", v)
        for v in figures.get("cpu_ms" + tag, []):
            small.add("requester_cpu_ms", v)
        small.notes.append(f"providers used: {figures.get('providers_used')}")
    load = os.getloadavg()[0]
    for row in result.configs:
        row.notes.append(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores")
    rec = result.config("recover_killed", size="kill", lease_ttl_s=4.0)
    for v in figures["recover_s"]:
        rec.add("recover_s", v)
    if layout is None:
        rec.notes.append("kill = the provider's node exits mid-run; a stream reset or lease_ttl shows it")
    else:
        rec.notes.append("kill = the provider's process SIGKILLs itself when the run starts")
        where = "under --wan" if wan_layout() is not None else "on loopback (--procs)"
        for row in result.configs:
            row.notes.append(
                f"{where}: requester and bootstrap node in peer 0's namespace, {providers} providers "
                "in the others, each a process; rss_mib is the requester's"
            )
    if figures["recover_misses"]:
        rec.notes.append(
            f"{figures['recover_misses']} tries where the victim's offer came too late (not counted)"
        )
    for row in result.configs:
        row.add("rss_mib", figures["rss_mib"])
    result.add_ratios()
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.tasks [--quick] [--out PATH]``."""
    parser = argparse.ArgumentParser(prog="benchmarks.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run")
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    parser.add_argument(
        "--procs",
        action="store_true",
        help="every node its own process on loopback (1 requester, 4 providers)",
    )
    parser.add_argument("--worker", choices=["requester", "provider", "victim"], help=argparse.SUPPRESS)
    parser.add_argument("--providers", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--boot", help=argparse.SUPPRESS)
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "requester":
        trio.run(_requester_main, args.quick, args.providers)
        return 0
    if args.worker in ("provider", "victim"):
        trio.run(functools.partial(_provider_main, args.boot, spin=args.spin, victim=args.worker == "victim"))
        return 0
    result = run(args.quick, procs=args.procs)
    metrics = [
        "lease_ms",
        "lease_ms_p50",
        "lease_ms_p99",
        "tasks_per_s",
        "requester_cpu_ms",
        "recover_s",
        "rss_mib",
    ]
    print_table(result, metrics)
    path = write_results(result, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
