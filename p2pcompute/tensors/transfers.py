"""One transfer on one connection, sender's and receiver's side (docs/protocol/tensors.md, section 2).

:func:`send_transfer` runs the sender from the preamble to the final ACK; :func:`receive_transfer`
runs the receiver of an authenticated, claimed transfer from GO to ACK. Their DATA records move
through :func:`~p2pcompute.tensors.pipeline.move_records`, with the per-record work given here
as :class:`SendSteps` (stage, hash, seal; then send) and :class:`ReceiveSteps` (receive; then
open, hash, land or hand out chunks).

Imports torch, trio, :mod:`p2pcompute.wire`, :mod:`p2pcompute.errors` and the lane's
connections, pipeline, staging and codecs; never py-libp2p.
"""

from __future__ import annotations

import hashlib
import socket as _stdsocket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import trio

from p2pcompute.errors import (
    IntegrityError,
    PeerGone,
    PeerTimeout,
    ProtocolError,
    RemoteProtocolError,
    ResourceLimitExceeded,
)
from p2pcompute.tensors import codecs
from p2pcompute.tensors.conns import Conn, TcpConn, read_record, recv_exactly
from p2pcompute.tensors.inbound import Incoming, refuse
from p2pcompute.tensors.pipeline import move_records
from p2pcompute.tensors.sessions import Session, StaleSession
from p2pcompute.tensors.staging import Lander, Stager
from p2pcompute.wire.lanekeys import (
    CHALLENGE_SIZE,
    MAGIC,
    RecordOpener,
    RecordSealer,
    sealed_size,
    transfer_keys,
)
from p2pcompute.wire.shards import (
    ACK,
    END,
    GO,
    HEADER,
    HEADER_SIZE,
    KIND_ACK,
    KIND_DATA,
    KIND_END,
    KIND_GO,
    KIND_OPEN,
    TAG_SIZE,
    Manifest,
    RecordPlan,
    parse_header,
    plan_records,
)

OnChunk = Callable[[str, int, torch.Tensor], Any]


# --- sender ---------------------------------------------------------------------------------------


class SendSteps:
    """The sender's record work: stage a record's payload, hash it, seal it into a slot; then send.

    Example::

        steps = SendSteps(conn, plans, stager, sealer, hashers=None, record_size=1 << 20)
        records, total = await move_records(conn, plans, steps, limiter)
    """

    outbound = True

    def __init__(
        self,
        conn: Conn,
        plans: list[RecordPlan],
        stager: Stager,
        sealer: RecordSealer,
        *,
        hashers: list[Any] | None,
        record_size: int,
        workers: int = 1,
    ) -> None:
        self.stager = stager
        self.sealer = sealer
        self.hashers = hashers
        # CPU tensors (any codec) on a direct connection: one blocking loop in a worker thread.
        # Encoding a record there costs what it costs in the pipelined loop's worker, without a
        # thread hop and two event-loop wake-ups per record (docs/design/data-plane.md, "Codecs").
        self.bulk = isinstance(conn, TcpConn) and stager.host_only
        # a pool seals records out of order (hashing needs them in order)
        self.workers = workers if self.bulk and hashers is None and workers > 1 else 1
        self.slots = pool_slots(self.workers)
        self.views = [memoryview(bytearray(sealed_size(record_size))) for _ in range(self.slots)]
        self.sealed = [0] * self.slots
        if self.workers > 1:
            self.first = sealer.reserve(len(plans))
            self.sealers = [sealer.fork() for _ in range(self.slots)]

    def heavy(self, plan: RecordPlan) -> bool:
        """Staging that is more than a view of the source (codec, CUDA) is worth a thread."""
        return not self.stager.is_direct(plan)

    def work(self, index: int, plan: RecordPlan, slot: int) -> None:
        """Stage, hash and seal record ``index`` into slot ``slot``."""
        payload = self.stager.payload(plan, slot)
        if self.workers > 1:
            self.sealed[slot] = self.sealers[slot].seal_into(
                KIND_DATA, payload, self.views[slot], self.first + index
            )
            return
        if self.hashers is not None:
            hash_pieces(self.hashers, plan, payload)
        self.sealed[slot] = self.sealer.seal_into(KIND_DATA, payload, self.views[slot])

    def wire_blocking(self, sock: _stdsocket.socket, index: int, plan: RecordPlan, slot: int) -> None:
        """Send the sealed record (bulk loop)."""
        sock.sendall(self.views[slot][: self.sealed[slot]])

    async def wire(self, conn: Conn, index: int, plan: RecordPlan, slot: int) -> None:
        """Send the sealed record."""
        await conn.send_all(self.views[slot][: self.sealed[slot]])

    async def after(self, plan: RecordPlan, slot: int) -> None:
        """Nothing: a sent record needs no more work."""


