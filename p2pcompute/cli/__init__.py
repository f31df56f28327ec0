"""The ``p2pcompute`` command line.

Subcommands live in their own modules, each exposing ``add_parsers(subparsers)``
that registers its commands and sets ``func`` (``args -> int``) on each parser:

* :mod:`p2pcompute.cli.node`   -- ``bootstrap``, ``peer``, ``status``
* :mod:`p2pcompute.cli.ledger` -- ``ledger verify``, ``ledger show``
* :mod:`p2pcompute.cli.bench`  -- ``bench ...``
* :mod:`p2pcompute.cli.task`   -- ``task run``, ``task list``

Every command and subcommand takes ``--version``.

Exit codes (documented in docs/operations.md):

====  =====================================================================
0     success (including a clean stop on SIGINT/SIGTERM for long-running commands)
1     a runtime failure (for example ``ledger verify`` found a break)
2     usage error (argparse)
3     bad local configuration: malformed multiaddr, a listen address this machine does not
      have or a port already in use, unreadable or unsafe key file, a broken ``--tasks`` module,
      a transfer refused by the peer's configured cap (``bench link``), our key already in use
4     a peer or bootstrap node could not be reached
====  =====================================================================

Errors print one line to stderr (``p2pcompute: error: ...``, or a JSON object with
``--log-format json``), never a traceback; an unexpected exception is reported the same way
(exit 1), with its traceback only when ``P2PCOMPUTE_DEBUG=1`` is set.
Nothing in p2pcompute imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from p2pcompute import __version__
from p2pcompute.errors import ConfigError, P2PComputeError, PeerTimeout, PeerUnreachable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNREACHABLE = 4

_MODULES = ("p2pcompute.cli.node", "p2pcompute.cli.task", "p2pcompute.cli.ledger", "p2pcompute.cli.bench")
VERSION = f"p2pcompute {__version__}"


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line: ``PROG: error: ... (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_version(parser: argparse.ArgumentParser) -> None:
    """``--version`` on ``parser`` and, recursively, on each of its subcommands."""
    parser.add_argument("--version", action="version", version=VERSION, help="print the version and exit")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_version(child)


def build_parser() -> argparse.ArgumentParser:
    """The ``p2pcompute`` parser with every command module's subcommands, each taking ``--version``.

    Example::

        args = build_parser().parse_args(["ledger", "verify", "ledger.jsonl"])
    """
    parser = _Parser(prog="p2pcompute", description="Peer-to-peer GPU compute for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parsers(sub)
    _add_version(parser)
    return parser


def fail(message: str, code: int) -> int:
    """Print one error line to stderr (text, or JSON under ``--log-format json``) and return ``code``.

    Example::

        return fail("no ledger at ledger.jsonl", EXIT_CONFIG)
    """
    from p2pcompute.cli.logs import notice

    notice("error", " ".join(message.split()), exit_code=code)
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
    except Exception as exc:
        if os.environ.get("P2PCOMPUTE_DEBUG") == "1":
            raise
        return fail(
            f"unexpected {type(exc).__name__}: {exc} (set P2PCOMPUTE_DEBUG=1 for the traceback)", EXIT_FAILURE
        )


def run() -> None:
    """The console script: ``sys.exit(main())``."""
    sys.exit(main())
