"""Renting workers: outer-step overhead, verification overhead, utilization, small-task figures.

Setup of the training rows: one bootstrap node, two providers selling the built-in ``lm``
recipe and one requester running a :class:`~p2pcompute.rent.RentJob`, all real py-libp2p
hosts on 127.0.0.1 in this process (two cores' worth of Python for everything, so the
figures are pessimistic). The model is a small decoder-only LM; each segment is H inner steps.

Rows:

* ``local_segment``: H inner steps of the same model on the same shard run here, with no
  network (after a warm-up; the least of four runs is the floor used below): the compute of
  one segment, which is what a swarm peer does per outer step before its all-reduce (the
  floor under any outer step); ``outer_s``;
* ``rent_outer_step``: an outer step of the rent path, no verification (``verify_fraction=0``):
  ``outer_s``, ``overhead_s`` (``outer_s`` minus the local segment: negotiation on the open
  session, state and data out, pseudo-gradient back, receipts, DiLoCo's outer step) and
  ``utilization`` (local segment seconds over ``outer_s``: the share of the time it is leased
  that a worker computes);
* ``rent_verify10``: the same with 10% of segments re-run locally (``verify_fraction=0.1``,
  ``verify_first=False``, a fixed seed); ``verify_overhead`` is its ``outer_s`` over the
  unverified one, minus 1; ``verified`` counts the segments re-run;
* ``rent_overlapped``: the same steps through ``RentJob.train`` with ``overlap=True`` (each worker
  starts its next segment when it returns one; the update lands while it runs): ``outer_s`` is
  the time between two updates landing;
* ``rent_hetero_blocking`` / ``rent_hetero_overlapped``: both again with the second worker slower
  by one local segment's time per segment (a card half as fast): ``outer_s`` and
  ``utilization`` (here the fast worker's compute over the step's time);
* ``small_tasks``: issue #15's small-task figures, every node its own process on loopback
  (1 requester, 4 providers, ``benchmarks.tasks --procs``): ``tasks_per_s`` (a ``map_tasks`` of
  2x2 matmuls) and ``lease_p50_s`` (request to grant of sequential ``run_task`` calls), with
  sessions (the default) and with one-shot leases (``*_nosession``).

* ``swarm_outer_step``: the swarm path on the same model and shards: two ``Swarm`` peers in this
  process (each loop in its own thread) running DiLoCo with the same H over the real all-reduce;
  ``outer_s`` is H inner steps plus the round, ``overhead_s`` and ``utilization`` as above, so
  the rent path's overhead reads against the swarm's (both pay the same compute).

Run: ``python -m benchmarks.rent [--quick] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import threading
import time
from typing import Any

import torch
import trio

from benchmarks.tasks import _measure_wan, loopback_layout
from p2pcompute.benchresults import SuiteResult, peak_rss_mib, print_table, write_results
from p2pcompute.capacity.model import Capacity
from p2pcompute.overlay import open_node
from p2pcompute.rent import RentJob, RentOptions, TrainingWorker, builtin_book, builtin_recipes
from p2pcompute.rent.segment import micro_batches, run_segment, state_of
from p2pcompute.tasks.driver import open_tasks, serve_tasks
from p2pcompute.training.swarm import Swarm

CAP = Capacity(cpu_cores=2, ram_total=8 << 30, ram_available=4 << 30, platform="bench")
CFG = {"layers": 2, "width": 64, "heads": 4, "vocab": 64, "context": 32, "lr": 3e-3}
WORKERS = 2


def _sizes(quick: bool) -> dict[str, int]:
    return {"steps": 5 if quick else 20, "outer": 3 if quick else 8, "batch": 4}


def _shards(n: int, seed: int, steps: int, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ctx = CFG["context"] + 1
    return [{"tokens": torch.randint(0, CFG["vocab"], (steps * batch, ctx), generator=g)} for _ in range(n)]


def _local_segment(steps: int, batch: int) -> float:
    recipe = builtin_recipes()["lm"]
    cfg, model = recipe.make(CFG)
    shard = _shards(1, 99, steps, batch)[0]
    t0 = time.perf_counter()
    run_segment(recipe, cfg, state_of(model), shard, steps, codec="bf16")
    return time.perf_counter() - t0


class _SlowerWorker(TrainingWorker):
    """A worker on a slower card: each segment takes ``pause`` seconds more (it sleeps in its thread)."""

    def __init__(self, pause: float) -> None:
        super().__init__(builtin_book(["lm"], price=0.01))
        self.pause = pause

    def run(self, recipe: Any, tensors: Any, params: Any) -> Any:
        time.sleep(self.pause)
        return super().run(recipe, tensors, params)


async def _rent_steps(
    verify: float, quick: bool, *, overlap: bool = False, slower: float = 0.0
) -> dict[str, Any]:
    """Outer steps of a RentJob; with ``overlap`` through ``train`` (a step's seconds are then the
    time between two updates landing); ``slower``: the second worker's extra seconds per segment."""
    n = _sizes(quick)
    out: dict[str, Any] = {"outer_s": [], "verified": 0, "workers": 0}
    async with open_node(role="bootstrap", capacity=CAP) as boot, contextlib.AsyncExitStack() as stack:
        for i in range(WORKERS):
            pnode = await stack.enter_async_context(open_node(bootstrap=boot.addrs, capacity=CAP))
            worker = _SlowerWorker(slower if i == 1 else 0.0)
            await stack.enter_async_context(serve_tasks(pnode, worker.registry()))
        rnode = await stack.enter_async_context(open_node(bootstrap=boot.addrs, capacity=CAP))
        tasks = await stack.enter_async_context(open_tasks(rnode))
        await tasks.wait_for_providers(WORKERS, timeout=60)
        await rnode.wait_for_peers(WORKERS + 1, timeout=60)
        opts = RentOptions(
            workers=WORKERS,
            inner_steps=n["steps"],
            verify_fraction=verify,
            verify_first=False,
            verify_seed=7,
            max_replacements=0,
            overlap=overlap,
        )
        job = RentJob(tasks, rnode, builtin_recipes()["lm"], CFG, opts)
        await job.recruit(timeout=60)
        await job.outer_step(_shards(WORKERS, 0, n["steps"], n["batch"]))  # warm-up: full state sent
        if overlap:
            last = time.monotonic()

            def landed(report: Any) -> None:
                nonlocal last
                now = time.monotonic()
                out["outer_s"].append(now - last)
                last = now
                out["verified"] += sum(s.verified for s in report.segments)
                out["workers"] = len(report.workers)

            await job.train(
                n["outer"], lambda step: _shards(WORKERS, step, n["steps"], n["batch"]), on_report=landed
            )
            return out
        for step in range(1, n["outer"] + 1):
            report = await job.outer_step(_shards(WORKERS, step, n["steps"], n["batch"]))
            out["outer_s"].append(report.seconds)
            out["verified"] += sum(s.verified for s in report.segments)
            out["workers"] = len(report.workers)
    return out


