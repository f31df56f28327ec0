"""Reachability: does anyone outside reach us, and which of our addresses may we advertise?

Sans-IO core (:class:`Reachability`, :func:`advertisable`, the two messages) plus the thin
trio parts (:func:`serve_dial_back`, :func:`ask_dial_back`) the node runs over its overlay.

How a peer learns it (docs/design/nat.md):

* it opens ``/p2pcompute/reach/1`` to a peer it is connected to directly (a bootstrap node
  first) and sends ``reach_req {addrs}``: the addresses it would advertise;
* the server answers ``reach {observed, reached}``: the IP it sees the request come from
  (identify's "observed address") and those of ``addrs`` it could open a *fresh* TCP
  connection to. It only dials addresses on the observed IP (no one can aim our dials at a
  third party) and at most :data:`MAX_DIAL_BACKS` of them;
* one server reaching us makes us ``public``; ``confirmations`` servers that reached none
  of our addresses (typically because they saw us from a NAT's address) make us ``private``.

py-libp2p 0.8.1 ships AutoNAT v1, but its server "dials back" with ``host.connect``, which
returns at once when a connection already exists -- and one always does (the request came
over it), so every answer is "reachable". We dial back with a plain TCP connect instead.

What is advertised (:func:`advertisable`): never loopback next to other addresses (a
loopback address in an advert sends remote peers to themselves); when private, only relayed
(``/p2p-circuit``) addresses; when public, the dialed-back ones first.

Imports :mod:`p2pcompute.wire` and :mod:`p2pcompute.errors` only (the trio helpers take a
:class:`~p2pcompute.overlay.streams.FramedStream`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from p2pcompute.wire.codec import Field, Schema

if TYPE_CHECKING:
    from p2pcompute.overlay.streams import FramedStream

log = logging.getLogger(__name__)

REACH_PROTOCOL = "/p2pcompute/reach/1"
MAX_DIAL_BACKS = 8
MAX_ADDR_LEN = 512

UNKNOWN, PUBLIC, PRIVATE = "unknown", "public", "private"

REACH_REQUEST = Schema(
    "reach_req",
    1,
    max_size=MAX_DIAL_BACKS * (MAX_ADDR_LEN + 8) + 64,
    fields=(Field("addrs", list, max_len=MAX_DIAL_BACKS, item=str),),
)
REACH_REPLY = Schema(
    "reach",
    1,
    max_size=MAX_DIAL_BACKS * (MAX_ADDR_LEN + 8) + 128,
    fields=(
        Field("observed", str, optional=True, max_len=64),
        Field("reached", list, max_len=MAX_DIAL_BACKS, item=str),
    ),
)


# -- addresses (sans-IO) -----------------------------------------------------------------------------


def is_relayed(addr: str) -> bool:
    """True for a circuit-relay address. Example::

    >>> is_relayed("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWR/p2p-circuit/p2p/12D3KooWD")
    True
    """
    return "/p2p-circuit" in addr


def addr_ip(addr: str) -> str | None:
    """The IP of a direct ``/ip4`` or ``/ip6`` multiaddr (None for DNS or relayed ones). Example::

    >>> addr_ip("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooW")
    '10.0.0.2'
    """
    if is_relayed(addr):
        return None
    parts = addr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        return str(ipaddress.ip_address(parts[2]))
    except ValueError:
        return None


def addr_port(addr: str) -> int | None:
    """The TCP port of a direct multiaddr. Example::

    >>> addr_port("/ip4/10.0.0.2/tcp/4001")
    4001
    """
    parts = addr.split("/")
    if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit() and not is_relayed(addr):
        port = int(parts[4])
        return port if 0 < port < 65536 else None
    return None


def is_loopback(addr: str) -> bool:
    """True for a direct address on a loopback IP. Example::

    >>> is_loopback("/ip4/127.0.0.1/tcp/1"), is_loopback("/ip4/10.0.0.1/tcp/1")
    (True, False)
    """
    ip = addr_ip(addr)
    return ip is not None and ipaddress.ip_address(ip).is_loopback


def advertisable(
    addrs: Sequence[str],
    *,
    state: str = UNKNOWN,
    relayed: Sequence[str] = (),
    reached: Iterable[str] = (),
) -> list[str]:
    """The addresses to advertise, best first, from our direct ``addrs``, our ``relayed``
    ones (reservations at relays) and those a dial-back ``reached``.

    * loopback only when there is nothing else (a 127.0.0.1 swarm keeps working);
    * ``private``: the relayed addresses only (no one outside can open our direct ones);
      the direct ones while we hold no reservation yet (better than nothing on a LAN);
    * ``public``: dialed-back addresses first, then the rest, relayed last.

    Example::

        >>> advertisable(["/ip4/127.0.0.1/tcp/1", "/ip4/10.0.0.2/tcp/1"])
        ['/ip4/10.0.0.2/tcp/1']
        >>> relay = "/ip4/1.2.3.4/tcp/1/p2p/R/p2p-circuit"
        >>> advertisable(["/ip4/10.0.0.2/tcp/1"], state="private", relayed=[relay]) == [relay]
        True
    """
    direct = [a for a in addrs if not is_relayed(a)]
    outside = [a for a in direct if not is_loopback(a)]
    if outside:
        direct = outside
    relayed = [a for a in relayed if is_relayed(a)]
    if state == PRIVATE and relayed:
        return _unique(relayed)
    if state == PUBLIC:
        good = {_strip_p2p(a) for a in reached}
        direct = sorted(direct, key=lambda a: _strip_p2p(a) not in good)
    return _unique([*direct, *relayed])


def _strip_p2p(addr: str) -> str:
    return addr.split("/p2p/")[0] if not is_relayed(addr) else addr


def _unique(items: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def dial_back_targets(addrs: Sequence[str], observed_ip: str | None) -> list[tuple[str, str, int]]:
    """``(addr, ip, port)`` of the requested ``addrs`` a server may dial: direct TCP ones on the
    IP the request came from, at most :data:`MAX_DIAL_BACKS`. Example::

    >>> dial_back_targets(["/ip4/10.0.0.2/tcp/7", "/ip4/10.9.9.9/tcp/7"], "10.0.0.2")
    [('/ip4/10.0.0.2/tcp/7', '10.0.0.2', 7)]
    """
    if observed_ip is None:
        return []
    out: list[tuple[str, str, int]] = []
    for addr in addrs[:MAX_DIAL_BACKS]:
        ip, port = addr_ip(addr), addr_port(addr)
        if ip is not None and port is not None and ip == observed_ip:
            out.append((addr, ip, port))
    return out


def _is_loopback_ip(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


# -- verdicts (sans-IO) ------------------------------------------------------------------------------


@dataclass
class Reachability:
    """What dial-backs said about us: ``state`` is ``unknown``, ``public`` or ``private``.

    One server that reached an address of ours makes us public (the address works for the
    world that server stands for); ``confirmations`` servers that reached none make us private.
    ``observed`` maps each server to the IP it saw us at. ``manual`` pins the state (an
    operator who knows, ``--reachability``).

    Example::

        >>> r = Reachability(confirmations=1)
        >>> r.record("boot", reached=[], observed="198.51.100.4")
        'private'
        >>> r.record("other", reached=["/ip4/10.0.0.2/tcp/1"], observed="10.0.0.2")
        'public'
    """

    confirmations: int = 1
    manual: str | None = None
    results: dict[str, bool] = field(default_factory=dict)
    observed: dict[str, str] = field(default_factory=dict)
    reached: list[str] = field(default_factory=list)
    max_servers: int = 16

    @property
    def state(self) -> str:
        """``public``, ``private`` or ``unknown``."""
        if self.manual is not None:
            return self.manual
        if any(self.results.values()):
            return PUBLIC
        if sum(1 for ok in self.results.values() if not ok) >= self.confirmations:
            return PRIVATE
        return UNKNOWN

    def record(self, server: str, *, reached: Sequence[str], observed: str | None) -> str:
        """Take one server's answer; return the new state.

        A server that saw us over loopback (it runs on this machine) gives no verdict when it
        reached nothing: it only dials addresses on the IP it saw, and loopback is never one
        we advertise beside others, so its failure says nothing about the world (a peer that
        joined through a bootstrap node on 127.0.0.1 was called private and went relay-only).
        """
        if not reached and observed is not None and _is_loopback_ip(observed):
            self.forget(server)
            return self.state
        if server not in self.results and len(self.results) >= self.max_servers:
            self.results.pop(next(iter(self.results)))
        self.results[server] = bool(reached)
        if observed is not None:
            self.observed[server] = observed
        for addr in reached:
            if addr not in self.reached:
                self.reached.append(addr)
        del self.reached[:-MAX_DIAL_BACKS]
        return self.state

    def forget(self, server: str) -> None:
        """Drop a server's verdict (it left, or we ask it again)."""
        self.results.pop(server, None)
        self.observed.pop(server, None)

    def statistics(self) -> dict[str, object]:
        """``{"state", "observed": [ips], "reached": [addrs], "servers": n}`` for status output."""
        return {
            "state": self.state,
            "observed": sorted(set(self.observed.values())),
            "reached": list(self.reached),
            "servers": len(self.results),
        }


