"""Overlay suite: how fast a capacity advert reaches a swarm, join rate, memory per node.

For each N (8, 32, 64; ``--quick``: 8) one process runs a bootstrap node and N peers
(real py-libp2p hosts on 127.0.0.1, joined one after another through the bootstrap
node). Figures:

* ``advert_p95_s`` / ``advert_p100_s``: from just before ``readvertise()`` on a random
  node until 95 % / 100 % of the other N-1 peers have accepted the new advert (their
  GossipSub validator ran our full check: signature, signer, freshness, sequence);
* ``delivered``: the fraction of peers that got it within the deadline;
* ``join_rate``: peers joined per second (open_node returning, i.e. connected to the
  bootstrap node plus ``target_connections`` others after peer exchange);
* ``rss_per_node_mib``: growth of this process's resident memory per node.

Baseline, same run and same nodes: ``raw_topic`` publishes a message of the same size
on an application topic with no validator (``node.publish``); its ratio shows what our
advert checks cost. Adverts are otherwise quiet (interval 10 min) so only the measured
one is in flight.

Under ``--wan`` the nodes are spread over the emulated network's namespaces, one worker process
per namespace (a site), so adverts cross the shaped link between sites; arrival times are taken
on one system-wide monotonic clock.

Runnable as ``python -m benchmarks.overlay [--quick] [--out PATH] [--sizes 8,32]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from benchmarks.procs import Worker, listen_addrs, say, stop_all
from p2pcompute.benchresults import SuiteResult, print_table, wan_layout, write_results
from p2pcompute.capacity.model import Capacity, GpuInfo
from p2pcompute.errors import PeerTimeout
from p2pcompute.overlay import Node, open_node

CAP = Capacity(
    cpu_cores=16,
    ram_total=128 << 30,
    ram_available=100 << 30,
    platform="bench",
    cuda_usable=True,
    gpus=(
        GpuInfo(index=0, name="NVIDIA H200", uuid="GPU-bench", memory_total=141 << 30, memory_free=140 << 30),
    ),
)
QUIET: dict[str, Any] = {
    "advert_interval": 600.0,
    "advert_ttl": 1800.0,
    "max_advert_ttl": 1800.0,  # accepted from the other (equally quiet) nodes of the bench
    "probe_interval": 600.0,
    "capacity": CAP,
}


def _rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _quantile_time(arrivals: list[float], t0: float, total: int, q: float) -> float:
    need = math.ceil(q * total)
    if len(arrivals) < need:
        return math.inf
    return sorted(arrivals)[need - 1] - t0


def _hook_adverts(node: Node, seen: Callable[[str], None]) -> None:
    """Call ``seen(origin peer id)`` for every advert ``node``'s full check accepts."""
    from libp2p.peer.id import ID

    original = node._validate_advert

    def wrapped(forwarder: Any, msg: Any) -> bool:
        ok = bool(original(forwarder, msg))
        if ok:
            seen(ID(bytes(msg.from_id)).to_base58())
        return ok

    node.pubsub.set_topic_validator(node._advert_topic, wrapped, False)


async def _settle(nodes: list[Node], others: int, deadline: float) -> None:
    """Wait (at most ``deadline``) until every node knows ``others`` peers, then two heartbeats."""
    with trio.move_on_after(deadline):
        for node in nodes:
            with contextlib.suppress(PeerTimeout):
                await node.wait_for_peers(others, timeout=deadline, role="peer")
    await trio.sleep(2.0)  # a couple of heartbeats so meshes settle


async def _measure(n: int, samples: int, deadline: float, rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {"advert": [], "raw": []}
    rss0 = _rss_mib()
    async with contextlib.AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_node(role="bootstrap", **QUIET))
        nodes: list[Node] = []
        t_join = time.perf_counter()
        for _ in range(n):
            nodes.append(await stack.enter_async_context(open_node(bootstrap=boot.addrs, **QUIET)))
        out["join_s"] = time.perf_counter() - t_join
        out["rss_per_node_mib"] = (_rss_mib() - rss0) / (n + 1)
        # let every table fill (peer exchange + first adverts) before measuring
        await _settle(nodes, n - 1, deadline)

        arrivals: dict[str, list[float]] = {}
        for node in nodes:
            _hook_adverts(node, lambda origin: arrivals.setdefault(origin, []).append(time.perf_counter()))

        raw_arrivals: list[float] = []

        async def on_raw(sender: str, data: bytes) -> None:
            raw_arrivals.append(time.perf_counter())

        for node in nodes:
            node.subscribe("bench", on_raw)
        await trio.sleep(2.0)
        size = len(nodes[0]._current_advert or b"x" * 600)
        for _ in range(samples):
            src = rng.choice(nodes)
            key = src.peer_id
            arrivals.pop(key, None)
            t0 = time.perf_counter()
            await src.readvertise()
            with trio.move_on_after(deadline):
                while len(arrivals.get(key, [])) < n - 1:
                    await trio.sleep(0.005)
            got = arrivals.get(key, [])
            out["advert"].append(
                (
                    _quantile_time(got, t0, n - 1, 0.95),
                    _quantile_time(got, t0, n - 1, 1.0),
                    min(len(got), n - 1) / (n - 1),
                )
            )
            raw_arrivals.clear()
            t0 = time.perf_counter()
            await src.publish("bench", os.urandom(size))
            with trio.move_on_after(deadline):
                while len(raw_arrivals) < n - 1:
                    await trio.sleep(0.005)
            out["raw"].append(
                (
                    _quantile_time(raw_arrivals, t0, n - 1, 0.95),
                    _quantile_time(raw_arrivals, t0, n - 1, 1.0),
                    min(len(raw_arrivals), n - 1) / (n - 1),
                )
            )
            await trio.sleep(0.5)
    return out


