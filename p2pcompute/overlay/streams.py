"""Length-prefixed frames over a py-libp2p stream, with caps and typed errors.

A frame is a 4-byte big-endian length followed by that many bytes. The length is
checked against the caller's cap before anything is buffered, so a peer cannot
make us allocate more than we agreed to (:class:`~p2pcompute.errors.MessageTooLarge`).
py-libp2p's stream exceptions become :class:`~p2pcompute.errors.PeerGone` naming the
peer, through :mod:`p2pcompute.overlay.failures`; callers never see libp2p internals.

py-libp2p 0.8.1 resets a yamux writer whose reader pauses for more than 5 s
(notes: pitfall P2), so readers of long transfers must keep draining.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any, Protocol

from p2pcompute.deadlines import deadline
from p2pcompute.errors import MessageTooLarge, PeerGone, RemoteProtocolError
from p2pcompute.overlay.failures import dead_stream_ok, stream_io
from p2pcompute.wire.codec import Schema, decode, encode

_LEN = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20


class RawStream(Protocol):
    """What we need of a py-libp2p ``INetStream``."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


#: A started frame must arrive at this rate at least, after a grace of FRAME_GRACE seconds: slow
#: enough for any honest link (64 KiB/s), fast enough that a stranger cannot park half-sent frames.
FRAME_GRACE = 10.0
FRAME_MIN_RATE = 64 * 1024


def frame_deadline(nbytes: int) -> float:
    """Seconds allowed for the rest of a started frame of ``nbytes`` bytes to arrive.

    Example::

        >>> frame_deadline(1 << 20)
        26.0
    """
    return FRAME_GRACE + nbytes / FRAME_MIN_RATE


class ByteTally:
    """Bytes moved on a node's framed streams, by protocol (for metrics; see ``Node.statistics``).

    Only protocols this node serves or opens appear, so a peer cannot grow it with made-up names.

    Example::

        tally = ByteTally()
        tally.count("/p2pcompute/echo/1", received=10, sent=0)
        tally.snapshot()     # {'/p2pcompute/echo/1': {'received': 10, 'sent': 0}}
    """

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()

    def count(self, protocol: str, *, received: int = 0, sent: int = 0) -> None:
        """Add ``received`` and ``sent`` bytes to ``protocol``'s totals."""
        self.received[protocol] += received
        self.sent[protocol] += sent

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per protocol, the bytes received and sent so far."""
        return {
            proto: {"received": self.received[proto], "sent": self.sent[proto]}
            for proto in sorted(set(self.received) | set(self.sent))
        }


class FramedStream:
    """A py-libp2p stream carrying capped, length-prefixed frames.

    ``peer`` names the remote side in errors; with a ``tally`` the bytes read and written are
    counted under ``protocol``.

    Example::

        stream = FramedStream(await host.new_stream(peer_id, [PROTO]), peer=str(peer_id))
        await stream.send_msg({"t": "hello", "v": 1})
        reply = await stream.recv_msg(HELLO_ACK)       # validated against a Schema
        await stream.close()
    """

    def __init__(
        self,
        stream: RawStream,
        *,
        peer: str | None,
        max_frame: int = DEFAULT_MAX_FRAME,
        protocol: str = "",
        tally: ByteTally | None = None,
    ):
        self.raw = stream
        self.peer = peer
        self.max_frame = max_frame
        self.protocol = protocol
        self.tally = tally
        self._buf = bytearray()

    async def _read_chunk(self, n: int) -> bytes:
        with stream_io(self.peer, "reading"):
            chunk = await self.raw.read(n)
        if not chunk:
            raise PeerGone(f"stream with {self.peer} ended early (reading)", peer=self.peer)
        if self.tally is not None:
            self.tally.count(self.protocol, received=len(chunk))
        return chunk

    async def read_exactly_into(self, buf: memoryview) -> None:
        """Fill ``buf`` with the next ``len(buf)`` raw bytes of the stream (no framing).

        Raises :class:`PeerGone` when the stream ends or fails first.
        """
        need = len(buf)
        while len(self._buf) < need:
            self._buf += await self._read_chunk(max(need - len(self._buf), 65536))
        buf[:] = memoryview(self._buf)[:need]
        del self._buf[:need]

    async def _read_exactly(self, n: int) -> bytes:
        out = bytearray(n)
        await self.read_exactly_into(memoryview(out))
        return bytes(out)

    async def write_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Write bytes as they are (no length prefix); :class:`PeerGone` when the stream fails."""
        with stream_io(self.peer, "writing"):
            await self.raw.write(bytes(data))
        if self.tally is not None:
            self.tally.count(self.protocol, sent=len(data))

    async def recv_frame(self, max_size: int | None = None) -> bytes:
        """Read one frame; its length must not exceed ``max_size`` (default: the stream's cap).

        Waiting for a frame to *start* has no limit here (callers bound idle streams), but once
        its first byte has come the rest must follow within :func:`frame_deadline` of its length:
        a peer that announces 100 bytes and sends 10 cannot hold the stream open (:class:`PeerTimeout`).
        """
        cap = self.max_frame if max_size is None else min(max_size, self.max_frame)
        while not self._buf:
            self._buf += await self._read_chunk(65536)
        with deadline(frame_deadline(_LEN.size), "a frame's length", peer=self.peer):
            (length,) = _LEN.unpack(await self._read_exactly(_LEN.size))
        if length > cap:
            raise MessageTooLarge(f"frame of {length} bytes exceeds the cap of {cap}", peer=self.peer)
        with deadline(frame_deadline(length), f"a {length}-byte frame", peer=self.peer):
            return await self._read_exactly(length)

    async def send_frame(self, data: bytes | bytearray | memoryview) -> None:
        """Write one frame (length prefix and body in a single write)."""
        if len(data) > self.max_frame:
            raise MessageTooLarge(f"refusing to send a {len(data)}-byte frame", peer=None)
        await self.write_raw(_LEN.pack(len(data)) + bytes(data))

    async def send_msg(self, obj: Any) -> None:
        """Encode ``obj`` as msgpack and send it as one frame."""
        await self.send_frame(encode(obj))

    async def recv_msg(self, schema: Schema | None = None, *, max_size: int | None = None) -> Any:
        """Receive one frame and decode it; validate against ``schema`` when given."""
        cap = schema.max_size if schema is not None else (max_size or self.max_frame)
        data = await self.recv_frame(cap)
        if schema is not None:
            return schema.parse(data, peer=self.peer)
        return decode(data, max_size=cap, peer=self.peer)

    async def close(self) -> None:
        """Close our side politely; errors from an already dead stream are ignored."""
        with dead_stream_ok():
            await self.raw.close()

    async def reset(self) -> None:
        """Abort the stream in both directions."""
        with dead_stream_ok():
            await self.raw.reset()


__all__ = [
    "DEFAULT_MAX_FRAME",
    "FRAME_GRACE",
    "FRAME_MIN_RATE",
    "ByteTally",
    "FramedStream",
    "RawStream",
    "RemoteProtocolError",
    "frame_deadline",
]