async def send_transfer(
    conn: Conn,
    session: Session,
    manifest: Manifest,
    open_body: bytes,
    sources: list[torch.Tensor],
    *,
    auth_timeout: float,
    claim_timeout: float,
    force_staging: bool,
    limiter: trio.CapacityLimiter,
    workers: int = 1,
) -> tuple[int, int]:
    """Send one transfer on ``conn``; return (payload bytes, records) once the receiver acknowledged.

    ``workers`` > 1 seals records in a pool of that many threads (bulk loop only, no digest).

    Raises :class:`StaleSession` when no challenge comes back (the receiver does not know the
    session, or dropped the connection before reading it; ``timed_out``: no answer in time),
    :class:`ResourceLimitExceeded` when it is full (an honest busy refusal),
    :class:`RemoteProtocolError` when it refused or rejected the transfer, and the connection's
    :class:`PeerGone`/:class:`PeerTimeout`.

    Example::

        total, records = await send_transfer(conn, session, manifest, manifest.build(), sources,
                                             auth_timeout=10, claim_timeout=120,
                                             force_staging=False, limiter=limiter)
    """
    peer = session.peer
    challenge = bytearray(CHALLENGE_SIZE)
    try:
        await conn.send_all(MAGIC + session.keys.session_id)
        await conn.recv_exactly_into(memoryview(challenge), stall=auth_timeout)
    except PeerGone:
        raise StaleSession from None
    except PeerTimeout:
        raise StaleSession(timed_out=True) from None
    s2r, r2s = transfer_keys(session.keys.send_base, bytes(challenge))
    sealer = RecordSealer(s2r, session.keys.cipher)
    opener = RecordOpener(r2s, session.keys.cipher, peer=peer)
    await conn.send_all(sealer.seal(KIND_OPEN, open_body))
    # Wait (with no payload in flight) until the receiver claims the transfer.
    kind, header, body = await read_record(
        conn, (KIND_GO, KIND_ACK), ACK.max_size + TAG_SIZE, first_stall=claim_timeout
    )
    if kind == KIND_ACK:
        refusal = ACK.parse(opener.open(header, body), peer=peer)
        if refusal.get("busy"):
            # The receiver is full: an honest answer, so nobody is blamed for it.
            too_large = bool(refusal.get("too_large"))
            what = "cannot take" if too_large else "is full and refused"
            raise ResourceLimitExceeded(
                f"{peer} {what} transfer {manifest.tag!r}: {refusal.get('error', '')}",
                peer=peer,
                retryable=not too_large,
            )
        raise RemoteProtocolError(f"receiver refused transfer: {refusal['error']}", peer=peer)
    GO.parse(opener.open(header, body), peer=peer)

    plans = list(plan_records(manifest.shards, manifest.record_size))
    stager = Stager(
        sources, manifest.shards, manifest.record_size, force_staging=force_staging, slots=pool_slots(workers)
    )
    hashers = [hashlib.sha256() for _ in manifest.shards] if manifest.digest == "sha256" else None
    steps = SendSteps(
        conn, plans, stager, sealer, hashers=hashers, record_size=manifest.record_size, workers=workers
    )
    records, total = await move_records(conn, plans, steps, limiter)

    digests = [h.digest() for h in hashers] if hashers is not None else []
    await conn.send_all(sealer.seal(KIND_END, END.build(records=records, total=total, digests=digests)))
    _, header, body = await read_record(conn, (KIND_ACK,), ACK.max_size + TAG_SIZE)
    ack = ACK.parse(opener.open(header, body), peer=peer)
    if not ack["ok"]:
        raise RemoteProtocolError(f"receiver rejected transfer: {ack['error']}", peer=peer)
    return total, records


# --- receiver -------------------------------------------------------------------------------------


