"""Lane keys and records without I/O: key agreement, AEAD records, and an in-memory transfer
through the same Stager -> seal -> open -> Lander path the lane runs (hypothesis over dtypes,
shapes and codecs)."""

from __future__ import annotations

import math
import os

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import IntegrityError, LocalProtocolError, MalformedMessage
from p2pcompute.tensors import codecs
from p2pcompute.tensors.staging import Lander, Stager
from p2pcompute.wire.lanekeys import (
    HELLO,
    MAX_CIPHERS,
    MAX_SPEED,
    CipherSpeed,
    Handshake,
    RecordOpener,
    RecordSealer,
    available_ciphers,
    choose_cipher,
    cipher_speeds,
    transfer_keys,
)
from p2pcompute.wire.shards import (
    CODECS,
    HEADER_SIZE,
    KIND_DATA,
    MIN_RECORD_SIZE,
    ShardSpec,
    effective_codec,
    plan_records,
)


def _pair(a: str = "A", b: str = "B") -> tuple[Handshake, Handshake]:
    return (
        Handshake(initiator=True, local_id=a, remote_id=b, addrs=[("127.0.0.1", 4000)]),
        Handshake(initiator=False, local_id=b, remote_id=a, addrs=[]),
    )


def test_handshake_agrees_on_directional_keys() -> None:
    ha, hb = _pair()
    ka, kb = ha.finish(hb.hello), hb.finish(ha.hello)
    assert ka.session_id == kb.session_id
    assert ka.send_base == kb.recv_base
    assert ka.recv_base == kb.send_base
    assert ka.send_base != ka.recv_base
    assert kb.peer_addrs == (("127.0.0.1", 4000),)
    assert ka.peer_addrs == ()


def test_keys_are_bound_to_peer_ids_and_fresh() -> None:
    ha, _hb = _pair()
    hb_wrong = Handshake(initiator=False, local_id="B", remote_id="MALLORY", addrs=[])
    ka = ha.finish(hb_wrong.hello)
    kb = hb_wrong.finish(ha.hello)
    assert ka.send_base != kb.recv_base  # B thinks it talks to someone else: no common keys
    ha2, hb2 = _pair()
    assert ha2.finish(hb2.hello).send_base != _pair()[0].finish(hb2.hello).send_base


def _hello(ciphers: object, **over: object) -> bytes:
    fields = {"nonce": os.urandom(32), "kx": os.urandom(32), "addrs": [], "ciphers": ciphers, **over}
    return msgpack.packb({"t": "lane-hello", "v": 3, **fields})  # type: ignore[no-any-return]


def test_bad_hello_is_rejected() -> None:
    ha, _ = _pair()
    gcm = [["aes-256-gcm", 900, 800]]
    with pytest.raises(MalformedMessage):
        ha.finish(_hello(gcm, kx=bytes(32)))  # low-order point
    with pytest.raises(MalformedMessage):
        ha.finish(_hello(gcm, addrs=[["h", 70000]]))
    with pytest.raises(MalformedMessage, match="no record cipher in common"):
        ha.finish(_hello([["rot13", 5, 5]]))
    for bad in (
        [],  # nothing offered
        ["aes-256-gcm"],  # a v2 list of bare names
        [["aes-256-gcm", 900]],  # no open figure
        [["aes-256-gcm", 900, 800, 1]],
        [["aes-256-gcm", 0, 800]],  # figures are >= 1 MB/s
        [["aes-256-gcm", 900, 10**8]],  # and capped
        [["aes-256-gcm", True, 800]],
        [["aes-256-gcm", 900.5, 800]],
        [["", 900, 800]],
        [["x" * 33, 900, 800]],
        [["aes-256-gcm", 900, 800], ["aes-256-gcm", 700, 700]],  # listed twice
        [[f"c{i}", 5, 5] for i in range(9)],  # over the list cap
    ):
        with pytest.raises(MalformedMessage) as err:
            ha.finish(_hello(bad))
        assert err.value.peer == "B"
    with pytest.raises(MalformedMessage, match="version"):  # a peer still on the name-only hello
        ha.finish(msgpack.packb({"t": "lane-hello", "v": 2, "nonce": os.urandom(32), "kx": os.urandom(32),
                                 "addrs": [], "ciphers": ["aes-256-gcm"]}))


