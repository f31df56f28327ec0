"""One training segment: H inner steps from a given state on given data, and its pseudo-gradient.

Everything here is plain computation, no I/O: the provider runs :func:`run_segment` for a
lease, and the requester runs the very same function to verify a sampled segment. A segment
is reproducible from its inputs alone: the recipe, its config, the starting state, the data
shard and the step count (the inner optimizer starts fresh in every segment, so no hidden
state on the worker takes part). On the same CPU with another thread count, or on another
machine, only floating-point summation order differs; :func:`distance` measures how far two
pseudo-gradients are apart, and docs/design/rent.md gives the tolerance and its measurement.

Names on the wire (tensors of a ``train/<recipe>`` task): ``s/<key>`` the full starting state,
``u/<key>`` the outer update from the worker's cached version to this one, ``d/<key>`` the data
shard, and ``g/<key>`` the returned pseudo-gradient (``start - end``, cast to the codec's dtype).

Imports torch, :mod:`p2pcompute.rent.recipes` and :mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from p2pcompute.errors import ConfigError
from p2pcompute.rent.recipes import Config, Recipe

STATE, UPDATE, DATA, GRAD = "s/", "u/", "d/", "g/"
#: The dtype each codec sends pseudo-gradients and outer updates in.
CODEC_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SegmentResult:
    """What a segment produced: the pseudo-gradient, the inner losses and how long it took."""

    grad: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point state (parameters and buffers) as detached float32 CPU tensors.

    Example::

        state = state_of(model)       # what a requester sends as s/<key>
    """
    return {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in model.state_dict().items()
        if v.dtype.is_floating_point
    }


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hex SHA-256 over names, shapes and bytes of ``state`` (order-independent).

    Example::

        assert state_digest(a) == state_digest({k: v.clone() for k, v in a.items()})
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def split_named(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose name starts with ``prefix``, with the prefix cut off."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a state or update whose names or shapes differ from the model's (:class:`ConfigError`)."""
    if set(expected) != set(got):
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        raise ConfigError(f"{what} does not fit the model (missing {missing}, unexpected {extra})")
    for key, t in got.items():
        if tuple(t.shape) != tuple(expected[key].shape) or not t.dtype.is_floating_point:
            raise ConfigError(f"{what}: {key} is {t.dtype} {list(t.shape)}, want {list(expected[key].shape)}")


def micro_batches(data: Mapping[str, torch.Tensor], steps: int) -> list[dict[str, torch.Tensor]]:
    """Cut a data shard into ``steps`` equal micro-batches along the first dimension.

    Example::

        micro_batches({"x": torch.zeros(40, 8)}, 4)[0]["x"].shape    # (10, 8)
    """
    if not data:
        raise ConfigError("the segment has no data")
    lengths = {t.shape[0] if t.dim() else -1 for t in data.values()}
    if len(lengths) != 1 or (n := lengths.pop()) < steps or n % steps:
        raise ConfigError(f"data tensors must share a first dimension divisible by {steps} steps")
    size = n // steps
    return [{k: v[i * size : (i + 1) * size] for k, v in data.items()} for i in range(steps)]


def run_segment(
    recipe: Recipe,
    cfg: Config,
    start: Mapping[str, torch.Tensor],
    data: Mapping[str, torch.Tensor],
    steps: int,
    *,
    codec: str = "fp32",
    device: str | torch.device = "cpu",
    stop: Callable[[], None] | None = None,
) -> SegmentResult:
    """Run ``steps`` inner steps of ``recipe`` from ``start`` on ``data``; return ``start - end``.

    ``cfg`` is an already normalised config (:meth:`Recipe.normalise`). The pseudo-gradient
    is cast to ``codec``'s dtype (``fp32``, ``bf16`` or ``fp16``). ``stop`` (optional) is a
    zero-argument callable checked between steps (a cancelled lease stops early).

    Example::

        cfg, model = recipe.make(config)
        result = run_segment(recipe, cfg, state_of(model), {"tokens": tokens}, steps=10)
    """
    if codec not in CODEC_DTYPES:
        raise ConfigError(f"codec must be one of {', '.join(CODEC_DTYPES)}, not {codec!r}")
    if not 1 <= steps <= 100_000:
        raise ConfigError("steps must lie in [1, 100000]")
    t0 = time.perf_counter()
    _, model = recipe.make(cfg)
    check_state(state_of(model), start, "the starting state")
    batches = micro_batches(data, steps)
    recipe.validate_batch(cfg, batches[0])
    model.load_state_dict({k: v for k, v in start.items()}, strict=False)
    model.to(device).train()
    opt = recipe.optimizer(cfg, model.parameters())
    losses: list[float] = []
    for batch in batches:
        if stop is not None:
            stop()
        batch = {k: v.to(device) for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        loss = recipe.loss(model, batch)
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss became {float(loss)} at inner step {len(losses)}")
        loss.backward()  # type: ignore[no-untyped-call]
        if cfg.get("clip", 0.0) > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        losses.append(float(loss.detach()))
    end = state_of(model)
    dtype = CODEC_DTYPES[codec]
    grad = {k: (start[k].float() - end[k]).to(dtype) for k in end}
    return SegmentResult(grad, losses, time.perf_counter() - t0)


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Relative L2 distance ``|a - b| / max(|a|, |b|)`` over all tensors (``inf`` when names differ).

    Example::

        distance(returned, recomputed) <= 0.02       # the default tolerance
    """
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    diff = norm_a = norm_b = 0.0
    for k in a:
        x, y = a[k].float(), b[k].float()
        diff += float((x - y).pow(2).sum())
        norm_a += float(x.pow(2).sum())
        norm_b += float(y.pow(2).sum())
    scale = max(norm_a, norm_b) ** 0.5
    if not (diff == diff and norm_a == norm_a):  # NaN anywhere
        return float("inf")
    return 0.0 if scale == 0.0 else diff**0.5 / scale


__all__ = [
    "CODEC_DTYPES",
    "DATA",
    "GRAD",
    "STATE",
    "UPDATE",
    "SegmentResult",
    "check_state",
    "distance",
    "micro_batches",
    "run_segment",
    "split_named",
    "state_digest",
    "state_of",
]
