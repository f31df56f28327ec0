"""``p2pcompute bootstrap``, ``peer`` and ``status``: run a node from the command line.

* ``bootstrap --listen MULTIADDR --key FILE``: prints its full multiaddr (ending in
  ``/p2p/<peer id>``) as the first line of output, then serves until SIGINT/SIGTERM.
* ``peer --bootstrap ADDR [--key FILE] [--tasks module:registry]``: joins, advertises its
  capacity, and sells the built-in task kinds (timed matmul benchmark) plus the kinds of the
  registry the operator names, moving inputs and outputs over the encrypted tensor lane.
* ``status --bootstrap ADDR [--json] [--lane]``: joins briefly without advertising and prints
  the live peers and their GPUs (a table, or a JSON list); ``--lane`` adds this machine's
  measured lane cipher speeds (with ``--json`` the output is then ``{"peers": [...], "lane": {...}}``).

Before a node starts, ``--listen`` is checked (:func:`p2pcompute.cli.preflight.check_listen`:
TCP only, an address of this machine, a free port). A running ``peer`` watches its bootstrap
nodes (:mod:`p2pcompute.cli.watch`): it warns and redials with back-off when they are gone,
stops (exit 3) when another process runs with its key, and answers task-catalog requests
(:mod:`p2pcompute.cli.task`). ``--log-format json`` makes every stderr line a JSON object.

Errors are one line on stderr with the exit codes of :mod:`p2pcompute.cli`
(3: bad multiaddr / listen address / key file, 4: bootstrap unreachable). Imports the overlay,
capacity and identity layers; nothing imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from p2pcompute.capacity.model import Capacity
from p2pcompute.cli import EXIT_OK
from p2pcompute.cli.logs import FORMATS, add_notice_hook, notice, setup_logging
from p2pcompute.cli.preflight import check_listen, positive_int, positive_seconds, seconds
from p2pcompute.errors import ConfigError, PeerTimeout, PeerUnreachable
from p2pcompute.identity import Identity
from p2pcompute.overlay.node import Node, open_node, single_leaf
from p2pcompute.overlay.table import PeerRecord
from p2pcompute.wire.lanekeys import cipher_speeds


def identity_from(path: str | None) -> Identity:
    """The identity in key file ``path`` (created 0600 when missing), or a fresh one without a path.

    Example::

        ident = identity_from(args.key)
    """
    return Identity.load_or_create(path) if path else Identity.generate()


def _prepare(args: argparse.Namespace) -> Identity:
    """What every node command does before it starts: logging, the listen address, the key."""
    setup_logging(args.verbose, getattr(args, "log_format", "text"))
    check_listen(args.listen)
    addrs = _http_addrs(args)
    if addrs:
        from p2pcompute.observe.http import check_bindable

        for host, port in addrs:
            check_bindable(host, port)  # a taken --metrics port stops us before we join the swarm
    return identity_from(args.key)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f}"


def peer_json(rec: PeerRecord) -> dict[str, Any]:
    """The JSON form of a peer: id, role, addresses, how it is reached (``reach``: ``direct``, or
    ``relayed`` when it advertises only relay addresses: a peer behind NAT), last seen, expiry
    (wall clock), capacity."""
    relayed = bool(rec.addrs) and all("/p2p-circuit" in a for a in rec.addrs)
    return {
        "peer_id": rec.peer_id,
        "role": rec.role,
        "addrs": list(rec.addrs),
        "reach": "relayed" if relayed else "direct",
        "last_seen": rec.last_seen,
        "expires": rec.expires,
        "capacity": rec.capacity.to_wire(),
    }


def _gpu_summary(cap: Capacity) -> str:
    if not cap.gpus:
        return "cpu only"
    parts = [f"{g.name} {_gib(g.memory_free)}/{_gib(g.memory_total)} GiB free" for g in cap.gpus]
    return "; ".join(parts)


def format_table(records: list[PeerRecord]) -> str:
    """A fixed-width table of peers: id, role, CPU cores, RAM, GPUs."""
    header = f"{'PEER':<54} {'ROLE':<9} {'CPUS':>4} {'RAM GiB':>8}  GPUS"
    lines = [header]
    for r in sorted(records, key=lambda r: (r.role != "bootstrap", r.peer_id)):
        cap = r.capacity
        lines.append(
            f"{r.peer_id:<54} {r.role:<9} {cap.cpu_cores:>4} {_gib(cap.ram_total):>8}  {_gpu_summary(cap)}"
        )
    return "\n".join(lines)


def run_until_signal(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` under trio until it returns or SIGINT/SIGTERM arrives (a clean stop)."""

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                await body()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        leaf = single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


async def _show_view(node: Node, n: int, timeout: float) -> None:
    try:
        found = await node.wait_for_peers(n, timeout=timeout)
    except PeerTimeout as exc:
        notice("warning", str(exc))
        found = node.peers.alive()
    print(f"view of {node.peer_id}:", flush=True)
    print(format_table(found), flush=True)


def _node_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"swarm": args.swarm, "dial_timeout": args.timeout}
    if getattr(args, "announce", None):
        opts["announce"] = tuple(args.announce)
    if getattr(args, "relay", None) is not None:
        opts["relay"] = args.relay
    if getattr(args, "reachability", None) is not None:
        opts["reachability"] = args.reachability
    if getattr(args, "advert_interval", None) is not None:
        # a peer that misses two re-publishes in a row is still alive; a third expires it
        opts["advert_interval"] = args.advert_interval
        opts["advert_ttl"] = 3 * args.advert_interval
    return opts


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 1.0 <= value <= 1200.0:
        raise argparse.ArgumentTypeError("must be between 1 and 1200 seconds")
    return value


def _http_addrs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The distinct ``HOST:PORT`` of ``--metrics`` and ``--http`` (one server when they are equal)."""
    out: list[tuple[str, int]] = []
    for addr in (getattr(args, "metrics", None), getattr(args, "http", None)):
        if addr is not None and addr not in out:
            out.append(addr)
    return out


@contextlib.asynccontextmanager
async def _observed(node: Node, args: argparse.Namespace, role: str, **parts: Any) -> AsyncIterator[None]:
    """Serve /metrics, the status page and /api/status while the node runs (when asked to)."""
    addrs = _http_addrs(args)
    if not addrs:
        yield
        return
    from p2pcompute.observe import open_observer

    async with open_observer(node, role=role, serve=addrs, **parts) as observer:
        remove = add_notice_hook(observer.errors.note)
        try:
            for host, port in observer.http_addrs:
                shown = f"[{host}]" if ":" in host else host
                notice(
                    "info", f"metrics at http://{shown}:{port}/metrics, status page at http://{shown}:{port}/"
                )
            yield
        finally:
            remove()


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Run a bootstrap node until SIGINT/SIGTERM."""
    ident = _prepare(args)

    async def main() -> None:
        async with (
            open_node(ident, listen=[args.listen], role="bootstrap", **_node_options(args)) as node,
            _observed(node, args, "bootstrap"),
        ):
            for addr in node.addrs:
                print(addr, flush=True)
            await trio.sleep_forever()

    run_until_signal(main)
    return EXIT_OK


def lane_bind(listen: str) -> str:
    """The address the tensor lane listens on: the IP of ``--listen`` (0.0.0.0 stays 0.0.0.0).

    Example::

        lane_bind("/ip4/127.0.0.1/tcp/0")     # '127.0.0.1'
    """
    parts = listen.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return "0.0.0.0"


def cmd_peer(args: argparse.Namespace) -> int:
    """Join a swarm, advertise this machine's capacity, sell tasks and serve until SIGINT/SIGTERM."""
    # Imported here so that `bootstrap` and `status` do not pay for torch.
    from p2pcompute.cli.preflight import load_task_registry
    from p2pcompute.cli.task import CATALOG_PROTOCOL, serve_catalog
    from p2pcompute.cli.watch import watch_bootstrap
    from p2pcompute.overlay.streams import FramedStream
    from p2pcompute.tasks import builtin_registry, serve_tasks
    from p2pcompute.tensors import open_lane

    ident = _prepare(args)
    registry = load_task_registry(args.tasks) if args.tasks else None  # ConfigError -> exit 3 before joining
    if args.recipes:
        from p2pcompute.rent import TrainingWorker, builtin_book

        names = [n.strip() for n in args.recipes.split(",") if n.strip()]
        if not names:
            raise ConfigError("--recipes wants recipe names, e.g. lm,mlp")
        recipes = TrainingWorker(builtin_book(names, price=args.recipe_price)).registry()
        registry = recipes if registry is None else registry.merged(recipes)
    sold = builtin_registry() if registry is None else builtin_registry().merged(registry)

    async def catalog(stream: FramedStream) -> None:
        await serve_catalog(stream, sold)

    async def main() -> None:
        async with (
            open_node(ident, listen=[args.listen], bootstrap=args.bootstrap, **_node_options(args)) as node,
            open_lane(node, bind=lane_bind(args.listen)) as lane,
            serve_tasks(node, registry, capacity=args.task_slots, ledger=args.ledger, lane=lane) as tasks,
            _observed(node, args, "peer", lane=lane, tasks=tasks),
            trio.open_nursery() as nursery,
        ):
            node.set_stream_handler(CATALOG_PROTOCOL, catalog)
            print(node.addrs[0] if node.addrs else node.peer_id, flush=True)
            kinds = ", ".join(sold.names())
            notice(
                "info",
                f"joined swarm {args.swarm!r} as {node.peer_id}; selling task kinds: {kinds}",
                peer=node.peer_id,
            )
            # the identity check asks once per advert lifetime (3 intervals; 30 s by default)
            every = 3 * (args.advert_interval or 10.0)
            nursery.start_soon(functools.partial(watch_bootstrap, identity_every=every), node, args.bootstrap)
            if args.show_peers is not None:
                await _show_view(node, args.show_peers, args.wait)
            await trio.sleep_forever()

    run_until_signal(main)
    return EXIT_OK


def _status_from_url(args: argparse.Namespace) -> int:
    """``status --url``: read a node's /api/status once, or every ``--watch`` seconds."""
    from p2pcompute.cli.statusview import fetch_status, show

    setup_logging(args.verbose, getattr(args, "log_format", "text"))
    redraw = sys.stdout.isatty()
    if args.watch is None:
        show(fetch_status(args.url, timeout=args.timeout), source=args.url, as_json=args.json, redraw=False)
        return EXIT_OK

    async def main() -> None:
        while True:
            try:
                doc = await trio.to_thread.run_sync(
                    functools.partial(fetch_status, args.url, timeout=args.timeout), cancellable=True
                )
            except PeerUnreachable as exc:
                notice("warning", f"{exc}; trying again in {args.watch:g} s")
            else:
                show(doc, source=args.url, as_json=args.json, redraw=redraw)
            await trio.sleep(args.watch)

    run_until_signal(main)
    return EXIT_OK


def _watch_swarm(args: argparse.Namespace, ident: Identity) -> int:
    """``status --bootstrap ... --watch S``: stay joined and redraw the swarm's peers every S seconds."""
    from p2pcompute.cli.statusview import show
    from p2pcompute.observe import Observer

    redraw = sys.stdout.isatty()

    async def main() -> None:
        async with open_node(
            ident, listen=[args.listen], bootstrap=args.bootstrap, advertise=False, **_node_options(args)
        ) as node:
            observer = Observer(node, role="observer")
            await trio.sleep(args.wait)
            while True:
                show(observer.status(), source=f"via {node.peer_id[-10:]}", as_json=args.json, redraw=redraw)
                await trio.sleep(args.watch)

    run_until_signal(main)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Join briefly without advertising; print the live peers as a table or JSON.

    ``--watch S`` stays and redraws every S seconds; ``--url`` reads a node's status page instead.
    """
    if args.url is not None:
        return _status_from_url(args)
    ident = _prepare(args)
    if args.watch is not None:
        return _watch_swarm(args, ident)
    records: list[PeerRecord] = []

    async def main() -> None:
        async with open_node(
            ident, listen=[args.listen], bootstrap=args.bootstrap, advertise=False, **_node_options(args)
        ) as node:
            # Peer exchange has already pulled the bootstrap node's view; give gossip a moment more.
            await trio.sleep(args.wait)
            records.extend(node.peers.alive())

    run_until_signal(main)
    lane = lane_json() if args.lane else None
    if args.json:
        peers = [peer_json(r) for r in records]
        out: Any = peers if lane is None else {"peers": peers, "lane": lane}
        print(json.dumps(out, indent=2, sort_keys=True), flush=True)
    else:
        print(format_table(records), flush=True)
        if lane is not None:
            figures = ", ".join(f"{c['name']} {c['seal_mbps']}/{c['open_mbps']}" for c in lane["ciphers"])
            print(f"lane ciphers here, seal/open MB/s, fastest first: {figures}", flush=True)
    return EXIT_OK


def lane_json() -> dict[str, Any]:
    """This process's measured lane cipher figures (what its lane advertises), fastest first.

    A session uses the cipher whose slowest figure on either side is highest. Example::

        lane_json()["ciphers"][0]   # {"name": "aes-256-gcm", "seal_mbps": 9900, "open_mbps": 9800}
    """
    return {
        "ciphers": [{"name": s.name, "seal_mbps": s.seal, "open_mbps": s.open} for s in cipher_speeds()]
    }


def _common(p: argparse.ArgumentParser, *, listen: str) -> None:
    p.add_argument("--listen", default=listen, help=f"multiaddr to listen on (default {listen})")
    p.add_argument("--key", help="Ed25519 key file (created with mode 0600 if missing; default: a fresh key)")
    p.add_argument("--swarm", default="default", help="swarm name (default: default)")
    p.add_argument(
        "--timeout", type=positive_seconds, default=5.0, help="dial timeout in seconds (default 5)"
    )
    p.add_argument(
        "--announce",
        action="append",
        help="multiaddr to advertise instead of the listen address (repeatable)",
    )
    p.add_argument(
        "--advert-interval",
        type=_seconds,
        metavar="S",
        help="re-publish this node's advert every S seconds, valid for 3 S (default 10). Each node "
        "receives N/S adverts a second in a swarm of N; raise it for large swarms",
    )
    p.add_argument(
        "--reachability",
        choices=("auto", "public", "private"),
        help="auto (default): learn it from dial-backs by peers; public/private: say so (a private "
        "peer reserves a relay slot and advertises its relayed address; docs/operations.md)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text (default) or json: one JSON object per log line, for log collectors",
    )


def host_port(text: str) -> tuple[str, int]:
    """argparse type of ``--metrics``/``--http``: ``HOST:PORT`` (``[v6]:PORT``) as a pair."""
    from p2pcompute.observe import parse_host_port

    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _observe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        type=host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (also the status page)",
    )
    p.add_argument(
        "--http",
        type=host_port,
        metavar="HOST:PORT",
        help="serve a live status page at http://HOST:PORT/ (JSON at /api/status); may equal --metrics",
    )


def add_parsers(sub: Any) -> None:
    """Register ``bootstrap``, ``peer`` and ``status`` on the ``p2pcompute`` parser."""
    p = sub.add_parser("bootstrap", help="run a bootstrap node (introduces peers to each other)")
    _common(p, listen="/ip4/0.0.0.0/tcp/4001")
    p.add_argument(
        "--no-relay",
        dest="relay",
        action="store_false",
        help="do not act as a circuit relay for peers behind NAT (a bootstrap node relays by default)",
    )
    _observe_args(p)
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("peer", help="join a swarm, advertise this machine's capacity and serve")
    _common(p, listen="/ip4/0.0.0.0/tcp/0")
    p.add_argument("--bootstrap", action="append", required=True, help="bootstrap multiaddr (repeatable)")
    p.add_argument("--show-peers", type=int, metavar="N", help="print this peer's view once it knows N peers")
    p.add_argument("--wait", type=seconds, default=30.0, help="how long --show-peers waits (default 30 s)")
    p.add_argument("--tasks", metavar="MODULE:REGISTRY", help="also sell the task kinds of this registry")
    p.add_argument(
        "--task-slots", type=positive_int, default=1, metavar="N", help="task runs at once (default 1)"
    )
    p.add_argument(
        "--recipes",
        metavar="NAMES",
        help="also sell training segments of these built-in recipes (comma-separated: lm, mlp); "
        "see docs/rent.md",
    )
    p.add_argument(
        "--recipe-price",
        type=float,
        default=0.0,
        metavar="P",
        help="price of one training segment of --recipes (default 0)",
    )
    p.add_argument("--ledger", metavar="FILE", help="append signed receipts to this ledger file")
    p.add_argument(
        "--relay",
        action="store_true",
        default=None,
        help="also act as a circuit relay for peers behind NAT (for a publicly reachable peer; "
        "limits in docs/operations.md)",
    )
    _observe_args(p)
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("status", help="print the live peers of a swarm and their GPUs")
    _common(p, listen="/ip4/127.0.0.1/tcp/0")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bootstrap", action="append", help="bootstrap multiaddr (repeatable)")
    where.add_argument(
        "--url",
        metavar="HOST:PORT",
        help="read the status page of a node started with --http/--metrics (its rounds, tasks, ledger)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON (a list of peers; with --url or --watch one status document per line)",
    )
    p.add_argument("--wait", type=seconds, default=2.0, help="seconds to listen for adverts (default 2)")
    p.add_argument(
        "--lane",
        action="store_true",
        help='also show this machine\'s measured lane cipher speeds (JSON: {"peers": [...], "lane": {...}})',
    )
    p.add_argument(
        "--watch",
        type=positive_seconds,
        nargs="?",
        const=2.0,
        metavar="S",
        help="stay and redraw a compact table every S seconds (default 2) until Ctrl-C; "
        "plain lines when stdout is not a terminal",
    )
    p.set_defaults(func=cmd_status)
