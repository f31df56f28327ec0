"""A multi-GPU peer with FSDP: sharded inner steps under torchrun, DiLoCo's outer step on the shards.

    # one peer with 2 local ranks (gloo on CPU, NCCL when every rank has a GPU)
    torchrun --nproc-per-node 2 examples/torchrun_fsdp.py --bootstrap /ip4/.../p2p/12D3KooW...

FSDP (``fully_shard``) splits every parameter over the local ranks and reduce-scatters the
gradients of each inner step. Every rank runs its own DiLoCo over its local shards: its anchor
shard and outer momentum live on that rank, and nothing is ever unsharded for the outer step.
``sharded_diloco`` (every rank calls it; rank 0 passes its Swarm) wires the rest: at an outer
step rank 0 gathers the ranks' pseudo-gradient shards, averages the whole parameters with the
other peers (one-process peers of the same model included), and scatters each rank its rows;
after the step it gathers the shared state and serves it to joiners. Joining a running swarm
works as for any peer: rank 0 downloads the state and every rank loads its rows.
(docs/training.md, "Multi-GPU peers"; p2pcompute/training/ranks.py.)

``--outer-steps`` counts from where the peer starts (0, or the step it joined at). Rank 0 prints
JSON lines; with ``--report DIR`` every rank also writes ``DIR/rank<r>.json`` when it is done.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from p2pcompute.testing import TeacherTask, make_model
from p2pcompute.training.ranks import sharded_diloco
from p2pcompute.training.swarm import Swarm


def emit(event: dict[str, object]) -> None:
    """One JSON line in a single write (the ranks share stdout)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--key")
    parser.add_argument("--run", default="toy-fsdp")
    parser.add_argument("--outer-steps", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--outer-momentum", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="of the model's initial weights")
    parser.add_argument("--patience", type=float, default=3.0, help="matchmaking patience (s)")
    parser.add_argument("--report", help="directory for one JSON file per rank at the end")
    args = parser.parse_args(argv)

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    task = TeacherTask(seed=0)
    model = make_model(seed=args.seed).to(device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1000 + rank)

    swarm: Swarm | None = None
    try:
        if rank == 0:
            swarm = Swarm(args.bootstrap, key=args.key, run=args.run, network=bool(args.bootstrap),
                          patience=args.patience).start()
        # every rank; rank 0 joins the run (downloads the state) and hands each rank its rows
        opt = sharded_diloco(model, inner, swarm, inner_steps=args.inner_steps,
                             outer_momentum=args.outer_momentum)
        start = opt.outer_step
        if rank == 0:
            emit({"event": "start", "outer_step": start})  # after joining, when it joined
        while opt.outer_step < start + args.outer_steps:
            x, y = task.batch(args.batch, g)
            torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()  # reduce-scatter
            report = opt.step(samples=args.batch * world)  # every rank: inner step; outer step when due
            opt.zero_grad()
            if report is not None and rank == 0:
                emit({"event": "outer", "step": report.outer_step, "participants": list(report.participants)})
        # unshard once at the end, only to report (a collective: every rank takes part)
        full = [p.full_tensor().detach().cpu() for p in model.parameters()]
        if rank == 0:
            x_eval, y_eval = task.eval_set()
            plain = make_model(seed=0)
            with torch.no_grad():
                for p, f in zip(plain.parameters(), full, strict=True):
                    p.copy_(f)
                loss = float(torch.nn.functional.mse_loss(plain(x_eval), y_eval))
            h = hashlib.sha256(b"".join(f.contiguous().numpy().tobytes() for f in full)).hexdigest()[:16]
            emit({"event": "done", "outer_step": opt.outer_step, "loss": loss, "digest": h, "world": world,
                  "state_digest": opt.state_digest().hex()})
        if args.report:  # one file per rank: ranks sharing one stdout pipe could interleave
            with open(os.path.join(args.report, f"rank{rank}.json"), "w") as f:
                json.dump({"rank": rank, "outer_step": opt.outer_step}, f)
    finally:
        if swarm is not None:
            swarm.close()
    dist.barrier()
    del model, inner
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
