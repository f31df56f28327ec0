"""Reachability and relays: the sans-IO rules (hypothesis) and real py-libp2p hosts on this machine.

The NAT itself (namespaces, nft masquerade) is exercised in tests/test_nat_topology.py.
"""

from __future__ import annotations

import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pcompute.overlay import FramedStream, open_node
from p2pcompute.overlay.reach import (
    MAX_DIAL_BACKS,
    PRIVATE,
    PUBLIC,
    REACH_REPLY,
    REACH_REQUEST,
    UNKNOWN,
    Reachability,
    addr_ip,
    advertisable,
    dial_back_targets,
    is_loopback,
    is_relayed,
)
from p2pcompute.wire.codec import encode
from tests.conftest import TEST_CAPACITY

IPS = st.sampled_from(
    ["127.0.0.1", "127.0.0.2", "10.0.0.2", "192.168.1.4", "198.51.100.7", "::1", "2001:db8::1"]
)
STATES = st.sampled_from([UNKNOWN, PUBLIC, PRIVATE])
PORTS = st.integers(min_value=1, max_value=65535)


@st.composite
def direct_addr(draw: st.DrawFn) -> str:
    ip = draw(IPS)
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{draw(PORTS)}"


RELAYED = st.builds(lambda a: f"{a}/p2p/12D3KooWRelay/p2p-circuit", direct_addr())


@given(st.lists(direct_addr(), max_size=6), st.lists(RELAYED, max_size=3), STATES)
def test_advertised_addresses_never_offer_loopback_beside_others(
    direct: list[str], relayed: list[str], state: str
) -> None:
    out = advertisable(direct, state=state, relayed=relayed, reached=direct[:1])
    assert set(out) <= set(direct) | set(relayed)
    assert len(out) == len(set(out))
    if any(not is_loopback(a) for a in direct):
        assert not any(is_loopback(a) for a in out)
    if state == PRIVATE and relayed:
        assert out
        assert all(is_relayed(a) for a in out)
    if state == PUBLIC and direct:
        reached = direct[0]
        if reached in out:
            assert out[0] == reached  # the dialed-back address first


@given(st.lists(st.one_of(direct_addr(), RELAYED), max_size=12), st.one_of(st.none(), IPS))
def test_a_server_dials_back_only_the_ip_it_saw(addrs: list[str], observed: str | None) -> None:
    targets = dial_back_targets(addrs, observed)
    assert len(targets) <= MAX_DIAL_BACKS
    for addr, ip, port in targets:
        assert ip == observed == addr_ip(addr)
        assert addr.endswith(f"/tcp/{port}")


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans()), max_size=10), st.integers(1, 3))
def test_one_dial_back_makes_us_public_and_enough_failures_private(
    answers: list[tuple[str, bool]], confirmations: int
) -> None:
    r = Reachability(confirmations=confirmations)
    for server, ok in answers:
        r.record(server, reached=["/ip4/198.51.100.7/tcp/1"] if ok else [], observed="198.51.100.7")
    latest = dict(answers)
    if any(latest.values()):
        assert r.state == PUBLIC
    elif len(latest) >= confirmations:
        assert r.state == PRIVATE
    else:
        assert r.state == UNKNOWN
    assert Reachability(manual=PRIVATE).state == PRIVATE


def test_a_server_on_this_machine_that_reached_nothing_gives_no_verdict() -> None:
    # it saw us over loopback and only dials the IP it saw: its failure says nothing of others
    r = Reachability(confirmations=1)
    assert r.record("local-boot", reached=[], observed="127.0.0.1") == UNKNOWN
    assert r.record("local-boot6", reached=[], observed="::1") == UNKNOWN
    assert r.record("far", reached=[], observed="198.51.100.7") == PRIVATE
    assert r.record("local-boot", reached=["/ip4/127.0.0.1/tcp/1"], observed="127.0.0.1") == PUBLIC


def test_reach_messages_are_capped_and_strict() -> None:
    raw = REACH_REQUEST.build(addrs=["/ip4/10.0.0.2/tcp/1"])
    assert REACH_REQUEST.parse(raw)["addrs"] == ["/ip4/10.0.0.2/tcp/1"]
    from p2pcompute.errors import MalformedMessage

    too_many = encode({"t": "reach_req", "v": 1, "addrs": ["/ip4/10.0.0.2/tcp/1"] * (MAX_DIAL_BACKS + 1)})
    with pytest.raises(MalformedMessage):
        REACH_REQUEST.parse(too_many, peer="x")
    with pytest.raises(MalformedMessage):
        REACH_REPLY.parse(encode({"t": "reach", "v": 1, "reached": [1]}), peer="x")


def _outside_ip() -> str | None:
    """A non-loopback IPv4 address of this machine (the one a default route would use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


ECHO = "/p2pcompute/test-nat-echo/1"


@pytest.mark.slow
async def test_a_private_peer_is_reached_through_the_relay_and_a_public_one_learns_it_is_public() -> None:
    opts = {"capacity": TEST_CAPACITY, "advert_interval": 1.0, "advert_ttl": 3.0}
    outside = _outside_ip()
    listen = [f"/ip4/{outside}/tcp/0"] if outside else ["/ip4/127.0.0.1/tcp/0"]
    with trio.fail_after(45):
        async with (
            open_node(role="bootstrap", relay=True, listen=listen, **opts) as boot,
            open_node(bootstrap=boot.addrs, reachability="private", listen=listen, **opts) as hidden,
        ):
            assert await hidden.check_reachability() == PRIVATE
            assert hidden.addrs
            assert all(is_relayed(a) for a in hidden.addrs)
            assert hidden.reach_status()["relays"] == [boot.peer_id]

            async def echo(stream: FramedStream) -> None:
                await stream.send_msg(await stream.recv_msg(max_size=64))

            hidden.set_stream_handler(ECHO, echo)
            async with open_node(bootstrap=boot.addrs, listen=listen, **opts) as seeker:
                await seeker.wait_until(lambda: hidden.peer_id in seeker.peers, timeout=20)
                stream = await seeker.open_stream(hidden.peer_id, ECHO)
                await stream.send_msg({"n": 1})
                assert await stream.recv_msg(max_size=64) == {"n": 1}
                await stream.close()
                assert seeker.link(hidden.peer_id) == "circuit"
                assert seeker.link(boot.peer_id) == "direct"
                if outside:  # the bootstrap node dialed us back on our outside address
                    assert await seeker.check_reachability() == PUBLIC
                    assert seeker.reach_status()["observed"] == [outside]
                    assert seeker.reach_status()["reached"]
