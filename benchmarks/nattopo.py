"""Home routers in network namespaces: public hosts, NATs made with ``nft`` masquerade, hosts behind them.

Used by tests/test_nat_topology.py and ``python -m benchmarks.natpaths``. The layout::

    "internet": a bridge in namespace <tag>-net, 198.51.100.0/24 (TEST-NET-2)
      boot  198.51.100.10      public (bootstrap and relay)
      pub   198.51.100.11      public peer
      nat1  198.51.100.21  --  10.1.0.0/24: a 10.1.0.2, j 10.1.0.3   (port-preserving masquerade)
      nat2  198.51.100.22  --  10.2.0.0/24: b 10.2.0.2               (port-preserving masquerade)
      nat3  198.51.100.23  --  10.3.0.0/24: c 10.3.0.2               (masquerade fully-random:
                                                                     a new port per connection,
                                                                     the "symmetric" NAT kind)

Each router forwards only what its LAN opened (``ct state established,related``), so an inbound
connection to a NATed host is impossible; public hosts have no route to 10.0.0.0/8 at all. Like
most home routers, a router drops unsolicited packets to its own WAN address silently instead of
answering with a TCP reset: a reset would kill the other side's half of a hole punch (TCP
simultaneous open) before the NATed host's own SYN has left.
:func:`plan` is sans-IO (commands as argv tuples); :class:`NatTopology` runs them and always tears
down what it made. Needs root (CAP_NET_ADMIN), ``ip`` and ``nft``: :func:`unavailable` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

WAN = "198.51.100"


@dataclass(frozen=True)
class Box:
    """One host of the topology: its role name, namespace, IP, and the router it sits behind."""

    name: str
    netns: str
    ip: str
    router: str | None = None

    @property
    def public(self) -> bool:
        return self.router is None

    def exec(self) -> list[str]:
        """The argv prefix that runs a command inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns]


ROUTERS = {"nat1": (21, 1, False), "nat2": (22, 2, False), "nat3": (23, 3, True)}  # wan, lan, symmetric
PUBLIC = {"boot": 10, "pub": 11}
PRIVATE = {"a": ("nat1", 2), "j": ("nat1", 3), "b": ("nat2", 2), "c": ("nat3", 2)}


def nft_rules(symmetric: bool) -> str:
    """The router's ruleset: masquerade out of ``eth0``, forward only what the LAN opened."""
    mode = " fully-random" if symmetric else ""
    return (
        "table ip nat {\n"
        "  chain masq { type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "eth0" masquerade{mode}\n'
        "  }\n"
        "}\n"
        "table inet filter {\n"
        "  chain lanfwd { type filter hook forward priority filter; policy drop;\n"
        "    ct state established,related accept\n"
        '    iifname "lan" oifname "eth0" accept\n'
        "  }\n"
        "  chain wanin { type filter hook input priority filter; policy accept;\n"
        '    iifname "eth0" ct state new drop\n'
        "  }\n"
        "}\n"
    )


