"""Observability: Prometheus metrics, a live status page and the figures behind them.

* :class:`Observer` (:mod:`~p2pcompute.observe.view`) reads a node's existing counters (node,
  lane, tasks, ledger, collective) when asked; nothing runs in the background.
* :mod:`~p2pcompute.observe.metrics` turns them into Prometheus text through a private
  :class:`prometheus_client.CollectorRegistry` per node.
* :mod:`~p2pcompute.observe.http` serves ``/metrics``, the status page ``/`` and
  ``/api/status`` with a small trio HTTP server.
* :func:`open_observer` puts them together for the ``bootstrap`` and ``peer`` commands
  (``--metrics HOST:PORT``, ``--http HOST:PORT``) and for :class:`p2pcompute.training.Swarm`.

May import the overlay, tensors, tasks, collective and training layers; only the command line
and the ``Swarm`` facade import it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

from p2pcompute.observe.http import parse_host_port as parse_host_port
from p2pcompute.observe.http import serve_http as serve_http
from p2pcompute.observe.metrics import metrics_text as metrics_text
from p2pcompute.observe.metrics import node_registry as node_registry
from p2pcompute.observe.view import ErrorLog as ErrorLog
from p2pcompute.observe.view import Observer as Observer
from p2pcompute.overlay.node import single_leaf


@contextlib.asynccontextmanager
async def open_observer(
    node: Any,
    *,
    role: str = "peer",
    serve: Sequence[tuple[str, int]] = (),
    **parts: Any,
) -> AsyncIterator[Observer]:
    """An :class:`Observer` of ``node`` for the ``async with`` block, serving HTTP on each
    ``(host, port)`` of ``serve``; the bound addresses are in ``observer.http_addrs``.

    ``parts``: ``lane``, ``tasks``, ``ledger``, ``collective`` (see :class:`Observer`). While
    the block runs, warnings and errors logged anywhere in the process are kept for the page.
    A port in use raises :class:`~p2pcompute.errors.ConfigError`.

    Example::

        async with open_observer(node, serve=[("127.0.0.1", 9100)], lane=lane) as observer:
            print(observer.http_addrs)        # [('127.0.0.1', 9100)]
            text = metrics_text(node_registry(observer))
    """
    observer = Observer(node, role=role, **parts)
    root = logging.getLogger()
    root.addHandler(observer.errors)
    try:
        async with trio.open_nursery() as nursery:
            for host, port in serve:
                observer.http_addrs.append(await nursery.start(serve_http, observer, host, port))
            try:
                yield observer
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = single_leaf(group)  # our nursery wraps what the servers or the body raised
        if leaf is None:
            raise
        raise leaf from None
    finally:
        root.removeHandler(observer.errors)


__all__ = [
    "ErrorLog",
    "Observer",
    "metrics_text",
    "node_registry",
    "open_observer",
    "parse_host_port",
    "serve_http",
]
