"""The tensor lane end to end: real overlay nodes (py-libp2p hosts) and real TCP on 127.0.0.1, no mocks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
import trio

from p2pcompute.errors import (
    IntegrityError,
    MalformedMessage,
    PeerGone,
    PeerTimeout,
    RemoteProtocolError,
    ResourceLimitExceeded,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay import Node, open_node
from p2pcompute.tensors import TensorLane, TransferReport, open_lane
from p2pcompute.tensors.codecs import TORCH_DTYPES, empty

GUARD = 60  # absolute guard against hangs (not a speed bound)


def node(identity: Identity | None = None, listen: str = "/ip4/127.0.0.1/tcp/0") -> Any:
    """A quiet overlay node (no adverts, no capacity probe) for the lane to run on."""
    return open_node(identity, listen=[listen], advertise=False)


@contextlib.asynccontextmanager
async def nodes(n: int) -> AsyncIterator[list[Node]]:
    """``n`` nodes, all connected to each other."""
    async with contextlib.AsyncExitStack() as stack:
        result = [await stack.enter_async_context(node()) for _ in range(n)]
        for i, a in enumerate(result):
            for b in result[i + 1 :]:
                await a.connect(b.addrs[0])
        yield result


@contextlib.asynccontextmanager
async def lanes(n: int = 2, options: list[dict[str, Any]] | None = None) -> AsyncIterator[list[TensorLane]]:
    """``n`` nodes, all connected to each other, each running a lane."""
    opts = options or [{} for _ in range(n)]
    async with contextlib.AsyncExitStack() as stack:
        ns = await stack.enter_async_context(nodes(n))
        yield [await stack.enter_async_context(open_lane(nd, **o)) for nd, o in zip(ns, opts, strict=True)]


async def transfer(
    a: TensorLane, b: TensorLane, tensors: dict[str, torch.Tensor], tag: str = "t", **kw: Any
) -> dict[str, torch.Tensor]:
    codec = kw.pop("codec", "none")
    digest = kw.pop("digest", "none")
    out: dict[str, torch.Tensor] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: a.send(b.peer_id, tag, tensors, codec=codec, digest=digest))
        out = await b.receive(a.peer_id, tag, **kw)
    return out


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8)
    t = empty(shape, dtype)
    t.reshape(-1).view(torch.uint8).copy_(raw)
    return t


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(
        x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)
    )


async def test_every_dtype_and_odd_shapes_round_trip_bit_exact() -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype in TORCH_DTYPES.items():
        tensors[f"{name}/scalar"] = sample(dtype, ())
        tensors[f"{name}/empty"] = sample(dtype, (0, 3))
        tensors[f"{name}/odd"] = sample(dtype, (3, 5, 7))
    base = torch.randn(40, 30)
    tensors["noncontig/transposed"] = base.t()
    tensors["noncontig/strided"] = base[::3, 1::2]
    tensors["big"] = torch.randn(700_000)  # several records
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            got = await transfer(a, b, tensors)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert same_bits(t, got[name]), name


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
async def test_lossy_codecs_apply_to_floats_only(codec: str) -> None:
    x = torch.randn(100_000, dtype=torch.float32)
    ints = torch.arange(1000, dtype=torch.int64)
    d = torch.randn(33, dtype=torch.float64)
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            got = await transfer(a, b, {"x": x, "i": ints, "d": d}, codec=codec)
    assert torch.equal(got["i"], ints)
    assert got["x"].dtype == torch.float32
    assert got["d"].dtype == torch.float64
    tol = {"fp16": 2**-10, "bf16": 2**-7, "int8": 1 / 120}[codec]
    assert float((got["x"] - x).abs().max()) <= tol * float(x.abs().max())


async def test_receive_into_preallocated_including_non_contiguous() -> None:
    w = torch.randn(300, 500)
    b_ = torch.randn(17)
    dst_w = torch.zeros(500, 300).t()  # non-contiguous destination
    dst_b = torch.zeros(17)
    ptr = dst_b.data_ptr()
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            got = await transfer(a, b, {"w": w, "b": b_}, into={"w": dst_w, "b": dst_b})
    assert got["w"] is dst_w
    assert got["b"] is dst_b
    assert dst_b.data_ptr() == ptr
    assert torch.equal(dst_w, w)
    assert torch.equal(dst_b, b_)


async def test_into_mismatch_is_refused_and_sender_told() -> None:
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            results: dict[str, BaseException] = {}

            async def send() -> None:
                try:
                    await a.send(b.peer_id, "t", {"w": torch.zeros(4)})
                except RemoteProtocolError as exc:
                    results["send"] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                with pytest.raises(MalformedMessage, match=r"receiver expects|sender has"):
                    await b.receive(a.peer_id, "t", into={"w": torch.zeros(5)})
            assert "refused" in str(results["send"])


@pytest.mark.parametrize("force_staging", [False, True])
async def test_sha256_digest_and_staging_path(force_staging: bool) -> None:
    tensors = {"a": torch.randn(300_000), "b": torch.arange(10), "c": torch.randn(5, 5).t()}
    opts = [{"force_staging": force_staging}] * 2
    with trio.fail_after(GUARD):
        async with lanes(2, opts) as (a, b):
            got = await transfer(a, b, tensors, digest="sha256")
            got2 = await transfer(a, b, tensors, tag="u", codec="bf16")
    for k, t in tensors.items():
        assert same_bits(t, got[k])
        assert got2[k].dtype == t.dtype
    assert torch.allclose(got2["a"], tensors["a"], rtol=2**-7, atol=0)


async def test_sender_may_start_first_and_receiver_chunks_in_order() -> None:
    x = torch.randn(600_000)
    y = torch.arange(50, dtype=torch.int32)
    seen: list[tuple[str, int, int]] = []
    acc = torch.zeros_like(x)

    def on_chunk(name: str, start: int, values: torch.Tensor) -> None:
        seen.append((name, start, values.numel()))
        if name == "x":
            acc[start : start + values.numel()] = values

    with trio.fail_after(GUARD):
        async with lanes() as (a, b), trio.open_nursery() as nursery:
            nursery.start_soon(lambda: a.send(b.peer_id, "g", {"x": x, "y": y}))
            # the sender got ahead: parked unread, not buffered
            await b.wait_for_arrival(a.peer_id, "g", timeout=GUARD)
            assert b.statistics().parked == 1
            report = await b.receive_chunks(a.peer_id, "g", on_chunk)
    assert torch.equal(acc, x)
    assert next(s for s in seen if s[0] == "x")[1] == 0
    starts = [s[1] for s in seen if s[0] == "x"]
    assert starts == sorted(starts)
    assert report.bytes == x.numel() * 4 + y.numel() * 4


async def test_relay_fallback_when_no_direct_path() -> None:
    x = {"x": torch.randn(50_000)}
    # b listens for no direct connections at all; c advertises a port where nothing listens.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    opts: list[dict[str, Any]] = [{}, {"direct": False}, {"advertise": [("127.0.0.1", dead_port)]}]
    with trio.fail_after(GUARD):
        async with lanes(3, opts) as (a, b, c):
            got_b = await transfer(a, b, x)
            got_c = await transfer(a, c, x)
            assert a.statistics().relay_transfers == 2
    assert torch.equal(got_b["x"], x["x"])
    assert torch.equal(got_c["x"], x["x"])


NEW_CPU = {"aes-256-gcm": (9000, 8800), "aes-256-ocb3": (6000, 5900), "chacha20-poly1305": (3700, 3600)}
OLD_CPU = {"aes-256-gcm": (2600, 2500), "aes-256-ocb3": (4300, 4200), "chacha20-poly1305": (3700, 3600)}


@pytest.mark.parametrize("direct", [True, False])
async def test_lanes_agree_on_a_record_cipher(direct: bool) -> None:
    """The cipher whose slower side measured fastest: GCM between two VAES hosts, OCB3 with an
    older host, GCM with a GCM-only lane; both sides report the same choice and why."""
    x = {"x": torch.randn(300_000)}  # several records
    opts: list[dict[str, Any]] = [
        {"direct": direct, "cipher_speeds": NEW_CPU},
        {"direct": direct, "cipher_speeds": OLD_CPU},
        {"direct": direct, "ciphers": ("aes-256-gcm",), "cipher_speeds": OLD_CPU},
        {"direct": direct, "cipher_speeds": NEW_CPU},
    ]
    with trio.fail_after(GUARD):
        async with lanes(4, opts) as (a, b, c, d):
            for src, dst, chosen in (
                (a, b, "aes-256-ocb3"),
                (a, c, "aes-256-gcm"),
                (c, d, "aes-256-gcm"),
                (d, a, "aes-256-gcm"),
            ):
                sent: list[TransferReport] = []

                async def send(
                    src: TensorLane = src, dst: TensorLane = dst, sent: list[TransferReport] = sent
                ) -> None:
                    sent.append(await src.send(dst.peer_id, "t", x))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    got = await dst.receive_chunks(src.peer_id, "t", lambda *_: None)
                assert sent[0].cipher == got.cipher == chosen
                assert sent[0].cipher_why == got.cipher_why
                assert sent[0].cipher_why.startswith(chosen + ": slowest side")


async def test_fan_out_and_fan_in_at_once() -> None:
    with trio.fail_after(GUARD):
        async with lanes(4) as ls:
            data = {lane.peer_id: torch.full((200_000,), float(i)) for i, lane in enumerate(ls)}
            hub, others = ls[0], ls[1:]
            got: dict[str, torch.Tensor] = {}

            async def recv_at_hub(src: TensorLane) -> None:
                got[src.peer_id] = (await hub.receive(src.peer_id, "in"))["v"]

            async def recv_at_leaf(leaf: TensorLane) -> None:
                got["out/" + leaf.peer_id] = (await leaf.receive(hub.peer_id, "out"))["v"]

            async with trio.open_nursery() as nursery:
                for o in others:
                    nursery.start_soon(lambda o=o: o.send(hub.peer_id, "in", {"v": data[o.peer_id]}))
                    nursery.start_soon(lambda o=o: hub.send(o.peer_id, "out", {"v": data[hub.peer_id]}))
                    nursery.start_soon(recv_at_hub, o)
                    nursery.start_soon(recv_at_leaf, o)
    for o in others:
        assert torch.equal(got[o.peer_id], data[o.peer_id])
        assert torch.equal(got["out/" + o.peer_id], data[hub.peer_id])


async def test_receive_times_out_with_typed_error() -> None:
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            with pytest.raises(PeerTimeout):
                await b.receive(a.peer_id, "never", timeout=0.3)


async def test_unclaimed_transfer_expires_and_sender_learns() -> None:
    opts: list[dict[str, Any]] = [{}, {"hold_timeout": 0.3}]
    with trio.fail_after(GUARD):
        async with lanes(2, opts) as (a, b):
            with pytest.raises(PeerGone):
                await a.send(b.peer_id, "nobody-asks", {"x": torch.zeros(10)})
            assert b.statistics().expired_unclaimed == 1


async def test_a_full_receiver_refuses_as_busy_and_blames_nobody() -> None:
    """Past max_parked_per_peer unclaimed transfers from one sender, the next is refused as busy:
    the sender gets ResourceLimitExceeded naming the receiver (an honest "I am full"), not the
    RemoteProtocolError that would blame it; the parked one still arrives."""
    opts: list[dict[str, Any]] = [{}, {"max_parked_per_peer": 1}]
    with trio.fail_after(GUARD):
        async with lanes(2, opts) as (a, b), trio.open_nursery() as nursery:
            first_sent = trio.Event()

            async def first() -> None:
                await a.send(b.peer_id, "one", {"x": torch.ones(4)})
                first_sent.set()

            nursery.start_soon(first)
            await b.wait_for_arrival(a.peer_id, "one", timeout=GUARD)
            with pytest.raises(ResourceLimitExceeded) as refused:
                await a.send(b.peer_id, "two", {"x": torch.zeros(4)})
            assert not isinstance(refused.value, RemoteProtocolError)
            assert refused.value.peer == b.peer_id
            assert b.statistics().refused_busy == 1
            assert b.statistics().parked == 1
            got = await b.receive(a.peer_id, "one")
            await first_sent.wait()
            assert torch.equal(got["x"], torch.ones(4))


async def test_cancelled_receiver_ends_sender_cleanly() -> None:
    x = {"x": torch.randn(4_000_000)}
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            cancelled = trio.Event()

            def on_chunk(name: str, start: int, values: torch.Tensor) -> None:
                if start > 0:
                    cancelled.set()

            async def receiver() -> None:
                with trio.CancelScope() as scope:
                    async def stop() -> None:
                        await cancelled.wait()
                        scope.cancel()

                    async with trio.open_nursery() as inner:
                        inner.start_soon(stop)
                        await b.receive_chunks(a.peer_id, "x", on_chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                with pytest.raises((PeerGone, PeerTimeout)):
                    await a.send(b.peer_id, "x", x)
            # both lanes still work afterwards
            got = await transfer(a, b, {"y": torch.ones(3)}, tag="after")
            assert torch.equal(got["y"], torch.ones(3))


@pytest.mark.parametrize("threads", [1, 3])
async def test_cancelled_bulk_receive_ends_both_sides_cleanly(threads: int) -> None:
    # receive(into=) of a plain CPU tensor runs in the lane's blocking worker loop (with a pool
    # of 3 openers/sealers: threads=3); cancelling it 5 ms in (128 MB cannot arrive that fast)
    # must stop the loop and fail the sender typed
    n = 32_000_000
    x = {"x": torch.randn(n)}
    dst = {"x": torch.empty(n)}
    outcome: dict[str, BaseException | None] = {}
    with trio.fail_after(GUARD):
        async with lanes(2, [{"seal_threads": threads}] * 2) as (a, b):

            async def sender() -> None:
                try:
                    await a.send(b.peer_id, "x", x)
                    outcome["send"] = None
                except (PeerGone, PeerTimeout) as exc:
                    outcome["send"] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await b.wait_for_arrival(a.peer_id, "x", timeout=GUARD)
                with trio.move_on_after(0.005) as scope:
                    await b.receive(a.peer_id, "x", into=dst)
                assert scope.cancelled_caught
            assert isinstance(outcome["send"], PeerGone)  # at once (a reset), not after the stall timeout
            got = await transfer(a, b, {"y": torch.ones(3)}, tag="after")
            assert torch.equal(got["y"], torch.ones(3))


async def test_cancelled_sender_gives_receiver_typed_error() -> None:
    x = {"x": torch.randn(4_000_000)}
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            first = trio.Event()

            def on_chunk(name: str, start: int, values: torch.Tensor) -> None:
                first.set()

            async with trio.open_nursery() as nursery:

                async def sender() -> None:
                    with trio.CancelScope() as scope:
                        nursery.start_soon(lambda: _cancel_when(first, scope))
                        await a.send(b.peer_id, "x", x)

                nursery.start_soon(sender)
                with pytest.raises(PeerGone):
                    await b.receive_chunks(a.peer_id, "x", on_chunk)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _proxy(listener: trio.SocketListener, target: int, flip_at: int | None) -> None:
    """A TCP relay to 127.0.0.1:target that flips one byte of the client's stream at ``flip_at``."""
    async with trio.open_nursery() as nursery:
        while True:
            client = await listener.accept()
            server = await trio.open_tcp_stream("127.0.0.1", target)

            async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, flip: int | None) -> None:
                seen = 0
                try:
                    while data := await src.receive_some(1 << 16):
                        if flip is not None and seen <= flip < seen + len(data):
                            buf = bytearray(data)
                            buf[flip - seen] ^= 0x01
                            data = bytes(buf)
                        seen += len(data)
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                finally:
                    await dst.aclose()

            nursery.start_soon(pump, client, server, flip_at)
            nursery.start_soon(pump, server, client, None)


