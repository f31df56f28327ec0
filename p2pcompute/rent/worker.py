"""The provider's side of renting: a recipe book sold as ``train/<recipe>`` task kinds.

:func:`training_registry` turns a :class:`~p2pcompute.rent.recipes.RecipeBook` into a
:class:`~p2pcompute.tasks.TaskRegistry`: one kind per recipe, priced per segment. A run of
such a kind is one segment (:mod:`p2pcompute.rent.segment`). The worker keeps each training
session's current state between segments (:class:`SessionCache`, keyed by the requester's
peer id and its job id, so one requester can never see or change another's), so the state
travels once and then only the outer updates. The cache is bounded in sessions and bytes;
a session pushed out (or a worker restarted) answers ``state-missing`` and the requester
sends the full state again.

Nothing received is executed: a segment names a recipe the operator registered, with a
config the recipe checks against its schema and caps; a bad config or data shard fails the
run with a clear, non-retryable :class:`~p2pcompute.tasks.TaskError`.

Imports :mod:`p2pcompute.rent.recipes`, :mod:`p2pcompute.rent.segment`, :mod:`p2pcompute.tasks`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from p2pcompute.errors import ConfigError
from p2pcompute.rent.recipes import Config, Recipe, RecipeBook, builtin_book
from p2pcompute.rent.segment import (
    CODEC_DTYPES,
    DATA,
    GRAD,
    STATE,
    UPDATE,
    check_state,
    run_segment,
    split_named,
    state_digest,
    state_of,
)
from p2pcompute.tasks.messages import Resources
from p2pcompute.tasks.registry import TaskError, TaskRegistry, check_cancelled, current_requester

log = logging.getLogger(__name__)

#: The task kind of a recipe: ``train/<recipe name>``.
KIND_PREFIX = "train/"
#: Version of a segment's params map.
SEGMENT_VERSION = 1
STATE_MISSING = "state-missing"
#: How a cheating worker misbehaves (a test and demo seam; honest workers use ``None``).
CHEATS = ("zeros", "noise", "scale", "stale", "fewer-steps")


def kind_of(recipe: str) -> str:
    """The task kind that sells ``recipe`` (``train/lm`` for ``lm``)."""
    return KIND_PREFIX + recipe


@dataclass
class _Session:
    cfg: Config
    version: int
    state: dict[str, torch.Tensor]
    nbytes: int


class SessionCache:
    """Training sessions' current states, least recently used first out; thread-safe.

    At most ``max_sessions`` sessions and ``max_bytes`` of state are kept.

    Example::

        cache = SessionCache(max_sessions=8, max_bytes=4 << 30)
    """

    def __init__(self, *, max_sessions: int = 8, max_bytes: int = 4 << 30) -> None:
        if max_sessions < 1 or max_bytes < 1:
            raise ConfigError("a session cache keeps at least one session and one byte")
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> _Session | None:
        with self._lock:
            s = self._sessions.get(key)
            if s is not None:
                self._sessions.move_to_end(key)
            return s

    def put(self, key: tuple[str, str], cfg: Config, version: int, state: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in state.values())
        with self._lock:
            self._sessions.pop(key, None)
            if size > self.max_bytes:
                return
            self._sessions[key] = _Session(cfg, version, state, size)
            while len(self._sessions) > self.max_sessions or self.total_bytes() > self.max_bytes:
                self._sessions.popitem(last=False)

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)


def _segment_params(params: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], int, int, int, str]:
    def want(key: str, kind: type | tuple[type, ...]) -> Any:
        value = params.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TaskError(f"segment param {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
        return value

    if params.get("v") != SEGMENT_VERSION:
        raise TaskError(f"segment params version {params.get('v')!r} (this worker speaks {SEGMENT_VERSION})")
    job = want("job", str)
    if not 1 <= len(job) <= 64:
        raise TaskError("segment param 'job' must be 1-64 characters")
    config = want("config", dict)
    version, base, steps = want("version", int), want("base", int), want("steps", int)
    codec = want("codec", str)
    if version < 0 or base < -1 or base >= version:
        raise TaskError("segment versions out of order")
    if codec not in CODEC_DTYPES:
        raise TaskError(f"codec must be one of {', '.join(CODEC_DTYPES)}")
    if not 1 <= steps <= 100_000:
        raise TaskError("steps must lie in [1, 100000]")
    return job, config, version, base, steps, codec


class TrainingWorker:
    """Runs segments of the recipes in ``book``; ``cheat`` makes it a cheater (tests, demo).

    Example::

        worker = TrainingWorker(builtin_book(price=0.02))
        registry = worker.registry()          # serve_tasks(node, registry, ...)
    """

    def __init__(
        self,
        book: RecipeBook,
        *,
        cache: SessionCache | None = None,
        cheat: str | None = None,
        device: str = "auto",
        needs: Resources | None = None,
    ) -> None:
        if cheat is not None and cheat not in CHEATS:
            raise ConfigError(f"cheat must be one of {', '.join(CHEATS)}")
        self.book = book
        self.cache = cache or SessionCache()
        self.cheat = cheat
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.needs = needs
        self.segments = 0
        self._last: dict[str, torch.Tensor] | None = None

    def registry(self) -> TaskRegistry:
        """A registry with one ``train/<recipe>`` kind per recipe in the book."""
        reg = TaskRegistry()
        for recipe in self.book:
            needs = self.book.needs.get(recipe.name) or self.needs
            reg.register(
                kind_of(recipe.name),
                self._bind(recipe),
                needs=needs,
                price=self.book.prices[recipe.name],
                description=f"train recipe {recipe.name}: H inner steps, returns the pseudo-gradient",
            )
        return reg

    def _bind(self, recipe: Recipe) -> Any:
        def segment(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> Any:
            return self.run(recipe, tensors, params)

        return segment

    def run(
        self, recipe: Recipe, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One segment for the current requester (:func:`~p2pcompute.tasks.registry.current_requester`)."""
        job, config, version, base, steps, codec = _segment_params(params)
        try:
            cfg, model = recipe.make(config)
        except ConfigError as exc:
            raise TaskError(f"bad config: {exc}") from None
        shapes = state_of(model)
        key = (current_requester() or "", job)
        full, update, data = (split_named(tensors, p) for p in (STATE, UPDATE, DATA))
        try:
            if full:
                check_state(shapes, full, "the state")
                state = {k: v.float() for k, v in full.items()}
            else:
                held = self.cache.get(key)
                if held is None or held.cfg != cfg or held.version != (base if update else version):
                    have = "nothing" if held is None else f"version {held.version}"
                    raise TaskError(f"{STATE_MISSING}: this worker holds {have} of job {job}")
                if update:
                    check_state(shapes, update, "the outer update")
                    state = {k: held.state[k] + update[k].float() for k in held.state}
                else:
                    state = held.state
            self.cache.put(key, cfg, version, state)
            steps_run = steps // 2 if self.cheat == "fewer-steps" else steps
            if steps_run != steps:
                n = next(iter(data.values())).shape[0] // steps * steps_run if data else 0
                data = {k: v[:n] for k, v in data.items()}
            result = run_segment(
                recipe,
                cfg,
                state,
                data,
                max(1, steps_run),
                codec=codec,
                device=self.device,
                stop=check_cancelled,
            )
        except ConfigError as exc:
            raise TaskError(f"bad segment: {exc}") from None
        grad = self._cheat(result.grad)
        self.segments += 1
        info = {
            "steps": steps,
            "loss_first": result.losses[0],
            "loss_last": result.losses[-1],
            "seconds": round(result.seconds, 4),
            "start_digest": state_digest(state)[:32],
            "device": self.device,
        }
        return {GRAD + k: v for k, v in grad.items()}, info

    def _cheat(self, grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        honest = grad
        if self.cheat == "zeros":
            grad = {k: torch.zeros_like(v) for k, v in grad.items()}
        elif self.cheat == "noise":
            grad = {k: (torch.randn_like(v.float()) * v.float().std()).to(v.dtype) for k, v in grad.items()}
        elif self.cheat == "scale":
            grad = {k: v * 3 for k, v in grad.items()}
        elif self.cheat == "stale" and self._last is not None:
            grad = self._last
        self._last = honest
        return grad


def training_registry(
    book: RecipeBook | None = None, *, cheat: str | None = None, cache: SessionCache | None = None
) -> TaskRegistry:
    """The task kinds that sell ``book``'s recipes (the built-in ones, free, by default).

    Example::

        async with serve_tasks(node, training_registry(builtin_book(price=0.02)), lane=lane):
            await trio.sleep_forever()
    """
    return TrainingWorker(book or builtin_book(), cheat=cheat, cache=cache).registry()


__all__ = [
    "CHEATS",
    "KIND_PREFIX",
    "SEGMENT_VERSION",
    "STATE_MISSING",
    "SessionCache",
    "TrainingWorker",
    "kind_of",
    "training_registry",
]
