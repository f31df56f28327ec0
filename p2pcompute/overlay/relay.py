"""Circuit relay v2 through py-libp2p: serving as a relay, reserving a slot, dialing through one.

Every node accepts relayed connections (the relay protocol's "stop" side); a node with
``relay=True`` (bootstrap nodes, and public peers started with ``--relay``) also relays for
others ("hop"), within the limits of :class:`~p2pcompute.overlay.config.NodeConfig`. A node
that finds itself private reserves a slot at relays it is connected to and advertises
``<relay addr>/p2p-circuit/p2p/<its id>``; others dial that address through
:meth:`CircuitRelay.dial`. Every relayed dial then tries to hole-punch a direct connection with
py-libp2p's DCUtR (:meth:`CircuitRelay.punch`): both peers dial each other's predicted public
address (the IP a dial-back server saw, our listen port) at once, from the listen port. Behind
port-preserving NATs that yields a direct TCP connection; behind a symmetric NAT it fails and the
relayed connection stays. docs/design/nat.md lists the py-libp2p defects worked around here.

Only the overlay imports this module (it imports py-libp2p).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from p2pcompute.errors import PeerUnreachable
from p2pcompute.overlay.config import NodeConfig
from p2pcompute.overlay.failures import parse_multiaddr, to_peer_id

log = logging.getLogger(__name__)


class CircuitRelay:
    """py-libp2p's circuit relay v2 on one host: ``hop`` when ``config.relay``, always ``stop``.

    ``reservations`` maps a relay's peer id to the circuit address we advertise through it.

    Example::

        relay = CircuitRelay(stack.host, config)
        async with relay.run():
            addr = await relay.reserve(relay_peer, relay_addr)
            conn_peer = await relay.dial(circuit_addr)
    """

    def __init__(self, host: Any, config: NodeConfig) -> None:
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.resources import RelayLimits
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport

        self.host = host
        self.hop = config.relay
        self.limits = RelayLimits(
            duration=config.relay_duration,
            data=config.relay_bytes,
            max_circuit_conns=config.relay_circuits,
            max_reservations=config.relay_reservations,
            reservation_ttl=config.relay_reservation_ttl,
        )
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if self.hop else RelayRole.STOP)
        self.protocol: Any = _relay_protocol(CircuitV2Protocol)(host, self.limits, allow_hop=self.hop)
        relay_config = RelayConfig(roles=roles, limits=self.limits)
        self.transport: Any = CircuitV2Transport(host, self.protocol, relay_config)
        self.reservations: dict[str, str] = {}
        self.stats = {
            "reservations_made": 0,
            "reservations_failed": 0,
            "relayed_dials": 0,
            "punched": 0,
            "punch_failed": 0,
        }
        # Hole punching (DCUtR). ``observed_ips`` gives the public IPs dial-back servers saw us
        # at (the node sets it; py-libp2p's own observed-address book is off in our hosts).
        self.hole_punch = config.hole_punch
        self.observed_ips: Callable[[], list[str]] = list
        self.punched: set[str] = set()  # peers we hold a hole-punched direct connection to
        self.dcutr: Any = _hole_puncher(host, self, config.dial_timeout) if self.hole_punch else None
        self._punch_timeout = 4 * config.dial_timeout + 10.0
        self._nursery: trio.Nursery | None = None

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Serve the relay protocols (and DCUtR) for the block. Example::

        async with relay.run(): ...
        """
        from libp2p.tools.anyio_service import background_trio_service

        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.protocol))
            if self.dcutr is not None:
                await stack.enter_async_context(background_trio_service(self.dcutr))
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            try:
                yield
            finally:
                self._nursery.cancel_scope.cancel()
                self._nursery = None

    async def punch(self, peer: str) -> bool:
        """Try to upgrade our relayed connection to ``peer`` to a direct one (DCUtR); True on
        success (``peer`` is then in :attr:`punched`). Never raises for a failed punch.

        Example::

            if await relay.punch(peer): print("direct now")
        """
        if self.dcutr is None:
            return False
        ok = False
        with trio.move_on_after(self._punch_timeout):
            try:
                ok = bool(await self.dcutr.initiate_hole_punch(to_peer_id(peer)))
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except Exception as exc:  # py-libp2p raises assorted types; a failed punch is not fatal
                log.info("hole punch to %s failed: %s: %s", peer, type(exc).__name__, exc)
        self._punch_done(peer, ok)
        return ok

    def _punch_done(self, peer: str, ok: bool) -> None:
        if ok:
            if peer not in self.punched:
                self.stats["punched"] += 1
            self.punched.add(peer)
        else:
            self.stats["punch_failed"] += 1

    def served(self) -> int:
        """How many reservations we hold for others (a relay's load)."""
        manager = self.protocol.resource_manager
        return len(getattr(manager, "_reservations", {}) or {})

    async def reserve(self, relay_peer: str, relay_addr: str, *, timeout: float) -> str | None:
        """Reserve a slot at ``relay_peer`` (connected, or dialable at ``relay_addr``); return the
        circuit address to advertise, or None when the relay refused or failed.

        Example::

            circuit = await relay.reserve(boot_id, "/ip4/203.0.113.7/tcp/4001", timeout=10)
        """
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID

        pid = to_peer_id(relay_peer)
        ok = False
        with trio.move_on_after(timeout):
            try:
                stream = await self.host.new_stream(pid, [PROTOCOL_ID])
                try:
                    ok = await self.transport._make_reservation(stream, pid)
                finally:
                    with contextlib.suppress(Exception):
                        await stream.close()
            except Exception as exc:  # py-libp2p raises assorted types; a failed reservation is not fatal
                log.info("reservation at relay %s failed: %s: %s", relay_peer, type(exc).__name__, exc)
        if not ok:
            self.stats["reservations_failed"] += 1
            self.reservations.pop(relay_peer, None)
            return None
        self.stats["reservations_made"] += 1
        base = relay_addr.split("/p2p/")[0]
        circuit = f"{base}/p2p/{relay_peer}/p2p-circuit"
        self.reservations[relay_peer] = circuit
        return circuit

    async def dial(self, circuit_addr: str, peer: str) -> None:
        """Connect to ``peer`` through the relay named in ``circuit_addr``
        (``<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<peer>]``). Raises :class:`PeerUnreachable`.

        Example::

            await relay.dial("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWR/p2p-circuit", peer)
        """
        from libp2p.peer.peerinfo import PeerInfo

        full = circuit_addr if circuit_addr.endswith(f"/p2p/{peer}") else f"{circuit_addr}/p2p/{peer}"
        maddr = parse_multiaddr(full)
        pid = to_peer_id(peer)
        try:
            raw = await self.transport._dial_via_circuit_addr(maddr, PeerInfo(pid, [maddr]))
            await self.host.upgrade_outbound_connection(raw, pid)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise PeerUnreachable(f"relayed dial to {peer} failed: {why}", peer=peer) from None
        self.stats["relayed_dials"] += 1
        if self._nursery is not None and self.dcutr is not None:
            self._nursery.start_soon(self.punch, peer)  # meanwhile the relayed connection serves


