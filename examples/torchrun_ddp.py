"""A multi-GPU peer: inner steps under torchrun with DDP, p2pcompute only for the outer average.

    # one peer with 2 local ranks (gloo on CPU, NCCL when every rank has a GPU)
    torchrun --nproc-per-node 2 examples/torchrun_ddp.py --bootstrap /ip4/.../p2p/12D3KooW...

Inside the peer, torch's own engine does the work: DistributedDataParallel all-reduces the
gradients of every inner step across the local ranks. Across peers, only rank 0 talks to the
swarm: it owns the :class:`~p2pcompute.training.swarm.Swarm` and the DiLoCo outer optimizer,
and after each outer step (and after joining, when it downloaded newer state) it broadcasts
the new parameters and the outer step to the other ranks. Ranks stay bit-identical.
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
from torch.nn.parallel import DistributedDataParallel

from p2pcompute.testing import TeacherTask, evaluate, make_model
from p2pcompute.training.swarm import Swarm


def emit(event: dict[str, object]) -> None:
    """One JSON line in a single write: the ranks share stdout, and print() writes the text
    and the newline separately, so two ranks' lines could run together."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def broadcast_state(module: torch.nn.Module, outer_step: int, device: torch.device) -> int:
    """Rank 0's parameters and outer step to every rank; returns the outer step."""
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)
    step = torch.tensor([outer_step], dtype=torch.int64, device=device)
    dist.broadcast(step, src=0)
    return int(step.item())


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--key")
    parser.add_argument("--run", default="toy-ddp")
    parser.add_argument("--outer-steps", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    task = TeacherTask(seed=0)
    model = make_model(seed=0).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    inner = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1000 + rank)

    swarm: Swarm | None = None
    opt = None
    outer_step = 0
    try:
        if rank == 0:
            swarm = Swarm(args.bootstrap, key=args.key, run=args.run, network=bool(args.bootstrap))
            swarm.start()
            opt = swarm.diloco(model, inner, inner_steps=args.inner_steps)
            outer_step = opt.outer_step
        outer_step = broadcast_state(model, outer_step, device)
        local = 0
        while outer_step < args.outer_steps:
            x, y = task.batch(args.batch, g)
            torch.nn.functional.mse_loss(ddp(x.to(device)), y.to(device)).backward()  # DDP all-reduce
            if opt is not None:
                report = opt.step(samples=args.batch * world)  # rank 0: inner step, outer step when due
                outer_step = opt.outer_step
                if report is not None:
                    x_eval, y_eval = task.eval_set()
                    loss = evaluate(model, (x_eval.to(device), y_eval.to(device)))
                    emit({"event": "outer", "step": report.outer_step, "loss": loss,
                          "participants": list(report.participants)})
            else:
                inner.step()
            inner.zero_grad()
            local += 1
            if local == args.inner_steps:
                local = 0
                outer_step = broadcast_state(model, outer_step, device)
        done = {"event": "done", "rank": rank, "outer_step": outer_step, "digest": digest(model)}
        emit(done)
    finally:
        if swarm is not None:
            swarm.close()
    # Tear down together and in order: every rank waits here for rank 0's swarm to close, and
    # DDP (its reducer and the work it keeps) goes before the process group it uses. A rank
    # that destroyed the group and exited while the other still used it once died with
    # SIGABRT ("terminate called without an active exception") in a gloo thread. Only on
    # success: after an error the other rank may be inside a collective, and torchrun stops it.
    dist.barrier()
    del ddp, inner
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
