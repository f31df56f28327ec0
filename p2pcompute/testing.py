"""Helpers for tests, examples and benchmarks: synthetic tasks and an in-memory averaging group.

Nothing in the library imports this module; like ``trio.testing`` it is there so that scripts,
tests and benchmarks need no network, downloads or data files.

* :class:`TeacherTask`, :class:`MarkovTextTask`, :func:`make_model`, :func:`evaluate`,
  :func:`train_alone`: a small model and the data it learns, generated on the fly. The teacher
  task is teacher-student regression: a fixed random two-layer network (the *teacher*, seeded)
  maps Gaussian inputs to targets; the *student* learns it from batches drawn with each peer's
  own generator, so peers see different data.
* :class:`LocalGroup`: simulated peers in one trio run that average for real (no network),
  rounding through the lane's own codecs, so the optimizer's math and the training
  benchmark's byte and loss figures stand for the network's. A robust ``aggregator`` runs the
  network's own :func:`~p2pcompute.collective.aggregate.aggregate` over the same parts (the flat
  vector cut into one equal part per participant, as equal bandwidths cut it).

Imports torch, trio, :mod:`p2pcompute.errors`, :mod:`p2pcompute.tensors.codecs`,
:mod:`p2pcompute.collective.aggregate` / :mod:`~p2pcompute.collective.plan` (sans-IO) and
:mod:`p2pcompute.training.averager`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import trio

from p2pcompute.collective.aggregate import Aggregator, ClipLedger, aggregate, capped_weights
from p2pcompute.collective.plan import split_parts
from p2pcompute.errors import LocalProtocolError, TaskFailed
from p2pcompute.tensors.codecs import check_codec, roundtrip
from p2pcompute.training.averager import AveragingOutcome, allreduce_bytes

IN_FEATURES = 32
HIDDEN = 128


class TeacherTask:
    """Targets from a fixed random teacher network plus a little noise.

    Example::

        task = TeacherTask(seed=0)
        x, y = task.batch(64, torch.Generator().manual_seed(7))
        x_eval, y_eval = task.eval_set()
    """

    def __init__(self, seed: int = 0, *, noise: float = 0.01) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(IN_FEATURES, 64, generator=g) / IN_FEATURES**0.5
        self.w2 = torch.randn(64, 1, generator=g) / 8.0
        self.noise = noise
        self.seed = seed

    def targets(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        y = torch.tanh(x @ self.w1) @ self.w2
        if g is not None and self.noise:
            y = y + self.noise * torch.randn(y.shape, generator=g)
        return y

    def batch(self, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` fresh samples drawn with ``g``."""
        x = torch.randn(size, IN_FEATURES, generator=g)
        return x, self.targets(x, g)

    def eval_set(self, size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set (the same on every peer)."""
        g = torch.Generator().manual_seed(10_000 + self.seed)
        x = torch.randn(size, IN_FEATURES, generator=g)
        return x, self.targets(x)


def make_model(seed: int = 0) -> torch.nn.Module:
    """The student: a small MLP (about 21k parameters), initialised from ``seed``.

    Example::

        model = make_model(0)      # the same weights on every peer that uses seed 0
    """
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
        torch.nn.Linear(HIDDEN, 1),
    )
    with torch.no_grad():
        for p in model.parameters():
            bound = 1.0 / max(1, p.shape[-1]) ** 0.5
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
    return model


def evaluate(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean squared error of ``model`` on ``data``."""
    x, y = data
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def train_alone(
    steps: int, batch: int, *, seed: int = 0, data_seed: int = 1, lr: float = 3e-3
) -> tuple[torch.nn.Module, float]:
    """The same model trained alone with AdamW for ``steps`` steps of ``batch`` samples; (model, eval loss).

    Example::

        _, loss = train_alone(steps=600, batch=96)
    """
    task = TeacherTask(seed)
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        x, y = task.batch(batch, g)
        torch.nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad()
    return model, evaluate(model, task.eval_set())


# -- a language-modelling task --------------------------------------------------------------------

VOCAB = 16
CONTEXT = 2


class MarkovTextTask:
    """Next-token prediction on text from a fixed random Markov source (order ``CONTEXT``).

    Each context of ``CONTEXT`` tokens has its own next-token distribution, drawn once from a
    sparse Dirichlet (most mass on a few tokens, like real text), so the source has an
    entropy well above zero: the best possible cross-entropy, :meth:`floor`, is that of the
    source itself. This is the regime where language models are trained, and where a
    final-loss comparison means something: the teacher regression above drives its loss
    towards zero, where any gap is a large fraction of a small number.

    Example::

        task = MarkovTextTask(seed=0)
        model = task.make_model(0)
        x, y = task.batch(64, torch.Generator().manual_seed(7))
        loss = task.loss(model(x), y)
        print(task.evaluate(model), ">=", task.floor())
    """

    def __init__(self, seed: int = 0, *, concentration: float = 0.1) -> None:
        # torch's Dirichlet draws from the global generator: seed it inside fork_rng, which
        # gives the caller's generator state back afterwards
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dirichlet = torch.distributions.Dirichlet(torch.full((VOCAB,), concentration))
            probs = dirichlet.sample((VOCAB**CONTEXT,))
        probs = probs.clamp_min(1e-9)  # a token the draw made impossible stays merely very unlikely
        self.probs = probs / probs.sum(dim=1, keepdim=True)  # [context index, next token]
        self.seed = seed

    def _contexts(self, size: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, VOCAB, (size, CONTEXT), generator=g)

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.zeros(x.shape[0], dtype=torch.long)
        for k in range(CONTEXT):
            index = index * VOCAB + x[:, k]
        return index

    def batch(self, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` (context, next token) pairs drawn with ``g``: contexts uniform, tokens from the source."""
        x = self._contexts(size, g)
        y = torch.multinomial(self.probs[self._index(x)], 1, generator=g).squeeze(1)
        return x, y

    def eval_set(self, size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set (the same on every peer)."""
        return self.batch(size, torch.Generator().manual_seed(20_000 + self.seed))

    @staticmethod
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in nats per token."""
        return torch.nn.functional.cross_entropy(out, y)

    @staticmethod
    def make_model(seed: int = 0) -> torch.nn.Module:
        """A small neural n-gram model (about 11k parameters): embeddings, an MLP, logits.

        Example::

            model = MarkovTextTask.make_model(0)   # the same weights on every peer that uses seed 0
        """
        g = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Embedding(VOCAB, 32),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * CONTEXT, HIDDEN), torch.nn.GELU(),
            torch.nn.Linear(HIDDEN, VOCAB),
        )
        with torch.no_grad():
            for p in model.parameters():
                bound = 1.0 / max(1, p.shape[-1]) ** 0.5
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
        return model

    def evaluate(self, model: torch.nn.Module) -> float:
        """Cross-entropy of ``model`` on the held-out set (nats per token)."""
        x, y = self.eval_set()
        with torch.no_grad():
            return float(self.loss(model(x), y))

    def floor(self) -> float:
        """The source's own cross-entropy on the held-out set: no model can do better on average."""
        x, y = self.eval_set()
        return float(-self.probs[self._index(x), y].log().mean())


@dataclass
class _Round:
    expected: set[str]
    contributions: dict[str, tuple[float, list[torch.Tensor], Sequence[torch.Tensor]]] = field(
        default_factory=dict
    )
    done: trio.Event = field(default_factory=trio.Event)
    outcome_participants: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    compression: str = "none"
    aggregator: Aggregator = field(default_factory=Aggregator)
    clipped: tuple[str, ...] = ()
    blamed: set[str] = field(default_factory=set)
    weight_cap: float | None = None

    def weights(self, present: Sequence[str]) -> dict[str, float]:
        """The weights of ``present`` as the round counts them (capped, as on the network)."""
        ws = [self.contributions[p][0] for p in present]
        if self.weight_cap is not None and ws:
            ws = capped_weights(ws, self.weight_cap)
        return dict(zip(present, ws, strict=True))


class LocalGroup:
    """Simulated peers in one trio run that average for real (no network).

    A round (one ``round_id``) completes when every current member has contributed, or
    when a member leaves, or when the round's ``timeout`` runs out (the late members are
    excluded, as the fault-tolerant all-reduce does). Every contributor then holds the same
    weighted mean, rounded through the codec as it would be on the wire. Bytes are those of
    a butterfly all-reduce over the participants. With a robust ``aggregator`` (passed to
    ``average``) every contributor holds the network's robust aggregate instead, and a sender
    clipped in ``blame_after`` consecutive rounds is left out of the round (its call raises
    :class:`~p2pcompute.errors.TaskFailed`), as the network's reducers blame it.

    Example::

        group = LocalGroup()
        a, b = group.join("a"), group.join("b")
        async with trio.open_nursery() as n:
            n.start_soon(a.average, [ta], weight=1.0, round_id=0)   # keyword args via partial
            ...
    """

    def __init__(self) -> None:
        self.members: set[str] = set()
        self._rounds: dict[int, _Round] = {}
        self.history: list[tuple[int, tuple[str, ...]]] = []
        self.ledger = ClipLedger()  # per sender: rounds in which it was clipped, and its streak

    @property
    def clip_counts(self) -> dict[str, int]:
        """Per sender, in how many rounds a robust aggregator clipped (a part of) its contribution.

        Example::

            assert group.clip_counts.get("peer7", 0) == 0   # never counted against it
        """
        return dict(self.ledger.total)

    def join(self, peer_id: str) -> LocalAverager:
        """Add a member; it takes part from the next round it contributes to."""
        self.members.add(peer_id)
        return LocalAverager(self, peer_id)

    def leave(self, peer_id: str) -> None:
        """Remove a member (as if it crashed); open rounds stop waiting for it."""
        self.members.discard(peer_id)
        for rid, rnd in list(self._rounds.items()):
            rnd.expected.discard(peer_id)
            self._maybe_finish(rid, rnd)

    def _maybe_finish(self, rid: int, rnd: _Round, *, force: bool = False) -> None:
        if rnd.done.is_set():
            return
        if not force and not rnd.expected <= set(rnd.contributions):
            return
        present = sorted(p for p in rnd.contributions if p in self.members)
        while present and rnd.aggregator.robust:
            blamed = self._robust(rnd, present, str(rid))
            if not blamed:
                break
            # as on the network: the attempt fails, and the next one runs without the blamed
            rnd.blamed |= blamed
            present = [p for p in present if p not in blamed]
        rnd.excluded = tuple(sorted(rnd.expected - set(present)))
        rnd.outcome_participants = tuple(present)
        if present and not rnd.aggregator.robust:
            weights = rnd.weights(present)
            total = sum(weights.values())
            n_tensors = len(rnd.contributions[present[0]][1])
            for i in range(n_tensors):
                acc = torch.zeros_like(rnd.contributions[present[0]][1][i], dtype=torch.float64)
                for p in present:
                    _, sent, _ = rnd.contributions[p]
                    acc += sent[i].to(torch.float64) * (weights[p] / total)
                # Every participant receives the same bytes: reduce once, round once, copy out.
                result = roundtrip(rnd.compression, acc.to(rnd.contributions[present[0]][1][i].dtype))
                for p in present:
                    rnd.contributions[p][2][i].copy_(result)
        self.history.append((rid, rnd.outcome_participants))
        del self._rounds[rid]
        rnd.done.set()

    def _robust(self, rnd: _Round, present: list[str], round_key: str) -> set[str]:
        """The network's aggregator over the network's parts: one per participant, equal sizes.

        Applies the network's blame rule (one ledger for the whole group, where the network has
        one per reducer): returns the senders to blame, without writing a result, or an empty
        set after writing every participant's result.
        """
        first = rnd.contributions[present[0]][1]
        work = first[0].dtype if first[0].dtype in (torch.float32, torch.float64) else torch.float32
        rows = torch.stack(
            [torch.cat([t.reshape(-1).to(work) for t in rnd.contributions[p][1]]) for p in present]
        )
        weights = list(rnd.weights(present).values())
        out = torch.empty(rows.shape[1], dtype=work)
        clipped: set[str] = set()
        for start, end in split_parts(rows.shape[1], [1.0] * len(present)):
            if end > start:
                res = aggregate(rows[:, start:end], weights, out[start:end], rnd.aggregator)
                clipped |= {present[i] for i in res.counted(rnd.aggregator.count_below)}
        rnd.clipped = tuple(sorted(clipped))
        blame = self.ledger.record(
            round_key, seen=set(present), clipped=clipped, blame_after=rnd.aggregator.blame_after
        )
        if blame:
            return blame
        offset = 0
        for i, t in enumerate(first):
            piece = out[offset : offset + t.numel()].view(t.shape).to(t.dtype)
            offset += t.numel()
            result = roundtrip(rnd.compression, piece)  # every participant receives the same bytes
            for p in present:
                rnd.contributions[p][2][i].copy_(result)
        return set()

    async def _average(
        self,
        peer_id: str,
        tensors: Sequence[torch.Tensor],
        weight: float,
        round_id: int,
        compression: str,
        timeout: float | None,
        aggregator: str | Aggregator = "mean",
        weight_cap: float | None = None,
    ) -> AveragingOutcome:
        check_codec(compression)
        agg = Aggregator.of(aggregator)
        if peer_id not in self.members:
            raise LocalProtocolError(f"{peer_id} is not a member of this group")
        if not weight > 0:
            raise LocalProtocolError("weight must be positive")
        start = time.perf_counter()
        rnd = self._rounds.get(round_id)
        if rnd is None:
            rnd = _Round(expected=set(self.members), compression=compression, aggregator=agg,
                         weight_cap=weight_cap)
            self._rounds[round_id] = rnd
        rnd.expected.add(peer_id)
        sent = [roundtrip(compression, t) for t in tensors]
        rnd.contributions[peer_id] = (weight, sent, tensors)
        self._maybe_finish(round_id, rnd)
        if not rnd.done.is_set():
            if timeout is None:
                await rnd.done.wait()
            else:
                with trio.move_on_after(timeout):
                    await rnd.done.wait()
                if not rnd.done.is_set():
                    self._maybe_finish(round_id, rnd, force=True)
        else:
            await trio.lowlevel.checkpoint()
        if peer_id in rnd.blamed:  # its tensors are untouched, as for a member the others excluded
            raise TaskFailed(f"{peer_id} was blamed: its contributions were clipped again and again")
        parts = rnd.outcome_participants
        nbytes = allreduce_bytes(tensors, compression, len(parts))
        total = sum(rnd.weights(parts).values()) if parts else 0.0
        return AveragingOutcome(
            parts,
            bytes_sent=nbytes,
            bytes_received=nbytes,
            seconds=time.perf_counter() - start,
            total_weight=total,
            excluded=rnd.excluded,
            clipped=rnd.clipped,
        )


class LocalAverager:
    """One member's handle on a :class:`LocalGroup` (an :class:`Averager`)."""

    def __init__(self, group: LocalGroup, peer_id: str) -> None:
        self._group = group
        self._peer_id = peer_id

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        round_id: int,
        compression: str = "none",
        timeout: float | None = None,
        aggregator: str | Aggregator = "mean",
        weight_cap: float | None = None,
    ) -> AveragingOutcome:
        return await self._group._average(
            self._peer_id, tensors, weight, round_id, compression, timeout, aggregator, weight_cap
        )