class ReceiveSteps:
    """The receiver's record work: receive a record (and the next header) into a slot; then open it
    into its destination (or a slot buffer), hash it, and land it or hand its chunks out.

    ``header`` holds the header of the next record to arrive; after the last DATA record it
    holds END's. Example::

        steps = ReceiveSteps(incoming, plans, header, lander, None, threaded=False)
        records, total = await move_records(incoming.conn, plans, steps, limiter)
    """

    outbound = False

    def __init__(
        self,
        incoming: Incoming,
        plans: list[RecordPlan],
        header: bytearray,
        lander: Lander | None,
        on_chunk: OnChunk | None,
        *,
        threaded: bool,
        workers: int = 1,
    ) -> None:
        manifest = incoming.manifest
        record_size = manifest.record_size
        self.manifest = manifest
        self.peer = incoming.peer
        self.opener = incoming.opener
        self.header = header
        self.lander = lander
        self.on_chunk = on_chunk
        self.hashers = (
            [hashlib.sha256() for _ in manifest.shards] if manifest.digest == "sha256" else None
        )
        # CPU destinations (any codec), or an on_chunk that may run in a worker thread: the
        # whole transfer runs as one blocking loop in a worker thread
        self.bulk = isinstance(incoming.conn, TcpConn) and (
            (lander is not None and lander.host_only) or (on_chunk is not None and threaded)
        )
        # a pool opens records out of order: only where nothing needs them in order
        pooled = self.bulk and workers > 1 and self.hashers is None and on_chunk is None
        self.workers = workers if pooled else 1
        self.slots = pool_slots(self.workers)
        self.views = [memoryview(bytearray(sealed_size(record_size))) for _ in range(self.slots)]
        self.plains = (
            lander.buffers(record_size, self.slots)
            if lander is not None
            else [torch.empty(record_size, dtype=torch.uint8) for _ in range(self.slots)]
        )
        self.plain_views = [codecs.byte_memoryview(p) for p in self.plains]
        self.record_headers = [b""] * self.slots
        if self.workers > 1:
            self.first = self.opener.reserve(len(plans))
            self.openers = [self.opener.fork() for _ in range(self.slots)]

    def heavy(self, plan: RecordPlan) -> bool:
        """Opening into a slot buffer and decoding from it (codec, CUDA, odd layout) is worth a thread."""
        return self.lander is None or self.lander.direct_target(plan) is None

    def _take(self, view: memoryview, body_len: int, slot: int) -> None:
        self.record_headers[slot] = bytes(self.header)
        self.header[:] = view[body_len : body_len + HEADER_SIZE]

    def wire_blocking(self, sock: _stdsocket.socket, index: int, plan: RecordPlan, slot: int) -> None:
        """Receive record ``index`` and the next header (bulk loop)."""
        body_len = expect_data(self.header, index, plan, self.peer)
        view = self.views[slot]
        recv_exactly(sock, view[: body_len + HEADER_SIZE], self.peer)
        self._take(view, body_len, slot)

    async def wire(self, conn: Conn, index: int, plan: RecordPlan, slot: int) -> None:
        """Receive record ``index`` and the next header."""
        body_len = expect_data(self.header, index, plan, self.peer)
        view = self.views[slot]
        await conn.recv_exactly_into(view[: body_len + HEADER_SIZE])
        self._take(view, body_len, slot)

    def work(self, index: int, plan: RecordPlan, slot: int) -> None:
        """Open (authenticate) the record into its destination, hash it, land it; in the bulk loop
        also hand its chunks to ``on_chunk``."""
        body = self.views[slot][: plan.nbytes + TAG_SIZE]
        lander = self.lander
        target = lander.direct_target(plan) if lander is not None else None
        opener, counter = (
            (self.openers[slot], self.first + index) if self.workers > 1 else (self.opener, None)
        )
        if target is None:
            target = self.plain_views[slot][: plan.nbytes]
            opener.open_into(self.record_headers[slot], body, target, counter)
            if lander is not None:
                lander.scatter(plan, self.plains[slot])
        else:
            opener.open_into(self.record_headers[slot], body, target, counter)
        if self.hashers is not None:
            hash_pieces(self.hashers, plan, target)
        if self.bulk and self.on_chunk is not None:
            for name, start, values in chunks(self.manifest, plan, self.plains[slot]):
                self.on_chunk(name, start, values)

    async def after(self, plan: RecordPlan, slot: int) -> None:
        """Hand the record's chunks to ``on_chunk`` (it may be a coroutine function)."""
        if self.on_chunk is not None:
            for name, start, values in chunks(self.manifest, plan, self.plains[slot]):
                result = self.on_chunk(name, start, values)
                if hasattr(result, "__await__"):
                    await result


