"""Worker processes for suites that place their nodes under ``--wan``: spawn, talk JSON lines, stop.

A suite process in the host's namespace cannot reach the emulated network's addresses, so it
only orchestrates: it starts each worker as ``layout["peers"][i]["exec"] + argv`` (inside peer
*i*'s namespace) with ``P2PC_BENCH_IP`` set to that peer's address, writes commands to the
worker's stdin, and reads one JSON object per line from its stdout. Workers log to a file each,
whose tail is quoted when a worker does not answer. Used by the ``tasks`` and ``overlay`` suites.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

IP_ENV = "P2PC_BENCH_IP"
ROOT = Path(__file__).resolve().parent.parent


def worker_env(addr: str | None) -> dict[str, str]:
    """The environment of a worker: this checkout importable, and its own address (``None``:
    loopback) in ``P2PC_BENCH_IP``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if addr is not None:
        env[IP_ENV] = addr
    return env


def listen_addrs() -> list[str]:
    """The multiaddr a worker's nodes listen on: its namespace's address, else loopback."""
    return [f"/ip4/{os.environ.get(IP_ENV, '127.0.0.1')}/tcp/0"]


def say(obj: dict[str, Any]) -> None:
    """A worker's answer: one JSON object on one line of stdout."""
    print(json.dumps(obj), flush=True)


class WorkerGone(RuntimeError):
    """A worker did not answer in time or exited; the message quotes its log."""


class Worker:
    """One worker process in a peer's namespace, with a buffered reader of its JSON lines.

    Example::

        w = Worker(layout["peers"][1], "benchmarks.tasks", ["--worker", "provider"], logs, name="provider")
        peer_id = w.need("peer", 60)["peer"]
        w.send("quit")
    """

    def __init__(
        self, peer: dict[str, Any], module: str, args: list[str], logs: Path, *, name: str = "worker"
    ) -> None:
        env = worker_env(peer["addr"])
        self.name = f"{name}@{peer['index']}"  # in messages and log file names
        self.log = logs / f"{self.name}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            # Binary pipes, read with os.read into our own buffer: a buffered text reader could
            # hold a second line that select() then never reports.
            self.proc = subprocess.Popen(
                [*peer["exec"], sys.executable, "-m", module, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        self._pending: list[dict[str, Any]] = []
        self._buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise WorkerGone(f"{self.name} is gone ({exc}); log: {self._tail()}") from None

    def expect(self, key: str, timeout: float) -> dict[str, Any] | None:
        """The next message holding ``key`` (others are kept for later); ``None`` on exit or timeout."""
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self._pending):
                if key in msg:
                    return self._pending.pop(i)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                return None
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                return None
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict):
                        self._pending.append(msg)

    def need(self, key: str, timeout: float) -> dict[str, Any]:
        """Like :meth:`expect`, but raises :class:`WorkerGone` quoting the worker's log."""
        msg = self.expect(key, timeout)
        if msg is None:
            state = "running" if self.proc.poll() is None else f"exit {self.proc.returncode}"
            raise WorkerGone(f"no {key!r} from {self.name} in {timeout:.0f} s ({state}); log: {self._tail()}")
        return msg

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-600:] or "(empty)"
        return "(unreadable)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def stop_all(workers: Iterable[Worker], timeout: float = 15.0) -> None:
    """Close every worker's stdin (their cue to exit), wait, kill the ones that linger."""
    workers = list(workers)
    for w in workers:
        if w.proc.stdin is not None and not w.proc.stdin.closed:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
    for w in workers:
        try:
            w.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            w.kill()
        if w.proc.stdout is not None:
            w.proc.stdout.close()


__all__ = ["IP_ENV", "Worker", "WorkerGone", "listen_addrs", "say", "stop_all", "worker_env"]
