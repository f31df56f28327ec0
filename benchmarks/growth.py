"""Overlay growth suite: how advert propagation and memory per node grow from 8 to 256 nodes.

For each swarm size ``n`` a fresh worker process (``python -m benchmarks.growth --worker n``)
runs ``n`` :class:`p2pcompute.overlay.Node` instances in one trio loop (a bootstrap node plus
``n - 1`` peers joining through it, fixed CPU-only capacity, no probing) and measures:

* ``startup_s``: starting the ``n - 1`` peers one after another (each joins through the bootstrap);
* ``view_convergence_s``: from the first peer starting until every node knows every other, and
  ``view_fraction``, the share of (node, peer) pairs known when that ends or when its deadline
  (:func:`converge_limit`) passes -- a swarm that does not converge is reported, not waited on;
* ``advert_p50_s`` / ``advert_last_s`` (primary, lower is better): after that, a newcomer joins,
  and each node's time until the newcomer's advert is in its peer table (median, last), with
  ``advert_fraction`` the share of nodes it reached within ``ADVERT_LIMIT``;
* ``rss_per_node_mib``: the worker's RSS growth divided by ``n`` (after convergence);
* ``cpu_s``: the worker's CPU time for the whole size, teardown excluded.

The smallest size is the baseline (``n<smallest>``), so ``ratio_vs_n8`` reads "how much slower
than 8 nodes". A power law ``figure = a * n**b`` is fitted by least squares on log-log medians
for ``advert_last_s`` (``options.fit``, drawn on the sweep plot) and for ``rss_per_node_mib``,
``view_convergence_s`` and ``startup_s`` (``options.fits``), over the sizes that have the figure.
All nodes share one process and two cores here, so the times include CPU contention between
nodes: they bound what one machine can host, and the curve is steeper than a swarm of separate
machines would show.

Imports :mod:`benchmarks.harness`, :mod:`p2pcompute` and the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from p2pcompute.benchresults import SuiteResult, print_table, write_results

FULL_SIZES = (8, 16, 32, 64, 128, 256)
QUICK_SIZES = (4, 8)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _worker(n: int, timeout: float, out: dict[str, Any]) -> None:
    import contextlib

    import trio

    from p2pcompute.capacity.model import Capacity
    from p2pcompute.overlay.node import open_node

    cap = Capacity(cpu_cores=2, ram_total=8 << 30, ram_available=4 << 30, platform="bench")
    # dial_timeout: with dozens of nodes on one loop, a busy bootstrap answers dials slowly.
    # advert_interval: each node publishes at start and on change, so a re-publish adds nothing
    # to what is measured here, while its cost grows as n^2 in one process (py-libp2p spends
    # about 15 ms of CPU per receiving node per advert): at 5 s, 32 nodes would need about
    # 3 cores for re-publishing alone (32 / 5 s x 31 x 15 ms), and they never converged
    # (docs/benchmarks.md, "The growth suite").
    opts: dict[str, Any] = {
        "capacity": cap,
        "advert_interval": REPUBLISH_S,
        "advert_ttl": 3 * REPUBLISH_S,
        "max_advert_ttl": 3 * REPUBLISH_S,
        "dial_timeout": 60.0,
    }
    rss0, cpu0 = _rss_mib(), _cpu_s()
    out["nodes"] = n
    with trio.fail_after(timeout):
        async with contextlib.AsyncExitStack() as stack:
            boot = await stack.enter_async_context(open_node(role="bootstrap", **opts))
            nodes = [boot]
            t0 = time.perf_counter()
            for _ in range(n - 1):
                nodes.append(await stack.enter_async_context(open_node(bootstrap=[boot.addrs[0]], **opts)))
            out["startup_s"] = time.perf_counter() - t0
            ids = {node.peer_id for node in nodes}

            def known() -> int:
                return sum(len({r.peer_id for r in node.peers.alive()} & ids) for node in nodes)

            # A benchmark may poll, but known() costs n^2 set lookups on the loop it measures:
            # poll every 20 ms up to 32 nodes, then less often (0.33 s at 128, 1 s at 224 and
            # up), far below the convergence times measured. Each phase has its own deadline so
            # that a swarm that does not converge is reported, not hung on.
            poll = min(1.0, max(0.02, 2e-5 * n * n))
            with trio.move_on_after(converge_limit(n)):
                while known() < n * (n - 1):
                    await trio.sleep(poll)
            out["view_fraction"] = known() / (n * (n - 1))
            if out["view_fraction"] == 1.0:
                out["view_convergence_s"] = time.perf_counter() - t0
            out["rss_per_node_mib"] = (_rss_mib() - rss0) / n
            t1 = time.perf_counter()
            newcomer = await stack.enter_async_context(open_node(bootstrap=[boot.addrs[0]], **opts))
            seen: dict[str, float] = {}
            with trio.move_on_after(ADVERT_LIMIT):
                while len(seen) < n:
                    now = time.perf_counter() - t1
                    for node in nodes:
                        if node.peer_id not in seen and node.peers.get(newcomer.peer_id) is not None:
                            seen[node.peer_id] = now
                    await trio.sleep(0.005)
            out["advert_fraction"] = len(seen) / n
            delays = sorted(seen.values())
            if delays:
                out["advert_p50_s"] = delays[len(delays) // 2]
            if len(seen) == n:
                out["advert_last_s"] = delays[-1]
            out["cpu_s"] = _cpu_s() - cpu0  # before teardown: shutting n nodes down is not measured


ADVERT_LIMIT = 60.0
REPUBLISH_S = 900.0  # longer than any size's run: adverts go out at start-up only
METRICS = (
    "advert_last_s",
    "advert_p50_s",
    "advert_fraction",
    "view_convergence_s",
    "view_fraction",
    "startup_s",
    "rss_per_node_mib",
    "cpu_s",
)


def converge_limit(n: int) -> float:
    """Seconds allowed for every node to know every other, after start-up (generous, grows with n)."""
    return 60.0 + 2.0 * n


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _run_worker(n: int, timeout: float) -> dict[str, Any]:
    """Run one size; tolerate only py-libp2p's pubsub shutdown race, and only once every figure is in."""
    import trio

    out: dict[str, Any] = {}
    try:
        trio.run(_worker, n, timeout, out)
    except BaseException as exc:
        leaves = _leaves(exc)
        if any(isinstance(e, trio.TooSlowError) for e in leaves):
            raise SystemExit(f"{n} nodes: not done within {timeout:.0f} s: {out}") from None
        if "cpu_s" not in out:
            for e in leaves:
                print(f"growth worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            print(f"growth worker: measured before the failure: {json.dumps(out)}", file=sys.stderr)
            raise
        # Every figure was taken before teardown began; what fails while n nodes shut down at
        # once is reported beside them. Seen: py-libp2p 0.8.1's pubsub handlers scheduling work
        # on their closing service nursery (RuntimeError "Nursery is closed to new arrivals").
        kinds = sorted({f"{type(e).__name__}({str(e)[:60]!r})" for e in leaves})
        out["teardown_error"] = f"{len(leaves)} error(s) in py-libp2p while shutting down: {', '.join(kinds)}"
    return out


def fit_power_law(points: Sequence[tuple[float, float]]) -> dict[str, float] | None:
    """Least-squares fit of ``y = a * x**b`` on log-log axes; ``None`` with fewer than 2 usable points.

    Example::

        >>> f = fit_power_law([(8, 0.1), (16, 0.2), (32, 0.4)])
        >>> round(f["b"], 6), round(f["a"], 6)
        (1.0, 0.0125)
    """
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    a = math.exp(my - b * mx)
    ss_res = sum((p[1] - (math.log(a) + b * p[0])) ** 2 for p in pts)
    ss_tot = sum((p[1] - my) ** 2 for p in pts)
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def run(
    quick: bool = False, *, sizes: Sequence[int] | None = None, reps: int = 1, timeout: float | None = None
) -> SuiteResult:
    """Run the growth suite (each size in a fresh worker process); see the module docstring.

    Example::

        result = run(sizes=[8, 16, 32])
    """
    sizes = sorted(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    result = SuiteResult(
        "growth",
        "advert_last_s",
        higher_is_better=False,
        options={"quick": quick, "sizes": sizes, "reps": reps},
    )
    first = f"n{sizes[0]}"
    for n in sizes:
        row = result.config(f"n{n}", nodes=n)
        if row.name == first:
            row.baseline = first
        for _ in range(reps):
            limit = timeout or (ADVERT_LIMIT + converge_limit(n) + 120 + 10 * n)
            got = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.growth",
                    "--worker",
                    str(n),
                    "--worker-timeout",
                    str(limit),
                ],
                capture_output=True,
                text=True,
                timeout=limit + 60,
                check=False,
            )
            if got.returncode != 0:
                # Recorded, not raised: the sizes that did run still make a curve, and the note
                # says where the overlay (or this machine) gave out.
                why = [ln for ln in got.stderr.splitlines() if ln.startswith(("growth worker", f"{n} nodes"))]
                reason = " / ".join(dict.fromkeys(why)) or got.stderr.strip()[-500:]
                row.notes.append(f"worker failed (exit {got.returncode}): {reason}")
                print(f"growth: {n} nodes failed: {reason}", flush=True)
                continue
            figures = json.loads(got.stdout.strip().splitlines()[-1])
            for metric in METRICS:
                if metric in figures:
                    row.add(metric, figures[metric])
            if figures["view_fraction"] < 1:
                row.notes.append(
                    f"views did not converge within {converge_limit(n):.0f} s after start-up: "
                    f"{figures['view_fraction']:.1%} of node pairs known"
                )
            if figures["advert_fraction"] < 1:
                row.notes.append(
                    f"newcomer's advert reached {figures['advert_fraction']:.1%} of nodes "
                    f"in {ADVERT_LIMIT:.0f} s"
                )
            if "teardown_error" in figures:
                row.notes.append("after measuring, at teardown: " + figures["teardown_error"])
        print(f"growth: {n} nodes finished", flush=True)
    result.add_ratios(match=lambda a, b: True)
    fits: dict[str, Any] = {}
    for metric in ("advert_last_s", "rss_per_node_mib", "view_convergence_s", "startup_s"):
        fit = fit_power_law(
            [(float(c.params["nodes"]), c.median(metric)) for c in result.configs if c.samples.get(metric)]
        )
        if fit is not None:
            fits[metric] = {"metric": metric, **fit}
    if "advert_last_s" in fits:
        result.options["fit"] = fits["advert_last_s"]
    result.options["fits"] = fits
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.growth [--quick] [--out PATH] [--sizes 8,16,...] [--reps N]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    parser.add_argument("--sizes", help=f"comma-separated node counts (default {FULL_SIZES})")
    parser.add_argument("--reps", type=int, default=1, help="worker runs per size (default 1)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_run_worker(args.worker, args.worker_timeout)), flush=True)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
    if sizes and any(not 2 <= s <= 1024 for s in sizes):
        parser.error("sizes must be between 2 and 1024 nodes")
    result = run(args.quick, sizes=sizes, reps=args.reps)
    if not any(c.samples.get("advert_last_s") for c in result.configs):
        print_table(result)
        print("growth: error: at no size did an advert reach every node", file=sys.stderr)
        return 1
    print_table(result)
    for fit in result.options["fits"].values():
        print(f"fit: {fit['metric']} = {fit['a']:.4g} * n^{fit['b']:.3f}  (r2 {fit['r2']:.3f})", flush=True)
    path = write_results(result, args.out)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