async def test_corrupted_record_is_rejected_and_nothing_handed_out() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    x = {"x": torch.randn(1_000_000)}
    with trio.fail_after(GUARD):
        async with lanes(2, [{}, {"advertise": [("127.0.0.1", port)]}]) as (a, b):
            real = b._listener.getsockname()[1]  # type: ignore[union-attr]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_proxy, listeners[0], real, 3 << 20)  # deep inside a DATA record
                async with trio.open_nursery() as inner:

                    async def send() -> None:
                        with pytest.raises((PeerGone, RemoteProtocolError)):
                            await a.send(b.peer_id, "x", x)

                    inner.start_soon(send)
                    with pytest.raises(IntegrityError) as err:
                        await b.receive(a.peer_id, "x")
                    assert err.value.peer == a.peer_id
                nursery.cancel_scope.cancel()


async def test_stranger_on_data_port_learns_nothing_and_cannot_disturb() -> None:
    x = {"x": torch.randn(3_000_000)}
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            await transfer(a, b, {"warm": torch.zeros(1)}, tag="warm-up")  # establishes the session
            addr = b.data_addrs[0]
            session_id = next(iter(b._sessions.by_id))  # even a stranger who sniffed the session id
            replies: list[bytes] = []

            async def stranger(preamble: bytes) -> None:
                s = await trio.open_tcp_stream(*addr)
                await s.send_all(preamble + os.urandom(4096))
                with trio.move_on_after(2):
                    try:
                        while data := await s.receive_some(4096):
                            replies.append(data)
                    except trio.BrokenResourceError:
                        pass
                await s.aclose()

            got: dict[str, torch.Tensor] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: a.send(b.peer_id, "x", x))
                nursery.start_soon(stranger, b"")
                nursery.start_soon(stranger, b"P2PCLN01" + session_id)
                got = await b.receive(a.peer_id, "x")
    assert torch.equal(got["x"], x["x"])
    # the only bytes a stranger ever sees are one fresh random challenge (32 bytes)
    assert sum(len(r) for r in replies) <= 32
    assert b.statistics().rejected_connections >= 2


