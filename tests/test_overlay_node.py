"""Real py-libp2p nodes on 127.0.0.1: streams, pubsub, discovery, expiry, bootstrap loss."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from conftest import TEST_CAPACITY, open_swarm

from p2pcompute.errors import ConfigError, LocalProtocolError, PeerGone, PeerTimeout, PeerUnreachable
from p2pcompute.overlay import FramedStream, Node, open_node
from p2pcompute.wire.codec import Field, Schema

ECHO = "/p2pcompute/test-echo/1"
PING = Schema("ping", 1, max_size=256, fields=(Field("n", int, min=0),))


async def test_stream_roundtrip_and_pubsub() -> None:
    with trio.fail_after(60):
        async with open_swarm(2) as (_boot, (a, b)):

            async def echo(stream: FramedStream) -> None:
                msg = await stream.recv_msg(PING)
                await stream.send_msg({"t": "ping", "v": 1, "n": msg["n"] + 1})

            b.set_stream_handler(ECHO, echo)
            s = await a.open_stream(b.peer_id, ECHO)
            assert s.peer == b.peer_id
            await s.send_msg({"t": "ping", "v": 1, "n": 41})
            assert (await s.recv_msg(PING))["n"] == 42
            await s.close()

            got: list[tuple[str, bytes]] = []
            arrived = trio.Event()

            async def bad_handler(sender: str, data: bytes) -> None:
                raise RuntimeError("handler bug")  # logged and counted, never fatal

            async def handler(sender: str, data: bytes) -> None:
                got.append((sender, data))
                arrived.set()

            b.subscribe("chat", bad_handler)
            b.subscribe("chat", handler)
            a.subscribe("chat", handler)  # a's own message is not delivered to a
            # the mesh forms within a heartbeat or two; publish until the first one lands
            while not arrived.is_set():
                await a.publish("chat", b"hello")
                with trio.move_on_after(0.5):
                    await arrived.wait()
            assert got[0] == (a.peer_id, b"hello")
            assert all(sender == a.peer_id for sender, _ in got)
            assert b.statistics()["handler_errors"] >= 1
            with pytest.raises(LocalProtocolError):
                await a.publish("chat", b"x" * (a.config.max_message_size + 1))


async def test_open_stream_failures_are_typed() -> None:
    with trio.fail_after(60):
        async with open_swarm(1) as (boot, (a,)):
            with pytest.raises(PeerUnreachable):
                await a.open_stream(boot.peer_id, "/p2pcompute/nobody-serves-this/1", timeout=10)
            stranger = "12D3KooWMdXMwwcfpkBTSCFouMKZN3Y9BorymzzMCYy7JvBjMS9g"
            with pytest.raises((PeerUnreachable, PeerTimeout)):
                await a.open_stream(stranger, ECHO, timeout=5)

            async def slow(stream: FramedStream) -> None:
                await stream.recv_msg(PING)

            boot.set_stream_handler(ECHO, slow)
            s = await a.open_stream(boot.peer_id, ECHO)
            await s.send_frame(b"\xc1")  # never valid msgpack
            await s.close()
            # a malformed request only ends that stream: the node still serves exchanges
            assert await a.exchange_peers(boot.peer_id) >= 0


async def test_bad_configuration_is_refused() -> None:
    with trio.fail_after(30):
        with pytest.raises(ConfigError):
            async with open_node(listen=["/ip4/127.0.0.1/tcp/notaport"]):
                pass
        with pytest.raises(ConfigError):
            async with open_node(bootstrap=["/ip4/127.0.0.1/tcp/4001"]):  # no /p2p/ part
                pass
        with pytest.raises(ConfigError):
            async with open_node(no_such_option=1):
                pass
        with pytest.raises(ConfigError):
            async with open_node(swarm="bad name!"):
                pass
        with pytest.raises(PeerUnreachable):
            async with open_node(
                bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWMdXMwwcfpkBTSCFouMKZN3Y9BorymzzMCYy7JvBjMS9g"],
                capacity=TEST_CAPACITY,
            ):
                pass


async def test_errors_in_the_body_surface_unwrapped() -> None:
    with trio.fail_after(30), pytest.raises(KeyError):
        async with open_node(capacity=TEST_CAPACITY):
            raise KeyError("mine")


class Runner:
    """Runs nodes in tasks so a test can stop any one of them (leave, crash of the bootstrap)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scopes: dict[str, trio.CancelScope] = {}

    async def start(self, **kwargs: Any) -> Node:
        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                async with open_node(**kwargs) as node:
                    self.scopes[node.peer_id] = scope
                    task_status.started(node)
                    await trio.sleep_forever()

        node: Node = await self.nursery.start(run)
        return node

    def stop(self, node: Node) -> None:
        self.scopes.pop(node.peer_id).cancel()


