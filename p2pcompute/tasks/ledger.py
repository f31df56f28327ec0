"""The local ledger: an append-only, hash-chained file of dual-signed receipts.

File format (``p2pcompute-ledger/1``): UTF-8 JSON lines, each the canonical JSON
(sorted keys, no spaces) of one entry. Line 1 is the header
``{"type": "header", "seq": 0, "owner": <peer id>, "created": t, "prev": 0*64, "hash": h}``;
every later line is ``{"type": "receipt", "seq": n, "role": "provider"|"requester",
"time": t, "receipt": <base64 of the receipt bytes>, "prev": <hash of line n-1>, "hash": h}``
where ``h = sha256("p2pcompute-ledger-v1\\0" || canonical JSON of the entry without "hash")``.

Guarantees:

* every :meth:`Ledger.append` is durable when it returns (one ``write`` of the whole
  line with ``O_APPEND``, then ``fsync``); the header is created with ``atomic_write``;
* :func:`verify_ledger` detects any edit (hash, canonical form, receipt signatures),
  deletion or reordering (``seq`` and ``prev`` chain) and truncation in the middle;
  a last line without its newline -- what a crash during an append leaves -- is
  reported distinctly as ``torn-tail``;
* dropping whole entries from the *end* cannot be seen from the file alone: compare
  the head hash (``ledger show`` prints it) with one anchored elsewhere
  (``ledger verify --head``), which is what an incentive layer would publish.

An exclusive ``flock`` stops two processes appending to one file.

Imports :mod:`p2pcompute.tasks.receipts`, :mod:`p2pcompute._fsutil`, :mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pcompute._fsutil import atomic_write, fsync_directory
from p2pcompute.errors import ConfigError, LocalProtocolError, P2PComputeError, ProtocolError
from p2pcompute.tasks.receipts import Receipt, open_receipt

FORMAT = "p2pcompute-ledger/1"
GENESIS = "0" * 64
_DOMAIN = b"p2pcompute-ledger-v1\x00"
MAX_LINE = 16 * 1024
ROLES = ("provider", "requester")


class LedgerCorrupt(P2PComputeError):
    """A ledger file failed verification; ``report`` says where and how."""

    def __init__(self, message: str, report: LedgerReport) -> None:
        super().__init__(message)
        self.report = report


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """The chain hash of an entry (its canonical JSON without the ``hash`` key)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_DOMAIN + _canonical(body)).hexdigest()


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    role: str
    time: float
    receipt: Receipt
    hash: str


@dataclass(frozen=True)
class Problem:
    """One break found by :func:`verify_ledger`: 1-based ``line``, a ``kind`` and a message."""

    line: int
    kind: str
    message: str


