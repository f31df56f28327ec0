"""Logging and notices of the long-running commands (``bootstrap``, ``peer``): text or JSON lines.

``--log-format text`` (default) writes ``TIME LEVEL LOGGER: MESSAGE`` lines and plain notices
(``p2pcompute: warning: ...``); ``--log-format json`` writes one JSON object per line, for log
collectors: ``{"time": "2026-01-02T03:04:05.678Z", "level": "warning", "logger": "...",
"message": "..."}`` (plus ``"exception"`` when a log record carries one).

Example::

    setup_logging(verbose=False, fmt="json")
    notice("warning", "bootstrap node unreachable; retrying in 10 s")
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

FORMATS = ("text", "json")
_state = {"format": "text"}
_hooks: list[Callable[..., None]] = []  # also told of every notice (the status page keeps them)


def add_notice_hook(hook: Callable[..., None]) -> Callable[[], None]:
    """Call ``hook(level, message, **fields)`` for every :func:`notice`; returns its remover.

    Example::

        remove = add_notice_hook(observer.errors.note)
        ...
        remove()
    """
    _hooks.append(hook)
    return lambda: _hooks.remove(hook)


class JsonFormatter(logging.Formatter):
    """One JSON object per log record (UTC time, lower-case level, logger, message).

    Example::

        handler.setFormatter(JsonFormatter())
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=False)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def setup_logging(verbose: bool, fmt: str = "text") -> None:
    """Send log records to stderr at INFO (``verbose``) or WARNING, as text or JSON lines;
    progress lines (the ``p2pcompute.progress`` logger) at INFO either way.

    Example::

        setup_logging(args.verbose, args.log_format)
    """
    _state["format"] = fmt
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    # progress of long work (p2pcompute.progress) is shown without -v; it is throttled
    logging.getLogger("p2pcompute.progress").setLevel(logging.INFO)


def json_logs() -> bool:
    """Whether ``--log-format json`` is in effect."""
    return _state["format"] == "json"


def notice(level: str, message: str, **fields: Any) -> None:
    """One line on stderr for the operator: ``p2pcompute: LEVEL: MESSAGE``, or a JSON object.

    ``level`` is ``info`` (printed without a prefix in text form), ``warning`` or ``error``.

    Example::

        notice("info", "joined swarm 'default'", peer=node.peer_id)
    """
    if json_logs():
        doc = {"time": _utc(time.time()), "level": level, "logger": "p2pcompute.cli", "message": message}
        doc.update(fields)
        line = json.dumps(doc)
    elif level == "info":
        line = message
    else:
        line = f"p2pcompute: {level}: {message}"
    print(line, file=sys.stderr, flush=True)
    for hook in list(_hooks):
        hook(level, message, **fields)
