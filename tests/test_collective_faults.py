"""The collective's fault plan (a test seam): named points only, empty by default."""

from __future__ import annotations

import pytest
import trio

from p2pcompute.collective.faults import POINTS, FaultPlan
from p2pcompute.errors import ConfigError


def test_unknown_points_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown fault point"):
        FaultPlan({"nowhere": trio.lowlevel.checkpoint})
    plan = FaultPlan()
    with pytest.raises(ConfigError):
        plan.on("round-start", trio.lowlevel.checkpoint)  # a typo must not pass silently


async def test_hooks_run_at_their_point_and_nothing_runs_by_default() -> None:
    plan = FaultPlan()
    assert not plan.silent_exit
    assert not plan.muted
    for point in POINTS:
        await plan.at(point)  # nothing attached: nothing happens
    seen: list[str] = []

    async def note() -> None:
        seen.append("reduce")

    plan.on("reduce", note)
    await plan.at("round_start")
    await plan.at("reduce")
    assert seen == ["reduce"]
