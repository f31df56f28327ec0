"""``p2pcompute status --lane``: the local lane cipher figures, beside the peer list (real processes)."""

from __future__ import annotations

import json

import pytest

from tests.test_cli_node import Proc, run_cli

pytestmark = pytest.mark.slow


def test_status_lane_shows_the_measured_cipher_figures() -> None:
    boot = Proc("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    try:
        addr = boot.line(0)
        out = run_cli("status", "--bootstrap", addr, "--json", "--lane", "--wait", "0.2")
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert isinstance(shown["peers"], list)
        ciphers = shown["lane"]["ciphers"]
        assert "aes-256-gcm" in {c["name"] for c in ciphers}
        assert all(c["seal_mbps"] >= 1 and c["open_mbps"] >= 1 for c in ciphers)
        slowest = [min(c["seal_mbps"], c["open_mbps"]) for c in ciphers]
        assert slowest == sorted(slowest, reverse=True)  # advertised fastest first
        plain = run_cli("status", "--bootstrap", addr, "--json", "--wait", "0.2")
        assert isinstance(json.loads(plain.stdout), list)  # without --lane: the list, as before
    finally:
        boot.stop()
