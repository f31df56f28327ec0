"""WAN emulation for benchmarks: network namespaces, veth pairs on a bridge, tc shaping.

Owns three things:

* the ``--wan`` spec (:func:`parse_spec`, :class:`WanSpec`), a sans-IO parser;
* :class:`WanEmulation`, a context manager that puts each peer in its own network namespace,
  joins them with veth pairs on a bridge inside a dedicated hub namespace, shapes each peer's
  egress with ``tc netem`` (delay, jitter, loss, rate) -- or, where the kernel has no netem,
  with ``tbf`` (rate only, and it says what it could not apply) -- and tears everything down on
  success, on failure and on Ctrl-C / SIGTERM. :func:`plan` computes every ``ip``/``tc`` command
  up front as data, so the topology is tested without privilege;
* the ``wan`` suite (:func:`run`, :func:`main`): a raw TCP ping-pong and bulk transfer between
  two namespaces, unshaped (the baseline) then shaped, in the same invocation, so the figures
  show the delay and rate the emulation really gives.

Safety: only addresses inside namespaces it creates are used (``10.77.0.0/24`` on a bridge in a
hub namespace, never routed to the host's interfaces); no interface is created in the host's
namespace; every loop is bounded; namespace names carry our pid (``p2pcb-<pid>-...``) so that
:func:`sweep_stale` only ever removes leftovers of dead runs of this harness.

Without root or CAP_NET_ADMIN, or without iproute2, :func:`probe_support` says why and callers
run on plain loopback. Imports the standard library, :mod:`benchmarks.harness` and
:mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from benchmarks import wanlink
from benchmarks.wanlink import queue_limit
from p2pcompute.benchresults import SuiteResult, print_table, write_results
from p2pcompute.errors import ConfigError

PREFIX = "p2pcb"
SUBNET = "10.77.0"
MAX_PEERS = 64
CAP_NET_ADMIN = 12
_CMD_TIMEOUT = 15.0

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class WanSpecError(ConfigError):
    """A ``--wan`` spec that does not parse or is out of range."""


class WanError(RuntimeError):
    """Setting up the emulated network failed (everything created so far was torn down)."""


# ---------------------------------------------------------------------------------------------
# The spec (sans-IO)


@dataclass(frozen=True)
class WanSpec:
    """Per-link shaping applied to each peer's egress: one-way delay, jitter, loss and rate.

    A packet from peer A to peer B crosses A's shaped egress once, so the round trip between two
    peers is about ``2 * delay_ms`` and each direction is limited to ``rate_mbit``.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float | None = None
    mtu: int | None = None  # the peers' link MTU; None keeps the device's default (1500)

    @property
    def is_null(self) -> bool:
        """True when nothing is shaped (an MTU alone shapes nothing)."""
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.loss_pct == 0 and self.rate_mbit is None

    @property
    def needs_netem(self) -> bool:
        """True when the spec asks for something only netem (or the user-space link) gives."""
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)

    def describe(self) -> str:
        """The canonical spec text; ``parse_spec(s.describe()) == s``.

        Example::

            >>> parse_spec("200mbit,50ms,0.1%loss").describe()
            'delay=50ms,rate=200mbit,loss=0.1%'
        """
        parts = []
        if self.delay_ms:
            parts.append(f"delay={_num(self.delay_ms)}ms")
        if self.jitter_ms:
            parts.append(f"jitter={_num(self.jitter_ms)}ms")
        if self.rate_mbit is not None:
            parts.append(f"rate={_num(self.rate_mbit)}mbit")
        if self.loss_pct:
            parts.append(f"loss={_num(self.loss_pct)}%")
        if self.mtu is not None:
            parts.append(f"mtu={self.mtu}")
        return ",".join(parts) or "none"


def _num(x: float) -> str:
    return repr(float(x)).removesuffix(".0") if float(x) != int(x) or abs(x) >= 1e16 else str(int(x))


