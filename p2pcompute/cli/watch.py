"""Say so when a running peer loses its bootstrap nodes, and redial them with back-off.

:class:`Backoff` is the sans-IO part (the delays); :func:`watch_bootstrap` is the trio driver the
``peer`` command runs beside its node. While a bootstrap node is connected the watcher looks once
every ``check_every`` seconds (a cheap table lookup); when none is, it dials them, and on failure
prints one line (``p2pcompute: warning: cannot reach bootstrap node ...; retrying in N s``) and
sleeps N seconds, N doubling from ``first`` up to ``cap``; when one answers again it says so once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from p2pcompute.cli.logs import notice
from p2pcompute.errors import P2PComputeError

if TYPE_CHECKING:
    from p2pcompute.overlay.node import Node


class Backoff:
    """Delays that double after each failure, from ``first`` up to ``cap``; ``reset()`` after a success.

    Example::

        b = Backoff(5, 300)
        [b.failed() for _ in range(4)]    # [5, 10, 20, 40]
        b.reset(); b.failed()             # 5
    """

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def failed(self) -> float:
        """Count one failure; return how long to wait before the next try."""
        delay = min(self.cap, self.first * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Forget the failures (a try succeeded)."""
        self.failures = 0


def _peer_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[-1]


async def watch_bootstrap(
    node: Node,
    bootstrap: Sequence[str],
    *,
    check_every: float = 10.0,
    first: float = 5.0,
    cap: float = 300.0,
    dial_timeout: float = 5.0,
    say: Callable[..., None] = notice,
) -> None:
    """Watch ``node``'s links to ``bootstrap`` forever; warn when all are gone and redial with back-off.

    Example::

        nursery.start_soon(watch_bootstrap, node, args.bootstrap)
    """
    ids = {_peer_of(a) for a in bootstrap} - {node.peer_id}
    if not ids:
        return
    backoff = Backoff(first, cap)
    lost = False
    while True:
        if ids & set(node.connected_peers()):
            if lost:
                say("info", "bootstrap node reachable again")
                lost = False
                backoff.reset()
            await trio.sleep(check_every)
            continue
        errors = []
        for addr in bootstrap:
            try:
                await node.connect(addr, timeout=dial_timeout)
            except P2PComputeError as exc:
                errors.append(str(exc))
        if ids & set(node.connected_peers()):
            continue
        delay = backoff.failed()
        others = len(node.connected_peers())
        reason = errors[0] if errors else "not connected"
        say(
            "warning",
            f"cannot reach bootstrap node {', '.join(sorted(ids))} ({reason}); retrying in {delay:g} s"
            + (f"; still connected to {others} peers" if others else ""),
        )
        lost = True
        await trio.sleep(delay)