@dataclass
class LedgerReport:
    """The outcome of verifying a ledger file."""

    path: str
    owner: str | None = None
    entries: list[LedgerEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    head: str = GENESIS
    torn_tail: bool = False
    valid_bytes: int = 0  # length of the file up to its last newline

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def only_torn_tail(self) -> bool:
        return bool(self.problems) and all(p.kind == "torn-tail" for p in self.problems)


def verify_ledger(path: str | os.PathLike[str]) -> LedgerReport:
    """Check a ledger file end to end; never raises for bad content (see ``report.problems``).

    Example::

        report = verify_ledger("~/.p2pcompute/ledger.jsonl")
        if not report.ok:
            for p in report.problems:
                print(p.line, p.kind, p.message)
    """
    p = Path(path).expanduser()
    report = LedgerReport(str(p))
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read ledger {p}: {exc.strerror}") from None
    if not data:
        report.problems.append(Problem(1, "malformed", "empty file (no header)"))
        return report
    lines = data.split(b"\n")
    complete = lines[:-1]
    tail = lines[-1]  # b"" when the file ends with a newline
    prev = GENESIS
    seen_leases: set[tuple[bytes, str]] = set()
    for index, raw in enumerate(complete):
        line_hash = _check_line(raw, index + 1, index, prev, report, seen_leases)
        if line_hash is not None:
            prev = line_hash
    report.head = prev
    report.valid_bytes = len(data) - len(tail)
    if tail:
        report.torn_tail = True
        report.problems.append(
            Problem(
                len(complete) + 1,
                "torn-tail",
                f"last line has no newline ({len(tail)} bytes): an append was interrupted by a crash",
            )
        )
    return report


def _check_line(
    raw: bytes,
    line_no: int,
    index: int,
    prev: str,
    report: LedgerReport,
    seen_leases: set[tuple[bytes, str]],
) -> str | None:
    """Check one complete line; return its hash (to chain on) or None if unusable."""

    def problem(kind: str, message: str) -> None:
        report.problems.append(Problem(line_no, kind, message))

    if len(raw) > MAX_LINE:
        problem("malformed", f"line of {len(raw)} bytes over the cap of {MAX_LINE}")
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        problem("malformed", "not JSON")
        return None
    if not isinstance(entry, dict):
        problem("malformed", "not a JSON object")
        return None
    if _canonical(entry) != raw:
        problem("edited", "line is not in canonical form (edited by hand?)")
    recorded = entry.get("hash")
    if not isinstance(recorded, str) or entry_hash(entry) != recorded:
        problem("bad-hash", "entry hash does not match its content (edited)")
        if not isinstance(recorded, str):
            recorded = entry_hash(entry)
    if entry.get("prev") != prev:
        problem("bad-chain", "prev does not match the previous entry's hash (deleted, inserted or reordered)")
    if entry.get("seq") != index:
        problem("bad-seq", f"seq is {entry.get('seq')!r}, expected {index}")
    kind = entry.get("type")
    if index == 0:
        if kind != "header" or entry.get("format") != FORMAT or not isinstance(entry.get("owner"), str):
            problem("malformed", f"first line is not a {FORMAT} header")
        else:
            report.owner = entry["owner"]
        return recorded
    if kind != "receipt":
        problem("malformed", f"entry type {kind!r}, expected 'receipt'")
        return recorded
    role = entry.get("role")
    if role not in ROLES:
        problem("malformed", f"role {role!r}")
        return recorded
    try:
        blob = base64.b64decode(str(entry.get("receipt")), validate=True)
        receipt = open_receipt(blob)
    except (binascii.Error, ValueError):
        problem("malformed", "receipt is not base64")
        return recorded
    except ProtocolError as exc:
        problem("bad-receipt", f"receipt does not verify: {exc}")
        return recorded
    party = receipt.body.provider if role == "provider" else receipt.body.requester
    if report.owner is not None and party != report.owner:
        problem("not-owner", f"receipt as {role} does not name the ledger's owner")
    key = (receipt.lease_id, str(role))
    if key in seen_leases:
        problem("duplicate", f"lease {receipt.lease_id.hex()} recorded twice")
    seen_leases.add(key)
    t = entry.get("time")
    report.entries.append(
        LedgerEntry(index, str(role), float(t) if isinstance(t, int | float) else 0.0, receipt, recorded)
    )
    return recorded


class Ledger:
    """An open ledger file, appended to by one process at a time.

    Example::

        with Ledger.open("~/.p2pcompute/ledger.jsonl", owner=identity.peer_id) as ledger:
            ledger.append(receipt, role="provider")
            print(ledger.head, len(ledger))
    """

    def __init__(self, path: Path, owner: str, fd: int, head: str, count: int, leases: set[bytes]) -> None:
        self.path = path
        self.owner = owner
        self._fd = fd
        self.head = head
        self._count = count
        self._leases = leases
        self.totals = LedgerTotals()

    def _tally(self, role: str, receipt: Receipt) -> None:
        body = receipt.body
        seconds = max(0.0, body.end - body.start)
        if role == "provider":
            self.totals.sold += 1
            self.totals.earned += body.price
            self.totals.sold_seconds += seconds
        else:
            self.totals.bought += 1
            self.totals.spent += body.price
            self.totals.bought_seconds += seconds

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, owner: str, repair_torn_tail: bool = True) -> Ledger:
        """Open (creating if absent) the ledger of ``owner`` at ``path``.

        A torn last line (crash during an append; that append never returned) is
        cut off when ``repair_torn_tail``; any other break raises :class:`LedgerCorrupt`.
        """
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            header: dict[str, Any] = {
                "type": "header",
                "format": FORMAT,
                "seq": 0,
                "owner": owner,
                "created": time.time(),
                "prev": GENESIS,
            }
            header["hash"] = entry_hash(header)
            with contextlib.suppress(FileExistsError):
                _create_exclusive(p, _canonical(header) + b"\n")
        fd = os.open(p, os.O_RDWR | os.O_APPEND)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"ledger {p} is in use by another process") from None
            report = verify_ledger(p)
            if report.only_torn_tail and repair_torn_tail:
                os.ftruncate(fd, report.valid_bytes)
                os.fsync(fd)
                report = verify_ledger(p)
            if not report.ok:
                first = report.problems[0]
                raise LedgerCorrupt(f"ledger {p} line {first.line}: {first.kind}: {first.message}", report)
            if report.owner != owner:
                raise ConfigError(f"ledger {p} belongs to {report.owner}, not {owner}")
        except BaseException:
            os.close(fd)
            raise
        leases = {e.receipt.lease_id for e in report.entries}
        ledger = cls(p, owner, fd, report.head, len(report.entries), leases)
        for e in report.entries:
            ledger._tally(e.role, e.receipt)
        return ledger

    def append(self, receipt: Receipt, role: str) -> LedgerEntry:
        """Append ``receipt`` (ours as ``role``) durably; a lease already recorded is ignored.

        Blocking (write + fsync): call it from a thread in async code.
        """
        if self._fd < 0:
            raise LocalProtocolError("ledger is closed")
        if role not in ROLES:
            raise LocalProtocolError(f"role must be one of {ROLES}")
        party = receipt.body.provider if role == "provider" else receipt.body.requester
        if party != self.owner:
            raise LocalProtocolError(f"this receipt does not name the ledger owner as {role}")
        entry: dict[str, Any] = {
            "type": "receipt",
            "seq": self._count + 1,
            "role": role,
            "time": time.time(),
            "receipt": base64.b64encode(receipt.encode()).decode("ascii"),
            "prev": self.head,
        }
        entry["hash"] = entry_hash(entry)
        line = _canonical(entry) + b"\n"
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.head = entry["hash"]
        self._count += 1
        self._leases.add(receipt.lease_id)
        self._tally(role, receipt)
        return LedgerEntry(entry["seq"], role, entry["time"], receipt, entry["hash"])

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` atomically; FileExistsError if someone else did first."""
    tmp = path.with_name(f".{path.name}.new")
    atomic_write(tmp, data)
    try:
        os.link(tmp, path)  # fails if path exists: never clobbers a ledger
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_directory(path.parent)


@dataclass
class LedgerTotals:
    """Running totals of one ledger: leases sold (``earned`` in all) and bought (``spent``).

    Example::

        ledger.totals.earned      # sum of the prices of the leases we ran for others
    """

    sold: int = 0
    earned: float = 0.0
    sold_seconds: float = 0.0
    bought: int = 0
    spent: float = 0.0
    bought_seconds: float = 0.0


@dataclass
class PeerTotals:
    """Work done for and bought from one counterparty."""

    peer: str
    sold: int = 0
    sold_seconds: float = 0.0
    sold_price: float = 0.0
    bought: int = 0
    bought_seconds: float = 0.0
    bought_price: float = 0.0


def summarise(entries: list[LedgerEntry]) -> dict[str, PeerTotals]:
    """Totals per counterparty: leases we ran for them (sold) and ran on them (bought)."""
    out: dict[str, PeerTotals] = {}
    for e in entries:
        body = e.receipt.body
        seconds = max(0.0, body.end - body.start)
        if e.role == "provider":
            t = out.setdefault(body.requester, PeerTotals(body.requester))
            t.sold += 1
            t.sold_seconds += seconds
            t.sold_price += body.price
        else:
            t = out.setdefault(body.provider, PeerTotals(body.provider))
            t.bought += 1
            t.bought_seconds += seconds
            t.bought_price += body.price
    return out


def iter_entries(path: str | os.PathLike[str]) -> Iterator[LedgerEntry]:
    """The entries of a ledger that verifies; :class:`LedgerCorrupt` otherwise."""
    report = verify_ledger(path)
    if not report.ok:
        first = report.problems[0]
        raise LedgerCorrupt(f"line {first.line}: {first.kind}: {first.message}", report)
    return iter(report.entries)
