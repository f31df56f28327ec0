"""``p2pcompute task run`` and ``p2pcompute task list``: buy a task, or see what the swarm sells.

* ``task run KIND --bootstrap ADDR [--input [NAME=]FILE]... [--param KEY=VALUE]... [--out PATH]
  [--ledger FILE] [--max-price P]`` joins the swarm, buys one run of ``KIND`` from the cheapest
  provider through the public tasks API (:func:`p2pcompute.tasks.open_tasks`), and writes the
  outputs. Inputs: a ``.safetensors`` file (all its tensors) or ``NAME=FILE.npy``. Outputs: ``--out
  FILE.safetensors`` (all), ``--out FILE.npy`` (the one output), or ``--out DIR`` (``NAME.npy``
  each). With ``--ledger`` the dual-signed receipt is appended there (``ledger show`` lists it).
* ``task list --bootstrap ADDR [--json]`` asks every provider it finds for its kinds and prices.

The catalog a provider answers with travels on ``/p2pcompute/task-catalog/1.0.0``: the requester
sends :data:`CATALOG_REQUEST`, the provider answers :data:`CATALOG` (kinds, prices, descriptions:
three lists of one length). ``p2pcompute peer`` serves it (:func:`serve_catalog`); a provider
running the library without the command line does not, and is listed without kinds.

Imports the overlay, tensors and tasks layers when a command runs; nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pcompute.cli import EXIT_OK
from p2pcompute.cli.logs import FORMATS, setup_logging
from p2pcompute.cli.preflight import check_listen, positive_seconds, seconds
from p2pcompute.deadlines import deadline
from p2pcompute.errors import ConfigError, MalformedMessage, P2PComputeError
from p2pcompute.wire.codec import Field, Schema

if TYPE_CHECKING:
    import torch

    from p2pcompute.overlay.node import Node
    from p2pcompute.overlay.streams import FramedStream
    from p2pcompute.tasks.registry import TaskRegistry

CATALOG_PROTOCOL = "/p2pcompute/task-catalog/1.0.0"
MAX_KINDS = 256
CATALOG_REQUEST = Schema("task_catalog_req", 1, max_size=32, fields=())
CATALOG = Schema(
    "task_catalog",
    1,
    max_size=96 * 1024,
    fields=(
        Field("kinds", list, max_len=MAX_KINDS, item=str),
        Field("prices", list, max_len=MAX_KINDS, item=float),
        Field("descriptions", list, max_len=MAX_KINDS, item=str),
    ),
)


def catalog_message(registry: TaskRegistry) -> bytes:
    """The :data:`CATALOG` answer for ``registry`` (first :data:`MAX_KINDS` kinds, descriptions cut).

    Example::

        frame = catalog_message(builtin_registry())
    """
    kinds = list(registry)[:MAX_KINDS]
    return CATALOG.build(
        kinds=[k.name for k in kinds],
        prices=[float(k.price) for k in kinds],
        descriptions=[(k.description or "").splitlines()[0][:120] if k.description else "" for k in kinds],
    )


def parse_catalog(msg: dict[str, Any], *, peer: str) -> list[dict[str, Any]]:
    """The entries ``{"kind", "price", "description"}`` of a validated :data:`CATALOG` message.

    Example::

        parse_catalog(CATALOG.validate(decode(frame), peer=p), peer=p)[0]["kind"]   # 'matmul'
    """
    kinds, prices, descs = msg["kinds"], msg["prices"], msg["descriptions"]
    if not len(kinds) == len(prices) == len(descs):
        raise MalformedMessage("catalog lists of different lengths", peer=peer)
    return [{"kind": k, "price": p, "description": d} for k, p, d in zip(kinds, prices, descs, strict=True)]


async def serve_catalog(stream: FramedStream, registry: TaskRegistry) -> None:
    """Answer one catalog request on ``stream`` with the kinds and prices of ``registry``.

    Example::

        node.set_stream_handler(CATALOG_PROTOCOL, lambda s: serve_catalog(s, sold))
    """
    await stream.recv_msg(CATALOG_REQUEST)
    await stream.send_frame(catalog_message(registry))


async def fetch_catalog(node: Node, peer: str, *, timeout: float) -> list[dict[str, Any]]:
    """Ask ``peer`` for its catalog; raises a :class:`P2PComputeError` when it cannot or will not say.

    Example::

        entries = await fetch_catalog(node, provider, timeout=5)
    """
    stream = await node.open_stream(peer, CATALOG_PROTOCOL, timeout=timeout, max_frame=CATALOG.max_size)
    try:
        with deadline(timeout, "task catalog", peer=peer):
            await stream.send_frame(CATALOG_REQUEST.build())
            msg = await stream.recv_msg(CATALOG)
    finally:
        await stream.close()
    return parse_catalog(msg, peer=peer)


# --- files -----------------------------------------------------------------------------------------


def _safetensors() -> Any:
    import importlib

    try:
        return importlib.import_module("safetensors.torch")
    except ImportError:
        raise ConfigError("reading or writing .safetensors files needs the safetensors package") from None


def load_inputs(specs: list[str]) -> dict[str, torch.Tensor]:
    """Tensors from ``FILE.safetensors`` (every tensor in it) and ``NAME=FILE.npy`` arguments.

    Example::

        load_inputs(["a=a.npy", "b=b.npy"])          # {"a": tensor, "b": tensor}
    """
    import numpy as np
    import torch

    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = "", spec
        path = Path(file).expanduser()
        try:
            if path.suffix == ".safetensors":
                if name:
                    raise ConfigError(
                        f"--input {spec}: a .safetensors file brings its own names; drop {name}="
                    )
                found = _safetensors().load_file(str(path))
            elif path.suffix == ".npy":
                if not name:
                    name = path.stem
                found = {name: torch.from_numpy(np.load(path, allow_pickle=False))}
            else:
                raise ConfigError(f"--input {spec}: expected a .safetensors or .npy file")
        except ConfigError:
            raise
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read input {path}: {exc}") from None
        except Exception as exc:  # safetensors raises its own error type for a corrupt file
            raise ConfigError(f"cannot read input {path}: {type(exc).__name__}: {exc}") from None
        clash = set(found) & set(out)
        if clash:
            raise ConfigError(f"input tensor {sorted(clash)[0]!r} is given twice")
        out.update(found)
    return out


def parse_params(pairs: list[str], doc: str | None) -> dict[str, Any]:
    """Task params from ``--params JSON`` and ``--param KEY=VALUE`` (VALUE read as JSON, else a string).

    Example::

        parse_params(["n=64", "dtype=float32"], None)    # {"n": 64, "dtype": "float32"}
    """
    params: dict[str, Any] = {}
    if doc:
        try:
            loaded = json.loads(doc)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--params is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param wants KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def write_outputs(outputs: dict[str, torch.Tensor], out: str) -> list[str]:
    """Write ``outputs`` to ``out``: ``.safetensors`` (all), ``.npy`` (the only one), else NAME.npy files.

    Example::

        write_outputs({"c": c}, "c.npy")    # ['c.npy']
    """
    import numpy as np

    path = Path(out).expanduser()
    cpu = {k: v.detach().cpu().contiguous() for k, v in outputs.items()}
    try:
        if path.suffix == ".safetensors":
            _safetensors().save_file(cpu, str(path))
            return [str(path)]
        if path.suffix == ".npy":
            if len(cpu) != 1:
                raise ConfigError(
                    f"--out {out}: the task returned {len(cpu)} tensors ({', '.join(sorted(cpu))}); "
                    f"use a .safetensors file or a folder"
                )
            (tensor,) = cpu.values()
            np.save(path, _numpy(tensor), allow_pickle=False)
            return [str(path)]
        path.mkdir(parents=True, exist_ok=True)
        written = []
        for name, tensor in cpu.items():
            if "/" in name or name in ("", ".", ".."):
                raise ConfigError(f"output tensor name {name!r} cannot be a file name")
            target = path / f"{name}.npy"
            np.save(target, _numpy(tensor), allow_pickle=False)
            written.append(str(target))
        return written
    except OSError as exc:
        raise ConfigError(f"cannot write outputs to {path}: {exc.strerror or exc}") from None


def _numpy(tensor: torch.Tensor) -> Any:
    import torch

    if tensor.dtype == torch.bfloat16:
        raise ConfigError("a bfloat16 output cannot be saved as .npy; use --out FILE.safetensors")
    return tensor.numpy()


# --- commands --------------------------------------------------------------------------------------


def _join_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"swarm": args.swarm, "dial_timeout": args.timeout, "advertise": False}


async def _catalogs(node: Node, peers: list[str], *, timeout: float) -> dict[str, list[dict[str, Any]] | str]:
    """Each peer's catalog (:func:`fetch_catalog`, 16 at once), or why it gave none."""
    found: dict[str, list[dict[str, Any]] | str] = {}
    limit = trio.CapacityLimiter(16)

    async def ask(peer: str) -> None:
        async with limit:
            try:
                found[peer] = await fetch_catalog(node, peer, timeout=timeout)
            except P2PComputeError as exc:
                found[peer] = str(exc)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(ask, peer)
    return found


