"""The record pipeline: the one loop that moves a transfer's DATA records, either direction.

Each record takes two steps: *work* (CPU: stage and seal into a slot buffer, or open a slot
buffer into its destination) and *wire* (bytes between the slot buffer and the connection).
A sender works then wires; a receiver wires then works. :func:`move_records` runs them

* as one blocking loop in a worker thread on a direct connection (``steps.bulk``), with no
  event-loop round trip per record: the AEAD releases the GIL, so this is the fast path for
  CPU tensors (docs/design/data-plane.md); with ``steps.workers`` > 1 the CPU step runs in a
  small thread pool beside that loop (machines with cores to spare), order kept on the wire; or
* as two trio tasks over two slots (``pipelined``): while one record's bytes move, the other's
  work runs, in a worker thread when it is large and heavy (codecs, CUDA staging).

Imports trio and the lane's connections; never py-libp2p.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import socket as _stdsocket
from collections.abc import Callable
from typing import Any, Protocol

import trio

from p2pcompute.errors import P2PComputeError
from p2pcompute.tensors.conns import Conn, TcpConn, in_worker
from p2pcompute.wire.shards import RecordPlan

INLINE_BELOW = 64 << 10  # records smaller than this never hop to a worker thread


class RecordSteps(Protocol):
    """One direction's per-record work, for :func:`move_records`.

    ``outbound``: work comes before wire (a sender). ``bulk``: run the whole transfer as one
    blocking loop (only on a :class:`TcpConn`). ``slot`` is 0 or 1, the buffer pair in use.
    """

    outbound: bool
    bulk: bool
    workers: int  # threads that run ``work`` in the bulk loop (1: the loop's own thread)
    slots: int  # buffer sets: 2, or 2 per worker

    def heavy(self, plan: RecordPlan) -> bool:
        """Whether this record's work is worth a worker thread in the pipelined loop."""
        ...

    def work(self, index: int, plan: RecordPlan, slot: int) -> None:
        """The CPU step (blocking; may run in a worker thread)."""
        ...

    def wire_blocking(self, sock: _stdsocket.socket, index: int, plan: RecordPlan, slot: int) -> None:
        """The byte step on a blocking socket (bulk loop)."""
        ...

    async def wire(self, conn: Conn, index: int, plan: RecordPlan, slot: int) -> None:
        """The byte step on the connection (pipelined loop)."""
        ...

    async def after(self, plan: RecordPlan, slot: int) -> None:
        """Pipelined loop only: runs on the event loop after the second step, before the slot is reused."""
        ...


async def move_records(
    conn: Conn, plans: list[RecordPlan], steps: RecordSteps, limiter: trio.CapacityLimiter
) -> tuple[int, int]:
    """Run ``steps`` over every record of ``plans``; return (records, payload bytes) moved.

    Example::

        records, total = await move_records(conn, plans, SendSteps(...), lane_threads)
    """
    if steps.bulk and isinstance(conn, TcpConn):
        moved: tuple[int, int] = await conn.run_blocking(_bulk_loop(plans, steps), limiter)
        return moved
    return await _pipelined(conn, plans, steps)


def _bulk_loop(
    plans: list[RecordPlan], steps: RecordSteps
) -> Callable[[_stdsocket.socket], tuple[int, int]]:
    work = steps.work
    wire = steps.wire_blocking
    outbound = steps.outbound
    if steps.workers > 1:
        return functools.partial(_pooled_loop, plans, steps)

    def loop(sock: _stdsocket.socket) -> tuple[int, int]:
        total = 0
        for index, plan in enumerate(plans):
            if outbound:
                work(index, plan, 0)
                wire(sock, index, plan, 0)
            else:
                wire(sock, index, plan, 0)
                work(index, plan, 0)
            total += plan.nbytes
        return len(plans), total

    return loop


