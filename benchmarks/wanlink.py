"""User-space link emulation for kernels without ``sch_netem``: TUN devices and a shaping forwarder.

Some kernels (this project's CI VMs among them) build network namespaces, veth and ``tbf`` but
not ``netem``, and no tc classifier either, so neither delay nor loss can be had from ``tc``.
This module gives the same four properties (delay, jitter, loss, rate) from user space:

* each peer namespace gets a TUN device ``eth0`` (made by :mod:`benchmarks.wan`'s plan) holding
  its address ``10.77.0.<i+1>/24``, so the kernel routes every packet for another peer into it;
* one forwarder process (:func:`main`, started by :class:`benchmarks.wan.WanEmulation`) attaches
  to every peer's TUN (entering each namespace with ``setns(2)`` just long enough to open it),
  reads each IPv4 packet, passes it through the *sending* peer's :class:`EgressShaper`, and
  writes it into the destination peer's TUN when the shaper says it is due.

:class:`EgressShaper` is the sans-IO core, the user-space twin of one ``netem`` qdisc on a peer's
egress: a packet is dropped with probability ``loss`` or when the queue is full (``limit``
packets held); otherwise it waits for the serializer (``rate``), then ``delay`` plus a normal jitter of
standard deviation ``jitter``. Packets of one sender leave in the order they came (netem with a
rate behaves the same), so jitter never reorders a TCP stream.

The forwarder starts unshaped (the baseline) and is driven by lines on its stdin: ``shape``
switches to the configured shaping (answered ``shaped``), ``stats`` prints the counters as one
JSON line; end of file (the controller closed the pipe or died) ends it, and the kernel removes
each non-persistent attachment with it. Standard library only, so it runs by file path.

Limits, measured and written up in docs/benchmarks.md: delays are kept to about 1 ms (the
``epoll`` timeout's resolution), and the forwarder is one Python process, so it moves at most a
few tens of thousands of packets a second. Shape rates to what it can carry, or raise the MTU.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import math
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65535
READ_BATCH = 64  # packets read from one device before the others get a turn


def queue_limit(rate_mbit: float | None, delay_ms: float) -> int:
    """Packets a shaped egress may hold: four bandwidth-delay products at 1500 bytes, 1000 to 1e6.

    The same rule sizes ``netem``'s ``limit``: too small a queue and the emulator itself becomes
    the loss. Example::

        >>> queue_limit(200.0, 50.0)
        3333
    """
    bdp_pkts = (rate_mbit or 10_000) * 1e6 / 8 * max(delay_ms, 1.0) / 1e3 / 1500
    return int(min(max(1000, 4 * bdp_pkts), 1_000_000))


@dataclass
class ShaperStats:
    """What one egress did with the packets offered to it."""

    offered: int = 0
    passed: int = 0
    lost: int = 0  # dropped at random (the spec's loss)
    overflow: int = 0  # dropped because ``limit`` packets were already held
    bytes_passed: int = 0


@dataclass
class EgressShaper:
    """One sender's shaped egress, with no I/O: given a packet's arrival, say when it leaves or drop it.

    ``delay_s``/``jitter_s`` in seconds, ``loss`` a probability in [0, 1), ``rate_bps`` in bytes
    per second (``None``: unlimited), ``limit`` packets held at most (queued or in flight on
    the delay line). The caller supplies the randomness (``u`` uniform in [0, 1), ``z`` standard
    normal) so that tests can choose it, and calls :meth:`released` when a packet is delivered.

    Example::

        >>> s = EgressShaper(delay_s=0.05, rate_bps=1_000_000)
        >>> s.offer(10.0, 1000, u=0.5, z=0.0)   # 1 ms on the wire, then 50 ms of delay
        10.051
        >>> s.offer(10.0, 1000, u=0.5, z=0.0)   # queued behind the first
        10.052
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rate_bps: float | None = None
    limit: int = 1000
    held: int = field(default=0, init=False)
    stats: ShaperStats = field(default_factory=ShaperStats, init=False)
    _busy_until: float = field(default=-math.inf, init=False)
    _last: float = field(default=-math.inf, init=False)

    def __post_init__(self) -> None:
        if not (self.delay_s >= 0 and self.jitter_s >= 0 and 0 <= self.loss < 1 and self.limit >= 1):
            raise ValueError(f"bad shaping: {self}")
        if self.rate_bps is not None and not self.rate_bps > 0:
            raise ValueError(f"rate must be positive, not {self.rate_bps}")

    def offer(self, now: float, size: int, u: float, z: float) -> float | None:
        """The time the packet is due at its destination, or ``None`` when it is dropped."""
        self.stats.offered += 1
        if u < self.loss:  # netem draws the loss first, then checks its limit
            self.stats.lost += 1
            return None
        if self.held >= self.limit:
            self.stats.overflow += 1
            return None
        done = now
        if self.rate_bps is not None:
            done = max(now, self._busy_until) + size / self.rate_bps
            self._busy_until = done
        wait = self.delay_s + self.jitter_s * z if self.jitter_s else self.delay_s
        due = max(done + max(wait, 0.0), self._last)  # one sender's packets stay in order
        self._last = due
        self.held += 1
        self.stats.passed += 1
        self.stats.bytes_passed += size
        return due

    def released(self) -> None:
        """A packet this shaper passed has been delivered (or failed to be): it no longer counts."""
        self.held -= 1


