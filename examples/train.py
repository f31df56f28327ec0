"""Train a small model with DiLoCo, alone or with whoever else runs this script.

    # alone
    python examples/train.py --steps 600
    # a swarm: start a bootstrap node, then run this on as many machines as you like
    python -m demos.diloco --bootstrap-only --listen /ip4/0.0.0.0/tcp/4001
    python examples/train.py --bootstrap /ip4/10.0.0.1/tcp/4001/p2p/12D3KooW... --key peer.key

The script is an ordinary synchronous PyTorch loop. The only p2pcompute lines are the
``Swarm`` (a background thread that runs the peer) and ``swarm.diloco(...)``, which wraps the
inner optimizer: every ``--inner-steps`` steps the peers average what they learned and apply
an outer Nesterov step. A peer that starts late downloads the current state from the others
(hash-verified) and joins at their next outer step; a peer that restarts with the same
``--checkpoint`` resumes from it. Ctrl-C (SIGINT) stops it cleanly: the peer leaves the swarm, the
script prints one line on stderr and exits 130 (the shell's code for "interrupted", so a wrapper
can tell an interrupted run from one that finished, which exits 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from p2pcompute.testing import TeacherTask, evaluate, make_model
from p2pcompute.training.diloco import DiLoCo, StepReport
from p2pcompute.training.swarm import Swarm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", action="append", default=[], help="multiaddr of a bootstrap node")
    parser.add_argument("--key", help="identity key file (created on first use)")
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--run", default="toy", help="training run name; peers of one run average together")
    parser.add_argument("--outer-steps", type=int, default=10, help="stop after this many outer steps")
    parser.add_argument("--inner-steps", type=int, default=50, help="local steps between averages (H)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compression", default="none", choices=["none", "fp16", "bf16", "int8"])
    parser.add_argument("--checkpoint", help="checkpoint file: written after every outer step, resumed from")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--patience", type=float, default=2.0, help="seconds to wait for late peers")
    parser.add_argument("--matchmaking-timeout", type=float, default=10.0,
                        help="give up a round after this many seconds without a group")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of this peer's batches")
    parser.add_argument("--json", action="store_true", help="one JSON line per outer step")
    parser.add_argument("--overlap", action="store_true",
                        help="average each outer step in the background while the next inner phase runs")
    parser.add_argument("--join-early", action="store_true",
                        help="end the inner phase when another peer starts the round; a slower peer then "
                             "averages what it did, weighted by its samples")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="simulate a slower GPU: each inner step takes this many times as long (>= 1)")
    args = parser.parse_args(argv)
    if os.environ.get("P2PCOMPUTE_LOG"):  # e.g. INFO: the benchmark keeps each peer's log
        logging.basicConfig(level=os.environ["P2PCOMPUTE_LOG"].upper(), stream=sys.stderr,
                            format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S")
    if not args.slowdown >= 1.0:
        parser.error("--slowdown must be at least 1")
    try:
        return train(args)
    except KeyboardInterrupt:
        print("train.py: stopped by Ctrl-C", file=sys.stderr, flush=True)
        return 130


def train(args: argparse.Namespace) -> int:
    """The training loop; returns 0 once ``--outer-steps`` outer steps are done."""
    torch.manual_seed(0)
    task = TeacherTask(seed=0)
    eval_set = task.eval_set()
    model = make_model(seed=0)  # every peer starts from the same weights (or downloads newer ones)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)

    swarm = Swarm(
        args.bootstrap, key=args.key, listen=[args.listen], run=args.run, network=bool(args.bootstrap),
        group_size=args.group_size, patience=args.patience, matchmaking_timeout=args.matchmaking_timeout,
    )
    with swarm:
        opt = swarm.diloco(
            model, inner, inner_steps=args.inner_steps, compression=args.compression,
            checkpoint=args.checkpoint, overlap=args.overlap, join_early=args.join_early,
        )
        seed = args.data_seed
        if seed is None:
            seed = int.from_bytes(swarm.peer_id[-4:].encode(), "big")
        g = torch.Generator().manual_seed(seed)
        if args.json:
            print(json.dumps({"event": "start", "peer": swarm.peer_id, "addrs": swarm.addrs,
                              "outer_step": opt.outer_step}), flush=True)
        loop_start = time.perf_counter()
        sync_seconds = eval_seconds = 0.0
        # an overlapped round in flight counts: its outer step lands during the next phase (or finish())
        while opt.outer_step + opt.pending < args.outer_steps:
            t_compute = time.perf_counter()
            x, y = task.batch(args.batch, g)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if args.slowdown > 1.0:  # a slower device: the step's compute, stretched
                time.sleep((args.slowdown - 1.0) * (time.perf_counter() - t_compute))
            t_step = time.perf_counter()
            report = opt.step(samples=args.batch)
            if opt.local_steps == 0:  # a phase boundary: the time the compute waited for averaging
                sync_seconds += time.perf_counter() - t_step
            opt.zero_grad()
            if report is not None:
                eval_seconds += _report(args, swarm, opt, model, eval_set, report)
        t_finish = time.perf_counter()
        last = opt.finish()  # overlapped: the last round lands
        sync_seconds += time.perf_counter() - t_finish
        if last is not None:
            eval_seconds += _report(args, swarm, opt, model, eval_set, last)
        loop_seconds = time.perf_counter() - loop_start - eval_seconds
        final = evaluate(model, eval_set)
        if args.json:
            print(json.dumps({"event": "done", "peer": swarm.peer_id, "loss": final,
                              "samples": opt.total_inner_steps * args.batch, "loop_seconds": loop_seconds,
                              "sync_seconds": sync_seconds, "compute_seconds": loop_seconds - sync_seconds,
                              **opt.statistics()}), flush=True)
        else:
            print(f"final loss {final:.5f} after {opt.outer_step} outer steps", flush=True)
    return 0


def _report(args: argparse.Namespace, swarm: Swarm, opt: DiLoCo, model: torch.nn.Module,
            eval_set: tuple[torch.Tensor, torch.Tensor], report: StepReport) -> float:
    """Print one outer step; returns the seconds spent evaluating (not training time)."""
    t_eval = time.perf_counter()
    line = {
        "event": "outer", "peer": swarm.peer_id, "step": report.outer_step,
        "loss": evaluate(model, eval_set), "participants": list(report.participants),
        "bytes": report.bytes_sent, "per_step_bytes": report.per_step_bytes,
        "seconds": round(report.seconds, 3), "waited": round(report.waited, 3),
        "digest": opt.state_digest().hex()[:16], "error": report.error,
        "local_steps": report.local_steps, "early": report.early,
    }
    if args.json:
        print(json.dumps(line), flush=True)
    else:
        print(f"outer step {report.outer_step:3d}  loss {line['loss']:.5f}  "
              f"peers {len(report.participants)}  sent {report.bytes_sent / 1e3:.1f} kB "
              f"(per-step averaging: {report.per_step_bytes / 1e3:.1f} kB)  "
              f"compute waited {report.waited:.2f} s", flush=True)
    return time.perf_counter() - t_eval


if __name__ == "__main__":
    sys.exit(main())
