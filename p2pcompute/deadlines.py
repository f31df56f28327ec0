"""Deadlines: the one place where trio's timeouts become :class:`~p2pcompute.errors.PeerTimeout`.

Callers of p2pcompute never see ``trio.TooSlowError``. Code that waits on a peer wraps the wait
in :func:`deadline` (relative) or :func:`deadline_at` (absolute, trio clock); when time runs out
the body is cancelled and :class:`PeerTimeout` is raised with a message saying what did not
finish, naming the peer when one is given. ``None`` means no deadline, so optional timeouts
need no second code path. :func:`give_up_after` is the quiet variant for best-effort work
(a heartbeat, an offer) whose caller only needs to know whether it finished.

py-libp2p's exceptions are mapped in one place too, :mod:`p2pcompute.overlay.failures`, which
uses this module for its timeouts; this module imports only trio and :mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from p2pcompute.errors import PeerTimeout

__all__ = ["deadline", "deadline_at", "give_up_after"]


@contextmanager
def deadline_at(when: float | None, what: str, *, peer: str | None = None) -> Iterator[trio.CancelScope]:
    """Run the body until trio time ``when``; past it, cancel the body and raise :class:`PeerTimeout`.

    Example::

        with deadline_at(trio.current_time() + 5, "the offer", peer=peer_id):
            await stream.send_frame(raw)
    """
    with trio.move_on_at(math.inf if when is None else when) as scope:
        yield scope
    if scope.cancelled_caught:
        where = f" (peer {peer})" if peer else ""
        raise PeerTimeout(f"{what} did not finish in time{where}", peer=peer)


@contextmanager
def deadline(seconds: float | None, what: str, *, peer: str | None = None) -> Iterator[trio.CancelScope]:
    """Run the body for at most ``seconds`` (``None``: no limit); then raise :class:`PeerTimeout`.

    The message says what did not finish and within how long, so a log line is enough to act on.

    Example::

        with deadline(30, f"state download from {peer}", peer=peer):
            manifest = await fetch_manifest(node, peer)
    """
    if seconds is None:
        with trio.CancelScope() as scope:
            yield scope
        return
    with trio.move_on_after(seconds) as scope:
        yield scope
    if scope.cancelled_caught:
        where = f" (peer {peer})" if peer else ""
        raise PeerTimeout(f"{what} did not finish within {seconds:g} s{where}", peer=peer)


@contextmanager
def give_up_after(seconds: float | None) -> Iterator[trio.CancelScope]:
    """Best effort: cancel the body after ``seconds`` and carry on; ``scope.cancelled_caught`` says so.

    Example::

        with give_up_after(10) as scope:
            await stream.send_msg(heartbeat)
        if scope.cancelled_caught:
            log.info("heartbeat not sent in 10 s")
    """
    with trio.move_on_after(math.inf if seconds is None else seconds) as scope:
        yield scope