@contextlib.asynccontextmanager
async def runner() -> AsyncIterator[Runner]:
    async with trio.open_nursery() as nursery:
        r = Runner(nursery)
        yield r
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_eight_nodes_join_expire_and_survive_bootstrap_loss() -> None:
    fast: dict[str, Any] = {
        "capacity": TEST_CAPACITY,
        # 9 nodes share one loaded process (about 15 ms of CPU per advert per receiver):
        # keep advert traffic near 3 per second in all (8 / 3 s), so a loaded machine keeps up
        "advert_interval": 3.0,
        "advert_ttl": 9.0,  # a node that vanishes expires within 9 s (plus the expiry tick)
        "probe_interval": 3.0,
        "discovery_interval": 2.0,
        "expire_interval": 0.5,
    }
    with trio.fail_after(600):
        async with runner() as r:
            boot = await r.start(role="bootstrap", **fast)
            nodes = [await r.start(bootstrap=boot.addrs, **fast) for _ in range(8)]
            ids = {n.peer_id for n in nodes}

            # every table holds all 8 adverts (7 other peers + the bootstrap node for peers)
            try:
                with trio.fail_after(120):
                    for n in nodes:
                        await n.wait_for_peers(7, timeout=120, role="peer")
                    await boot.wait_for_peers(8, timeout=120, role="peer")
            except (trio.TooSlowError, PeerTimeout):
                state = [(len(n.peers.alive()), n.statistics()) for n in [boot, *nodes]]
                raise AssertionError(f"tables did not fill: {state}") from None
            for n in nodes:
                assert {rec.peer_id for rec in n.peers.alive()} >= ids - {n.peer_id}
            # each peer keeps direct links to several peers, not only to the bootstrap node
            # (dialing runs in the background after open_node returns)
            for n in nodes:
                links = lambda n=n: len(set(n.connected_peers()) - {boot.peer_id})  # noqa: E731
                await n.wait_until(lambda links=links: links() >= 3, timeout=60)
            assert {rec.peer_id for rec in boot.peers.alive()} == ids

            # a node that leaves expires everywhere
            leaver = nodes.pop()
            r.stop(leaver)

            async def gone_everywhere(peer: str, among: list[Node]) -> None:
                for n in among:
                    await n.wait_until(lambda n=n: peer not in n.peers, timeout=90)

            with trio.fail_after(90):
                await gone_everywhere(leaver.peer_id, [*nodes, boot])

            # the bootstrap node stops: the others keep their mesh and tables
            r.stop(boot)
            with trio.fail_after(90):
                await gone_everywhere(boot.peer_id, nodes)
            received: dict[str, int] = {n.peer_id: 0 for n in nodes}
            all_in = trio.Event()

            def make(peer: str) -> Any:
                async def on(sender: str, data: bytes) -> None:
                    received[peer] += 1
                    if all(received[p] for p in received if p != nodes[0].peer_id):
                        all_in.set()

                return on

            for n in nodes:
                n.subscribe("after-bootstrap", make(n.peer_id))
            with trio.fail_after(60):
                while not all_in.is_set():
                    await nodes[0].publish("after-bootstrap", b"still here")
                    with trio.move_on_after(1.0):
                        await all_in.wait()
            # adverts keep flowing without the bootstrap node: every node hears a fresh advert
            # from every other node after the bootstrap node is gone
            t_stop = time.time()

            def fresh_everywhere() -> bool:
                for n in nodes:
                    seen = {rec.peer_id: rec.last_seen for rec in n.peers.alive()}
                    if any(seen.get(m.peer_id, 0.0) <= t_stop for m in nodes if m is not n):
                        return False
                return True

            with trio.fail_after(90):
                for n in nodes:
                    await n.wait_until(fresh_everywhere, timeout=90)