def plan(tag: str) -> tuple[dict[str, Box], list[tuple[str, ...]], list[tuple[str, ...]], dict[str, str]]:
    """``(boxes, setup, teardown, nft)``: the hosts by name, the commands that build and remove the
    topology, and each router namespace's nft ruleset. Example::

        >>> boxes, setup, teardown, nft = plan("t1")
        >>> boxes["c"].ip, boxes["c"].router, len(teardown)
        ('10.3.0.2', 'nat3', 10)
    """
    hub = f"{tag}-net"
    boxes: dict[str, Box] = {}
    setup: list[tuple[str, ...]] = [("ip", "netns", "add", hub), ("ip", "-n", hub, "link", "set", "lo", "up")]
    setup += [
        ("ip", "-n", hub, "link", "add", "br0", "type", "bridge"),
        ("ip", "-n", hub, "link", "set", "br0", "up"),
    ]
    nft: dict[str, str] = {}

    def wan_link(name: str, ns: str, ip: str) -> None:
        setup.extend(
            [
                ("ip", "netns", "add", ns),
                ("ip", "-n", ns, "link", "set", "lo", "up"),
                ("ip", "-n", hub, "link", "add", f"w-{name}", "type", "veth", *_peer_eth0(ns)),
                ("ip", "-n", hub, "link", "set", f"w-{name}", "master", "br0", "up"),
                ("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"),
                ("ip", "-n", ns, "link", "set", "eth0", "up"),
            ]
        )

    for name, last in PUBLIC.items():
        ns = f"{tag}-{name}"
        wan_link(name, ns, f"{WAN}.{last}")
        boxes[name] = Box(name, ns, f"{WAN}.{last}")
    for name, (last, lan, symmetric) in ROUTERS.items():
        ns = f"{tag}-{name}"
        wan_link(name, ns, f"{WAN}.{last}")
        setup.extend(
            [
                ("ip", "-n", ns, "link", "add", "lan", "type", "bridge"),
                ("ip", "-n", ns, "addr", "add", f"10.{lan}.0.1/24", "dev", "lan"),
                ("ip", "-n", ns, "link", "set", "lan", "up"),
                ("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
            ]
        )
        nft[ns] = nft_rules(symmetric)
        boxes[name] = Box(name, ns, f"{WAN}.{last}")
    for name, (router, last) in PRIVATE.items():
        ns, rns = f"{tag}-{name}", f"{tag}-{router}"
        lan = ROUTERS[router][1]
        ip = f"10.{lan}.0.{last}"
        setup.extend(
            [
                ("ip", "netns", "add", ns),
                ("ip", "-n", ns, "link", "set", "lo", "up"),
                ("ip", "-n", rns, "link", "add", f"l-{name}", "type", "veth", *_peer_eth0(ns)),
                ("ip", "-n", rns, "link", "set", f"l-{name}", "master", "lan", "up"),
                ("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"),
                ("ip", "-n", ns, "link", "set", "eth0", "up"),
                ("ip", "-n", ns, "route", "add", "default", "via", f"10.{lan}.0.1"),
            ]
        )
        boxes[name] = Box(name, ns, ip, router)
    namespaces = [hub, *(b.netns for b in boxes.values())]
    teardown: list[tuple[str, ...]] = [("ip", "netns", "del", ns) for ns in namespaces]
    return boxes, setup, teardown, nft


def _peer_eth0(ns: str) -> tuple[str, ...]:
    return ("peer", "name", "eth0", "netns", ns)


def unavailable() -> str | None:
    """Why namespaces with NAT cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    probe = f"p2pcnat-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        ok = subprocess.run(
            ["ip", "netns", "exec", probe, "nft", "-f", "-"],
            input=nft_rules(True),
            capture_output=True,
            text=True,
            check=False,
        )
        if ok.returncode != 0:
            return f"nft masquerade is not available: {ok.stderr.strip()[:200]}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


class NatTopology:
    """Build the topology of :func:`plan` for a ``with`` block; always removes it afterwards.

    Example::

        with NatTopology() as topo:
            subprocess.run([*topo.boxes["a"].exec(), "ping", "-c1", "198.51.100.10"])
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"p2pcnat{os.getpid() % 100000}"
        self.boxes, self._setup, self._teardown, self._nft = plan(self.tag)

    def __enter__(self) -> NatTopology:
        try:
            for cmd in self._setup:
                _run(cmd)
            for ns, rules in self._nft.items():
                _run(("ip", "netns", "exec", ns, "nft", "-f", "-"), stdin=rules)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace (their links and rules go with them)."""
        for cmd in self._teardown:
            subprocess.run(cmd, capture_output=True, check=False)


def _run(cmd: Sequence[str], *, stdin: str | None = None) -> None:
    done = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


__all__ = ["Box", "NatTopology", "nft_rules", "plan", "unavailable"]
