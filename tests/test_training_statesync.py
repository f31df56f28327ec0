"""Elastic-join state download: the sans-IO core, then real nodes on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import torch
import trio
from conftest import open_swarm
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import (
    BadSignature,
    IntegrityError,
    LocalProtocolError,
    MalformedMessage,
    PeerTimeout,
    PeerUnreachable,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay import FramedStream
from p2pcompute.progress import ProgressUpdate
from p2pcompute.training.state import TrainingState
from p2pcompute.training.statesync import (
    MIN_CHUNK,
    PROTOCOL,
    Manifest,
    Snapshot,
    StateDownload,
    StateServer,
    download_state,
    fetch_manifest,
)
from p2pcompute.wire.signing import seal_signed


def make_state(step: int = 5, n: int = 3000, seed: int = 0) -> TrainingState:
    g = torch.Generator().manual_seed(seed)
    return TrainingState(
        step,
        {"param/w": torch.randn(n, generator=g), "outer/w": torch.randn(n, generator=g),
         "param/b": torch.zeros(3, dtype=torch.bfloat16)},
        {"mode": "diloco", "inner_steps": 20},
    )


def test_download_from_several_peers_is_bit_identical() -> None:
    state = make_state()
    snap = Snapshot.of(state, chunk_size=MIN_CHUNK)
    dl = StateDownload(inflight_per_peer=1)
    for p in ("a", "b", "c"):
        dl.offer(p, snap.manifest)
    dl.choose()
    for _ in range(1000):
        if dl.done:
            break
        reqs = dl.next_requests()
        assert len({p for p, _ in reqs}) == len(reqs)  # one in flight per peer
        for peer, index in reqs:
            dl.chunk_received(peer, index, snap.chunk(index))
    got = dl.result()
    assert got.digest() == state.digest()
    assert set(dl.served) == {"a", "b", "c"}
    assert sum(dl.served.values()) == len(snap.manifest.chunk_digests)


def test_bad_chunk_blames_the_peer_and_others_take_over() -> None:
    snap = Snapshot.of(make_state(), chunk_size=MIN_CHUNK)
    dl = StateDownload()
    dl.offer("honest", snap.manifest)
    dl.offer("liar", snap.manifest)
    dl.choose()
    for _ in range(1000):
        if dl.done:
            break
        for peer, index in dl.next_requests():
            data = snap.chunk(index)
            if peer == "liar":
                data = bytes([data[0] ^ 1]) + data[1:]
                with pytest.raises(IntegrityError) as err:
                    dl.chunk_received(peer, index, data)
                assert err.value.peer == "liar"
            else:
                dl.chunk_received(peer, index, data)
    assert "liar" in dl.blamed
    assert dl.sources == ["honest"]
    assert dl.result().digest() == snap.manifest.digest


def test_failed_peers_and_stuck_download() -> None:
    snap = Snapshot.of(make_state(), chunk_size=MIN_CHUNK)
    dl = StateDownload()
    dl.offer("a", snap.manifest)
    dl.choose()
    (peer, index), *_ = dl.next_requests()
    dl.request_failed(peer, index, "gone")
    assert dl.stuck
    assert not dl.done
    with pytest.raises(LocalProtocolError):
        dl.result()
    with pytest.raises(IntegrityError):
        dl.chunk_received("a", 0, snap.chunk(0))  # a dropped source's chunks are not accepted


def test_choice_prefers_agreement_then_step() -> None:
    new, old = Snapshot.of(make_state(step=9, seed=1)), Snapshot.of(make_state(step=8, seed=2))
    other_new = Snapshot.of(make_state(step=9, seed=3))
    dl = StateDownload(min_agree=2)
    dl.offer("x", new.manifest)  # a lone claim of the newest step
    dl.offer("y", old.manifest)
    dl.offer("z", old.manifest)
    assert dl.choose().digest == old.manifest.digest
    assert dl.sources == ["y", "z"]
    dl2 = StateDownload()
    dl2.offer("x", new.manifest)
    dl2.offer("w", other_new.manifest)
    dl2.offer("v", other_new.manifest)
    dl2.offer("y", old.manifest)
    assert dl2.choose().digest == other_new.manifest.digest
    with pytest.raises(PeerUnreachable):
        StateDownload(min_agree=3).choose()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["ok", "bad", "fail"])), max_size=200),
)
def test_any_interleaving_ends_correct_or_stuck(npeers: int, script: list[tuple[int, str]]) -> None:
    snap = Snapshot.of(make_state(n=2500), chunk_size=MIN_CHUNK)
    dl = StateDownload(inflight_per_peer=2)
    peers = [f"p{i}" for i in range(npeers)]
    for p in peers:
        dl.offer(p, snap.manifest)
    dl.choose()
    pending: list[tuple[str, int]] = []
    for pick, kind in script:
        pending += dl.next_requests()
        if not pending or dl.done:
            break
        peer, index = pending.pop(pick % len(pending))
        if peer not in dl.sources:
            continue
        if kind == "ok":
            dl.chunk_received(peer, index, snap.chunk(index))
        elif kind == "bad":
            with pytest.raises(IntegrityError):
                dl.chunk_received(peer, index, b"x" * len(snap.chunk(index)))
        else:
            dl.request_failed(peer, index, "boom")
    # Finish with whoever is left, all honest now.
    for _ in range(1000):
        if dl.done or dl.stuck:
            break
        pending += dl.next_requests()
        assert pending, "requests in flight must not be lost"
        peer, index = pending.pop()
        if peer in dl.sources:
            dl.chunk_received(peer, index, snap.chunk(index))
    if dl.done:
        assert dl.result().digest() == snap.manifest.digest
    else:
        assert not dl.sources


def test_manifest_must_match_its_header() -> None:
    snap = Snapshot.of(make_state())
    assert Manifest.from_body(msgpack.unpackb(snap.manifest.to_body()), peer="p") == snap.manifest
    obj = msgpack.unpackb(snap.manifest.to_body())
    obj["step"] = 99
    with pytest.raises(MalformedMessage):
        Manifest.from_body(obj, peer="p")
    obj["step"] = 5
    obj["chunks"] = obj["chunks"][:-1]
    with pytest.raises(MalformedMessage):
        Manifest.from_body(obj, peer="p")


class CorruptServer(StateServer):
    """Signs an honest manifest but serves flipped bytes."""

    def publish(self, state: TrainingState) -> Manifest:
        manifest = super().publish(state)
        assert self.snapshot is not None
        body = bytearray(self.snapshot.body)
        for i in range(0, len(body), 997):
            body[i] ^= 0xFF
        self.snapshot.body = bytes(body)
        return manifest


async def test_joiner_downloads_from_two_nodes_and_blames_a_liar() -> None:
    state = make_state(n=100_000)  # ~0.8 MB: 13 chunks of 64 KiB
    with trio.fail_after(180):
        async with open_swarm(4) as (_boot, (a, b, liar, joiner)):
            for node in (a, b):
                StateServer(node, node.identity, chunk_size=64 << 10).publish(state)
            CorruptServer(liar, liar.identity, chunk_size=64 << 10).publish(state)
            for node in (a, b, liar):
                await joiner.connect(node.addrs[0])
            seen: list[ProgressUpdate] = []
            got, report = await download_state(
                joiner, [a.peer_id, b.peer_id, liar.peer_id], timeout=150, progress=seen.append
            )
            assert got.digest() == state.digest()
            assert got.step == 5
            # progress counted verified bytes only (the liar's chunks were not), ending at the size
            assert [u.done for u in seen] == sorted(u.done for u in seen)
            assert seen[-1].finished
            assert seen[-1].ok
            assert seen[-1].done == seen[-1].total == report.bytes
            assert sum(u.finished for u in seen) == 1
            assert liar.peer_id in report.blamed
            assert report.sources.get(a.peer_id, 0) > 0
            assert report.sources.get(b.peer_id, 0) > 0
            assert report.bytes >= 800_000


async def test_manifest_signed_by_someone_else_is_refused() -> None:
    with trio.fail_after(120):
        async with open_swarm(2) as (_boot, (server, client)):
            srv = StateServer(server, server.identity)
            srv.publish(make_state(n=10))
            # Re-sign the manifest with a key that is not the serving peer's.
            assert srv.snapshot is not None
            body = srv.snapshot.manifest.to_body()
            srv._envelope = seal_signed("training-state", body, Identity.generate())
            await client.connect(server.addrs[0])
            with pytest.raises(BadSignature):
                await fetch_manifest(client, server.peer_id, timeout=10)
            with pytest.raises(PeerUnreachable):
                await download_state(client, [server.peer_id], timeout=20)


async def test_nobody_has_state_yet() -> None:
    with trio.fail_after(120):
        async with open_swarm(2) as (_boot, (server, client)):
            StateServer(server, server.identity)
            await client.connect(server.addrs[0])
            assert await fetch_manifest(client, server.peer_id, timeout=10) is None
            with pytest.raises(PeerUnreachable):
                await download_state(client, [server.peer_id], timeout=20)


async def test_a_silent_server_is_a_peer_timeout_not_a_trio_error() -> None:
    """fetch_manifest used to let trio.TooSlowError escape; callers see only our hierarchy."""
    with trio.fail_after(120):
        async with open_swarm(2) as (_boot, (server, client)):

            async def silent(stream: FramedStream) -> None:
                await trio.sleep_forever()

            server.set_stream_handler(PROTOCOL, silent)
            await client.connect(server.addrs[0])
            with pytest.raises(PeerTimeout) as info:
                await fetch_manifest(client, server.peer_id, timeout=0.5)
            assert info.value.peer == server.peer_id
            with pytest.raises(PeerTimeout):
                await download_state(client, [server.peer_id], timeout=0.5, request_timeout=5)


async def test_publishing_serializes_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of a large state is serialized and hashed off the event loop."""
    seen: list[bool] = []
    real = Snapshot.of

    def spy(state: TrainingState, **kw: Any) -> Snapshot:
        seen.append(trio.lowlevel.in_trio_run())
        return real(state, **kw)

    monkeypatch.setattr(Snapshot, "of", staticmethod(spy))
    with trio.fail_after(60):
        async with open_swarm(1) as (_boot, (server,)):
            srv = StateServer(server, server.identity)
            manifest = await srv.apublish(make_state(n=10))
            assert manifest.step == 5
            assert srv.snapshot is not None
            assert srv.snapshot.manifest == manifest
    assert seen == [False]