def _swarm_steps(quick: bool) -> list[float]:
    """Outer-step seconds of the swarm path on the same model: WORKERS ``Swarm`` peers in this
    process (each training loop in its own thread, as a user's script would), DiLoCo over the
    real all-reduce; an outer step is its H inner steps plus the round, as measured by the loop."""
    n = _sizes(quick)
    recipe = builtin_recipes()["lm"]
    seconds: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common: dict[str, Any] = {"bootstrap": boot.addrs, "patience": 5.0, "matchmaking_timeout": 60.0,
                  "advert_interval": 1.0, "run": "bench-rent"}
        with contextlib.ExitStack() as stack:
            peers = [stack.enter_context(Swarm(**common)) for _ in range(WORKERS)]
            for sw in peers:
                sw.wait_for_peers(WORKERS - 1, timeout=60)
            barrier = threading.Barrier(WORKERS, timeout=120)

            def train(i: int) -> None:
                try:
                    cfg, model = recipe.make(CFG)  # one seed: every peer starts from one state
                    opt = peers[i].diloco(model, recipe.optimizer(cfg, model.parameters()),
                                          inner_steps=n["steps"], join=False, compression="bf16")
                    shards = _shards(n["outer"] + 1, 100 + i, n["steps"], n["batch"])
                    barrier.wait()
                    times = seconds.setdefault(i, [])
                    for shard in shards:
                        t0 = time.perf_counter()
                        for batch in micro_batches(shard, n["steps"]):
                            recipe.loss(model, batch).backward()
                            opt.step()
                            opt.zero_grad()
                        times.append(time.perf_counter() - t0)
                    if any(r.solo for r in opt.history):
                        raise RuntimeError(f"peer {i} averaged alone: {opt.history}")
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=train, args=(i,)) for i in range(WORKERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
    if errors:
        raise errors[0]
    # the first outer step is a warm-up (as on the rent path); a step ends when both peers' does
    return [max(seconds[i][k] for i in seconds) for k in range(1, n["outer"] + 1)]


def _small_tasks(quick: bool) -> dict[str, Any]:
    return _measure_wan(quick, loopback_layout(4), recover=False)


def run(quick: bool = False, **options: Any) -> SuiteResult:
    """Run the suite and return its result (see the module docstring).

    Example::

        result = run(quick=True)
    """
    n = _sizes(quick)
    result = SuiteResult(
        "rent",
        primary_metric="outer_s",
        higher_is_better=False,
        options={"quick": quick, "workers": WORKERS, "inner_steps": n["steps"], "model": CFG},
    )
    _local_segment(n["steps"], n["batch"])  # warm-up: torch's threads and kernels
    local = [_local_segment(n["steps"], n["batch"]) for _ in range(4)]
    swarm = _swarm_steps(quick)
    plain = trio.run(_rent_steps, 0.0, quick)
    checked = trio.run(_rent_steps, 0.1, quick)
    lapped = trio.run(functools.partial(_rent_steps, 0.0, quick, overlap=True))
    floor = min(local)
    hetero = trio.run(functools.partial(_rent_steps, 0.0, quick, slower=floor))
    hetero_lapped = trio.run(functools.partial(_rent_steps, 0.0, quick, overlap=True, slower=floor))
    base = result.config("local_segment", size="lm", what=f"{n['steps']} inner steps here, no network")
    base.baseline = "local_segment"
    for v in local:
        base.add("outer_s", v)
    seg = min(local)  # the compute floor: a loaded machine only ever adds to it
    path = result.config("swarm_outer_step", size="lm", workers=WORKERS, what="Swarm peers, all-reduce")
    for v in swarm:
        path.add("outer_s", v)
        path.add("overhead_s", v - seg)
        path.add("utilization", seg / v)
    rent = result.config("rent_outer_step", size="lm", workers=WORKERS, verify=0.0)
    for v in plain["outer_s"]:
        rent.add("outer_s", v)
        rent.add("overhead_s", v - seg)
        rent.add("utilization", seg / v)
    lap = result.config("rent_overlapped", size="lm", workers=WORKERS, verify=0.0, overlap=True)
    lap.notes.append("RentJob.train with overlap=True: seconds between two updates landing")
    for v in lapped["outer_s"]:
        lap.add("outer_s", v)
        lap.add("overhead_s", v - seg)
        lap.add("utilization", seg / v)
    for tag, got in (("blocking", hetero), ("overlapped", hetero_lapped)):
        row = result.config(f"rent_hetero_{tag}", size="lm", workers=WORKERS, slower_s=round(seg, 3))
        row.notes.append("the second worker takes one local segment's time longer per segment")
        for v in got["outer_s"]:
            row.add("outer_s", v)
            row.add("utilization", seg / v)  # the fast worker's compute over the step's time
    ver = result.config("rent_verify10", size="lm", workers=WORKERS, verify=0.1)
    for v in checked["outer_s"]:
        ver.add("outer_s", v)
    slower = statistics.median(checked["outer_s"]) / statistics.median(plain["outer_s"])
    ver.add("verify_overhead", slower - 1)
    ver.add("verified", checked["verified"])
    ver.notes.append(f"{checked['verified']} of {WORKERS * n['outer']} segments re-run locally")
    small = _small_tasks(quick)
    for tag, how in (("", "sessions (the default)"), ("_nosession", "one-shot leases (session=0)")):
        row = result.config("small_tasks" + tag, size="tiny", kind="matmul 2x2", processes=5)
        row.notes.append(how + "; every node its own process on loopback, 1 requester + 4 providers")
        for v in small["tasks_per_s" + tag]:
            row.add("tasks_per_s", v)
        row.add("lease_p50_s", statistics.median(small["lease_ms" + tag]) / 1000)
        for v in small["cpu_ms" + tag]:
            row.add("requester_cpu_ms", v)
    for row in result.configs:
        row.add("rss_mib", peak_rss_mib())
    result.add_ratios(lambda a, b: a.params.get("size") == b.params.get("size"))
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.rent [--quick] [--out PATH]``."""
    parser = argparse.ArgumentParser(prog="benchmarks.rent", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps and samples: a smoke run")
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print_table(
        result,
        [
            "outer_s",
            "overhead_s",
            "utilization",
            "verify_overhead",
            "tasks_per_s",
            "lease_p50_s",
            "requester_cpu_ms",
        ],
    )
    path = write_results(result, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
