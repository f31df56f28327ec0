"""py-libp2p's exceptions become ours in one place (p2pcompute.overlay.failures), naming the peer.

Real hosts on 127.0.0.1 for dials and streams; the mapping table itself is checked directly.
"""

from __future__ import annotations

import socket

import pytest
import trio
from conftest import TEST_CAPACITY, open_swarm

from p2pcompute.errors import (
    ConfigError,
    LocalProtocolError,
    PeerGone,
    PeerTimeout,
    PeerUnreachable,
)
from p2pcompute.identity import Identity
from p2pcompute.overlay import FramedStream, open_node
from p2pcompute.overlay.failures import (
    dead_stream_ok,
    peer_of,
    reaching,
    stream_io,
    to_peer_id,
)

PROTO = "/p2pcompute/test-reset/1"


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_dial_to_a_closed_port_is_unreachable_and_names_the_peer() -> None:
    target = Identity.generate().peer_id
    with trio.fail_after(60):
        async with open_node(capacity=TEST_CAPACITY) as node:
            with pytest.raises(PeerUnreachable) as caught:
                await node.connect(f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{target}", timeout=10)
            assert caught.value.peer == target
            assert target in str(caught.value)
            assert node.statistics()["dial_failures"] == 1


async def test_dial_to_a_silent_listener_times_out_and_names_the_peer() -> None:
    target = Identity.generate().peer_id
    with trio.fail_after(60):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with open_node(capacity=TEST_CAPACITY) as node, trio.open_nursery() as nursery:

            async def accept_and_say_nothing() -> None:
                async with await listeners[0].accept():  # open, but the handshake never starts
                    await trio.sleep_forever()

            nursery.start_soon(accept_and_say_nothing)
            with pytest.raises(PeerTimeout) as caught:
                await node.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{target}", timeout=0.5)
            assert caught.value.peer == target
            nursery.cancel_scope.cancel()
        await listeners[0].aclose()


async def test_a_reset_stream_is_peer_gone_and_names_the_peer() -> None:
    with trio.fail_after(60):
        async with open_swarm(1) as (boot, (a,)):

            async def reset_it(stream: FramedStream) -> None:
                await stream.recv_frame(64)
                await stream.reset()

            boot.set_stream_handler(PROTO, reset_it)
            s = await a.open_stream(boot.peer_id, PROTO)
            await s.send_frame(b"hi")
            with pytest.raises(PeerGone) as caught:
                await s.recv_frame(64)
            assert caught.value.peer == boot.peer_id
            await s.close()  # closing a dead stream is not an error


async def test_opening_an_unserved_protocol_is_unreachable_and_names_the_peer() -> None:
    with trio.fail_after(60):
        async with open_swarm(1) as (boot, (a,)):
            with pytest.raises(PeerUnreachable) as caught:
                await a.open_stream(boot.peer_id, "/p2pcompute/nobody-serves-this/1", timeout=10)
            assert caught.value.peer == boot.peer_id


def test_the_stream_mapping_table() -> None:
    from libp2p.network.stream.exceptions import StreamEOF, StreamReset
    from libp2p.stream_muxer.exceptions import MuxedStreamReset

    cases = ((StreamEOF(), "ended early"), (StreamReset(), "failed"), (MuxedStreamReset(), "failed"))
    for raw, says in cases:
        with pytest.raises(PeerGone, match=says) as caught, stream_io("12D3KooWpeer", "reading"):
            raise raw
        assert caught.value.peer == "12D3KooWpeer"
    with pytest.raises(KeyError), stream_io("p", "reading"):
        raise KeyError("a bug stays a bug")
    with dead_stream_ok():
        raise StreamReset()
    with pytest.raises(KeyError), dead_stream_ok():
        raise KeyError("a bug stays a bug")


async def test_the_dial_mapping_table() -> None:
    with (
        pytest.raises(PeerUnreachable, match="ConnectionRefusedError") as caught,
        reaching("12D3KooWpeer", "dialing", timeout=None),
    ):
        raise ConnectionRefusedError("refused")
    assert caught.value.peer == "12D3KooWpeer"
    assert "no connection to the peer could be made" in str(caught.value)
    with pytest.raises(LocalProtocolError), reaching("p", "dialing", timeout=None):
        raise LocalProtocolError("ours pass through")
    with pytest.raises(ConfigError):
        peer_of("/ip4/127.0.0.1/tcp/1")
    with pytest.raises(LocalProtocolError):
        to_peer_id("not a peer id")


async def test_a_dial_that_runs_out_of_time_is_peer_timeout(autojump_clock: trio.abc.Clock) -> None:
    with (
        pytest.raises(PeerTimeout, match="within 5 s") as caught,
        reaching("12D3KooWpeer", "dialing", timeout=5),
    ):
        await trio.sleep_forever()
    assert caught.value.peer == "12D3KooWpeer"