# -- trio: both sides of a dial-back ------------------------------------------------------------------


async def serve_dial_back(
    stream: FramedStream,
    observed_ip: str | None,
    *,
    timeout: float,
) -> None:
    """Answer one ``reach_req`` on ``stream``: try a fresh TCP connection to each allowed address.

    ``observed_ip`` is the IP the request came from (None over a relayed connection: then
    nothing is dialed). Example::

        node.set_stream_handler(REACH_PROTOCOL, lambda s: serve_dial_back(s, ip_of(s), timeout=3))
    """
    req = await stream.recv_msg(REACH_REQUEST)
    targets = dial_back_targets(req["addrs"], observed_ip)
    reached: list[str] = []

    async def try_one(addr: str, ip: str, port: int) -> None:
        with trio.move_on_after(timeout), contextlib.suppress(OSError):
            conn = await trio.open_tcp_stream(ip, port)
            await conn.aclose()
            reached.append(addr)

    async with trio.open_nursery() as nursery:
        for target in targets:
            nursery.start_soon(try_one, *target)
    reached.sort(key=[t[0] for t in targets].index)
    await stream.send_frame(REACH_REPLY.build(observed=observed_ip, reached=reached))


async def ask_dial_back(stream: FramedStream, addrs: Sequence[str]) -> tuple[list[str], str | None]:
    """Send our ``addrs`` on an open ``/p2pcompute/reach/1`` stream; return ``(reached, observed_ip)``.

    Example::

        reached, observed = await ask_dial_back(await node.open_stream(boot, REACH_PROTOCOL), addrs)
    """
    direct = [a.split("/p2p/")[0] for a in addrs if addr_port(a) is not None][:MAX_DIAL_BACKS]
    await stream.send_frame(REACH_REQUEST.build(addrs=[a for a in direct if len(a) <= MAX_ADDR_LEN]))
    reply = await stream.recv_msg(REACH_REPLY)
    asked = set(direct)
    reached = [a for a in reply["reached"] if a in asked]  # a server can only confirm what we asked
    observed = reply["observed"]
    if observed is not None:
        try:
            observed = str(ipaddress.ip_address(observed))
        except ValueError:
            observed = None
    return reached, observed


__all__ = [
    "MAX_DIAL_BACKS",
    "PRIVATE",
    "PUBLIC",
    "REACH_PROTOCOL",
    "REACH_REPLY",
    "REACH_REQUEST",
    "UNKNOWN",
    "Reachability",
    "addr_ip",
    "addr_port",
    "advertisable",
    "ask_dial_back",
    "dial_back_targets",
    "is_loopback",
    "is_relayed",
    "serve_dial_back",
]