async def _check_sold(node: Node, providers: list[str], kind: str, *, timeout: float) -> None:
    """Refuse at once (:class:`ConfigError`) a kind that no provider we found sells.

    A request for a kind nobody sells would otherwise wait out the whole ``--deadline`` for an
    offer. Only a definite answer counts: when any provider does not publish its catalog (a
    provider run from Python without the command line), the run goes ahead and waits as before.
    """
    catalogs = list((await _catalogs(node, providers[:64], timeout=timeout)).values())
    if not catalogs or any(isinstance(c, str) for c in catalogs):
        return
    sold = sorted({entry["kind"] for c in catalogs if not isinstance(c, str) for entry in c})
    if kind not in sold:
        raise ConfigError(
            f"no provider of the {len(catalogs)} found sells task kind {kind!r} "
            f"(on offer: {', '.join(sold) or 'nothing'}; see 'p2pcompute task list')"
        )


def cmd_run(args: argparse.Namespace) -> int:
    """``task run KIND``: buy one run of KIND and write its outputs."""
    from p2pcompute.cli.node import identity_from, lane_bind, run_until_signal
    from p2pcompute.overlay.node import open_node
    from p2pcompute.tasks import open_tasks
    from p2pcompute.tensors import open_lane

    setup_logging(args.verbose, args.log_format)
    check_listen(args.listen)
    tensors = load_inputs(args.input or [])
    params = parse_params(args.param or [], args.params)
    if args.out and Path(args.out).suffix not in (".safetensors", ".npy") and Path(args.out).is_file():
        raise ConfigError(f"--out {args.out} is a file; name a .safetensors or .npy file, or a folder")
    ident = identity_from(args.key)
    holder: list[Any] = []

    async def main() -> None:
        async with (
            open_node(ident, listen=[args.listen], bootstrap=args.bootstrap, **_join_options(args)) as node,
            open_lane(node, bind=lane_bind(args.listen)) as lane,
            open_tasks(node, lane=lane, ledger=args.ledger) as tasks,
        ):
            await tasks.wait_for_providers(1, timeout=args.wait)
            await _check_sold(node, sorted(tasks.providers()), args.kind, timeout=args.timeout)
            options: dict[str, Any] = {"deadline": args.deadline}
            if args.max_price is not None:
                options["max_price"] = args.max_price
            holder.append(await tasks.run_task(args.kind, tensors, params, **options))

    run_until_signal(main)
    if not holder:
        return EXIT_OK  # stopped by a signal
    result = holder[0]
    written = write_outputs(dict(result.outputs), args.out) if args.out else []
    receipt = result.receipt
    doc = {
        "kind": args.kind,
        "provider": result.provider,
        "price": receipt.body.price if receipt is not None else None,
        "lease_seconds": result.lease_seconds,
        "outputs": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in result.outputs.items()
        },
        "info": result.info,
        "written": written,
        "ledger": args.ledger,
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str), flush=True)
    else:
        print(f"{args.kind} ran on {result.provider} in {result.seconds:.3f} s, price {doc['price']}")
        for name, meta in doc["outputs"].items():
            print(f"  {name}: {meta['dtype']} {tuple(meta['shape'])}")
        for path in written:
            print(f"wrote {path}")
        if args.ledger:
            print(f"receipt appended to {args.ledger}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """``task list``: the kinds and prices of the providers this node finds."""
    from p2pcompute.cli.node import identity_from, run_until_signal
    from p2pcompute.overlay.node import open_node
    from p2pcompute.tasks import open_tasks

    setup_logging(args.verbose, args.log_format)
    check_listen(args.listen)
    ident = identity_from(args.key)
    rows: dict[str, dict[str, Any]] = {}

    async def main() -> None:
        async with (
            open_node(ident, listen=[args.listen], bootstrap=args.bootstrap, **_join_options(args)) as node,
            open_tasks(node) as tasks,
        ):
            await trio.sleep(args.wait)  # adverts and topic subscriptions arrive by gossip
            found = set(tasks.providers()) | {r.peer_id for r in node.peers.alive() if r.role == "peer"}
            for peer, got in (await _catalogs(node, sorted(found), timeout=args.timeout)).items():
                if isinstance(got, str):
                    rows[peer] = {"peer": peer, "kinds": None, "error": got}
                else:
                    rows[peer] = {"peer": peer, "kinds": got}

    run_until_signal(main)
    listed = [rows[p] for p in sorted(rows)]
    if args.json:
        print(json.dumps(listed, indent=2), flush=True)
        return EXIT_OK
    table = [("PEER", "KIND", "PRICE", "DESCRIPTION")]
    for row in listed:
        if row["kinds"] is None:
            table.append((row["peer"], "-", "-", "(did not publish its kinds)"))
        for entry in row["kinds"] or ():
            table.append((row["peer"], entry["kind"], f"{entry['price']:g}", entry["description"]))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)), r[3]]).rstrip())
    if not listed:
        print(f"p2pcompute: warning: no provider found within {args.wait:g} s", file=sys.stderr, flush=True)
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``task run`` and ``task list`` on the ``p2pcompute`` parser."""
    task = sub.add_parser("task", help="buy a task run, or list the kinds the swarm sells")
    actions = task.add_subparsers(dest="task_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bootstrap", action="append", required=True, help="bootstrap multiaddr (repeatable)")
        p.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0", help="multiaddr to listen on")
        p.add_argument(
            "--key", help="Ed25519 key file (created with mode 0600 if missing; default: a fresh key)"
        )
        p.add_argument("--swarm", default="default", help="swarm name (default: default)")
        p.add_argument(
            "--timeout", type=positive_seconds, default=5.0, help="dial timeout in seconds (default 5)"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
        p.add_argument(
            "--log-format",
            choices=FORMATS,
            default="text",
            help="text (default) or json: one JSON object per stderr line, for log collectors",
        )

    run = actions.add_parser("run", help="buy one run of a task kind; write its outputs")
    run.add_argument("kind", help="the task kind, e.g. matmul (see 'task list')")
    common(run)
    run.add_argument(
        "--input",
        action="append",
        metavar="[NAME=]FILE",
        help="FILE.safetensors (all its tensors) or NAME=FILE.npy (repeatable)",
    )
    run.add_argument("--param", action="append", metavar="KEY=VALUE", help="a task param; VALUE as JSON")
    run.add_argument("--params", metavar="JSON", help="all task params as one JSON object")
    run.add_argument("--out", metavar="PATH", help="FILE.safetensors, FILE.npy (one output) or a folder")
    run.add_argument("--ledger", metavar="FILE", help="append the signed receipt to this ledger file")
    run.add_argument("--max-price", type=float, metavar="P", help="refuse offers above this price")
    run.add_argument(
        "--deadline", type=positive_seconds, default=300.0, help="seconds for the run (default 300)"
    )
    run.add_argument(
        "--wait",
        type=positive_seconds,
        default=30.0,
        help="seconds to wait for a provider to appear (default 30)",
    )
    run.set_defaults(func=cmd_run)

    lst = actions.add_parser("list", help="the task kinds the providers of a swarm sell, with prices")
    common(lst)
    lst.add_argument("--wait", type=seconds, default=2.0, help="seconds to listen for providers (default 2)")
    lst.set_defaults(func=cmd_list)
