"""A node's tuning: :class:`NodeConfig` (sans-IO; checked once, before anything starts).

Imports :mod:`p2pcompute.capacity` (the fixed capacity option), :mod:`p2pcompute.errors` and
:mod:`p2pcompute.overlay.messages`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from p2pcompute.capacity.model import Capacity
from p2pcompute.errors import ConfigError
from p2pcompute.overlay.messages import MAX_PX_ADVERTS


@dataclass(frozen=True)
class NodeConfig:
    """Tuning of a node; every field may be passed to :func:`open_node` as a keyword.

    GossipSub: ``degree``/``degree_low``/``degree_high`` (6/5/12, the values that
    delivered 100 % in notes/gossipsub-scale.md), ``heartbeat_interval`` (1 s;
    py-libp2p's default is 120 s), ``topic_rate_limit`` (messages per second per
    forwarding peer per topic before GossipSub drops them; py-libp2p's default of
    10 silently dropped adverts during joins), ``max_message_size``.
    Discovery: ``target_connections`` direct connections to non-bootstrap peers,
    ``discovery_interval``, ``dial_timeout``, ``px_limit`` adverts per exchange.
    Adverts: ``advertise``, ``role``, ``advert_interval``, ``advert_ttl``,
    ``probe_interval``, ``capacity`` (fixed, skips probing), ``announce`` (addresses
    to advertise instead of the listen addresses), ``max_skew`` (clock skew tolerated).
    Abuse (docs/design/threat-model.md explains each against its attacker):

    * ``offence_limit`` (20): rejected messages (malformed frames on any of our
      protocols, forged or malformed gossip; not stale ones) before a peer is
      blacklisted. Offences also lower the peer's GossipSub score
      (``gossip_scoring``, on: application score ``-offence_weight`` (10) per offence).
    * Peer table: ``max_peers`` (4096) entries; ``max_advert_ttl`` (900 s) caps the
      lifetime any advert gets (its own and others'); unverified entries are capped at ``table_per_ip`` (8)
      per advertised IP and ``table_per_subnet`` (32) per /24 (IPv6 /48); a relayed
      (``/p2p-circuit``) address counts under its relay, at most ``table_per_relay`` (64),
      not under the relay's IP;
      ``exempt_networks`` (loopback) are not counted by these caps nor by
      ``max_connections_per_ip``.
    * Droppers (sybils that sit in a GossipSub mesh and forward nothing): adverts (and task
      requests) are forwarded, besides the mesh, to up to ``flood_forward`` (6) more
      subscribed peers with a score of at least 0, best first. With ``dropper_misses`` N > 0,
      a mesh peer of the advert topic that missed N adverts in a row, which we had from others,
      is pruned from the mesh and scored ``-offence_weight`` per such verdict (not an offence:
      no ban). It is off by default (0): at 16 honest nodes and 64 sybils it pruned 132 peers,
      most of them honest (a node that has an advert first never gets it back from honest mesh
      peers), and honest reach after the attack fell to 0.37 against 0.85 without it. That
      measurement counted every advert; now only adverts that reached us ``dropper_late``
      (2 s) or more after they were issued count, and only against mesh peers that were in our
      mesh since before (0: the old rule). Issue times are the writers' clocks: clocks more
      than ``dropper_late`` off make honest peers look late.
    * Connections: ``max_connections`` (1000) in all, one per peer,
      ``max_connections_per_ip`` (16); the newest excess connection is closed.
    * Streams we serve: ``max_streams_per_peer`` (64) at once per peer (one connection
      per peer, so also per connection),
      ``max_streams_per_protocol`` (512) at once per protocol, and a token bucket per
      peer and protocol of ``stream_rate`` (100/s) with bursts of ``stream_burst`` (200).
      An excess stream is reset; nobody is blamed (``streams_refused``).
    * Buffers: ``max_stream_buffer`` (16 MiB + 256 KiB, yamux's largest window) of
      unread bytes per stream, ``max_connection_buffer`` (128 MiB) per connection; past
      either the connection is closed (past the stream's, the peer broke the window and
      an offence is counted). After a handler returns, at most ``max_frame`` bytes are
      read and discarded for ``dial_timeout`` seconds before the stream is reset.

    Reachability and relays (docs/design/nat.md, docs/operations.md):

    * ``reachability`` (``auto``): ``auto`` asks connected peers for a dial-back every
      ``reach_interval`` (300 s; each dial-back gives up after ``reach_timeout``, 3 s);
      ``public`` or ``private`` pins it. A private node reserves a slot at relays and
      advertises only its relayed (``/p2p-circuit``) addresses.
    * ``relay`` (off; on for bootstrap nodes): serve circuit relay v2 to others, with at
      most ``relay_reservations`` (64) reservations of ``relay_reservation_ttl`` (3600 s),
      ``relay_circuits`` (16) circuits per reserving peer, each circuit closed after
      ``relay_duration`` (3600 s) or ``relay_bytes`` (1 GiB) relayed.
    * ``hole_punch`` (on): after a relayed dial, try to upgrade the connection to a direct one
      with DCUtR (both NATs must keep the source port; it fails harmlessly otherwise).

    Example::

        config = NodeConfig(advert_interval=30.0, advert_ttl=90.0).check()
    """

    degree: int = 6
    degree_low: int = 5
    degree_high: int = 12
    heartbeat_interval: float = 1.0
    topic_rate_limit: float = 256.0
    max_message_size: int = 1 << 20
    target_connections: int = 4
    discovery_interval: float = 5.0
    dial_timeout: float = 5.0
    px_limit: int = 100
    advertise: bool = True
    role: str = "peer"
    advert_interval: float = 10.0
    advert_ttl: float = 30.0
    probe_interval: float = 5.0
    capacity: Capacity | None = None
    announce: tuple[str, ...] = ()
    max_skew: float = 10.0
    expire_interval: float = 1.0
    offence_limit: int = 20
    handler_queue: int = 256
    max_connections: int = 1000
    max_connections_per_ip: int = 16
    max_peers: int = 4096
    max_advert_ttl: float = 900.0
    table_per_ip: int = 8
    table_per_subnet: int = 32
    table_per_relay: int = 64
    exempt_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_streams_per_peer: int = 64
    max_streams_per_protocol: int = 512
    stream_rate: float = 100.0
    stream_burst: int = 200
    max_stream_buffer: int = (16 << 20) + (256 << 10)
    max_connection_buffer: int = 128 << 20
    gossip_scoring: bool = True
    offence_weight: float = 10.0
    reachability: str = "auto"
    reach_interval: float = 300.0
    reach_timeout: float = 3.0
    relay: bool = False
    hole_punch: bool = True
    relay_reservations: int = 64
    relay_circuits: int = 16
    relay_duration: int = 3600
    relay_bytes: int = 1 << 30
    relay_reservation_ttl: int = 3600
    flood_forward: int = 6
    dropper_misses: int = 0
    dropper_late: float = 2.0

    def check(self) -> NodeConfig:
        """Return ``self`` when every field is in range; raise :class:`ConfigError` otherwise.

        Example::

            NodeConfig(degree=3).check()     # ConfigError: need 1 <= degree_low <= degree ...
        """
        if not (1 <= self.degree_low <= self.degree <= self.degree_high):
            raise ConfigError("need 1 <= degree_low <= degree <= degree_high")
        positive = (
            "heartbeat_interval",
            "topic_rate_limit",
            "discovery_interval",
            "dial_timeout",
            "advert_interval",
            "advert_ttl",
            "probe_interval",
            "expire_interval",
            "max_advert_ttl",
            "stream_rate",
            "offence_weight",
            "reach_interval",
            "reach_timeout",
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        if self.advert_ttl < self.advert_interval:
            raise ConfigError("advert_ttl must be at least advert_interval")
        if self.reachability not in ("auto", "public", "private"):
            raise ConfigError(f"reachability must be auto, public or private, not {self.reachability!r}")
        if self.role not in ("peer", "bootstrap"):
            raise ConfigError(f"role must be 'peer' or 'bootstrap', not {self.role!r}")
        if not 0 <= self.px_limit <= MAX_PX_ADVERTS:
            raise ConfigError(f"px_limit must be within 0..{MAX_PX_ADVERTS}")
        if not (isinstance(self.dropper_late, (int, float)) and 0 <= self.dropper_late < 3600):
            raise ConfigError(f"dropper_late must be within [0, 3600) seconds (0: every advert counts), "
                              f"not {self.dropper_late!r}")
        if not (isinstance(self.dropper_misses, int) and self.dropper_misses >= 0):
            raise ConfigError(f"dropper_misses must be an integer >= 0 (0: off), not {self.dropper_misses!r}")
        if not (isinstance(self.flood_forward, int) and self.flood_forward >= 0):
            raise ConfigError(f"flood_forward must be an integer >= 0, not {self.flood_forward!r}")
        if self.target_connections < 0 or self.handler_queue < 1 or self.max_message_size < 1:
            raise ConfigError("target_connections, handler_queue and max_message_size must be positive")
        if self.advert_ttl > self.max_advert_ttl:
            raise ConfigError("advert_ttl must not exceed max_advert_ttl (others would cut it)")
        caps = (
            "max_connections",
            "max_connections_per_ip",
            "max_peers",
            "table_per_ip",
            "table_per_subnet",
            "table_per_relay",
            "max_streams_per_peer",
            "max_streams_per_protocol",
            "stream_burst",
            "max_stream_buffer",
            "max_connection_buffer",
            "offence_limit",
            "relay_reservations",
            "relay_circuits",
            "relay_duration",
            "relay_bytes",
            "relay_reservation_ttl",
        )
        for name in caps:
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        import ipaddress

        for net in self.exempt_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"exempt_networks: {net!r} is not a network") from None
        return self


def node_config(**tuning: Any) -> NodeConfig:
    """A checked :class:`NodeConfig` from :func:`open_node` keywords; unknown ones: :class:`ConfigError`.

    Example::

        config = node_config(role="bootstrap", announce=["/ip4/203.0.113.7/tcp/4001"])
    """
    names = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(tuning) - names)
    if unknown:
        raise ConfigError(f"unknown node option(s): {', '.join(unknown)}")
    for name in ("announce", "exempt_networks"):
        if name in tuning:
            tuning[name] = tuple(tuning[name])
    return replace(NodeConfig(), **tuning).check()


__all__ = ["NodeConfig", "node_config"]
