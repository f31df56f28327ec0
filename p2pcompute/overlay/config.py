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
    Abuse: ``offence_limit`` rejected messages (not counting stale ones) before a
    peer is blacklisted.

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
        )
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        if self.advert_ttl < self.advert_interval:
            raise ConfigError("advert_ttl must be at least advert_interval")
        if self.role not in ("peer", "bootstrap"):
            raise ConfigError(f"role must be 'peer' or 'bootstrap', not {self.role!r}")
        if not 0 <= self.px_limit <= MAX_PX_ADVERTS:
            raise ConfigError(f"px_limit must be within 0..{MAX_PX_ADVERTS}")
        if self.target_connections < 0 or self.handler_queue < 1 or self.max_message_size < 1:
            raise ConfigError("target_connections, handler_queue and max_message_size must be positive")
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
    if "announce" in tuning:
        tuning["announce"] = tuple(tuning["announce"])
    return replace(NodeConfig(), **tuning).check()


__all__ = ["NodeConfig", "node_config"]
