"""The DiLoCo optimizer: local inner steps, then an outer step on the averaged pseudo-gradient.

:class:`DiLoCo` wraps a model's parameters and an ordinary torch optimizer (the *inner*
optimizer, AdamW in the DiLoCo recipe). Every ``inner_steps`` (H) calls to
:meth:`DiLoCo.step` it computes the pseudo-gradient ``anchor - params`` (the anchor is the
parameters at the last synchronisation, kept on ``anchor_device``), averages it through an
:class:`~p2pcompute.training.averager.Averager` weighted by the local samples, gives it to
the *outer* optimizer (torch's SGD with Nesterov momentum by default) as the anchor's
gradient, and copies the new anchor into the model. Every participant receives the same
average and applies the same deterministic update, so peers stay bit-identical.

``aggregator`` (``"mean"`` by default) picks how the group combines the pseudo-gradients:
``"centered_clip"`` or ``"trimmed_mean"`` keep training on course when a minority of peers send
garbage (see docs/design/averaging.md); it is passed to the averager only when it is not the mean.

``mode="per_step"`` is the classic data-parallel baseline: the gradients are averaged
before every inner step and there is no outer optimizer.

The shared state (anchor, outer momentum, outer step) is exported as a
:class:`~p2pcompute.training.state.TrainingState` for checkpoints and for joiners.

Training scripts are synchronous: :meth:`DiLoCo.step` runs the averaging through a
``runner`` (the :class:`~p2pcompute.training.swarm.Swarm` facade supplies one that hops to
its trio thread); trio code calls :meth:`DiLoCo.astep` directly.

Imports torch, trio, :mod:`p2pcompute.training.averager`, :mod:`.state`, errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.errors import ConfigError, LocalProtocolError, P2PComputeError
from p2pcompute.training.averager import Averager, AveragingOutcome, allreduce_bytes, check_codec
from p2pcompute.training.state import TrainingState, save_checkpoint

T = TypeVar("T")
Mode = Literal["diloco", "per_step"]


class Runner(Protocol):
    """Runs an async function to completion from synchronous code and returns its result."""

    def __call__(self, fn: Callable[[], Awaitable[T]]) -> T: ...


@dataclass(frozen=True)
class StepReport:
    """What one synchronisation did (an outer step, or one averaged inner step in per-step mode).

    ``per_step_bytes`` is what per-step gradient averaging would have sent for the same
    local steps in a group of the same size, for comparison with ``bytes_sent``.
    """

    mode: str
    outer_step: int
    local_steps: int
    participants: tuple[str, ...]
    bytes_sent: int
    per_step_bytes: int
    seconds: float
    error: str | None = None


def _named_params(
    params: torch.nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    out: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(params):
        if isinstance(item, torch.Tensor):
            out.append((f"p{i}", item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append((str(item[0]), item[1]))
        else:
            raise ConfigError("expected a module, tensors, or (name, tensor) pairs")
    return out


class DiLoCo:
    """DiLoCo around ``model`` and ``inner_optimizer``, averaging through ``averager``.

    Example::

        model = make_model()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt = DiLoCo(model, inner, swarm.averager, inner_steps=50, runner=swarm.call)
        # among strangers: DiLoCo(..., aggregator="centered_clip")
        for x, y in batches:
            loss = loss_fn(model(x), y)
            loss.backward()
            report = opt.step()          # an inner step; every 50th also averages
            opt.zero_grad()
            if report: print(report.outer_step, report.participants)
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        inner_optimizer: torch.optim.Optimizer,
        averager: Averager,
        *,
        inner_steps: int = 100,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        outer_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        mode: Mode = "diloco",
        compression: str = "none",
        timeout: float | None = None,
        anchor_device: str | torch.device | None = "cpu",
        runner: Runner | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        aggregator: str | Aggregator = "mean",
    ) -> None:
        if inner_steps < 1:
            raise ConfigError("inner_steps must be at least 1")
        if mode not in ("diloco", "per_step"):
            raise ConfigError(f"unknown mode {mode!r}")
        self.named = _named_params(model)
        if not self.named:
            raise ConfigError("no trainable parameters")
        self.params = [p for _, p in self.named]
        self.inner = inner_optimizer
        self.averager = averager
        self.inner_steps = inner_steps
        self.mode: Mode = mode
        self.compression = check_codec(compression)
        self.aggregator = Aggregator.of(aggregator)
        # an averager that predates the option still works for the mean
        self._avg_options: dict[str, Any] = {"aggregator": self.aggregator} if self.aggregator.robust else {}
        self.timeout = timeout
        self.runner = runner
        self.checkpoint = checkpoint
        self.outer_step = 0
        self.local_steps = 0
        self.total_inner_steps = 0
        self._weight = 0.0
        self.bytes_sent = 0
        self.per_step_bytes = 0
        self.history: list[StepReport] = []
        dev = None if anchor_device is None else torch.device(anchor_device)
        with torch.no_grad():
            self.anchor = [p.detach().to(dev or p.device, copy=True) for p in self.params]
        if outer_optimizer is not None:
            self.outer = outer_optimizer(self.anchor)
        else:
            self.outer = torch.optim.SGD(
                self.anchor, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov and outer_momentum > 0
            )

    # -- the training-loop side -------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (the inner optimizer's ``zero_grad``)."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, samples: float = 1.0) -> StepReport | None:
        """One inner step (blocking); averages when due. ``samples`` weighs this peer's contribution.

        Needs a ``runner`` (``swarm.call``) to reach the averager from synchronous code.
        """
        if self.runner is None:
            raise LocalProtocolError("DiLoCo.step() needs a runner; in trio code await astep() instead")
        if self.mode == "per_step" or self.local_steps + 1 >= self.inner_steps:
            return self.runner(lambda: self.astep(samples))
        self._inner_step(samples)
        return None

    async def astep(self, samples: float = 1.0) -> StepReport | None:
        """One inner step; every ``inner_steps`` also the outer step (or every step in per-step mode)."""
        if self.mode == "per_step":
            return await self._per_step(samples)
        self._inner_step(samples)
        if self.local_steps < self.inner_steps:
            return None
        return await self.outer_sync()

    def _inner_step(self, samples: float) -> None:
        self.inner.step()
        self.local_steps += 1
        self.total_inner_steps += 1
        self._weight += samples

    def pseudo_gradient(self) -> list[torch.Tensor]:
        """``anchor - params`` for every parameter, on the anchor's device, in the anchor's dtype."""
        with torch.no_grad():
            pairs = zip(self.anchor, self.params, strict=True)
            return [a - p.detach().to(a.device, a.dtype) for a, p in pairs]

    async def outer_sync(self) -> StepReport:
        """Average the pseudo-gradient now and apply the outer step (also usable early, before leaving)."""
        start = time.perf_counter()
        deltas = self.pseudo_gradient()
        weight = self._weight if self._weight > 0 else 1.0
        error: str | None = None
        try:
            outcome = await self.averager.average(
                deltas, weight=weight, round_id=self.outer_step, compression=self.compression,
                timeout=self.timeout, **self._avg_options,
            )
        except P2PComputeError as exc:
            # The round failed as a whole: step on our own pseudo-gradient so the local work is
            # kept; the next round (or a state download) brings us back in line with the group.
            error = f"{type(exc).__name__}: {exc}"
            outcome = AveragingOutcome((self.averager.peer_id,))
        with torch.no_grad():
            for a, d in zip(self.anchor, deltas, strict=True):
                a.grad = d
            self.outer.step()
            for a in self.anchor:
                a.grad = None
            for p, a in zip(self.params, self.anchor, strict=True):
                p.copy_(a)
        self.outer_step += 1
        per_step = self.local_steps * allreduce_bytes(self.params, "none", len(outcome.participants))
        report = StepReport(
            "diloco", self.outer_step, self.local_steps, outcome.participants, outcome.bytes_sent,
            per_step, time.perf_counter() - start, error,
        )
        self._account(report)
        self.local_steps = 0
        self._weight = 0.0
        if self.checkpoint is not None:
            # serialization and the fsyncs of an atomic write take long enough to stall the peer's
            # network work (heartbeats, other peers' transfers): they run in a worker thread
            await trio.to_thread.run_sync(save_checkpoint, self.checkpoint, self.export_state(local=True))
        return report

    async def _per_step(self, samples: float) -> StepReport:
        start = time.perf_counter()
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        error: str | None = None
        try:
            outcome = await self.averager.average(
                grads, weight=samples, round_id=self.total_inner_steps, compression=self.compression,
                timeout=self.timeout, **self._avg_options,
            )
        except P2PComputeError as exc:
            error = f"{type(exc).__name__}: {exc}"
            outcome = AveragingOutcome((self.averager.peer_id,))
        self._inner_step(samples)
        self.outer_step = self.total_inner_steps
        report = StepReport(
            "per_step", self.outer_step, 1, outcome.participants, outcome.bytes_sent,
            outcome.bytes_sent, time.perf_counter() - start, error,
        )
        self._account(report)
        self.local_steps = 0
        self._weight = 0.0
        with torch.no_grad():
            for a, p in zip(self.anchor, self.params, strict=True):
                a.copy_(p.detach())
        return report

    def _account(self, report: StepReport) -> None:
        self.bytes_sent += report.bytes_sent
        self.per_step_bytes += report.per_step_bytes
        self.history.append(report)

    def statistics(self) -> dict[str, Any]:
        """Counters: steps, outer steps, bytes sent, and what per-step averaging would have sent."""
        return {
            "mode": self.mode,
            "outer_step": self.outer_step,
            "total_inner_steps": self.total_inner_steps,
            "local_steps": self.local_steps,
            "bytes_sent": self.bytes_sent,
            "per_step_bytes": self.per_step_bytes,
        }

    # -- state ------------------------------------------------------------------------------

    def export_state(self, *, local: bool = False) -> TrainingState:
        """The shared state (anchor, outer momentum, outer step); with ``local`` also this peer's extras.

        The extras are the current parameters, the inner optimizer's tensors and the
        step counters: what a restarted peer needs and a joiner must not take from others.
        """
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for (name, _), a in zip(self.named, self.anchor, strict=True):
                tensors[f"param/{name}"] = a.detach().to("cpu", copy=True)
                buf = self.outer.state.get(a, {}).get("momentum_buffer")
                if isinstance(buf, torch.Tensor):
                    tensors[f"outer/{name}"] = buf.detach().to("cpu", copy=True)
        meta: dict[str, int | float | str | bool] = {"mode": self.mode, "inner_steps": self.inner_steps}
        if local:
            meta["local_steps"] = self.local_steps
            meta["total_inner_steps"] = self.total_inner_steps
            with torch.no_grad():
                for name, p in self.named:
                    tensors[f"local/{name}"] = p.detach().to("cpu", copy=True)
                index = self._inner_index()
                for p, st in self.inner.state.items():
                    i = index.get(id(p))
                    if i is None:
                        continue
                    for key, value in st.items():
                        if isinstance(value, torch.Tensor):
                            tensors[f"inner/{i}/{key}"] = value.detach().to("cpu", copy=True)
                        elif isinstance(value, int | float | bool):
                            meta[f"inner/{i}/{key}"] = value
        return TrainingState(self.outer_step, tensors, meta)

    def _inner_index(self) -> dict[int, int]:
        # torch numbers optimizer state by position over all param groups, in order.
        flat = [p for group in self.inner.param_groups for p in group["params"]]
        return {id(p): i for i, p in enumerate(flat)}

    def state_digest(self) -> bytes:
        """SHA-256 of the shared state: equal on every peer that took part in the same rounds."""
        return self.export_state().digest()

    def load_state(self, state: TrainingState) -> None:
        """Adopt ``state`` (from a checkpoint or from peers); checks names, shapes and dtypes first.

        Shared state only moves the anchor, the outer momentum and the step; the model's
        parameters are set to the anchor. Local extras, when present, restore this peer's
        progress within the round and its inner optimizer.
        """
        if state.meta.get("mode", self.mode) != self.mode:
            raise ConfigError(f"state is for mode {state.meta.get('mode')!r}, not {self.mode!r}")
        for name, a in zip((n for n, _ in self.named), self.anchor, strict=True):
            t = state.tensors.get(f"param/{name}")
            if t is None or t.shape != a.shape or t.dtype != a.dtype:
                raise ConfigError(f"state does not match the model at parameter {name!r}")
        known = {f"param/{n}" for n, _ in self.named} | {f"outer/{n}" for n, _ in self.named}
        known |= {f"local/{n}" for n, _ in self.named}
        for key in state.tensors:
            if key not in known and not key.startswith("inner/"):
                raise ConfigError(f"state has an unexpected tensor {key!r}")
        with torch.no_grad():
            for (name, p), a in zip(self.named, self.anchor, strict=True):
                a.copy_(state.tensors[f"param/{name}"])
                buf = state.tensors.get(f"outer/{name}")
                if buf is not None:
                    if buf.shape != a.shape:
                        raise ConfigError(f"outer momentum for {name!r} has the wrong shape")
                    self.outer.state[a]["momentum_buffer"] = buf.to(a.device, a.dtype, copy=True)
                else:
                    self.outer.state.pop(a, None)
                local = state.tensors.get(f"local/{name}")
                p.copy_(local if local is not None and local.shape == p.shape else a)
        self.outer_step = state.step
        self.local_steps = int(state.meta.get("local_steps", 0))
        self.total_inner_steps = int(state.meta.get("total_inner_steps", self.total_inner_steps))
        self._weight = float(self.local_steps)
        self._load_inner(state)

    def _load_inner(self, state: TrainingState) -> None:
        per_param: dict[int, dict[str, Any]] = {}
        for key, t in state.tensors.items():
            if key.startswith("inner/"):
                _, idx, name = key.split("/", 2)
                per_param.setdefault(int(idx), {})[name] = t
        for key, v in state.meta.items():
            if key.startswith("inner/"):
                _, idx, name = key.split("/", 2)
                per_param.setdefault(int(idx), {})[name] = v
        if not per_param:
            return
        if any(not 0 <= i < len(self._inner_index()) for i in per_param):
            raise ConfigError("inner optimizer state names a parameter the model does not have")
        current = self.inner.state_dict()
        self.inner.load_state_dict({"state": per_param, "param_groups": current["param_groups"]})
