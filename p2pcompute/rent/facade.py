"""The synchronous facade of renting: a training script stays synchronous, trio runs in a thread.

:class:`Renter` starts one thread running ``trio.run``; in it a node (joining, not
advertising), a tensor lane, the task service with its ledger and a :class:`RentJob` live in
one nursery. The caller's thread hands work over with ``trio.from_thread.run`` and blocks
until it ends; closing (end of ``with``, an exception, interpreter exit through ``close``)
cancels the nursery and joins the thread, so nothing is left behind.

Imports :mod:`p2pcompute.rent.job`, :mod:`p2pcompute.overlay`, :mod:`p2pcompute.tensors`,
:mod:`p2pcompute.tasks`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import trio

from p2pcompute.errors import ConfigError, PeerTimeout
from p2pcompute.rent.job import OuterReport, RentJob, RentOptions
from p2pcompute.rent.recipes import Recipe

T = TypeVar("T")


class Renter:
    """Rent workers and train from a plain synchronous script.

    Example::

        with Renter(builtin_recipes()["lm"], {"layers": 2}, RentOptions(workers=3),
                    bootstrap=["/ip4/203.0.113.5/tcp/4001/p2p/12D3KooW..."], ledger="spent.jsonl") as r:
            r.recruit(timeout=60)
            for step in range(10):
                print(r.outer_step([{"tokens": t} for t in next_shards()]).line())
            model = r.model()
    """

    def __init__(
        self,
        recipe: Recipe,
        config: Mapping[str, Any],
        options: RentOptions | None = None,
        *,
        bootstrap: Sequence[str],
        ledger: str | Path | None = None,
        listen: str = "/ip4/0.0.0.0/tcp/0",
        evaluate: Callable[[torch.nn.Module], float] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if not bootstrap:
            raise ConfigError("a Renter needs at least one bootstrap address")
        recipe.normalise(config)  # a bad config fails here, in the caller's thread
        self.recipe, self.config, self.options = recipe, dict(config), options or RentOptions()
        self.bootstrap, self.ledger, self.listen = list(bootstrap), ledger, listen
        self.evaluate, self.start_timeout = evaluate, start_timeout
        self.job: RentJob | None = None
        self.peer_id = ""
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Renter:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Renter:
        """Join the swarm in a background thread (:class:`PeerTimeout` past ``start_timeout``)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._thread_main, name="p2pcompute-renter", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout) or self._token is None:
            self.close()
            if self._error is not None:
                raise self._error
            raise PeerTimeout(f"the renter did not start within {self.start_timeout:g} s")
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Leave the swarm and join the thread (idempotent)."""
        token, stop, thread = self._token, self._stop, self._thread
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(stop.set, trio_token=token)
        if thread is not None:
            thread.join(timeout)
        self._token = None

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from p2pcompute.overlay import open_node
        from p2pcompute.tasks.driver import open_tasks
        from p2pcompute.tensors import open_lane

        self._stop = trio.Event()
        async with (
            open_node(listen=[self.listen], bootstrap=self.bootstrap, advertise=False) as node,
            open_lane(node) as lane,
            open_tasks(node, ledger=self.ledger, lane=lane) as tasks,
        ):
            self.job = RentJob(tasks, node, self.recipe, self.config, self.options, evaluate=self.evaluate)
            self.peer_id = node.peer_id
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()

    def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._token is None:
            raise ConfigError("the renter is not running (use `with Renter(...)` or start())")
        return trio.from_thread.run(fn, trio_token=self._token)

    def _need_job(self) -> RentJob:
        if self.job is None:
            raise ConfigError("the renter is not running")
        return self.job

    def recruit(self, *, timeout: float = 60.0) -> list[str]:
        """Fill the worker slots (see :meth:`RentJob.recruit`)."""
        job = self._need_job()
        return self._call(lambda: job.recruit(timeout=timeout))

    def outer_step(self, shards: Sequence[Mapping[str, torch.Tensor]]) -> OuterReport:
        """One outer step over rented workers (see :meth:`RentJob.outer_step`)."""
        job = self._need_job()
        return self._call(lambda: job.outer_step(shards))

    def train(
        self,
        steps: int,
        shards: Callable[[int], Sequence[Mapping[str, torch.Tensor]]],
        *,
        on_report: Callable[[OuterReport], None] | None = None,
    ) -> list[OuterReport]:
        """``steps`` outer steps, overlapped when the options say so (see :meth:`RentJob.train`).

        ``shards`` and ``on_report`` are called in the renter's thread, not the caller's.

        Example::

            for r in renter.train(10, lambda step: [{"tokens": t} for t in batches(step)]):
                print(r.line())
        """
        job = self._need_job()
        return self._call(lambda: job.train(steps, shards, on_report=on_report))

    def model(self) -> torch.nn.Module:
        """A fresh model holding the current global state."""
        return self._need_job().model()

    @property
    def reports(self) -> list[OuterReport]:
        """Every outer step's report so far."""
        return self._need_job().reports


__all__ = ["Renter"]
