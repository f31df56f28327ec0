"""p2pcompute: peer-to-peer GPU compute for PyTorch, pure Python and trio-native.

The public surface is what this module exports; everything else is internal.
"""

from p2pcompute.errors import BadSignature as BadSignature
from p2pcompute.errors import ConfigError as ConfigError
from p2pcompute.errors import IntegrityError as IntegrityError
from p2pcompute.errors import KeyFileError as KeyFileError
from p2pcompute.errors import LocalProtocolError as LocalProtocolError
from p2pcompute.errors import MalformedMessage as MalformedMessage
from p2pcompute.errors import MessageTooLarge as MessageTooLarge
from p2pcompute.errors import P2PComputeError as P2PComputeError
from p2pcompute.errors import PeerError as PeerError
from p2pcompute.errors import PeerGone as PeerGone
from p2pcompute.errors import PeerTimeout as PeerTimeout
from p2pcompute.errors import PeerUnreachable as PeerUnreachable
from p2pcompute.errors import ProtocolError as ProtocolError
from p2pcompute.errors import RemoteProtocolError as RemoteProtocolError
from p2pcompute.errors import ResourceLimitExceeded as ResourceLimitExceeded
from p2pcompute.errors import StaleMessage as StaleMessage
from p2pcompute.errors import TaskFailed as TaskFailed
from p2pcompute.errors import UnsupportedVersion as UnsupportedVersion
from p2pcompute.identity import Identity as Identity

__version__ = "0.1.0"

__all__ = [
    "BadSignature",
    "ConfigError",
    "Identity",
    "IntegrityError",
    "KeyFileError",
    "LocalProtocolError",
    "MalformedMessage",
    "MessageTooLarge",
    "P2PComputeError",
    "PeerError",
    "PeerGone",
    "PeerTimeout",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "ResourceLimitExceeded",
    "StaleMessage",
    "Swarm",
    "TaskFailed",
    "UnsupportedVersion",
]


def __getattr__(name: str) -> object:
    # `p2pcompute.Swarm` is imported on first use so that `import p2pcompute` stays light
    # (the training stack pulls in torch, py-libp2p and the collective).
    if name == "Swarm":
        from p2pcompute.training.swarm import Swarm

        return Swarm
    raise AttributeError(f"module 'p2pcompute' has no attribute {name!r}")
