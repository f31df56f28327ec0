"""The rent demo: a researcher with no GPUs rents them from strangers, trains, and pays for verified work.

    python -m demos.rent              # the whole story, a minute or two on 2 cores (make demo)

A bootstrap node (``p2pcompute bootstrap``) and five provider processes start; each provider
advertises one (simulated) GPU and sells segments of the built-in ``lm`` recipe at its own
price; one of them cheats (it returns its pseudo-gradient scaled by 3). The researcher
process recruits three workers by their signed capacity adverts, checks each one's speed
with ``matmul-bench``, and trains a small transformer language model with DiLoCo: every
outer step each worker runs H inner steps on its data shard, the first segment of every
worker and a fraction of the rest are re-run locally before their receipts are signed. The
cheater is caught, refused and replaced; midway an honest provider is killed with SIGKILL
and replaced too. Per outer step it prints loss, workers, bytes and price; at the end, the
final held-out loss beside the same model trained alone on as many samples, who was
refused and why, and every ledger verified. Exit status 0 when all of that held.

Lives outside the package, in the checkout's ``demos/``; uses :mod:`p2pcompute.rent`,
:mod:`p2pcompute.tasks`, :mod:`p2pcompute.overlay` and :mod:`p2pcompute.testing` (the text source).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import trio

CFG = {"layers": 2, "width": 64, "heads": 4, "vocab": 16, "context": 16, "lr": 3e-3}
BATCH = 8


def _gpu_capacity(index: int, big: bool) -> object:
    from p2pcompute.capacity.model import Capacity, GpuInfo

    # the cheater advertises the most attractive card, so a researcher ranking by capacity picks it
    name, total = ("Simulated H200 141GB", 141 << 30) if big else ("Simulated H100 80GB", 80 << 30)
    gpu = GpuInfo(0, name, f"GPU-demo-{index}", total, total - (2 << 30), 0, "9.0")
    return Capacity(
        cpu_cores=2,
        ram_total=32 << 30,
        ram_available=24 << 30,
        gpus=(gpu,),
        cuda_usable=True,
        torch_version=torch.__version__,
    )


async def _provider(args: argparse.Namespace) -> None:
    from p2pcompute.overlay import open_node
    from p2pcompute.rent import TrainingWorker, builtin_book
    from p2pcompute.tasks.driver import serve_tasks
    from p2pcompute.tensors import open_lane

    torch.set_num_threads(1)
    worker = TrainingWorker(builtin_book(["lm"], price=args.price), cheat=args.cheat or None, device="cpu")
    async with (
        open_node(
            listen=["/ip4/127.0.0.1/tcp/0"],
            bootstrap=[args.bootstrap],
            capacity=_gpu_capacity(args.index, bool(args.cheat)),
        ) as node,  # type: ignore[arg-type]
        open_lane(node) as lane,
        serve_tasks(node, worker.registry(), ledger=args.ledger, lane=lane, lease_ttl=3.0),
    ):
        print(node.peer_id, flush=True)
        await trio.sleep_forever()


def _sequences(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` token sequences of CFG context + 1 drawn from the Markov text source of p2pcompute.testing."""
    from p2pcompute.testing import CONTEXT, VOCAB, MarkovTextTask

    task = _TASK.setdefault("t", MarkovTextTask(seed=0))
    assert isinstance(task, MarkovTextTask)
    length = int(CFG["context"]) + 1
    out = torch.empty(n, length, dtype=torch.long)
    out[:, :CONTEXT] = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    for t in range(CONTEXT, length):
        ctx = out[:, t - CONTEXT : t]
        out[:, t] = torch.multinomial(task.probs[task._index(ctx)], 1, generator=g).squeeze(1)
    return out


_TASK: dict[str, object] = {}


