"""The one place where py-libp2p's exceptions become p2pcompute's.

py-libp2p 0.8.1 raises many unrelated types for the same event (a refused dial may be a
``SwarmException``, an ``OSError``, a ``MultiselectClientError`` or a ``StreamFailure``),
so the overlay never catches them anywhere else. The mapping:

====================================================  ==================================
py-libp2p (or trio) raises ...                        callers see
====================================================  ==================================
anything, while dialing a peer or opening a stream    :class:`PeerUnreachable` (``peer=``)
  to it (protocol negotiation included)
time running out while dialing or opening             :class:`PeerTimeout` (``peer=``), through
                                                      :func:`p2pcompute.deadlines.deadline`
``StreamEOF``/``MuxedStreamEOF`` while reading        :class:`PeerGone` (``peer=``), "ended early"
``StreamError`` (``StreamReset``, ``StreamClosed``),  :class:`PeerGone` (``peer=``)
  ``MuxedStreamError``, ``ConnectionError``,
  ``OSError`` while reading or writing a stream
the same while closing or resetting a stream          nothing: the stream is dead anyway
anything ``multiaddr`` raises for an address          :class:`ConfigError`
anything raised for a malformed peer id               :class:`LocalProtocolError`
``OSError`` while starting to listen                  :class:`ConfigError`
====================================================  ==================================

Our own errors (:class:`~p2pcompute.errors.P2PComputeError`) pass through unchanged, as do
exceptions of other kinds while a stream is read or written (bugs stay loud).
Imports :mod:`p2pcompute.errors` and :mod:`p2pcompute.deadlines`; py-libp2p lazily.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from p2pcompute.deadlines import deadline
from p2pcompute.errors import (
    ConfigError,
    LocalProtocolError,
    P2PComputeError,
    PeerGone,
    PeerUnreachable,
)


def is_stream_failure(exc: BaseException) -> bool:
    """True for the exceptions py-libp2p raises when a stream or its connection breaks.

    Example::

        >>> is_stream_failure(ConnectionResetError())
        True
        >>> is_stream_failure(KeyError("a bug"))
        False
    """
    # Imported lazily: libp2p's exception classes live deep in its tree.
    from libp2p.network.stream.exceptions import StreamError
    from libp2p.stream_muxer.exceptions import MuxedStreamError

    return isinstance(exc, StreamError | MuxedStreamError | ConnectionError | OSError)


def _is_end_of_stream(exc: BaseException) -> bool:
    from libp2p.network.stream.exceptions import StreamEOF
    from libp2p.stream_muxer.exceptions import MuxedStreamEOF

    return isinstance(exc, StreamEOF | MuxedStreamEOF)


@contextmanager
def reaching(peer: str, what: str, *, timeout: float | None) -> Iterator[None]:
    """Dial ``peer`` or open a stream to it in the body: failures become :class:`PeerUnreachable`,
    running out of ``timeout`` seconds :class:`PeerTimeout`; both name ``peer``.

    Example::

        with reaching(peer, "dialing", timeout=5):
            await host.connect(info)
    """
    with deadline(timeout, what, peer=peer):
        try:
            yield
        except P2PComputeError:
            raise
        except Exception as exc:  # py-libp2p raises many unrelated types for one failed dial
            raise PeerUnreachable(f"{what} to {peer} failed: {_why(exc)}", peer=peer) from None


def _why(exc: Exception) -> str:
    """Our words for a failed dial or stream open; the underlying exception is kept in brackets."""
    text, kind = str(exc), exc.__class__.__name__
    if "No valid connections" in text or isinstance(exc, ConnectionRefusedError):
        return f"no connection to the peer could be made: it is gone or unreachable ({kind}: {text})"
    return f"{text or 'no reason given'} ({kind})"


@contextmanager
def stream_io(peer: str | None, what: str) -> Iterator[None]:
    """Read or write a stream in the body: an ended, reset or broken stream becomes :class:`PeerGone`.

    Example::

        with stream_io(peer, "reading"):
            chunk = await raw.read(65536)
    """
    try:
        yield
    except Exception as exc:
        if _is_end_of_stream(exc):
            raise PeerGone(f"stream with {peer} ended early ({what})", peer=peer) from None
        if is_stream_failure(exc):
            raise PeerGone(f"stream with {peer} failed ({what}): {exc!r}", peer=peer) from None
        raise


@contextmanager
def dead_stream_ok() -> Iterator[None]:
    """Close or reset a stream in the body; a stream that is already broken is not an error.

    Example::

        with dead_stream_ok():
            await raw.reset()
    """
    try:
        yield
    except Exception as exc:
        if not is_stream_failure(exc):
            raise


def parse_multiaddr(text: str) -> Any:
    """A ``multiaddr.Multiaddr``, or :class:`ConfigError` naming the bad text.

    Example::

        maddr = parse_multiaddr("/ip4/127.0.0.1/tcp/4001")
    """
    import multiaddr

    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ConfigError(f"bad multiaddr {text!r}: {exc}") from None


def peer_info(addr: str) -> Any:
    """py-libp2p's ``PeerInfo`` of a full multiaddr (``.../p2p/<id>``), or :class:`ConfigError`.

    Example::

        info = peer_info("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW...")
    """
    from libp2p.peer.peerinfo import info_from_p2p_addr

    maddr = parse_multiaddr(addr)
    try:
        return info_from_p2p_addr(maddr)
    except Exception as exc:
        raise ConfigError(f"multiaddr {addr!r} does not end in /p2p/<peer id> ({exc})") from None


def peer_of(addr: str) -> str:
    """The peer id (base58) a full multiaddr ends in, or :class:`ConfigError`.

    Example::

        peer_of("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW...")   # '12D3KooW...'
    """
    return str(peer_info(addr).peer_id.to_base58())


def to_peer_id(peer_id: str) -> Any:
    """py-libp2p's ``ID`` of a base58 peer id, or :class:`LocalProtocolError` (our caller passed junk).

    Example::

        pid = to_peer_id(node.peer_id)
    """
    from libp2p.peer.id import ID

    try:
        return ID.from_base58(peer_id)
    except Exception:
        raise LocalProtocolError(f"not a peer id: {peer_id!r}") from None


def listen_failure(exc: OSError, listen: Sequence[str]) -> ConfigError:
    """The :class:`ConfigError` for an ``OSError`` raised while the host starts listening.

    Example::

        raise listen_failure(exc, ["/ip4/0.0.0.0/tcp/4001"]) from None
    """
    return ConfigError(f"cannot listen on {', '.join(listen)}: {exc.strerror or exc}")


__all__ = [
    "dead_stream_ok",
    "is_stream_failure",
    "listen_failure",
    "parse_multiaddr",
    "peer_info",
    "peer_of",
    "reaching",
    "stream_io",
    "to_peer_id",
]
