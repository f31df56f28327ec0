"""``p2pcompute bench``: run the benchmark suites, or measure the link to a live peer.

* ``bench [stream|allreduce|overlay|tasks|training|wan|growth|all] [--quick] [--out DIR] [--wan SPEC]
  [--suite-args ARGS]`` runs ``python -m benchmarks`` from the source checkout (found from the
  current folder or beside the package) in a child process, with results in ``--out`` or
  ``./bench-results/<UTC time>`` of the folder it was started from (docs/benchmarks.md).
* ``bench link --serve``: run a node with a tensor lane that answers link measurements; prints
  its multiaddr first, serves until SIGINT/SIGTERM.
* ``bench link --peer MULTIADDR``: measure latency and throughput to that peer through the data
  plane: control-stream round trips, lane push (upload) and pull (download) at each size, and a
  plain py-libp2p stream as the same-run baseline. Prints a table; ``--json``/``--out`` give the
  ``p2pcompute-bench/1`` document.

The link protocol (``/p2pcompute/bench-link/1.0.0``, docs/protocol/bench-link.md) is a framed
stream of small msgpack messages; the payload moves through the tensor lane (or, for the
baseline, as 1 MiB frames on the stream). The server caps each transfer (``--max-mib``) and the
number of operations per stream, and sends zeros (never uninitialised memory).

Imports the overlay and tensors layers; nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.cli import EXIT_OK
from p2pcompute.cli.logs import FORMATS, setup_logging
from p2pcompute.cli.node import run_until_signal
from p2pcompute.deadlines import deadline
from p2pcompute.errors import ConfigError, MalformedMessage, RemoteProtocolError
from p2pcompute.progress import Progress, ProgressFn, log_progress
from p2pcompute.wire.codec import Field, Schema

if TYPE_CHECKING:  # the runtime imports are deferred: `p2pcompute --help` must stay fast
    from p2pcompute.overlay.node import Node
    from p2pcompute.overlay.streams import FramedStream
    from p2pcompute.tensors import TensorLane

PROTO_LINK = "/p2pcompute/bench-link/1.0.0"
MAX_OPS_PER_STREAM = 10_000
FRAME = 1 << 20
TAG_RE = re.compile(r"bench-link/[0-9a-f]{8,32}/\d{1,6}")
_MAX_BYTES_FIELD = 1 << 40

LINK_PING = Schema("link_ping", 1, max_size=64, fields=(Field("seq", int, min=0, max=2**32),))
LINK_PONG = Schema("link_pong", 1, max_size=64, fields=(Field("seq", int, min=0, max=2**32),))
LINK_XFER = Schema(
    "link_xfer",
    1,
    max_size=256,
    fields=(
        Field("kind", str, max_len=8),  # "push" (client -> lane -> server), "pull", "stream" (baseline)
        Field("tag", str, max_len=64),
        Field("bytes", int, min=1, max=_MAX_BYTES_FIELD),
    ),
)
LINK_DONE = Schema(
    "link_done",
    1,
    max_size=512,
    fields=(
        Field("tag", str, max_len=64),
        Field("ok", bool),
        Field("bytes", int, min=0, max=_MAX_BYTES_FIELD),
        Field("seconds", float, min=0),
        Field("path", str, max_len=16, optional=True),
        Field("error", str, max_len=300, optional=True),
    ),
)
LINK_BYE = Schema("link_bye", 1, max_size=32, fields=())
_REQUESTS = {s.type: s for s in (LINK_PING, LINK_XFER, LINK_BYE)}
_MAX_REQUEST = max(s.max_size for s in _REQUESTS.values())
_KINDS = ("push", "pull", "stream")


def parse_request(data: bytes, *, peer: str | None) -> dict[str, Any]:
    """Decode one client request (ping, xfer or bye) strictly; raise MalformedMessage naming ``peer``.

    Example::

        parse_request(LINK_PING.build(seq=1), peer="12D3...")["seq"]   # 1
    """
    from p2pcompute.wire.codec import decode

    obj = decode(data, max_size=_MAX_REQUEST, peer=peer)
    kind = obj.get("t") if isinstance(obj, dict) else None
    schema = _REQUESTS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise MalformedMessage("not a bench-link request", peer=peer)
    msg = schema.validate(obj, peer=peer)
    if schema is LINK_XFER:
        if msg["kind"] not in _KINDS:
            raise MalformedMessage(f"unknown transfer kind {msg['kind']!r}", peer=peer)
        if not TAG_RE.fullmatch(msg["tag"]):
            raise MalformedMessage(f"bad transfer tag {msg['tag']!r}", peer=peer)
    return msg


def parse_size(text: str) -> int:
    """``4KiB``, ``1MiB``, ``64MiB``, ``1GiB``, ``1000`` -> bytes; raises ConfigError.

    Example::

        >>> parse_size("64MiB")
        67108864
    """
    m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*", text)
    if not m:
        raise ConfigError(f"cannot read size {text!r} (use e.g. 4KiB, 1MiB, 64MiB)")
    n = int(m[1]) << {"B": 0, None: 0, "KiB": 10, "MiB": 20, "GiB": 30}[m[2]]
    if not 1 <= n <= 1 << 30:
        raise ConfigError(f"size {text!r} must be between 1 byte and 1 GiB")
    return n


def size_label(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


# --- server --------------------------------------------------------------------------------------


async def serve_link(
    stream: FramedStream, lane: TensorLane, *, max_bytes: int, op_timeout: float = 300.0
) -> None:
    """Answer one client's link measurements on ``stream`` until it says bye or goes away.

    Example::

        node.set_stream_handler(PROTO_LINK, lambda s: serve_link(s, lane, max_bytes=256 << 20))
    """
    import torch

    from p2pcompute.errors import PeerGone

    peer = stream.peer or "?"
    for _ in range(MAX_OPS_PER_STREAM):
        try:
            raw = await stream.recv_frame(_MAX_REQUEST)
        except PeerGone:
            return
        msg = parse_request(raw, peer=peer)
        if msg["t"] == "link_bye":
            return
        if msg["t"] == "link_ping":
            await stream.send_frame(LINK_PONG.build(seq=msg["seq"]))
            continue
        kind, tag, nbytes = msg["kind"], msg["tag"], msg["bytes"]
        if nbytes > max_bytes:
            await stream.send_frame(
                LINK_DONE.build(
                    tag=tag, ok=False, bytes=0, seconds=0.0, error=f"over the {max_bytes}-byte cap"
                )
            )
            if kind == "stream":
                # the client streams its payload before it reads our answer: read it past (frames of
                # at most FRAME bytes, nothing kept) so the stream stays in step and it sees the refusal
                with deadline(op_timeout, f"bench-link refused stream of {nbytes} bytes", peer=peer):
                    left = nbytes
                    while left > 0:
                        left -= len(await stream.recv_frame(min(FRAME, left)))
            continue
        start = time.perf_counter()
        path = None
        with deadline(op_timeout, f"bench-link {kind} of {nbytes} bytes from {peer}", peer=peer):
            if kind == "push":
                got = await lane.receive(peer, tag)
                moved = sum(t.numel() * t.element_size() for t in got.values())
                path = "lane"
            elif kind == "pull":
                report = await lane.send(peer, tag, {"x": torch.zeros(nbytes, dtype=torch.uint8)})
                moved, path = nbytes, report.path
            else:
                moved = 0
                while moved < nbytes:
                    moved += len(await stream.recv_frame(min(FRAME, nbytes - moved)))
        await stream.send_frame(
            LINK_DONE.build(tag=tag, ok=True, bytes=moved, seconds=time.perf_counter() - start, path=path)
        )
    raise MalformedMessage(f"over {MAX_OPS_PER_STREAM} operations on one stream", peer=peer)


# --- client --------------------------------------------------------------------------------------


async def _expect(stream: FramedStream, schema: Schema) -> dict[str, Any]:
    return await stream.recv_msg(schema)  # type: ignore[no-any-return]


async def measure_link(
    node: Node,
    lane: TensorLane,
    peer_id: str,
    *,
    sizes: Sequence[int] = (1 << 20, 64 << 20),
    reps: int = 3,
    pings: int = 20,
    timeout: float = 300.0,
    progress: ProgressFn | None = None,
) -> Any:
    """Measure the link to ``peer_id`` (which runs ``bench link --serve``); return a ``SuiteResult``.

    Rows: ``stream_rtt`` (control round trip, ms), ``lane_latency`` (a 1 KiB lane push, ms), and per
    size ``libp2p_stream_<size>`` (baseline), ``lane_push_<size>`` and ``lane_pull_<size>`` (MB/s).
    ``progress`` gets a :class:`~p2pcompute.progress.ProgressUpdate` after each ping and transfer
    (default: plain INFO lines on the ``p2pcompute.progress`` logger).

    Example::

        result = await measure_link(node, lane, peer, sizes=[1 << 20], reps=2)
    """
    import torch

    from p2pcompute import benchresults as harness

    result = harness.SuiteResult(
        "link",
        "mbytes_per_s",
        options={"peer": peer_id, "sizes": list(sizes), "reps": reps, "pings": pings},
    )
    nonce = secrets.token_hex(8)
    counter = iter(range(1_000_000))

    def tag() -> str:
        return f"bench-link/{nonce}/{next(counter)}"

    small_reps = max(3, reps)
    shown = Progress(
        f"bench link to {peer_id[-8:]}",
        total=pings + small_reps + 3 * reps * len(sizes),
        unit="steps",
        on_update=progress or log_progress(),
    )
    stream = await node.open_stream(peer_id, PROTO_LINK, timeout=min(timeout, 30.0))
    try:
        with deadline(timeout, f"bench link to {peer_id}", peer=peer_id):
            rtt = result.config("stream_rtt", size=0, what="control-stream round trip")
            for seq in range(pings):
                t0 = time.perf_counter()
                await stream.send_frame(LINK_PING.build(seq=seq))
                pong = await _expect(stream, LINK_PONG)
                if pong["seq"] != seq:
                    raise RemoteProtocolError(f"pong {pong['seq']} for ping {seq}", peer=peer_id)
                rtt.add("ms", (time.perf_counter() - t0) * 1e3)
                shown.advance()
            small = result.config("lane_latency", size=1024, what="1 KiB lane push, request to verified")
            tiny = torch.zeros(1024, dtype=torch.uint8)
            for _ in range(small_reps):
                t0 = time.perf_counter()
                done = await _push(stream, lane, peer_id, tag(), tiny)
                small.add("ms", (time.perf_counter() - t0) * 1e3)
                small.params["path"] = done.get("path")
                shown.advance()
            for size in sizes:
                label = size_label(size)
                payload = torch.zeros(size, dtype=torch.uint8)
                base = result.config(f"libp2p_stream_{label}", size=size, path="libp2p stream")
                base.baseline = "libp2p_stream"
                push = result.config(f"lane_push_{label}", size=size)
                pull = result.config(f"lane_pull_{label}", size=size)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    await _stream_send(stream, tag(), payload, peer_id)
                    base.add("mbytes_per_s", size / (time.perf_counter() - t0) / 1e6)
                    shown.advance()
                    t0 = time.perf_counter()
                    done = await _push(stream, lane, peer_id, tag(), payload)
                    push.add("mbytes_per_s", size / (time.perf_counter() - t0) / 1e6)
                    push.params["path"] = done.get("path")
                    shown.advance()
                    t0 = time.perf_counter()
                    done = await _pull(stream, lane, peer_id, tag(), size)
                    pull.add("mbytes_per_s", size / (time.perf_counter() - t0) / 1e6)
                    pull.params["path"] = done.get("path")
                    shown.advance()
            await stream.send_frame(LINK_BYE.build())
    finally:
        shown.finish(ok=shown.done == shown.total)
        await stream.close()
    result.add_ratios()
    return result


def _check_done(done: dict[str, Any], tag: str, nbytes: int, peer: str) -> dict[str, Any]:
    if done["tag"] != tag:
        raise RemoteProtocolError(f"answer for {done['tag']!r}, expected {tag!r}", peer=peer)
    if not done["ok"]:
        raise ConfigError(f"peer {peer} refused the transfer: {done.get('error')}")
    if done["bytes"] != nbytes:
        raise RemoteProtocolError(f"peer reports {done['bytes']} bytes, we sent {nbytes}", peer=peer)
    return done


async def _push(stream: FramedStream, lane: TensorLane, peer: str, tag: str, payload: Any) -> dict[str, Any]:
    nbytes = int(payload.numel())
    await stream.send_frame(LINK_XFER.build(kind="push", tag=tag, bytes=nbytes))
    await lane.send(peer, tag, {"x": payload})
    return _check_done(await _expect(stream, LINK_DONE), tag, nbytes, peer)


async def _pull(stream: FramedStream, lane: TensorLane, peer: str, tag: str, nbytes: int) -> dict[str, Any]:
    await stream.send_frame(LINK_XFER.build(kind="pull", tag=tag, bytes=nbytes))
    got = await lane.receive(peer, tag)
    if set(got) != {"x"} or got["x"].numel() != nbytes:
        raise RemoteProtocolError("pulled tensors do not match the request", peer=peer)
    return _check_done(await _expect(stream, LINK_DONE), tag, nbytes, peer)


async def _stream_send(stream: FramedStream, tag: str, payload: Any, peer: str) -> dict[str, Any]:
    nbytes = int(payload.numel())
    await stream.send_frame(LINK_XFER.build(kind="stream", tag=tag, bytes=nbytes))
    view = memoryview(bytes(nbytes))  # zeros like the tensor; no numpy needed on an operator's machine
    for off in range(0, nbytes, FRAME):
        await stream.send_frame(view[off : off + FRAME])
    return _check_done(await _expect(stream, LINK_DONE), tag, nbytes, peer)


def find_checkout(start: Path | None = None) -> Path | None:
    """The source checkout whose ``benchmarks/`` holds the suites, or ``None``.

    Looked for in the current folder and its parents, then beside the imported ``p2pcompute``
    package (an editable install of a checkout). Nothing is imported and ``sys.path`` is left alone:
    the suites run in a child process whose working folder is the checkout.

    Example::

        root = find_checkout()       # e.g. Path('/home/me/p2pcompute') or None for a pip install
    """
    here = (start or Path.cwd()).resolve()
    for root in (here, *here.parents, Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "__init__.py").is_file() and (root / "benchmarks" / "runner.py").is_file():
            return root
    return None


def runner_argv(args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The ``python -m benchmarks`` command line that runs what ``args`` ask for, results in ``out_dir``.

    Example::

        runner_argv(args, Path("/tmp/r"))   # [python, '-m', 'benchmarks', 'stream', '--out', '/tmp/r']
    """
    argv = [sys.executable, "-m", "benchmarks", args.suite, "--out", str(out_dir)]
    if args.quick:
        argv.append("--quick")
    if args.wan:
        argv += ["--wan", args.wan]
    if args.wan_peers != 4:
        argv += ["--wan-peers", str(args.wan_peers)]
    if args.timeout is not None:
        argv += ["--timeout", repr(float(args.timeout))]
    if args.no_plots:
        argv.append("--no-plots")
    if args.suite_args:
        argv.append(f"--suite-args={args.suite_args}")
    return argv


