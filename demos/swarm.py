"""``make demo-swarm``: a local swarm of separate processes, then a clean shutdown.

Starts ``p2pcompute bootstrap`` and three ``p2pcompute peer`` processes on
127.0.0.1, prints each peer's view of the others' capacity (as the peers print
it themselves), stops every process with SIGINT and exits 0 only when all of
them exited 0. Runs as ``python -m demos.swarm`` from the checkout.

Imports only the standard library (it drives the CLI as a user would).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PEERS = 3
DEADLINE_S = 60.0


def _spawn(*args: str) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "p2pcompute.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen[str], done: str | None, deadline: float) -> list[str]:
    """Lines of ``proc``'s stdout up to the first blank-free line count condition (``done`` prefix)."""
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if done is None or (len(lines) > 1 and lines[-1].startswith(done)):
            break
    return lines


def main() -> int:
    """Run the demo; return 0 when every process started, reported and stopped cleanly.

    Example::

        $ python -m demos.swarm
    """
    deadline = time.monotonic() + DEADLINE_S
    started = time.monotonic()
    procs: list[subprocess.Popen[str]] = []
    names: list[str] = []
    ok = True
    try:
        boot = _spawn("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
        procs.append(boot)
        names.append("bootstrap")
        first = _read_until(boot, None, deadline)
        if not first:
            print("demo: the bootstrap node did not start", file=sys.stderr)
            return 1
        addr = first[0]
        print(f"bootstrap node: {addr}", flush=True)
        peers = [
            _spawn(
                "peer", "--bootstrap", addr, "--listen", "/ip4/127.0.0.1/tcp/0", "--show-peers", str(PEERS)
            )
            for _ in range(PEERS)
        ]
        procs += peers
        names += [f"peer {i + 1}" for i in range(PEERS)]
        for i, p in enumerate(peers):
            head = _read_until(p, None, deadline)
            if not head:
                ok = False
                continue
            assert p.stdout is not None
            view: list[str] = []
            while time.monotonic() < deadline:
                line = p.stdout.readline()
                if not line:
                    break
                view.append(line.rstrip("\n"))
                # the view is a "view of" line, a header, then one line per known peer
                if len(view) >= 2 + PEERS:
                    break
            print(f"\npeer {i + 1} ({head[0].rsplit('/p2p/', 1)[-1]})", flush=True)
            print("\n".join(view), flush=True)
            ok = ok and len(view) >= 2 + PEERS
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for name, p in zip(names, procs, strict=True):
            try:
                code = p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                code = p.wait()
            err = p.stderr.read() if p.stderr else ""
            if code != 0:
                ok = False
                print(f"demo: {name} exited {code}: {err.strip()[-500:]}", file=sys.stderr)
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()
    print(
        f"\nall {len(procs)} processes stopped cleanly in {time.monotonic() - started:.1f} s"
        if ok
        else "\ndemo failed"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
