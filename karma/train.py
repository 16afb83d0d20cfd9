"""The one training loop: CPU, one GPU and many GPUs run the same code.

    karma train --config configs/debug.yaml loss.preset=karma          # one process (CPU or GPU)
    karma train --config configs/debug.yaml --resume                   # continue checkpoints/last
    torchrun --nproc_per_node=2 -m karma train --config configs/debug.yaml   # DDP (gloo on CPU)

    from karma.train import train, train_step
    run_dir = train(load_config("configs/debug.yaml", ["train.steps=20"]))
    stats = train_step(objective, optimizer, scheduler, lambda micro: batch)   # one update

The file reads top to bottom: setup (`_setup_*`), `train_step` (forward / backward over the
micro-batches, clipping, the non-finite guard, the update), the `RunState` record, and `train`,
a short loop around `train_step` with periodic validation, logging and checkpoints. The model is
karma/model.py, the losses karma/objective.py, the optimizer and schedule karma/optim.py,
validation karma/evaluate.py. An optional monitor (e.g. `karma.analysis.SinkMonitor.from_config`)
is handed in by the caller, so the loop imports nothing from analysis.

DDP switches on when torchrun sets RANK/WORLD_SIZE (see karma.distributed); everything else is
the same code. Batch arithmetic: `train.batch_size` is the GLOBAL number of examples per optimizer
step, so a run means the same thing on 1 or N processes. Each optimizer step takes `grad_accum`
micro-steps; each micro-step's global micro-batch (batch_size / grad_accum examples, a contiguous
slice of a seeded per-epoch permutation that every rank computes identically) is split into
`world_size` disjoint shards, one per rank. The action loss gathers item embeddings across ranks,
so its in-batch negatives are the whole global micro-batch whatever the world size.

The run directory (`train.output_dir`) gets config.yaml, log.jsonl (one JSON object per logged
step: loss parts averaged over the window and over ranks, lr, temperature, grad norm, validation
metrics), checkpoints/last and checkpoints/best (by validation HR@10), and train_summary.json.
Only rank 0 prints and writes.

A non-finite loss part or gradient norm stops the run before the optimizer step, so no NaN ever
reaches the weights or a checkpoint: the last good checkpoint stays, and TrainingDivergedError
(a KarmaError: the CLI exits non-zero) names the step and the part.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from karma import distributed
from karma.atomic import check_output_dir, ensure_output_dir, write_json_atomic
from karma.checkpoint import load_checkpoint, save_checkpoint
from karma.config import Config, config_to_dict, load_config, save_config
from karma.errors import DataError, KarmaError

# A monitor probes the model every train.monitor_every steps: (model, step) -> figures to log.
Monitor = Callable[[nn.Module, int], "dict[str, float] | None"]
MonitorFactory = Callable[[Config, Any], Monitor]


class TrainingDivergedError(KarmaError):
    """A loss part or the gradient norm became NaN/inf; the run stopped before the update."""


@lru_cache(maxsize=2)
def _epoch_permutation(n_examples: int, seed: int, epoch: int) -> np.ndarray:
    # Seeded by (seed, epoch) alone: every rank, and a resumed run, gets the same order.
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def batch_indices(
    n_examples: int,
    step: int,
    micro_step: int,
    grad_accum: int,
    micro_batch_global: int,
    rank: int,
    world_size: int,
    seed: int,
) -> np.ndarray:
    """Train-example indices of `rank`'s shard at (optimizer step, micro-step).

    Micro-batches are consecutive slices of a per-epoch permutation (the incomplete tail of an
    epoch is dropped); the micro-batch is cut into `world_size` equal disjoint shards.
    """
    per_epoch = n_examples // micro_batch_global
    if per_epoch == 0:
        raise DataError(
            f"train split has {n_examples} examples, fewer than one global micro-batch "
            f"({micro_batch_global}); lower train.batch_size"
        )
    global_micro = step * grad_accum + micro_step
    epoch, slot = divmod(global_micro, per_epoch)
    perm = _epoch_permutation(n_examples, seed, epoch)
    micro = perm[slot * micro_batch_global : (slot + 1) * micro_batch_global]
    per_rank = micro_batch_global // world_size
    return micro[rank * per_rank : (rank + 1) * per_rank]


def _micro_batch_sizes(cfg: Config, world_size: int) -> tuple[int, int]:
    """(global micro-batch, per-rank micro-batch); the batch must divide evenly."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    if accum < 1 or batch % (accum * world_size) != 0:
        raise KarmaError(
            f"config key 'train.batch_size': {batch} must be a multiple of train.grad_accum "
            f"({accum}) x world size ({world_size})"
        )
    return batch // accum, batch // (accum * world_size)


