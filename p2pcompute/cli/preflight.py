"""Checks the command line makes before it starts anything: listen addresses, option values, task modules.

Each check raises :class:`p2pcompute.errors.ConfigError` (exit 3) with one line that says what is
wrong, or returns an ``argparse`` type error (exit 2) for an option value out of range.

* :func:`check_listen` -- a ``--listen`` address must be ``/ip4|ip6/<ip>/tcp/<port>`` on an address this
  machine has, and a fixed port must be free. py-libp2p binds with ``SO_REUSEPORT``, so a second
  node on a taken port would otherwise start and share it with the first; a plain probe socket
  (without ``SO_REUSEPORT``) cannot bind next to a listening one, which is how a taken port shows.
* :func:`load_task_registry` -- ``--tasks MODULE:ATTR`` with ``MODULE.py`` looked for in the
  current folder first (without touching ``sys.path``), and every failure of the operator's
  module (syntax error, exception at import, wrong attribute) turned into one line.

Imports nothing from the overlay: it runs before the node does.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import inspect
import ipaddress
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from p2pcompute.errors import ConfigError

if TYPE_CHECKING:
    from p2pcompute.tasks.registry import TaskRegistry


def _split(addr: str) -> tuple[str, str, str, str] | None:
    """``(family, ip, transport, port)`` of ``/ip4/IP/tcp/PORT[/p2p/ID]``, or ``None`` for other shapes."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] != "":
        return None
    family, ip, transport, port = parts[1:5]
    rest = parts[5:]
    if rest and not (len(rest) == 2 and rest[0] == "p2p"):
        return None
    return family, ip, transport, port


def check_listen(addr: str) -> None:
    """Refuse (ConfigError) a listen multiaddr this machine cannot serve, before the node starts.

    Addresses of another shape are left to the overlay, which names a malformed multiaddr itself.

    Example::

        check_listen("/ip4/127.0.0.1/tcp/0")        # fine
        check_listen("/ip4/127.0.0.1/udp/4001")     # ConfigError: only TCP is served
    """
    split = _split(addr)
    if split is None:
        return
    family, ip, transport, port_text = split
    if family not in ("ip4", "ip6"):
        return
    try:
        parsed = ipaddress.ip_address(ip)
        port = int(port_text)
    except ValueError:
        return  # malformed: the overlay's multiaddr parser says so
    if (family == "ip4") != (parsed.version == 4) or not 0 <= port <= 65535:
        return
    if transport != "tcp":
        raise ConfigError(f"cannot listen on {addr}: only TCP is served (use /{family}/{ip}/tcp/{port_text})")
    _probe_bind(addr, socket.AF_INET if family == "ip4" else socket.AF_INET6, ip, port)


def _probe_bind(addr: str, af: socket.AddressFamily, ip: str, port: int) -> None:
    sock = socket.socket(af, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR (not SO_REUSEPORT): a port left in TIME_WAIT by a node that just stopped is
        # free, one with a live listener (even an SO_REUSEPORT one) is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {addr}: port {port} is already in use (another node or program "
                f"listens there; pick another port or stop it)"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"cannot listen on {addr}: this machine has no address {ip}") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"cannot listen on {addr}: permission denied for port {port}") from None
        raise ConfigError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
    finally:
        sock.close()


# --- option values (argparse types: a bad value is a usage error, exit 2) -------------------------


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1.

    Example::

        p.add_argument("--task-slots", type=positive_int, default=1)
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    """An ``argparse`` type: a finite number of seconds, 0 or more.

    Example::

        p.add_argument("--wait", type=seconds, default=2.0)
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.0 <= value <= 86400.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, got {text}")
    return value


def positive_seconds(text: str) -> float:
    """An ``argparse`` type: a number of seconds above 0.

    Example::

        p.add_argument("--timeout", type=positive_seconds, default=5.0)
    """
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


# --- the operator's task module --------------------------------------------------------------------


def _import_operator_module(name: str, cwd: Path) -> ModuleType:
    """Import ``name``; a ``name.py`` (or package) in ``cwd`` wins, loaded without changing sys.path."""
    if name in sys.modules:
        return sys.modules[name]
    top = name.split(".")[0]
    local = cwd / f"{top}.py" if "." not in name else None
    if local is not None and local.is_file():
        spec = importlib.util.spec_from_file_location(name, local)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load task module {name!r} from {local}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    return importlib.import_module(name)


def load_task_registry(spec: str, *, cwd: Path | None = None) -> TaskRegistry:
    """The :class:`TaskRegistry` named by ``--tasks MODULE:ATTR``; ConfigError (one line) on any failure.

    ``MODULE.py`` in the current folder is found first, then the usual module search. ``ATTR`` is a
    registry or a function taking no arguments that returns one.

    Example::

        registry = load_task_registry("lab_tasks:registry")     # ./lab_tasks.py
    """
    from p2pcompute.tasks.registry import TaskRegistry

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--tasks wants MODULE:ATTRIBUTE (e.g. lab_tasks:registry), got {spec!r}")
    try:
        module = _import_operator_module(module_name, cwd or Path.cwd())
    except ConfigError:
        raise
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        raise ConfigError(f"task module {module_name!r} has a syntax error ({where}): {exc.msg}") from None
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import task module {module_name!r}: {exc} (looked in {cwd or Path.cwd()} "
            f"and on the module path)"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"task module {module_name!r} failed while importing: {type(exc).__name__}: {exc}"
        ) from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"task module {module_name!r} has no attribute {attr!r}") from None
    if callable(obj) and not isinstance(obj, TaskRegistry):
        if not _takes_no_arguments(obj):
            raise ConfigError(
                f"{spec} is a function that needs arguments; name a TaskRegistry or a function "
                f"without arguments that returns one"
            )
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, TaskRegistry):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a TaskRegistry")
    return obj


def _takes_no_arguments(fn: Any) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # cannot tell (a builtin): try the call
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in sig.parameters.values()
    )