async def test_malformed_peer_exchange_request_is_blamed() -> None:
    with trio.fail_after(60):
        async with open_swarm(1) as (boot, (a,)):
            raw = await a.open_stream(boot.peer_id, f"/p2pcompute/{a.swarm}/peers/1.0.0")
            await raw.send_msg({"t": "peers_req", "v": 1, "limit": 1, "advert": b"\x00" * 10})
            reply = await raw.recv_msg(max_size=1 << 20)
            assert reply["t"] == "peers"  # the request is answered; the bad advert in it is counted
            await raw.close()
            await boot.wait_until(lambda: bool(boot.peers.offences(a.peer_id)), timeout=10)
            assert boot.peers.offences(a.peer_id) == {"malformed": 1}


async def test_repeat_offender_is_blacklisted() -> None:
    with trio.fail_after(60):
        async with open_swarm(1, offence_limit=3) as (boot, (a,)):
            proto = f"/p2pcompute/{a.swarm}/peers/1.0.0"
            for _ in range(3):
                s = await a.open_stream(boot.peer_id, proto)
                await s.send_msg({"t": "peers_req", "v": 1, "limit": 0, "advert": b"forged"})
                with contextlib.suppress(PeerGone):  # the third offence cuts the connection at once
                    await s.recv_msg(max_size=1 << 20)
                await s.close()
            assert boot.statistics()["banned"] == 1
            assert a.peer_id not in {r.peer_id for r in boot.peers.alive()}
            assert boot.find_peers() == []
            with pytest.raises(PeerUnreachable):
                await boot.open_stream(a.peer_id, proto)


async def test_peer_exchange_hands_on_many_adverts() -> None:

    from p2pcompute.capacity import make_advert
    from p2pcompute.identity import Identity

    with trio.fail_after(60):
        async with open_swarm(1) as (boot, (a,)):
            others = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 61)]
            for ident in others:  # 60 signed adverts, about 40 KiB: more than one small frame
                raw = make_advert(
                    ident,
                    peer_id=ident.peer_id,
                    swarm=boot.swarm,
                    seq=1,
                    capacity=TEST_CAPACITY,
                    addrs=["/ip4/127.0.0.1/tcp/9"],
                    ttl=60.0,
                    issued=time.time(),
                )
                boot.peers.offer(raw, sender=ident.peer_id)
            assert await a.exchange_peers(boot.peer_id) >= 60
            assert {i.peer_id for i in others} <= {r.peer_id for r in a.peers.alive()}


async def test_garbage_on_the_pubsub_protocol_leaves_the_node_running() -> None:
    """A peer that writes a length-prefixed non-protobuf RPC on /meshsub must not take us down."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
    from libp2p.utils.varint import encode_uvarint

    with trio.fail_after(60):
        async with open_swarm(1) as (boot, (a,)):
            raw = await a.host.new_stream(boot.host.get_id(), [PROTOCOL_ID_V11])
            junk = b"\xff" * 40  # not a protobuf message: a field with wire type 7
            await raw.write(encode_uvarint(len(junk)) + junk)
            await boot.wait_until(lambda: bool(boot.peers.offences(a.peer_id)), timeout=10)
            assert boot.peers.offences(a.peer_id) == {"malformed": 1}
            # and the node goes on serving the peer that sent it
            served = boot.statistics()["px_served"]
            await a.exchange_peers(boot.peer_id)
            assert boot.statistics()["px_served"] == served + 1


async def test_an_invalid_peer_exchange_request_is_refused_before_it_is_sent() -> None:
    """Messages are built through their schema: an over-long advert of ours is our bug, not the peer's."""
    from p2pcompute.capacity.adverts import MAX_ADVERT_SIZE

    with trio.fail_after(60):
        async with (
            open_node(role="bootstrap", capacity=TEST_CAPACITY) as boot,
            # an observer publishes no advert of its own, so nothing replaces the one set below
            open_node(bootstrap=boot.addrs, advertise=False, capacity=TEST_CAPACITY) as a,
        ):
            served = boot.statistics()["px_served"]
            a._current_advert = b"x" * (MAX_ADVERT_SIZE + 1)
            with pytest.raises(LocalProtocolError):
                await a.exchange_peers(boot.peer_id)
            assert boot.statistics()["px_served"] == served
            assert boot.statistics()["handler_errors"] == 0