KILLED_SENDER = textwrap.dedent(
    """
    import sys, trio, torch
    from p2pcompute.identity import Identity
    from p2pcompute.overlay import open_node
    from p2pcompute.tensors import open_lane

    async def main():
        ident = Identity.from_seed(bytes.fromhex(sys.argv[1]))
        async with open_node(ident, advertise=False) as node:
            peer = await node.connect(sys.argv[2])
            async with open_lane(node) as lane:
                print("ready", flush=True)
                await lane.send(peer, "x", {"x": torch.randn(50_000_000)})
    trio.run(main)
    """
)


@pytest.mark.parametrize("fault", ["kill", "stop"])
async def test_peer_killed_or_frozen_mid_transfer_gives_typed_error_quickly(fault: str) -> None:
    seed = os.urandom(32)
    sender_id = Identity.from_seed(seed).peer_id
    with trio.fail_after(GUARD):
        async with lanes(1, [{"stall_timeout": 2.0 if fault == "stop" else 30.0}]) as (b,):
            addr = b.node.addrs[0]
            env = {**os.environ, "PYTHONPATH": os.getcwd()}
            proc = subprocess.Popen(
                [sys.executable, "-c", KILLED_SENDER, seed.hex(), addr], env=env, stdout=subprocess.PIPE
            )
            try:
                progress = trio.Event()

                def on_chunk(name: str, start: int, values: torch.Tensor) -> None:
                    if start > 5_000_000:
                        progress.set()

                async def fault_injector() -> None:
                    await progress.wait()
                    if fault == "kill":
                        proc.kill()
                    else:
                        proc.send_signal(signal.SIGSTOP)

                expected = PeerGone if fault == "kill" else PeerTimeout
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fault_injector)
                    with trio.fail_after(30), pytest.raises(expected):
                        await b.receive_chunks(sender_id, "x", on_chunk)
            finally:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()


