"""What serving the whole state costs a sharded (FSDP) peer: memory per rank and the gather's time.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.sharded_state [--layers 8] [--width 1024]

Each rank builds an MLP of ``--layers`` square Linear layers under ``fully_shard``, then
:func:`p2pcompute.training.ranks.sharded_diloco` with a real (network) Swarm on rank 0, and takes
three outer steps. Every rank reports its resident memory after the model, after the optimizer
and after the steps, and the time of :meth:`ShardedDiLoCo.gather_state` (the per-outer-step hop
that lets rank 0 serve joiners). Rank 0 prints a table and writes ``sharded_state.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from p2pcompute.training.ranks import sharded_diloco
from p2pcompute.training.swarm import Swarm

MB = 1 << 20


def rss() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # the swarm first: its own memory (py-libp2p, trio) is not what is measured
    swarm = Swarm(listen=["/ip4/127.0.0.1/tcp/0"]).start() if rank == 0 else None
    base = rss()
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    params = sum(p.numel() for p in model.parameters())
    after_model = rss()
    inner = torch.optim.SGD(model.parameters(), lr=1e-3)
    figures: dict[str, float] = {}
    try:
        opt = sharded_diloco(model, inner, swarm, inner_steps=2, join=False)
        after_opt = rss()
        x = torch.randn(8, args.width)
        while opt.outer_step < 3:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        after_steps = rss()
        times = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            opt.gather_state()
            times.append(time.perf_counter() - t0)
        figures = {
            "rank": rank, "params": params, "model_mib": params * 4 / MB,
            "rss_model_mib": after_model - base, "rss_optimizer_mib": after_opt - after_model,
            "rss_steps_mib": after_steps - after_opt, "rss_total_mib": after_steps - base,
            "shard_state_mib": 2 * sum(p.to_local().numel() for p in model.parameters()) * 4 / MB,
            "gather_state_ms": statistics.median(times) * 1000,
        }
    finally:
        if swarm is not None:
            swarm.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sharded_state.rank{rank}.json").write_text(json.dumps(figures))
    dist.barrier()
    if rank == 0:
        rows = [json.loads((out / f"sharded_state.rank{r}.json").read_text()) for r in range(world)]
        keys = ["shard_state_mib", "rss_model_mib", "rss_optimizer_mib", "rss_steps_mib", "rss_total_mib",
                "gather_state_ms"]
        print(f"model: {params} parameters, {params * 4 / MB:.1f} MiB fp32, {world} ranks")
        print(f"{'rank':>4} " + " ".join(f"{k:>18}" for k in keys))
        for r in rows:
            print(f"{r['rank']:>4} " + " ".join(f"{r[k]:>18.1f}" for k in keys))
        (out / "sharded_state.json").write_text(json.dumps({"world": world, "ranks": rows}, indent=1))
        for r in range(world):
            (out / f"sharded_state.rank{r}.json").unlink()
    dist.barrier()
    del model, inner
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
