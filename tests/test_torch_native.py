"""DiLoCo as a torch.optim.Optimizer: schedulers, GradScaler, autocast, clipping, accumulation, state_dict."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import torch
import trio

from p2pcompute.errors import ConfigError
from p2pcompute.training.averager import SoloAverager
from p2pcompute.training.diloco import DiLoCo, TrainingAlone

T = TypeVar("T")


def run_trio(fn: Callable[[], Awaitable[T]]) -> T:
    """A runner for a group of one: each outer step is its own short trio run."""
    return trio.run(fn)


def data(seed: int = 0, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, 1, generator=g)).tanh()
    return x, y


def model_and_opt(inner_steps: int = 4, **kw: object) -> tuple[torch.nn.Module, DiLoCo]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kw.setdefault("outer_momentum", 0.5)  # a short solo run: the recipe's 0.9 overshoots in 8 outer steps
    opt = DiLoCo(model, inner, SoloAverager("me"), inner_steps=inner_steps, runner=run_trio, **kw)  # type: ignore[arg-type]
    return model, opt


def test_is_an_optimizer_sharing_the_inner_groups_and_state() -> None:
    model, opt = model_and_opt()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.inner.param_groups
    assert opt.state is opt.inner.state
    model(torch.ones(2, 6)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


def test_training_loop_with_scheduler_scaler_autocast_clipping_and_accumulation() -> None:
    model, opt = model_and_opt(inner_steps=5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 needs no loss scaling
    x, y = data()
    accumulate, micro = 4, 16
    with torch.no_grad():
        start = float(torch.nn.functional.mse_loss(model(x), y))
    reports = []
    for step in range(40):
        for k in range(accumulate):
            lo = ((step * accumulate + k) * micro) % len(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x[lo : lo + micro]).float(), y[lo : lo + micro])
            scaler.scale(loss / accumulate).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        reports += [r for r in opt.history if r.outer_step > len(reports)]
    assert opt.total_inner_steps == 40
    assert opt.outer_step == 8
    assert [r.outer_step for r in reports] == list(range(1, 9))
    assert all(r.solo for r in reports)
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    with torch.no_grad():
        end = float(torch.nn.functional.mse_loss(model(x), y))
    assert end < start / 2, (start, end)


def test_grad_scaler_skips_inner_steps_with_infinite_gradients() -> None:
    model, opt = model_and_opt(inner_steps=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    for poison in (True, False):
        loss = model(torch.ones(4, 6)).sum()
        if poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if poison:
            assert opt.total_inner_steps == 0
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.total_inner_steps == 1
    assert scaler.get_scale() == 2.0**7


def test_cosine_schedule_gives_the_inner_optimizer_the_same_lrs_as_plain_torch() -> None:
    _, opt = model_and_opt(inner_steps=3)
    plain_model = torch.nn.Linear(6, 1)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(plain, T_max=12)
    seen = []
    for _ in range(12):
        opt.step()
        plain.step()
        s1.step()
        s2.step()
        seen.append((opt.inner.param_groups[0]["lr"], plain.param_groups[0]["lr"]))
    assert all(a == b for a, b in seen)
    assert seen[5][0] < 1e-2


def test_state_dict_round_trip_mid_round_continues_identically() -> None:
    x, y = data(1)

    def train(m: torch.nn.Module, o: DiLoCo, steps: range) -> None:
        for s in steps:
            lo = (s * 32) % len(x)
            torch.nn.functional.mse_loss(m(x[lo : lo + 32]), y[lo : lo + 32]).backward()
            o.step(samples=32)
            o.zero_grad()

    model, opt = model_and_opt(inner_steps=4)
    train(model, opt, range(10))  # 2 outer steps and 2 inner steps into the third round
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    assert {"state", "param_groups", "diloco"} <= set(saved)
    train(model, opt, range(10, 20))

    model2, opt2 = model_and_opt(inner_steps=4)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    assert (opt2.outer_step, opt2.local_steps) == (2, 2)
    train(model2, opt2, range(10, 20))
    assert opt2.state_digest() == opt.state_digest()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        opt2.load_state_dict(opt2.inner.state_dict())


def test_callbacks_see_every_outer_step_and_min_participants_fails_loudly() -> None:
    model, opt = model_and_opt(inner_steps=2, min_participants=2)
    seen: list[tuple[int, bool, str | None]] = []
    opt.add_callback(lambda r: seen.append((r.outer_step, r.solo, r.solo_reason)))
    model(torch.ones(2, 6)).sum().backward()
    assert opt.step() is None
    with pytest.raises(TrainingAlone, match="outer step 1 averaged 1 peer") as info:
        opt.step()
    assert info.value.report.outer_step == 1
    assert opt.outer_step == 1  # the step was applied; training may go on after catching it
    assert seen == [(1, True, "group of one")]
    with pytest.raises(ConfigError):
        model_and_opt(min_participants=0)