def route(packet: bytes, addrs: dict[bytes, int]) -> int | None:
    """The index of the peer an IPv4 packet is addressed to, or ``None`` (not IPv4, not a peer).

    Example::

        >>> pkt = bytes([0x45]) + bytes(15) + bytes([10, 77, 0, 2])
        >>> route(pkt, {bytes([10, 77, 0, 2]): 1})
        1
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return addrs.get(packet[16:20])


# ---------------------------------------------------------------------------------------------
# The driver: attach to the TUN devices, forward, obey the control pipe

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def attach(netns: str, ifname: str = "eth0") -> int:
    """Open the TUN device ``ifname`` that lives in network namespace ``netns``; returns its fd.

    The calling thread enters ``netns`` only to open the device and returns to its own namespace
    before this returns (also on failure). The fd is non-blocking, one IPv4 packet per read.
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(os.path.join("/var/run/netns", netns), os.O_RDONLY)
        try:
            _setns(target)
            try:
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
                try:
                    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI))
                except BaseException:
                    os.close(fd)
                    raise
            finally:
                _setns(home)
        finally:
            os.close(target)
    finally:
        os.close(home)
    return fd


@dataclass
class ForwarderStats:
    """Counters of the whole forwarder: per sender (index order) and for packets it could not route."""

    senders: list[ShaperStats]
    unroutable: int = 0
    write_errors: int = 0
    shaped: bool = False


class Forwarder:
    """Moves packets between peers' TUN fds through their senders' shapers (see the module docstring)."""

    def __init__(
        self, fds: list[int], addrs: list[str], shaped: list[EgressShaper], *, seed: int | None = None
    ) -> None:
        if not len(fds) == len(addrs) == len(shaped):
            raise ValueError("one fd, one address and one shaper per peer")
        self.fds = fds
        self.addrs = {bytes(int(x) for x in a.split(".")): i for i, a in enumerate(addrs)}
        self._shaped = shaped
        self.shapers = [EgressShaper(limit=1_000_000) for _ in fds]
        self.is_shaped = False
        self.rng = random.Random(seed)
        self.heap: list[tuple[float, int, int, EgressShaper, bytes]] = []
        self._seq = 0
        self.unroutable = 0
        self.write_errors = 0

    def shape(self) -> None:
        """Switch from pass-through to the configured shaping (packets already queued keep their time)."""
        self.shapers = self._shaped
        self.is_shaped = True

    def stats(self) -> ForwarderStats:
        return ForwarderStats(
            [s.stats for s in self.shapers], self.unroutable, self.write_errors, self.is_shaped
        )

    def read_from(self, src: int) -> None:
        fd = self.fds[src]
        rng = self.rng
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            dst = route(pkt, self.addrs)
            if dst is None or dst == src:
                self.unroutable += 1
                continue
            shaper = self.shapers[src]
            z = rng.gauss(0.0, 1.0) if shaper.jitter_s else 0.0
            due = shaper.offer(time.monotonic(), len(pkt), rng.random(), z)
            if due is not None:
                heapq.heappush(self.heap, (due, self._seq, dst, shaper, pkt))
                self._seq += 1

    def deliver_due(self) -> float | None:
        """Write every packet that is due; returns seconds until the next one (``None``: none held)."""
        heap = self.heap
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, dst, shaper, pkt = heapq.heappop(heap)
            shaper.released()
            try:
                os.write(self.fds[dst], pkt)
            except OSError:  # the destination's queue is full or it is going away: a lost packet
                self.write_errors += 1
        return max(0.0, heap[0][0] - time.monotonic()) if heap else None

    def serve(self, control: int, reply: Any) -> None:
        """Run until ``control`` (a pipe fd) reaches end of file; answer its commands on ``reply``."""
        ep = select.epoll()
        index = {fd: i for i, fd in enumerate(self.fds)}
        for fd in self.fds:
            ep.register(fd, select.EPOLLIN)
        ep.register(control, select.EPOLLIN | select.EPOLLHUP)
        pending = b""
        try:
            while True:
                wait = self.deliver_due()
                for fd, _ in ep.poll(-1 if wait is None else wait):
                    if fd in index:
                        self.read_from(index[fd])
                        continue
                    chunk = os.read(control, 4096)
                    if not chunk:
                        return
                    pending += chunk
                    while b"\n" in pending:
                        line, _, pending = pending.partition(b"\n")
                        self._command(line.decode().strip(), reply)
        finally:
            ep.close()

    def _command(self, cmd: str, reply: Any) -> None:
        if cmd == "shape":
            self.shape()
            print("shaped", file=reply, flush=True)
        elif cmd == "stats":
            print(json.dumps(asdict(self.stats())), file=reply, flush=True)
        else:
            print(f"error unknown command {cmd!r}", file=reply, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``wanlink.py --peer NETNS=ADDR ... [--delay-ms D] [--jitter-ms J] [--loss-pct L] [--rate-mbit R]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", action="append", required=True, metavar="NETNS=ADDR")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss-pct", type=float, default=0.0)
    parser.add_argument("--rate-mbit", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when the link goes
    peers = [p.split("=", 1) for p in args.peer]
    limit = queue_limit(args.rate_mbit, args.delay_ms)
    shaped = [
        EgressShaper(
            delay_s=args.delay_ms / 1e3,
            jitter_s=args.jitter_ms / 1e3,
            loss=args.loss_pct / 100,
            rate_bps=None if args.rate_mbit is None else args.rate_mbit * 1e6 / 8,
            limit=limit,
        )
        for _ in peers
    ]
    fds = [attach(netns) for netns, _ in peers]
    fwd = Forwarder(fds, [addr for _, addr in peers], shaped, seed=args.seed)
    print("ready", flush=True)
    fwd.serve(sys.stdin.fileno(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "EgressShaper",
    "Forwarder",
    "ForwarderStats",
    "ShaperStats",
    "attach",
    "main",
    "queue_limit",
    "route",
]