def _batch_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """The batch builder's sampling generator (hard-negative subsampling, sampled negatives),
    derived from (seed, step, micro-step, rank) alone: a resumed run, on any rank, draws exactly
    what the uninterrupted run drew, with nothing to save."""
    state = np.random.SeedSequence([seed, step, micro_step, rank]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    # bf16 autocast on CUDA only: CPU autocast is slow and changes numerics of the golden tests.
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _validation_users(n_valid: int, eval_users: int, seed: int) -> np.ndarray:
    """A fixed seeded subset of validation rows (all rows when eval_users is 0 or too large)."""
    if eval_users <= 0 or eval_users >= n_valid:
        return np.arange(n_valid)
    return np.sort(np.random.default_rng(seed).choice(n_valid, size=eval_users, replace=False))


def _tensorboard_writer(run_dir: Path) -> Any | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop log records written after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in kept if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _check_resume_config(saved: Config, cfg: Config, ckpt_dir: Path) -> None:
    """The model and loss must be the ones the checkpoint was trained with."""
    old, new = config_to_dict(saved), config_to_dict(cfg)
    diffs = [
        f"{section}.{key}: {old[section][key]!r} -> {new[section][key]!r}"
        for section in ("model", "loss")
        for key in new[section]
        if old[section][key] != new[section][key]
    ]
    if diffs:
        raise KarmaError(
            f"{ckpt_dir / 'config.yaml'}: cannot resume with a different model/loss config: "
            + "; ".join(diffs)
        )


# ---- setup -------------------------------------------------------------------------------------


def _setup_run_dir(run_dir: Path, resume: bool, is_main: bool) -> None:
    last = run_dir / "checkpoints" / "last"
    if resume and not (last / "state.pt").exists():
        raise KarmaError(f"--resume: no checkpoint at {last}")
    if not resume and (last / "state.pt").exists():
        raise KarmaError(
            f"{run_dir} already holds a run (checkpoints/last exists); pass --resume to continue "
            f"it or set train.output_dir to a new directory"
        )
    # Claimed before any work (and before data.prepared_dir may be created inside it); never a
    # folder of the user's own. Every rank checks before rank 0 claims it: a rank checking while
    # another was writing the marker saw a non-empty unmarked folder and refused it.
    check_output_dir(run_dir, "train.output_dir")
    distributed.barrier()
    if is_main:
        ensure_output_dir(run_dir, "train.output_dir")
    distributed.barrier()


def _setup_objective(
    cfg: Config, dist: Any, data: Any, image_features: np.ndarray | None = None
) -> tuple[Any, nn.Module, Any]:
    """(objective, what to call for the losses, user sequences or None): the DDP wrapper under
    torchrun, else the objective itself. Seeded here so that every rank builds identical initial
    weights. train.objective=sequence also caches the frozen lower layers per user sequence, the
    items' states read with their image token (image_features (N, image_dim), None: no images)."""
    from karma.inference import refresh_history_cache
    from karma.model import build_model
    from karma.objective import KarmaObjective
    from karma.sequence import SequenceObjective, UserSequences

    _seed_everything(cfg.train.seed)
    model = build_model(cfg).to(dist.device)
    model.init_item_ids(data.items.n_items, _training_items(data))
    model.set_image_table(image_features)
    sequences = None
    if cfg.train.objective == "sequence":
        with _autocast(dist.device, cfg.train.bf16):
            refresh_history_cache(model, list(data.items.texts), cfg.eval.batch_size,
                                  image_features, rank=dist.rank, world_size=dist.world_size)
            sequences = UserSequences.build(model, data, cfg, progress=dist.is_main)
        n_items = data.items.n_items
        proposal = sequences.item_frequency(n_items) if cfg.loss.catalog_samples else None
        objective = SequenceObjective(model, cfg.loss, proposal, image_features)
    else:
        objective = KarmaObjective(model, cfg.loss, rank=dist.rank, world_size=dist.world_size)
    objective.train()
    if dist.world_size <= 1:
        return objective, objective, sequences
    from torch.nn.parallel import DistributedDataParallel

    # Calls must go through the wrapper so that its gradient hooks fire.
    ddp = DistributedDataParallel(
        objective,
        device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        # The objective freezes the heads a preset does not train, so every trainable
        # parameter gets a gradient; the history cache is identical on every rank (it is
        # gathered), so there are no buffers to re-broadcast each step.
        find_unused_parameters=False,
        broadcast_buffers=False,
    )
    return objective, ddp, sequences


def _training_items(data: Any) -> torch.Tensor:
    """(n_items,) bool: items seen in the training split (as a target or in a history), the
    only ones a hybrid model gives an ID embedding."""
    train = data.split("train")
    known = np.zeros(data.items.n_items, dtype=bool)
    known[np.asarray(train.targets, dtype=np.int64)] = True
    for hist in train.histories:
        known[np.asarray(hist, dtype=np.int64)] = True
    return torch.from_numpy(known)


# ---- one optimizer step ----------------------------------------------------------------------


def train_step(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    batch_at: Callable[[int], dict[str, torch.Tensor]],
    grad_accum: int = 1,
    clip_norm: float = 1.0,
    params: Sequence[nn.Parameter] | None = None,
    bf16: bool = False,
    step: int = 0,
) -> dict[str, float]:
    """One optimizer step: forward / backward over `grad_accum` micro-batches, clip, update.

    forward: a `karma.objective.KarmaObjective` or its DDP wrapper (only the last micro-step
    all-reduces gradients); batch_at(micro) builds micro-batch `micro` on the objective's
    device; params: what to clip (default: every trainable parameter of `forward`); clip_norm
    <= 0 turns clipping off but the norm is still measured. Returns the loss parts averaged over
    micro-steps and ranks (`loss` first, then the `*_loss` parts by name), `grad_norm` and
    `temperature`. A non-finite part or norm raises TrainingDivergedError before the update
    (gradients are dropped), naming `step + 1`.
    """
    if params is None:
        params = [p for p in forward.parameters() if p.requires_grad]
    device = next(iter(params)).device
    ddp = isinstance(forward, torch.nn.parallel.DistributedDataParallel)
    part_names: list[str] = []
    part_sums: torch.Tensor | None = None
    for micro in range(grad_accum):
        batch = batch_at(micro)
        last_micro = micro == grad_accum - 1
        with forward.no_sync() if ddp and not last_micro else contextlib.nullcontext():
            with _autocast(device, bf16):
                out = forward(batch)
            (out["loss"] / grad_accum).backward()
        if not part_names:
            part_names = ["loss"] + sorted(k for k in out if k.endswith("_loss"))
        parts = torch.stack([out[k].detach().float() for k in part_names])  # (P,)
        part_sums = parts if part_sums is None else part_sums + parts
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))

    # One small all-reduce per step: loss parts, grad norm, temperature (NaN propagates).
    temperature = out.get("temperature", torch.tensor(float("nan")))
    stats = torch.cat(
        [
            part_sums / grad_accum,
            grad_norm.detach().float().reshape(1).to(part_sums.device),
            torch.as_tensor(temperature).detach().float().reshape(1).to(part_sums.device),
        ]
    )
    names = part_names + ["grad_norm", "temperature"]
    values = dict(zip(names, distributed.all_reduce_mean(stats).tolist()))
    bad = [k for k, v in values.items() if k != "temperature" and not math.isfinite(v)]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDivergedError(
            f"non-finite training value at step {step + 1}: "
            + ", ".join(f"{k}={values[k]}" for k in bad)
            + "; stopped before the update"
        )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class RunState:
    """What the loop carries from step to step (and across a resume, via the checkpoint)."""

    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"hr@10": -1.0, "step": -1})
    prior_wall_s: float = 0.0  # wall time of the run's earlier legs (resume)
    started: float = field(default_factory=time.time)
    last_good_step: int | None = None  # step of the last checkpoint written
    window: list[dict[str, float]] = field(default_factory=list)  # steps since the last log
    step_times: list[float] = field(default_factory=list)  # s per step, no eval / save
    last_log: dict[str, Any] = field(default_factory=dict)

    def wall_s(self) -> float:
        return self.prior_wall_s + time.time() - self.started

    def extra(self) -> dict[str, Any]:
        """The checkpoint's `extra`: what a resumed run needs back."""
        return {"best": dict(self.best), "wall_s": float(self.wall_s())}