def _eval_loss(model: torch.nn.Module) -> float:
    from p2pcompute.rent.recipes import lm_loss

    tokens = _sequences(512, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(lm_loss(model.eval(), {"tokens": tokens}))


async def _researcher(
    args: argparse.Namespace,
    boot: str,
    procs: dict[str, subprocess.Popen[bytes]],
    names: dict[str, str],
    cheater: str,
    workdir: Path,
) -> int:
    from p2pcompute.capacity.model import CapacityQuery
    from p2pcompute.overlay import open_node
    from p2pcompute.rent import RentJob, RentOptions, builtin_recipes
    from p2pcompute.tasks.driver import open_tasks
    from p2pcompute.tensors import open_lane

    lm = builtin_recipes()["lm"]
    opts = RentOptions(
        workers=3,
        query=CapacityQuery(gpus=1, min_gpu_memory=40 << 30),
        max_price=0.05,
        inner_steps=args.inner_steps,
        verify_fraction=0.2,
        outer_lr=0.7,
        outer_momentum=0.9,
        segment_timeout=60.0,
        overlap=args.overlap,
    )
    g = torch.Generator().manual_seed(0)
    used: list[torch.Tensor] = []
    killed = ""
    async with (
        open_node(
            listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[boot], advertise=False, target_connections=8
        ) as node,
        open_lane(node) as lane,
        open_tasks(node, ledger=workdir / "researcher.jsonl", lane=lane) as tasks,
    ):
        await node.wait_for_peers(len(procs) + 1, timeout=60)
        job = RentJob(tasks, node, lm, CFG, opts, evaluate=_eval_loss)
        print(
            f"researcher: {len(job.candidates())} peers advertise a GPU with >= 40 GiB; recruiting 3",
            flush=True,
        )
        t0 = time.monotonic()
        await job.recruit(timeout=60)
        print(
            "recruited after speed checks: "
            + ", ".join(f"{names[w]} ({job.speeds[w]:.3f} TFLOP/s)" for w in job.workers if w is not None),
            flush=True,
        )
        first = _eval_loss(job.model())
        print(f"before training: held-out loss {first:.4f}", flush=True)

        def shards_for(step: int) -> list[dict[str, torch.Tensor]]:
            nonlocal killed
            if step == args.kill_at:
                victim = next(w for w in job.workers if w is not None and w != cheater)
                procs[victim].send_signal(signal.SIGKILL)
                killed = victim
                print(
                    f"-- SIGKILL {names[victim]} (an honest worker) as outer step {step} is handed out",
                    flush=True,
                )
            shards = [_sequences(args.inner_steps * BATCH, g) for _ in job.workers]
            used.extend(shards)
            return [{"tokens": s} for s in shards]

        # overlap=False: outer_step after outer_step; True: each worker runs ahead by a step
        await job.train(args.outer_steps, shards_for, on_report=lambda r: print(r.line(names), flush=True))
        seconds = time.monotonic() - t0
    return _finish(args, job, used, killed, seconds, names, cheater, workdir, first)


def _finish(
    args: argparse.Namespace,
    job: Any,
    used: list[torch.Tensor],
    killed: str,
    seconds: float,
    names: dict[str, str],
    cheater: str,
    workdir: Path,
    first: float,
) -> int:
    from p2pcompute.rent import builtin_recipes
    from p2pcompute.rent.segment import run_segment, state_of
    from p2pcompute.tasks import verify_ledger

    lm = builtin_recipes()["lm"]
    # the same model trained alone on as many samples (one optimizer over every shard used)
    cfg, alone = lm.make(CFG)
    for shard in used:
        res = run_segment(lm, cfg, state_of(alone), {"tokens": shard}, args.inner_steps)
        with torch.no_grad():
            state = {k: v - res.grad[k].float() for k, v in state_of(alone).items()}
        alone.load_state_dict(state, strict=False)
    final, solo = job.reports[-1].eval_loss, _eval_loss(alone)
    print(
        f"\nfinal held-out loss {final:.4f} with rented workers in {seconds:.1f} s; "
        f"{solo:.4f} trained alone on the same {len(used) * args.inner_steps * BATCH} sequences "
        f"(segment after segment, inner optimizer restarted per segment as on the workers)"
    )
    for e in job.evidence:
        print(
            f"refused {names[e.worker]} at outer step {e.outer_step}: {e.reason} "
            f"(returned {e.returned_digest[:12]}, re-run {str(e.recomputed_digest)[:12]}, "
            f"tolerance {e.tolerance})"
        )
    replaced = [(a, b) for r in job.reports for a, b in r.replaced]
    print("replaced: " + ", ".join(f"{names[a]} -> {names[b]}" for a, b in replaced))
    print(f"paid {job.spent:.4f} in all ({sum(r.price for r in job.reports):.4f} for segments)")
    ok = True
    for path in sorted(workdir.glob("*.jsonl")):
        rep = verify_ledger(path)
        print(f"ledger {path.stem}: {len(rep.entries)} receipts, {'verified' if rep.ok else 'BROKEN'}")
        ok = ok and rep.ok
    caught = {e.worker for e in job.evidence}
    checks = {
        "cheater refused": caught == {cheater},
        "killed worker replaced": any(a == killed for a, _ in replaced),
        "loss went down": final is not None
        and math.isfinite(final)
        and final < job.reports[0].eval_loss + 1e-9,
        "ledgers verified": ok,
    }
    for what, good in checks.items():
        print(f"{'ok' if good else 'FAILED'}: {what}")
    return 0 if all(checks.values()) else 1


def _start(cmd: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        raise SystemExit(f"demo: {' '.join(cmd[:4])} did not start")
    return proc, line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outer-steps", type=int, default=8)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument(
        "--kill-at", type=int, default=4, help="outer step before which an honest worker is killed"
    )
    p.add_argument(
        "--overlap",
        action="store_true",
        help="overlapped outer steps (RentJob.train): a worker starts its next segment as soon as it "
        "returns one, while the last step's update lands",
    )
    p.add_argument("--provider", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--cheat", default="", help=argparse.SUPPRESS)
    p.add_argument("--price", type=float, default=0.01, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ledger", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.provider:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_provider, args)
        return 0
    procs: dict[str, subprocess.Popen[bytes]] = {}
    names: dict[str, str] = {}
    env_python = sys.executable
    with tempfile.TemporaryDirectory(prefix="p2pcompute-rent-") as tmp:
        workdir = Path(tmp)
        boot_proc, boot = _start(
            [env_python, "-m", "p2pcompute.cli", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"]
        )
        try:
            print(f"bootstrap node {boot}", flush=True)
            cheater = ""
            for i in range(5):
                cheat = "scale" if i == 2 else ""
                price = [0.010, 0.012, 0.008, 0.015, 0.011][i]
                proc, peer = _start(
                    [
                        env_python,
                        "-m",
                        "demos.rent",
                        "--provider",
                        "--bootstrap",
                        boot,
                        "--index",
                        str(i),
                        "--price",
                        str(price),
                        "--cheat",
                        cheat,
                        "--ledger",
                        str(workdir / f"provider{i}.jsonl"),
                    ]
                )
                procs[peer] = proc
                names[peer] = f"provider{i}" + (" (cheats)" if cheat else "")
                cheater = peer if cheat else cheater
                print(
                    f"provider{i}: {peer[:16]}... sells lm segments at {price}"
                    + (", returns its pseudo-gradient x3" if cheat else ""),
                    flush=True,
                )
            return trio.run(_researcher, args, boot, procs, names, cheater, workdir)
        finally:
            for proc in [*procs.values(), boot_proc]:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc in [*procs.values(), boot_proc]:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="  (%(levelname)s %(name)s) %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