def test_measured_speeds_are_advertised_fastest_first() -> None:
    measured = cipher_speeds()
    assert {s.name for s in measured} == set(available_ciphers())
    assert all(1 <= s.seal <= MAX_SPEED and 1 <= s.open <= MAX_SPEED for s in measured)
    assert [s.slowest for s in measured] == sorted((s.slowest for s in measured), reverse=True)
    assert cipher_speeds() is measured  # once per process
    a, _ = _pair()
    assert HELLO.parse(a.hello)["ciphers"] == [list(s) for s in measured]


FIGURES = {"aes-256-gcm": (9000, 8800), "aes-256-ocb3": (6000, 5900), "chacha20-poly1305": (3700, 3600)}
OLD_CPU = {"aes-256-gcm": (2600, 2500), "aes-256-ocb3": (4300, 4200), "chacha20-poly1305": (3700, 3600)}


def test_the_cipher_is_the_one_whose_slower_side_is_fastest() -> None:
    gcm, ocb = ("aes-256-gcm",), ("aes-256-ocb3",)
    for (mine, my_speed), (theirs, their_speed), chosen in (
        ((None, FIGURES), (None, FIGURES), "aes-256-gcm"),
        ((None, FIGURES), (None, OLD_CPU), "aes-256-ocb3"),  # 4200 on the old CPU beats GCM's 2500
        ((None, OLD_CPU), (None, FIGURES), "aes-256-ocb3"),  # whoever initiates
        ((gcm, FIGURES), (None, OLD_CPU), "aes-256-gcm"),  # the only one in common
        ((None, FIGURES), (ocb, FIGURES), "aes-256-ocb3"),
    ):
        a = Handshake(initiator=True, local_id="A", remote_id="B", addrs=[], ciphers=mine, speeds=my_speed)
        b = Handshake(
            initiator=False, local_id="B", remote_id="A", addrs=[], ciphers=theirs, speeds=their_speed
        )
        ka, kb = a.finish(b.hello), b.finish(a.hello)
        assert ka.cipher == kb.cipher == chosen
        assert ka.cipher_why == kb.cipher_why
        assert ka.cipher_why.startswith(chosen)
        assert ka.send_base == kb.recv_base
    with pytest.raises(LocalProtocolError):
        Handshake(initiator=True, local_id="A", remote_id="B", addrs=[], ciphers=("aes-128-ecb",))
    with pytest.raises(LocalProtocolError):
        Handshake(initiator=True, local_id="A", remote_id="B", addrs=[], ciphers=())
    with pytest.raises(LocalProtocolError):  # a figure for every offered name
        Handshake(initiator=True, local_id="A", remote_id="B", addrs=[], speeds={"aes-256-gcm": (1, 1)})


names = st.sampled_from(["aes-256-gcm", "aes-256-ocb3", "chacha20-poly1305", "x-future", "zz"])
speed = st.integers(1, MAX_SPEED)
lists = st.lists(
    st.builds(CipherSpeed, names, speed, speed), max_size=MAX_CIPHERS, unique_by=lambda s: s.name
)


@settings(max_examples=200, deadline=None)
@given(lists, lists)
def test_both_sides_choose_the_same_cipher_and_never_one_side_lacks(
    a: list[CipherSpeed], b: list[CipherSpeed]
) -> None:
    ab, ba = choose_cipher(a, b), choose_cipher(b, a)
    assert ab == ba  # symmetric: the same choice (and reason) on both sides
    assert choose_cipher(list(reversed(a)), b) == ab  # list order carries no weight
    shared = {s.name for s in a} & {s.name for s in b}
    if not shared:
        assert ab is None
        return
    assert ab is not None
    assert ab.name in shared
    best = {n: min(x.slowest for x in (*a, *b) if x.name == n) for n in shared}
    assert ab.mbps == best[ab.name] == max(best.values())
    assert ab.name == min(n for n in shared if best[n] == ab.mbps)  # ties by name


