"""``p2pcompute ledger verify FILE`` and ``p2pcompute ledger show FILE``.

``verify`` checks the hash chain, the canonical form of every line and both
signatures of every receipt; it exits 0 when the ledger is intact and 1 on any
break, printing one line per problem (a torn last line left by a crash is named
as such). ``--head HASH`` also checks the head against a hash anchored elsewhere,
which catches entries dropped from the end. ``show`` summarises work sold to and
bought from each peer. Both take ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from p2pcompute.cli import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:  # the tasks package pulls in torch; the CLI imports it only when a ledger command runs
    from p2pcompute.tasks.ledger import LedgerReport


def add_parsers(subparsers: Any) -> None:
    """Register ``ledger verify`` and ``ledger show``."""
    ledger = subparsers.add_parser("ledger", help="check or summarise a receipts ledger")
    sub = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")

    verify = sub.add_parser("verify", help="check a ledger; exit 1 on any break")
    verify.add_argument("file")
    verify.add_argument("--head", help="expected head hash (anchored elsewhere)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.set_defaults(func=_verify)

    show = sub.add_parser("show", help="summarise work done and bought per peer")
    show.add_argument("file")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_show)


def _problems(report: LedgerReport, head: str | None) -> list[dict[str, Any]]:
    out = [{"line": p.line, "kind": p.kind, "message": p.message} for p in report.problems]
    if head is not None and report.head != head.lower():
        out.append({"line": None, "kind": "bad-head", "message": f"head is {report.head}, expected {head}"})
    return out


def _verify(args: argparse.Namespace) -> int:
    from p2pcompute.tasks.ledger import verify_ledger

    report = verify_ledger(args.file)
    problems = _problems(report, args.head)
    if args.json:
        doc = {
            "file": report.path,
            "ok": not problems,
            "owner": report.owner,
            "entries": len(report.entries),
            "head": report.head,
            "torn_tail": report.torn_tail,
            "problems": problems,
        }
        print(json.dumps(doc, indent=2))
    else:
        for p in problems:
            where = f"line {p['line']}: " if p["line"] is not None else ""
            print(f"{report.path}: {where}{p['kind']}: {p['message']}", file=sys.stderr)
        if not problems:
            print(
                f"{report.path}: ok, {len(report.entries)} receipts, owner {report.owner}, head {report.head}"
            )
        elif report.torn_tail and len(problems) == 1:
            print(
                f"{report.path}: torn tail only: the last append was interrupted by a crash; "
                f"{len(report.entries)} receipts before it are intact",
                file=sys.stderr,
            )
    return EXIT_OK if not problems else EXIT_FAILURE


def _show(args: argparse.Namespace) -> int:
    from p2pcompute.tasks.ledger import summarise, verify_ledger

    report = verify_ledger(args.file)
    totals = summarise(report.entries)
    rows = sorted(totals.values(), key=lambda t: (-(t.sold + t.bought), t.peer))
    if args.json:
        doc = {
            "file": report.path,
            "ok": report.ok,
            "owner": report.owner,
            "head": report.head,
            "entries": len(report.entries),
            "peers": [vars(t) for t in rows],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"ledger {report.path}  owner {report.owner}  receipts {len(report.entries)}  head {report.head}"
        )
        header = ("peer", "sold", "sold s", "sold price", "bought", "bought s", "bought price")
        lines = [header] + [
            (
                t.peer,
                str(t.sold),
                f"{t.sold_seconds:.3f}",
                f"{t.sold_price:g}",
                str(t.bought),
                f"{t.bought_seconds:.3f}",
                f"{t.bought_price:g}",
            )
            for t in rows
        ]
        widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
        for r in lines:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if not report.ok:
            print(f"WARNING: the ledger does not verify ({len(report.problems)} problems)", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILURE
