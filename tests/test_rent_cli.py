"""Renting from real provider processes (`p2pcompute peer --recipes lm`) with the synchronous Renter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli_node import Proc

from p2pcompute.errors import ConfigError
from p2pcompute.rent import RentOptions, builtin_recipes
from p2pcompute.rent.facade import Renter
from p2pcompute.tasks import verify_ledger

pytestmark = pytest.mark.slow
CFG = {"layers": 1, "width": 32, "heads": 2, "vocab": 16, "context": 8}


def test_a_script_rents_cli_providers_synchronously(tmp_path: Path) -> None:
    boot = Proc("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    procs = [boot]
    try:
        addr = boot.line(0)
        for i in range(2):
            procs.append(
                Proc(
                    "peer",
                    "--bootstrap",
                    addr,
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--recipes",
                    "lm",
                    "--recipe-price",
                    "0.01",
                    "--ledger",
                    str(tmp_path / f"p{i}.jsonl"),
                )
            )
        for p in procs[1:]:
            p.line(0)
        opts = RentOptions(workers=2, inner_steps=4, verify_fraction=0.0, max_price=0.05)
        with Renter(
            builtin_recipes()["lm"],
            CFG,
            opts,
            bootstrap=[addr],
            listen="/ip4/127.0.0.1/tcp/0",
            ledger=tmp_path / "r.jsonl",
        ) as renter:
            workers = renter.recruit(timeout=60)
            g = torch.Generator().manual_seed(0)
            reports = [
                renter.outer_step([{"tokens": torch.randint(0, 16, (16, 9), generator=g)} for _ in workers])
                for _ in range(2)
            ]
            model = renter.model()
    finally:
        codes = [p.stop()[0] for p in reversed(procs)]
    assert len(set(workers)) == 2
    assert all(sorted(r.workers) == sorted(workers) for r in reports)
    assert reports[0].price == pytest.approx(0.02)
    assert isinstance(model, torch.nn.Module)
    assert len(verify_ledger(tmp_path / "r.jsonl").entries) == 4 + 2  # 4 segments, 2 speed checks
    assert sum(len(verify_ledger(tmp_path / f"p{i}.jsonl").entries) for i in range(2)) == 6
    assert codes == [0, 0, 0]


def test_a_bad_config_fails_in_the_callers_thread() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        Renter(builtin_recipes()["lm"], {**CFG, "depth": 3}, bootstrap=["/ip4/127.0.0.1/tcp/1"])
    with pytest.raises(ConfigError, match="bootstrap"):
        Renter(builtin_recipes()["lm"], CFG, bootstrap=[])
