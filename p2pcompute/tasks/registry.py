"""The task registry: which task kinds this provider runs, with what resources and price.

A kind is a name bound to a local Python function (sync or async) that takes a
mapping of tensors and a msgpack-able ``params`` dict, and returns a mapping of
tensors, optionally with a msgpack-able ``info`` dict. Nothing received from the
network is ever executed, imported, unpickled or ``torch.load``-ed: a request
names a kind, and only kinds the operator registered here can run. An unknown
kind is refused with :class:`UnknownTaskKind`.

Imports :mod:`p2pcompute.tasks.messages`, :mod:`p2pcompute.errors`, :mod:`p2pcompute.wire`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import torch

from p2pcompute.errors import ConfigError, LocalProtocolError, P2PComputeError
from p2pcompute.tasks.messages import MAX_KIND_LEN, MAX_PARAMS, Resources
from p2pcompute.wire.codec import encode

Tensors: TypeAlias = Mapping[str, torch.Tensor]
Params: TypeAlias = Mapping[str, Any]
TaskReturn: TypeAlias = Tensors | tuple[Tensors, Params]
TaskFunction: TypeAlias = Callable[
    [dict[str, torch.Tensor], dict[str, Any]], TaskReturn | Awaitable[TaskReturn]
]

log = logging.getLogger(__name__)

MemoryFunction: TypeAlias = Callable[[Mapping[str, Any]], int]
_T = TypeVar("_T")

_KIND_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
#: The cancel flag of the run executing in this thread (set by the provider around a sync kind).
_CANCEL_FLAG: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "p2pcompute_task_cancel", default=None
)
#: The peer id of the requester whose run executes here (set by the provider around every run).
_REQUESTER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "p2pcompute_task_requester", default=None
)


def current_requester() -> str | None:
    """The peer id of the requester whose run is executing (``None`` outside a run).

    A kind that keeps state between runs (a training session's model, say) keys it by this,
    so that one requester can never read or change what another one left there.

    Example::

        cache_key = (current_requester(), params["job"])
    """
    return _REQUESTER.get()


@contextlib.contextmanager
def running_for(requester: str) -> Iterator[None]:
    """Set :func:`current_requester` for the body (the provider wraps every run in it).

    Example::

        with running_for(peer):
            value = await kind.function(tensors, params)
    """
    token = _REQUESTER.set(requester)
    try:
        yield
    finally:
        _REQUESTER.reset(token)


class UnknownTaskKind(P2PComputeError):
    """A task kind that this registry does not have."""


class TaskError(P2PComputeError):
    """Raised by a task function (or by the runner around it) to fail one run.

    ``retryable`` says whether another provider could succeed (out of memory: yes;
    a bad parameter: no).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def run_cancelled() -> bool:
    """True when the run calling this (a sync kind in its worker thread) has been cancelled.

    A run is cancelled when its lease is cancelled or expires; the provider stops waiting for
    the worker thread and frees the slot, and the thread should stop at its next chunk.
    Outside a run it is always False.

    Example::

        for block in blocks:
            if run_cancelled():
                break
            work(block)
    """
    flag = _CANCEL_FLAG.get()
    return flag is not None and flag.is_set()


def check_cancelled() -> None:
    """Raise :class:`TaskError` (retryable) when this run has been cancelled (:func:`run_cancelled`).

    Call it between chunks of a long sync task, so that a run whose lease is gone stops soon.

    Example::

        for _ in range(repeats):
            check_cancelled()
            c = a @ b
    """
    if run_cancelled():
        raise TaskError("run cancelled: its lease has ended", retryable=True)


def call_cancellable(flag: threading.Event, function: Callable[..., _T], *args: Any) -> _T:
    """Call ``function(*args)`` with ``flag`` as the run's cancel flag (what :func:`run_cancelled` reads).

    Example::

        flag = threading.Event()
        value = await trio.to_thread.run_sync(call_cancellable, flag, kind.function, tensors, params)
    """
    token = _CANCEL_FLAG.set(flag)
    try:
        return function(*args)
    finally:
        _CANCEL_FLAG.reset(token)


@dataclass(frozen=True)
class TaskKind:
    """One registered kind: name, function, what one run needs, its price and output cap.

    ``memory(params)`` (optional) estimates the bytes one run with these params holds; the
    provider accounts it while a cancelled run is still stopping.
    """

    name: str
    function: TaskFunction
    needs: Resources
    price: float
    max_output_bytes: int
    description: str
    memory: MemoryFunction | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    def run_memory(self, params: Mapping[str, Any], input_bytes: int) -> int:
        """Bytes one run holds: the kind's ``memory(params)``, else its inputs and declared GPU memory.

        Example::

            kind.run_memory({"n": 1024}, 0)
        """
        if self.memory is not None:
            try:
                return max(0, int(self.memory(params)))
            except Exception:  # an estimate must never break a run: fall back
                log.info("memory estimate of task %s failed", self.name, exc_info=True)
        return max(0, input_bytes) + self.needs.gpu_memory


@dataclass(frozen=True)
class TaskOutput:
    """What a run produced: output tensors and a small msgpack-able ``info`` dict."""

    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def check_params(params: Mapping[str, Any]) -> bytes:
    """Encode ``params`` as msgpack, refusing anything msgpack cannot carry or over the cap.

    Example::

        >>> len(check_params({"n": 256})) > 0
        True
    """
    if not isinstance(params, Mapping):
        raise LocalProtocolError("task params must be a mapping")
    try:
        data = encode(dict(params))
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"task params are not msgpack-able: {exc}") from None
    if len(data) > MAX_PARAMS:
        raise LocalProtocolError(f"task params take {len(data)} bytes, over the cap of {MAX_PARAMS}")
    return data


