"""Keep py-libp2p's log noise out of normal operation without hiding our own logs.

py-libp2p 0.8.1 logs WARNING/ERROR lines during healthy operation (closed DHT and
identify streams, GossipSub back-off, "fail to deliver message to subscription",
shutdown races); with no handler attached Python prints them through its
last-resort handler. :func:`quiet_libp2p_logs` gives the ``libp2p`` logger a
:class:`logging.NullHandler` and raises its level to CRITICAL, unless the user
asked for py-libp2p logs (``LIBP2P_DEBUG``, or ``P2PCOMPUTE_LIBP2P_LOGS=1``).
Our loggers (``p2pcompute.*``) are untouched.

Imports nothing of ours.
"""

from __future__ import annotations

import logging
import os

_done = False


def quiet_libp2p_logs() -> None:
    """Silence the ``libp2p`` logger tree (idempotent; honours LIBP2P_DEBUG / P2PCOMPUTE_LIBP2P_LOGS).

    Example::

        quiet_libp2p_logs()   # open_node() calls it for you
    """
    global _done
    if _done:
        return
    _done = True
    if os.environ.get("LIBP2P_DEBUG") or os.environ.get("P2PCOMPUTE_LIBP2P_LOGS") == "1":
        return
    # Importing libp2p runs its own logging set-up, which clears the handlers of its logger
    # tree; import it first so our settings are the last word.
    import libp2p  # noqa: F401

    root = logging.getLogger("libp2p")
    root.addHandler(logging.NullHandler())
    root.setLevel(logging.CRITICAL)
    root.propagate = False