async def test_lane_takes_its_identity_from_the_node() -> None:
    ident = Identity.generate()
    with trio.fail_after(GUARD):
        async with node(ident) as nd, open_lane(nd) as lane:
            assert lane.identity is ident
            assert lane.peer_id == nd.peer_id == ident.peer_id


async def test_sender_recovers_when_the_receiver_lane_restarted() -> None:
    with trio.fail_after(GUARD):
        async with nodes(2) as (na, nb), open_lane(na) as a:
            for round_ in range(2):  # the second lane on b knows nothing of a's cached session
                async with open_lane(nb) as b:
                    got = await transfer(a, b, {"x": torch.full((5,), float(round_))}, tag=f"r{round_}")
                    assert torch.equal(got["x"], torch.full((5,), float(round_)))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("codec", ["none", "bf16", "int8"])
async def test_cuda_tensors_are_staged_and_land_on_the_requested_device(codec: str) -> None:
    x = torch.randn(3_000_000, device="cuda")
    small = torch.arange(10, device="cuda")
    host_side = torch.randn(1000)
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            got = await transfer(a, b, {"x": x, "s": small, "h": host_side}, codec=codec, device="cuda")
            dst = torch.empty(3_000_000, device="cuda")
            got2 = await transfer(a, b, {"x": x}, tag="into", codec=codec, into={"x": dst})
    assert got["x"].is_cuda
    assert got2["x"] is dst
    assert torch.equal(got["s"], small)
    tol = {"none": 0.0, "bf16": 2**-7, "int8": 1 / 120}[codec]
    assert float((got["x"] - x).abs().max()) <= tol * float(x.abs().max())
    assert float((dst - x).abs().max()) <= tol * float(x.abs().max())


