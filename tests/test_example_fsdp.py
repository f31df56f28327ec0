"""examples/torchrun_fsdp.py on 2 gloo ranks: DiLoCo on FSDP shards equals DiLoCo on the whole model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

from p2pcompute.testing import TeacherTask, make_model
from p2pcompute.training.averager import SoloAverager
from p2pcompute.training.diloco import DiLoCo

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.slow


def unsharded_reference(outer: int, inner_steps: int, batch: int, world: int) -> float:
    """The same training in one process: FSDP's gradient is the mean over the ranks' batches."""
    task = TeacherTask(seed=0)
    model = make_model(seed=0)
    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-3), SoloAverager(),
                 inner_steps=inner_steps, outer_momentum=0.5, runner=trio.run)
    gens = [torch.Generator().manual_seed(1000 + r) for r in range(world)]
    for _ in range(outer * inner_steps):
        xs, ys = zip(*(task.batch(batch, g) for g in gens), strict=True)
        torch.nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step(samples=batch * world)
        opt.zero_grad()
    x_eval, y_eval = task.eval_set()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x_eval), y_eval))


def test_fsdp_peer_takes_the_outer_step_on_shards_and_matches_the_whole_model() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "torchrun_fsdp.py"), "--outer-steps", "2", "--inner-steps", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [e["step"] for e in evs if e["event"] == "outer"] == [1, 2]  # printed by rank 0 only
    (done,) = [e for e in evs if e["event"] == "done"]
    assert done["world"] == 2
    assert done["outer_step"] == 2
    ref = unsharded_reference(2, 5, 32, 2)
    assert done["loss"] == pytest.approx(ref, rel=1e-4)
