"""Say so when a running peer loses its bootstrap nodes, and redial them with back-off.

:class:`Backoff` is the sans-IO part (the delays); :func:`watch_bootstrap` is the trio driver the
``peer`` command runs beside its node. While a bootstrap node is connected the watcher sleeps until
the node signals a connection change (or the next key check is due); when none is, it dials them,
and on failure
prints one line (``p2pcompute: warning: cannot reach bootstrap node ...; retrying in N s``) and
sleeps N seconds, N doubling from ``first`` up to ``cap``; when one answers again it says so once.

:func:`find_clones` asks a bootstrap node (by peer exchange, as any peer may) for the adverts it
holds; one signed with our key but for addresses that are not ours means a second process runs
with our key file. Both would share one peer id and the swarm would keep only the newest advert,
so one of them silently disappears; the watcher stops with a :class:`ConfigError` (exit 3)
instead. It looks right after joining and then every ``identity_every`` seconds (at least one
advert lifetime), and acts only when the same foreign addresses show twice in a row: a single
sighting may be our own advert from before an address change, which our next advert replaces.
The node also notices on its own (:meth:`~p2pcompute.overlay.node.Node.identity_clones`: an
advert of our key that it never issued, issued after it started, reached it by gossip or peer
exchange); the watcher wakes on that too and stops at once, since that sighting is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from p2pcompute.cli.logs import notice
from p2pcompute.deadlines import deadline
from p2pcompute.errors import ConfigError, P2PComputeError

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


def _bare(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[0]


async def find_clones(node: Node, via: str, *, timeout: float = 10.0) -> list[str]:
    """Addresses at which ``via`` (a bootstrap node) holds an advert of our peer id that is not ours.

    An empty list when there is none; raises a :class:`P2PComputeError` when ``via`` cannot be asked.

    Example::

        if await find_clones(node, bootstrap_id):
            print("another process uses our key")
    """
    from p2pcompute.capacity.adverts import open_advert
    from p2pcompute.overlay.messages import MAX_PX_ADVERTS, PEERS_REQUEST, PEERS_RESPONSE, peers_protocol

    stream = await node.open_stream(
        via, peers_protocol(node.swarm), timeout=timeout, max_frame=PEERS_RESPONSE.max_size
    )
    try:
        with deadline(timeout, "peer exchange (identity check)", peer=via):
            await stream.send_frame(PEERS_REQUEST.build(limit=MAX_PX_ADVERTS))
            resp = await stream.recv_msg(PEERS_RESPONSE)
    finally:
        await stream.close()
    ours = {_bare(a) for a in node.addrs}
    foreign: list[str] = []
    for raw in resp["adverts"]:
        try:
            advert = open_advert(raw, swarm=node.swarm, now=time.time(), blame=via)
        except P2PComputeError:
            continue
        if advert.peer_id != node.peer_id:
            continue
        theirs = {_bare(a) for a in advert.addrs}
        if theirs and not theirs & ours:
            foreign.extend(sorted(theirs))
    return foreign


async def watch_bootstrap(
    node: Node,
    bootstrap: Sequence[str],
    *,
    first: float = 5.0,
    cap: float = 300.0,
    dial_timeout: float = 5.0,
    identity_every: float = 60.0,
    say: Callable[..., None] = notice,
) -> None:
    """Watch ``node``'s links to ``bootstrap`` forever; warn when all are gone and redial with back-off.

    Raises :class:`ConfigError` when a bootstrap node holds an advert of our key for addresses that
    are not ours (another process runs with our key file; see :func:`find_clones`).

    Example::

        nursery.start_soon(watch_bootstrap, node, args.bootstrap)
    """
    ids = {_peer_of(a) for a in bootstrap} - {node.peer_id}
    if not ids:
        return
    backoff = Backoff(first, cap)
    lost = False
    next_identity_check = trio.current_time()
    suspects: set[str] = set()
    while True:
        connected = ids & set(node.connected_peers())
        if connected:
            if lost:
                say("info", "bootstrap node reachable again")
                lost = False
                backoff.reset()
            _raise_on_clones(node)
            if trio.current_time() >= next_identity_check:
                next_identity_check = trio.current_time() + identity_every
                suspects = await _check_identity(node, sorted(connected)[0], dial_timeout, suspects)
            # sleep until a bootstrap link drops (the node signals connection changes) or the
            # next key check is due: no polling of local state
            with trio.move_on_at(next_identity_check):
                await node.wait_until(
                    lambda: not ids & set(node.connected_peers()) or bool(node.identity_clones()),
                    timeout=math.inf,
                )
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


def _raise_on_clones(node: Node) -> None:
    """ConfigError when the node itself has seen an advert of its key issued by another process."""
    clones = node.identity_clones()
    if clones:
        raise ConfigError(
            f"another process uses this node's key (peer id {node.peer_id}) at {', '.join(clones)}; "
            f"the swarm keeps only one of them: give each process its own --key file"
        )


async def _check_identity(node: Node, via: str, timeout: float, suspects: set[str]) -> set[str]:
    """The foreign addresses of our key seen now; ConfigError when some were seen last time too."""
    try:
        found = set(await find_clones(node, via, timeout=timeout))
    except P2PComputeError:
        return suspects  # the bootstrap node could not be asked now; the next round asks again
    clones = sorted(found & suspects)
    if clones:
        raise ConfigError(
            f"another process uses this node's key (peer id {node.peer_id}) at {', '.join(clones)}; "
            f"the swarm keeps only one of them: give each process its own --key file"
        )
    return found