_TIME = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_RATE = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_spec(text: str) -> WanSpec:
    """Parse a ``--wan`` spec: comma-separated items, short or ``key=value`` form.

    Short items: ``50ms`` (delay; also ``s``/``us``), ``5msjitter``, ``200mbit`` (rate; also
    ``bit``/``kbit``/``gbit``), ``0.1%loss`` or ``0.1%``, ``9000mtu``. Long items: ``delay=50ms``,
    ``jitter=5ms``, ``rate=200mbit``, ``loss=0.1%``, ``mtu=9000``. ``none`` means no shaping.
    Raises :class:`WanSpecError` on anything else, on a repeated item and on out-of-range values
    (delay up to 10 s, jitter not above delay, loss below 100 %, rate 8 kbit to 100 gbit,
    MTU 576 to 65000).

    Example::

        >>> parse_spec("50ms,200mbit,0.1%loss")
        WanSpec(delay_ms=50.0, jitter_ms=0.0, loss_pct=0.1, rate_mbit=200.0)
    """
    if not isinstance(text, str) or len(text) > 200:
        raise WanSpecError("a --wan spec is a short string such as 50ms,200mbit,0.1%loss")
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not items:
        raise WanSpecError("empty --wan spec (use 'none' for no shaping)")
    if items == ["none"]:
        return WanSpec()
    got: dict[str, float] = {}
    for item in items:
        key, value = _parse_item(item)
        if key in got:
            raise WanSpecError(f"--wan gives {key} twice ({text!r})")
        got[key] = value
    spec = WanSpec(
        delay_ms=got.get("delay", 0.0),
        jitter_ms=got.get("jitter", 0.0),
        loss_pct=got.get("loss", 0.0),
        rate_mbit=got.get("rate"),
        mtu=None if "mtu" not in got else int(got["mtu"]),
    )
    if spec.mtu is not None and (spec.mtu != got["mtu"] or not 576 <= spec.mtu <= 65_000):
        raise WanSpecError(f"mtu {got['mtu']} must be a whole number of bytes from 576 to 65000")
    if spec.delay_ms > 10_000:
        raise WanSpecError(f"delay {spec.delay_ms} ms is above the 10 s limit")
    if spec.jitter_ms > spec.delay_ms:
        raise WanSpecError("jitter must not exceed the delay")
    if not 0 <= spec.loss_pct < 100:
        raise WanSpecError(f"loss {spec.loss_pct}% must be in [0, 100)")
    if spec.rate_mbit is not None and not 0.008 <= spec.rate_mbit <= 100_000:
        raise WanSpecError(f"rate {spec.rate_mbit} mbit/s must be between 8 kbit and 100 gbit")
    return spec


def _parse_item(item: str) -> tuple[str, float]:
    if "=" in item:
        key, _, val = item.partition("=")
        key = key.strip()
        val = val.strip()
        if key in ("delay", "jitter"):
            m = re.fullmatch(_NUM + r"(us|ms|s)", val)
            if m:
                return key, float(m[1]) * _TIME[m[2]]
        elif key == "rate":
            m = re.fullmatch(_NUM + r"(bit|kbit|mbit|gbit)", val)
            if m:
                return key, float(m[1]) * _RATE[m[2]]
        elif key == "loss":
            m = re.fullmatch(_NUM + r"%?", val)
            if m:
                return key, float(m[1])
        elif key == "mtu":
            m = re.fullmatch(_NUM, val)
            if m:
                return key, float(m[1])
        raise WanSpecError(f"cannot read --wan item {item!r}")
    m = re.fullmatch(_NUM + r"(us|ms|s)(jitter)?", item)
    if m:
        return ("jitter" if m[3] else "delay"), float(m[1]) * _TIME[m[2]]
    m = re.fullmatch(_NUM + r"(bit|kbit|mbit|gbit)", item)
    if m:
        return "rate", float(m[1]) * _RATE[m[2]]
    m = re.fullmatch(_NUM + r"%(loss)?", item)
    if m:
        return "loss", float(m[1])
    m = re.fullmatch(_NUM + r"mtu", item)
    if m:
        return "mtu", float(m[1])
    raise WanSpecError(
        f"cannot read --wan item {item!r} (expected e.g. 50ms, 5msjitter, 200mbit, 0.1%loss, 9000mtu)"
    )


# ---------------------------------------------------------------------------------------------
# The plan (sans-IO): every command, as data


@dataclass(frozen=True)
class PeerNs:
    """One emulated peer: its namespace, its address, and the argv prefix that runs a command in it."""

    index: int
    netns: str
    addr: str

    @property
    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


@dataclass(frozen=True)
class Plan:
    """Everything :class:`WanEmulation` will run, computed without touching the system.

    ``backend`` is ``"kernel"`` (veth pairs on a bridge in ``hub``, shaped by ``tc``) or
    ``"user"`` (a TUN device per peer and no hub: :mod:`benchmarks.wanlink` forwards and shapes,
    started with ``link_argv``).
    """

    tag: str
    hub: str | None
    peers: tuple[PeerNs, ...]
    setup: tuple[tuple[str, ...], ...]
    shaping: tuple[tuple[str, ...], ...]
    teardown: tuple[tuple[str, ...], ...]
    applied: dict[str, Any]
    not_applied: tuple[str, ...]
    backend: str = "kernel"
    link_argv: tuple[str, ...] = ()

    @property
    def namespaces(self) -> list[str]:
        return [p.netns for p in self.peers] + ([self.hub] if self.hub else [])


