"""The training loop on the tiny random backbone and a tiny generated dataset (all on CPU).

Golden values: `GOLDEN_LOSSES` are the per-step total losses of a seeded 5-step run. When a
deliberate change to the model, the losses, the batching or the loop moves them, regenerate with

    .venv/bin/python tests/test_train.py

which prints the new list to paste here (check the change was meant to alter the numbers).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from karma.config import Config, load_config
from karma.errors import KarmaError

GOLDEN_LOSSES: list[float] = [9.354507, 11.352316, 8.289383, 8.466829, 8.20546]
GOLDEN_TOL = 1e-4

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def write_tiny_dataset(root: Path, n_items: int = 30, n_users: int = 12, per_user: int = 8) -> Path:
    """items.csv + interactions.csv: users prefer one genre, so there is signal to learn."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["item_id,title,year,category"]
    genre_of = []
    for i in range(n_items):
        genre = GENRES[i % len(GENRES)]
        genre_of.append(genre)
        rows.append(f"m{i},Movie {i} of {genre},{1980 + i},{genre}")
    (root / "items.csv").write_text("\n".join(rows) + "\n")
    rows = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        liked = [i for i in range(n_items) if genre_of[i] == GENRES[u % len(GENRES)]]
        others = [i for i in range(n_items) if i not in liked]
        picks = list(rng.permutation(liked)) + list(rng.permutation(others))
        for t, i in enumerate(picks[:per_user]):
            rows.append(f"u{u},m{i},{1000 * u + t}")
    (root / "interactions.csv").write_text("\n".join(rows) + "\n")
    return root


def tiny_config(root: Path, *overrides: str) -> Config:
    data = root / "data"
    if not (data / "items.csv").exists():
        write_tiny_dataset(data)
    base = [
        "data.source=files",
        f"data.items_path={data / 'items.csv'}",
        f"data.interactions_path={data / 'interactions.csv'}",
        f"data.prepared_dir={root / 'prepared'}",
        "data.max_history=5",
        "model.backbone=tiny-random",
        "model.emb_dim=32",
        "model.max_item_tokens=16",
        "model.max_target_tokens=16",
        f"train.output_dir={root / 'run'}",
        "train.steps=5",
        "train.batch_size=4",
        "train.lr=0.001",
        "train.head_lr=0.001",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "train.save_every=0",
        "train.seed=0",
        "train.num_threads=1",
    ]
    return load_config(None, base + list(overrides))


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def read_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt_dir / "model.safetensors"))


def test_lr_schedule_warmup_then_cosine_to_floor() -> None:
    from karma.optim import lr_factor

    values = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:]))  # monotone decay after warmup
    assert values[20] == pytest.approx(0.1)
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay


def test_batch_indices_shard_the_global_batch_disjointly() -> None:
    from karma.train import batch_indices

    n, accum, micro_global, world = 50, 2, 8, 2
    seen: list[int] = []
    for step in range(3):  # 6 micro-batches of 8 = 48 examples, within one epoch
        for micro in range(accum):
            shards = [
                batch_indices(n, step, micro, accum, micro_global, r, world, 0) for r in (0, 1)
            ]
            assert [len(s) for s in shards] == [4, 4]
            assert not set(shards[0]) & set(shards[1])
            # the union of the shards is what one process would take as its micro-batch
            single = batch_indices(n, step, micro, accum, micro_global, 0, 1, 0)
            assert sorted(np.concatenate(shards)) == sorted(single)
            seen += list(single)
    assert len(set(seen)) == 48  # no example repeats within an epoch
    # next epoch: a different permutation
    epoch1 = batch_indices(n, 3, 0, accum, micro_global, 0, 1, 0)
    assert not np.array_equal(epoch1, batch_indices(n, 0, 0, accum, micro_global, 0, 1, 0))


def test_golden_five_steps(tmp_path: Path) -> None:
    from karma.train import train

    run_dir = train(tiny_config(tmp_path, "loss.preset=karma"))
    losses = [r["loss"] for r in read_log(run_dir)]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert GOLDEN_LOSSES, "golden values missing: run `python tests/test_train.py`"
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=GOLDEN_TOL)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 5
    assert set(summary["final_losses"]) >= {"loss", "act_loss", "gen_loss", "rec_loss"}


