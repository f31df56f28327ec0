"""Recipes: named, operator-registered code that builds a model, its loss and its inner optimizer.

A requester renting GPUs never sends code. It names a recipe the provider's operator
registered and sends a msgpack-able *config* (layer counts, widths, learning rate ...), the
model state and data shards. The recipe checks the config against its own schema and caps
before it builds anything; a config it does not accept is refused with :class:`ConfigError`
(on a provider: a typed, non-retryable task failure naming the bad key).

Two recipes ship built in (:func:`builtin_recipes`):

* ``lm``: a small decoder-only transformer language model (pre-norm blocks, causal
  self-attention through ``scaled_dot_product_attention``, learned positions). Config:
  ``layers``, ``width``, ``heads``, ``vocab``, ``context``; batches are ``{"tokens": long
  [B, context + 1]}`` and the loss is next-token cross-entropy in nats.
* ``mlp``: a multilayer perceptron. Config: ``inputs``, ``hidden`` (list of widths),
  ``outputs``, ``activation``, ``objective`` (``regression``: mean squared error on float
  targets ``y`` [B, outputs]; ``classification``: cross-entropy on long labels ``y`` [B]);
  batches are ``{"x": float [B, inputs], "y": ...}``.

Both take the inner-optimizer settings ``lr``, ``weight_decay`` and ``clip`` (AdamW, gradient
norm clipped at ``clip``; 0 turns clipping off), and ``seed`` (the initial weights).

Imports torch and :mod:`p2pcompute.errors` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
from torch import nn
from torch.nn import functional as F

from p2pcompute.errors import ConfigError

Batch: TypeAlias = Mapping[str, torch.Tensor]
Config: TypeAlias = dict[str, Any]

#: Most parameters a built-in recipe builds unless the operator allows more.
DEFAULT_MAX_PARAMS = 50_000_000
_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True)
class Field:
    """One config key: its type, bounds and default (``None`` default: required)."""

    kind: type
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class Recipe:
    """Local code bound to a name: ``build(config)`` -> model, ``loss(model, batch)``, ``check_batch``.

    ``schema`` lists the config keys the recipe accepts (anything else is refused);
    ``max_params`` caps the model a requester may ask this provider to build.

    Example::

        def build(cfg): return nn.Linear(cfg["inputs"], 1)
        def loss(model, batch): return F.mse_loss(model(batch["x"]), batch["y"])
        lin = Recipe("linear", build, loss, schema={"inputs": Field(int, 8, 1, 4096)})
    """

    name: str
    build: Callable[[Config], nn.Module]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    schema: Mapping[str, Field] = field(default_factory=dict)
    check_batch: Callable[[Config, Batch], None] | None = None
    max_params: int = DEFAULT_MAX_PARAMS

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 48 or not set(self.name) <= _NAME_OK:
            raise ConfigError(f"bad recipe name {self.name!r}: 1-48 of a-z 0-9 - _ .")

    def normalise(self, config: Mapping[str, Any]) -> Config:
        """The config with defaults filled in, checked against the schema (:class:`ConfigError`).

        Example::

            cfg = builtin_recipes()["lm"].normalise({"layers": 2, "width": 64})
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"recipe {self.name}: config must be a map")
        schema = {**_OPTIMIZER_FIELDS, **self.schema}
        unknown = sorted(str(k) for k in config if k not in schema)
        if unknown:
            raise ConfigError(f"recipe {self.name}: unknown config key(s) {', '.join(unknown)}")
        out: Config = {}
        for key, spec in schema.items():
            value = config.get(key, spec.default)
            if value is None:
                raise ConfigError(f"recipe {self.name}: config key {key!r} is required")
            out[key] = _check_value(self.name, key, spec, value)
        return out

    def make(self, config: Mapping[str, Any]) -> tuple[Config, nn.Module]:
        """Check ``config`` and build the model (float32, on the CPU), refusing oversized ones.

        Example::

            cfg, model = recipe.make({"inputs": 8})
        """
        cfg = self.normalise(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            model = self.build(cfg)
        count = sum(p.numel() for p in model.parameters())
        if count > self.max_params:
            raise ConfigError(
                f"recipe {self.name}: the config builds {count:,} parameters, over this "
                f"provider's cap of {self.max_params:,}"
            )
        return cfg, model.float()

    def optimizer(self, cfg: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The inner optimizer of one segment: AdamW with the config's ``lr`` and ``weight_decay``."""
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def validate_batch(self, cfg: Config, batch: Batch) -> None:
        """Refuse data the recipe cannot train on (:class:`ConfigError` naming the tensor)."""
        if self.check_batch is not None:
            self.check_batch(cfg, batch)


_OPTIMIZER_FIELDS: dict[str, Field] = {
    "lr": Field(float, 1e-3, 0.0, 10.0),
    "weight_decay": Field(float, 0.0, 0.0, 1.0),
    "clip": Field(float, 1.0, 0.0, 1e6),
    "seed": Field(int, 0, 0, 2**63 - 1),
}


def _check_value(recipe: str, key: str, spec: Field, value: Any) -> Any:
    where = f"recipe {recipe}: config key {key!r}"
    if spec.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.kind is list:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of integers")
        if len(value) > 32:
            raise ConfigError(f"{where} has more than 32 entries")
        for v in value:
            if (spec.low is not None and v < spec.low) or (spec.high is not None and v > spec.high):
                raise ConfigError(f"{where}: {v} is outside [{spec.low}, {spec.high}]")
        return list(value)
    if not isinstance(value, spec.kind) or isinstance(value, bool) != (spec.kind is bool):
        raise ConfigError(f"{where} must be a {spec.kind.__name__}, not {type(value).__name__}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, spec.choices))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be finite")
    if isinstance(value, int | float) and (
        (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high)
    ):
        raise ConfigError(f"{where}: {value} is outside [{spec.low}, {spec.high}]")
    return value


def _tensor(batch: Batch, name: str, dtype: torch.dtype, dims: int) -> torch.Tensor:
    t = batch.get(name)
    if t is None:
        raise ConfigError(f"the batch has no tensor {name!r}")
    if t.dtype != dtype or t.dim() != dims:
        raise ConfigError(f"batch tensor {name!r} must be {dims}-D {dtype}, not {t.dim()}-D {t.dtype}")
    return t


# -- the language model


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(w, dim=2)
        shape = (b, t, self.heads, w // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        out: torch.Tensor = x + self.down(F.gelu(self.up(self.norm2(x))))
        return out


class TinyLM(nn.Module):
    """A decoder-only transformer: token and position embeddings, pre-norm blocks, a linear head.

    Example::

        model = TinyLM(layers=2, width=64, heads=4, vocab=256, context=32)
        logits = model(torch.zeros(8, 32, dtype=torch.long))    # [8, 32, 256]
    """

    def __init__(self, *, layers: int, width: int, heads: int, vocab: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.norm(x))
        return out


def _build_lm(cfg: Config) -> nn.Module:
    if cfg["width"] % cfg["heads"]:
        raise ConfigError(f"recipe lm: width {cfg['width']} is not a multiple of heads {cfg['heads']}")
    return TinyLM(
        layers=cfg["layers"],
        width=cfg["width"],
        heads=cfg["heads"],
        vocab=cfg["vocab"],
        context=cfg["context"],
    )


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy (nats per token) of ``batch["tokens"]`` ([B, context + 1], long)."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    loss: torch.Tensor = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return loss


def _check_lm_batch(cfg: Config, batch: Batch) -> None:
    tokens = _tensor(batch, "tokens", torch.long, 2)
    if tokens.shape[1] != cfg["context"] + 1:
        raise ConfigError(f"batch tokens must be [B, {cfg['context'] + 1}], not {list(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg["vocab"]):
        raise ConfigError(f"batch tokens must lie in [0, {cfg['vocab']})")


LM = Recipe(
    "lm",
    _build_lm,
    lm_loss,
    schema={
        "layers": Field(int, 2, 1, 48),
        "width": Field(int, 64, 8, 8192),
        "heads": Field(int, 4, 1, 128),
        "vocab": Field(int, 256, 2, 1 << 18),
        "context": Field(int, 64, 1, 1 << 14),
        "lr": Field(float, 3e-3, 0.0, 10.0),
    },
    check_batch=_check_lm_batch,
)


# -- the MLP

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def _build_mlp(cfg: Config) -> nn.Module:
    widths = [cfg["inputs"], *cfg["hidden"], cfg["outputs"]]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(_ACTIVATIONS[cfg["activation"]]())
    return nn.Sequential(*layers)


def mlp_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean squared error for float targets, cross-entropy for long labels."""
    out = model(batch["x"])
    y = batch["y"]
    if y.dtype == torch.long:
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


def _check_mlp_batch(cfg: Config, batch: Batch) -> None:
    x = _tensor(batch, "x", torch.float32, 2)
    if x.shape[1] != cfg["inputs"]:
        raise ConfigError(f"batch x must be [B, {cfg['inputs']}], not {list(x.shape)}")
    if cfg["objective"] == "classification":
        y = _tensor(batch, "y", torch.long, 1)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= cfg["outputs"]):
            raise ConfigError(f"batch labels y must lie in [0, {cfg['outputs']})")
    else:
        y = _tensor(batch, "y", torch.float32, 2)
        if y.shape[1] != cfg["outputs"]:
            raise ConfigError(f"batch y must be [B, {cfg['outputs']}], not {list(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ConfigError("batch x and y differ in length")


MLP = Recipe(
    "mlp",
    _build_mlp,
    mlp_loss,
    schema={
        "inputs": Field(int, None, 1, 1 << 20),
        "hidden": Field(list, [128], 1, 1 << 16),
        "outputs": Field(int, 1, 1, 1 << 20),
        "activation": Field(str, "gelu", choices=tuple(_ACTIVATIONS)),
        "objective": Field(str, "regression", choices=("regression", "classification")),
    },
    check_batch=_check_mlp_batch,
)


class RecipeBook:
    """The recipes an operator sells, with a price per segment and the resources one needs.

    Example::

        book = RecipeBook()
        book.add(builtin_recipes()["lm"], price=0.02)
        book.add(my_recipe, price=0.5, needs=Resources(gpus=1))
    """

    def __init__(self) -> None:
        self.recipes: dict[str, Recipe] = {}
        self.prices: dict[str, float] = {}
        self.needs: dict[str, Any] = {}

    def add(self, recipe: Recipe, *, price: float = 0.0, needs: Any = None) -> Recipe:
        """Sell ``recipe`` at ``price`` per segment (:class:`ConfigError` for a taken name or bad price)."""
        if recipe.name in self.recipes:
            raise ConfigError(f"recipe {recipe.name!r} is registered twice")
        if not (math.isfinite(price) and price >= 0):
            raise ConfigError(f"recipe {recipe.name}: price must be a finite number >= 0")
        self.recipes[recipe.name] = recipe
        self.prices[recipe.name] = float(price)
        self.needs[recipe.name] = needs
        return recipe

    def get(self, name: str) -> Recipe:
        """The recipe called ``name`` (:class:`ConfigError` when this book has none)."""
        try:
            return self.recipes[name]
        except KeyError:
            raise ConfigError(f"no recipe {name!r} here (have: {', '.join(sorted(self.recipes))})") from None

    def __contains__(self, name: object) -> bool:
        return name in self.recipes

    def __iter__(self) -> Any:
        return iter(self.recipes.values())


def builtin_recipes() -> dict[str, Recipe]:
    """The recipes that ship with the library: ``lm`` and ``mlp``.

    Example::

        cfg, model = builtin_recipes()["lm"].make({"layers": 2, "width": 64, "context": 32})
    """
    return {LM.name: LM, MLP.name: MLP}


def builtin_book(names: Iterable[str] | None = None, *, price: float = 0.0) -> RecipeBook:
    """A :class:`RecipeBook` of the named built-in recipes (all by default) at ``price`` per segment.

    Example::

        book = builtin_book(["lm"], price=0.02)
    """
    known = builtin_recipes()
    book = RecipeBook()
    for name in names if names is not None else known:
        if name not in known:
            raise ConfigError(f"no built-in recipe {name!r} (have: {', '.join(sorted(known))})")
        book.add(known[name], price=price)
    return book


__all__ = [
    "DEFAULT_MAX_PARAMS",
    "LM",
    "MLP",
    "Field",
    "Recipe",
    "RecipeBook",
    "TinyLM",
    "builtin_book",
    "builtin_recipes",
    "lm_loss",
    "mlp_loss",
]
