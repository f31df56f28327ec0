"""Shared test fixtures: real py-libp2p nodes on 127.0.0.1 (no mocks of our network).

``open_swarm(n)`` runs a bootstrap node plus ``n`` peers joined through it, in this
process, and yields ``(bootstrap, [peers])``; ``swarm_factory`` is the same as a fixture.
Nodes use a fixed CPU-only capacity (no probing) and short advert intervals.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from p2pcompute.capacity.model import Capacity
from p2pcompute.overlay import Node, open_node

TEST_CAPACITY = Capacity(cpu_cores=2, ram_total=8 << 30, ram_available=4 << 30, platform="test")


@contextlib.asynccontextmanager
async def open_swarm(n: int, **tuning: Any) -> AsyncIterator[tuple[Node, list[Node]]]:
    """A bootstrap node and ``n`` peers joined through it, each knowing all others; all shut down on exit."""
    opts: dict[str, Any] = {"capacity": TEST_CAPACITY, **tuning}
    async with contextlib.AsyncExitStack() as stack:
        boot = await stack.enter_async_context(open_node(role="bootstrap", **opts))
        peers = []
        for _ in range(n):
            peers.append(await stack.enter_async_context(open_node(bootstrap=boot.addrs, **opts)))
        # every peer knows every other node (n - 1 peers and the bootstrap node) before the test starts
        with trio.fail_after(120):
            for p in peers:
                await p.wait_for_peers(n, timeout=120)
        yield boot, peers


@pytest.fixture
def swarm_factory() -> Callable[..., contextlib.AbstractAsyncContextManager[tuple[Node, list[Node]]]]:
    return open_swarm


__all__ = ["TEST_CAPACITY", "open_swarm"]
