"""Peer-exchange messages and overlay naming rules (sans-IO).

Peer exchange (``/p2pcompute/<swarm>/peers/1.0.0``) is a push-pull of signed adverts
over one stream: the dialer sends ``peers_req`` (its own advert, if it advertises,
and how many adverts it wants); the listener answers ``peers`` (its own advert
first, then a sample of live peers' adverts, the peers it verified first, with ``vouched``
saying how many those are) and closes. Each advert is
checked on arrival exactly like one received by GossipSub, so a list is only as
trustworthy as the signatures inside it, never as the peer that sent it.

Imports :mod:`p2pcompute.wire`, :mod:`p2pcompute.capacity` and :mod:`p2pcompute.errors`.
"""

from __future__ import annotations

import re

from p2pcompute.capacity.adverts import MAX_ADVERT_SIZE
from p2pcompute.errors import ConfigError
from p2pcompute.wire.codec import Field, Schema

MAX_PX_ADVERTS = 256
MAX_PX_RESPONSE = 2 * 1024 * 1024

PEERS_REQUEST = Schema(
    "peers_req",
    1,
    max_size=MAX_ADVERT_SIZE + 256,
    fields=(
        Field("limit", int, min=0, max=MAX_PX_ADVERTS),
        Field("advert", bytes, optional=True, max_len=MAX_ADVERT_SIZE),
    ),
)

PEERS_RESPONSE = Schema(
    "peers",
    1,
    max_size=MAX_PX_RESPONSE,
    fields=(
        Field("adverts", list, max_len=MAX_PX_ADVERTS, item=bytes),
        # how many adverts after the responder's own are of peers it has verified (held a
        # connection to, no offence); omitted when none. A requester trusts this only from
        # its bootstrap nodes (docs/design/threat-model.md).
        Field("vouched", int, optional=True, min=1, max=MAX_PX_ADVERTS),
    ),
)

_SWARM_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")


def check_swarm(name: str) -> str:
    """A swarm name is 1-64 characters of ``[A-Za-z0-9_.-]``; raises :class:`ConfigError` otherwise.

    Example::

        >>> check_swarm("lab-1")
        'lab-1'
    """
    if not isinstance(name, str) or not _SWARM_RE.match(name):
        raise ConfigError(f"bad swarm name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return name


def topic_name(swarm: str, topic: str) -> str:
    """The GossipSub topic id of a short topic name within a swarm.

    Example::

        >>> topic_name("lab", "tasks/1")
        '/p2pcompute/lab/t/tasks/1'
    """
    if not _TOPIC_RE.match(topic) or topic.startswith("/") or ".." in topic:
        raise ConfigError(f"bad topic name {topic!r}")
    return f"/p2pcompute/{swarm}/t/{topic}"


def advert_topic(swarm: str) -> str:
    """The GossipSub topic carrying capacity adverts."""
    return f"/p2pcompute/{swarm}/adverts/1"


def peers_protocol(swarm: str) -> str:
    """The stream protocol id of peer exchange."""
    return f"/p2pcompute/{swarm}/peers/1.0.0"


__all__ = [
    "MAX_PX_ADVERTS",
    "PEERS_REQUEST",
    "PEERS_RESPONSE",
    "advert_topic",
    "check_swarm",
    "peers_protocol",
    "topic_name",
]
