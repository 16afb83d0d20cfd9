"""The one training loop: CPU, one GPU and many GPUs run the same code.

    karma train --config configs/debug.yaml loss.preset=karma          # one process (CPU or GPU)
    karma train --config configs/debug.yaml --resume                   # continue checkpoints/last
    torchrun --nproc_per_node=2 -m karma train --config configs/debug.yaml   # DDP (gloo on CPU)

    from karma.train import train
    run_dir = train(load_config("configs/debug.yaml", ["train.steps=20"]))

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
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from karma.atomic import ensure_output_dir
from karma.checkpoint import load_checkpoint, save_checkpoint
from karma.config import Config, config_to_dict, load_config, save_config
from karma.errors import DataError, KarmaError

VAL_KS = (10,)


class TrainingDivergedError(KarmaError):
    """A loss part or the gradient norm became NaN/inf; the run stopped before the update."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`.

    `step` is the number of optimizer steps already taken, so the first update uses
    1 / warmup_steps of the peak rate rather than zero.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (backbone at train.lr, heads at train.head_lr)."""
    groups = model.param_groups(cfg.train.lr, cfg.train.head_lr, cfg.train.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR scaling every group's own base rate by `lr_factor`."""
    warmup, total, min_ratio = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


@torch.no_grad()
def validate(model: nn.Module, data: Any, rows: np.ndarray, cfg: Config) -> dict[str, float]:
    """HR@10 / NDCG@10 / MRR@10 of `rows` of the valid split: exact dot product, full catalog.

    Items the user saw before the target are masked when eval.mask_history is set (the target
    itself never is), with karma.metrics' pessimistic tie rule.
    """
    from karma.metrics import compute_metrics, rank_with_mask

    was_training = model.training
    model.eval()
    valid = data.split("valid")
    item_texts = list(data.items.texts)
    histories = [list(valid.histories[i]) for i in rows]
    queries = [valid.queries[i] for i in rows]
    targets = np.asarray(valid.targets)[rows].astype(np.int64)
    seen = [list(valid.seen[i]) for i in rows] if cfg.eval.mask_history else None
    catalog = model.encode_catalog(item_texts, batch_size=cfg.eval.batch_size)
    user_emb = model.encode_users(
        histories, queries, catalog, item_texts, batch_size=cfg.eval.batch_size
    )  # (U, k)
    item_emb = torch.as_tensor(catalog.item_emb).float().cpu()  # (N, k)
    scores = torch.as_tensor(user_emb).float().cpu() @ item_emb.T  # (U, N)
    # one more than max(K) so that the tie rule is exact at K (see karma.metrics)
    top_scores, top_ids = rank_with_mask(scores, max(VAL_KS) + 1, seen=seen, targets=targets)
    model.train(was_training)
    return compute_metrics(top_ids, targets, VAL_KS, scores=top_scores)


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


def _prepare_data(cfg: Config, dist: Any) -> Any:
    from karma import distributed
    from karma.data import load_prepared, prepare_dataset

    prepared = Path(cfg.data.prepared_dir)
    if not (prepared / "stats.json").exists():
        if dist.is_main:
            print(f"prepared dataset not found at {prepared}; preparing it")
            prepare_dataset(cfg)
        distributed.barrier()
    elif dist.is_main and (prepared / "config.yaml").exists():
        # A prepared directory is reused as is; say so when it was made with other data settings.
        old = config_to_dict(load_config(prepared / "config.yaml"))["data"]
        new = config_to_dict(cfg)["data"]
        diffs = [f"data.{k}: {old[k]!r} (prepared) vs {new[k]!r}" for k in new if old[k] != new[k]]
        if diffs:
            print(
                f"warning: {prepared} was prepared with other data settings ({'; '.join(diffs)}); "
                f"using it as is -- run `karma data prepare` or set data.prepared_dir to change it"
            )
    return load_prepared(prepared)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def train(cfg: Config, resume: bool = False) -> Path:
    """Train a KarmaModel as configured; returns the run directory (`train.output_dir`)."""
    from karma import distributed

    dist = distributed.init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, dist)
    finally:
        distributed.cleanup()


