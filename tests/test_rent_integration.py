"""Renting on real py-libp2p nodes on 127.0.0.1: cheats caught, deaths survived, bad configs refused."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from conftest import TEST_CAPACITY

from p2pcompute.errors import ConfigError, TaskFailed
from p2pcompute.overlay import Node, open_node
from p2pcompute.rent import RentJob, RentOptions, TrainingWorker, builtin_book, builtin_recipes
from p2pcompute.rent.recipes import Recipe, RecipeBook
from p2pcompute.rent.worker import CHEATS
from p2pcompute.tasks import verify_ledger
from p2pcompute.tasks.driver import TaskService, open_tasks, serve_tasks
from p2pcompute.tasks.registry import check_cancelled
from p2pcompute.tensors import open_lane

LM = builtin_recipes()["lm"]
CFG = {"layers": 1, "width": 32, "heads": 2, "vocab": 16, "context": 8, "lr": 3e-3}
STEPS = 4


def shards(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, 16, (STEPS * 4, 9), generator=g)} for _ in range(n)]


class BlockingWorker(TrainingWorker):
    """An honest worker whose segments start, say so, and wait until released (to be killed mid-way)."""

    def __init__(self, started: trio.Event, token: trio.lowlevel.TrioToken) -> None:
        super().__init__(builtin_book(price=0.01))
        self.started, self.token = started, token
        self.release = threading.Event()

    def run(self, recipe: Recipe, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Any:
        trio.from_thread.run_sync(self.started.set, trio_token=self.token)
        while not self.release.wait(0.02):
            check_cancelled()
        return super().run(recipe, tensors, params)


async def _provider(
    boot: Node,
    worker: TrainingWorker,
    task_status: Any,
    *,
    scope: trio.CancelScope | None = None,
    ledger: Path | None = None,
    lane: bool = False,
) -> None:
    with scope or trio.CancelScope():
        async with (
            open_node(bootstrap=boot.addrs, capacity=TEST_CAPACITY) as node,
            contextlib.AsyncExitStack() as stack,
        ):
            the_lane = await stack.enter_async_context(open_lane(node)) if lane else None
            await stack.enter_async_context(
                serve_tasks(node, worker.registry(), ledger=ledger, lane=the_lane, lease_ttl=3.0)
            )
            task_status.started(node.peer_id)
            await trio.sleep_forever()


@contextlib.asynccontextmanager
async def requester(
    boot: Node, ledger: Path | None, providers: int, lane: bool = False
) -> AsyncIterator[tuple[Node, TaskService]]:
    async with (
        open_node(bootstrap=boot.addrs, capacity=TEST_CAPACITY, target_connections=12) as node,
        contextlib.AsyncExitStack() as st,
    ):
        the_lane = await st.enter_async_context(open_lane(node)) if lane else None
        tasks = await st.enter_async_context(open_tasks(node, ledger=ledger, lane=the_lane))
        await tasks.wait_for_providers(providers, timeout=30)
        await node.wait_for_peers(providers + 1, timeout=30)
        yield node, tasks


async def test_every_cheat_is_caught_and_honest_workers_are_never_flagged(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with (
            open_node(role="bootstrap", capacity=TEST_CAPACITY) as boot,
            trio.open_nursery() as nursery,
        ):
            honest = [
                await nursery.start(_provider, boot, TrainingWorker(builtin_book(price=0.01)))
                for _ in range(2)
            ]
            cheaters = {
                await nursery.start(_provider, boot, TrainingWorker(builtin_book(price=0.01), cheat=c)): c
                for c in CHEATS
            }
            async with requester(boot, tmp_path / "r.jsonl", 2 + len(CHEATS)) as (node, tasks):
                opts = RentOptions(
                    workers=2 + len(CHEATS),
                    inner_steps=STEPS,
                    verify_fraction=1.0,
                    max_replacements=0,
                    codec="bf16",
                )
                job = RentJob(tasks, node, LM, CFG, opts)
                await job.recruit()
                first = await job.outer_step(shards(len(job.workers), 0))
                second = await job.outer_step(shards(len(job.workers), 1))
            nursery.cancel_scope.cancel()
    caught = {e.worker: e for e in job.evidence}
    assert set(caught) == set(cheaters), {cheaters.get(w, w): e.reason for w, e in caught.items()}
    assert all(e.distance is None or e.distance > opts.tolerance for e in caught.values())
    assert set(second.workers) == set(honest)
    assert not set(honest) & set(job.excluded)
    stale = next(w for w, c in cheaters.items() if c == "stale")
    assert stale in first.workers  # its first segment was honest work, paid for
    assert caught[stale].outer_step == 1
    report = verify_ledger(tmp_path / "r.jsonl")
    paid = {s.worker for r in (first, second) for s in r.segments if s.outcome == "ok"}
    assert len(report.entries) == sum(s.outcome == "ok" for r in (first, second) for s in r.segments) + len(
        job.speeds
    )
    assert paid == set(honest) | {stale}


async def test_a_provider_killed_mid_segment_is_replaced_by_a_spare(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with (
            open_node(role="bootstrap", capacity=TEST_CAPACITY) as boot,
            trio.open_nursery() as nursery,
        ):
            started = trio.Event()
            blocking = BlockingWorker(started, trio.lowlevel.current_trio_token())
            kill = trio.CancelScope()
            victim = await nursery.start(
                lambda task_status: _provider(boot, blocking, task_status, scope=kill, lane=True)
            )
            others = [
                await nursery.start(
                    lambda task_status: _provider(
                        boot, TrainingWorker(builtin_book(price=0.01)), task_status, lane=True
                    )
                )
                for _ in range(2)
            ]
            async with requester(boot, tmp_path / "r.jsonl", 3, lane=True) as (node, tasks):
                job = RentJob(
                    tasks, node, LM, CFG, RentOptions(workers=2, inner_steps=STEPS, verify_fraction=0.0)
                )
                job.workers = [victim, others[0]]  # the slot order the test needs
                for w in job.workers:
                    assert await job.speed_check(w) is not None

                async def killer() -> None:
                    await started.wait()
                    kill.cancel()

                nursery.start_soon(killer)
                report = await job.outer_step(shards(2, 0))
                blocking.release.set()
                after = await job.outer_step(shards(2, 1))
            nursery.cancel_scope.cancel()
    assert report.replaced == [(victim, others[1])]
    assert sorted(report.workers) == sorted(others)
    assert report.dropped == []
    assert victim in job.excluded
    assert sorted(after.workers) == sorted(others)
    assert after.bytes_sent < report.bytes_sent  # the state went once; then only updates
    assert len(verify_ledger(tmp_path / "r.jsonl").entries) == 4 + len(job.speeds)


async def test_a_dead_requester_frees_its_provider_and_no_ledger_is_half_written(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with (
            open_node(role="bootstrap", capacity=TEST_CAPACITY) as boot,
            trio.open_nursery() as nursery,
        ):
            started = trio.Event()
            blocking = BlockingWorker(started, trio.lowlevel.current_trio_token())
            provider = await nursery.start(
                lambda task_status: _provider(boot, blocking, task_status, ledger=tmp_path / "p.jsonl")
            )
            dead = trio.CancelScope()

            async def doomed() -> None:
                with dead:
                    async with requester(boot, tmp_path / "a.jsonl", 1) as (node, tasks):
                        job = RentJob(tasks, node, LM, CFG, RentOptions(workers=1, inner_steps=STEPS))
                        job.workers = [provider]
                        await job.outer_step(shards(1, 0))

            nursery.start_soon(doomed)
            await started.wait()
            dead.cancel()
            blocking.release.set()
            async with requester(boot, tmp_path / "b.jsonl", 1) as (node, tasks):
                job = RentJob(
                    tasks, node, LM, CFG, RentOptions(workers=1, inner_steps=STEPS, segment_timeout=30)
                )
                job.workers = [provider]
                report = await job.outer_step(shards(1, 1))
            nursery.cancel_scope.cancel()
    assert report.workers == [provider]
    assert len(verify_ledger(tmp_path / "p.jsonl").entries) == 1
    assert len(verify_ledger(tmp_path / "b.jsonl").entries) == 1
    assert len(verify_ledger(tmp_path / "a.jsonl").entries) == 0


async def test_bad_configs_are_refused_locally_and_by_the_provider(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        RentJob(None, None, LM, {**CFG, "dropout": 0.5})  # type: ignore[arg-type]
    small = RecipeBook()
    small.add(Recipe("lm", LM.build, LM.loss, schema=LM.schema, check_batch=LM.check_batch, max_params=1000))
    with trio.fail_after(60):
        async with (
            open_node(role="bootstrap", capacity=TEST_CAPACITY) as boot,
            trio.open_nursery() as nursery,
        ):
            provider = await nursery.start(_provider, boot, TrainingWorker(small))
            async with requester(boot, None, 1) as (node, tasks):
                job = RentJob(
                    tasks, node, LM, CFG, RentOptions(workers=1, inner_steps=STEPS, max_replacements=0)
                )
                job.workers = [provider]
                report = await job.outer_step(shards(1, 0))
                seg = {
                    "v": 1,
                    "job": "x",
                    "config": CFG,
                    "version": 0,
                    "base": -1,
                    "steps": STEPS,
                    "codec": "fp32",
                }
                with pytest.raises(TaskFailed, match="over this provider's cap"):
                    await tasks.run_task("train/lm", {}, seg, providers=[provider], retries=0, deadline=20)
            nursery.cancel_scope.cancel()
    assert report.workers == []
    assert report.dropped == [0]
    assert "over this provider's cap" in job.excluded[provider]


class SlowWorker(TrainingWorker):
    """An honest worker that notes when each segment starts and takes ``pause`` seconds longer."""

    def __init__(self, pause: float) -> None:
        super().__init__(builtin_book(price=0.01))
        self.pause = pause
        self.starts: list[float] = []

    def run(self, recipe: Recipe, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> Any:
        self.starts.append(time.monotonic())
        time.sleep(self.pause)  # a slower card: this worker's segments simply take longer
        return super().run(recipe, tensors, params)


async def test_overlapped_steps_start_before_the_last_update_lands_and_starts_are_verified(
    tmp_path: Path,
) -> None:
    fast, slow = SlowWorker(0.0), SlowWorker(0.6)
    landed: list[tuple[int, float]] = []
    with trio.fail_after(120):
        async with (
            open_node(role="bootstrap", capacity=TEST_CAPACITY) as boot,
            trio.open_nursery() as nursery,
        ):
            ids = [await nursery.start(_provider, boot, w) for w in (fast, slow)]
            async with requester(boot, tmp_path / "r.jsonl", 2) as (node, tasks):
                # every segment re-run locally, and its start state checked by digest
                opts = RentOptions(workers=2, inner_steps=STEPS, verify_fraction=1.0, overlap=True)
                job = RentJob(tasks, node, LM, CFG, opts)
                job.workers = list(ids)
                reports = await job.train(
                    4,
                    lambda step: shards(2, step),
                    on_report=lambda r: landed.append((r.outer_step, time.monotonic())),
                )
                after = await job.outer_step(shards(2, 9))  # back to blocking: full shared state
            nursery.cancel_scope.cancel()
    assert [r.outer_step for r in reports] == [0, 1, 2, 3]
    assert job.evidence == [], [e.reason for e in job.evidence]
    assert all(sorted(r.workers) == sorted(ids) for r in [*reports, after])
    assert [r.overlapped for r in reports] == [False, True, True, True]
    assert all(s.verified for r in reports for s in r.segments)
    # the fast worker began step 1 while the slow one still ran step 0: before its update landed
    assert fast.starts[1] < landed[0][1]
    assert len(verify_ledger(tmp_path / "r.jsonl").entries) == 10  # 5 steps x 2 workers, no speed checks
