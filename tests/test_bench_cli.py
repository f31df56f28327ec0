"""p2pcompute bench: the link protocol's strict parsing, a live link measurement on real nodes and
lanes, and the command line in real processes (exit codes, delegation to the runner)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pcompute.benchresults import load_results, validate_result
from p2pcompute.cli import bench
from p2pcompute.cli import main as cli_main
from p2pcompute.errors import ConfigError, MalformedMessage, MessageTooLarge, UnsupportedVersion
from p2pcompute.identity import Identity
from p2pcompute.overlay.node import Node, open_node
from p2pcompute.tensors import TensorLane, open_lane
from p2pcompute.wire.codec import encode

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
GUARD = 120  # against hangs on a loaded machine; measures nothing
CLI = [sys.executable, "-m", "p2pcompute.cli"]
LOCAL = ["--listen", "/ip4/127.0.0.1/tcp/0", "--bind", "127.0.0.1"]


# ------------------------------------------------------------------------------ sans-IO parsing


def test_requests_roundtrip() -> None:
    assert bench.parse_request(bench.LINK_PING.build(seq=7), peer="P")["seq"] == 7
    xfer = bench.parse_request(
        bench.LINK_XFER.build(kind="pull", tag="bench-link/0123abcd/5", bytes=10), peer="P"
    )
    assert (xfer["kind"], xfer["bytes"]) == ("pull", 10)
    assert bench.parse_request(bench.LINK_BYE.build(), peer="P")["t"] == "link_bye"


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        (
            {"t": "link_xfer", "v": 1, "kind": "drop", "tag": "bench-link/0123abcd/1", "bytes": 1},
            MalformedMessage,
        ),
        ({"t": "link_xfer", "v": 1, "kind": "push", "tag": "../etc/passwd", "bytes": 1}, MalformedMessage),
        (
            {"t": "link_xfer", "v": 1, "kind": "push", "tag": "bench-link/0123abcd/1", "bytes": 0},
            MalformedMessage,
        ),
        (
            {"t": "link_xfer", "v": 1, "kind": "push", "tag": "bench-link/0123abcd/1", "bytes": True},
            MalformedMessage,
        ),
        ({"t": "link_ping", "v": 2, "seq": 1}, UnsupportedVersion),
        ({"t": "link_ping", "v": 1, "seq": 1, "extra": 0}, MalformedMessage),
        ({"t": "link_pong", "v": 1, "seq": 1}, MalformedMessage),  # a reply is not a request
        ({"t": "link_ping", "v": 1, "seq": "x" * 300}, MessageTooLarge),
        ([1, 2, 3], MalformedMessage),
    ],
)
def test_bad_requests_are_typed_and_blame_the_peer(obj: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        bench.parse_request(encode(obj), peer="12D3KooWbad")
    assert info.value.peer == "12D3KooWbad"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "n"), [("1", 1), ("4KiB", 4096), ("64MiB", 64 << 20), ("1GiB", 1 << 30)])
def test_parse_size(text: str, n: int) -> None:
    assert bench.parse_size(text) == n
    assert bench.parse_size(bench.size_label(n)) == n


@pytest.mark.parametrize("text", ["0", "2GiB", "1.5MiB", "1MB", "", "-1"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        bench.parse_size(text)


# ------------------------------------------------------------------------------ real nodes, one process


@contextlib.asynccontextmanager
async def link_pair(max_bytes: int) -> AsyncIterator[tuple[Node, TensorLane, str]]:
    """A serving node+lane and a client node+lane on 127.0.0.1; yields the client side and server id."""
    a, b = Identity.generate(), Identity.generate()
    async with (
        open_node(a, advertise=False) as server,
        open_lane(server, bind="127.0.0.1", max_transfer_bytes=max_bytes) as server_lane,
        open_node(b, advertise=False) as client,
        open_lane(client, bind="127.0.0.1") as client_lane,
    ):

        async def handler(stream: Any) -> None:
            await bench.serve_link(stream, server_lane, max_bytes=max_bytes, op_timeout=60)

        server.set_stream_handler(bench.PROTO_LINK, handler)
        await client.connect(server.addrs[0], timeout=30)
        yield client, client_lane, server.peer_id


async def test_measure_link_on_real_nodes() -> None:
    with trio.fail_after(GUARD):
        async with link_pair(1 << 20) as (client, lane, peer):
            result = await bench.measure_link(
                client, lane, peer, sizes=[64 << 10], reps=2, pings=3, timeout=60
            )
    doc = result.to_json()
    validate_result(doc)
    rows = {c["name"]: c for c in doc["configs"]}
    assert set(rows) == {
        "stream_rtt",
        "lane_latency",
        "libp2p_stream_64KiB",
        "lane_push_64KiB",
        "lane_pull_64KiB",
    }
    assert len(rows["stream_rtt"]["samples"]["ms"]) == 3
    assert len(rows["lane_push_64KiB"]["samples"]["mbytes_per_s"]) == 2
    assert rows["libp2p_stream_64KiB"]["baseline"] == "libp2p_stream"
    assert rows["lane_pull_64KiB"]["ratio_vs_libp2p_stream"] > 0
    assert rows["lane_pull_64KiB"]["params"]["path"] in ("direct", "relay")


async def test_server_refuses_transfers_over_its_cap() -> None:
    with trio.fail_after(GUARD):
        async with link_pair(1024) as (client, lane, peer):
            with pytest.raises(ConfigError, match="refused"):
                await bench.measure_link(client, lane, peer, sizes=[4096], reps=1, pings=1, timeout=60)


# ------------------------------------------------------------------------------ real processes


def _cli(*args: str, timeout: float = GUARD) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV, check=False
    )


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench", "link"], ["bench", "wan", "--peer", "/ip4/127.0.0.1/tcp/1"], ["bench", "nope"]):
        with pytest.raises(SystemExit) as info:
            cli_main(argv)
        assert info.value.code == 2
    assert "exactly one of --peer" in capsys.readouterr().err


def test_cli_config_errors_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "link", "--peer", "/ip4/127.0.0.1/tcp/1", "--sizes", "1TiB", *LOCAL]) == 3
    assert cli_main(["bench", "link", "--peer", "/not/a/multiaddr", *LOCAL]) == 3
    err = capsys.readouterr().err
    assert err.startswith("p2pcompute: error:")
    assert "Traceback" not in err


def test_cli_unreachable_peer_exits_4_in_a_real_process() -> None:
    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"
    got = _cli("bench", "link", "--peer", dead, "--connect-timeout", "5", *LOCAL)
    assert got.returncode == 4, got.stderr
    assert got.stderr.startswith("p2pcompute: error:")
    assert "Traceback" not in got.stderr


def test_cli_link_against_a_serving_process(tmp_path: Path) -> None:
    # 'bench link' measures a live peer: it needs nothing of the checkout, so it runs from any folder
    server = subprocess.Popen(
        [*CLI, "bench", "link", "--serve", *LOCAL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=ENV,
    )
    try:
        assert server.stdout is not None
        addr = server.stdout.readline().strip()
        assert "/p2p/" in addr, server.stderr.read() if server.stderr else ""
        out = tmp_path / "link.json"
        got = _cli(
            "bench",
            "link",
            "--peer",
            addr,
            "--sizes",
            "256KiB",
            "--reps",
            "1",
            "--pings",
            "3",
            "--out",
            str(out),
            *LOCAL,
        )
        assert got.returncode == 0, got.stderr
        assert "lane_push_256KiB" in got.stdout
        # stderr is a pipe, not a terminal: progress comes as plain log lines, ending with the total
        progress = [line for line in got.stderr.splitlines() if "p2pcompute.progress: bench link to" in line]
        assert progress, got.stderr
        assert "\r" not in got.stderr
        assert "100% 9/9 steps" in progress[-1]  # 3 pings, 3 small pushes, 3 transfers of one size
        assert "done in" in progress[-1]
        doc = load_results(out)
        assert doc["options"]["addr"] == addr
    finally:
        server.terminate()
        try:
            assert server.wait(timeout=30) == 0  # SIGTERM is a clean stop
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            for f in (server.stdout, server.stderr):
                if f is not None:
                    f.close()


def test_cli_delegates_to_the_runner(tmp_path: Path) -> None:
    # The installed console script, as a user runs it: no PYTHONPATH, from a folder inside the
    # checkout. Its sys.path holds its own folder, not the working directory, so this fails
    # unless the CLI finds the checkout's benchmarks/ itself.
    script = Path(sys.executable).parent / "p2pcompute"
    assert script.is_file(), "make installs the package, and with it the console script"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = subprocess.run(
        [str(script), "bench", "wan", "--quick", "--no-plots", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT / "docs",
        env=env,
        check=False,
    )
    assert got.returncode == 0, got.stdout + got.stderr
    assert "wan: ok" in got.stdout
    load_results(tmp_path / "wan.json")
    assert (tmp_path / "summary.json").exists()


def test_cli_run_from_outside_the_checkout_writes_results_where_the_user_stands(tmp_path: Path) -> None:
    """`p2pcompute bench SUITE` from any folder: the suites run in the checkout, the results land in
    ./bench-results/<UTC time> of the folder it was started from, and validate (once: 'invalid')."""
    script = Path(sys.executable).parent / "p2pcompute"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    before = set(map(str, sys.path))
    got = subprocess.run(
        [str(script), "bench", "wan", "--quick", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert got.returncode == 0, got.stdout + got.stderr
    assert "wan: ok" in got.stdout
    (run,) = (tmp_path / "bench-results").iterdir()
    load_results(run / "wan.json")
    assert (run / "summary.json").exists()
    assert set(map(str, sys.path)) == before


def test_runner_argv_forwards_every_option(tmp_path: Path) -> None:
    parser = bench_parser()
    args = parser.parse_args(
        ["bench", "stream", "--quick", "--wan", "20ms", "--wan-peers", "3", "--timeout", "9",
         "--no-plots", "--suite-args=--sizes 1M"]
    )
    argv = bench.runner_argv(args, tmp_path)
    assert argv[1:] == [
        "-m", "benchmarks", "stream", "--out", str(tmp_path), "--quick", "--wan", "20ms",
        "--wan-peers", "3", "--timeout", "9.0", "--no-plots", "--suite-args=--sizes 1M",
    ]


def bench_parser() -> Any:
    from p2pcompute.cli import build_parser

    return build_parser()