def normalise_output(kind: str, value: Any) -> TaskOutput:
    """Check a task function's return value: tensors (and optional info), nothing else."""
    info: Any = {}
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TaskError(f"task {kind!r} returned a tuple of {len(value)}; expected (tensors, info)")
        value, info = value
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in value.items()
    ):
        raise TaskError(f"task {kind!r} must return a mapping of name -> tensor")
    if not isinstance(info, Mapping):
        raise TaskError(f"task {kind!r} returned info that is not a mapping")
    try:
        check_params(info)
    except LocalProtocolError as exc:
        raise TaskError(f"task {kind!r} returned bad info: {exc}") from None
    return TaskOutput(dict(value), dict(info))


class TaskRegistry:
    """Task kinds a provider serves.

    Example::

        registry = TaskRegistry()

        @registry.task("scale", needs=Resources(cpus=1), price=0.01)
        def scale(tensors, params):
            return {"y": tensors["x"] * params["factor"]}

        async with serve_tasks(node, registry):
            await trio.sleep_forever()
    """

    def __init__(self) -> None:
        self._kinds: dict[str, TaskKind] = {}

    def register(
        self,
        name: str,
        function: TaskFunction,
        *,
        needs: Resources | None = None,
        price: float = 0.0,
        max_output_bytes: int = 1 << 30,
        description: str = "",
        memory: MemoryFunction | None = None,
    ) -> TaskKind:
        """Bind ``name`` to ``function``; a name can be registered once.

        ``memory(params)`` optionally estimates the bytes one run holds (see :class:`TaskKind`).
        """
        if not isinstance(name, str) or not _KIND_RE.match(name) or len(name) > MAX_KIND_LEN:
            raise ConfigError(f"bad task kind name {name!r} (letters, digits, _ . : / -, at most 64)")
        if name in self._kinds:
            raise ConfigError(f"task kind {name!r} is already registered")
        if not callable(function):
            raise ConfigError("a task function must be callable")
        if price < 0 or price != price:
            raise ConfigError("a price is a non-negative number")
        kind = TaskKind(
            name,
            function,
            needs or Resources(),
            float(price),
            int(max_output_bytes),
            description or (inspect.getdoc(function) or "").split("\n")[0],
            memory,
        )
        self._kinds[name] = kind
        return kind

    def task(
        self,
        name: str,
        *,
        needs: Resources | None = None,
        price: float = 0.0,
        max_output_bytes: int = 1 << 30,
        description: str = "",
        memory: MemoryFunction | None = None,
    ) -> Callable[[TaskFunction], TaskFunction]:
        """Decorator form of :meth:`register`; returns the function unchanged."""

        def bind(function: TaskFunction) -> TaskFunction:
            self.register(
                name,
                function,
                needs=needs,
                price=price,
                max_output_bytes=max_output_bytes,
                description=description,
                memory=memory,
            )
            return function

        return bind

    def get(self, name: str) -> TaskKind:
        """The kind called ``name``, or :class:`UnknownTaskKind`."""
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownTaskKind(f"unknown task kind {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[TaskKind]:
        return iter(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)

    def names(self) -> list[str]:
        return sorted(self._kinds)

    def merged(self, other: TaskRegistry) -> TaskRegistry:
        """A new registry with this one's kinds and ``other``'s (a clash is an error)."""
        out = TaskRegistry()
        for kind in [*self, *other]:
            out.register(
                kind.name,
                kind.function,
                needs=kind.needs,
                price=kind.price,
                max_output_bytes=kind.max_output_bytes,
                description=kind.description,
                memory=kind.memory,
            )
        return out


def load_registry(spec: str) -> TaskRegistry:
    """Import ``module:attribute`` named by the *operator* (never by a peer) and return its registry.

    Used by ``p2pcompute peer --tasks module:registry``. The attribute may be a
    :class:`TaskRegistry` or a zero-argument callable returning one.

    Example::

        registry = load_registry("my_lab.tasks:registry")
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--tasks wants module:attribute, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import task module {module_name!r}: {exc}") from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if callable(obj) and not isinstance(obj, TaskRegistry):
        obj = obj()
    if not isinstance(obj, TaskRegistry):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a TaskRegistry")
    return obj
