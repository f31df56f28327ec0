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

:class:`DiLoCo` *is* a :class:`torch.optim.Optimizer`: its ``param_groups`` and ``state`` are the
inner optimizer's own (the same objects), so lr schedulers, ``torch.amp.GradScaler``, gradient
clipping and accumulation work as with the inner optimizer alone; ``state_dict()`` is the inner
optimizer's dict plus a ``"diloco"`` entry (anchor, outer optimizer, counters).

Precision: parameters in bf16/fp16 get an fp32 *master* anchor and fp32 outer-optimizer state by
default (``master_dtype="auto"``); the pseudo-gradient is the model's progress since the last outer
step, ``round(anchor) - params``, computed and averaged in the anchor's dtype, so the rounding of the
anchor into the model's dtype never shows up as a fake update.

Buffers (``buffers="average"``, the default for a module): floating-point buffers such as
BatchNorm's running mean and variance are averaged with the same sample weights in every outer
step (in fp32 for low-precision buffers) and are part of the shared state; integer buffers
(``num_batches_tracked``) stay local. ``buffers="local"`` leaves all buffers alone.

Overlapped outer steps (``overlap="eager"``, or ``True``; ``"delayed"``): at the end of inner
phase k the phase's progress is averaged in a background task (in ``nursery``; the
:class:`~p2pcompute.training.swarm.Swarm` supplies its own) while the inner steps of phase k+1 run;
the average is applied to the shared anchor at the end of phase k+1, one phase late. The model
is rebased on the newest anchor at every phase boundary so the delay never accumulates:
``"delayed"`` keeps the newest phase's own progress on top of it (``anchor - delta``);
``"eager"`` takes a trial outer step (on copies; the shared state is untouched) on the landed
average with this peer's stale share swapped for its fresh progress. Overlapped, the outer
optimizer defaults to lr 0.8 and momentum 0.6 (0.9 overshoots on a one-round-stale average). Peers that took
part in the same rounds hold bit-identical anchors and momentum (:meth:`DiLoCo.state_digest`). The
choice and its figures are in docs/design/training.md. :meth:`DiLoCo.flush` lands the last round.

Peers of unequal speed (``join_early=True``): a round is called by the swarm's progress, not
only by this peer's own count. When another peer starts averaging the round of this peer's
current phase (the :class:`~p2pcompute.training.swarm.Swarm` hears its matchmaking advert and
calls :meth:`DiLoCo.note_round`), the next inner step ends the phase, however many steps it
did, and its partial pseudo-gradient joins the round weighted by its samples: the average is
the sample-weighted mean of everyone's progress, and a peer 3x slower contributes a third as
much to every round instead of missing them all (docs/design/training.md). Weights are the
peers' own claims: ``weight_cap`` caps each at that multiple of its group's median before
averaging (the swarm sets 4 with ``join_early``).

Training scripts are synchronous: :meth:`DiLoCo.step` runs the averaging through a
``runner`` (the :class:`~p2pcompute.training.swarm.Swarm` facade supplies one that hops to
its trio thread); trio code calls :meth:`DiLoCo.astep` directly.

Imports torch, trio, :mod:`p2pcompute.training.averager`, :mod:`.state`, errors.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, cast

import torch
import trio

from p2pcompute.collective.aggregate import Aggregator
from p2pcompute.errors import ConfigError, LocalProtocolError, P2PComputeError
from p2pcompute.training.averager import Averager, AveragingOutcome, allreduce_bytes, check_codec
from p2pcompute.training.checkpoint import Checkpoint
from p2pcompute.training.checkpoint import prepare as prepare_checkpoint
from p2pcompute.training.checkpoint import write as write_checkpoint
from p2pcompute.training.state import TrainingState, save_checkpoint

log = logging.getLogger(__name__)
T = TypeVar("T")
Mode = Literal["diloco", "per_step"]
BufferRule = Literal["average", "local"]
Overlap = Literal["eager", "delayed"]
#: what ``overlap=True`` means (chosen by measurement: docs/design/training.md)
DEFAULT_OVERLAP: Overlap = "delayed"
LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_CALLED = 64  # rounds heard called ahead of our phase that we remember (join_early)


class Runner(Protocol):
    """Runs an async function to completion from synchronous code and returns its result."""

    def __call__(self, fn: Callable[[], Awaitable[T]]) -> T: ...


@dataclass(frozen=True)
class StepReport:
    """What one synchronisation did (an outer step, or one averaged inner step in per-step mode).

    ``per_step_bytes`` is what per-step gradient averaging would have sent for the same
    local steps in a group of the same size, for comparison with ``bytes_sent``. ``error`` is
    set when the averaging round failed; ``solo`` and ``solo_reason`` say when a step was taken
    alone, failed or not.
    """

    mode: str
    outer_step: int
    local_steps: int
    participants: tuple[str, ...]
    bytes_sent: int
    per_step_bytes: int
    seconds: float
    error: str | None = None
    #: why the step was averaged with nobody else (None when others took part): the failed
    #: round's error, "no other peer of this run known", or "group of one" (no network)
    solo_reason: str | None = None
    #: seconds the inner steps waited for this round (the whole round when not overlapped; on
    #: trio's clock when overlapped)
    waited: float = 0.0
    #: True when the round ran in the background during the next inner phase
    overlapped: bool = False
    #: True when the phase ended before ``inner_steps`` (the swarm called the round with
    #: ``join_early``, or ``outer_sync()`` was called early): ``local_steps`` is the partial phase
    early: bool = False

    @property
    def solo(self) -> bool:
        """True when this peer's pseudo-gradient was averaged with nobody else's."""
        return len(self.participants) <= 1