def train(cfg: Config, resume: bool = False, monitor: MonitorFactory | None = None) -> Path:
    """Train as configured; returns the run directory (`train.output_dir`).

    monitor: built as `monitor(cfg, prepared_data)` on rank 0 when train.monitor_every > 0 and
    called every monitor_every steps; what it returns is logged.
    """
    dist = distributed.init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, dist, monitor)
    finally:
        distributed.cleanup()


def _train(cfg: Config, resume: bool, dist: Any, monitor_factory: MonitorFactory | None) -> Path:
    from karma.batching import BatchBuilder
    from karma.data import load_or_prepare, resolve_image_dim
    from karma.evaluate import validate
    from karma.inference import refresh_history_cache
    from karma.optim import build_optimizer, build_scheduler

    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    device = dist.device
    run_dir = Path(tc.output_dir)
    last_dir, best_dir = run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best"
    log_path = run_dir / "log.jsonl"
    micro_global, _ = _micro_batch_sizes(cfg, dist.world_size)
    if tc.objective == "sequence":
        from karma.sequence import check_sequence_config

        check_sequence_config(cfg)
    _setup_run_dir(run_dir, resume, dist.is_main)
    data = load_or_prepare(cfg, is_main=dist.is_main)
    cfg = resolve_image_dim(cfg, data)  # before the model, the resume check and config.yaml
    image_features = data.model_image_features(cfg.model.image_dim)
    train_split = data.split("train")
    objective, forward, sequences = _setup_objective(cfg, dist, data, image_features)
    n_examples = len(sequences) if sequences is not None else len(train_split)
    model = objective.model
    optimizer = build_optimizer(objective, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    builder = BatchBuilder(model.tokenizer, data.items, cfg, seed=tc.seed,
                           image_features=image_features)

    state = RunState()
    if resume:
        _check_resume_config(load_config(last_dir / "config.yaml"), cfg, last_dir)
        restored = load_checkpoint(last_dir, model, optimizer, scheduler, objective=objective)
        state.step = state.last_good_step = restored["step"]
        state.best = restored["extra"].get("best", state.best)
        state.prior_wall_s = float(restored["extra"].get("wall_s", 0.0))
    if state.step >= tc.steps:
        if dist.is_main:
            print(f"{last_dir} is already at step {state.step} >= train.steps={tc.steps}")
        return run_dir
    if dist.rank > 0:
        # Independent randomness per rank (dropout, sampled negatives); rank 0 matches 1 process.
        torch.manual_seed(tc.seed + 7919 * dist.rank + state.step)
    monitor = None
    if monitor_factory is not None and tc.monitor_every > 0 and dist.is_main:
        # rank 0 only: no collectives, no random draws, so DDP ranks and resume stay in step
        monitor = monitor_factory(cfg, data)
    # Clipped in the model's parameter order, temperature after the heads: the order the
    # gradient-norm sum has always used (a different order changes the norm in the last bit).
    params = [p for p in _clip_order(objective) if p.requires_grad]
    val_rows = _validation_users(len(data.split("valid")), tc.eval_users, tc.seed)
    writer = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if resume:
            _truncate_log(log_path, state.step)
        elif log_path.exists():
            log_path.unlink()
        writer = _tensorboard_writer(run_dir)
        what = "examples"
        if sequences is not None:  # how much of the training data the windows cover
            targets = sum(len(s) - 1 for s in sequences.items)
            what = f"user sequence windows ({targets:,} next-item readout targets)"
        print(
            f"training {cfg.loss.preset} ({tc.objective} objective) on {n_examples} {what}, "
            f"{sum(p.numel() for p in params):,} trainable params, world size "
            f"{dist.world_size}, device {device}, steps {state.step}->{tc.steps}"
        )

    def save(ckpt_dir: Path) -> None:
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, state.step, cfg, state.extra(),
                        objective=objective)

    def batch_at(micro: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(n_examples, state.step, micro, tc.grad_accum, micro_global,
                            dist.rank, dist.world_size, tc.seed)
        gen = _batch_generator(tc.seed, state.step, micro, dist.rank)
        if sequences is not None:
            return sequences.batch(model, idx, generator=gen)
        return _to_device(builder(train_split, idx, generator=gen), device)

    # history_source=cache: the cache is a persistent buffer of the model, so a resumed run gets
    # back exactly the cache the uninterrupted run was using.
    # (The sequence objective's item tower is frozen: its cache, filled at setup, never changes.)
    # The catalog statistics of model.item_norm are refreshed with the same pass.
    uses_cache = tc.objective == "prompt" and (
        cfg.model.history_source == "cache" or cfg.model.item_norm != "none"
    )
    refresh_every = max(1, cfg.model.cache_refresh_steps)
    bar = tqdm(total=tc.steps, initial=state.step, disable=not dist.is_main, dynamic_ncols=True)
    while state.step < tc.steps:
        if uses_cache and state.step % refresh_every == 0:
            with _autocast(device, tc.bf16):
                refresh_history_cache(model, list(data.items.texts), cfg.eval.batch_size,
                                      image_features, rank=dist.rank,
                                      world_size=dist.world_size)
        step_start = time.perf_counter()
        try:
            values = train_step(forward, optimizer, scheduler, batch_at, tc.grad_accum,
                                tc.clip_norm, params, tc.bf16, state.step)
        except TrainingDivergedError as err:
            bar.close()
            kept = (
                f"last good checkpoint kept at {last_dir} (step {state.last_good_step})"
                if state.last_good_step is not None
                else "no checkpoint was written yet"
            )
            raise TrainingDivergedError(f"{err}, {kept}") from None
        state.step += 1
        state.window.append(values)
        state.step_times.append(time.perf_counter() - step_start)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k.endswith("loss")})

        # ---- log, validate, checkpoint (rank 0 writes; others wait at barriers)
        step = state.step
        do_log = step % tc.log_every == 0 or step == tc.steps
        record = _log_record(state, scheduler) if do_log else {}
        if tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
            if dist.is_main:
                with _autocast(device, tc.bf16), torch.random.fork_rng(devices=[]):
                    metrics = validate(model, data, val_rows, cfg)
                record.setdefault("step", step)
                record.update({f"val/{k}": v for k, v in metrics.items()})
                if metrics["hr@10"] > state.best["hr@10"]:
                    state.best = {"hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"],
                                  "step": step}
                    save(best_dir)
                bar.write(
                    f"step {step}: val hr@10 {metrics['hr@10']:.4f} ndcg@10 "
                    f"{metrics['ndcg@10']:.4f} (best {state.best['hr@10']:.4f} @ "
                    f"{state.best['step']})"
                )
            distributed.barrier()
        if monitor is not None:
            with _autocast(device, tc.bf16):
                probed = monitor(model, step)
            if probed:
                record.setdefault("step", step)
                record.update(probed)
        if record and dist.is_main:
            _write_log(log_path, writer, record)
            state.last_log = record
        if (tc.save_every > 0 and step % tc.save_every == 0) or step == tc.steps:
            if dist.is_main:
                save(last_dir)
            distributed.barrier()
            state.last_good_step = step
    bar.close()
    if dist.is_main:
        if writer is not None:
            writer.close()
        _write_summary(run_dir, cfg, state, dist.world_size)
    return run_dir