BACKENDS = ("auto", "kernel", "user")
BACKEND_ENV = "P2PC_WAN_BACKEND"  # overrides "auto": "kernel" or "user"


def _applied(spec: WanSpec) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for key in ("delay_ms", "jitter_ms", "loss_pct"):
        if getattr(spec, key):
            got[key] = getattr(spec, key)
    if spec.rate_mbit is not None:
        got["rate_mbit"] = spec.rate_mbit
    return got


def shaping_commands(
    spec: WanSpec, netns: str, *, netem: bool, tbf: bool
) -> tuple[list[list[str]], dict[str, Any], list[str]]:
    """The ``tc`` commands shaping ``eth0`` in ``netns``, what they apply, and what they cannot.

    With netem every field is applied in one qdisc. Without it, ``tbf`` applies the rate and
    the rest is reported as not applied. Example::

        cmds, applied, missing = shaping_commands(parse_spec("50ms,200mbit"), "ns", netem=False, tbf=True)
        # missing == ["delay 50 ms (kernel has no sch_netem)"]
    """
    if spec.is_null:
        return [], {}, []
    base = ["tc", "-n", netns, "qdisc", "add", "dev", "eth0", "root"]
    if netem:
        args = ["netem"]
        if spec.delay_ms:
            args += ["delay", f"{_num(spec.delay_ms)}ms"]
            if spec.jitter_ms:
                args += [f"{_num(spec.jitter_ms)}ms", "distribution", "normal"]
        if spec.loss_pct:
            args += ["loss", f"{_num(spec.loss_pct)}%"]
        if spec.rate_mbit is not None:
            args += ["rate", f"{_num(spec.rate_mbit * 1000)}kbit"]
        # The queue must hold a bandwidth-delay product, or netem itself becomes the loss.
        args += ["limit", str(queue_limit(spec.rate_mbit, spec.delay_ms))]
        return [base + args], _applied(spec), []
    missing = []
    for label, value, unit in (
        ("delay", spec.delay_ms, "ms"),
        ("jitter", spec.jitter_ms, "ms"),
        ("loss", spec.loss_pct, "%"),
    ):
        if value:
            missing.append(f"{label} {_num(value)} {unit} (kernel has no sch_netem)")
    if spec.rate_mbit is None:
        return [], {}, missing
    if not tbf:
        return [], {}, [*missing, f"rate {_num(spec.rate_mbit)} mbit (kernel has neither netem nor tbf)"]
    rate_bps = spec.rate_mbit * 1e6 / 8
    # The bucket must hold a whole GSO super-packet (64 KiB) and a few ms of traffic.
    burst = int(max(rate_bps * 0.004, 96 * 1024))
    rate = f"{_num(spec.rate_mbit * 1000)}kbit"
    cmd = [*base, "tbf", "rate", rate, "burst", str(burst), "latency", "200ms"]
    return [cmd], {"rate_mbit": spec.rate_mbit}, missing


def link_argv(spec: WanSpec, peers: Sequence[PeerNs]) -> list[str]:
    """The command line of the user-space link (:mod:`benchmarks.wanlink`) for these peers and spec."""
    argv = [sys.executable, str(Path(wanlink.__file__).resolve())]
    for p in peers:
        argv += ["--peer", f"{p.netns}={p.addr}"]
    for flag, value in (
        ("--delay-ms", spec.delay_ms),
        ("--jitter-ms", spec.jitter_ms),
        ("--loss-pct", spec.loss_pct),
        ("--rate-mbit", spec.rate_mbit),
    ):
        if value:
            argv += [flag, _num(value)]
    return argv