async def test_lane_leaves_torch_threads_alone() -> None:
    # the lane's workers run torch single-threaded; threads created afterwards must not inherit it
    before = torch.get_num_threads()
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            await transfer(a, b, {"x": torch.randn(300_000)}, codec="fp16")  # a worker-thread path
            await transfer(a, b, {"y": torch.randn(300_000)}, tag="plain")  # the bulk loop
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [before]
    assert torch.get_num_threads() == before


async def test_lane_listens_where_the_node_listens() -> None:
    # by default the data port follows the node's listen address, so a peer that can reach the
    # node reaches the lane too (it used to bind 127.0.0.1 whatever the node did)
    with trio.fail_after(GUARD):
        async with node(listen="/ip4/127.0.0.2/tcp/0") as nd, open_lane(nd) as lane:
            assert [h for h, _ in lane.data_addrs] == ["127.0.0.2"]
            assert lane._listener is not None
            assert lane._listener.getsockname()[0] == "127.0.0.2"


async def test_receivers_that_give_up_leave_nothing_behind() -> None:
    """A receive that times out or is cancelled forgets its wait; a second waiter on the same
    transfer still gets it."""
    x = torch.randn(1000)
    with trio.fail_after(GUARD):
        async with lanes() as (a, b):
            with pytest.raises(PeerTimeout):
                await b.receive(a.peer_id, "never", timeout=0.2)
            with trio.move_on_after(0.2):
                await b.wait_for_arrival(a.peer_id, "never-either", timeout=GUARD)
            assert not b._inbox.arrivals
            got: list[torch.Tensor] = []
            async with trio.open_nursery() as nursery:
                quitter = trio.CancelScope()

                async def give_up() -> None:
                    with quitter:
                        await b.receive(a.peer_id, "late")

                async def stay() -> None:
                    got.append((await b.receive(a.peer_id, "late"))["x"])

                nursery.start_soon(give_up)
                nursery.start_soon(stay)
                key = (a.peer_id, "late")
                while key not in b._inbox.arrivals or b._inbox.arrivals[key].statistics().tasks_waiting < 2:
                    await trio.lowlevel.checkpoint()  # until both wait on the one event
                quitter.cancel()
                await a.send(b.peer_id, "late", {"x": x})
            assert torch.equal(got[0], x)
            assert not b._inbox.arrivals


