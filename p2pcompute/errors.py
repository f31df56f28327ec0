"""The exception hierarchy callers see.

Every error p2pcompute raises on purpose derives from :class:`P2PComputeError`.
Blame is typed: :class:`RemoteProtocolError` means a peer sent something wrong
and names that peer (``err.peer``) so it can feed the peer's score;
:class:`LocalProtocolError` means our own code misused a protocol object.
Raw py-libp2p and trio exceptions are translated at the boundary of each layer.

This module imports nothing of ours.
"""

from __future__ import annotations


class P2PComputeError(Exception):
    """Base class of every error p2pcompute raises on purpose."""


class ConfigError(P2PComputeError):
    """Bad local input: a malformed multiaddr, an unreadable key file, a bad option."""


class KeyFileError(ConfigError):
    """The identity key file is unreadable, malformed, or readable by others."""


class ProtocolError(P2PComputeError):
    """A message or stream broke the protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol does not allow.

    ``peer`` is the peer id (base58) at fault, or ``None`` when unknown
    (for example bytes read from an unauthenticated socket).
    """

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        self.peer = peer
        where = f" (peer {peer})" if peer else ""
        super().__init__(f"{message}{where}")


class MalformedMessage(RemoteProtocolError):
    """Bytes that do not decode, do not match the schema, or exceed a size cap."""


class MessageTooLarge(MalformedMessage):
    """A message or frame longer than the cap for its type."""


class UnsupportedVersion(MalformedMessage):
    """A message with a protocol version we do not speak."""


class BadSignature(RemoteProtocolError):
    """A signature that does not verify, or a signer that is not who sent it."""


class StaleMessage(RemoteProtocolError):
    """An expired message, or one whose sequence number we have already seen."""


class IntegrityError(RemoteProtocolError):
    """Payload bytes whose digest, length, order or authentication tag is wrong."""


class WorkRejected(RemoteProtocolError):
    """Work a provider returned that failed the requester's check (a re-run of it disagreed).

    Raised by a ``check`` given to :meth:`~p2pcompute.tasks.TaskService.map_tasks`: no
    receipt is signed for that work and the provider is set aside.
    """


class PeerError(P2PComputeError):
    """Base of the errors about another peer that are *not* its fault (unreachable, slow, gone, busy).

    ``peer`` names that peer (base58) when known. Nothing here is counted against a peer's score.
    """

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        self.peer = peer
        super().__init__(message)


class PeerUnreachable(PeerError):
    """No connection could be made to a peer (or to any bootstrap node)."""


class PeerTimeout(PeerError):
    """A peer did not answer within the time allowed."""


class PeerGone(PeerError):
    """A peer closed or reset the connection before the operation finished."""


class ResourceLimitExceeded(P2PComputeError):
    """A cap (memory, parked transfers, leases, slots) would be exceeded.

    Raised locally when *we* refuse work, and on the sending side when a peer refused our work
    because *it* is full (``peer`` names it). A refusal for want of room is honest: it is never
    blamed on the peer that said it, unlike :class:`RemoteProtocolError`. ``retryable`` is
    false when trying again cannot help (the work is over a fixed cap, not a passing shortage).
    """

    def __init__(self, message: str, *, peer: str | None = None, retryable: bool = True) -> None:
        self.peer = peer
        self.retryable = retryable
        super().__init__(message)


class TaskFailed(P2PComputeError):
    """A remote task ended with an error, was cancelled, or could not be placed."""