async def receive_transfer(
    incoming: Incoming,
    into: Mapping[str, torch.Tensor] | None,
    device: torch.device | str | None,
    on_chunk: OnChunk | None,
    *,
    threaded: bool,
    force_staging: bool,
    auth_timeout: float,
    limiter: trio.CapacityLimiter,
    workers: int = 1,
) -> tuple[dict[str, torch.Tensor], int]:
    """Receive a claimed transfer; return its tensors (empty with ``on_chunk``) and payload bytes.

    Nothing is returned unless every record authenticated, the counts matched the END record and
    (when asked) every SHA-256 digest matched; then the sender gets its ACK. Destinations that do
    not fit ``into`` refuse the transfer (the sender learns why) and raise here.

    Example::

        tensors, total = await receive_transfer(incoming, None, "cpu", None, threaded=False,
                                                force_staging=False, auth_timeout=10, limiter=limiter)
    """
    manifest = incoming.manifest
    conn = incoming.conn
    peer = incoming.peer
    try:
        lander = (
            Lander(manifest.shards, into, device, peer=peer, force_staging=force_staging)
            if on_chunk is None
            else None
        )
    except ProtocolError as exc:
        await refuse(incoming, str(exc), timeout=auth_timeout)
        raise
    await conn.send_all(incoming.sealer.seal(KIND_GO, GO.build()))
    header = bytearray(HEADER_SIZE)
    plans = list(plan_records(manifest.shards, manifest.record_size))
    steps = ReceiveSteps(incoming, plans, header, lander, on_chunk, threaded=threaded, workers=workers)
    await conn.recv_exactly_into(memoryview(header))
    records, total = await move_records(conn, plans, steps, limiter)

    end_len = parse_header(header, expect=KIND_END, max_body=END.max_size + TAG_SIZE, peer=peer)
    end_body = bytearray(end_len)
    await conn.recv_exactly_into(memoryview(end_body))
    end = END.parse(incoming.opener.open(header, end_body), peer=peer)
    if end["records"] != records or end["total"] != total:
        raise IntegrityError(
            f"transfer ended after {end['records']} records / {end['total']} bytes; "
            f"received {records} / {total}",
            peer=peer,
        )
    hashers = steps.hashers
    if hashers is not None:
        if len(end["digests"]) != len(hashers):
            raise IntegrityError("wrong number of shard digests", peer=peer)
        for spec, hasher, claimed in zip(manifest.shards, hashers, end["digests"], strict=True):
            if hasher.digest() != claimed:
                raise IntegrityError(f"shard {spec.name!r}: SHA-256 digest mismatch", peer=peer)
    result = lander.finish() if lander is not None else {}
    await conn.send_all(incoming.sealer.seal(KIND_ACK, ACK.build(ok=True)))
    return result, total


# --- helpers --------------------------------------------------------------------------------------


def pool_slots(workers: int) -> int:
    """Record slots a loop with ``workers`` sealing/opening threads needs (two per thread).

    Example::

        assert pool_slots(1) == 2
    """
    return 2 * max(1, workers)


def expect_data(header: bytearray, index: int, plan: RecordPlan, peer: str) -> int:
    """Check that ``header`` announces record ``index`` as planned; return its body length.

    Example::

        body_len = expect_data(header, 0, plans[0], peer)    # IntegrityError when it does not
    """
    body_len = plan.nbytes + TAG_SIZE
    kind, length = HEADER.unpack(header)
    if kind != KIND_DATA or length != body_len:
        raise IntegrityError(
            f"record {index}: got kind {kind} length {length}, expected data of {body_len}", peer=peer
        )
    return body_len


def hash_pieces(hashers: list[Any], plan: RecordPlan, payload: memoryview) -> None:
    """Feed each shard's piece of a record's plaintext to that shard's hasher.

    Example::

        hashers = [hashlib.sha256() for _ in manifest.shards]
        hash_pieces(hashers, plan, payload)
    """
    offset = 0
    for piece in plan.pieces:
        hashers[piece.shard].update(payload[offset : offset + piece.nbytes])
        offset += piece.nbytes


def chunks(
    manifest: Manifest, plan: RecordPlan, plain: torch.Tensor
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """The decoded runs of elements in an opened record: (shard name, first element, values).

    Example::

        for name, start, values in chunks(manifest, plan, plain):
            acc[name][start : start + values.numel()] += values
    """
    offset = 0
    for piece in plan.pieces:
        spec = manifest.shards[piece.shard]
        raw = plain[offset : offset + piece.nbytes]
        offset += piece.nbytes
        dtype = codecs.torch_dtype(spec.dtype)
        if spec.codec == "none" and raw.data_ptr() % max(1, raw.numel() and dtype.itemsize) == 0:
            values = raw.view(dtype)
        else:
            values = codecs.empty((piece.count,), dtype)
            codecs.decode_into(spec.codec, raw if spec.codec != "none" else raw.clone(), values)
        yield spec.name, piece.start, values


__all__ = [
    "OnChunk",
    "ReceiveSteps",
    "SendSteps",
    "chunks",
    "expect_data",
    "hash_pieces",
    "receive_transfer",
    "send_transfer",
]