def _pooled_loop(plans: list[RecordPlan], steps: RecordSteps, sock: _stdsocket.socket) -> tuple[int, int]:
    """The bulk loop with a pool of ``steps.workers`` threads for the CPU step (seal or open).

    The loop's thread does the wire step in record order; up to ``steps.slots`` records are
    in the pool at once, each in its own slot (a record's counter, not the order it is sealed
    or opened in, fixes its nonce). A sender waits for the oldest record's seal before sending
    it; a receiver waits for the oldest record's open before receiving into its slot again. Any
    failure (IntegrityError) surfaces at that wait; the pool is joined before this returns, so
    no thread touches a buffer afterwards.
    """
    slots = steps.slots
    total = 0
    pending: collections.deque[tuple[int, RecordPlan, int, concurrent.futures.Future[Any]]] = (
        collections.deque()
    )
    with concurrent.futures.ThreadPoolExecutor(steps.workers, thread_name_prefix="lane-pool") as pool:
        try:
            for index, plan in enumerate(plans):
                slot = index % slots
                if len(pending) == slots:
                    done_index, done_plan, done_slot, future = pending.popleft()
                    future.result()
                    if steps.outbound:
                        steps.wire_blocking(sock, done_index, done_plan, done_slot)
                if not steps.outbound:
                    steps.wire_blocking(sock, index, plan, slot)
                pending.append((index, plan, slot, pool.submit(in_worker, steps.work, index, plan, slot)))
                total += plan.nbytes
            while pending:
                done_index, done_plan, done_slot, future = pending.popleft()
                future.result()
                if steps.outbound:
                    steps.wire_blocking(sock, done_index, done_plan, done_slot)
        finally:
            for *_, future in pending:
                future.cancel()
    return len(plans), total


async def _pipelined(conn: Conn, plans: list[RecordPlan], steps: RecordSteps) -> tuple[int, int]:
    records = 0
    total = 0
    free = trio.Semaphore(2)
    handoff_in, handoff_out = trio.open_memory_channel[tuple[int, RecordPlan, int]](2)
    outbound = steps.outbound

    async def work(index: int, plan: RecordPlan, slot: int) -> None:
        await maybe_in_thread(plan.nbytes, steps.heavy(plan), steps.work, index, plan, slot)

    async def wire(index: int, plan: RecordPlan, slot: int) -> None:
        await steps.wire(conn, index, plan, slot)

    first, second = (work, wire) if outbound else (wire, work)

    async def first_stage() -> None:
        async with handoff_in:
            for index, plan in enumerate(plans):
                await free.acquire()
                slot = index % 2
                await first(index, plan, slot)
                await handoff_in.send((index, plan, slot))

    async def second_stage() -> None:
        nonlocal records, total
        async with handoff_out:
            async for index, plan, slot in handoff_out:
                await second(index, plan, slot)
                await steps.after(plan, slot)
                free.release()
                records += 1
                total += plan.nbytes

    await run_together(first_stage, second_stage)
    return records, total


async def maybe_in_thread(nbytes: int, heavy: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a record's blocking work in a worker thread when it is large and ``heavy`` (codec or CUDA).

    AEAD alone on a record that is sealed from / opened into tensor memory stays on
    the event loop: the thread hop measured slower there (see docs/design/data-plane.md).

    Example::

        n = await maybe_in_thread(plan.nbytes, True, seal_record, plan, slot)
    """
    if nbytes < INLINE_BELOW or not heavy:
        return fn(*args)
    return await trio.to_thread.run_sync(in_worker, fn, *args)


async def run_together(*tasks: Callable[[], Any]) -> None:
    """Run ``tasks`` in a nursery; re-raise a lone error (typed) rather than an ExceptionGroup.

    Example::

        await run_together(reader, writer)
    """
    try:
        async with trio.open_nursery() as nursery:
            for task in tasks:
                nursery.start_soon(task)
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        typed = [e for e in errors if isinstance(e, P2PComputeError)]
        if typed:
            raise typed[0] from None
        if len(errors) == 1:
            raise errors[0] from None
        raise


__all__ = ["INLINE_BELOW", "RecordSteps", "maybe_in_thread", "move_records", "run_together"]
