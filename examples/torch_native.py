"""A plain PyTorch training loop with DiLoCo: scheduler, GradScaler + bf16 autocast, accumulation,
gradient clipping, safetensors checkpoints, a logging callback, and resume after SIGKILL.

    # alone (kill it whenever you like, then run the same line again: it resumes)
    python examples/torch_native.py --checkpoint-dir ckpt --outer-steps 20
    # with others: the same run name and model on every peer
    python examples/torch_native.py --bootstrap /ip4/10.0.0.1/tcp/4001/p2p/12D3KooW... --key peer.key

Everything but two lines is ordinary torch. ``swarm.diloco(...)`` wraps the inner AdamW into a
``torch.optim.Optimizer`` (so ``CosineAnnealingLR``, ``GradScaler.step`` and ``clip_grad_norm_``
take it as they are); ``opt.add_callback(...)`` logs every outer step. After every outer step a
checkpoint directory ``<dir>/step-NNNNNNNN/`` is written atomically: ``model.safetensors`` (read it
with ``safetensors.torch.load_file``), ``optimizer.safetensors`` and ``manifest.json``; the newest
``--keep`` stay. A restart with the same ``--checkpoint-dir`` resumes from the newest one, the
scheduler included, and its data stream continues where the checkpoint was taken.

Exit codes: 0 when ``--outer-steps`` are done, 130 on Ctrl-C, 2 on bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from p2pcompute.testing import TeacherTask, evaluate
from p2pcompute.testing import make_model as make_mlp
from p2pcompute.training.diloco import StepReport
from p2pcompute.training.swarm import Swarm


def make_model() -> torch.nn.Module:
    """The MLP of p2pcompute.testing with a BatchNorm layer in front (its running stats are averaged)."""
    torch.manual_seed(0)
    mlp = make_mlp(seed=0)
    return torch.nn.Sequential(torch.nn.BatchNorm1d(mlp[0].in_features), mlp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", action="append", default=[], help="multiaddr of a bootstrap node")
    parser.add_argument("--key", help="identity key file (created on first use)")
    parser.add_argument("--run", default="torch-native", help="run name; peers of one run average together")
    parser.add_argument("--outer-steps", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=10, help="optimizer steps between averages (H)")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    # The DiLoCo recipe's 0.9 suits long runs over many peers; a short run alone overshoots with it.
    parser.add_argument("--outer-momentum", type=float, default=0.5)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32, no autocast")
    parser.add_argument("--checkpoint-dir", help="write checkpoints here and resume from the newest")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON line per event")
    args = parser.parse_args(argv)
    if min(args.outer_steps, args.inner_steps, args.accumulate, args.micro_batch, args.keep) < 1:
        parser.error("step counts, sizes and --keep must be at least 1")
    try:
        return train(args)
    except KeyboardInterrupt:
        print("torch_native.py: stopped by Ctrl-C", file=sys.stderr, flush=True)
        return 130


def train(args: argparse.Namespace) -> int:
    task = TeacherTask(seed=0)
    eval_set = task.eval_set()
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    total = args.outer_steps * args.inner_steps

    def emit(event: dict[str, object]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            print("  ".join(f"{k} {v}" for k, v in event.items()), flush=True)

    def loss_now() -> float:
        model.eval()  # BatchNorm: use the (averaged) running statistics
        try:
            return round(evaluate(model, eval_set), 6)
        finally:
            model.train()

    with Swarm(args.bootstrap, key=args.key, run=args.run, network=bool(args.bootstrap)) as swarm:
        opt = swarm.diloco(model, inner, inner_steps=args.inner_steps, outer_lr=args.outer_lr,
                           outer_momentum=args.outer_momentum, checkpoint_dir=args.checkpoint_dir,
                           keep_checkpoints=args.keep)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        opt.checkpoint_extra = lambda: {"scheduler": sched.state_dict()}
        if opt.resumed is not None:
            sched.load_state_dict(opt.resumed.extra["scheduler"])
            sched.step()  # the checkpoint is taken inside opt.step(), before that iteration's sched.step()
        scaler = torch.amp.GradScaler("cpu", enabled=not args.bf16)  # bf16 needs no loss scaling

        # Logging is one callback; for TensorBoard: w = SummaryWriter(); opt.add_callback(
        #     lambda r: w.add_scalar("loss", loss_now(), r.outer_step))
        def log_step(r: StepReport) -> None:
            emit({"event": "outer", "step": r.outer_step, "loss": loss_now(), "lr": sched.get_last_lr()[0],
                  "peers": len(r.participants), "solo_reason": r.solo_reason})

        opt.add_callback(log_step)
        emit({"event": "start", "peer": swarm.peer_id, "outer_step": opt.outer_step, "loss": loss_now()})
        while opt.outer_step < args.outer_steps:
            # the data stream is a function of the step, so a resumed run continues it
            g = torch.Generator().manual_seed(args.data_seed * 1_000_003 + opt.total_inner_steps)
            for _ in range(args.accumulate):
                x, y = task.batch(args.micro_batch, g)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    out = model(x)
                loss = torch.nn.functional.mse_loss(out.float(), y) / args.accumulate
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)  # an inner step; every --inner-steps also the outer step (and a checkpoint)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
        emit({"event": "done", "outer_step": opt.outer_step, "loss": loss_now()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