def test_train_step_called_directly_gives_the_loops_first_step(tmp_path: Path) -> None:
    """train_step outside the loop (as benchmarks/step_cost.py calls it) is the loop's step."""
    from karma.batching import BatchBuilder
    from karma.data import load_or_prepare
    from karma.model import build_model
    from karma.objective import KarmaObjective
    from karma.optim import build_optimizer, build_scheduler
    from karma.train import _batch_generator, batch_indices, train_step

    cfg = tiny_config(tmp_path, "loss.preset=karma")
    data = load_or_prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    objective = KarmaObjective(build_model(cfg), cfg.loss).train()
    optimizer = build_optimizer(objective, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    builder = BatchBuilder(objective.model.tokenizer, data.items, cfg, seed=cfg.train.seed)
    train_split = data.split("train")
    idx = batch_indices(len(train_split), 0, 0, 1, cfg.train.batch_size, 0, 1, cfg.train.seed)
    batch = builder(train_split, idx, generator=_batch_generator(cfg.train.seed, 0, 0, 0))
    before = objective.model.user_proj.weight.detach().clone()
    stats = train_step(objective, optimizer, scheduler, lambda micro: batch, clip_norm=1.0)
    assert list(stats)[:1] == ["loss"] and {"grad_norm", "temperature", "rec_loss"} <= set(stats)
    assert stats["loss"] == pytest.approx(GOLDEN_LOSSES[0], abs=GOLDEN_TOL)
    assert not torch.equal(before, objective.model.user_proj.weight)
    assert all(p.grad is None for p in objective.parameters())


@pytest.mark.parametrize("history_source", ["live", "cache"])
def test_resume_is_bit_for_bit(tmp_path: Path, history_source: str) -> None:
    from karma.train import train

    common = (
        "loss.preset=karma",
        "train.steps=6",
        "train.save_every=3",
        f"model.history_source={history_source}",
        "model.cache_refresh_steps=2",  # the crash at step 3 falls between two refreshes
    )
    straight = train(tiny_config(tmp_path / "a", *common))

    # Interrupted at step 3: same config but stopping at 3 (the schedule is a function of
    # train.steps, so the first leg keeps steps=6 and is cut short by a failure after step 3).
    cut = tiny_config(tmp_path / "b", *common)
    import karma.train as train_mod

    original = train_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        raise RuntimeError("simulated crash right after the step-3 checkpoint")

    train_mod.save_checkpoint = save_then_die
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cut)
    finally:
        train_mod.save_checkpoint = original
    assert calls["n"] == 1
    resumed = train(cut, resume=True)

    log_a, log_b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in log_b] == list(range(1, 7))
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "act_loss", "gen_loss", "rec_loss", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = read_weights(straight / "checkpoints/last"), read_weights(resumed / "checkpoints/last")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    from karma.train import train

    train(tiny_config(tmp_path, "train.steps=2"))
    with pytest.raises(KarmaError, match="model.emb_dim"):
        train(tiny_config(tmp_path, "train.steps=4", "model.emb_dim=16"), resume=True)
    with pytest.raises(KarmaError, match="--resume"):
        train(tiny_config(tmp_path, "train.steps=4"))  # would clobber the run


def test_nan_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import karma.objective
    from karma.train import TrainingDivergedError, train

    original = karma.objective.KarmaObjective.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step: after the step-2 checkpoint, before step 4's
            out = dict(out)
            out["gen_loss"] = out["gen_loss"] * float("nan")
            out["loss"] = out["loss"] + out["gen_loss"]
        return out

    monkeypatch.setattr(karma.objective.KarmaObjective, "forward", poisoned)
    cfg = tiny_config(tmp_path, "loss.preset=karma", "train.steps=6", "train.save_every=2")
    with pytest.raises(TrainingDivergedError, match=r"step 4: .*gen_loss=nan") as err:
        train(cfg)
    assert "step 2" in str(err.value)
    last = tmp_path / "run" / "checkpoints" / "last"
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(w).all() for w in read_weights(last).values())
    assert [p.name for p in last.parent.iterdir()] == ["last"]  # no partial / tmp dirs


