"""Matchmaking by run and model on a real swarm; joins that fail loudly; solo rounds that say so."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from p2pcompute.training.diloco import TrainingAlone
from p2pcompute.training.swarm import CollectiveAverager, DuplicateIdentity, JoinFailed, Swarm


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(opt: object, model: torch.nn.Module, steps: int) -> None:
    for _ in range(steps):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()  # type: ignore[attr-defined]
        opt.zero_grad()  # type: ignore[attr-defined]


def test_a_lone_trainer_on_a_busy_swarm_skips_matchmaking_and_joins_fail_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common = {"bootstrap": boot.addrs, "advert_interval": 1.0, "matchmaking_timeout": 20.0}
        with Swarm(run="alpha", **common) as other, Swarm(run="beta", **common) as lone:
            other.wait_for_peers(1, timeout=30)
            lone.wait_for_peers(1, timeout=30)
            m1, i1 = tiny()
            opt_other = other.diloco(m1, i1, inner_steps=3, join=False)
            train(opt_other, m1, 6)  # alpha is at outer step 2 and serves its state

            m2, i2 = tiny()
            with caplog.at_level(logging.INFO, logger="p2pcompute.training.swarm"):
                opt = lone.diloco(m2, i2, inner_steps=3)  # beta: alpha's state is not an offer
            # a normal join says what it found at INFO, and nothing louder
            joins = [r for r in caplog.records if r.getMessage().startswith("join:")]
            assert [r.levelno for r in joins] == [logging.INFO], caplog.text
            assert "0 train run 'beta'" in joins[0].getMessage()
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
            caplog.clear()
            assert opt.outer_step == 0
            assert isinstance(lone.averager, CollectiveAverager)
            assert lone.averager.run == f"beta/{opt.model_digest()}"
            assert other.peer_id in lone.peers()  # known, but not a partner
            train(opt, m2, 6)
            assert [r.outer_step for r in opt.history] == [1, 2]
            for r in opt.history:
                assert r.solo
                assert r.error is None
                assert r.solo_reason == "no other peer of this run known"
            m5, i5 = tiny()
            strict = lone.diloco(m5, i5, inner_steps=1, join=False, min_participants=2)
            m5(torch.ones(2, 4)).sum().backward()
            with pytest.raises(TrainingAlone, match="outer step 1 averaged 1 peer") as info:
                strict.step()
            assert info.value.report.solo_reason == "no other peer of this run known"
            assert strict.outer_step == 1

            # A joiner of run alpha whose state does not fit (another mode): no silent solo start.
            with Swarm(run="alpha", **common) as joiner:
                joiner.wait_for_peers(2, timeout=30)
                m3, i3 = tiny()
                with pytest.raises(JoinFailed, match="alpha"):
                    joiner.diloco(m3, i3, inner_steps=3, mode="per_step", join_timeout=1.0)
                m4, i4 = tiny()
                with caplog.at_level(logging.WARNING, logger="p2pcompute.training.swarm"):
                    opt4 = joiner.diloco(m4, i4, inner_steps=3, mode="per_step", join_timeout=1.0,
                                         require_join=False)
                assert opt4.outer_step == 0
                assert "does not fit" in caplog.text
    assert not [t for t in threading.enumerate() if t.name.startswith("p2pcompute-swarm")]


@pytest.mark.slow  # three real nodes, ~6 s
def test_two_trainers_with_one_key_file_get_a_clear_error(tmp_path: Path) -> None:
    key = tmp_path / "peer.key"
    with Swarm(network=True, advertise=True, role="bootstrap", advert_interval=1.0) as boot:
        common = {"bootstrap": boot.addrs, "advert_interval": 1.0, "run": "dup"}
        with Swarm(key=key, **common) as first:
            m, i = tiny()
            opt = first.diloco(m, i, inner_steps=2, join=False)
            with Swarm(key=key, **common) as second:
                assert second.peer_id == first.peer_id
                # the newer process's adverts win every table; the hidden one notices (an event)
                node = first.node
                first.call(lambda: node.wait_until(lambda: bool(node.identity_clones()), timeout=30))
                assert first.identity_clones() == second.addrs
                with pytest.raises(DuplicateIdentity, match="another process uses this peer's key") as info:
                    train(opt, m, 2)  # the outer step: refused before the round, not taken alone
                assert second.addrs[0] in str(info.value)
                assert opt.outer_step == 0
                m2, i2 = tiny()
                with pytest.raises(DuplicateIdentity):
                    first.diloco(m2, i2, inner_steps=2, join=False)