def test_a_rewritten_cipher_list_gives_no_common_keys() -> None:
    """Someone who strips GCM from A's hello on its way (downgrade) changes the transcript."""
    a = Handshake(initiator=True, local_id="A", remote_id="B", addrs=[], speeds=FIGURES)
    b = Handshake(initiator=False, local_id="B", remote_id="A", addrs=[], speeds=FIGURES)
    msg = HELLO.parse(a.hello)
    stripped = HELLO.build(
        nonce=msg["nonce"], kx=msg["kx"], addrs=msg["addrs"], ciphers=[["aes-256-ocb3", 6000, 5900]]
    )
    kb = b.finish(stripped)
    ka = a.finish(b.hello)
    assert kb.cipher == "aes-256-ocb3" != ka.cipher
    assert ka.send_base != kb.recv_base
    # Lowered figures (to steer the choice) change the transcript just the same.
    a2 = Handshake(initiator=True, local_id="A", remote_id="B", addrs=[], speeds=FIGURES)
    b2 = Handshake(initiator=False, local_id="B", remote_id="A", addrs=[], speeds=FIGURES)
    msg2 = HELLO.parse(a2.hello)
    slowed = HELLO.build(
        nonce=msg2["nonce"],
        kx=msg2["kx"],
        addrs=msg2["addrs"],
        ciphers=[[n, 1, 1] if n == "aes-256-gcm" else [n, s, o] for n, s, o in msg2["ciphers"]],
    )
    kb2 = b2.finish(slowed)
    assert kb2.cipher == "aes-256-ocb3"
    assert a2.finish(b2.hello).send_base != kb2.recv_base


@pytest.mark.parametrize("cipher", available_ciphers())
def test_records_reject_corruption_reordering_replay_and_wrong_keys(cipher: str) -> None:
    key = os.urandom(32)
    sealer = RecordSealer(key, cipher)
    wire = [sealer.seal(KIND_DATA, bytes([i]) * 100) for i in range(3)]

    def open_seq(records: list[bytes], k: bytes = key, c: str = cipher) -> list[bytes]:
        opener = RecordOpener(k, c, peer="S")
        return [opener.open(r[:HEADER_SIZE], bytearray(r[HEADER_SIZE:])) for r in records]

    assert open_seq(wire) == [bytes([i]) * 100 for i in range(3)]
    flipped = bytearray(wire[1])
    flipped[50] ^= 1
    for bad in ([wire[0], bytes(flipped)], [wire[1], wire[0]], [wire[0], wire[0]]):
        with pytest.raises(IntegrityError) as err:
            open_seq(bad)
        assert err.value.peer == "S"
    with pytest.raises(IntegrityError):
        open_seq(wire, os.urandom(32))
    for other in available_ciphers():
        if other != cipher:
            with pytest.raises(IntegrityError):  # same key, read as the other cipher
                open_seq(wire, key, other)
    header_changed = bytearray(wire[0])
    header_changed[0] = 3  # same bytes, claimed as another record kind
    with pytest.raises(IntegrityError):
        open_seq([bytes(header_changed)])


def test_transfer_keys_differ_per_challenge_and_direction() -> None:
    base = os.urandom(32)
    s2r, r2s = transfer_keys(base, os.urandom(32))
    s2r2, _ = transfer_keys(base, os.urandom(32))
    assert len({s2r, r2s, s2r2}) == 3


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.randn(shape, generator=gen).to(dtype)
    t = codecs.empty(shape, dtype)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    t.reshape(-1).view(torch.uint8).copy_(raw)
    return t


def _memory_transfer(
    tensors: dict[str, torch.Tensor], codec: str, record_size: int, force_staging: bool
) -> dict[str, torch.Tensor]:
    names = {n: codecs.dtype_name(t.dtype) for n, t in tensors.items()}
    specs = tuple(
        ShardSpec(n, names[n], tuple(t.shape), effective_codec(codec, names[n])) for n, t in tensors.items()
    )
    sources = [t.contiguous().reshape(-1) for t in tensors.values()]
    key = os.urandom(32)
    cipher = available_ciphers()[0]
    sealer, opener = RecordSealer(key, cipher), RecordOpener(key, cipher, peer="S")
    stager = Stager(sources, specs, record_size, force_staging=force_staging)
    lander = Lander(specs, None, None, peer="S", force_staging=force_staging)
    plains = lander.buffers(record_size)
    out = memoryview(bytearray(HEADER_SIZE + record_size + 16))
    for i, plan in enumerate(plan_records(specs, record_size)):
        n = sealer.seal_into(KIND_DATA, stager.payload(plan, i % 2), out)
        header, body = bytes(out[:HEADER_SIZE]), out[HEADER_SIZE:n]
        target = lander.direct_target(plan)
        if target is not None:
            opener.open_into(header, body, target)
        else:
            opener.open_into(header, body, codecs.byte_memoryview(plains[i % 2])[: plan.nbytes])
            lander.scatter(plan, plains[i % 2])
    return lander.finish()


