"""The hash-chained receipts ledger and the ``p2pcompute ledger`` CLI (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pcompute.errors import BadSignature, ConfigError, LocalProtocolError
from p2pcompute.identity import Identity
from p2pcompute.tasks.ledger import Ledger, LedgerCorrupt, summarise, verify_ledger
from p2pcompute.tasks.messages import Resources
from p2pcompute.tasks.receipts import (
    Receipt,
    ReceiptBody,
    countersign,
    open_receipt,
    params_digest,
    sign_body,
    tensor_digest,
)

PROVIDER = Identity.from_seed(b"p" * 32)
REQUESTER = Identity.from_seed(b"r" * 32)
ROOT = Path(__file__).resolve().parents[1]


def make_receipt(i: int, price: float = 1.5) -> Receipt:
    body = ReceiptBody(
        lease_id=i.to_bytes(16, "big"),
        request_id=b"\x07" * 16,
        kind="matmul",
        provider_key=PROVIDER.public_key,
        requester_key=REQUESTER.public_key,
        start=1000.0 + i,
        end=1002.5 + i,
        resources=Resources(gpus=1, gpu_memory=1 << 30, cpus=2),
        price=price,
        params_digest=params_digest(b"\x80"),
        input_digest=tensor_digest({"x": torch.ones(2)}),
        output_digest=tensor_digest({"y": torch.zeros(2)}),
        input_bytes=8,
        output_bytes=8,
    )
    raw = body.encode()
    return countersign(
        raw,
        sign_body(raw, PROVIDER),
        REQUESTER,
        expect={"provider": PROVIDER.peer_id, "price": price},
        peer=None,
    )


def write_ledger(path: Path, n: int = 4) -> None:
    with Ledger.open(path, owner=PROVIDER.peer_id) as ledger:
        for i in range(n):
            ledger.append(make_receipt(i), "provider")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def kinds(path: Path) -> set[str]:
    return {p.kind for p in verify_ledger(path).problems}


def test_receipt_roundtrip_and_forgery() -> None:
    r = make_receipt(1)
    again = open_receipt(r.encode())
    assert again.body == r.body
    assert again.body.provider == PROVIDER.peer_id
    mallory = Identity.generate()
    forged = Receipt(r.body, r.body_bytes, r.provider_sig, sign_body(r.body_bytes, mallory))
    with pytest.raises(BadSignature):
        open_receipt(forged.encode())
    with pytest.raises(Exception, match="price"):
        countersign(r.body_bytes, r.provider_sig, REQUESTER, expect={"price": 0.5}, peer="p")


def test_append_verify_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write_ledger(path)
    report = verify_ledger(path)
    assert report.ok
    assert len(report.entries) == 4
    assert report.owner == PROVIDER.peer_id
    with Ledger.open(path, owner=PROVIDER.peer_id) as ledger:
        assert len(ledger) == 4
        assert ledger.head == report.head
        assert make_receipt(2).lease_id in ledger
        with pytest.raises(LocalProtocolError, match="owner"):
            ledger.append(make_receipt(9), "requester")  # this receipt names us as provider
    totals = summarise(report.entries)
    assert totals[REQUESTER.peer_id].sold == 4
    assert totals[REQUESTER.peer_id].sold_price == pytest.approx(6.0)
    assert totals[REQUESTER.peer_id].sold_seconds == pytest.approx(10.0)
    with pytest.raises(ConfigError, match="belongs"):
        Ledger.open(path, owner=REQUESTER.peer_id)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    with Ledger.open(path, owner=PROVIDER.peer_id), pytest.raises(ConfigError, match="in use"):
        Ledger.open(path, owner=PROVIDER.peer_id)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("edit_time", {"bad-hash"}),
        ("edit_price_rehashed", {"bad-receipt"}),
        ("delete_middle", {"bad-chain", "bad-seq"}),
        ("swap", {"bad-chain", "bad-seq"}),
        ("cut_middle_bytes", {"malformed"}),
        ("whitespace", {"edited"}),
        ("duplicate_line", {"bad-chain", "bad-seq", "duplicate"}),
    ],
)
def test_tampering_is_detected(tmp_path: Path, tamper: str, expected: set[str]) -> None:
    path = tmp_path / "l.jsonl"
    write_ledger(path)
    ls = lines(path)
    if tamper == "edit_time":
        entry = json.loads(ls[2])
        entry["time"] += 1
        ls[2] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    elif tamper == "edit_price_rehashed":
        # a careful forger re-hashes the whole chain after raising a price: the signatures still catch it
        from p2pcompute.tasks import ledger as ledger_mod

        inflated = make_receipt(1, price=99.0)
        prev = json.loads(ls[1])["prev"]
        for k in range(1, len(ls)):
            entry = json.loads(ls[k])
            if k == 2:
                tampered = bytearray(inflated.encode())
                entry["receipt"] = (
                    __import__("base64")
                    .b64encode(bytes(tampered).replace(inflated.requester_sig, make_receipt(1).requester_sig))
                    .decode()
                )
            entry["prev"] = prev
            entry["hash"] = ledger_mod.entry_hash(entry)
            prev = entry["hash"]
            ls[k] = ledger_mod._canonical(entry) + b"\n"
    elif tamper == "delete_middle":
        del ls[2]
    elif tamper == "swap":
        ls[2], ls[3] = ls[3], ls[2]
    elif tamper == "cut_middle_bytes":
        ls[2] = ls[2][:40] + ls[2][-30:]
    elif tamper == "whitespace":
        ls[1] = ls[1].replace(b",", b", ", 1)
    elif tamper == "duplicate_line":
        ls.insert(3, ls[2])
    path.write_bytes(b"".join(ls))
    got = kinds(path)
    assert expected <= got, got
    with pytest.raises(LedgerCorrupt):
        Ledger.open(path, owner=PROVIDER.peer_id)


def test_torn_tail_is_reported_distinctly_and_repaired_on_open(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write_ledger(path, 3)
    whole = path.read_bytes()
    # what a crash during an append leaves: part of a line, no newline
    extra = lines(path)[-1][:57]
    path.write_bytes(whole + extra)
    report = verify_ledger(path)
    assert report.torn_tail
    assert report.only_torn_tail
    assert len(report.entries) == 3
    with Ledger.open(path, owner=PROVIDER.peer_id) as ledger:
        assert len(ledger) == 3
        ledger.append(make_receipt(7), "provider")
    assert verify_ledger(path).ok
    assert len(verify_ledger(path).entries) == 4


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "p2pcompute.cli", "ledger", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from p2pcompute.cli import main

    code = main(["ledger", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_and_show_real_processes(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    write_ledger(path, 3)
    ok = run_cli("verify", str(path), "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"]
    assert doc["entries"] == 3
    show = run_cli("show", str(path), "--json")
    assert show.returncode == 0
    peers = json.loads(show.stdout)["peers"]
    assert peers[0]["peer"] == REQUESTER.peer_id
    assert peers[0]["sold"] == 3
    ls = lines(path)
    del ls[1]
    path.write_bytes(b"".join(ls))
    bad = run_cli("verify", str(path))
    assert bad.returncode == 1
    assert "bad-chain" in bad.stderr


def test_cli_head_anchor_torn_tail_and_text_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "l.jsonl"
    write_ledger(path, 2)
    head = verify_ledger(path).head
    assert in_process(capsys, "verify", str(path), "--head", head)[0] == 0
    assert in_process(capsys, "verify", str(path), "--head", "0" * 64)[0] == 1
    code, out, _ = in_process(capsys, "show", str(path))
    assert code == 0
    assert REQUESTER.peer_id in out
    path.write_bytes(path.read_bytes() + b'{"seq":3,"ty')
    code, _, err = in_process(capsys, "verify", str(path))
    assert code == 1
    assert "torn tail only" in err
