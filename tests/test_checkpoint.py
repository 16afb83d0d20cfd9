"""Checkpoints: round trip of every piece of run state, weights_only loading, atomic replace."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import karma.checkpoint as ckpt
from karma.config import Config


class TiedNet(nn.Module):
    """Embedding tied to the output layer, like a causal LM's embed_tokens / lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(x))))


def _trained_state(seed: int = 0) -> tuple[TiedNet, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    net = TiedNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        x = torch.randint(0, 11, (4,))
        nn.functional.cross_entropy(net(x), x).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return net, opt, sched


def test_round_trip_restores_weights_optimizer_scheduler_rng(tmp_path: Path) -> None:
    net, opt, sched = _trained_state()
    cfg = Config()
    cfg.train.steps = 123
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    ckpt.save_checkpoint(tmp_path / "last", net, opt, sched, 3, cfg, {"best": {"hr@10": 0.25}})
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh, fresh_opt, fresh_sched = _trained_state(seed=1)  # different weights and moments
    out = ckpt.load_checkpoint(tmp_path / "last", fresh, fresh_opt, fresh_sched)

    assert out["step"] == 3 and out["extra"]["best"]["hr@10"] == 0.25
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.out.weight is fresh.embed.weight  # tying survives the dedup of save_model
    assert fresh_sched.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    moments = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], moments)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws


def test_state_file_loads_with_weights_only(tmp_path: Path) -> None:
    net, opt, sched = _trained_state()
    ckpt.save_checkpoint(tmp_path / "c", net, opt, sched, 7, Config(), {"wall_s": 1.5})
    state = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    assert state["step"] == 7
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "state.pt",
    ]


def test_interrupted_save_keeps_previous_checkpoint_and_no_partial_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, opt, sched = _trained_state()
    target = tmp_path / "checkpoints" / "last"
    ckpt.save_checkpoint(target, net, opt, sched, 3, Config(), {})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # model.safetensors is already written
    net.hidden.weight.data.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(target, net, opt, sched, 4, Config(), {})

    assert [p.name for p in target.parent.iterdir()] == ["last"]  # no .tmp-* left behind
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert ckpt.read_state(target)["step"] == 3


def test_replacing_existing_checkpoint(tmp_path: Path) -> None:
    net, opt, sched = _trained_state()
    target = tmp_path / "last"
    ckpt.save_checkpoint(target, net, opt, sched, 1, Config(), {})
    ckpt.save_checkpoint(target, net, opt, sched, 2, Config(), {})
    assert ckpt.read_state(target)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    # leftovers of a save that crashed in another process are cleared by the next save
    (tmp_path / "last.tmp-12345").mkdir()
    ckpt.save_checkpoint(target, net, opt, sched, 3, Config(), {})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_crash_between_renames_is_repaired_on_load(tmp_path: Path) -> None:
    net, opt, sched = _trained_state()
    target = tmp_path / "last"
    ckpt.save_checkpoint(target, net, opt, sched, 5, Config(), {})
    # State after "rename old away" and before "rename new in".
    target.rename(tmp_path / "last.old-999")
    assert ckpt.read_state(target)["step"] == 5
    assert target.is_dir()


def test_mismatched_model_is_a_clear_error(tmp_path: Path) -> None:
    net, opt, sched = _trained_state()
    ckpt.save_checkpoint(tmp_path / "c", net, opt, sched, 1, Config(), {})
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_weights(tmp_path / "c", nn.Linear(6, 6))
    with pytest.raises(ckpt.CheckpointError, match="state.pt"):
        ckpt.read_state(tmp_path / "missing")
