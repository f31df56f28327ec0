"""The observe package in process: the request parser (hypothesis), the HTTP server against real
nodes on 127.0.0.1, the round log, and the figures a ``Swarm`` hands a training script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from conftest import open_swarm
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from p2pcompute.collective.roundcore import RoundOutcome, RoundStatus
from p2pcompute.collective.service import RoundLog
from p2pcompute.errors import ConfigError
from p2pcompute.observe import open_observer, parse_host_port
from p2pcompute.observe.http import MAX_REQUEST, HttpError, Request, parse_request


def test_parse_request_examples() -> None:
    assert parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == Request(
        "GET", "/metrics", "HTTP/1.1"
    )
    assert parse_request(b"HEAD /?a=b HTTP/1.0\r\n\r\n") == Request("HEAD", "/", "HTTP/1.0")
    assert parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n") is None  # head not finished
    for bad, status in [
        (b"POST / HTTP/1.1\r\n\r\n", 405),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET / SPDY/3\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST, 431),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST + b"\r\n\r\n", 431),
    ]:
        with pytest.raises(HttpError) as info:
            parse_request(bad)
        assert info.value.status == status


@given(st.binary(max_size=2 * MAX_REQUEST))
def test_parse_request_never_fails_untyped(data: bytes) -> None:
    try:
        got = parse_request(data)
    except HttpError as exc:
        status = exc.status
        assert status in (400, 405, 431)
        return
    if got is None:  # waiting for more: only while the head is unfinished and under the cap
        assert b"\r\n\r\n" not in data
        assert len(data) <= MAX_REQUEST
    else:
        assert got.method in ("GET", "HEAD")
        assert got.path.startswith("/")


_PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-.?=&", max_size=40).map(lambda t: "/" + t)
_HEADERS = st.lists(
    st.tuples(
        st.text(alphabet="abcdefgXYZ-", min_size=1, max_size=12), st.text(alphabet="abc 123;=", max_size=30)
    ),
    max_size=8,
)


@given(st.sampled_from(["GET", "HEAD"]), _PATH, _HEADERS, st.data())
def test_a_request_read_in_any_pieces_parses_once_complete(
    method: str, path: str, headers: list[tuple[str, str]], data: st.DataObject
) -> None:
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    raw = head.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw) - 1), max_size=6)))
    for cut in cuts:  # every proper prefix: wait for more
        assert parse_request(raw[:cut]) is None
    got = parse_request(raw)
    assert got == Request(method, path.split("?", 1)[0], "HTTP/1.1")


def test_parse_host_port() -> None:
    assert parse_host_port("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_host_port("[::1]:80") == ("::1", 80)
    for bad in ("9100", ":9100", "host:", "::1:80", "h:99999", "h:-1"):
        with pytest.raises(ValueError, match=r"HOST:PORT|brackets|65535"):
            parse_host_port(bad)


def test_round_log_keeps_totals_and_a_bounded_history() -> None:
    now = [100.0]
    log = RoundLog(keep=3, clock=lambda: now[0])
    tokens = [log.begin("run", f"step-{i}") for i in range(5)]
    assert len(log.in_progress) == 5
    now[0] = 102.0
    for t in tokens[:4]:
        log.end(t, RoundOutcome(RoundStatus.AVERAGED, participants=("a", "b")))
    log.end(tokens[4], None)  # raised or cancelled
    log.end(tokens[4], None)  # a second end is ignored
    assert log.totals == {"averaged": 4, "error": 1}
    assert log.seconds["averaged"] == pytest.approx(8.0)
    assert log.participants["averaged"] == 8
    assert [r["round"] for r in log.recent] == ["step-2", "step-3", "step-4"]
    assert not log.in_progress


async def _http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def undocumented(text: str) -> list[str]:
    """The p2pcompute_* sample names of a /metrics text that docs/operations.md does not name."""
    docs = DOCS.read_text()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return sorted(n for n in names if n.startswith("p2pcompute_") and f"`{n}`" not in docs)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_http_server_answers_metrics_status_page_and_refusals() -> None:
    with trio.fail_after(60):
        async with (
            open_swarm(1) as (boot, (peer,)),
            open_observer(boot, role="bootstrap", serve=[("127.0.0.1", 0)]) as observer,
        ):
            port = observer.http_addrs[0][1]
            status, headers, body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert undocumented(body.decode()) == []
            m = _samples(body.decode())
            assert m["p2pcompute_peers_known"] >= 1
            assert m["p2pcompute_peers_connected"] >= 1
            assert m["p2pcompute_peer_exchanges_served_total"] >= 1
            px = [k for k in m if k.startswith("p2pcompute_stream_bytes_total{") and "/peers/" in k]
            assert px, sorted(m)
            assert any(m[k] > 0 for k in px)

            status, headers, body = await _http(port, b"GET /api/status HTTP/1.1\r\n\r\n")
            assert status == 200
            doc = json.loads(body)
            assert [p["peer_id"] for p in doc["peer_table"]] == [peer.peer_id]
            assert doc["node"]["role"] == "bootstrap"
            assert doc["node"]["identity_conflicts"] == 0  # no other process runs with its key
            assert doc["node"]["clone_addrs"] == []

            status, headers, body = await _http(port, b"HEAD / HTTP/1.1\r\n\r\n")
            assert status == 200
            assert body == b""
            assert int(headers["Content-Length"]) > 1000
            status, _, body = await _http(port, b"GET / HTTP/1.1\r\n\r\n")
            assert b"/api/status" in body
            assert b"http://" not in body.replace(b"http://www.w3.org", b"")  # no CDN: works offline
            assert (await _http(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await _http(port, b"DELETE / HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await _http(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000))[0] == 431

            # a port in use is a configuration error, not a traceback
            with pytest.raises(ConfigError, match="cannot serve HTTP"):
                async with open_observer(peer, serve=[("127.0.0.1", port)]):
                    pass


def test_swarm_hands_a_training_script_the_same_figures() -> None:
    import torch

    from p2pcompute.training.swarm import Swarm

    with Swarm(start_timeout=60) as swarm:
        outcome = swarm.call(
            lambda: swarm.collective.average("run", "r1", [torch.zeros(3)], matchmaking_timeout=0.5)
        )
        assert outcome.status is RoundStatus.NO_GROUP
        figures = swarm.metrics()
        assert figures["node"]["peer_id"] == swarm.peer_id
        assert figures["rounds"]["by_outcome"] == {"no_group": 1}
        assert figures["lane"]["bytes_sent"] == 0
        text = swarm.metrics_text()
    assert undocumented(text) == []
    m = _samples(text)
    assert m["p2pcompute_rounds_total{outcome=no_group}"] == 1
    assert m["p2pcompute_rounds_total{outcome=averaged}"] == 0
    assert f"p2pcompute_node_info{{peer_id={swarm.peer_id},role=trainer,swarm=default,version=0.1.0}}" in m


def test_terminal_view_redraws_in_place_and_writes_plain_lines_otherwise() -> None:
    import io

    from p2pcompute.cli.statusview import CLEAR, render, show, status_url

    gpu = {"name": "H100", "memory_free": 70 << 30, "memory_total": 80 << 30}
    doc = {
        "node": {"swarm": "lab"},
        "peer_table": [
            {"peer_id": "12D3KooW" + "x" * 44, "role": "peer", "cpu_cores": 8, "ram_total": 64 << 30,
             "gpus": [gpu, gpu], "age_seconds": 4.0, "connected": True},
        ],
        "tasks": {"provider": {"offers": 3, "granted": 2, "done": 2, "failed": 0, "running": 0},
                  "requester": {"bought": 1, "buy_failed": 0, "items_in_flight": 0}},
        "rounds": {"by_outcome": {"averaged": 5}, "in_progress": 1},
    }  # fmt: skip
    lines = render(doc, source="test", now=0.0)
    assert lines[0].startswith(
        "1970-01-01 00:00:00 UTC  swarm lab  test  peers 1 (1 connected)  CPUs 8  GPUs 2"
    )
    assert "2x H100 140.0/160.0" in lines[2]
    assert "tasks sold: offered 3 leased 2 done 2 failed 0 running 0" in lines
    assert "rounds: averaged 5 failed 0 no group 0 in progress 1" in lines
    assert not any("another process" in line for line in lines)
    clone = {**doc, "node": {"swarm": "lab", "clone_addrs": ["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWx"]}}
    assert render(clone, source="test")[-1] == (
        "WARNING: another process uses this node's key, at /ip4/10.0.0.2/tcp/4001/p2p/12D3KooWx"
    )
    tty, pipe, js = io.StringIO(), io.StringIO(), io.StringIO()
    show(doc, source="t", as_json=False, redraw=True, out=tty)
    show(doc, source="t", as_json=False, redraw=False, out=pipe)
    show(doc, source="t", as_json=True, redraw=False, out=js)
    assert tty.getvalue().startswith(CLEAR)
    assert "\x1b" not in pipe.getvalue()
    assert json.loads(js.getvalue()) == doc
    assert status_url("http://h:1/") == "http://h:1/api/status"


def test_only_the_command_line_and_the_swarm_facade_import_observe() -> None:
    import ast

    import p2pcompute

    package = Path(p2pcompute.__file__).resolve().parent
    importers = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("observe/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "p2pcompute.observe" or n.startswith("p2pcompute.observe.") for n in names):
                importers.add(rel)
    assert importers <= {"cli/node.py", "training/swarm.py"}, importers
    assert "training/swarm.py" in importers
