"""Safetensors checkpoints: plain torch reads them, resume continues exactly, last K kept, damage refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import trio

from p2pcompute.training import checkpoint
from p2pcompute.training.averager import SoloAverager
from p2pcompute.training.diloco import DiLoCo
from p2pcompute.training.state import CheckpointError


def build(ckpt: Path | None) -> tuple[torch.nn.Module, DiLoCo, torch.optim.lr_scheduler.StepLR]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = DiLoCo(model, inner, SoloAverager(), inner_steps=3, outer_momentum=0.5, checkpoint_dir=ckpt,
                 keep_checkpoints=2, runner=trio.run)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    opt.checkpoint_extra = lambda: {"scheduler": sched.state_dict()}
    return model, opt, sched


def train(model: torch.nn.Module, opt: DiLoCo, sched: torch.optim.lr_scheduler.StepLR, steps: range) -> None:
    for s in steps:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(16, 4, generator=g)
        torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        opt.step(samples=16)
        opt.zero_grad()
        sched.step()


def test_checkpoint_is_plain_safetensors_and_resume_continues_exactly(tmp_path: Path) -> None:
    root = tmp_path / "run"
    model, opt, sched = build(root)
    train(model, opt, sched, range(15))  # 5 outer steps, each one checkpointed
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000005"]
    newest = checkpoint.latest(root)
    assert newest == root / "step-00000005"
    shutil.copytree(newest, tmp_path / "saved" / newest.name)  # as it was when the process died

    # plain torch + safetensors, nothing of ours: the weights (and BatchNorm buffers) load strictly
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    fresh.load_state_dict(safetensors.torch.load_file(str(newest / "model.safetensors")))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["outer_step"] == 5
    # taken inside the 15th opt.step(), before that iteration's sched.step()
    assert manifest["extra"]["scheduler"]["last_epoch"] == 14

    train(model, opt, sched, range(15, 24))
    model2, opt2, sched2 = build(tmp_path / "resumed")
    ck = checkpoint.resume(opt2, tmp_path / "saved")
    assert ck is not None
    sched2.load_state_dict(ck.extra["scheduler"])
    sched2.step()  # the scheduler step that followed the checkpointed opt.step()
    assert opt2.outer_step == 5
    train(model2, opt2, sched2, range(15, 24))
    assert opt2.state_digest() == opt.state_digest()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_damaged_or_interrupted_checkpoints_are_refused_or_skipped(tmp_path: Path) -> None:
    model, opt, sched = build(tmp_path)
    train(model, opt, sched, range(6))
    newest = checkpoint.latest(tmp_path)
    assert newest is not None
    # an interrupted write (no manifest) is never the latest
    (tmp_path / "step-00000099").mkdir()
    (tmp_path / "step-00000099" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) == newest
    # a flipped byte in the optimizer file is caught by the manifest's hash
    opt_file = newest / "optimizer.safetensors"
    data = bytearray(opt_file.read_bytes())
    data[-1] ^= 1
    opt_file.write_bytes(bytes(data))
    _, opt2, _ = build(None)
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        checkpoint.resume(opt2, tmp_path)
    (newest / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        checkpoint.load(newest)
    assert checkpoint.resume(opt2, tmp_path / "empty") is None
    # the next save removes the interrupted directory and keeps the last two complete ones
    train(model, opt, sched, range(6, 9))
    assert not (tmp_path / "step-00000099").exists()
