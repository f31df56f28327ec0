"""What a node knows about itself, gathered at the moment someone asks (no background loop).

:class:`Observer` holds references to a node's parts (the node, and when it has them the tensor
lane, the task service, the ledger and the collective) and reads their existing counters when
:meth:`Observer.figures` or :meth:`Observer.status` is called: a scrape or a page refresh costs a
few dictionary copies and an idle node stays asleep. :class:`ErrorLog` keeps the last warnings
and errors (log records and operator notices) for the status page.

Imports nothing of ours at module level; the parts are duck-typed (they come from the overlay,
tensors, tasks and collective layers).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from p2pcompute import __version__

#: How many warnings and errors the status page shows.
ERRORS_KEPT = 50
#: Lane throughput is measured between figures at least this many seconds apart.
RATE_WINDOW = 1.0


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 where it cannot be read).

    Example::

        print(rss_bytes() >> 20, "MiB")
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak: the best we have here
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return 0


class ErrorLog(logging.Handler):
    """A logging handler that keeps the last ``keep`` records at WARNING or above, as dicts.

    Example::

        errors = ErrorLog()
        logging.getLogger().addHandler(errors)
        errors.note("warning", "bootstrap node unreachable")
        errors.recent()[-1]["message"]     # 'bootstrap node unreachable'
    """

    def __init__(self, keep: int = ERRORS_KEPT, clock: Callable[[], float] = time.time) -> None:
        super().__init__(level=logging.WARNING)
        self._clock = clock
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break logging
            message = str(record.msg)
        self._add(record.created, record.levelname.lower(), record.name, message)

    def note(self, level: str, message: str, **_fields: Any) -> None:
        """Keep an operator notice (``warning`` or ``error``; ``info`` is not kept)."""
        if level in ("warning", "error"):
            self._add(self._clock(), level, "p2pcompute.cli", message)

    def _add(self, when: float, level: str, logger: str, message: str) -> None:
        self.counts[level] += 1
        self._recent.append({"time": when, "level": level, "logger": logger, "message": message[:1000]})

    def recent(self) -> list[dict[str, Any]]:
        """The kept records, oldest first."""
        return list(self._recent)


class Observer:
    """Reads a node's counters on demand; see :meth:`figures` (metrics) and :meth:`status` (page).

    ``node`` is a :class:`~p2pcompute.overlay.Node`; ``lane``, ``tasks`` (a
    :class:`~p2pcompute.tasks.TaskService`), ``ledger`` and ``collective`` may be ``None`` and may
    be set later (``observer.tasks = tasks``).

    Example::

        observer = Observer(node, role="peer", lane=lane, tasks=tasks)
        figures = observer.figures()
        print(figures["peers"]["connected"], figures["tasks"]["provider"]["done"])
    """

    def __init__(
        self,
        node: Any,
        *,
        role: str = "peer",
        lane: Any = None,
        tasks: Any = None,
        ledger: Any = None,
        collective: Any = None,
        errors: ErrorLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.role = role
        self.lane = lane
        self.tasks = tasks
        self.ledger = ledger
        self.collective = collective
        self.errors = errors if errors is not None else ErrorLog(clock=clock)
        self.clock = clock
        self.started = clock()
        self.loop_lag = 0.0  # seconds; measured by the HTTP server before it answers
        self.http_addrs: list[tuple[str, int]] = []  # where open_observer serves HTTP
        self._lane_sample: tuple[float, int, int] | None = None
        self._lane_rate = (0.0, 0.0)

    # -- figures (what /metrics shows)

    def figures(self) -> dict[str, Any]:
        """Every counter and gauge of the node as a JSON-ready dict (the source of /metrics).

        Keys: ``node``, ``peers``, ``adverts``, ``offences``, ``network``, ``bytes_by_protocol``,
        ``lane``, ``tasks``, ``rounds``, ``ledger``, ``process``, ``errors`` (see
        docs/operations.md for each figure).

        Example::

            observer.figures()["adverts"]["rejected"]
        """
        ns = self.node.statistics()
        now = self.clock()
        return {
            "node": {
                "peer_id": self.node.peer_id,
                "role": self.role,
                "swarm": self.node.swarm,
                "version": __version__,
                "addrs": list(self.node.addrs),
                "started": self.started,
                "uptime_seconds": max(0.0, now - self.started),
                # another process running with this node's key (docs/operations.md, "Key files")
                "identity_conflicts": ns.get("identity_conflicts", 0),
                "clone_addrs": self.node.identity_clones(),
            },
            "peers": {
                "known": ns.get("peers", 0),
                "verified": ns.get("verified", 0),
                "connected": ns.get("connections", 0),
            },
            "adverts": {
                "published": ns.get("adverts_published", 0),
                "accepted": ns.get("accepted", 0),
                "rejected": ns.get("rejected", 0),
                "rejected_by_kind": dict(ns.get("rejected_by_kind", {})),
                "expired": ns.get("expired", 0),
                "dropped": ns.get("dropped", 0),
            },
            "offences": {
                "by_kind": dict(ns.get("offences_by_kind", {})),
                "offending_peers": ns.get("offending_peers", 0),
                "blacklisted": ns.get("banned", 0),
            },
            "network": {
                key: ns.get(key, 0)
                for key in (
                    "dials",
                    "dial_failures",
                    "px_served",
                    "px_requested",
                    "handler_errors",
                    "dropped_messages",
                    "streams_refused",
                    "connections_refused",
                    "buffer_overflows",
                )
            },
            "bytes_by_protocol": dict(ns.get("bytes_by_protocol", {})),
            "lane": self._lane(now),
            "tasks": self._tasks(),
            "rounds": self._rounds(),
            "ledger": self._ledger(),
            "process": {"rss_bytes": rss_bytes(), "event_loop_lag_seconds": self.loop_lag},
            "errors": dict(self.errors.counts),
        }

    def _lane(self, now: float) -> dict[str, Any] | None:
        if self.lane is None:
            return None
        st = vars(self.lane.statistics())
        sample = (now, int(st.get("bytes_sent", 0)), int(st.get("bytes_received", 0)))
        prev = self._lane_sample
        if prev is None:
            self._lane_sample = sample
        elif now - prev[0] >= RATE_WINDOW:
            dt = now - prev[0]
            self._lane_rate = ((sample[1] - prev[1]) / dt, (sample[2] - prev[2]) / dt)
            self._lane_sample = sample
        out = dict(st)
        out["sent_bytes_per_second"], out["received_bytes_per_second"] = self._lane_rate
        return out

    def _tasks(self) -> dict[str, Any]:
        if self.tasks is None:
            return {"provider": None, "requester": None}
        st = dict(self.tasks.statistics())
        provider = st.pop("provider", None)
        return {"provider": provider, "requester": st}

    def _rounds(self) -> dict[str, Any] | None:
        log = getattr(self.collective, "round_log", None)
        if log is None:
            return None
        return {
            "by_outcome": dict(log.totals),
            "seconds_by_outcome": dict(log.seconds),
            "participants_by_outcome": dict(log.participants),
            "in_progress": len(log.in_progress),
        }

    def _ledger(self) -> dict[str, Any] | None:
        ledger = self.ledger
        if ledger is None and self.tasks is not None:
            ledger = getattr(self.tasks, "ledger", None)
        totals = getattr(ledger, "totals", None)
        if totals is None:
            return None
        return {"path": str(ledger.path), "entries": len(ledger), **vars(totals)}

    # -- status (what the page shows)

    def status(self) -> dict[str, Any]:
        """:meth:`figures` plus the tables of the status page: ``peer_table`` (capacity, age,
        connected), ``leases`` (provider leases in flight), ``rounds_in_progress``,
        ``rounds_recent`` and ``recent_errors``; ``now`` is this node's wall clock.

        Example::

            for peer in observer.status()["peer_table"]:
                print(peer["peer_id"], peer["age_seconds"])
        """
        out = self.figures()
        now = self.clock()
        connected = set(self.node.connected_peers())
        table = []
        for rec in sorted(self.node.peers.alive(), key=lambda r: (r.role != "bootstrap", r.peer_id)):
            cap = rec.capacity
            table.append(
                {
                    "peer_id": rec.peer_id,
                    "role": rec.role,
                    "addrs": list(rec.addrs),
                    "connected": rec.peer_id in connected,
                    "link": self.node.link(rec.peer_id) if hasattr(self.node, "link") else "",
                    "age_seconds": max(0.0, now - rec.last_seen),
                    "expires_in_seconds": rec.expires - now,
                    "cpu_cores": cap.cpu_cores,
                    "ram_total": cap.ram_total,
                    "gpus": [
                        {"name": g.name, "memory_total": g.memory_total, "memory_free": g.memory_free}
                        for g in cap.gpus
                    ],
                }
            )
        out["peer_table"] = table
        core = getattr(self.tasks, "provider", None) if self.tasks is not None else None
        out["leases"] = core.leases_in_flight() if core is not None else []
        log = getattr(self.collective, "round_log", None)
        out["rounds_in_progress"] = list(log.in_progress.values()) if log is not None else []
        out["rounds_recent"] = list(log.recent) if log is not None else []
        out["recent_errors"] = self.errors.recent()
        reach = getattr(self.node, "reach_status", None)
        if callable(reach):  # this node's reachability: public, private (behind NAT) or unknown
            out["reach"] = reach()
        out["now"] = now
        return out


__all__ = ["ERRORS_KEPT", "ErrorLog", "Observer", "rss_bytes"]
