"""An idle task service sleeps: no loop of p2pcompute.tasks wakes itself.

Regression test for the provider clock that re-armed itself after its first request
(``p2pcompute peer`` used a quarter to three quarters of a core while idle).
"""

from __future__ import annotations

from collections import Counter

import torch
import trio
import trio.lowlevel
from conftest import TEST_CAPACITY

from p2pcompute.overlay import open_node
from p2pcompute.tasks.driver import open_tasks, serve_tasks


class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of the tasks whose name starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.steps: Counter[str] = Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith(self.prefix):
            self.steps[task.name] += 1


async def test_a_provider_that_served_a_task_sleeps_while_idle() -> None:
    opts = {"capacity": TEST_CAPACITY}
    with trio.fail_after(90):
        async with open_node(role="bootstrap", **opts) as boot:  # noqa: SIM117 (separate lifetimes)
            async with (
                open_node(bootstrap=boot.addrs, **opts) as pnode,
                serve_tasks(pnode) as provider,
                open_node(bootstrap=boot.addrs, **opts) as rnode,
                open_tasks(rnode) as tasks,
            ):
                await tasks.wait_for_providers(1, timeout=30)
                await tasks.run_task("matmul", {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, {})
                await provider.wait_for_stat("receipts", 1, timeout=20)  # the lease has ended
                counter = StepCounter("p2pcompute.tasks")
                trio.lowlevel.add_instrument(counter)
                try:
                    # a span of idle time: the offer expires later (15 s), no lease is left;
                    # nothing of the task service has a reason to run in it
                    await trio.sleep(1.0)
                finally:
                    trio.lowlevel.remove_instrument(counter)
    assert sum(counter.steps.values()) <= 5, counter.steps.most_common(3)
