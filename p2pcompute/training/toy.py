"""A small model and the data it learns, generated on the fly (no downloads).

The task is teacher-student regression: a fixed random two-layer network (the *teacher*,
seeded) maps Gaussian inputs to targets; the *student* (:func:`make_model`) learns it from
batches drawn with each peer's own generator, so peers see different data. Used by the
examples, the demo, the benchmark and the tests.

Imports torch only.
"""

from __future__ import annotations

import torch

IN_FEATURES = 32
HIDDEN = 128


class TeacherTask:
    """Targets from a fixed random teacher network plus a little noise.

    Example::

        task = TeacherTask(seed=0)
        x, y = task.batch(64, torch.Generator().manual_seed(7))
        x_eval, y_eval = task.eval_set()
    """

    def __init__(self, seed: int = 0, *, noise: float = 0.01) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(IN_FEATURES, 64, generator=g) / IN_FEATURES**0.5
        self.w2 = torch.randn(64, 1, generator=g) / 8.0
        self.noise = noise
        self.seed = seed

    def targets(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        y = torch.tanh(x @ self.w1) @ self.w2
        if g is not None and self.noise:
            y = y + self.noise * torch.randn(y.shape, generator=g)
        return y

    def batch(self, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` fresh samples drawn with ``g``."""
        x = torch.randn(size, IN_FEATURES, generator=g)
        return x, self.targets(x, g)

    def eval_set(self, size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set (the same on every peer)."""
        g = torch.Generator().manual_seed(10_000 + self.seed)
        x = torch.randn(size, IN_FEATURES, generator=g)
        return x, self.targets(x)


def make_model(seed: int = 0) -> torch.nn.Module:
    """The student: a small MLP (about 21k parameters), initialised from ``seed``.

    Example::

        model = make_model(0)      # the same weights on every peer that uses seed 0
    """
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, 1),
    )
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / max(1, p.shape[-1]) ** 0.5
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
    return model


def evaluate(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean squared error of ``model`` on ``data``."""
    x, y = data
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def train_alone(
    steps: int, batch: int, *, seed: int = 0, data_seed: int = 1, lr: float = 3e-3
) -> tuple[torch.nn.Module, float]:
    """The same model trained alone with AdamW for ``steps`` steps of ``batch`` samples; (model, eval loss).

    Example::

        _, loss = train_alone(steps=600, batch=96)
    """
    task = TeacherTask(seed)
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        x, y = task.batch(batch, g)
        torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad()
    return model, evaluate(model, task.eval_set())
