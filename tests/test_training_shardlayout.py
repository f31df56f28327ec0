"""ShardLayout, the bookkeeping of a sharded peer (no process group needed): rows in, whole tensors out.

A sharded peer averages and serves whole parameters while each rank steps its own rows; these
properties are what make its state bit-identical to a one-process peer's.
"""

from __future__ import annotations

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import ConfigError
from p2pcompute.testing import make_model
from p2pcompute.training.averager import SoloAverager
from p2pcompute.training.diloco import DiLoCo
from p2pcompute.training.ranks import ShardLayout
from p2pcompute.training.state import TrainingState


def chunk_rows(n: int, world: int) -> tuple[int, ...]:
    """FSDP's Shard(0) split: torch.chunk over the ranks (the last ranks may get nothing)."""
    sizes = [c.shape[0] for c in torch.arange(n).chunk(world)] if n else []
    return tuple(sizes + [0] * (world - len(sizes)))


def layout_of(shapes: list[tuple[int, ...]], world: int) -> ShardLayout:
    names = tuple(f"p{i}" for i in range(len(shapes)))
    per_param = [chunk_rows(s[0], world) for s in shapes]
    rows = tuple(tuple(per_param[i][r] for i in range(len(shapes))) for r in range(world))
    return ShardLayout(names, tuple(shapes), tuple(torch.float32 for _ in shapes), rows)


shapes_st = st.lists(
    st.tuples(st.integers(1, 9), st.integers(1, 4)).map(lambda t: t if t[1] > 1 else (t[0],)), min_size=1,
    max_size=4,
)


@settings(max_examples=20, deadline=None)
@given(shapes_st, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_rows_round_trip_and_a_sharded_outer_step_is_the_whole_one(
    shapes: list[tuple[int, ...]], world: int, seed: int
) -> None:
    layout = layout_of(shapes, world)
    g = torch.Generator().manual_seed(seed)
    whole = [torch.randn(s, generator=g) for s in shapes]
    # each rank's flat vector, as ShardedAverager gathers it
    def rows(w: torch.Tensor, r: int, i: int) -> torch.Tensor:
        return w.narrow(0, layout._start(r, i), layout.rows[r][i])

    flats = [torch.cat([rows(w, r, i).reshape(-1) for i, w in enumerate(whole)]) for r in range(world)]
    assert all(torch.equal(a, b) for a, b in zip(layout.assemble(flats), whole, strict=True))
    back = [torch.zeros_like(f) for f in flats]
    layout.disperse(whole, back)
    assert all(torch.equal(a, b) for a, b in zip(back, flats, strict=True))

    # states: split into slices and joined again, digest unchanged
    state = TrainingState(4, {f"param/p{i}": w for i, w in enumerate(whole)}, {"mode": "diloco"})
    slices = layout.split_state(state)
    assert [tuple(s.tensors["param/p0"].shape) for s in slices] == [
        layout.local_shape(r, 0) for r in range(world)
    ]
    assert layout.join_states(slices).digest() == state.digest()
    # the same from each rank's raw bytes (what gather_state sends), dtypes of different sizes mixed
    state.tensors.update({f"outer/p{i}": w.to(torch.bfloat16) for i, w in enumerate(whole)})
    keys = sorted(state.tensors)
    raw = [
        torch.cat([s.tensors[k].reshape(-1).view(torch.uint8) for k in keys])
        for s in layout.split_state(state)
    ]
    got = layout.assemble_raw(keys, [state.tensors[k].dtype for k in keys], raw)
    assert TrainingState(4, got, {"mode": "diloco"}).digest() == state.digest()

    # Nesterov SGD (the outer optimizer) on each rank's rows equals it on the whole tensors, bit for bit
    grads = [torch.randn(s, generator=g) for s in shapes]
    full_anchor = [w.clone() for w in whole]
    full_opt = torch.optim.SGD(full_anchor, lr=0.7, momentum=0.9, nesterov=True)
    parts = [[rows(w, r, i).clone() for i, w in enumerate(whole)] for r in range(world)]
    part_opts = [torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True) for p in parts]
    for _ in range(2):
        for a, d in zip(full_anchor, grads, strict=True):
            a.grad = d.clone()
        full_opt.step()
        for r, (ps, o) in enumerate(zip(parts, part_opts, strict=True)):
            for i, p in enumerate(ps):
                p.grad = rows(grads[i], r, i).clone()
            o.step()
    for i, a in enumerate(full_anchor):
        assert torch.equal(torch.cat([ps[i] for ps in parts]), a)


def test_the_model_digest_is_the_whole_models() -> None:
    model = make_model(0)
    plain = DiLoCo(model, torch.optim.AdamW(model.parameters()), SoloAverager(), runner=trio.run)
    named = [(n, p) for n, p in model.named_parameters()]
    world = 2
    rows = tuple(tuple(chunk_rows(p.shape[0], world)[r] for _, p in named) for r in range(world))
    layout = ShardLayout(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named),
                         tuple(p.dtype for _, p in named), rows)
    assert layout.model_digest() == plain.model_digest()
    assert rows[1][-1] == 0  # the last layer's single row lives on rank 0


def test_a_state_a_sharded_peer_cannot_take_is_refused() -> None:
    layout = layout_of([(4, 2)], 2)
    with pytest.raises(ConfigError, match="cannot take"):
        layout.split_state(TrainingState(1, {"buffer/bn": torch.zeros(3)}, {}))
    with pytest.raises(ConfigError, match="does not match"):
        layout.split_state(TrainingState(1, {"param/p0": torch.zeros(5, 2)}, {}))
