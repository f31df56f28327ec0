"""The terminal view of ``p2pcompute status``: a compact table of peers, capacity, rounds and tasks.

:func:`render` is pure: it takes a status document (the JSON of a node's ``/api/status``, or
the one :class:`~p2pcompute.observe.Observer` builds for the joining ``status`` command) and
gives the lines to print. :func:`show` prints them: on a terminal ``--watch`` redraws the screen
in place; into a pipe or a log it writes plain blocks, each starting with a time-stamped header
line, and ``--json`` writes one JSON document per line.

:func:`fetch_status` reads a node's ``/api/status`` (``status --url``), so an operator on SSH
sees a node's rounds, tasks and ledger without a browser.

Imports :mod:`p2pcompute.errors` only; nothing imports this module but :mod:`p2pcompute.cli.node`.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from p2pcompute.errors import PeerUnreachable

#: The screen is cleared and the cursor sent home before each redraw on a terminal.
CLEAR = "\x1b[H\x1b[2J"
MAX_STATUS_BYTES = 16 << 20


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f}"


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 20 else f"{peer_id[:8]}…{peer_id[-10:]}"


def _gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "-"
    free = sum(g["memory_free"] for g in gpus)
    total = sum(g["memory_total"] for g in gpus)
    return f"{len(gpus)}x {gpus[0]['name']} {_gib(free)}/{_gib(total)}"


def render(status: dict[str, Any], *, source: str, now: float | None = None) -> list[str]:
    """The lines of one view of ``status`` (an ``/api/status`` document) seen through ``source``.

    Example::

        for line in render(observer.status(), source="via 12D3KooW..."):
            print(line)
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if now is None else now))
    table = status.get("peer_table", [])
    node = status.get("node", {})
    cpus = sum(p["cpu_cores"] for p in table)
    gpus = sum(len(p["gpus"]) for p in table)
    connected = sum(1 for p in table if p.get("connected"))
    lines = [
        f"{stamp}  swarm {node.get('swarm', '?')}  {source}  "
        f"peers {len(table)} ({connected} connected)  CPUs {cpus}  GPUs {gpus}"
    ]
    lines.append(f"{'PEER':<20} {'ROLE':<9} {'CPUS':>4} {'RAM':>6}  {'GPUS (free/total GiB)':<28} {'AGE':>5}")
    for p in table:
        lines.append(
            f"{_short(p['peer_id']):<20} {p['role']:<9} {p['cpu_cores']:>4} {_gib(p['ram_total']):>6}  "
            f"{_gpus(p['gpus']):<28} {_age(p['age_seconds']):>5}"
        )
    if not table:
        lines.append("(no peers known yet)")
    tasks = status.get("tasks") or {}
    prov, req = tasks.get("provider"), tasks.get("requester")
    if prov:
        lines.append(
            f"tasks sold: offered {prov['offers']} leased {prov['granted']} done {prov['done']} "
            f"failed {prov['failed']} running {prov['running']}"
        )
    if req:
        bought, failed, buying = req["bought"], req["buy_failed"], req["items_in_flight"]
        lines.append(f"tasks bought: {bought} failed {failed} buying {buying}")
    rounds = status.get("rounds")
    if rounds:
        by = rounds.get("by_outcome", {})
        lines.append(
            f"rounds: averaged {by.get('averaged', 0)} failed {by.get('failed', 0)} "
            f"no group {by.get('no_group', 0)} in progress {rounds.get('in_progress', 0)}"
        )
    ledger = status.get("ledger")
    if ledger:
        lines.append(
            f"ledger: sold {ledger['sold']} (earned {ledger['earned']:g}) "
            f"bought {ledger['bought']} (spent {ledger['spent']:g})"
        )
    clones = node.get("clone_addrs") or []
    if clones:
        lines.append(f"WARNING: another process uses this node's key, at {', '.join(clones)}")
    errors = status.get("recent_errors") or []
    if errors:
        lines.append(f"last warning: {errors[-1]['message']}")
    return lines


def show(
    status: dict[str, Any], *, source: str, as_json: bool, redraw: bool, out: TextIO | None = None
) -> None:
    """Print one view: a redraw in place (``redraw`` on a terminal), plain lines, or one JSON line.

    Example::

        show(doc, source="http://127.0.0.1:9100", as_json=False, redraw=sys.stdout.isatty())
    """
    out = sys.stdout if out is None else out
    if as_json:
        out.write(json.dumps(status, sort_keys=True) + "\n")
    else:
        text = "\n".join(render(status, source=source)) + "\n"
        out.write((CLEAR + text) if redraw else (text + "\n"))
    out.flush()


def status_url(url: str) -> str:
    """The ``/api/status`` address of a node given as ``HOST:PORT`` or ``http://HOST:PORT[/]``.

    Example::

        >>> status_url("127.0.0.1:9100")
        'http://127.0.0.1:9100/api/status'
    """
    base = url if "://" in url else f"http://{url}"
    base = base.rstrip("/")
    return base if base.endswith("/api/status") else base + "/api/status"


def fetch_status(url: str, *, timeout: float) -> dict[str, Any]:
    """The JSON of a node's ``/api/status`` (blocking; run it in a thread from trio).

    Raises :class:`PeerUnreachable` when the node cannot be read or answers something else.

    Example::

        doc = fetch_status("127.0.0.1:9100", timeout=5)
    """
    target = status_url(url)
    if not target.startswith("http://"):
        raise PeerUnreachable(f"only http:// status pages can be read, not {url!r}")
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:  # noqa: S310 (http only, checked above)
            body = resp.read(MAX_STATUS_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PeerUnreachable(f"cannot read {target}: {reason}") from None
    if len(body) > MAX_STATUS_BYTES:
        raise PeerUnreachable(f"{target} answered more than {MAX_STATUS_BYTES} bytes")
    not_ours = f"{target} did not answer a status document (is it a p2pcompute node?)"
    try:
        doc = json.loads(body)
    except ValueError:
        raise PeerUnreachable(not_ours) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("peer_table"), list):
        raise PeerUnreachable(not_ours)
    return doc


__all__ = ["CLEAR", "fetch_status", "render", "show", "status_url"]
