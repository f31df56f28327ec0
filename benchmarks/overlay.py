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

Runnable as ``python -m benchmarks.overlay [--quick] [--out PATH] [--sizes 8,32]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import time
from typing import Any

import trio

from benchmarks.harness import SuiteResult, print_table, write_results
from p2pcompute.capacity.model import Capacity, GpuInfo
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
        with trio.move_on_after(deadline):
            for node in nodes:
                await node.wait_for_peers(n - 1, timeout=deadline, role="peer")
        await trio.sleep(2.0)  # a couple of heartbeats so meshes settle

        arrivals: dict[str, list[float]] = {}
        for node in nodes:
            original = node._validate_advert

            def wrapped(forwarder: Any, msg: Any, _orig: Any = original, _me: str = node.peer_id) -> bool:
                ok = bool(_orig(forwarder, msg))
                if ok:
                    arrivals.setdefault(bytes(msg.from_id).hex(), []).append(time.perf_counter())
                return ok

            node.pubsub.set_topic_validator(node._advert_topic, wrapped, False)

        raw_arrivals: list[float] = []

        async def on_raw(sender: str, data: bytes) -> None:
            raw_arrivals.append(time.perf_counter())

        for node in nodes:
            node.subscribe("bench", on_raw)
        await trio.sleep(2.0)
        size = len(nodes[0]._current_advert or b"x" * 600)
        for _ in range(samples):
            src = rng.choice(nodes)
            key = bytes(src.host.get_id().to_bytes()).hex()
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


def run(quick: bool = False, **options: Any) -> SuiteResult:
    """Run the suite and return its result (see the module docstring)."""
    sizes = options.get("sizes") or ([8] if quick else [8, 32, 64])
    samples = options.get("samples") or (3 if quick else 8)
    deadline = float(options.get("deadline") or 60.0)
    result = SuiteResult(
        "overlay",
        primary_metric="advert_p100_s",
        higher_is_better=False,
        options={"sizes": sizes, "samples": samples, "deadline_s": deadline, "processes": 1},
    )
    rng = random.Random(7)
    for n in sizes:
        figures = trio.run(_measure, n, samples, deadline, rng)
        for label, key, base in (("advert", "advert", None), ("raw_topic", "raw", "raw_topic")):
            row = result.config(f"{label}_n{n}", size=n, nodes=n, processes=1)
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
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    result = run(args.quick, sizes=sizes, samples=args.samples, deadline=args.deadline)
    print_table(result)
    path = write_results(result, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