def choose_backend(spec: WanSpec, support: Support, requested: str = "auto") -> str:
    """Which emulation applies ``spec`` here: ``"kernel"`` (tc on veth) or ``"user"`` (TUN + forwarder).

    ``auto`` takes the kernel whenever it applies the whole spec (netem, or tbf for a rate
    alone: cheaper and more precise), else the user-space link when TUN devices can be made, else
    the kernel with what it can apply (the rest is reported as not applied). Example::

        choose_backend(parse_spec("50ms"), Support(True, tbf=True, tun=True))   # "user"
    """
    if requested not in BACKENDS:
        raise WanSpecError(f"WAN backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "user" and not support.tun:
        raise WanError("the user-space link needs TUN devices (/dev/net/tun), which this host lacks")
    if requested != "auto":
        return requested
    if support.netem or not spec.needs_netem:
        return "kernel"
    return "user" if support.tun else "kernel"


def plan(
    spec: WanSpec,
    peers: int,
    *,
    tag: str | None = None,
    netem: bool = True,
    tbf: bool = True,
    backend: str = "kernel",
) -> Plan:
    """Compute the namespaces, addresses and every ``ip``/``tc`` command for ``peers`` peers.

    Kernel topology: a hub namespace holding bridge ``br0``; per peer a namespace whose ``eth0``
    is one end of a veth pair created *inside the hub* (so nothing ever appears in the host
    namespace), addressed ``10.77.0.<i+1>/24``. User topology: per peer a namespace whose
    ``eth0`` is a TUN device with the same address; the forwarder joins them. Example::

        p = plan(parse_spec("50ms,200mbit"), 2)
        p.peers[1].addr  # '10.77.0.2'
    """
    if not 2 <= peers <= MAX_PEERS:
        raise WanSpecError(f"WAN emulation takes 2 to {MAX_PEERS} peers, not {peers}")
    if backend not in ("kernel", "user"):
        raise WanSpecError(f"plan backend must be 'kernel' or 'user', not {backend!r}")
    tag = tag or str(os.getpid())
    if not re.fullmatch(r"[0-9a-z]{1,12}", tag):
        raise ValueError(f"bad namespace tag {tag!r}")
    members = tuple(PeerNs(i, f"{PREFIX}-{tag}-p{i}", f"{SUBNET}.{i + 1}") for i in range(peers))
    mtu = () if spec.mtu is None else ("mtu", str(spec.mtu))
    setup: list[tuple[str, ...]] = []
    if backend == "user":
        for p in members:
            setup += [
                ("ip", "netns", "add", p.netns),
                ("ip", "-n", p.netns, "link", "set", "lo", "up"),
                ("ip", "-n", p.netns, "tuntap", "add", "dev", "eth0", "mode", "tun"),
                ("ip", "-n", p.netns, "addr", "add", f"{p.addr}/24", "dev", "eth0"),
                ("ip", "-n", p.netns, "link", "set", "eth0", *mtu, "up"),
            ]
        teardown = tuple(("ip", "netns", "del", p.netns) for p in members)
        return Plan(
            tag=tag,
            hub=None,
            peers=members,
            setup=tuple(setup),
            shaping=(),
            teardown=teardown,
            applied=_applied(spec),
            not_applied=(),
            backend="user",
            link_argv=tuple(link_argv(spec, members)),
        )
    hub = f"{PREFIX}-{tag}-hub"
    setup += [
        ("ip", "netns", "add", hub),
        ("ip", "-n", hub, "link", "set", "lo", "up"),
        ("ip", "-n", hub, "link", "add", "br0", "type", "bridge"),
        ("ip", "-n", hub, "link", "set", "br0", "up"),
    ]
    shaping: list[tuple[str, ...]] = []
    applied: dict[str, Any] = {}
    missing: list[str] = []
    for p in members:
        setup += [
            ("ip", "netns", "add", p.netns),
            ("ip", "-n", p.netns, "link", "set", "lo", "up"),
            (
                "ip",
                "-n",
                hub,
                "link",
                "add",
                f"v{p.index}",
                *mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                p.netns,
            ),
            ("ip", "-n", hub, "link", "set", f"v{p.index}", "master", "br0"),
            ("ip", "-n", hub, "link", "set", f"v{p.index}", "up"),
            ("ip", "-n", p.netns, "addr", "add", f"{p.addr}/24", "dev", "eth0"),
            ("ip", "-n", p.netns, "link", "set", "eth0", *mtu, "up"),
        ]
        cmds, applied, missing = shaping_commands(spec, p.netns, netem=netem, tbf=tbf)
        shaping += [tuple(c) for c in cmds]
    teardown = tuple(("ip", "netns", "del", ns) for ns in [*(p.netns for p in members), hub])
    return Plan(tag, hub, members, tuple(setup), tuple(shaping), teardown, applied, tuple(missing))


# ---------------------------------------------------------------------------------------------
# What this process may do


@dataclass(frozen=True)
class Support:
    """Whether namespaces can be made here, which shaping qdiscs the kernel has, and TUN devices."""

    ok: bool
    reason: str = ""
    netem: bool = False
    tbf: bool = False
    tun: bool = False

    def describe(self) -> str:
        if not self.ok:
            return f"WAN emulation unavailable: {self.reason}"
        kinds = [k for k, v in (("netem", self.netem), ("tbf", self.tbf)) if v] or ["none"]
        user = "; user-space link (TUN): " + ("yes" if self.tun else "no")
        return f"WAN emulation available (shaping qdiscs: {', '.join(kinds)}{user})"


def _default_run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)


