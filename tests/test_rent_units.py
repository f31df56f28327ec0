"""Recipes, segments, the worker's session cache and its cheats, without a network."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcompute.errors import ConfigError
from p2pcompute.rent import Recipe, RecipeBook, SessionCache, TrainingWorker, builtin_book, builtin_recipes
from p2pcompute.rent.recipes import MLP
from p2pcompute.rent.segment import (
    DATA,
    GRAD,
    STATE,
    UPDATE,
    distance,
    micro_batches,
    run_segment,
    split_named,
    state_digest,
    state_of,
)
from p2pcompute.rent.worker import CHEATS, STATE_MISSING, kind_of
from p2pcompute.tasks.registry import TaskError, running_for

LM_CFG = {"layers": 1, "width": 32, "heads": 2, "vocab": 16, "context": 8, "lr": 3e-3}
STEPS = 6


def lm_data(seed: int = 0, steps: int = STEPS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, 16, (steps * 4, 9), generator=g)}


def test_config_is_checked_against_the_schema() -> None:
    lm = builtin_recipes()["lm"]
    cfg = lm.normalise({"layers": 2})
    assert cfg["width"] == 64
    assert cfg["lr"] == 3e-3
    assert cfg["clip"] == 1.0
    for bad, words in [
        ({"layers": 0}, "outside"),
        ({"layers": "2"}, "must be a int"),
        ({"layers": True}, "must be a int"),
        ({"dropout": 0.1}, "unknown config key"),
        ({"lr": float("nan")}, "finite"),
    ]:
        with pytest.raises(ConfigError, match=words):
            lm.normalise(bad)
    with pytest.raises(ConfigError, match="multiple of heads"):
        lm.make({"width": 30, "heads": 4})
    with pytest.raises(ConfigError, match="required"):
        MLP.normalise({})
    with pytest.raises(ConfigError, match="one of"):
        MLP.normalise({"inputs": 4, "activation": "swish"})


def test_a_provider_caps_the_model_a_requester_may_ask_for() -> None:
    small = Recipe(
        "lm-small",
        builtin_recipes()["lm"].build,
        builtin_recipes()["lm"].loss,
        schema=builtin_recipes()["lm"].schema,
        max_params=10_000,
    )
    with pytest.raises(ConfigError, match="over this provider's cap"):
        small.make(LM_CFG)


def test_book_refuses_duplicates_and_bad_prices() -> None:
    book = RecipeBook()
    book.add(MLP, price=0.1)
    with pytest.raises(ConfigError, match="twice"):
        book.add(MLP)
    with pytest.raises(ConfigError, match="price"):
        RecipeBook().add(MLP, price=-1)
    with pytest.raises(ConfigError, match="no built-in recipe"):
        builtin_book(["gpt5"])
    with pytest.raises(ConfigError, match="bad recipe name"):
        Recipe("Bad Name!", MLP.build, MLP.loss)
    assert [k.name for k in TrainingWorker(builtin_book(price=0.5)).registry()] == ["train/lm", "train/mlp"]


def test_segment_is_reproducible_and_thread_count_stays_within_tolerance() -> None:
    lm = builtin_recipes()["lm"]
    cfg, model = lm.make(LM_CFG)
    start = state_of(model)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_segment(lm, cfg, start, lm_data(), STEPS)
        torch.set_num_threads(max(2, threads))
        two = run_segment(lm, cfg, start, lm_data(), STEPS)
    finally:
        torch.set_num_threads(threads)
    assert distance(one.grad, two.grad) < 1e-3  # measured 1.1e-5 (docs/design/rent.md)
    assert len(one.losses) == STEPS
    assert all(x == x for x in one.losses)
    bf16 = run_segment(lm, cfg, start, lm_data(), STEPS, codec="bf16")
    assert all(g.dtype == torch.bfloat16 for g in bf16.grad.values())
    assert distance(bf16.grad, one.grad) < 0.02
    fewer = run_segment(lm, cfg, start, {"tokens": lm_data()["tokens"][: STEPS // 2 * 4]}, STEPS // 2)
    assert distance(fewer.grad, one.grad) > 0.02


def test_micro_batches_need_a_divisible_shared_length() -> None:
    assert [b["x"].shape[0] for b in micro_batches({"x": torch.zeros(12, 2)}, 3)] == [4, 4, 4]
    for bad in ({"x": torch.zeros(10, 2)}, {"x": torch.zeros(12, 2), "y": torch.zeros(6)}, {}):
        with pytest.raises(ConfigError):
            micro_batches(bad, 3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=16),
    st.floats(0.01, 10),
)
def test_distance_is_zero_for_equal_symmetric_and_sees_scaling(values: list[float], c: float) -> None:
    a = {"w": torch.tensor(values)}
    assert distance(a, {"w": a["w"].clone()}) == 0.0
    b = {"w": a["w"] * c}
    assert distance(a, b) == pytest.approx(distance(b, a))
    if float(a["w"].norm()) > 1e-3:
        assert distance(a, b) == pytest.approx(abs(1 - c) / max(1, c), rel=1e-4, abs=1e-6)
    assert distance(a, {"v": a["w"]}) == float("inf")


def test_session_cache_evicts_least_recent_within_its_byte_cap() -> None:
    cache = SessionCache(max_sessions=2, max_bytes=1000)
    t = {"w": torch.zeros(100)}  # 400 bytes
    cache.put(("a", "1"), {}, 0, t)
    cache.put(("b", "1"), {}, 0, t)
    assert cache.get(("a", "1")) is not None  # a is now the most recent
    cache.put(("c", "1"), {}, 0, t)
    assert cache.get(("b", "1")) is None
    assert len(cache) == 2
    cache.put(("d", "1"), {}, 0, {"w": torch.zeros(1000)})  # larger than the cap: not kept
    assert cache.get(("d", "1")) is None


def _params(version: int, base: int, **extra: object) -> dict[str, object]:
    return {
        "v": 1,
        "job": "j1",
        "config": LM_CFG,
        "version": version,
        "base": base,
        "steps": STEPS,
        "codec": "fp32",
        **extra,
    }


def test_worker_keeps_state_per_requester_and_applies_updates_exactly() -> None:
    lm = builtin_recipes()["lm"]
    worker = TrainingWorker(builtin_book())
    _, model = lm.make(LM_CFG)
    start = state_of(model)
    with running_for("alice"):
        out, info = worker.run(
            lm,
            {**{STATE + k: v for k, v in start.items()}, DATA + "tokens": lm_data()["tokens"]},
            _params(0, -1),
        )
    assert info["steps"] == STEPS
    assert info["start_digest"] == state_digest(start)[:32]
    update = {k: torch.randn_like(v) * 1e-3 for k, v in start.items()}
    with running_for("alice"):
        _, info1 = worker.run(
            lm,
            {**{UPDATE + k: v for k, v in update.items()}, DATA + "tokens": lm_data(1)["tokens"]},
            _params(1, 0),
        )
    assert info1["start_digest"] == state_digest({k: start[k] + update[k] for k in start})[:32]
    # another requester cannot use alice's session, and a wrong base is refused
    with running_for("mallory"), pytest.raises(TaskError, match=STATE_MISSING):
        worker.run(lm, {DATA + "tokens": lm_data()["tokens"]}, _params(1, -1))
    with running_for("alice"), pytest.raises(TaskError, match=STATE_MISSING):
        worker.run(
            lm,
            {**{UPDATE + k: v for k, v in update.items()}, DATA + "tokens": lm_data()["tokens"]},
            _params(3, 2),
        )
    assert set(split_named(out, GRAD)) == set(start)


def test_worker_refuses_bad_params_configs_and_data_with_clear_errors() -> None:
    lm = builtin_recipes()["lm"]
    worker = TrainingWorker(builtin_book())
    _, model = lm.make(LM_CFG)
    full = {STATE + k: v for k, v in state_of(model).items()}
    cases = [
        ({**full, DATA + "tokens": lm_data()["tokens"]}, _params(0, -1, v=2), "version"),
        (
            {**full, DATA + "tokens": lm_data()["tokens"]},
            _params(0, -1, config={**LM_CFG, "layers": 99}),
            "bad config",
        ),
        ({**full, DATA + "tokens": lm_data()["tokens"]}, _params(0, -1, codec="int3"), "codec"),
        ({**full, DATA + "tokens": torch.randint(0, 99, (STEPS * 4, 9))}, _params(0, -1), "must lie in"),
        (
            {**full, DATA + "tokens": torch.zeros(STEPS * 4, 5, dtype=torch.long)},
            _params(0, -1),
            "tokens must be",
        ),
        (
            {STATE + "embed.weight": torch.zeros(3, 3), DATA + "tokens": lm_data()["tokens"]},
            _params(0, -1),
            "does not fit",
        ),
    ]
    for tensors, params, words in cases:
        with running_for("alice"), pytest.raises(TaskError, match=words):
            worker.run(lm, tensors, params)


@pytest.mark.parametrize("cheat", CHEATS)
def test_each_cheat_lands_outside_the_tolerance(cheat: str) -> None:
    lm = builtin_recipes()["lm"]
    _, model = lm.make(LM_CFG)
    start = state_of(model)
    honest, liar = TrainingWorker(builtin_book()), TrainingWorker(builtin_book(), cheat=cheat)
    grads = []
    for w in (honest, liar):
        out = None
        for version, seed in enumerate((0, 1)):  # two segments: a stale cheat needs a previous one
            tensors = {**{STATE + k: v for k, v in start.items()}, DATA + "tokens": lm_data(seed)["tokens"]}
            with running_for("alice"):
                out, _ = w.run(lm, tensors, _params(version, -1))
        assert out is not None
        grads.append(split_named(out, GRAD))
    assert distance(grads[0], grads[1]) > 0.1, cheat
    assert kind_of("lm") == "train/lm"