def _train(cfg: Config, resume: bool, dist: Any) -> Path:
    from karma import distributed
    from karma.batching import BatchBuilder
    from karma.model import build_model

    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    device = torch.device(dist.device)
    run_dir = Path(tc.output_dir)
    last_dir, best_dir = run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best"
    log_path = run_dir / "log.jsonl"
    micro_global, _ = _micro_batch_sizes(cfg, dist.world_size)
    if resume and not (last_dir / "state.pt").exists():
        raise KarmaError(f"--resume: no checkpoint at {last_dir}")
    if not resume and (last_dir / "state.pt").exists():
        raise KarmaError(
            f"{run_dir} already holds a run (checkpoints/last exists); pass --resume to continue "
            f"it or set train.output_dir to a new directory"
        )
    # Claimed before any work (and before data.prepared_dir may be created inside it); never a
    # folder of the user's own.
    ensure_output_dir(run_dir, "train.output_dir")

    data = _prepare_data(cfg, dist)
    train_split = data.split("train")
    n_train = len(train_split)

    _seed_everything(tc.seed)
    model = build_model(cfg, rank=dist.rank, world_size=dist.world_size).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    builder = BatchBuilder(model.tokenizer, data.items, cfg, seed=tc.seed)

    start_step = 0
    best: dict[str, Any] = {"hr@10": -1.0, "step": -1}
    prior_wall_s = 0.0
    if resume:
        _check_resume_config(load_config(last_dir / "config.yaml"), cfg, last_dir)
        restored = load_checkpoint(last_dir, model, optimizer, scheduler)
        start_step = restored["step"]
        best = restored["extra"].get("best", best)
        prior_wall_s = float(restored["extra"].get("wall_s", 0.0))
    if start_step >= tc.steps:
        if dist.is_main:
            print(f"{last_dir} is already at step {start_step} >= train.steps={tc.steps}")
        return run_dir
    if dist.rank > 0:
        # Independent randomness per rank (dropout, sampled negatives); rank 0 matches 1 process.
        torch.manual_seed(tc.seed + 7919 * dist.rank + start_step)
    # history_source=cache: the cache is a persistent buffer of the model, so a resumed run gets
    # back exactly the cache the uninterrupted run was using.
    uses_cache = cfg.model.history_source == "cache"
    refresh_every = max(1, cfg.model.cache_refresh_steps)

    # Calling the model (DDP-wrapped or not) runs compute_losses; under DDP the call must go
    # through the wrapper so that its gradient hooks fire.
    forward: Callable[[dict[str, Any]], dict[str, torch.Tensor]] = model
    ddp_model = None
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # KarmaModel freezes the heads a preset does not train, so every trainable
            # parameter gets a gradient; the history cache is identical on every rank (it is
            # gathered), so there are no buffers to re-broadcast each step.
            find_unused_parameters=False,
            broadcast_buffers=False,
        )
        forward = ddp_model

    monitor = None
    if tc.monitor_every > 0 and dist.is_main:
        from karma.analysis import SinkMonitor

        # rank 0 only: no collectives, no random draws, so DDP ranks and resume stay in step
        monitor = SinkMonitor.from_config(cfg, data, is_main=True)

    params = [p for p in model.parameters() if p.requires_grad]
    clip = tc.clip_norm if tc.clip_norm > 0 else float("inf")
    val_rows = _validation_users(len(data.split("valid")), tc.eval_users, tc.seed)
    writer = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if resume:
            _truncate_log(log_path, start_step)
        elif log_path.exists():
            log_path.unlink()
        writer = _tensorboard_writer(run_dir)
        n_params = sum(p.numel() for p in params)
        print(
            f"training {cfg.loss.preset} on {n_train} examples, {n_params:,} trainable params, "
            f"world size {dist.world_size}, device {device}, steps {start_step}->{tc.steps}"
        )

    part_names: list[str] = []
    window: list[list[float]] = []
    step_times: list[float] = []  # seconds per optimizer step, without validation and saving
    last_log: dict[str, Any] = {}
    last_good_step = start_step if resume else None
    t0 = time.time()

    def save(ckpt_dir: Path) -> None:
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, step, cfg,
                        _extra(best, prior_wall_s + time.time() - t0))

    bar = tqdm(total=tc.steps, initial=start_step, disable=not dist.is_main, dynamic_ncols=True)
    step = start_step
    while step < tc.steps:
        if uses_cache and step % refresh_every == 0:
            with _autocast(device, tc.bf16):
                model.refresh_history_cache(list(data.items.texts), batch_size=cfg.eval.batch_size)

        # ---- forward / backward over grad_accum micro-steps
        step_start = time.perf_counter()
        part_sums: torch.Tensor | None = None
        for micro in range(tc.grad_accum):
            idx = batch_indices(
                n_train,
                step,
                micro,
                tc.grad_accum,
                micro_global,
                dist.rank,
                dist.world_size,
                tc.seed,
            )
            gen = _batch_generator(tc.seed, step, micro, dist.rank)
            batch = _to_device(builder(train_split, idx, generator=gen), device)
            last_micro = micro == tc.grad_accum - 1
            # Only the last micro-step all-reduces gradients.
            sync = ddp_model.no_sync() if ddp_model is not None and not last_micro else None
            with sync or contextlib.nullcontext():
                with _autocast(device, tc.bf16):
                    out = forward(batch)
                (out["loss"] / tc.grad_accum).backward()
            if not part_names:
                part_names = ["loss"] + sorted(k for k in out if k.endswith("_loss"))
            parts = torch.stack([out[k].detach().float() for k in part_names])  # (P,)
            part_sums = parts if part_sums is None else part_sums + parts
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)

        # ---- one small all-reduce per step: loss parts, grad norm, temperature (NaN propagates)
        temperature = out.get("temperature", torch.tensor(float("nan")))
        stats = torch.cat(
            [
                part_sums / tc.grad_accum,
                grad_norm.detach().float().reshape(1).to(part_sums.device),
                torch.as_tensor(temperature).detach().float().reshape(1).to(part_sums.device),
            ]
        )
        stats = distributed.all_reduce_mean(stats).tolist()
        values = dict(zip(part_names + ["grad_norm"], stats[:-1]))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            kept = (
                f"last good checkpoint kept at {last_dir} (step {last_good_step})"
                if last_good_step is not None
                else "no checkpoint was written yet"
            )
            raise TrainingDivergedError(
                f"non-finite training value at step {step + 1}: "
                + ", ".join(f"{k}={values[k]}" for k in bad)
                + f"; stopped before the update, {kept}"
            )

        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(stats)
        step_times.append(time.perf_counter() - step_start)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k.endswith("loss")})

        # ---- log, validate, checkpoint (rank 0 writes; others wait at barriers)
        do_log = step % tc.log_every == 0 or step == tc.steps
        do_eval = tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps)
        do_save = (tc.save_every > 0 and step % tc.save_every == 0) or step == tc.steps
        record: dict[str, Any] = {}
        if do_log:
            mean = np.mean(np.asarray(window), axis=0).tolist()
            record = {"step": step, **dict(zip(part_names + ["grad_norm"], mean[:-1]))}
            record["temperature"] = stats[-1]
            record["lr"] = scheduler.get_last_lr()[0]
            record["step_s"] = float(np.mean(step_times))
            window, step_times = [], []
        if do_eval:
            if dist.is_main:
                with _autocast(device, tc.bf16), torch.random.fork_rng(devices=[]):
                    metrics = validate(model, data, val_rows, cfg)
                record.setdefault("step", step)
                record.update({f"val/{k}": v for k, v in metrics.items()})
                if metrics["hr@10"] > best["hr@10"]:
                    best = {"hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"], "step": step}
                    save(best_dir)
                bar.write(
                    f"step {step}: val hr@10 {metrics['hr@10']:.4f} "
                    f"ndcg@10 {metrics['ndcg@10']:.4f} (best {best['hr@10']:.4f} @ {best['step']})"
                )
            distributed.barrier()
        if monitor is not None:
            with _autocast(device, tc.bf16):
                probed = monitor(model, step)
            if probed:
                record.setdefault("step", step)
                record.update(probed)
        if record and dist.is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            last_log = record
        if do_save:
            if dist.is_main:
                save(last_dir)
            distributed.barrier()
            last_good_step = step
    bar.close()

    wall_s = prior_wall_s + time.time() - t0
    if dist.is_main:
        if writer is not None:
            writer.close()
        summary = {
            "steps": step,
            "wall_time_s": round(wall_s, 3),
            "world_size": dist.world_size,
            "examples_seen": step * tc.batch_size,
            "best_val": best if best["step"] >= 0 else None,
            "final_losses": {k: v for k, v in last_log.items() if k.endswith("loss")},
            "preset": cfg.loss.preset,
            "run_dir": str(run_dir),
        }
        _write_json(run_dir / "train_summary.json", summary)
        print(f"done: {step} steps in {wall_s:.1f}s; run written to {run_dir}")
    return run_dir


def _extra(best: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {"best": dict(best), "wall_s": float(wall_s)}


__all__ = [
    "TrainingDivergedError",
    "batch_indices",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "train",
    "validate",
]
