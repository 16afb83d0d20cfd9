"""What do the KARMA regularizers cost per training step? action_only vs gen vs rec vs karma.

    .venv/bin/python benchmarks/step_cost.py                     # tiny-random + smollm2-135m
    .venv/bin/python benchmarks/step_cost.py --backbones tiny-random --repeats 20
    .venv/bin/python benchmarks/step_cost.py --out benchmarks/results/step_cost_cpu.md
    .venv/bin/python benchmarks/step_cost.py --set model.lora=true --out /tmp/step_cost_lora.md

For each backbone and preset, one training step as `karma.train` runs it on CPU: the loop's own
`karma.train.train_step` (forward of the KarmaObjective, backward, gradient clipping, the
non-finite check, AdamW step, zero_grad), without a schedule. Every
preset sees the SAME examples (a fixed seeded sample of ML-100K train rows, the debug dataset of
configs/debug.yaml), the same batch size and the same model config; batches are built before the
clock starts (batch building is reported separately). Each figure is the median over the timed
steps after `--warmup` untimed ones, with min-max: `--repeats` steps for the tiny model,
`--backbone-repeats` for real backbones (a SmolLM2-135M step takes tens of seconds on a CPU).
Both wall time and the process's CPU time are recorded: with one intra-op thread (the default
here) CPU time is the work done and is far less disturbed than wall time when other jobs share
the machine, so the ratio is computed from CPU time; wall time is shown beside it. The load
average is printed with the results.

Target (the design's claim "train-heavy, infer-light" kept affordable): karma <= 1.5x action_only.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from karma.batching import BatchBuilder
from karma.config import Config, load_config
from karma.data import load_prepared, prepare_dataset
from karma.model import build_model
from karma.objective import KarmaObjective
from karma.optim import build_optimizer
from karma.report import cpu_name
from karma.train import train_step

PRESETS = ("action_only", "gen", "rec", "karma")
ROOT = Path(__file__).resolve().parent.parent


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def make_config(backbone: str, preset: str, args: argparse.Namespace) -> Config:
    overrides = [
        f"model.backbone={backbone}",
        f"loss.preset={preset}",
        f"train.batch_size={args.batch_size}",
        f"train.num_threads={args.threads}",
        *args.set,
    ]
    return load_config(ROOT / "configs" / "debug.yaml", overrides)


def measure(backbone: str, preset: str, rows: list[np.ndarray], args: argparse.Namespace) -> dict:
    """Median wall / CPU seconds of one optimizer step of `preset` over the batches `rows`."""
    cfg = make_config(backbone, preset, args)
    data = load_prepared(cfg.data.prepared_dir)
    train_split = data.split("train")
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = KarmaObjective(model, cfg.loss)
    objective.train()
    optimizer = build_optimizer(objective, cfg)
    builder = BatchBuilder(model.tokenizer, data.items, cfg, seed=0)
    t0 = time.perf_counter()
    batches = [builder(train_split, idx) for idx in rows]
    build_s = (time.perf_counter() - t0) / len(batches)
    params = [p for p in objective.parameters() if p.requires_grad]
    if cfg.model.history_source == "cache":
        # The step reads the cache, never refreshes it; its values do not change the cost, so a
        # zero cache stands in for the (minutes-long on CPU) catalog pass of a real backbone.
        model.history_cache = torch.zeros(data.items.n_items, model.hidden_size)

    walls, cpus = [], []
    repeats = args.repeats if backbone == "tiny-random" else args.backbone_repeats
    for i in range(args.warmup + repeats):
        batch = batches[i % len(batches)]
        w0, c0 = time.perf_counter(), time.process_time()
        train_step(objective, optimizer, None, lambda micro, b=batch: b,
                   clip_norm=cfg.train.clip_norm)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if i >= args.warmup:
            walls.append(wall)
            cpus.append(cpu)
    tokens = sum(
        int(batches[0][k].numel())
        for k in ("item_input_ids", "user_input_ids", "rec_input_ids")
        if k in batches[0]
    )
    result = {
        "backbone": backbone,
        "preset": preset,
        "wall_s": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_s": statistics.median(cpus),
        "cpu_min": min(cpus),
        "cpu_max": max(cpus),
        "build_s": build_s,
        "tokens": tokens,
        "trainable": sum(p.numel() for p in params),
    }
    del model, objective, optimizer, batches
    gc.collect()
    return result


def backbone_available(name: str) -> str | None:
    """None when the backbone can be loaded here, else the reason it cannot."""
    if name == "tiny-random":
        return None
    try:
        from karma.backbones import ensure_backbone

        ensure_backbone(name)
    except Exception as exc:  # a missing wheel or a failed conversion: skip with the reason
        return f"{type(exc).__name__}: {exc}"
    return None


def format_table(results: list[dict]) -> list[str]:
    lines = [
        "| backbone | preset | step CPU s (median, min-max) | step wall s (median, min-max) "
        "| x action_only (CPU) | x action_only (wall) | tokens / step | batch build s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {r["backbone"]: r for r in results if r["preset"] == "action_only"}
    for r in results:
        b = base.get(r["backbone"])
        ratio_cpu = f"{r['cpu_s'] / b['cpu_s']:.2f}" if b else "n/a"
        ratio_wall = f"{r['wall_s'] / b['wall_s']:.2f}" if b else "n/a"
        lines.append(
            f"| {r['backbone']} | {r['preset']} "
            f"| {r['cpu_s']:.4f} ({r['cpu_min']:.4f}-{r['cpu_max']:.4f}) "
            f"| {r['wall_s']:.4f} ({r['wall_min']:.4f}-{r['wall_max']:.4f}) "
            f"| {ratio_cpu} | {ratio_wall} | {r['tokens']:,} | {r['build_s']:.4f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny-random", "smollm2-135m"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps, tiny-random")
    parser.add_argument("--backbone-repeats", type=int, default=2, help="timed steps, others")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides a.b=c")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = make_config(args.backbones[0], "karma", args)
    if not (Path(cfg.data.prepared_dir) / "stats.json").exists():
        prepare_dataset(cfg)
    n_train = len(load_prepared(cfg.data.prepared_dir).split("train"))
    rng = np.random.default_rng(0)
    n_batches = min(args.warmup + max(args.repeats, args.backbone_repeats), 8)
    rows = [rng.choice(n_train, args.batch_size, replace=False) for _ in range(n_batches)]

    start_load, started = load_avg(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    t_start = time.perf_counter()
    results, skipped = [], []
    for backbone in args.backbones:
        reason = backbone_available(backbone)
        if reason is not None:
            skipped.append(f"- {backbone}: skipped, not available here ({reason})")
            print(skipped[-1])
            continue
        for preset in args.presets:
            r = measure(backbone, preset, rows, args)
            results.append(r)
            print(
                f"{backbone:>14} {preset:>12}: cpu {r['cpu_s']:.4f}s  wall {r['wall_s']:.4f}s  "
                f"({r['tokens']} tokens, {r['trainable']:,} trainable params)",
                flush=True,
            )
    table = format_table(results)
    print("\n".join(table))

    cfg = make_config(args.backbones[0], "karma", args)
    lines = [
        "# Training step cost per loss preset (benchmarks/step_cost.py)",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s), OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        f"- date (UTC): {started}; load average at start: {start_load}; at end: {load_avg()}; "
        f"benchmark wall time {time.perf_counter() - t_start:.0f} s",
        f"- command: `.venv/bin/python benchmarks/step_cost.py {' '.join(sys.argv[1:])}`",
        f"- step = forward + backward + clip + AdamW + zero_grad, batch {args.batch_size}, "
        f"{args.warmup} warm-up + {args.repeats} (tiny-random) / {args.backbone_repeats} (other "
        f"backbones) timed steps per preset, same examples for every "
        f"preset (ML-100K train rows, `{cfg.data.prepared_dir}`, max_history "
        f"{cfg.data.max_history}, history_source={cfg.model.history_source}, "
        f"interface={cfg.model.interface}, lora={cfg.model.lora}, "
        f"freeze_layers={cfg.model.freeze_layers}); extra overrides: {args.set or 'none'}",
        "- tokens / step: item tower + user prompts (+ target text for gen) + reconstruction "
        "pass, padded",
        "",
        *table,
        "",
        *skipped,
    ]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines).rstrip() + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