def test_validation_and_best_checkpoint(tmp_path: Path) -> None:
    from karma.checkpoint import load_model
    from karma.train import train

    cfg = tiny_config(tmp_path, "train.steps=4", "train.eval_every=2", "train.eval_users=8")
    run_dir = train(cfg)
    evals = [r for r in read_log(run_dir) if "val/hr@10" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["val/hr@10"] <= 1.0 and r["val/ndcg@10"] <= r["val/hr@10"] for r in evals)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["best_val"]["hr@10"] == max(r["val/hr@10"] for r in evals)
    model, saved_cfg = load_model(run_dir / "checkpoints" / "best")
    assert not model.training and saved_cfg.model.emb_dim == 32
    assert (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loss_decreases_on_tiny_overfit_set(tmp_path: Path, lora: bool) -> None:
    from karma.train import train

    cfg = tiny_config(
        tmp_path,
        "loss.preset=karma",
        "train.steps=20",
        "train.batch_size=8",
        "train.lr=0.003",
        "train.head_lr=0.003",
        f"model.lora={lora}",
        "model.lora_r=8",
        "model.lora_alpha=16",
    )
    run_dir = train(cfg)
    log = read_log(run_dir)
    for part, ratio in (("loss", 0.9), ("act_loss", 0.85)):
        values = [r[part] for r in log]
        assert np.mean(values[-4:]) < ratio * np.mean(values[:4]), (part, values)
    # LoRA: adapters are in the checkpoint (merged weights are not what we train)
    has_adapters = any("lora_A" in k for k in read_weights(run_dir / "checkpoints/last"))
    assert has_adapters == lora


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, root: str, overrides: list[str]) -> None:
    # What torchrun sets; karma.distributed.init_distributed reads it.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    from karma.train import train

    train(tiny_config(Path(root), *overrides))


@pytest.mark.slow  # ~30 s: two spawned interpreters import torch and transformers
def test_two_process_gloo_matches_one_process(tmp_path: Path) -> None:
    """2 ranks x 2 examples == 1 process x 4 examples per micro-step (the action loss gathers
    the in-batch negatives), with 2 accumulation micro-steps (no_sync on the first)."""
    from karma.train import train

    overrides = [
        "loss.preset=action_only",
        "train.steps=2",
        "train.batch_size=8",
        "train.grad_accum=2",
        "train.save_every=0",
    ]
    single = train(tiny_config(tmp_path / "one", *overrides))
    prepared = tmp_path / "one" / "prepared"
    ddp_overrides = overrides + [f"data.prepared_dir={prepared}"]
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, _free_port(), str(tmp_path / "two"), ddp_overrides), nprocs=2
    )
    ddp = tmp_path / "two" / "run"
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last"]
    assert torch.load(ddp / "checkpoints/last/state.pt", weights_only=True)["step"] == 2
    for a, b in zip(read_log(single), read_log(ddp)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    wa, wb = read_weights(single / "checkpoints/last"), read_weights(ddp / "checkpoints/last")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4, msg=name)


if __name__ == "__main__":
    # Regenerate GOLDEN_LOSSES (see the module docstring).
    import tempfile

    from karma.train import train

    with tempfile.TemporaryDirectory() as tmp:
        run = train(tiny_config(Path(tmp), "loss.preset=karma"))
        print("GOLDEN_LOSSES =", [round(r["loss"], 6) for r in read_log(run)], file=sys.stdout)


def test_monitor_logs_sink_rate_and_fidelity(tmp_path):
    """train.monitor_every > 0: the probe's attention and fidelity figures land in log.jsonl."""
    from karma.analysis import SinkMonitor
    from karma.train import train

    cfg = tiny_config(tmp_path, "train.steps=4", "train.monitor_every=2")
    run_dir = train(cfg, monitor=SinkMonitor.from_config)
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    probed = [r for r in rows if "monitor/sink_rate_first_emb" in r]
    assert [r["step"] for r in probed] == [2, 4]
    for r in probed:
        assert 0.0 <= r["monitor/sink_rate_first_emb"] <= 1.0
        assert 0.0 <= r["monitor/fidelity_token_f1"] <= 1.0
        assert r["monitor/sink_warning"] in (0.0, 1.0)