# --- commands ------------------------------------------------------------------------------------


def cmd_link(args: argparse.Namespace) -> int:
    """``bench link --serve`` or ``bench link --peer MULTIADDR``."""
    if bool(args.serve) == bool(args.peer):
        args.bench_parser.error("bench link needs exactly one of --peer MULTIADDR or --serve")
    for option, value in (("--wan", args.wan), ("--suite-args", args.suite_args), ("--quick", args.quick)):
        if value:
            args.bench_parser.error(f"{option} applies to the benchmark suites, not to 'bench link'")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise ConfigError("--sizes lists no size")

    from p2pcompute.identity import Identity
    from p2pcompute.overlay.node import open_node
    from p2pcompute.tensors import open_lane

    ident = Identity.load_or_create(args.key) if args.key else Identity.generate()
    max_bytes = args.max_mib << 20
    node_opts: dict[str, Any] = {"swarm": args.swarm, "advertise": False}
    if args.serve:

        async def serve() -> None:
            async with (
                open_node(ident, listen=[args.listen], **node_opts) as node,
                open_lane(node, bind=args.bind, max_transfer_bytes=max_bytes) as lane,
            ):

                async def handler(stream: FramedStream) -> None:
                    await serve_link(stream, lane, max_bytes=max_bytes, op_timeout=_link_timeout(args))

                node.set_stream_handler(PROTO_LINK, handler)
                for addr in node.addrs:
                    print(addr, flush=True)
                await trio.sleep_forever()

        run_until_signal(serve)
        return EXIT_OK

    from p2pcompute import benchresults
    from p2pcompute.progress import progress_renderer

    setup_logging(False, args.log_format)
    # a redrawn line on a terminal, plain log lines otherwise (stdout keeps only the results)
    shown = progress_renderer(json_logs=args.log_format == "json")
    holder: list[Any] = []

    async def client() -> None:
        async with (
            open_node(ident, listen=[args.listen], **node_opts) as node,
            open_lane(node, bind=args.bind, max_transfer_bytes=max(sizes)) as lane,
        ):
            peer_id = await node.connect(args.peer, timeout=args.connect_timeout)
            result = await measure_link(
                node,
                lane,
                peer_id,
                sizes=sizes,
                reps=args.reps,
                pings=args.pings,
                timeout=_link_timeout(args),
                progress=shown,
            )
            result.options["addr"] = args.peer
            holder.append(result)

    run_until_signal(client)
    if not holder:  # stopped by a signal before the end
        return EXIT_OK
    result = holder[0]
    if args.json:
        print(json.dumps(result.to_json(), indent=2), flush=True)
    else:
        benchresults.print_table(result)
    if args.out:
        path = benchresults.write_results(result, Path(args.out))
        print(f"wrote {path}", file=sys.stderr, flush=True)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmark suites through the runner (``benchmarks/runner.py``)."""
    if args.suite == "link":
        return cmd_link(args)
    for name in ("peer", "serve"):
        if getattr(args, name):
            args.bench_parser.error(f"--{name} only applies to 'bench link'")
    root = find_checkout()
    if root is None:
        raise ConfigError(
            "the benchmark suites live in a source checkout's benchmarks/ folder: run 'p2pcompute bench' "
            "inside a checkout of p2pcompute ('bench link' works anywhere)"
        )
    from p2pcompute.benchresults import default_out_dir

    # Results land where the user stands (or in --out, read relative to here), never in the checkout.
    out_dir = Path(args.out).resolve() if args.out else default_out_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(runner_argv(args, out_dir), cwd=root, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # the runner got the same SIGINT (one process group): let it stop its suites and summarise
        code = proc.wait()
    return EXIT_OK if code == 130 else code


def add_parsers(sub: Any) -> None:
    """Register ``bench`` on the ``p2pcompute`` parser."""
    suites = ("stream", "allreduce", "overlay", "tasks", "training", "wan", "growth", "attack")
    p = sub.add_parser(
        "bench",
        help="run benchmark suites, or measure the link to a live peer",
        description="Run benchmark suites (table, JSON and plots in a results folder), or with "
        "'link' measure latency and throughput to a live peer through the data plane.",
    )
    p.add_argument("suite", nargs="?", default="all", choices=[*suites, "all", "link"], help="default: all")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--out", metavar="DIR", help="results folder (default bench-results/<UTC time>)")
    p.add_argument("--wan", metavar="SPEC", help="emulate a WAN per peer, e.g. 50ms,200mbit,0.1%%loss")
    p.add_argument("--wan-peers", type=int, default=4, metavar="N", help="namespaces per suite (default 4)")
    p.add_argument("--timeout", type=float, metavar="S", help="per-suite (or per-link-measurement) limit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--suite-args",
        metavar="ARGS",
        help='options for the one suite named, as one string, e.g. --suite-args="--sizes 64M --peers 4"',
    )
    g = p.add_argument_group("bench link")
    g.add_argument("--peer", metavar="MULTIADDR", help="the peer to measure (it runs 'bench link --serve')")
    g.add_argument("--serve", action="store_true", help="answer link measurements until SIGINT")
    g.add_argument("--sizes", default="1MiB,64MiB", help="transfer sizes (default 1MiB,64MiB)")
    g.add_argument("--reps", type=int, default=3, help="transfers per size and direction (default 3)")
    g.add_argument("--pings", type=int, default=20, help="control-stream round trips (default 20)")
    g.add_argument("--json", action="store_true", help="print the p2pcompute-bench/1 JSON instead of a table")
    g.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0", help="multiaddr to listen on")
    g.add_argument("--bind", default="0.0.0.0", help="address of the lane's direct TCP listener")
    g.add_argument("--key", help="Ed25519 key file (default: a fresh key)")
    g.add_argument("--swarm", default="default", help="swarm name (default: default)")
    g.add_argument("--max-mib", type=int, default=256, help="--serve: largest transfer accepted (MiB)")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="dial timeout in seconds")
    g.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text (default) or json: progress and warnings on stderr as JSON lines",
    )
    p.set_defaults(func=cmd_bench, bench_parser=p)


def _link_timeout(args: argparse.Namespace) -> float:
    return float(args.timeout or 300.0)
