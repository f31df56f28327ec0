"""Metrics and the status page of real node processes: a bootstrap node and two peers started with
``--metrics``/``--http``, a task bought with ``p2pcompute task run``, and the page in a real browser.

The browser test drives Debian's ``chromium`` through Playwright (never a downloaded browser); it
skips, saying why, only where Playwright or a chromium binary is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli_surprises import LOCAL, ROOT, Running, cli, node

pytestmark = pytest.mark.slow

URL = re.compile(r"metrics at (http://[0-9.]+:\d+)/metrics")
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def scrape(base: str) -> dict[str, float]:
    """``/metrics`` of a node as ``{'name{label="v",...}': value}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, ctype, text = get(base + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain"), ctype
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Swarm:
    """A bootstrap node and two peers, each serving metrics and its page on 127.0.0.1 (port 0)."""

    def __init__(self, tmp: Path) -> None:
        self.procs: list[Running] = []
        boot = self._start("bootstrap", *LOCAL, "--metrics", "127.0.0.1:0", "--http", "127.0.0.1:0")
        self.addr = boot.wait_line(boot.out, lambda line: "/p2p/" in line)
        self.urls = [self._url(boot)]
        peers = [
            self._start(
                "peer", *LOCAL, "--bootstrap", self.addr, "--ledger", str(tmp / f"peer{i}.ledger"),
                *(("--metrics", "127.0.0.1:0") if i == 0 else ("--http", "127.0.0.1:0")),  # either serves all
            )
            for i in range(2)
        ]  # fmt: skip
        self.ids = [p.wait_line(p.out, lambda line: "/p2p/" in line).rsplit("/p2p/", 1)[1] for p in peers]
        for peer in peers:
            peer.wait_line(peer.err, lambda line: "selling task kinds" in line)
            self.urls.append(self._url(peer))

    def _start(self, *args: str) -> Running:
        proc = node(*args)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _url(proc: Running) -> str:
        m = URL.search(proc.wait_line(proc.err, lambda line: URL.search(line) is not None))
        assert m is not None
        return m.group(1)

    def stop(self) -> list[int]:
        return [p.stop() for p in reversed(self.procs)]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    s = Swarm(tmp_path_factory.mktemp("observe"))
    try:
        yield s
    finally:
        codes = s.stop()
    assert codes == [0, 0, 0]
    for p in s.procs:
        assert not any("Traceback" in line for line in p.err), p.err


def _wait_for(pred: object, timeout: float = 30.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


def test_metrics_move_as_a_task_runs(swarm: Swarm, tmp_path: Path) -> None:
    import numpy as np

    boot_url = swarm.urls[0]
    # the bootstrap node knows both peers (its table fills from their adverts)
    _wait_for(lambda: scrape(boot_url)["p2pcompute_peers_known"] >= 2)
    before = [scrape(u) for u in swarm.urls[1:]]
    for m in before:
        assert m["p2pcompute_tasks_completed_total"] == 0
        assert m["p2pcompute_ledger_entries"] == 0
        assert m["process_resident_memory_bytes"] > 0
        assert m["p2pcompute_resident_memory_bytes"] > 0
        assert 'p2pcompute_lane_bytes_total{direction="in"}' in m
        info = [k for k in m if k.startswith("p2pcompute_node_info{")]
        assert len(info) == 1
        assert 'role="peer"' in info[0]

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones((4, 2), dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    res = cli(
        "task", "run", "matmul", "--bootstrap", swarm.addr, *LOCAL,
        "--input", f"a={tmp_path / 'a.npy'}", "--input", f"b={tmp_path / 'b.npy'}",
        "--out", str(tmp_path / "c.npy"), "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    provider = json.loads(res.stdout)["provider"]
    i = swarm.ids.index(provider)
    url = swarm.urls[1 + i]

    # the provider appends its receipt once the requester's countersignature arrives
    _wait_for(lambda: scrape(url)["p2pcompute_ledger_entries"] >= 1)
    after = scrape(url)
    assert after["p2pcompute_tasks_offered_total"] >= 1
    assert after["p2pcompute_tasks_leased_total"] >= 1
    assert after["p2pcompute_tasks_completed_total"] == 1
    assert after['p2pcompute_ledger_leases_total{role="provider"}'] == 1
    assert after["p2pcompute_ledger_earned_total"] >= 0
    # the inputs came over the lane and the lease stream carried frames both ways
    assert after['p2pcompute_lane_bytes_total{direction="in"}'] >= a.nbytes + b.nbytes
    assert after['p2pcompute_lane_transfers_total{direction="out"}'] >= 1
    lease = [k for k in after if "/p2pcompute/tasks/lease/" in k and k.startswith("p2pcompute_stream_bytes")]
    assert lease
    assert all(after[k] > 0 for k in lease), lease

    # every figure a provider shows is listed in docs/operations.md
    from test_observe import undocumented

    assert undocumented(get(url + "/metrics")[2]) == []

    status, ctype, body = get(url + "/api/status")
    assert status == 200
    assert ctype == "application/json"
    doc = json.loads(body)
    assert doc["node"]["peer_id"] == provider
    assert doc["node"]["clone_addrs"] == []
    assert doc["tasks"]["provider"]["done"] == 1
    assert doc["ledger"]["sold"] == 1


def test_status_page_in_a_real_browser(swarm: Swarm, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = next((p for p in CHROMIUM if os.path.exists(p)), None) or shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium binary (apt-get install -y chromium; .ci/run does it as root)")
    boot_url = swarm.urls[0]
    _wait_for(lambda: scrape(boot_url)["p2pcompute_peers_known"] >= 2)
    shot = tmp_path / "status-page.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(boot_url + "/", timeout=30_000)
            # the page polls /api/status and draws the peer table from it
            for pid in swarm.ids:
                page.wait_for_function("id => document.body.innerText.includes(id)", arg=pid, timeout=30_000)
            text = page.inner_text("body")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    for pid in swarm.ids:
        assert pid in text
    assert "bootstrap" in text
    assert "cannot reach" not in text
    assert shot.stat().st_size > 10_000
    if os.environ.get("P2PCOMPUTE_SAVE_SCREENSHOT") == "1":  # refresh docs/status-page.png
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")


def test_status_watch_redraws_plain_blocks_and_reads_a_node_page(swarm: Swarm) -> None:
    watch = node("status", "--bootstrap", swarm.addr, *LOCAL, "--wait", "1", "--watch", "0.5")
    try:
        # not a terminal: plain blocks, each opening with a time-stamped header line
        headers = []
        for _ in range(2):
            headers.append(
                watch.wait_line(watch.out, lambda line: "swarm default" in line and line not in headers)
            )
        assert all(" UTC " in h for h in headers)
        for pid in swarm.ids:
            watch.wait_line(watch.out, lambda line, pid=pid: line.startswith(pid[:8]) and pid[-10:] in line)
        assert not any("\x1b[" in line for line in watch.out)
    finally:
        code = watch.stop()
    assert code == 0
    assert not any("Traceback" in line for line in watch.err)

    # --url reads one node's page: its peers, and the tasks and ledger lines of a provider
    res = cli("status", "--url", swarm.urls[1].removeprefix("http://"))
    assert res.returncode == 0, res.stderr
    assert "tasks sold: offered" in res.stdout
    assert "ledger: sold" in res.stdout
    res = cli("status", "--url", swarm.urls[0], "--json")
    assert res.returncode == 0, res.stderr
    assert {p["peer_id"] for p in json.loads(res.stdout)["peer_table"]} == set(swarm.ids)


def test_bad_inputs_are_one_line_with_their_exit_code(swarm: Swarm) -> None:
    port = swarm.urls[0].rsplit(":", 1)[1]
    res = cli("bootstrap", *LOCAL, "--metrics", f"127.0.0.1:{port}")
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    assert "cannot serve HTTP" in res.stderr
    res = cli("peer", "--bootstrap", swarm.addr, *LOCAL, "--http", "localhost")
    assert res.returncode == 2
    assert "HOST:PORT" in res.stderr
    res = cli("status", "--url", "127.0.0.1:1")
    assert res.returncode == 4
    assert "cannot read" in res.stderr
    # task commands take --log-format json too: their error line is a JSON object
    res = cli(
        "task", "run", "matmul", "--bootstrap", swarm.addr, "--log-format", "json", "--input", "a=/no.npy"
    )
    assert res.returncode == 3
    assert json.loads(res.stderr)["exit_code"] == 3