class _NoBook(dict):  # type: ignore[type-arg]
    """A dict that keeps nothing: py-libp2p's per-peer circuit book, disabled (see below)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        return None


def _relay_protocol(base: Any) -> Any:
    """py-libp2p's ``CircuitV2Protocol`` with its per-peer circuit book disabled.

    0.8.1 files every circuit under one peer id (``_active_relays[peer]``); when a circuit ends,
    its cleanup closes whatever streams are filed under that id, which may belong to another,
    live circuit to the same peer (two peers that dial each other at once through the relay: the
    duplicate connection is closed, and takes the kept one's streams with it). Here each relay
    direction only half-closes its own destination when its source ends; resets travel as usual.
    """

    class Relay(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._active_relays = _NoBook()

        async def _relay_data(self, src_stream: Any, dst_stream: Any, *args: Any, **kwargs: Any) -> None:
            try:
                await super()._relay_data(src_stream, dst_stream, *args, **kwargs)
            finally:
                # the stream may be gone already
                with trio.CancelScope(shield=True), trio.move_on_after(5), contextlib.suppress(Exception):
                    await dst_stream.close()

    return Relay


def _hole_puncher(host: Any, relay: CircuitRelay, dial_timeout: float) -> Any:
    """py-libp2p's ``DCUtRProtocol`` with our predicted addresses and without its polling loop.

    * 0.8.1 predicts our public address from the host's observed-address book; our hosts turn
      identify's address discovery off, so we give it ``<IP a dial-back server saw>/tcp/<our
      listen port>`` (its own prediction rule: hole-punch dials leave from the listen port and a
      port-preserving NAT keeps it).
    * Its ``_auto_drive_loop`` wakes every 2 s to look for relayed connections; we start a punch
      after each relayed dial instead (an idle node sleeps).
    * Both sides record a punched peer (the responder learns it in ``_perform_hole_punch``).
    """
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
    from multiaddr import Multiaddr

    class HolePuncher(DCUtRProtocol):  # type: ignore[misc]
        async def _auto_drive_loop(self) -> None:
            await trio.sleep_forever()

        async def _get_observed_addrs(self) -> list[bytes]:
            ports: list[int] = []
            for addr in host.get_addrs():
                text = str(addr)
                if "/tcp/" in text and "/p2p-circuit" not in text:
                    port = int(text.split("/tcp/")[1].split("/")[0])
                    if port not in ports:
                        ports.append(port)
            out = [
                Multiaddr(f"/ip{6 if ':' in ip else 4}/{ip}/tcp/{port}").to_bytes()
                for ip in relay.observed_ips()[:4]
                for port in ports[:2]
            ]
            return out or list(await super()._get_observed_addrs())

        async def _perform_hole_punch(self, peer_id: Any, *args: Any, **kwargs: Any) -> bool:
            ok = bool(await super()._perform_hole_punch(peer_id, *args, **kwargs))
            if ok:
                relay._punch_done(str(peer_id.to_base58()), True)
            return ok

    return HolePuncher(host, dial_timeout=max(1, round(dial_timeout)))  # its default: 10 s per dial


def is_relayed_connection(conn: Any) -> bool:
    """True when a py-libp2p ``SwarmConn`` runs through a relay. Example::

    is_relayed_connection(conn)     # False for a plain TCP connection
    """
    try:
        addrs = conn.get_transport_addresses() or []
    except Exception:
        return False
    return any("/p2p-circuit" in str(a) for a in addrs)


__all__ = ["CircuitRelay", "is_relayed_connection"]