def _clip_order(objective: nn.Module) -> list[nn.Parameter]:
    model = objective.model
    heads = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    rest = [p for name, p in objective.named_parameters() if not name.startswith("model.")]
    return heads + rest + list(model.backbone.parameters())


def _log_record(state: RunState, scheduler: Any) -> dict[str, Any]:
    """Means over the steps since the last log; empties the window."""
    names = list(state.window[0])  # parts, grad_norm, temperature
    mean = np.mean(np.asarray([[v[k] for k in names] for v in state.window]), axis=0).tolist()
    record: dict[str, Any] = {"step": state.step, **dict(zip(names[:-1], mean[:-1]))}
    record["temperature"] = state.window[-1]["temperature"]
    record["lr"] = scheduler.get_last_lr()[0]
    record["step_s"] = float(np.mean(state.step_times))
    state.window, state.step_times = [], []
    return record


def _write_log(log_path: Path, writer: Any | None, record: dict[str, Any]) -> None:
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, record["step"])


def _write_summary(run_dir: Path, cfg: Config, state: RunState, world_size: int) -> None:
    wall_s = state.wall_s()
    summary = {
        "steps": state.step,
        "wall_time_s": round(wall_s, 3),
        "world_size": world_size,
        "examples_seen": state.step * cfg.train.batch_size,
        "best_val": state.best if state.best["step"] >= 0 else None,
        "final_losses": {k: v for k, v in state.last_log.items() if k.endswith("loss")},
        "preset": cfg.loss.preset,
        "run_dir": str(run_dir),
    }
    write_json_atomic(run_dir / "train_summary.json", summary)
    print(f"done: {state.step} steps in {wall_s:.1f}s; run written to {run_dir}")


__all__ = ["RunState", "TrainingDivergedError", "batch_indices", "train", "train_step"]
