"""Tensor streaming suite: raw TCP vs a plain py-libp2p stream vs the p2pcompute data lane.

Moves one float32 tensor (256 MiB and 1 GiB by default) between two processes on
loopback, in the same invocation over:

* ``raw_tcp``: trio sockets, 1 MiB ``send`` slices of the tensor, ``recv_into`` the
  destination tensor (the ceiling; the baseline ``raw_tcp``);
* ``libp2p``: one py-libp2p stream (Noise + yamux), 1 MiB writes, reads copied into the
  destination tensor (the baseline ``libp2p``);
* ``lane/<codec>``: :class:`p2pcompute.tensors.TensorLane` (AEAD records over a direct TCP
  connection, the cipher the two processes chose by measurement) with each codec, received
  ``into`` a preallocated tensor. The row's ``params`` name the ``cipher`` and ``cipher_why``.
* ``lane-gcm/none``, ``lane-ocb3/none``, ``lane-chacha/none``: the same lane held to one cipher
  (each this process has), to show what the choice is worth.
* ``lane-cuda/<codec>`` (``--cuda``, on a machine with a GPU): the same transfer from a CUDA tensor
  into a CUDA tensor (GPU to GPU through the lane's pinned staging buffers), for issue #18's
  target of >= 0.9x the host-to-host lane (its ``ratio_vs_lane``).

``lane/none`` is also a baseline (``lane``), so every row has its ``ratio_vs_lane``: the codecs'
target is >= 0.8x of the lane with no codec.

Figures per configuration: ``mb_per_s`` (tensor MB / sender wall time until the receiver's
acknowledgement; the primary metric), ``cpu_s_per_gb_send`` / ``cpu_s_per_gb_recv``,
``peak_rss_mib_send`` / ``peak_rss_mib_recv`` and ``rss_over_tensor_mib_*`` (peak RSS minus
the RSS once the tensor was allocated and touched: what the transfer itself cost).

Each worker is a fresh process (``python -m benchmarks.stream --worker ...``). Imports
:mod:`benchmarks.harness`, :mod:`p2pcompute` and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from p2pcompute.benchresults import SuiteResult, peak_rss_mib, print_table, wan_layout, write_results
from p2pcompute.wire.lanekeys import available_ciphers

CHUNK = 1 << 20
PROTO = "/p2pcompute/bench-stream/1.0.0"
CODECS = ("none", "fp16", "bf16", "int8")
_IP = ["127.0.0.1"]  # this worker's address: loopback, or its namespace's under --wan
_SEAL_THREADS: list[int | None] = [None]  # --seal-threads: the lanes' pool size (None: their default)
_DEVICE = ["cpu"]  # this worker's tensor device: "cuda" for the lane-cuda rows
_PHASES: dict[str, float] = {}  # --budget: thread CPU seconds per step of the lane's record loops
BUDGET_STEPS = ("stage", "seal", "send", "recv", "open", "land")


def _instrument() -> None:
    """``--budget``: time (thread CPU) every record step of the lane, by wrapping the step methods.

    ``stage`` = encoding/copying a record's payload (``Stager.payload``; a view for codec none),
    ``seal``/``open`` = the AEAD, ``send``/``recv`` = the socket calls (the kernel's copy),
    ``land`` = decoding a record that was not opened in place (``Lander.scatter``). What the
    process spent beyond their sum is Python, trio, the handshake and page faults.
    """
    from p2pcompute.tensors import staging, transfers
    from p2pcompute.wire import lanekeys

    def timed(cls: Any, method: str, step: str) -> None:
        inner = getattr(cls, method)
        clock = time.thread_time

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                _PHASES[step] = _PHASES.get(step, 0.0) + clock() - t0

        setattr(cls, method, wrapper)

    timed(staging.Stager, "payload", "stage")
    timed(lanekeys.RecordSealer, "seal_into", "seal")
    timed(transfers.SendSteps, "wire_blocking", "send")
    timed(transfers.ReceiveSteps, "wire_blocking", "recv")
    timed(lanekeys.RecordOpener, "open_into", "open")
    timed(staging.Lander, "scatter", "land")


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _tensor(size: int, fill: bool, device: str = "cpu") -> Any:
    import libp2p  # noqa: F401  (imported before the base RSS is taken, in every worker alike)
    import torch

    t = torch.empty(size // 4, dtype=torch.float32, device=device)
    if fill:
        t.normal_()
    else:
        t.zero_()  # touch every page so RSS counts the tensor before the transfer
    if t.is_cuda:
        torch.cuda.synchronize()
    return t


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# --- workers ------------------------------------------------------------------------------------------


async def _raw_recv(size: int, reps: int) -> dict[str, Any]:
    import socket as stdsocket

    import trio

    from p2pcompute.tensors.codecs import byte_memoryview

    dst = _tensor(size, fill=False)
    view = byte_memoryview(dst)
    base = _current_rss_mib()
    listener = trio.socket.socket()
    await listener.bind((_IP[0], 0))
    listener.listen(1)
    _emit({"ready": True, "port": listener.getsockname()[1], "host": _IP[0]})
    sock, _ = await listener.accept()
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    cpu0 = time.process_time()
    for _ in range(reps):
        got = 0
        while got < size:
            got += await sock.recv_into(view[got : min(size, got + CHUNK)])
        await sock.send(b"k")
    cpu = time.process_time() - cpu0
    sock.close()
    listener.close()
    return {"cpu": cpu, "base_rss": base, "peak_rss": peak_rss_mib()}


async def _raw_send(size: int, reps: int, port: int, peer_host: str) -> dict[str, Any]:
    import socket as stdsocket

    import trio

    from p2pcompute.tensors.codecs import byte_memoryview

    src = _tensor(size, fill=True)
    view = byte_memoryview(src)
    base = _current_rss_mib()
    sock = trio.socket.socket()
    await sock.connect((peer_host, port))
    sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    times = []
    cpu0 = time.process_time()
    ack = bytearray(1)
    for _ in range(reps):
        t0 = time.perf_counter()
        sent = 0
        while sent < size:
            sent += await sock.send(view[sent : min(size, sent + CHUNK)])
        await sock.recv_into(ack)
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    sock.close()
    return {"times": times, "cpu": cpu, "base_rss": base, "peak_rss": peak_rss_mib()}


def _new_host(seed_hex: str | None = None) -> tuple[Any, Any]:
    from libp2p import new_host
    from libp2p.network.config import ConnectionConfig

    from p2pcompute.identity import Identity
    from p2pcompute.overlay.host import libp2p_key_pair

    ident = Identity.from_seed(bytes.fromhex(seed_hex)) if seed_hex else Identity.generate()
    host = new_host(
        key_pair=libp2p_key_pair(ident), connection_config=ConnectionConfig(max_connections_per_peer=1)
    )
    return host, ident


async def _libp2p_recv(size: int, reps: int) -> dict[str, Any]:
    import multiaddr
    import trio
    from libp2p.network.stream.exceptions import StreamEOF

    from p2pcompute.tensors.codecs import byte_memoryview

    dst = _tensor(size, fill=False)
    view = byte_memoryview(dst)
    base = _current_rss_mib()
    host, _ = _new_host()
    done = trio.Semaphore(0)

    async def handler(stream: Any) -> None:
        got = 0
        try:
            while got < size:
                data = await stream.read(min(CHUNK, size - got))
                view[got : got + len(data)] = data
                got += len(data)
            await stream.write(b"k")
        except StreamEOF:
            pass
        finally:
            await stream.close()
            done.release()

    async with host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/{_IP[0]}/tcp/0")]):
        host.set_stream_handler(PROTO, handler)
        _emit({"ready": True, "addr": str(host.get_addrs()[0])})
        cpu0 = time.process_time()
        for _ in range(reps):
            await done.acquire()
        cpu = time.process_time() - cpu0
        await trio.sleep(0.2)
    return {"cpu": cpu, "base_rss": base, "peak_rss": peak_rss_mib()}


async def _libp2p_send(size: int, reps: int, addr: str) -> dict[str, Any]:
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from p2pcompute.tensors.codecs import byte_memoryview

    src = _tensor(size, fill=True)
    view = byte_memoryview(src)
    base = _current_rss_mib()
    host, _ = _new_host()
    times = []
    async with host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/{_IP[0]}/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await host.connect(info)
        cpu0 = time.process_time()
        for _ in range(reps):
            t0 = time.perf_counter()
            stream = await host.new_stream(info.peer_id, [PROTO])
            for off in range(0, size, CHUNK):
                await stream.write(bytes(view[off : off + CHUNK]))
            await stream.read(1)
            times.append(time.perf_counter() - t0)
            await stream.close()
        cpu = time.process_time() - cpu0
    return {"times": times, "cpu": cpu, "base_rss": base, "peak_rss": peak_rss_mib()}


async def _lane_recv(size: int, reps: int, sender: str) -> dict[str, Any]:
    from p2pcompute.overlay import open_node
    from p2pcompute.tensors import open_lane

    dst = _tensor(size, fill=False, device=_DEVICE[0])
    base = _current_rss_mib()
    listen = [f"/ip4/{_IP[0]}/tcp/0"]
    async with open_node(None, listen=listen, advertise=False) as node, open_lane(
        node, seal_threads=_SEAL_THREADS[0]
    ) as lane:
        _emit({"ready": True, "addr": node.addrs[0]})
        await lane.receive(sender, "warm-up")
        _PHASES.clear()
        cpu0 = time.process_time()
        for i in range(reps):
            await lane.receive(sender, f"t{i}", into={"x": dst})
        cpu = time.process_time() - cpu0
    return {"cpu": cpu, "base_rss": base, "peak_rss": peak_rss_mib(), "phases": dict(_PHASES)}


async def _lane_send(
    size: int, reps: int, addr: str, seed: str, codec: str, cipher: str | None
) -> dict[str, Any]:
    import torch

    from p2pcompute.identity import Identity
    from p2pcompute.overlay import open_node
    from p2pcompute.tensors import open_lane

    src = _tensor(size, fill=True, device=_DEVICE[0])
    base = _current_rss_mib()
    ident = Identity.from_seed(bytes.fromhex(seed))
    times = []
    wire = 0
    used = why = ""
    async with open_node(ident, listen=[f"/ip4/{_IP[0]}/tcp/0"], advertise=False) as node:
        peer = await node.connect(addr)
        ciphers = (cipher,) if cipher else None
        async with open_lane(node, ciphers=ciphers, seal_threads=_SEAL_THREADS[0]) as lane:
            await lane.send(peer, "warm-up", {"w": torch.zeros(16)})
            _PHASES.clear()
            cpu0 = time.process_time()
            for i in range(reps):
                t0 = time.perf_counter()
                report = await lane.send(peer, f"t{i}", {"x": src}, codec=codec)
                times.append(time.perf_counter() - t0)
                wire = report.bytes
                used = report.cipher
                why = report.cipher_why
            cpu = time.process_time() - cpu0
    return {
        "times": times, "cpu": cpu, "base_rss": base, "peak_rss": peak_rss_mib(),
        "wire": wire, "cipher": used, "cipher_why": why, "phases": dict(_PHASES),
    }


def _worker(spec: dict[str, Any]) -> int:
    import trio

    kind, role, size, reps = spec["kind"], spec["role"], spec["size"], spec["reps"]
    _IP[0] = spec.get("ip", "127.0.0.1")
    _SEAL_THREADS[0] = spec.get("seal_threads")
    _DEVICE[0] = spec.get("device", "cpu")
    if spec.get("budget"):
        _instrument()
    if role == "send" and spec.get("await_peer"):
        # started beside the receiver: import while it starts, then learn where it listens
        import libp2p  # noqa: F401
        import torch  # noqa: F401

        import p2pcompute.tensors  # noqa: F401

        spec.update(json.loads(sys.stdin.readline()))
    if kind == "raw" and role == "recv":
        out = trio.run(_raw_recv, size, reps)
    elif kind == "raw":
        out = trio.run(_raw_send, size, reps, spec["port"], spec["host"])
    elif kind == "libp2p" and role == "recv":
        out = trio.run(_libp2p_recv, size, reps)
    elif kind == "libp2p":
        out = trio.run(_libp2p_send, size, reps, spec["addr"])
    elif role == "recv":
        out = trio.run(_lane_recv, size, reps, spec["sender"])
    else:
        out = trio.run(
            _lane_send, size, reps, spec["addr"], spec["seed"], spec["codec"], spec.get("cipher")
        )
    _emit({"result": out})
    return 0


# --- orchestration ------------------------------------------------------------------------------------


def _spawn(
    spec: dict[str, Any], *, stdin: bool = False, prefix: list[str] | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "benchmarks.stream", "--worker", json.dumps(spec)],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_json(proc: subprocess.Popen[str], key: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            obj = json.loads(line)
            if key in obj:
                return obj  # type: ignore[no-any-return]
    raise RuntimeError(f"worker exited without {key!r} (rc={proc.wait()})")


def _pair(
    kind: str, size: int, reps: int, codec: str = "none", timeout: float = 900,
    layout: dict[str, Any] | None = None, cipher: str | None = None, budget: bool = False,
    seal_threads: int | None = None, device: str = "cpu",
) -> dict[str, Any]:
    """One receiver and one sender process (peers 0 and 1 of the WAN ``layout`` when given)."""
    from p2pcompute.identity import Identity

    seed = os.urandom(32).hex()
    sender_id = Identity.from_seed(bytes.fromhex(seed)).peer_id
    where = [{"ip": p["addr"], "prefix": list(p["exec"])} for p in layout["peers"][:2]] if layout else None
    recv = _spawn(
        {"kind": kind, "role": "recv", "size": size, "reps": reps, "sender": sender_id, "budget": budget,
         "seal_threads": seal_threads, "device": device,
         **({"ip": where[0]["ip"]} if where else {})},
        prefix=where[0]["prefix"] if where else None,
    )
    send: subprocess.Popen[str] | None = None
    try:
        # both start at once (each spends seconds importing torch); the sender waits for the address
        send = _spawn(
            {"kind": kind, "role": "send", "size": size, "reps": reps, "seed": seed, "codec": codec,
             "cipher": cipher, "await_peer": True, "budget": budget, "seal_threads": seal_threads,
             "device": device, **({"ip": where[1]["ip"]} if where else {})},
            stdin=True,
            prefix=where[1]["prefix"] if where else None,
        )
        ready = _read_json(recv, "ready")
        assert send.stdin is not None
        peer = {"port": ready.get("port"), "addr": ready.get("addr"), "host": ready.get("host")}
        send.stdin.write(json.dumps(peer) + "\n")
        send.stdin.close()
        s = _read_json(send, "result")["result"]
        r = _read_json(recv, "result")["result"]
        send.wait(timeout)
        recv.wait(timeout)
        return {"send": s, "recv": r}
    finally:
        for p in (send, recv):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
                if p.stdout is not None:
                    p.stdout.close()


def run(
    quick: bool = False,
    sizes: tuple[int, ...] | None = None,
    reps: int = 3,
    libp2p_reps: int = 1,
    codecs: tuple[str, ...] = CODECS,
    budget: bool = False,
    seal_threads: int | None = None,
    cuda: bool = False,
    **_: Any,
) -> SuiteResult:
    """Measure every configuration at every size; returns the suite with ratios filled in."""
    sizes = sizes or ((8 << 20,) if quick else (256 << 20, 1 << 30))
    reps = 1 if quick else reps
    if quick and codecs == CODECS:
        codecs = ("none", "int8")  # a smoke run: the plain lane and the costliest codec
    # under `--wan` the runner hands us a namespace per peer: receiver = peer 0, sender = peer 1
    layout = wan_layout()
    suite = SuiteResult(
        "stream",
        "mb_per_s",
        options={"sizes": list(sizes), "reps": reps, "libp2p_reps": libp2p_reps, "codecs": list(codecs),
             "seal_threads": seal_threads, "cuda": cuda},
    )
    for size in sizes:
        label = f"{size >> 20}MiB"
        plan: list[tuple[str, str, str, int, str | None, str | None, str]] = [
            (f"raw_tcp {label}", "raw", "none", reps, "raw_tcp", None, "cpu"),
            (f"libp2p {label}", "libp2p", "none", max(1, libp2p_reps), "libp2p", None, "cpu"),
            *((f"lane/{c} {label}", "lane", c, reps, "lane" if c == "none" else None, None, "cpu")
              for c in codecs),
        ]
        if "none" in codecs and not quick:
            for held in available_ciphers():
                short = held.split("-")[-1].replace("poly1305", "chacha")
                plan.append((f"lane-{short}/none {label}", "lane", "none", reps, None, held, "cpu"))
        if cuda:
            plan.extend((f"lane-cuda/{c} {label}", "lane", c, reps, None, None, "cuda") for c in codecs)
        for name, kind, codec, n, baseline, cipher, device in plan:
            out = _pair(
                kind, size, n, codec, layout=layout, cipher=cipher, budget=budget and kind == "lane",
                seal_threads=seal_threads, device=device,
            )
            extra: dict[str, Any] = {}
            if kind == "lane" and seal_threads is not None:
                extra["seal_threads"] = seal_threads
            if device != "cpu":
                extra["device"] = device
            row = suite.config(name, size=size, kind=kind, codec=codec, **extra)
            row.baseline = baseline
            gb = size * n / 1e9
            for seconds in out["send"]["times"]:
                row.add("mb_per_s", size / 1e6 / seconds)
            row.add("cpu_s_per_gb_send", out["send"]["cpu"] / gb)
            row.add("cpu_s_per_gb_recv", out["recv"]["cpu"] / gb)
            for side in ("send", "recv"):
                row.add(f"peak_rss_mib_{side}", out[side]["peak_rss"])
                row.add(f"rss_over_tensor_mib_{side}", out[side]["peak_rss"] - out[side]["base_rss"])
            if budget and kind == "lane":
                for side in ("send", "recv"):
                    phases = out[side].get("phases", {})
                    for step in BUDGET_STEPS:
                        if step in phases:
                            row.add(f"{side}_{step}_s_per_gb", phases[step] / gb)
                    row.add(f"{side}_other_s_per_gb", (out[side]["cpu"] - sum(phases.values())) / gb)
            if "wire" in out["send"]:
                row.params["wire_bytes"] = out["send"]["wire"]
                row.params["cipher"] = out["send"]["cipher"]
                row.params["cipher_why"] = out["send"]["cipher_why"]
            print(f"  {name}: {row.median('mb_per_s'):.0f} MB/s", flush=True)
    suite.add_ratios()
    return suite


def _print_budget(result: SuiteResult) -> None:
    """The ``--budget`` table: CPU-s per GB of tensor, per record step, each side (medians)."""
    steps = [*(f"send_{s}" for s in ("stage", "seal", "send", "other")),
             *(f"recv_{s}" for s in ("recv", "open", "land", "other"))]
    print("\nCPU-s per GB by step (thread CPU; other = process CPU minus the steps)")
    print(f"{'config':26s} " + " ".join(f"{s:>11s}" for s in steps))
    for row in result.configs:
        if not any(f"{s}_s_per_gb" in row.samples for s in steps):
            continue
        cells = [
            f"{row.median(s + '_s_per_gb'):11.3f}" if f"{s}_s_per_gb" in row.samples else f"{'-':>11s}"
            for s in steps
        ]
        print(f"{row.name:26s} " + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.stream [--quick] [--out PATH]``; prints a table and writes JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny run of each configuration")
    parser.add_argument("--out", default="bench-results/stream.json", help="JSON file (or folder) to write")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes in MiB (default 256,1024)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--libp2p-reps", type=int, default=1)
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument(
        "--budget",
        action="store_true",
        help="also time each record step of the lane (thread CPU-s per GB: stage, seal, send / recv, "
        "open, land, other) and print them as a second table",
    )
    parser.add_argument(
        "--seal-threads", type=int, default=None, metavar="N",
        help="threads that seal/open each lane transfer's records (default: the lane's own choice, "
        "1 below 8 cores)",
    )
    parser.add_argument(
        "--cuda", action="store_true",
        help="also send CUDA tensors GPU to GPU through the lane (rows lane-cuda/<codec>; needs a GPU)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(json.loads(args.worker))
    sizes = tuple(int(s) << 20 for s in args.sizes.split(",")) if args.sizes else None
    codecs = tuple(c for c in args.codecs.split(",") if c)
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            print("--cuda: this machine has no CUDA device", file=sys.stderr)
            return 2
    print(f"load before: {os.getloadavg()}", flush=True)
    result = run(
        args.quick, sizes=sizes, reps=args.reps, libp2p_reps=args.libp2p_reps, codecs=codecs,
        budget=args.budget, seal_threads=args.seal_threads, cuda=args.cuda,
    )
    print(f"load after: {os.getloadavg()}", flush=True)
    print_table(
        result,
        [
            "mb_per_s",
            "cpu_s_per_gb_send",
            "cpu_s_per_gb_recv",
            "rss_over_tensor_mib_send",
            "rss_over_tensor_mib_recv",
            "peak_rss_mib_recv",
        ],
    )
    if args.budget:
        _print_budget(result)
    path = write_results(result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