# ---------------------------------------------------------------------------------------------
# Under --wan: the nodes spread over the namespaces, one worker process per namespace (a "site")
#
# Worker protocol (stdin lines; each answered by one JSON line, watchers answer later):
#   settle N            wait until every local node knows N-1 peers      -> {"settled": fraction}
#   arm KIND KEY SRC    start counting arrivals of message KEY (KIND advert: KEY is the source's
#                       peer id; raw: a hex tag) from node SRC on the local nodes other than SRC
#                       -> {"armed": KEY}, later {"arrivals": KEY, "times": [...]} once every one
#                       of them has it, or at the deadline
#   fire KIND I KEY     local node I re-publishes its advert / publishes the tagged raw message
#                                                                       -> {"t0": monotonic time}
# Times are time.monotonic(), one system-wide clock for every process on the machine.

_TAG = 16  # bytes of a raw message that identify it


async def _site_main(local: int, boot_addr: str, deadline: float) -> None:
    rss0 = _rss_mib()
    arrivals: dict[str, dict[str, float]] = {}  # message key -> {receiving node: first arrival}

    def seen(at: str, key: str) -> None:
        if key in arrivals:
            arrivals[key].setdefault(at, time.monotonic())

    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Node] = []
        if not boot_addr:
            boot = await stack.enter_async_context(
                open_node(role="bootstrap", listen=listen_addrs(), **QUIET)
            )
            boot_addr = boot.addrs[0]
            say({"boot": boot_addr})
        t = time.monotonic()
        for _ in range(local):
            node = open_node(bootstrap=[boot_addr], listen=listen_addrs(), **QUIET)
            nodes.append(await stack.enter_async_context(node))
        join_s = time.monotonic() - t
        size = len(nodes[0]._current_advert or b"x" * 600)
        for node in nodes:
            _hook_adverts(node, functools.partial(seen, node.peer_id))

            async def on_raw(sender: str, data: bytes, _me: str = node.peer_id) -> None:
                seen(_me, data[:_TAG].hex())

            node.subscribe("bench", on_raw)
        say({"joined": [n.peer_id for n in nodes], "join_s": join_s, "rss_mib": _rss_mib() - rss0})

        async def watch(key: str, source: str) -> None:
            others = {n.peer_id for n in nodes} - {source}  # a publisher does not count itself
            with trio.move_on_after(deadline):
                while not others <= arrivals[key].keys():  # validators signal nothing: poll
                    await trio.sleep(0.005)
            got = arrivals.pop(key)
            say({"arrivals": key, "times": [t for who, t in got.items() if who in others]})

        async with trio.open_nursery() as nursery:
            while cmd := (await trio.to_thread.run_sync(sys.stdin.readline)).split():
                if cmd[0] == "settle":
                    await _settle(nodes, int(cmd[1]) - 1, deadline)
                    known = sum(sum(r.role == "peer" for r in n.peers.alive()) for n in nodes)
                    say({"settled": known / (len(nodes) * (int(cmd[1]) - 1))})
                elif cmd[0] == "arm":
                    key = cmd[2]
                    arrivals[key] = {}
                    nursery.start_soon(watch, key, cmd[3])
                    say({"armed": key})
                elif cmd[0] == "fire":
                    src = nodes[int(cmd[2])]
                    t0 = time.monotonic()
                    if cmd[1] == "advert":
                        await src.readvertise()
                    else:
                        await src.publish("bench", bytes.fromhex(cmd[3]) + os.urandom(max(0, size - _TAG)))
                    say({"t0": t0})
            nursery.cancel_scope.cancel()


