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


# -- a language-modelling task --------------------------------------------------------------------

VOCAB = 16
CONTEXT = 2


class MarkovTextTask:
    """Next-token prediction on text from a fixed random Markov source (order ``CONTEXT``).

    Each context of ``CONTEXT`` tokens has its own next-token distribution, drawn once from a
    sparse Dirichlet (most mass on a few tokens, like real text), so the source has an
    entropy well above zero: the best possible cross-entropy, :meth:`floor`, is that of the
    source itself. This is the regime where language models are trained, and where a
    final-loss comparison means something: the teacher regression above drives its loss
    towards zero, where any gap is a large fraction of a small number.

    Example::

        task = MarkovTextTask(seed=0)
        model = task.make_model(0)
        x, y = task.batch(64, torch.Generator().manual_seed(7))
        loss = task.loss(model(x), y)
        print(task.evaluate(model), ">=", task.floor())
    """

    def __init__(self, seed: int = 0, *, concentration: float = 0.1) -> None:
        # torch's Dirichlet draws from the global generator: seed it inside fork_rng, which
        # gives the caller's generator state back afterwards
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dirichlet = torch.distributions.Dirichlet(torch.full((VOCAB,), concentration))
            probs = dirichlet.sample((VOCAB**CONTEXT,))
        probs = probs.clamp_min(1e-9)  # a token the draw made impossible stays merely very unlikely
        self.probs = probs / probs.sum(dim=1, keepdim=True)  # [context index, next token]
        self.seed = seed

    def _contexts(self, size: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, VOCAB, (size, CONTEXT), generator=g)

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.zeros(x.shape[0], dtype=torch.long)
        for k in range(CONTEXT):
            index = index * VOCAB + x[:, k]
        return index

    def batch(self, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` (context, next token) pairs drawn with ``g``: contexts uniform, tokens from the source."""
        x = self._contexts(size, g)
        y = torch.multinomial(self.probs[self._index(x)], 1, generator=g).squeeze(1)
        return x, y

    def eval_set(self, size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set (the same on every peer)."""
        return self.batch(size, torch.Generator().manual_seed(20_000 + self.seed))

    @staticmethod
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in nats per token."""
        return torch.nn.functional.cross_entropy(out, y)

    @staticmethod
    def make_model(seed: int = 0) -> torch.nn.Module:
        """A small neural n-gram model (about 11k parameters): embeddings, an MLP, logits.

        Example::

            model = MarkovTextTask.make_model(0)   # the same weights on every peer that uses seed 0
        """
        g = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Embedding(VOCAB, 32),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * CONTEXT, HIDDEN), torch.nn.GELU(),
            torch.nn.Linear(HIDDEN, VOCAB),
        )
        with torch.no_grad():
            for p in model.parameters():
                bound = 1.0 / max(1, p.shape[-1]) ** 0.5
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
        return model

    def evaluate(self, model: torch.nn.Module) -> float:
        """Cross-entropy of ``model`` on the held-out set (nats per token)."""
        x, y = self.eval_set()
        with torch.no_grad():
            return float(self.loss(model(x), y))

    def floor(self) -> float:
        """The source's own cross-entropy on the held-out set: no model can do better on average."""
        x, y = self.eval_set()
        return float(-self.probs[self._index(x), y].log().mean())
