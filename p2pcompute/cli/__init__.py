"""The ``p2pcompute`` command line.

Subcommands live in their own modules, each exposing ``add_parsers(subparsers)``
that registers its commands and sets ``func`` (``args -> int``) on each parser:

* :mod:`p2pcompute.cli.node`   -- ``bootstrap``, ``peer``, ``status``
* :mod:`p2pcompute.cli.ledger` -- ``ledger verify``, ``ledger show``
* :mod:`p2pcompute.cli.bench`  -- ``bench ...``

Exit codes (documented in docs/operations.md):

====  =====================================================================
0     success (including a clean stop on SIGINT/SIGTERM for long-running commands)
1     a runtime failure (for example ``ledger verify`` found a break)
2     usage error (argparse)
3     bad local configuration: malformed multiaddr, unreadable or unsafe key file
4     a peer or bootstrap node could not be reached
====  =====================================================================

Errors print one line to stderr (``p2pcompute: error: ...``), never a traceback.
Nothing in p2pcompute imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from p2pcompute.errors import ConfigError, P2PComputeError, PeerTimeout, PeerUnreachable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4

_MODULES = ("p2pcompute.cli.node", "p2pcompute.cli.ledger", "p2pcompute.cli.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pcompute", description="Peer-to-peer GPU compute for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parsers(sub)
    return parser


def fail(message: str, code: int) -> int:
    """Print one error line to stderr and return ``code``."""
    print(f"p2pcompute: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2pcompute`` console script.

    Example::

        $ p2pcompute status --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... --json
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except (PeerUnreachable, PeerTimeout) as exc:
        return fail(str(exc), EXIT_UNREACHABLE)
    except P2PComputeError as exc:
        return fail(str(exc), EXIT_FAILURE)


def run() -> None:
    sys.exit(main())