def _measure_wan(
    n: int, samples: int, deadline: float, rng: random.Random, layout: dict[str, Any]
) -> dict[str, Any]:
    sites = layout["peers"][: max(1, min(n, len(layout["peers"])))]
    counts = [n // len(sites) + (i < n % len(sites)) for i in range(len(sites))]
    out: dict[str, Any] = {"advert": [], "raw": [], "sites": len(sites), "per_site": counts}
    me = "benchmarks.overlay"
    workers: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="p2pc-overlay-") as tmp:
        logs = Path(tmp)
        try:
            wait = ["--deadline", str(deadline)]
            first = Worker(sites[0], me, ["--site", str(counts[0]), *wait], logs, name="site")
            workers.append(first)
            boot = first.need("boot", 60)["boot"]
            for site, k in zip(sites[1:], counts[1:], strict=True):
                workers.append(Worker(site, me, ["--site", str(k), "--boot", boot, *wait], logs, name="site"))
            joined = [w.need("joined", 120 + 5 * n) for w in workers]
            ids = [(wi, li, pid) for wi, j in enumerate(joined) for li, pid in enumerate(j["joined"])]
            out["join_s"] = max(j["join_s"] for j in joined)
            out["rss_per_node_mib"] = sum(j["rss_mib"] for j in joined) / n
            for w in workers:
                w.send(f"settle {n}")
            out["settled"] = [w.need("settled", 2 * deadline + 30)["settled"] for w in workers]
            for _ in range(samples):
                wi, li, pid = rng.choice(ids)
                for kind in ("advert", "raw"):
                    key = pid if kind == "advert" else os.urandom(_TAG).hex()
                    for w in workers:
                        w.send(f"arm {kind} {key} {pid}")
                    for w in workers:
                        w.need("armed", 30)
                    workers[wi].send(f"fire {kind} {li} {key}")
                    t0 = workers[wi].need("t0", 60)["t0"]
                    got = [t for w in workers for t in w.need("arrivals", deadline + 30)["times"]]
                    out[kind].append(
                        (
                            _quantile_time(got, t0, n - 1, 0.95),
                            _quantile_time(got, t0, n - 1, 1.0),
                            min(len(got), n - 1) / (n - 1),
                        )
                    )
                time.sleep(0.5)
            return out
        finally:
            stop_all(workers)


def run(quick: bool = False, **options: Any) -> SuiteResult:
    """Run the suite and return its result (see the module docstring).

    Under ``--wan`` (a layout from the runner) the nodes are spread over the namespaces, one
    worker process per namespace. Example::

        result = run(quick=True, sizes=[8])
    """
    sizes = options.get("sizes") or ([8] if quick else [8, 32, 64])
    samples = options.get("samples") or (3 if quick else 8)
    deadline = float(options.get("deadline") or 60.0)
    layout = wan_layout()
    result = SuiteResult(
        "overlay",
        primary_metric="advert_p100_s",
        higher_is_better=False,
        options={
            "sizes": sizes,
            "samples": samples,
            "deadline_s": deadline,
            "processes": 1 if layout is None else "one per namespace",
        },
    )
    rng = random.Random(7)
    for n in sizes:
        if layout is None:
            figures = trio.run(_measure, n, samples, deadline, rng)
            procs = 1
        else:
            figures = _measure_wan(n, samples, deadline, rng, layout)
            procs = figures["sites"]
        for label, key, base in (("advert", "advert", None), ("raw_topic", "raw", "raw_topic")):
            row = result.config(f"{label}_n{n}", size=n, nodes=n, processes=procs)
            if layout is not None:
                row.params["nodes_per_site"] = figures["per_site"]
                row.notes.append(
                    f"under --wan: {n} nodes over {procs} namespaces, one process each "
                    f"(nodes {figures['per_site']}; the bootstrap node in the first); nodes of one "
                    "namespace reach each other without crossing the emulated link; join_rate counts "
                    "the sites joining at once"
                )
                if min(figures["settled"]) < 1:
                    row.notes.append(f"views before measuring: {[round(x, 3) for x in figures['settled']]}")
            row.baseline = base
            censored = 0
            for p95, p100, frac in figures[key]:
                censored += math.isinf(p100)
                # a message that missed the deadline counts as the deadline (censored; see notes)
                row.add("advert_p95_s", min(p95, deadline))
                row.add("advert_p100_s", min(p100, deadline))
                row.add("delivered", frac)
            row.add("join_rate", n / figures["join_s"])
            row.add("rss_per_node_mib", figures["rss_per_node_mib"])
            if censored:
                row.notes.append(
                    f"{censored} of {len(figures[key])} messages had not reached every node after the "
                    f"{deadline:.0f} s deadline; their times are recorded as the deadline"
                )
    result.add_ratios()
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.overlay [--quick] [--out PATH] [--sizes 8,32,64]``."""
    parser = argparse.ArgumentParser(prog="benchmarks.overlay", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=8 only, 3 samples")
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    parser.add_argument("--sizes", help="comma-separated swarm sizes (default 8,32,64)")
    parser.add_argument("--samples", type=int, help="adverts measured per size")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds to wait for each message")
    parser.add_argument("--site", type=int, help=argparse.SUPPRESS)  # a worker under --wan: its node count
    parser.add_argument("--boot", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.site is not None:
        trio.run(_site_main, args.site, args.boot, args.deadline)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    result = run(args.quick, sizes=sizes, samples=args.samples, deadline=args.deadline)
    print_table(result)
    path = write_results(result, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