async def test_a_forced_seal_pool_keeps_records_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """seal_threads=3 (a pool on this 2-core machine too): every codec, several shards and
    records, a digest (pool off: hashing needs order) and a threaded reducer all round-trip."""
    from p2pcompute.tensors import pipeline

    pooled: list[bool] = []
    inner = pipeline._pooled_loop

    def spy(*args: Any) -> Any:
        pooled.append(args[1].outbound)
        return inner(*args)

    monkeypatch.setattr(pipeline, "_pooled_loop", spy)
    big = torch.randn(1_100_000)  # 5 records of 1 MiB
    # 18 records in all: more than the pool's 6 slots, so slots are reused while others are in flight
    more = {
        "big": big, "odd": torch.randn(3, 5, 7), "ints": torch.arange(600_000), "huge": torch.randn(2_000_000)
    }
    opts: list[dict[str, Any]] = [{"seal_threads": 3}, {"seal_threads": 3}]
    with trio.fail_after(GUARD):
        async with lanes(2, opts) as (a, b):
            got = await transfer(a, b, more)
            for name, t in more.items():
                assert same_bits(t, got[name]), name
            assert sorted(pooled) == [False, True]  # both sides ran the pool
            for codec, tol in (("bf16", 2**-7), ("int8", 1 / 120)):
                got = await transfer(a, b, {"x": big}, tag=codec, codec=codec)
                assert float((got["x"] - big).abs().max()) <= tol * float(big.abs().max())
            pooled.clear()
            got = await transfer(a, b, {"x": big}, tag="sha", digest="sha256")
            assert same_bits(big, got["x"])
            assert pooled == []  # digests are hashed in order, without the pool
