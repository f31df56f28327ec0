"""examples/torch_native.py as a real process: SIGKILLed mid-run, restarted, its loss curve continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SCRIPT = str(ROOT / "examples" / "torch_native.py")
ARGS = ["--json", "--outer-steps", "4", "--inner-steps", "4", "--accumulate", "2", "--keep", "2"]

pytestmark = pytest.mark.slow


def events(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def losses(evs: list[dict[str, object]]) -> dict[object, object]:
    return {e["step"]: e["loss"] for e in evs if e["event"] == "outer"}


def test_sigkill_then_resume_continues_the_loss_curve(tmp_path: Path) -> None:
    # the uninterrupted run, alongside
    ref = subprocess.Popen([sys.executable, SCRIPT, *ARGS, "--checkpoint-dir", str(tmp_path / "ref")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    ckpt = tmp_path / "ckpt"
    victim = subprocess.Popen([sys.executable, SCRIPT, *ARGS, "--checkpoint-dir", str(ckpt)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    try:
        assert victim.stdout is not None
        for line in victim.stdout:
            seen.append(json.loads(line))
            if seen[-1].get("step") == 2:
                victim.send_signal(signal.SIGKILL)  # no cleanup, no atexit: only atomic writes help
                break
        victim.wait(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        ref_out, ref_err = ref.communicate(timeout=120)
    finally:
        victim.kill()
        ref.kill()
    assert ref.returncode == 0, ref_err
    reference = losses(events(ref_out))
    assert sorted(reference) == [1, 2, 3, 4]

    resumed = subprocess.run([sys.executable, SCRIPT, *ARGS, "--checkpoint-dir", str(ckpt)],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    evs = events(resumed.stdout)
    start = evs[0]
    assert start["event"] == "start"
    step = start["outer_step"]
    assert isinstance(step, int)
    assert step >= 2  # the checkpoint of outer step 2 was complete before its line was printed
    assert start["loss"] == reference[step]
    after = losses(evs)
    assert sorted(after) == list(range(step + 1, 5))
    assert after == {s: reference[s] for s in after}  # bit-identical continuation
    # the newest checkpoint is a plain safetensors file
    weights = safetensors.torch.load_file(str(ckpt / "step-00000004" / "model.safetensors"))
    assert "0.running_mean" in weights
