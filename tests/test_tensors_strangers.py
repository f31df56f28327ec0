"""The lane among strangers (issue #14): floods of idle connections, identities that fill the
parking lot, caps, and garbage on the data port. Real overlay nodes and real TCP on 127.0.0.1
(the whole 127/8 is loopback on Linux, so a flood can come from other source addresses)."""

from __future__ import annotations

import contextlib
import inspect
import os
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pcompute.errors import ConfigError, ResourceLimitExceeded
from p2pcompute.tensors import TensorLane, open_lane
from p2pcompute.wire.lanekeys import MAGIC
from p2pcompute.wire.shards import HEADER, KIND_OPEN, MAX_CONTROL_BODY
from tests.test_tensors_lane import GUARD, lanes, nodes

FLOODERS = 80  # more than the 64 connections the lane lets authenticate at once


def default(option: str) -> Any:
    return inspect.signature(TensorLane.__init__).parameters[option].default


async def honest_transfer(
    a: TensorLane, b: TensorLane, tag: str, x: torch.Tensor
) -> tuple[str, torch.Tensor]:
    """``a`` sends ``x`` to ``b``; returns the path the sender took and what ``b`` received."""
    path: list[str] = []

    async def send() -> None:
        path.append((await a.send(b.peer_id, tag, {"x": x})).path)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        got = await b.receive(a.peer_id, tag)
    return path[0], got["x"]


@contextlib.asynccontextmanager
async def idle_flood(addr: tuple[str, int], sources: list[str]) -> AsyncIterator[None]:
    """Keep ``FLOODERS`` idle TCP connections (they never send a byte) open to ``addr`` from the
    ``sources`` in turn, reconnecting whenever the lane closes one; yields once the lane has had
    time to fill its queue (more connections opened than flooders)."""
    opened = [0]
    filled = trio.Event()

    async def flooder(source: str) -> None:
        while True:
            try:
                stream = await trio.open_tcp_stream(*addr, local_address=source)
            except OSError:
                await trio.sleep(0.05)
                continue
            opened[0] += 1
            if opened[0] >= FLOODERS + 16:
                filled.set()
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await stream.receive_some(64):
                        pass
            await trio.sleep(0.05)  # an attacker's pace: about 20 reconnects a second per flooder

    async with trio.open_nursery() as nursery:
        for i in range(FLOODERS):
            nursery.start_soon(flooder, sources[i % len(sources)])
        await filled.wait()
        yield
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "sources",
    [["127.0.0.2"], ["127.0.0.1"], [f"127.0.0.{i}" for i in range(2, 2 + FLOODERS)]],
    ids=["one-other-address", "the-senders-address", "many-addresses"],
)
async def test_a_flood_of_idle_connections_does_not_block_honest_transfers(sources: list[str]) -> None:
    """FOUND BY ATTACKING: idle connections kept the lane's pre-authentication queue full, the
    honest sender's connection was closed unread, it took that for a stale session twice and
    failed (PeerGone: refused the lane session twice). Now one address holds at most its share of
    the queue, idle ones are dropped after the short preamble deadline, and a sender whose
    direct connection is dropped unread falls back to the relay path."""
    x = torch.randn(200_000)
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            async with idle_flood(b.data_addrs[0], sources):
                path, got = await honest_transfer(a, b, "under-flood", x)
            assert torch.equal(got, x)
            stats = b.statistics()
            assert stats.dropped_at_accept > 0
            if sources == ["127.0.0.2"]:
                assert path == "direct"  # the flood's address cannot take the honest one's share
            else:
                assert path in ("direct", "relay")
                assert path == "direct" or a.statistics().direct_fallbacks == 1
            await _until(lambda: b.statistics().pending_auth == 0)  # the flood's last ones went
            path, got = await honest_transfer(a, b, "after-flood", x)  # the lane is unharmed
            assert path == "direct"
            assert torch.equal(got, x)


async def test_a_silent_connection_is_dropped_at_the_preamble_deadline() -> None:
    """The first 24 bytes are due within ``preamble_timeout``, well before ``auth_timeout``."""
    with trio.fail_after(GUARD):
        async with lanes(2, [{}, {"preamble_timeout": 0.3, "auth_timeout": 30.0}]) as (_a, b):
            stream = await trio.open_tcp_stream(*b.data_addrs[0])
            start = trio.current_time()
            with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(64) == b""
            assert trio.current_time() - start < 10
            await stream.aclose()
            assert b.statistics().auth_timeouts == 1
            assert b.statistics().pending_auth == 0


