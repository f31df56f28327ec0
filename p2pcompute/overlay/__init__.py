"""The overlay: py-libp2p host, GossipSub topics, discovery and the peer table.

Public surface: :func:`open_node`, :class:`Node`, :class:`NodeConfig`,
:class:`PeerTable`, :class:`PeerRecord`, :class:`FramedStream`.

Uses :mod:`p2pcompute.wire`, :mod:`p2pcompute.identity`, :mod:`p2pcompute.capacity`
(sans-IO model and adverts, which the overlay carries) and :mod:`p2pcompute.errors`.
"""

from p2pcompute.overlay.node import Node as Node
from p2pcompute.overlay.node import NodeConfig as NodeConfig
from p2pcompute.overlay.node import open_node as open_node
from p2pcompute.overlay.streams import FramedStream as FramedStream
from p2pcompute.overlay.table import PeerRecord as PeerRecord
from p2pcompute.overlay.table import PeerTable as PeerTable