def has_net_admin() -> bool:
    """True when this process runs as root or holds CAP_NET_ADMIN in its effective set."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def probe_support(run: Runner = _default_run) -> Support:
    """Find out, by trying in a scratch namespace, whether WAN emulation works here and how.

    Example::

        s = probe_support()
        print(s.describe())   # e.g. "WAN emulation unavailable: needs root or CAP_NET_ADMIN"
    """
    if sys.platform != "linux":
        return Support(False, "network namespaces need Linux")
    if shutil.which("ip") is None:
        return Support(False, "the iproute2 'ip' command is not installed")
    if not has_net_admin():
        return Support(False, "needs root or CAP_NET_ADMIN to create network namespaces")
    scratch = f"{PREFIX}-{os.getpid()}-probe"
    made = run(["ip", "netns", "add", scratch])
    if made.returncode != 0:
        return Support(False, f"cannot create a network namespace: {made.stderr.strip() or made.returncode}")
    try:
        tun = (
            os.path.exists("/dev/net/tun")
            and run(["ip", "-n", scratch, "tuntap", "add", "dev", "t0", "mode", "tun"]).returncode == 0
        )
        if shutil.which("tc") is None:
            return Support(True, "the iproute2 'tc' command is not installed", tun=tun)
        run(["ip", "-n", scratch, "link", "set", "lo", "up"])
        netem = run(["tc", "-n", scratch, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        run(["tc", "-n", scratch, "qdisc", "del", "dev", "lo", "root"])
        tbf = run(
            [
                "tc",
                "-n",
                scratch,
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "tbf",
                "rate",
                "1mbit",
                "burst",
                "32kb",
                "latency",
                "50ms",
            ]
        )
        return Support(True, netem=netem.returncode == 0, tbf=tbf.returncode == 0, tun=tun)
    finally:
        run(["ip", "netns", "del", scratch])


def list_namespaces(run: Runner = _default_run) -> list[str]:
    """Names of the network namespaces ``ip netns list`` shows."""
    out = run(["ip", "netns", "list"])
    if out.returncode != 0:
        return []
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def sweep_stale(run: Runner = _default_run) -> list[str]:
    """Delete namespaces left by runs of this harness whose process is gone (e.g. after SIGKILL).

    Only names ``p2pcb-<pid>-...`` whose ``<pid>`` no longer exists are touched. Returns them.
    """
    removed = []
    for name in list_namespaces(run):
        m = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-z-]+", name)
        if not m or _pid_alive(int(m[1])):
            continue
        if run(["ip", "netns", "del", name]).returncode == 0:
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# The emulation itself


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while tearing down, so a second Ctrl-C cannot leave namespaces behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    old = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            signal.raise_signal(pending[0])


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@dataclass
class WanEmulation:
    """A context manager owning an emulated network of ``peers`` namespaces; torn down on exit.

    ``backend`` is ``"auto"`` (see :func:`choose_backend`; the environment variable
    ``P2PC_WAN_BACKEND`` overrides it), ``"kernel"`` or ``"user"``. Example::

        with WanEmulation(parse_spec("50ms,200mbit,0.1%loss"), peers=2) as net:
            server = subprocess.Popen(net.exec_argv(0, ["python", "-m", "http.server", "-b", net.addr(0)]))
            ...
        # every namespace, veth, bridge, TUN device and the forwarder are gone here,
        # also after an exception or Ctrl-C
    """

    spec: WanSpec
    peers: int = 2
    support: Support | None = None
    run: Runner = _default_run
    tag: str | None = None
    backend: str = "auto"
    plan: Plan | None = field(default=None, init=False)
    _created: list[str] = field(default_factory=list, init=False)
    _old_term: Any = field(default=None, init=False)
    _link: subprocess.Popen[str] | None = field(default=None, init=False)

    def __enter__(self) -> WanEmulation:
        support = self.support or probe_support(self.run)
        if not support.ok:
            raise WanError(support.describe())
        self.support = support
        requested = os.environ.get(BACKEND_ENV, "") if self.backend == "auto" else self.backend
        backend = choose_backend(self.spec, support, requested or "auto")
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            # SIGTERM would otherwise end the process without running __exit__: make it unwind.
            self._old_term = signal.signal(signal.SIGTERM, _terminate)
        self.plan = plan(
            self.spec, self.peers, tag=self.tag, netem=support.netem, tbf=support.tbf, backend=backend
        )
        try:
            self._apply(self.plan.setup)
            if self.plan.link_argv:
                self._start_link(self.plan.link_argv)
        except BaseException:
            self.teardown()
            self._restore_term()
            raise
        return self

    def _restore_term(self) -> None:
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None

    def _apply(self, commands: Sequence[Sequence[str]]) -> None:
        assert self.plan is not None
        for cmd in commands:
            if cmd[:3] == ("ip", "netns", "add"):
                self._created.append(cmd[3])
            done = self.run(cmd)
            if done.returncode != 0:
                if cmd[:3] == ("ip", "netns", "add"):
                    self._created.pop()
                raise WanError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.returncode}")

    # -- the user-space link's process ------------------------------------------------------

    def _start_link(self, argv: Sequence[str]) -> None:
        # Its own session: a Ctrl-C at the terminal reaches us, and we stop it in order.
        self._link = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        reply = self._link_reply()
        if reply != "ready":
            raise WanError(f"the user-space link did not start: {reply}")

    def _link_reply(self, timeout: float = _CMD_TIMEOUT) -> str:
        link = self._link
        assert link is not None
        assert link.stdout is not None
        ready, _, _ = select.select([link.stdout], [], [], timeout)
        line = link.stdout.readline().strip() if ready else ""
        if line:
            return line
        if link.poll() is None:
            return f"no answer within {timeout:.0f} s"
        err = link.stderr.read().strip().splitlines() if link.stderr else []
        return f"exit {link.returncode}: {err[-1] if err else 'no message'}"

    def _ask_link(self, command: str) -> str:
        link = self._link
        assert link is not None
        assert link.stdin is not None
        try:
            link.stdin.write(command + "\n")
            link.stdin.flush()
        except OSError as exc:
            raise WanError(f"the user-space link is gone: {exc}") from None
        return self._link_reply()

    def link_stats(self) -> dict[str, Any] | None:
        """The user-space link's counters (:class:`benchmarks.wanlink.ForwarderStats`), or ``None``
        under the kernel backend. Shows how many packets the loss really dropped.
        """
        if self._link is None:
            return None
        reply = self._ask_link("stats")
        try:
            stats: dict[str, Any] = json.loads(reply)
        except ValueError:
            raise WanError(f"the user-space link answered {reply!r} to 'stats'") from None
        return stats

    def _stop_link(self) -> list[str]:
        link, self._link = self._link, None
        if link is None:
            return []
        if link.stdin is not None:
            with contextlib.suppress(OSError):
                link.stdin.close()  # end of file: the forwarder returns
        try:
            link.wait(timeout=10)
        except subprocess.TimeoutExpired:
            link.kill()
            link.wait()
            return [f"the user-space link (pid {link.pid}) had to be killed"]
        finally:
            for pipe in (link.stdout, link.stderr):
                if pipe is not None:
                    pipe.close()
        return []

    # -- the public surface -------------------------------------------------------------------

    def shape(self) -> None:
        """Apply the spec's shaping (idempotent per emulation: call once, after any unshaped baseline)."""
        assert self.plan is not None, "use WanEmulation as a context manager"
        if self.plan.backend == "user":
            reply = self._ask_link("shape")
            if reply != "shaped":
                raise WanError(f"the user-space link did not shape: {reply}")
            return
        self._apply(self.plan.shaping)

    def teardown(self) -> list[str]:
        """Stop the link and delete every namespace this emulation made; returns failures (normally none)."""
        with _no_interrupts():
            failures = self._stop_link()
            for ns in reversed(self._created):
                done = self.run(["ip", "netns", "del", ns])
                if done.returncode != 0 and ns in list_namespaces(self.run):
                    failures.append(f"{ns}: {done.stderr.strip()}")
            self._created.clear()
        return failures

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        failures = self.teardown()
        self._restore_term()
        if failures and et is None:
            raise WanError("teardown left something behind: " + "; ".join(failures))

    def addr(self, i: int) -> str:
        assert self.plan is not None
        return self.plan.peers[i].addr

    def exec_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside peer ``i``'s namespace."""
        assert self.plan is not None
        return [*self.plan.peers[i].exec, *argv]

    def layout(self) -> dict[str, Any]:
        """The JSON-able description handed to suite processes through ``p2pcompute.benchresults.WAN_ENV``."""
        assert self.plan is not None
        assert self.support is not None
        return {
            "spec": self.spec.describe(),
            "requested": asdict(self.spec),
            "backend": self.plan.backend,
            "applied": self.plan.applied,
            "not_applied": list(self.plan.not_applied),
            "peers": [
                {"index": p.index, "netns": p.netns, "addr": p.addr, "exec": p.exec} for p in self.plan.peers
            ],
        }


