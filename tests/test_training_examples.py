"""The examples as real processes: the training script alone (with resume) and torchrun DDP ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

pytestmark = pytest.mark.slow


def events(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_training_script_alone_then_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.p2pc"
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "--json", "--inner-steps", "5",
           "--checkpoint", str(ckpt), "--data-seed", "3"]
    first = subprocess.run([*cmd, "--outer-steps", "2"], capture_output=True, text=True, env=ENV, timeout=240)
    assert first.returncode == 0, first.stderr
    ev = events(first.stdout)
    assert ev[0]["event"] == "start"
    assert ev[0]["outer_step"] == 0
    assert [e["step"] for e in ev if e["event"] == "outer"] == [1, 2]
    assert ckpt.exists()
    second = subprocess.run(
        [*cmd, "--outer-steps", "3"], capture_output=True, text=True, env=ENV, timeout=240
    )
    assert second.returncode == 0, second.stderr
    ev2 = events(second.stdout)
    assert ev2[0]["outer_step"] == 2  # resumed, nothing lost
    assert [e["step"] for e in ev2 if e["event"] == "outer"] == [3]


def test_torchrun_ddp_two_gloo_ranks_stay_identical() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "torchrun_ddp.py"), "--outer-steps", "2", "--inner-steps", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [e for e in events(proc.stdout) if e["event"] == "done"]
    assert sorted(e["rank"] for e in done) == [0, 1]  # type: ignore[type-var]
    assert {e["digest"] for e in done} == {done[0]["digest"]}
    assert all(e["outer_step"] == 2 for e in done)
    outer = [e for e in events(proc.stdout) if e["event"] == "outer"]
    assert [e["step"] for e in outer] == [1, 2]  # printed by rank 0 only
