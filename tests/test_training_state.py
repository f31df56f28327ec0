"""The safe state format, checkpoints and resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import ConfigError, IntegrityError, MalformedMessage
from p2pcompute.training import diloco as diloco_module
from p2pcompute.training.averager import SoloAverager
from p2pcompute.training.diloco import DiLoCo
from p2pcompute.training.state import (
    DTYPES,
    MAGIC,
    CheckpointError,
    TrainingState,
    load_checkpoint,
    save_checkpoint,
)
from p2pcompute.wire.codec import encode

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)
dtype_names = st.sampled_from(sorted(DTYPES))


@st.composite
def states(draw: st.DrawFn) -> TrainingState:
    n = draw(st.integers(0, 4))
    tensors = {}
    for i in range(n):
        shape = draw(shapes)
        dt = DTYPES[draw(dtype_names)]
        numel = 1
        for d in shape:
            numel *= d
        raw = draw(st.binary(min_size=numel * torch.empty((), dtype=dt).element_size(),
                             max_size=numel * torch.empty((), dtype=dt).element_size()))
        if numel:
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dt)
        tensors[f"t{i}"] = t
    meta = draw(st.dictionaries(st.text(max_size=8), st.integers(-5, 5) | st.text(max_size=5), max_size=3))
    return TrainingState(draw(st.integers(0, 10**6)), tensors, meta)


@settings(max_examples=60, deadline=None)
@given(states())
def test_state_roundtrips_bit_exactly(state: TrainingState) -> None:
    back = TrainingState.from_bytes(state.to_bytes())
    assert back.step == state.step
    assert back.meta == state.meta
    assert back.digest() == state.digest()
    for name, t in state.tensors.items():
        assert back.tensors[name].dtype == t.dtype
        assert back.tensors[name].shape == t.shape
        assert bytes(back.tensors[name].reshape(-1).view(torch.uint8).numpy()) == bytes(
            t.reshape(-1).view(torch.uint8).numpy()
        )


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_refused_with_a_typed_error(junk: bytes) -> None:
    for data in (junk, MAGIC + junk):
        with pytest.raises((MalformedMessage, IntegrityError)):
            TrainingState.from_bytes(data, peer="bad")


def _blob() -> bytes:
    return TrainingState(3, {"a": torch.arange(6, dtype=torch.float32)}, {"k": 1}).to_bytes()


def test_flipped_byte_and_truncation_are_caught() -> None:
    blob = bytearray(_blob())
    blob[-1] ^= 1
    with pytest.raises(IntegrityError) as err:
        TrainingState.from_bytes(bytes(blob), peer="QmBad")
    assert err.value.peer == "QmBad"
    with pytest.raises(IntegrityError):
        TrainingState.from_bytes(_blob()[:-4])


def test_hostile_headers_are_refused() -> None:
    good = TrainingState(1, {"a": torch.zeros(2)}).header()

    def blob(header: dict[str, object], body: bytes = b"\0" * 8) -> bytes:
        head = encode(header)
        return MAGIC + len(head).to_bytes(4, "big") + head + body

    cases = [
        {**good, "tensors": [{**good["tensors"][0], "dtype": "object"}]},
        {**good, "tensors": [{**good["tensors"][0], "offset": 4}]},
        {**good, "tensors": [{**good["tensors"][0], "shape": [1 << 41]}]},
        {**good, "size": 1 << 40},
        {**good, "extra": 1},
        {**good, "tensors": [good["tensors"][0], good["tensors"][0]]},
        {**good, "v": 99},
    ]
    for header in cases:
        with pytest.raises(MalformedMessage):
            TrainingState.from_bytes(blob(header))
    assert TrainingState.from_bytes(blob(good)).digest() == TrainingState(1, {"a": torch.zeros(2)}).digest()


def _model_and_opt(seed: int, path: Path | None = None) -> tuple[torch.nn.Module, DiLoCo]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=0.01), SoloAverager("me"),
                 inner_steps=3, checkpoint=path)
    return model, opt


async def _train(model: torch.nn.Module, opt: DiLoCo, steps: int, offset: int) -> None:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 4, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    for s in range(offset, offset + steps):
        lo = (s * 8) % 512
        torch.nn.functional.mse_loss(model(x[lo : lo + 8]), y[lo : lo + 8]).backward()
        await opt.astep()
        opt.zero_grad()


async def test_resume_from_checkpoint_continues_exactly(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.p2pc"
    model, opt = _model_and_opt(0)
    await _train(model, opt, 12, 0)
    reference = opt.state_digest()

    model1, opt1 = _model_and_opt(0, ckpt)
    await _train(model1, opt1, 7, 0)  # checkpoints after steps 3 and 6; "crashes" after 7
    assert ckpt.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    model2, opt2 = _model_and_opt(99)  # a restarted process with other initial weights
    opt2.load_state(load_checkpoint(ckpt))
    assert opt2.outer_step == 2
    assert opt2.total_inner_steps == 6
    await _train(model2, opt2, 6, 6)  # loses only step 7, done again
    assert opt2.state_digest() == reference


async def test_shared_state_moves_anchor_and_momentum_only() -> None:
    model, opt = _model_and_opt(0)
    await _train(model, opt, 7, 0)
    shared = opt.export_state()
    assert not any(k.startswith(("local/", "inner/")) for k in shared.tensors)
    model2, opt2 = _model_and_opt(5)
    opt2.load_state(TrainingState.from_bytes(shared.to_bytes()))
    assert opt2.state_digest() == opt.state_digest()
    assert opt2.outer_step == 2
    assert opt2.local_steps == 0
    for a, p in zip(opt.anchor, model2.parameters(), strict=True):
        assert torch.equal(a, p.detach())


def test_mismatched_state_is_refused() -> None:
    _, opt = _model_and_opt(0)
    other = torch.nn.Linear(3, 3)
    wrong = DiLoCo(other, torch.optim.SGD(other.parameters(), lr=0.1), SoloAverager()).export_state()
    with pytest.raises(ConfigError):
        opt.load_state(wrong)


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04 a zip, or a pickle")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    good = tmp_path / "good"
    save_checkpoint(good, TrainingState(1, {"w": torch.ones(3)}))
    assert load_checkpoint(good).tensors["w"].sum() == 3



async def test_checkpoints_are_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serializing and fsyncing a checkpoint would stall the peer's network work: it runs in a thread."""
    calls: list[bool] = []

    def spy(path: str | os.PathLike[str], state: TrainingState) -> None:
        calls.append(trio.lowlevel.in_trio_run())
        save_checkpoint(path, state)

    monkeypatch.setattr(diloco_module, "save_checkpoint", spy)
    model, opt = _model_and_opt(0, tmp_path / "ckpt.p2pc")
    await _train(model, opt, 6, 0)
    assert calls == [False, False]
    assert load_checkpoint(tmp_path / "ckpt.p2pc").step == 2
