"""The requester's side of renting: recruit workers by capacity, train on them, verify, pay.

A :class:`RentJob` holds the model's global state (float32) and DiLoCo's outer optimizer
(SGD with Nesterov momentum). One outer step (:meth:`RentJob.outer_step`):

1. every worker slot runs one *segment* (:mod:`p2pcompute.rent.segment`) as a lease of the
   ``train/<recipe>`` kind, pinned to that worker (the negotiation runs as for any task:
   request, signed offer at the worker's price, accept, heartbeats, result, dual-signed
   receipt). The state travels to a worker once; later segments carry only the outer
   update, which the requester applies to its own copy the same way, so both hold the same
   bits;
2. each result is checked before its receipt is signed: names, shapes, dtypes, finiteness,
   and for a sampled fraction (``verify_fraction``) a local re-run whose pseudo-gradient
   must lie within ``tolerance`` (relative L2). Refused work earns no receipt; the worker
   is excluded and the evidence (both digests and the distance) kept in :attr:`RentJob.evidence`;
3. a slot whose worker died, stalled (``segment_timeout``) or cheated is given to a spare
   (speed-checked with ``matmul-bench`` first) and its segment re-run there with the full
   state; without a spare the step goes on with the others. The report says which;
4. the mean pseudo-gradient feeds the outer optimizer; the report gives loss, workers,
   bytes, seconds and price.

With ``RentOptions(overlap=True)``, :meth:`RentJob.train` runs the steps as a pipeline: a
worker that returns its segment of step k starts step k+1 at once instead of waiting for the
slowest worker and the outer update, from its own progress laid on the newest shared state
(``x[k-1] - g[k]``: the delayed outer step of docs/design/training.md, the same rule as
``DiLoCo(overlap=True)``); the update of step k lands while step k+1 runs. Each worker is
then at most one step ahead of the slowest. Its start states are its own, sent as updates
against what it holds, and verified the same way.

Workers come from signed capacity adverts (:meth:`~p2pcompute.overlay.Node.find_peers` with
the job's :class:`~p2pcompute.capacity.model.CapacityQuery`), among the peers that listen
for tasks, each speed-checked before its first segment (``min_tflops``).

Imports :mod:`p2pcompute.rent` (recipes, segment, worker), :mod:`p2pcompute.tasks`,
:mod:`p2pcompute.overlay` (types) and :mod:`p2pcompute.capacity`.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import trio

from p2pcompute.capacity.model import CapacityQuery
from p2pcompute.errors import ConfigError, P2PComputeError, TaskFailed, WorkRejected
from p2pcompute.rent.recipes import Recipe
from p2pcompute.rent.segment import (
    CODEC_DTYPES,
    DATA,
    GRAD,
    STATE,
    UPDATE,
    distance,
    run_segment,
    split_named,
    state_digest,
    state_of,
)
from p2pcompute.rent.worker import SEGMENT_VERSION, STATE_MISSING, kind_of
from p2pcompute.tasks.builtin import MATMUL_BENCH, verify_matmul_bench
from p2pcompute.tasks.frames import nbytes

if TYPE_CHECKING:
    from p2pcompute.overlay import Node
    from p2pcompute.tasks.driver import TaskResult, TaskService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RentOptions:
    """How a :class:`RentJob` recruits, trains and verifies.

    * ``workers``: slots trained per outer step; ``query``: what a worker's advert must show;
      ``max_price``: the most paid per segment (offers above it are ignored).
    * ``inner_steps`` (H), ``outer_lr``, ``outer_momentum`` (DiLoCo's Nesterov outer step);
      ``codec``: dtype of pseudo-gradients and outer updates on the wire (``fp32``, ``bf16``, ``fp16``).
    * ``verify_fraction`` of segments re-run locally (``verify_first``: and every worker's
      first one, so a cheater is caught before it earns anything); ``tolerance``: the largest relative L2
      distance accepted (docs/design/rent.md: 1e-5 between thread counts, 1.6e-3 from bf16
      rounding, 0.29 for half the steps, 0.5 for a pseudo-gradient scaled by 0.5).
    * ``bench``: ``matmul-bench`` params of the speed check, ``min_tflops`` to pass it,
      ``bench_timeout`` for it to come back (a peer that sells no tasks never offers).
    * ``overlap``: :meth:`RentJob.train` lets each worker start its next segment as soon as it
      returns one (see the module doc) instead of waiting for every worker and the outer update.
    * ``segment_timeout``: seconds a segment may take from its request to its result;
      ``max_replacements``: spares tried per slot and outer step; ``dial_timeout``: how long a
      worker we are not connected to may take to answer a dial before its slot goes to a spare;
      ``grant_timeout``: how long a worker may take to grant a leased segment or speed check (a
      provider process busy with other requesters' segments grants late; the task layer's
      default of 5 s refused honest workers on a loaded two-core machine).

    Example::

        RentOptions(workers=3, query=CapacityQuery(gpus=1, min_gpu_memory=16 << 30), max_price=0.05)
    """

    workers: int = 2
    query: CapacityQuery = CapacityQuery()  # noqa: RUF009 (frozen, immutable)
    max_price: float = 1e18
    inner_steps: int = 20
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    codec: str = "bf16"
    verify_fraction: float = 0.1
    verify_first: bool = True
    tolerance: float = 0.02
    bench: Mapping[str, Any] = field(default_factory=lambda: {"n": 256, "dtype": "float32", "repeats": 2})
    min_tflops: float = 0.0
    bench_timeout: float = 10.0
    segment_timeout: float = 120.0
    dial_timeout: float = 3.0
    grant_timeout: float = 15.0
    max_replacements: int = 2
    verify_seed: int | None = None
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1 or self.inner_steps < 1 or self.max_replacements < 0:
            raise ConfigError("workers and inner_steps must be >= 1, max_replacements >= 0")
        if self.codec not in CODEC_DTYPES:
            raise ConfigError(f"codec must be one of {', '.join(CODEC_DTYPES)}")
        if not 0.0 <= self.verify_fraction <= 1.0 or not self.tolerance > 0:
            raise ConfigError("verify_fraction must lie in [0, 1] and tolerance be positive")
        if not self.grant_timeout > 0:
            raise ConfigError("grant_timeout must be positive")
        if not self.segment_timeout > 0:
            raise ConfigError("segment_timeout must be positive")


@dataclass(frozen=True)
class Evidence:
    """Why a worker's segment was refused: what it returned against what a re-run gave."""

    worker: str
    outer_step: int
    reason: str
    returned_digest: str
    recomputed_digest: str | None
    distance: float | None
    tolerance: float


@dataclass
class SegmentRecord:
    """One segment attempt: who, how it ended, bytes each way, price, whether it was verified."""

    slot: int
    worker: str
    outcome: str  # ok | rejected | failed
    seconds: float
    bytes_sent: int = 0
    bytes_received: int = 0
    price: float = 0.0
    verified: bool = False
    distance: float | None = None
    loss: float | None = None
    detail: str = ""


@dataclass
class OuterReport:
    """One outer step: loss, the workers that contributed, replacements, bytes, seconds, price."""

    outer_step: int
    loss: float | None
    workers: list[str]
    segments: list[SegmentRecord]
    replaced: list[tuple[str, str]]
    dropped: list[int]
    bytes_sent: int
    bytes_received: int
    seconds: float
    price: float
    eval_loss: float | None = None
    overlapped: bool = False  # its segments ran while the previous step's update was pending

    def line(self, names: Mapping[str, str] | None = None) -> str:
        """A one-line summary for a log or a terminal."""
        name = (names or {}).get
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        if self.eval_loss is not None:
            loss += f" (eval {self.eval_loss:.4f})"
        extra = "".join(f", {name(a) or a[:8]} -> {name(b) or b[:8]}" for a, b in self.replaced)
        extra += f", dropped slots {self.dropped}" if self.dropped else ""
        checked = sum(s.verified for s in self.segments)
        return (
            f"outer step {self.outer_step}: loss {loss}, workers "
            f"{', '.join(name(w) or w[:8] for w in self.workers)}{extra}; "
            f"sent {self.bytes_sent / 1e6:.2f} MB, got {self.bytes_received / 1e6:.2f} MB, "
            f"{self.seconds:.2f} s, paid {self.price:.4f}, verified {checked}"
            + (", overlapped" if self.overlapped else "")
        )


class RentJob:
    """Train ``recipe`` with ``config`` on rented workers (see the module doc).

    Example::

        async with open_tasks(node, ledger="ledger.jsonl", lane=lane) as tasks:
            job = RentJob(tasks, node, builtin_recipes()["lm"], {"layers": 2}, RentOptions(workers=3))
            await job.recruit()
            for step in range(10):
                report = await job.outer_step([shard(step, i) for i in range(3)])
                print(report.line())
    """

    def __init__(
        self,
        tasks: TaskService,
        node: Node,
        recipe: Recipe,
        config: Mapping[str, Any],
        options: RentOptions | None = None,
        *,
        evaluate: Callable[[torch.nn.Module], float] | None = None,
    ) -> None:
        self.tasks = tasks
        self.node = node
        self.recipe = recipe
        self.options = options or RentOptions()
        self.cfg, model = recipe.make(config)
        self.evaluate = evaluate
        self.job_id = secrets.token_hex(8)
        self.state = state_of(model)
        self._params = {k: v.clone() for k, v in self.state.items()}
        self._outer = torch.optim.SGD(
            list(self._params.values()),
            lr=self.options.outer_lr,
            momentum=self.options.outer_momentum,
            nesterov=self.options.outer_momentum > 0,
        )
        self.version = 0
        self._update: dict[str, torch.Tensor] | None = None  # version - 1 -> version
        self.held: dict[str, int] = {}  # worker -> the version it holds
        self.workers: list[str | None] = []
        self.speeds: dict[str, float] = {}
        self.excluded: dict[str, str] = {}
        self.evidence: list[Evidence] = []
        self.reports: list[OuterReport] = []
        self.spent = 0.0
        self._proven: set[str] = set()  # workers with one verified segment
        # overlap=True: the start state each worker holds (its own), under a version of its own
        self._own: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self._serial = 1 << 40  # versions of those states, apart from the shared state's
        seed = self.options.verify_seed
        self._rng: random.Random = random.SystemRandom() if seed is None else random.Random(seed)

    # -- recruiting

    def candidates(self) -> list[str]:
        """Peers whose signed adverts match the query, best first, those known to sell tasks first."""
        listening = set(self.tasks.providers())
        q = self.options.query
        found = self.node.find_peers(
            gpus=q.gpus,
            min_gpu_memory=q.min_gpu_memory,
            min_free_memory=q.min_free_memory,
            min_compute_capability=q.min_compute_capability,
            gpu_name=q.gpu_name,
            min_ram=q.min_ram,
            cuda=q.cuda,
        )
        busy = {w for w in self.workers if w is not None}
        ids = [r.peer_id for r in found if r.peer_id not in self.excluded and r.peer_id not in busy]
        # peers we know to listen for tasks first (those we are connected to), then the rest
        return [p for p in ids if p in listening] + [p for p in ids if p not in listening]

    async def speed_check(self, peer: str) -> float | None:
        """Run ``matmul-bench`` on ``peer`` with a fresh seed; its TFLOP/s, or ``None`` if it failed."""
        params = {**self.options.bench, "seed": secrets.randbelow(2**31)}
        try:
            r = await self.tasks.run_task(
                MATMUL_BENCH,
                {},
                params,
                providers=[peer],
                retries=0,
                deadline=30.0,
                accept_timeout=self.options.grant_timeout,
                max_price=self.options.max_price,
            )
        except TaskFailed as exc:
            log.info("speed check of %s failed: %s", peer, exc)
            return None
        self.spent += r.receipt.body.price
        ok = await trio.to_thread.run_sync(verify_matmul_bench, params, r.outputs)
        tflops = float(r.info.get("tflops", 0.0))
        if not ok:
            self._exclude(peer, "its matmul-bench result was wrong")
            return None
        if tflops < self.options.min_tflops:
            self._exclude(peer, f"{tflops:.3f} TFLOP/s is under the {self.options.min_tflops} asked")
            return None
        self.speeds[peer] = tflops
        return tflops

    async def recruit(self, *, timeout: float = 30.0) -> list[str]:
        """Fill the worker slots from matching, speed-checked peers (:class:`TaskFailed` if too few).

        Example::

            workers = await job.recruit(timeout=30)
        """
        want = self.options.workers
        kept: list[str | None] = [w for w in self.workers if w is not None]
        self.workers = kept[:want]
        with trio.move_on_after(timeout):
            while len(self.workers) < want:
                found = await self._next_worker()
                if found is None:
                    await trio.sleep(0.25)  # adverts are still arriving
                    continue
                self.workers.append(found)
        if len(self.workers) < want:
            raise TaskFailed(
                f"found {len(self.workers)} of {want} workers matching the query within {timeout:.0f} s"
            )
        return [w for w in self.workers if w is not None]

    async def _next_worker(self) -> str | None:
        for peer in self.candidates():
            if peer in self.speeds or await self.speed_check(peer) is not None:
                return peer
        return None

    def _exclude(self, peer: str, why: str) -> None:
        log.warning("worker %s excluded: %s", peer, why)
        self.excluded[peer] = why
        self.held.pop(peer, None)
        self._own.pop(peer, None)

    # -- training

    def model(self) -> torch.nn.Module:
        """A fresh model holding the current global state (float32, CPU)."""
        _, model = self.recipe.make(self.cfg)
        model.load_state_dict(self.state, strict=False)
        return model

    async def outer_step(self, shards: Sequence[Mapping[str, torch.Tensor]]) -> OuterReport:
        """Train one outer step: one segment per worker slot on ``shards[slot]``, then the outer update.

        Each shard holds ``inner_steps`` micro-batches along its first dimension.

        Example::

            report = await job.outer_step([{"tokens": t} for t in batches])
        """
        if not self.workers:
            await self.recruit()
        if len(shards) < len(self.workers):
            raise ConfigError(f"{len(self.workers)} worker slots but {len(shards)} data shards")
        self._own.clear()  # every worker now starts from the shared state
        t0 = time.monotonic()
        step = len(self.reports)
        records: list[SegmentRecord] = []
        grads: dict[int, dict[str, torch.Tensor]] = {}
        replaced: list[tuple[str, str]] = []
        start = {k: v.clone() for k, v in self.state.items()}

        async def slot_main(slot: int) -> None:
            got = await self._slot_segment(slot, start, None, shards[slot], step, records, replaced)
            if got is not None:
                grads[slot] = got

        async with trio.open_nursery() as nursery:
            for slot in range(len(self.workers)):
                nursery.start_soon(slot_main, slot)
        return await self._finish_step(step, len(self.workers), grads, records, replaced, t0, False)

    async def train(
        self,
        steps: int,
        shards: Callable[[int], Sequence[Mapping[str, torch.Tensor]]],
        *,
        on_report: Callable[[OuterReport], None] | None = None,
    ) -> list[OuterReport]:
        """Run ``steps`` outer steps; ``shards(step)`` gives that step's shard per worker slot.

        With ``overlap`` (:class:`RentOptions`) a worker starts its next segment as soon as it
        returns one, from ``x[k-1] - g[k]`` (its own progress on the newest shared state), and
        the outer update of step k lands while step k+1 runs; otherwise this is
        :meth:`outer_step` in a loop. ``on_report`` sees each step's report when its update lands.

        Example::

            reports = await job.train(10, lambda step: [{"tokens": t} for t in batches(step)])
        """
        if steps < 1:
            raise ConfigError("steps must be >= 1")
        out: list[OuterReport] = []

        def landed(report: OuterReport) -> None:
            out.append(report)
            if on_report is not None:
                on_report(report)

        if not self.options.overlap:
            for _ in range(steps):
                landed(await self.outer_step(shards(len(self.reports))))
            return out
        if not self.workers:
            await self.recruit()
        self.held.clear()  # workers will hold starts of their own, not the shared versions
        first = len(self.reports)
        slots = len(self.workers)
        got_shards: dict[int, Sequence[Mapping[str, torch.Tensor]]] = {}
        records: list[list[SegmentRecord]] = [[] for _ in range(steps)]
        grads: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(steps)]
        replaced: list[list[tuple[str, str]]] = [[] for _ in range(steps)]
        began = [0.0] * steps
        finished = [0] * steps
        all_in = [trio.Event() for _ in range(steps)]
        applied = [trio.Event() for _ in range(steps)]
        shared: dict[int, dict[str, torch.Tensor]] = {-1: dict(self.state)}  # x after step i

        def shards_of(i: int) -> Sequence[Mapping[str, torch.Tensor]]:
            if i not in got_shards:
                got = shards(first + i)
                if len(got) < slots:
                    raise ConfigError(f"{slots} worker slots but {len(got)} data shards")
                got_shards[i] = got
                began[i] = time.monotonic()
            return got_shards[i]

        def done(i: int) -> None:
            finished[i] += 1
            if finished[i] == slots:
                all_in[i].set()

        async def slot_main(slot: int) -> None:
            own: dict[str, torch.Tensor] | None = None  # this slot's last pseudo-gradient
            for i in range(steps):
                if own is None:
                    if i > 0:
                        await applied[i - 1].wait()
                    target = None  # the shared state
                else:
                    if i >= 2:
                        await applied[i - 2].wait()
                    base = shared[i - 2]
                    target = {k: base[k] - own[k] for k in base}
                    shared.pop(i - 3, None)
                own = None
                if self.workers[slot] is not None:
                    own = await self._slot_segment(
                        slot, dict(self.state), target, shards_of(i)[slot], first + i, records[i],
                        replaced[i],
                    )
                if own is not None:
                    grads[i][slot] = own
                done(i)
                if self.workers[slot] is None:  # dropped: it counts as in for every later step
                    for j in range(i + 1, steps):
                        done(j)
                    return

        async def lander() -> None:
            for i in range(steps):
                await all_in[i].wait()
                report = await self._finish_step(
                    first + i, slots, grads[i], records[i], replaced[i], began[i], i > 0, keep=True
                )
                shared[i] = dict(self.state)
                applied[i].set()
                landed(report)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lander)
            for slot in range(slots):
                nursery.start_soon(slot_main, slot)
        self.workers = [w for w in self.workers if w is not None]
        return out

    async def _slot_segment(
        self,
        slot: int,
        start: dict[str, torch.Tensor],
        target: dict[str, torch.Tensor] | None,
        shard: Mapping[str, torch.Tensor],
        step: int,
        records: list[SegmentRecord],
        replaced: list[tuple[str, str]],
    ) -> dict[str, torch.Tensor] | None:
        """One slot's segment of ``step``, handed to spares while its worker fails; None if none ran it."""
        tries = 0
        while True:
            worker = self.workers[slot]
            if worker is None:
                return None
            got = await self._segment(slot, worker, start, shard, step, records, target=target)
            if got is not None:
                return got
            if tries >= self.options.max_replacements:
                self.workers[slot] = None
                return None
            tries += 1
            spare = await self._next_worker()
            self.workers[slot] = spare
            if spare is not None:
                replaced.append((worker, spare))
                log.warning("slot %d: worker %s replaced by %s", slot, worker, spare)

    async def _finish_step(
        self,
        step: int,
        slots: int,
        grads: dict[int, dict[str, torch.Tensor]],
        records: list[SegmentRecord],
        replaced: list[tuple[str, str]],
        t0: float,
        overlapped: bool,
        *,
        keep: bool = False,
    ) -> OuterReport:
        """Apply the step's mean pseudo-gradient and make (and keep) its report."""
        dropped = [i for i in range(slots) if i not in grads]
        if not keep:
            self.workers = [w for w in self.workers if w is not None]  # (dropped slots close)
        if grads:
            self._apply([grads[i] for i in sorted(grads)])
        ok = [r for r in records if r.outcome == "ok"]
        report = OuterReport(
            outer_step=step,
            loss=sum(r.loss for r in ok if r.loss is not None) / len(ok) if ok else None,
            workers=[r.worker for r in ok],
            segments=records,
            replaced=replaced,
            dropped=dropped,
            bytes_sent=sum(r.bytes_sent for r in records),
            bytes_received=sum(r.bytes_received for r in records),
            seconds=time.monotonic() - t0,
            price=sum(r.price for r in records),
            overlapped=overlapped,
        )
        if self.evaluate is not None:
            report.eval_loss = await trio.to_thread.run_sync(self.evaluate, self.model())
        self.reports.append(report)
        return report

    def _inputs(
        self, worker: str, shard: Mapping[str, torch.Tensor], target: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], int, int, dict[str, torch.Tensor]]:
        """What to send ``worker`` for a segment from the shared state (``target`` None) or from
        ``target``: (tensors, base version, version, the exact start the worker will hold)."""
        tensors = {DATA + k: v for k, v in shard.items()}
        if target is not None:
            self._serial += 1
            own = self._own.get(worker)
            if own is None:
                tensors.update({STATE + k: v for k, v in target.items()})
                return tensors, -1, self._serial, target
            dtype = CODEC_DTYPES[self.options.codec]
            update = {k: (target[k] - own[1][k]).to(dtype) for k in target}
            tensors.update({UPDATE + k: v for k, v in update.items()})
            # exactly the worker's sum (p2pcompute.rent.worker): held + update in float32
            return tensors, own[0], self._serial, {k: own[1][k] + update[k].float() for k in target}
        held = self.held.get(worker)
        if held == self.version:
            return tensors, -1, self.version, self.state
        if held is not None and held == self.version - 1 and self._update is not None:
            tensors.update({UPDATE + k: v for k, v in self._update.items()})
            return tensors, held, self.version, self.state
        tensors.update({STATE + k: v for k, v in self.state.items()})
        return tensors, -1, self.version, self.state

    async def _segment(
        self,
        slot: int,
        worker: str,
        start: dict[str, torch.Tensor],
        shard: Mapping[str, torch.Tensor],
        step: int,
        records: list[SegmentRecord],
        *,
        target: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor] | None:
        opts = self.options
        sample = self._rng.random() < opts.verify_fraction or (
            opts.verify_first and worker not in self._proven
        )
        rec = SegmentRecord(slot, worker, "failed", 0.0)
        records.append(rec)
        begin = start  # the state this attempt's segment starts from (set per attempt below)

        async def check(outputs: dict[str, torch.Tensor], info: dict[str, Any], provider: str) -> None:
            grad = split_named(outputs, GRAD)
            dtype = CODEC_DTYPES[opts.codec]
            bad = None
            if set(grad) != set(begin) or any(
                g.shape != begin[k].shape or g.dtype != dtype for k, g in grad.items()
            ):
                bad = "the pseudo-gradient does not fit the model"
            elif not all(bool(torch.isfinite(g).all()) for g in grad.values()):
                bad = "the pseudo-gradient is not finite"
            elif info.get("steps") != opts.inner_steps:
                bad = f"it reports {info.get('steps')!r} inner steps, not {opts.inner_steps}"
            elif sample and info.get("start_digest") != state_digest(begin)[:32]:
                bad = "it started from another state than the one sent"
            if bad is None and sample:
                ref = await trio.to_thread.run_sync(
                    lambda: run_segment(
                        self.recipe, self.cfg, begin, shard, opts.inner_steps, codec=opts.codec
                    )
                )
                d = distance(grad, ref.grad)
                rec.verified, rec.distance = True, d
                if not d <= opts.tolerance:
                    self.evidence.append(
                        Evidence(
                            worker,
                            step,
                            f"re-run differs by {d:.4g}",
                            state_digest(grad)[:32],
                            state_digest(ref.grad)[:32],
                            d,
                            opts.tolerance,
                        )
                    )
                    raise WorkRejected(
                        f"segment of outer step {step} differs from its re-run by {d:.4g} "
                        f"(tolerance {opts.tolerance})",
                        peer=provider,
                    )
            if bad is not None:
                self.evidence.append(
                    Evidence(worker, step, bad, state_digest(grad)[:32], None, None, opts.tolerance)
                )
                raise WorkRejected(f"segment of outer step {step}: {bad}", peer=provider)

        if not await self._reachable(worker):
            rec.detail = "unreachable"
            self._exclude(worker, "unreachable: no connection and no dial succeeded")
            return None
        for _attempt in range(2):  # a second time with the full state when the worker lost it
            tensors, base, version, begin = self._inputs(worker, shard, target)
            params = {
                "v": SEGMENT_VERSION,
                "job": self.job_id,
                "config": self.cfg,
                "version": version,
                "base": base,
                "steps": opts.inner_steps,
                "codec": opts.codec,
            }
            t0 = time.monotonic()
            try:
                r = await self._watched(
                    worker,
                    self.tasks.run_task(
                        kind_of(self.recipe.name),
                        tensors,
                        params,
                        providers=[worker],
                        retries=0,
                        max_price=opts.max_price,
                        deadline=opts.segment_timeout,
                        result_timeout=opts.segment_timeout,
                        accept_timeout=opts.grant_timeout,
                        check=check,
                    ),
                )
            except TaskFailed as exc:
                rec.seconds = time.monotonic() - t0
                rec.detail = str(exc)
                if STATE_MISSING in str(exc) and worker not in self.excluded:
                    self.held.pop(worker, None)
                    self._own.pop(worker, None)
                    continue
                proof = [e for e in self.evidence if e.worker == worker and e.outer_step == step]
                if proof:
                    rec.outcome = "rejected"
                    self._exclude(worker, f"work refused: {proof[-1].reason}")
                else:
                    self._exclude(worker, f"segment failed: {exc}")
                return None
            rec.seconds = time.monotonic() - t0
            rec.outcome = "ok"
            rec.bytes_sent = sum(nbytes(t) for t in tensors.values())
            rec.bytes_received = sum(nbytes(t) for t in r.outputs.values())
            rec.price = r.receipt.body.price
            loss = r.info.get("loss_last")
            rec.loss = float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None
            self.spent += rec.price
            if target is None:
                self.held[worker] = self.version
            else:
                self._own[worker] = (version, begin)
            if rec.verified:
                self._proven.add(worker)
            return {k: v.float() for k, v in split_named(r.outputs, GRAD).items()}
        return None

    async def _watched(self, worker: str, work: Awaitable[TaskResult]) -> TaskResult:
        """Await ``work`` while watching ``worker``: once it is disconnected and no dial reaches it
        (``dial_timeout``), give up at once with :class:`TaskFailed` instead of waiting out the
        segment's deadline (a dead worker never answers the request of its next segment)."""
        box: list[TaskResult] = []
        failed: list[TaskFailed] = []

        async def run(cancel: trio.CancelScope) -> None:
            try:
                box.append(await work)
            except TaskFailed as exc:  # raised below, not as a nursery's exception group
                failed.append(exc)
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            while True:  # wakes once a second, only while a segment is in flight
                await trio.sleep(1.0)
                if worker not in self.node.connected_peers() and not await self._reachable(worker):
                    nursery.cancel_scope.cancel()
                    break
        if failed:
            raise failed[0]
        if not box:
            raise TaskFailed(f"worker {worker} is gone (disconnected, and a dial found nobody)")
        return box[0]

    async def _reachable(self, worker: str) -> bool:
        """Connected, or one of its advertised addresses answers a dial within ``dial_timeout``.

        A worker that died between two segments never answers the request for the next one;
        without this the slot would wait for the whole ``segment_timeout`` before a spare is tried.
        """
        if worker in self.node.connected_peers():
            return True
        rec = self.node.peers.get(worker)
        for addr in rec.addrs if rec is not None else ():
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{worker}"
            try:
                await self.node.connect(full, timeout=self.options.dial_timeout)
                return True
            except P2PComputeError as exc:
                log.info("dialing worker %s at %s failed: %s", worker, addr, exc)
        return False

    def _apply(self, grads: list[dict[str, torch.Tensor]]) -> None:
        old = {k: v.clone() for k, v in self._params.items()}
        for k, p in self._params.items():
            p.grad = torch.stack([g[k] for g in grads]).mean(dim=0)
        self._outer.step()
        dtype = CODEC_DTYPES[self.options.codec]
        update = {k: (self._params[k] - old[k]).to(dtype) for k in old}
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(old[k] + update[k].float())  # exactly what every worker computes
        self.state = {k: v.detach().clone() for k, v in self._params.items()}
        self._update = update
        self.version += 1


__all__ = ["Evidence", "OuterReport", "RentJob", "RentOptions", "SegmentRecord"]