# ---------------------------------------------------------------------------------------------
# The `wan` suite: raw TCP between two namespaces, unshaped then shaped

PORT = 5201
_CHUNK = 1 << 20


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed mid-transfer")
        got += n


def serve(bind: str, port: int, *, max_bytes: int = 1 << 30, idle_timeout: float = 120.0) -> None:
    """The probe's server end: ``p`` is echoed; ``b`` + 8-byte length + bytes is swallowed, acked ``k``."""
    with socket.create_server((bind, port)) as srv:
        srv.settimeout(idle_timeout)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(idle_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            hdr = bytearray(8)
            while True:
                op = conn.recv(1)
                if op in (b"", b"q"):
                    return
                if op == b"p":
                    conn.sendall(b"p")
                elif op == b"b":
                    _recv_exact(conn, memoryview(hdr))
                    left = int.from_bytes(hdr, "big")
                    if left > max_bytes:
                        raise ValueError(f"bulk of {left} bytes is over the {max_bytes} cap")
                    while left:
                        n = min(left, _CHUNK)
                        _recv_exact(conn, view[:n])
                        left -= n
                    conn.sendall(b"k")
                else:
                    raise ValueError(f"unknown op {op!r}")


def probe(
    host: str, port: int, *, pings: int, nbytes: int, reps: int, connect_timeout: float = 10.0
) -> dict[str, list[float]]:
    """The probe's client end: ``pings`` one-byte round trips, then ``reps`` bulk sends of ``nbytes``."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=2.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    out: dict[str, list[float]] = {"rtt_ms": [], "mbytes_per_s": []}
    payload = memoryview(bytearray(os.urandom(1024)) * (_CHUNK // 1024))
    with sock:
        sock.settimeout(120.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(pings):
            t = time.perf_counter()
            sock.sendall(b"p")
            if sock.recv(1) != b"p":
                raise ConnectionError("bad ping reply")
            out["rtt_ms"].append((time.perf_counter() - t) * 1e3)
        for _ in range(reps):
            t = time.perf_counter()
            sock.sendall(b"b" + nbytes.to_bytes(8, "big"))
            left = nbytes
            while left:
                n = min(left, _CHUNK)
                sock.sendall(payload[:n])
                left -= n
            if sock.recv(1) != b"k":
                raise ConnectionError("bad bulk ack")
            out["mbytes_per_s"].append(nbytes / (time.perf_counter() - t) / 1e6)
        sock.sendall(b"q")
    return out


def _measure(server: list[str], client: list[str], timeout: float) -> dict[str, list[float]]:
    """Run the probe's server and client (each argv already prefixed for its namespace); parse the figures."""
    srv = subprocess.Popen(server, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        cli = subprocess.run(client, capture_output=True, text=True, timeout=timeout, check=False)
        if cli.returncode != 0:
            raise WanError(f"probe client failed: {cli.stderr.strip()[-500:]}")
        result: dict[str, list[float]] = json.loads(cli.stdout)
        return result
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        if srv.stderr is not None:
            srv.stderr.close()


def run(
    quick: bool = False,
    *,
    wan: str = "50ms,200mbit,0.1%loss",
    mib: int | None = None,
    reps: int | None = None,
    pings: int | None = None,
) -> SuiteResult:
    """Run the ``wan`` suite: baseline ``unshaped`` then ``shaped`` with ``wan``, raw TCP between namespaces.

    Without privilege it measures plain loopback and says so in the notes. Example::

        result = run(quick=True, wan="20ms,100mbit")
    """
    spec = parse_spec(wan)
    mib = mib or (2 if quick else 64)
    reps = reps or (2 if quick else 5)
    pings = pings or (5 if quick else 30)
    nbytes = mib << 20
    result = SuiteResult(
        "wan",
        "mbytes_per_s",
        higher_is_better=True,
        options={"wan": spec.describe(), "mib": mib, "reps": reps, "pings": pings, "quick": quick},
    )
    # Worst case for the timeout: the whole transfer at a tenth of the rate (loss), plus slack.
    rate_bps = (spec.rate_mbit or 1000) * 1e6 / 8
    timeout = 60 + 10 * reps * nbytes / rate_bps + pings * (4 * spec.delay_ms / 1e3 + 1)
    me = [sys.executable, "-m", "benchmarks.wan"]

    def server(addr: str) -> list[str]:
        return [*me, "_serve", "--bind", addr, "--port", str(PORT)]

    def client(addr: str) -> list[str]:
        return [
            *me,
            "_probe",
            "--host",
            addr,
            "--port",
            str(PORT),
            "--pings",
            str(pings),
            "--bytes",
            str(nbytes),
            "--reps",
            str(reps),
        ]

    support = probe_support()
    if not support.ok:
        row = result.config("loopback", size=nbytes, path="127.0.0.1")
        row.baseline = "loopback"
        row.notes.append(support.describe() + "; measured on loopback, no shaping")
        got = _measure(server("127.0.0.1"), client("127.0.0.1"), timeout)
        for metric, vals in got.items():
            for v in vals:
                row.add(metric, v)
        print(support.describe(), "- measured plain loopback instead", flush=True)
        return result
    with WanEmulation(spec, peers=2, support=support) as net:
        assert net.plan is not None
        result.wan = net.layout()
        for name, shaped in (("unshaped", False), ("shaped", True)):
            if shaped:
                net.shape()
            applied = net.plan.applied if shaped else {}
            row = result.config(
                name,
                size=nbytes,
                path=f"{net.addr(1)} -> {net.addr(0)}",
                spec=spec.describe() if shaped else "none",
                applied=applied,
                expected_rtt_ms=2 * applied.get("delay_ms", 0.0) if shaped else None,
                expected_mbytes_per_s=applied.get("rate_mbit", 0.0) / 8 or None,
            )
            if not shaped:
                row.baseline = "unshaped"
            elif net.plan.not_applied:
                row.notes.append("not applied: " + "; ".join(net.plan.not_applied))
            srv_argv, cli_argv = net.exec_argv(0, server(net.addr(0))), net.exec_argv(1, client(net.addr(0)))
            before = net.link_stats()
            got = _measure(srv_argv, cli_argv, timeout)
            for metric, vals in got.items():
                for v in vals:
                    row.add(metric, v)
            after = net.link_stats()
            if before is not None and after is not None:
                row.notes.append(describe_link_stats(before, after))
                row.params["link"] = link_delta(before, after)
    return result


def link_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What the user-space link did between two :meth:`WanEmulation.link_stats` readings, all senders summed.

    Example::

        >>> s = lambda n, lost: {"senders": [{"offered": n, "passed": n - lost, "lost": lost, "overflow": 0,
        ...                                   "bytes_passed": 0}], "unroutable": 0, "write_errors": 0}
        >>> link_delta(s(10, 1), s(110, 2))["lost"]
        1
    """
    out: dict[str, int] = {}
    for key in ("offered", "passed", "lost", "overflow", "bytes_passed"):
        out[key] = sum(s[key] for s in after["senders"]) - sum(s[key] for s in before["senders"])
    for key in ("unroutable", "write_errors"):
        out[key] = after[key] - before[key]
    return out


def describe_link_stats(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One line on what the user-space link did during a measurement (lost share included)."""
    d = link_delta(before, after)
    share = d["lost"] / d["offered"] if d["offered"] else 0.0
    return (
        f"user-space link: {d['offered']} packets offered, {d['lost']} lost at random ({share:.2%}), "
        f"{d['overflow']} over the queue limit, {d['write_errors']} not delivered"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.wan [--quick] [--out PATH] [--wan SPEC]`` (contract 3)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode", nargs="?", default="suite", choices=["suite", "_serve", "_probe"], help=argparse.SUPPRESS
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--out", default="bench-results", help="JSON file or folder")
    parser.add_argument("--wan", default="50ms,200mbit,0.1%loss", help="shaping spec (default %(default)s)")
    parser.add_argument("--mib", type=int, default=None, help="MiB per bulk transfer")
    parser.add_argument("--reps", type=int, default=None, help="bulk transfers per config")
    parser.add_argument("--bind", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    parser.add_argument("--pings", type=int, default=None, help="ping-pong round trips per config")
    parser.add_argument("--bytes", type=int, default=1 << 20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "_serve":
        serve(args.bind, args.port)
        return 0
    if args.mode == "_probe":
        got = probe(args.host, args.port, pings=args.pings or 5, nbytes=args.bytes, reps=args.reps or 1)
        print(json.dumps(got))
        return 0
    try:
        result = run(args.quick, wan=args.wan, mib=args.mib, reps=args.reps, pings=args.pings)
    except (WanSpecError, WanError) as exc:
        print(f"wan: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, WanSpecError) else 1
    result.add_ratios()
    print_table(result)
    path = write_results(result, args.out)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "PeerNs",
    "Plan",
    "Support",
    "WanEmulation",
    "WanError",
    "WanSpec",
    "WanSpecError",
    "main",
    "parse_spec",
    "plan",
    "probe_support",
    "run",
    "shaping_commands",
    "sweep_stale",
]
