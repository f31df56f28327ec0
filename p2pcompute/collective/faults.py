"""A test seam: faults injected into a :class:`~p2pcompute.collective.Collective` at named points.

Production code never carries test switches of its own. A collective is built with a
:class:`FaultPlan` (default: an empty one, which does nothing); the round driver awaits
``plan.at(point)`` at a few named points of an attempt, and the control links and the
inbound handler consult ``plan.muted`` / ``plan.silent_exit``. Tests and the benchmark's
death measurements fill the plan in, before or during a round. Points:

* ``snapshot``: the round's pristine copy of the caller's tensors is taken, no attempt yet;
* ``round_start``: an attempt's transfers are about to start;
* ``contribution_start`` / ``contribution_sent``: before and after one contribution's send;
* ``reduce``: our part is reduced, before it is finalised and sent;
* ``send_refused``: a receiver refused one of our sends because it is full (before the backoff).

Imports :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from p2pcompute.errors import ConfigError

Hook = Callable[[], Awaitable[None]]

#: the points a hook may be attached to
POINTS = frozenset(
    {"snapshot", "round_start", "contribution_start", "contribution_sent", "reduce", "send_refused"}
)


class FaultPlan:
    """Hooks awaited at named points of a round, plus two switches; empty by default.

    ``silent_exit``: a "crashed" peer says nothing on its way out (no leave notice).
    ``muted``: a "hung" peer neither answers nor tells anything (its node and lane stay up).
    ``tamper_part(part)``: a lying reducer (robust aggregators): it changes its averaged part
    in place after aggregating it and before committing to it (the check in
    :mod:`p2pcompute.collective.verify` should catch it).

    Example::

        async def freeze() -> None:
            await trio.sleep_forever()

        plan = FaultPlan({"contribution_sent": freeze})
        async with open_collective(node, lane, faults=plan) as coll:
            ...                       # this peer hangs after its first contribution went out
    """

    def __init__(
        self,
        hooks: Mapping[str, Hook] | None = None,
        *,
        silent_exit: bool = False,
        muted: bool = False,
        tamper_part: Callable[[Any], None] | None = None,
    ) -> None:
        self.hooks: dict[str, Hook] = {}
        self.silent_exit = silent_exit
        self.muted = muted
        self.tamper_part = tamper_part
        for point, hook in (hooks or {}).items():
            self.on(point, hook)

    def on(self, point: str, hook: Hook) -> None:
        """Attach ``hook`` to ``point`` (replacing one attached before).

        Example::

            plan.on("reduce", crash)
        """
        if point not in POINTS:
            raise ConfigError(f"unknown fault point {point!r}; use one of {', '.join(sorted(POINTS))}")
        self.hooks[point] = hook

    async def at(self, point: str) -> None:
        """Run the hook attached to ``point``, if any (the round driver calls this).

        Example::

            await plan.at("round_start")
        """
        hook = self.hooks.get(point)
        if hook is not None:
            await hook()


__all__ = ["POINTS", "FaultPlan", "Hook"]