@dataclass
class _Round:
    """A background averaging round of overlapped mode: what it averages and how it ended."""

    tensors: list[torch.Tensor]
    n_deltas: int
    weight: float
    round_id: int
    local_steps: int
    started: float
    early: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    outcome: AveragingOutcome | None = None
    error: str | None = None
    config_error: ConfigError | None = None
    finished: float = 0.0
    own: list[torch.Tensor] = field(default_factory=list)  # our contribution (eager mode)


def _overlap_rule(value: bool | str) -> Overlap | None:
    if value is False or value is None:
        return None
    if value is True:
        return DEFAULT_OVERLAP
    if value in ("eager", "delayed"):
        return cast(Overlap, value)
    raise ConfigError(f"overlap must be False, True, 'eager' or 'delayed', not {value!r}")


def _master_dtype(p: torch.Tensor, rule: torch.dtype | str | None) -> torch.dtype:
    if rule is None or not p.is_floating_point():
        return p.dtype
    if rule == "auto":
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype
    if isinstance(rule, torch.dtype) and rule.is_floating_point:
        return rule
    raise ConfigError(f"master_dtype must be 'auto', None or a floating dtype, not {rule!r}")


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


class DiLoCo(torch.optim.Optimizer):
    """DiLoCo around ``model`` and ``inner_optimizer``, averaging through ``averager``.

    A :class:`torch.optim.Optimizer` whose ``param_groups`` and ``state`` are those of
    ``inner_optimizer``: schedulers, ``GradScaler``, ``clip_grad_norm_`` and gradient
    accumulation work unchanged (``step()`` returns a :class:`StepReport` after an outer step,
    else None).

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
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        nesterov: bool = True,
        outer_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        mode: Mode = "diloco",
        compression: str = "none",
        timeout: float | None = None,
        anchor_device: str | torch.device | None = "cpu",
        runner: Runner | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        aggregator: str | Aggregator = "mean",
        master_dtype: torch.dtype | Literal["auto"] | None = "auto",
        buffers: BufferRule = "average",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        keep_checkpoints: int = 3,
        min_participants: int = 1,
        overlap: bool | Overlap = False,
        nursery: trio.Nursery | None = None,
        land_early: bool = False,
        join_early: bool = False,
        weight_cap: float | None = None,
    ) -> None:
        if inner_steps < 1:
            raise ConfigError("inner_steps must be at least 1")
        if mode not in ("diloco", "per_step"):
            raise ConfigError(f"unknown mode {mode!r}")
        if buffers not in ("average", "local"):
            raise ConfigError(f"buffers must be 'average' or 'local', not {buffers!r}")
        if keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be at least 1")
        if min_participants < 1:
            raise ConfigError("min_participants must be at least 1")
        self.module = model if isinstance(model, torch.nn.Module) else None
        self.named = _named_params(model)
        if not self.named:
            raise ConfigError("no trainable parameters")
        # floating buffers averaged in each outer step (BatchNorm running stats and the like)
        self.buffer_rule: BufferRule = buffers
        self.named_buffers: list[tuple[str, torch.Tensor]] = []
        if self.module is not None and buffers == "average" and mode == "diloco":
            self.named_buffers = [(n, b) for n, b in self.module.named_buffers() if b.is_floating_point()]
        self.master_dtype = master_dtype
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.min_participants = min_participants
        self.overlap: Overlap | None = _overlap_rule(overlap)
        if self.overlap is not None and mode != "diloco":
            raise ConfigError("overlap is for mode='diloco'")
        #: where overlapped rounds run (set by Swarm.diloco; pure trio code passes its own)
        self.nursery = nursery
        #: overlap="delayed": apply a round at the first inner step after it lands, mid-phase,
        #: instead of at the next phase boundary (the delay is then the round's time, not a phase).
        #: Off by default: a joiner's catch-up (fetch the state after the round in flight) can then
        #: return a state that already holds the round it entered early, which it cannot yet tell
        #: apart from one without it (tests/test_training_overlap.py's joiner test hangs with it on)
        self.land_early = land_early
        #: end the inner phase at the next step once the swarm has called its round (note_round)
        self.join_early = bool(join_early)
        if self.join_early and mode != "diloco":
            raise ConfigError("join_early is for mode='diloco'")
        #: rounds other peers were heard calling, from our phase on (replaced, never mutated in
        #: place by a reader: note_round runs on the trio thread, step() on the user's)
        self._called: frozenset[int] = frozenset()
        self._pending: _Round | None = None
        #: overlapped mode: the parameters at the start of this inner phase (anchor's device and
        #: dtype); None means the anchor (the phase started from it, as in blocking mode)
        self._phase_start: list[torch.Tensor] | None = None
        #: a joiner that adopted a state while its round was in flight needs the state after that
        #: round (this outer step) before its first round; ``catch_up(step)`` fetches it
        self._catch_up_to: int | None = None
        self.catch_up: Callable[[int], Awaitable[TrainingState | None]] | None = None
        #: optional ``() -> dict`` of JSON values stored in each checkpoint's manifest (a scheduler's state)
        self.checkpoint_extra: Callable[[], dict[str, Any]] | None = None
        #: shared string tags (run id, model digest) that a state must carry to be loaded
        self.tags: dict[str, str] = {}
        self.callbacks: list[Callable[[StepReport], None]] = []
        self._buffer_state: list[torch.Tensor] | None = None
        self._pinned: list[torch.Tensor] | None = None
        #: the checkpoint this optimizer was resumed from (set by ``Swarm.diloco``), for its ``extra``
        self.resumed: Checkpoint | None = None
        self.params = [p for _, p in self.named]
        self.inner = inner_optimizer
        self.averager = averager
        self.inner_steps = inner_steps
        self.mode: Mode = mode
        self.compression = check_codec(compression)
        self.aggregator = Aggregator.of(aggregator)
        # an averager that predates the option still works for the mean
        passed = self.aggregator.keeps_rows  # robust, or the mean with its parts checked
        self._avg_options: dict[str, Any] = {"aggregator": self.aggregator} if passed else {}
        if weight_cap is not None:
            if not (math.isfinite(weight_cap) and weight_cap >= 1):
                raise ConfigError(f"weight_cap must be finite and >= 1, not {weight_cap!r}")
            # passed only when set: an averager that predates the option still works without it
            self._avg_options["weight_cap"] = float(weight_cap)
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
            self.anchor = [
                p.detach().to(dev or p.device, _master_dtype(p, master_dtype), copy=True) for p in self.params
            ]
        # blocking: DiLoCo's 0.7 and 0.9; overlapped: 0.8 and 0.6, the best of a sweep against the
        # one-phase delay (momentum 0.9 on a stale average overshoots; docs/design/training.md)
        lr_default, momentum_default = (0.7, 0.9) if self.overlap is None else (0.8, 0.6)
        outer_lr = lr_default if outer_lr is None else outer_lr
        outer_momentum = momentum_default if outer_momentum is None else outer_momentum
        if outer_optimizer is not None:
            self.outer = outer_optimizer(self.anchor)
        else:
            self.outer = torch.optim.SGD(
                self.anchor, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov and outer_momentum > 0
            )
        # The torch.optim.Optimizer side: hooks and bookkeeping from the base class, then the
        # inner optimizer's param_groups, state and defaults themselves (shared, not copied), so a
        # scheduler that sets group["lr"] here sets it for the inner optimizer.
        self._bound = False
        self._own_groups: list[dict[str, Any]] = []
        self._own_state: Any = {}
        super().__init__([p for g in inner_optimizer.param_groups for p in g["params"]], {})
        self.defaults = inner_optimizer.defaults
        self._bound = True

    # Properties, not aliases: the inner optimizer's load_state_dict() rebinds its lists, and a
    # scheduler holding on to an old list would no longer change the lr the inner steps use.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's ``param_groups`` (what schedulers and GradScaler see and change)."""
        return self.inner.param_groups if self._bound else self._own_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self._bound:
            self.inner.param_groups = value
        else:
            self._own_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The inner optimizer's per-parameter ``state``."""
        return self.inner.state if self._bound else self._own_state

    @state.setter
    def state(self, value: Any) -> None:
        if self._bound:
            self.inner.state = value
        else:
            self._own_state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported once built: DiLoCo's anchor covers exactly the parameters it was given."""
        if getattr(self, "_bound", True):
            raise ConfigError("add parameter groups to the inner optimizer before wrapping it in DiLoCo")
        super().add_param_group(param_group)

    # -- the training-loop side -------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (the inner optimizer's ``zero_grad``)."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, samples: float = 1.0
    ) -> StepReport | None:
        """One inner step (blocking); averages when due. ``samples`` weighs this peer's contribution.

        ``closure``, as in torch, re-evaluates the loss (called with gradients enabled before the
        inner step). Needs a ``runner`` (``swarm.call``) to reach the averager from synchronous code.
        """
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.runner is None:
            raise LocalProtocolError("DiLoCo.step() needs a runner; in trio code await astep() instead")
        if self.mode == "per_step" or self.local_steps + 1 >= self.inner_steps or self._round_called():
            return self.runner(lambda: self.astep(samples))
        self._inner_step(samples)
        if self._landed():
            return self.runner(self.flush)  # once per round: the thread hop is paid when it lands
        return None

    def finish(self) -> StepReport | None:
        """Blocking :meth:`flush`: land the overlapped round in flight (None when there is none).

        Example::

            for x, y in batches:
                loss_fn(model(x), y).backward()
                opt.step(); opt.zero_grad()
            opt.finish()       # with overlap=True: the last outer step, applied
        """
        if self._pending is None:
            return None
        if self.runner is None:
            raise LocalProtocolError("DiLoCo.finish() needs a runner; in trio code await flush() instead")
        return self.runner(self.flush)

    async def astep(self, samples: float = 1.0) -> StepReport | None:
        """One inner step; every ``inner_steps`` also the outer step (or every step in per-step mode)."""
        if self.mode == "per_step":
            return await self._per_step(samples)
        self._inner_step(samples)
        if self.local_steps < self.inner_steps and not self._round_called():
            return await self.flush() if self._landed() else None
        if self.overlap is not None:
            return await self._overlapped_sync()
        return await self.outer_sync()

    def _landed(self) -> bool:
        """A delayed round has landed mid-phase and is to be applied now (``land_early``)."""
        job = self._pending
        return job is not None and self.land_early and self.overlap == "delayed" and job.done.is_set()
    @property
    def phase(self) -> int:
        """The index of the current inner phase: the round id its end averages under.

        Equal to :attr:`outer_step` in blocking mode; one more while an overlapped round is in flight.
        """
        return self.outer_step + (1 if self._pending is not None else 0)

    def note_round(self, round_id: int) -> None:
        """Another peer started averaging round ``round_id`` (``join_early``: we end our phase too).

        With ``join_early``, when ``round_id`` is this peer's :attr:`phase`, the next inner step
        ends the phase and its partial progress joins the round, weighted by the samples it did.
        Safe to call from any thread (the swarm calls it from its trio thread for every advert).

        Example::

            opt = DiLoCo(model, inner, averager, inner_steps=100, join_early=True, runner=run)
            opt.note_round(opt.phase)   # the next step() averages, however many steps it did
        """
        phase = self.phase
        if round_id < phase or round_id in self._called:
            return
        # a set, not the newest: one advert of a far-off round must not hide the next one
        kept = [r for r in self._called if r >= phase]
        if len(kept) < _MAX_CALLED:
            self._called = frozenset((*kept, round_id))

    def _round_called(self) -> bool:
        # only the round of our own phase: a later one means we are behind (the re-sync's job)
        return self.join_early and self.phase in self._called

    def _inner_step(self, samples: float) -> None:
        self.inner.step()
        self.local_steps += 1
        self.total_inner_steps += 1
        self._weight += samples

    def pseudo_gradient(self) -> list[torch.Tensor]:
        """``anchor - params`` for every parameter, on the anchor's device, in the anchor's dtype.

        With an fp32 master anchor for low-precision parameters this is ``round(anchor) - params``
        (``round`` into the parameter's dtype): the inner steps' progress, without the rounding.
        """
        with torch.no_grad():
            staged = self._stage_params()
            out = []
            starts: list[torch.Tensor | None] = [None] * len(self.anchor)
            if self._phase_start is not None:
                starts = list(self._phase_start)
            for a, s, p in zip(self.anchor, starts, staged, strict=True):
                start = s if s is not None else a if a.dtype == p.dtype else a.to(p.dtype).to(a.dtype)
                out.append(start - p.to(a.device, a.dtype))
            return out

    def _staging(self) -> list[torch.Tensor] | None:
        # CUDA parameters with a CPU anchor move through page-locked buffers, allocated once:
        # the copies are asynchronous and one synchronisation per outer step replaces one per
        # parameter. None when there is nothing to stage (CPU model, or the anchor on the GPU).
        if self._pinned is None:
            if not any(p.is_cuda and not a.is_cuda for p, a in zip(self.params, self.anchor, strict=True)):
                return None
            self._pinned = [
                torch.empty(p.shape, dtype=p.dtype, pin_memory=True) if p.is_cuda and not a.is_cuda else p
                for p, a in zip(self.params, self.anchor, strict=True)
            ]
        return self._pinned

    def _stage_params(self) -> list[torch.Tensor]:
        """The parameters as the anchor's side sees them (pinned CPU copies of CUDA parameters)."""
        pinned = self._staging()
        if pinned is None:
            return [p.detach() for p in self.params]
        devices = set()
        for buf, p in zip(pinned, self.params, strict=True):
            if buf is not p:
                # ordered after the previous outer step's upload from ``buf`` on the same stream
                buf.copy_(p.detach(), non_blocking=True)
                devices.add(p.device)
        for dev in devices:
            torch.cuda.current_stream(dev).synchronize()
        return pinned

    def _outer_update(self, deltas: Sequence[torch.Tensor]) -> None:
        """The outer optimizer's step on the anchor with ``deltas`` (averaged or our own) as grads."""
        for a, d in zip(self.anchor, deltas, strict=True):
            a.grad = d
        self.outer.step()
        for a in self.anchor:
            a.grad = None

    def _load_params(self) -> None:
        """Copy the anchor into the model; uploads to CUDA go through the pinned buffers, not waited for."""
        pinned = self._staging()
        for i, (p, a) in enumerate(zip(self.params, self.anchor, strict=True)):
            if pinned is None or pinned[i] is p:
                p.copy_(a)
            else:
                pinned[i].copy_(a)  # the download of this outer step has completed (synchronised)
                p.copy_(pinned[i], non_blocking=True)

    def _buffer_values(self) -> list[torch.Tensor]:
        dev = self.anchor[0].device
        with torch.no_grad():
            return [
                b.detach().to(dev, torch.float32 if b.dtype in LOW_PRECISION else b.dtype, copy=True)
                for _, b in self.named_buffers
            ]

    async def outer_sync(self) -> StepReport:
        """Average the pseudo-gradient now and apply the outer step (also usable early, before leaving).

        In overlapped mode the round in flight lands first (:meth:`flush`).
        """
        await self.flush()
        start = time.perf_counter()
        early = 0 < self.local_steps < self.inner_steps
        deltas = self.pseudo_gradient()
        bufs = self._buffer_values()
        weight = self._weight if self._weight > 0 else 1.0
        error: str | None = None
        try:
            outcome = await self.averager.average(
                deltas + bufs, weight=weight, round_id=self.outer_step, compression=self.compression,
                timeout=self.timeout, **self._avg_options,
            )
        except ConfigError:
            raise  # our own misconfiguration (a bad name, a wrong codec) is not a failed round
        except P2PComputeError as exc:
            # The round failed as a whole: step on our own pseudo-gradient so the local work is
            # kept; the next round (or a state download) brings us back in line with the group.
            error = f"{type(exc).__name__}: {exc}"
            outcome = AveragingOutcome((self.averager.peer_id,))
        with torch.no_grad():
            self._outer_update(deltas)
            self._load_params()
            for (_, b), v in zip(self.named_buffers, bufs, strict=True):
                b.copy_(v)
        self._buffer_state = bufs
        self.outer_step += 1
        per_step = self.local_steps * allreduce_bytes(self.params, "none", len(outcome.participants))
        report = StepReport(
            "diloco", self.outer_step, self.local_steps, outcome.participants, outcome.bytes_sent,
            per_step, time.perf_counter() - start, error, self._solo_reason(outcome, error),
            waited=time.perf_counter() - start, early=early,
        )
        self._log(report)
        self._account(report)
        self.local_steps = 0
        self._weight = 0.0
        await self._save()
        self._notify(report)
        self._check_alone(report)
        return report

    def _check_alone(self, report: StepReport) -> None:
        if len(report.participants) < self.min_participants:
            raise TrainingAlone(
                f"outer step {report.outer_step} averaged {len(report.participants)} peer(s), "
                f"min_participants is {self.min_participants}"
                + (f" ({report.error})" if report.error else ""),
                report=report,
            )

    async def _save(self) -> None:
        # serialization and the fsyncs of an atomic write take long enough to stall the peer's
        # network work (heartbeats, other peers' transfers): they run in a worker thread
        if self.checkpoint is not None:
            await trio.to_thread.run_sync(save_checkpoint, self.checkpoint, self.export_state(local=True))
        if self.checkpoint_dir is not None:
            files = prepare_checkpoint(self)
            await trio.to_thread.run_sync(write_checkpoint, self.checkpoint_dir, files, self.keep_checkpoints)

    # -- overlapped outer steps ---------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """True while an overlapped round is in flight (started, not yet applied)."""
        return self._pending is not None

    async def _overlapped_sync(self) -> StepReport | None:
        """End of an inner phase in overlapped mode: land the round in flight, start the next one."""
        if self.nursery is None:
            raise ConfigError("overlap needs a nursery for its background rounds (Swarm.diloco supplies one)")
        t0 = trio.current_time()
        report: StepReport | None = None
        deltas = self.pseudo_gradient()  # this phase's progress, from where the phase started
        bufs = self._buffer_values()
        weight = self._weight if self._weight > 0 else 1.0
        target: list[torch.Tensor] | None = None
        early: _Round | None = None
        if self._catch_up_to is not None:
            # a joiner's first boundary: the swarm's round of our state's step has landed by now
            # (or soon); adopt the state after it, keep our phase's progress, join the next round
            step, self._catch_up_to = self._catch_up_to, None
            if self._pending is None:
                # ... whose matchmaking starts now, before the fetch: a joiner that arrived after
                # the others' settle window found their round closed and lost a phase re-syncing
                early = _Round(
                    [t.clone() for t in deltas + bufs], len(deltas), weight, step, self.local_steps,
                    trio.current_time(), own=[d.clone() for d in deltas] if self.overlap == "eager" else [],
                )
                self.nursery.start_soon(self._run_round, early, name=f"diloco-round-{step}")
            state = await self.catch_up(step) if self.catch_up is not None else None
            if state is not None and state.step >= step:
                self._adopt_shared(state)
                if early is not None and state.step > step:
                    # the fetch took longer than a phase: the state already holds the round we
                    # entered early; take part in the newest one instead (as before this change)
                    early.scope.cancel()
                    early = None
            else:
                log.warning("joined during a round and could not fetch the state after it")
                if early is not None:  # its average would land on a stale anchor: leave it
                    early.scope.cancel()
                    early = None
        if self._pending is not None:
            job = self._pending
            await job.done.wait()
            if self.overlap == "eager" and job.config_error is None:
                target = self._eager_target(job, deltas)  # from the anchor the round started on
            report = self._land(job, t0)
        if target is None:
            with torch.no_grad():
                if self.overlap == "eager":
                    target = self._trial_outer(deltas)  # the first phase: nothing landed yet
                else:
                    target = [a - d for a, d in zip(self.anchor, deltas, strict=True)]
        self._rebase(target)
        job = early or _Round(
            deltas + bufs, len(deltas), weight, self.outer_step, self.local_steps, trio.current_time(),
            early=self.local_steps < self.inner_steps,
            own=[d.clone() for d in deltas] if self.overlap == "eager" else [],
        )
        self.local_steps = 0
        self._weight = 0.0
        self._pending = job
        if early is None:
            self.nursery.start_soon(self._run_round, job, name=f"diloco-round-{job.round_id}")
        if report is not None:
            # saved after the rebase: a resumed peer measures its next progress from the anchor,
            # so the progress of the round in flight is not lost with it
            await self._save()
            self._notify(report)
            self._check_alone(report)
        return report

    def _eager_target(self, job: _Round, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outer step on the landed average with our stale share swapped for our fresh progress.

        ``avg + share * (fresh - stale)``, ``share`` being our weight in the round: what the average
        would be if our own contribution were the phase that just ended (the eager update).
        """
        outcome = job.outcome
        total = outcome.total_weight if outcome is not None and outcome.total_weight > 0 else job.weight
        share = job.weight / total
        with torch.no_grad():
            estimate = [
                avg + share * (fresh - stale)
                for avg, fresh, stale in zip(job.tensors[: job.n_deltas], deltas, job.own, strict=True)
            ]
            return self._trial_outer(estimate)

    async def _run_round(self, job: _Round) -> None:
        with job.scope:
            try:
                job.outcome = await self.averager.average(
                    job.tensors, weight=job.weight, round_id=job.round_id, compression=self.compression,
                    timeout=self.timeout, **self._avg_options,
                )
            except ConfigError as exc:
                job.config_error = exc  # raised to the training loop when the round lands
            except P2PComputeError as exc:
                job.error = f"{type(exc).__name__}: {exc}"
        if job.outcome is None and job.error is None and job.config_error is None:
            job.error = "Cancelled: the round was abandoned"
        job.finished = trio.current_time()
        job.done.set()

    def _land(self, job: _Round, t0: float) -> StepReport:
        """Apply ``job`` (landed); the compute waited since ``t0`` (:attr:`StepReport.waited`)."""
        waited = trio.current_time() - t0
        self._pending = None
        if job.config_error is not None:
            raise job.config_error
        outcome = job.outcome or AveragingOutcome((self.averager.peer_id,))
        deltas, bufs = job.tensors[: job.n_deltas], job.tensors[job.n_deltas:]
        # a failed round left the tensors untouched: the outer step is on our own progress
        with torch.no_grad():
            self._outer_update(deltas)
        self._buffer_state = bufs
        self.outer_step += 1
        per_step = job.local_steps * allreduce_bytes(self.params, "none", len(outcome.participants))
        report = StepReport(
            "diloco", self.outer_step, job.local_steps, outcome.participants, outcome.bytes_sent, per_step,
            job.finished - job.started, job.error, self._solo_reason(outcome, job.error),
            waited=waited, overlapped=True, early=job.early,
        )
        self._log(report)
        self._account(report)
        return report

    def _rebase(self, target: list[torch.Tensor]) -> None:
        """Put the model on ``target``; the next phase's progress is measured from it as held."""
        with torch.no_grad():
            self._upload(target)
            for (_, b), v in zip(self.named_buffers, self._shared_buffers(), strict=True):
                b.copy_(v)
            # what the model holds, computed on the anchor's side (no download from the GPU)
            self._phase_start = [
                t.to(p.dtype).to(a.dtype) if t.dtype != p.dtype else t.clone()
                for t, p, a in zip(target, self.params, self.anchor, strict=True)
            ]

    def _upload(self, values: list[torch.Tensor]) -> None:
        """Copy ``values`` (anchor side) into the model without making the CPU wait for the GPU.

        CUDA parameters are filled from the pinned buffers on a side stream that starts after the
        inner steps queued so far; the compute stream waits for it on the GPU, not the host.
        """
        pinned = self._staging()
        for i, (p, v) in enumerate(zip(self.params, values, strict=True)):
            if pinned is None or pinned[i] is p or not p.is_cuda:
                p.copy_(v)
                continue
            pinned[i].copy_(v)  # its previous upload finished: _stage_params synchronised since
            compute = torch.cuda.current_stream(p.device)
            side = self._side_stream(p.device)
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                p.copy_(pinned[i], non_blocking=True)
            compute.wait_stream(side)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        streams = self.__dict__.setdefault("_side_streams", {})
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return cast(torch.cuda.Stream, streams[device])

    def _trial_outer(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        saved = [a.detach().clone() for a in self.anchor]
        state = copy.deepcopy(self.outer.state_dict())
        try:
            for a, d in zip(self.anchor, deltas, strict=True):
                a.grad = d
            self.outer.step()
            return [a.detach().clone() for a in self.anchor]
        finally:
            for a, s in zip(self.anchor, saved, strict=True):
                a.grad = None
                a.copy_(s)
            self.outer.load_state_dict(state)

    async def flush(self) -> StepReport | None:
        """Overlapped mode: wait for the round in flight and apply it (None when there is none).

        The model becomes the new anchor plus the progress of the current inner phase. Call it
        after the last step, before evaluating or leaving; blocking mode has nothing to flush.

        Example::

            for x, y in batches:
                ...
                await opt.astep()
            await opt.flush()   # the last outer step, applied
        """
        job = self._pending
        if job is None:
            return None
        t0 = trio.current_time()
        await job.done.wait()
        report = self._land(job, t0)
        with torch.no_grad():
            progress = self.pseudo_gradient()  # since this phase started
            self._phase_start = None
            for p, a, d in zip(self.params, self.anchor, progress, strict=True):
                p.copy_(a - d)
            for (_, b), v in zip(self.named_buffers, self._shared_buffers(), strict=True):
                b.copy_(v)
        await self._save()
        self._notify(report)
        self._check_alone(report)
        return report

    def abandon(self) -> None:
        """Cancel the round in flight, if any, without applying it (its phase's progress is lost)."""
        if self._pending is not None:
            self._pending.scope.cancel()
            self._pending = None
        self._phase_start = None

    def _solo_reason(self, outcome: AveragingOutcome, error: str | None) -> str | None:
        if len(outcome.participants) > 1:
            return None
        return error or getattr(self.averager, "last_reason", "") or "group of one"

    def _log(self, report: StepReport) -> None:
        if report.error is not None:
            log.warning("outer step %d taken alone: %s", report.outer_step, report.error)
        elif report.solo:
            log.info("outer step %d taken alone: %s", report.outer_step, report.solo_reason)
        else:
            log.info("outer step %d averaged with %d peers", report.outer_step, len(report.participants))

    def model_digest(self) -> str:
        """Hex SHA-256 (first 16 digits) of the trained tensors' names, shapes and dtypes.

        Equal for peers training the same architecture whatever its weights; the swarm matches
        averaging partners by run name and this digest.

        Example::

            assert opt_a.model_digest() == opt_b.model_digest()   # same model class and sizes
        """
        h = hashlib.sha256()
        for kind, named in (("param", self.named), ("buffer", self.named_buffers)):
            for name, t in named:
                h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        return h.hexdigest()[:16]

    def _notify(self, report: StepReport) -> None:
        for cb in list(self.callbacks):
            cb(report)

    def add_callback(self, fn: Callable[[StepReport], None]) -> Callable[[StepReport], None]:
        """Call ``fn(report)`` after every outer step (logging: TensorBoard, W&B, a CSV file).

        Example::

            opt.add_callback(lambda r: writer.add_scalar("sync/peers", len(r.participants), r.outer_step))
        """
        self.callbacks.append(fn)
        return fn

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
        except ConfigError:
            raise  # our own misconfiguration (a bad name, a wrong codec) is not a failed round
        except P2PComputeError as exc:
            error = f"{type(exc).__name__}: {exc}"
            outcome = AveragingOutcome((self.averager.peer_id,))
        self._inner_step(samples)
        self.outer_step = self.total_inner_steps
        report = StepReport(
            "per_step", self.outer_step, 1, outcome.participants, outcome.bytes_sent,
            outcome.bytes_sent, time.perf_counter() - start, error, self._solo_reason(outcome, error),
        )
        self._account(report)
        self.local_steps = 0
        self._weight = 0.0
        with torch.no_grad():
            for a, p in zip(self.anchor, self.params, strict=True):
                a.copy_(p.detach())
        self._notify(report)
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
            for (name, _), v in zip(self.named_buffers, self._shared_buffers(), strict=True):
                tensors[f"buffer/{name}"] = v.detach().to("cpu", copy=True)
        meta = self._shared_meta()
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

    def _shared_meta(self) -> dict[str, int | float | str | bool]:
        """The scalar part of the shared state: mode, inner steps, tags, whether a round is in flight."""
        meta: dict[str, int | float | str | bool] = {"mode": self.mode, "inner_steps": self.inner_steps}
        meta.update({f"tag/{k}": v for k, v in self.tags.items()})
        if self._pending is not None:
            # the round of this step is in flight: a joiner must not take part in it (it cannot
            # apply its average) and needs the next state before its first round
            meta["in_flight"] = True
        return meta

    def _shared_buffers(self) -> list[torch.Tensor]:
        # the buffers as of the last outer step (what every participant agrees on); before the
        # first one, the module's own
        return self._buffer_state if self._buffer_state is not None else self._buffer_values()

    def _inner_index(self) -> dict[int, int]:
        # torch numbers optimizer state by position over all param groups, in order.
        flat = [p for group in self.inner.param_groups for p in group["params"]]
        return {id(p): i for i, p in enumerate(flat)}

    def state_digest(self) -> bytes:
        """SHA-256 of the shared state: equal on every peer that took part in the same rounds."""
        state = self.export_state()
        state.meta.pop("in_flight", None)  # whether a round is in flight is not state
        return state.digest()

    def load_state(self, state: TrainingState) -> None:
        """Adopt ``state`` (from a checkpoint or from peers); checks names, shapes and dtypes first.

        Shared state only moves the anchor, the outer momentum and the step; the model's
        parameters are set to the anchor. Local extras, when present, restore this peer's
        progress within the round and its inner optimizer.
        """
        if state.meta.get("mode", self.mode) != self.mode:
            raise ConfigError(f"state is for mode {state.meta.get('mode')!r}, not {self.mode!r}")
        self.abandon()
        for k, v in self.tags.items():
            theirs = state.meta.get(f"tag/{k}", v)
            if theirs != v:
                raise ConfigError(f"state is for {k} {theirs!r}, not {v!r}")
        buffer_names = {n for n, _ in self.named_buffers}
        for name, a in zip((n for n, _ in self.named), self.anchor, strict=True):
            t = state.tensors.get(f"param/{name}")
            if t is None or t.shape != a.shape or t.dtype != a.dtype:
                raise ConfigError(f"state does not match the model at parameter {name!r}")
        known = {f"param/{n}" for n, _ in self.named} | {f"outer/{n}" for n, _ in self.named}
        known |= {f"local/{n}" for n, _ in self.named} | {f"buffer/{n}" for n in buffer_names}
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
            held = self._buffer_values()
            for i, (name, b) in enumerate(self.named_buffers):
                t = state.tensors.get(f"buffer/{name}")
                if t is not None:
                    if t.shape != b.shape:
                        raise ConfigError(f"buffer {name!r} in the state has the wrong shape")
                    b.copy_(t)
                    held[i] = t.to(held[i].device, held[i].dtype, copy=True)
            self._buffer_state = held if self.named_buffers else None
        self.outer_step = state.step
        self.local_steps = int(state.meta.get("local_steps", 0))
        self.total_inner_steps = int(state.meta.get("total_inner_steps", self.total_inner_steps))
        self._weight = float(self.local_steps)
        self._load_inner(state)
        self._catch_up_to = state.step + 1 if state.meta.get("in_flight") and self.overlap else None

    def _adopt_shared(self, state: TrainingState) -> None:
        """Take the anchor, outer momentum, buffers and step of ``state``; the model is left alone."""
        for name, a in zip((n for n, _ in self.named), self.anchor, strict=True):
            t = state.tensors.get(f"param/{name}")
            if t is None or t.shape != a.shape or t.dtype != a.dtype:
                raise ConfigError(f"state does not match the model at parameter {name!r}")
        with torch.no_grad():
            for (name, _), a in zip(self.named, self.anchor, strict=True):
                a.copy_(state.tensors[f"param/{name}"])
                buf = state.tensors.get(f"outer/{name}")
                if buf is None:
                    self.outer.state.pop(a, None)
                else:
                    self.outer.state[a]["momentum_buffer"] = buf.to(a.device, a.dtype, copy=True)
            if self.named_buffers:
                held = self._buffer_values()
                for i, (name, _) in enumerate(self.named_buffers):
                    t = state.tensors.get(f"buffer/{name}")
                    if t is not None:
                        held[i] = t.to(held[i].device, held[i].dtype, copy=True)
                self._buffer_state = held
        self.outer_step = state.step

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

    # -- torch.optim.Optimizer state -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict()`` plus ``"diloco"``: anchor, outer optimizer, counters.

        Example::

            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "local.pt")
            opt.load_state_dict(torch.load("local.pt")["opt"])   # your own file, never received bytes
        """
        out = dict(self.inner.state_dict())
        with torch.no_grad():
            out["diloco"] = {
                "version": 1,
                "mode": self.mode,
                "outer_step": self.outer_step,
                "local_steps": self.local_steps,
                "total_inner_steps": self.total_inner_steps,
                "weight": self._weight,
                "anchor": [a.detach().clone() for a in self.anchor],
                "buffers": [b.detach().clone() for b in self._shared_buffers()],
                "outer": self.outer.state_dict(),
            }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (shapes and dtypes checked)."""
        d = state_dict.get("diloco")
        if not isinstance(d, dict) or d.get("version") != 1:
            raise ConfigError("not a DiLoCo state_dict (no 'diloco' entry of version 1)")
        if d["mode"] != self.mode:
            raise ConfigError(f"state_dict is for mode {d['mode']!r}, not {self.mode!r}")
        anchor = cast(list[torch.Tensor], d["anchor"])
        bufs = cast(list[torch.Tensor], d.get("buffers", []))
        if len(anchor) != len(self.anchor) or len(bufs) != len(self.named_buffers):
            raise ConfigError("state_dict does not match the model (parameter or buffer count)")
        for (name, _), a, t in zip(self.named, self.anchor, anchor, strict=True):
            if t.shape != a.shape or t.dtype != a.dtype:
                raise ConfigError(f"state_dict does not match the model at parameter {name!r}")
        self.abandon()
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "diloco"})
        with torch.no_grad():
            for a, t in zip(self.anchor, anchor, strict=True):
                a.copy_(t)
            for (_, b), t in zip(self.named_buffers, bufs, strict=True):
                b.copy_(t)
        self._buffer_state = [t.to(self.anchor[0].device, copy=True) for t in bufs] or None
        self.outer.load_state_dict(d["outer"])
        self.outer_step = int(d["outer_step"])
        self.local_steps = int(d["local_steps"])
        self.total_inner_steps = int(d["total_inner_steps"])
        self._weight = float(d["weight"])


class TrainingAlone(P2PComputeError):
    """An outer step averaged fewer peers than ``min_participants`` (the step was still applied).

    ``report`` is that step's :class:`StepReport`; training may go on after catching it.
    """

    def __init__(self, message: str, *, report: StepReport) -> None:
        super().__init__(message)
        self.report = report
