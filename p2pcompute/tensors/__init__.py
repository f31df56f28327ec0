"""The tensor data plane: encrypted, verified transfers of torch tensors between peers.

Owns the data lane (:func:`open_lane`, :class:`TensorLane`), tensor codecs and
CUDA staging. Uses :mod:`p2pcompute.wire` and the overlay's :class:`~p2pcompute.overlay.Node`
(streams to peers); imports nothing above the overlay, and never py-libp2p itself.
"""

from p2pcompute.tensors.lane import LaneStatistics as LaneStatistics
from p2pcompute.tensors.lane import TensorLane as TensorLane
from p2pcompute.tensors.lane import TransferReport as TransferReport
from p2pcompute.tensors.lane import open_lane as open_lane

__all__ = ["LaneStatistics", "TensorLane", "TransferReport", "open_lane"]