async def _park(sender: TensorLane, receiver: TensorLane, tags: list[str], refused: list[str]) -> None:
    async def one(tag: str) -> None:
        try:
            await sender.send(receiver.peer_id, tag, {"x": torch.zeros(4)})
        except ResourceLimitExceeded:
            refused.append(tag)

    async with trio.open_nursery() as nursery:
        for tag in tags:
            nursery.start_soon(one, tag)


async def _until(condition: Any) -> None:
    while not condition():
        await trio.lowlevel.checkpoint()


async def test_a_few_identities_cannot_fill_the_parking_lot() -> None:
    """FOUND: four identities parking 16 unclaimed transfers each filled the 64-transfer lot for
    a minute, and honest transfers were refused ("too many unclaimed transfers"). With the
    default caps, four identities parking their maximum leave room for an honest peer."""
    per_peer = default("max_parked_per_peer")
    x = torch.randn(1000)
    with trio.fail_after(GUARD):
        async with lanes(6) as (b, honest, *sybils), trio.open_nursery() as nursery:
            refused: list[str] = []
            for i, s in enumerate(sybils):
                nursery.start_soon(_park, s, b, [f"junk/{i}/{k}" for k in range(per_peer + 1)], refused)
            await _until(lambda: b.statistics().parked == 4 * per_peer and len(refused) == 4)
            assert b.statistics().refused_busy == 4  # each identity's one over its share
            _path, got = await honest_transfer(honest, b, "honest", x)
            assert torch.equal(got, x)
            nursery.cancel_scope.cancel()


async def test_a_full_lot_evicts_from_the_peer_holding_the_most() -> None:
    """Lot of 6, at most 3 per peer: two identities fill it; an honest peer with nothing parked
    still parks (the oldest transfer of a heaviest holder is evicted, its sender told "busy"),
    and its transfer is claimed."""
    x = torch.randn(1000)
    opts: list[dict[str, Any]] = [{"max_parked": 6, "max_parked_per_peer": 3}, {}, {}, {}]
    with trio.fail_after(GUARD):
        async with lanes(4, opts) as (b, honest, s1, s2), trio.open_nursery() as nursery:
            refused: list[str] = []
            nursery.start_soon(_park, s1, b, ["s1/0", "s1/1", "s1/2"], refused)
            await _until(lambda: b.statistics().parked == 3)
            nursery.start_soon(_park, s2, b, ["s2/0", "s2/1", "s2/2"], refused)
            await _until(lambda: b.statistics().parked == 6)
            async with trio.open_nursery() as inner:
                inner.start_soon(_park, honest, b, ["early"], refused)
                await b.wait_for_arrival(honest.peer_id, "early", timeout=GUARD)
                await _until(lambda: len(refused) == 1)
                assert refused[0].startswith("s1/")  # s1 parked first: its oldest went
                assert b.statistics().evicted_unclaimed == 1
                got = await b.receive(honest.peer_id, "early")
            assert torch.equal(got["x"], torch.zeros(4))
            _path, got = await honest_transfer(honest, b, "honest", x)
            assert torch.equal(got, x)
            nursery.cancel_scope.cancel()


async def test_a_transfer_over_the_size_cap_is_refused_as_busy() -> None:
    """Over ``max_transfer_bytes`` the authenticated sender hears ResourceLimitExceeded (it was
    dropped without a word, which the sender saw as PeerGone); smaller transfers go on."""
    with trio.fail_after(GUARD):
        async with lanes(2, [{}, {"max_transfer_bytes": 1000}]) as (a, b):
            with pytest.raises(ResourceLimitExceeded) as refused:
                await a.send(b.peer_id, "big", {"x": torch.zeros(1000)})
            assert refused.value.peer == b.peer_id
            assert not refused.value.retryable  # over a fixed cap: the collective must not retry it
            assert b.statistics().refused_too_large == 1
            _path, got = await honest_transfer(a, b, "small", torch.ones(10))
            assert torch.equal(got, torch.ones(10))


@pytest.mark.parametrize(
    "option", ["max_parked", "max_parked_per_peer", "max_pending_auth", "max_pending_auth_per_source",
               "max_transfer_bytes", "preamble_timeout", "auth_timeout", "hold_timeout"]
)
async def test_caps_must_be_positive(option: str) -> None:
    with trio.fail_after(GUARD):
        async with nodes(1) as (nd,):
            with pytest.raises(ConfigError):
                async with open_lane(nd, **{option: 0}):
                    pass