dtypes = st.sampled_from(sorted(codecs.TORCH_DTYPES))
shapes = st.lists(st.integers(0, 9), max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(dtypes, shapes), min_size=1, max_size=5),
    st.sampled_from(CODECS),
    st.integers(MIN_RECORD_SIZE, 2 * MIN_RECORD_SIZE),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_in_memory_transfer_round_trips(
    items: list[tuple[str, tuple[int, ...]]], codec: str, record_size: int, staging: bool, seed: int
) -> None:
    tensors = {f"t{i}": _sample(codecs.TORCH_DTYPES[d], s, seed + i) for i, (d, s) in enumerate(items)}
    tensors["big"] = torch.randn(3000)  # spans several records
    got = _memory_transfer(tensors, codec, record_size, staging)
    for name, x in tensors.items():
        y = got[name]
        assert y.dtype == x.dtype
        assert y.shape == x.shape
        if effective_codec(codec, codecs.dtype_name(x.dtype)) == "none":
            assert torch.equal(y.reshape(-1).view(torch.uint8), x.reshape(-1).view(torch.uint8))
        else:
            tol = {"fp16": 2**-10, "bf16": 2**-7, "int8": 1 / 100}[codec]
            if x.numel():
                scale = float(x.float().abs().max())
                assert float((y.float() - x.float()).abs().max()) <= tol * scale + 1e-6


@pytest.mark.parametrize("cipher", available_ciphers())
def test_records_sealed_out_of_order_by_forks_open_in_any_order(cipher: str) -> None:
    """The seal pool's contract: counters reserved up front fix each record's nonce, so forks
    may seal and open them in any order; a record under the wrong counter fails."""
    key = os.urandom(32)
    sealer, opener = RecordSealer(key, cipher), RecordOpener(key, cipher, peer="S")
    control = sealer.seal(KIND_DATA, b"open")  # counter 0, sealed the ordinary way
    first = sealer.reserve(4)
    forks = [sealer.fork() for _ in range(2)]
    wire: dict[int, bytes] = {}
    for i in (3, 1, 0, 2):
        out = memoryview(bytearray(HEADER_SIZE + 10 + 16))
        n = forks[i % 2].seal_into(KIND_DATA, bytes([i]) * 10, out, first + i)
        wire[i] = bytes(out[:n])
    end = sealer.seal(KIND_DATA, b"end")  # after the reserved run
    assert opener.open(control[:HEADER_SIZE], bytearray(control[HEADER_SIZE:])) == b"open"
    base = opener.reserve(4)
    readers = [opener.fork() for _ in range(3)]
    for i in (2, 0, 3, 1):
        r = wire[i]
        out = bytearray(10)
        readers[i % 3].open_into(r[:HEADER_SIZE], bytearray(r[HEADER_SIZE:]), out, base + i)
        assert out == bytes([i]) * 10
    assert opener.open(end[:HEADER_SIZE], bytearray(end[HEADER_SIZE:])) == b"end"
    r = wire[1]
    with pytest.raises(IntegrityError, match=f"record {base + 2} failed"):  # record 1 read as record 2
        readers[0].open_into(r[:HEADER_SIZE], bytearray(r[HEADER_SIZE:]), bytearray(10), base + 2)


def test_seal_threads_default_to_one_below_eight_cores() -> None:
    from p2pcompute.tensors.lane import auto_seal_threads

    assert [auto_seal_threads(c) for c in (1, 2, 4, 7, 8, 16, 64)] == [1, 1, 1, 1, 2, 4, 4]
    assert auto_seal_threads() >= 1