async def test_a_claimed_length_costs_only_the_bytes_that_came() -> None:
    """A stranger who knows a live session id (it travels in plaintext) sends an OPEN header
    claiming the 8 MiB cap and nothing more: the lane used to allocate the whole body at once
    for each such connection (8 of them: 64 MiB); now memory follows the bytes received."""
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            await honest_transfer(a, b, "warm-up", torch.zeros(1))
            session_id = next(iter(b._sessions.by_id))
            tracemalloc.start()
            try:
                streams = []
                for _ in range(8):
                    s = await trio.open_tcp_stream(*b.data_addrs[0])
                    await s.send_all(MAGIC + session_id)
                    assert len(await s.receive_some(64)) == 32  # the challenge
                    await s.send_all(HEADER.pack(KIND_OPEN, MAX_CONTROL_BODY))
                    streams.append(s)
                await _until(lambda: b.statistics().pending_auth == 8)
                await trio.sleep(0.3)  # not a condition: time for the lane to read the headers
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 8 << 20, peak
            for s in streams:
                await s.aclose()


async def test_garbage_on_the_data_port_never_stops_the_lane() -> None:
    """Hypothesis sends random bytes, truncated preambles, known and unknown session ids and
    record headers with any kind and length to a live lane port: every connection ends within
    the preamble and handshake deadlines, a stranger sees at most a 32-byte challenge, nothing
    stays pending or parked, and an honest transfer still completes."""
    opts: list[dict[str, Any]] = [{}, {"preamble_timeout": 0.3, "auth_timeout": 0.8}]
    with trio.fail_after(240):
        async with lanes(2, opts) as (a, b):
            await honest_transfer(a, b, "warm-up", torch.zeros(1))
            known = next(iter(b._sessions.by_id))
            addr = b.data_addrs[0]
            bound = 0.3 + 0.8 + 5.0  # the lane's deadlines plus slack for a loaded machine

            async def poke(payload: bytes, hold_open: bool) -> int:
                stream = await trio.open_tcp_stream(*addr)
                got = b""
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(payload)
                    if not hold_open:
                        await stream.send_eof()
                    with trio.fail_after(bound):
                        while data := await stream.receive_some(4096):
                            got += data
                await stream.aclose()
                return len(got)

            headers = st.builds(
                lambda kind, length: HEADER.pack(kind, length),
                st.integers(0, 255),
                st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.just(MAX_CONTROL_BODY)),
            )
            payloads = st.one_of(
                st.binary(max_size=256),
                st.integers(0, len(MAGIC)).map(lambda n: MAGIC[:n]),
                st.tuples(st.sampled_from([known, os.urandom(16)]), headers, st.binary(max_size=128)).map(
                    lambda t: MAGIC + t[0] + t[1] + t[2]
                ),
                st.tuples(st.sampled_from([known, b""]), st.integers(0, 15)).map(
                    lambda t: (MAGIC + t[0])[: len(MAGIC) + t[1]]
                ),
            )

            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
            @given(payload=payloads, hold_open=st.booleans())
            def attack(payload: bytes, hold_open: bool) -> None:
                replied = trio.from_thread.run(poke, payload, hold_open)
                # only a known session id earns a reply: one 32-byte challenge (or nothing, when the
                # lane's close of a connection with unread bytes resets it before we read)
                known_preamble = payload[: len(MAGIC) + 16] == MAGIC + known
                assert replied in ((0, 32) if known_preamble else (0,))

            await trio.to_thread.run_sync(attack)
            await _until(lambda: b.statistics().pending_auth == 0)
            stats = b.statistics()
            assert stats.parked == 0
            assert stats.received == 1
            x = torch.randn(100_000)
            path, got = await honest_transfer(a, b, "after-garbage", x)
            assert path == "direct"
            assert torch.equal(got, x)


async def test_many_identities_cannot_grow_the_session_table() -> None:
    """Every identity that shakes hands used to leave sessions (and a lock) behind for good; now
    at most ``max_session_peers`` peers keep sessions, the least recently used losing theirs,
    and a peer that lost its session simply shakes hands again."""
    x = torch.randn(1000)
    with trio.fail_after(GUARD):
        async with lanes(4, [{"max_session_peers": 2}, {}, {}, {}]) as (b, p1, p2, p3):
            for p in (p1, p2, p3):
                _path, got = await honest_transfer(p, b, "hello", x)
                assert torch.equal(got, x)
            assert set(b._sessions.by_peer) == {p2.peer_id, p3.peer_id}
            assert len(b._sessions.by_id) <= 2 * 4
            assert not p1._sessions.locks  # the handshake lock went with the handshake
            _path, got = await honest_transfer(p1, b, "again", x)  # its old session is gone
            assert torch.equal(got, x)
            assert set(b._sessions.by_peer) == {p3.peer_id, p1.peer_id}
