"""The main job (`make demo`, `karma demo`): does KARMA's Knowledge regularization help on ML-100K?

    karma demo                                  # CPU recipe, or the full recipe on a CUDA GPU
    karma demo --out runs/demo2 train.steps=50  # any config override applies on top of the recipe
    karma demo --out runs/demo-noquery data.query_mode=none    # the next-item (no-query) setting

Stages: (1) convert the pretrained backbone (SmolLM2-135M) once, (2) prepare ML-100K in the
configured query setting (default: the search setting, genre queries), (3) popularity baseline,
(4) train `action_only` and (5) `karma` with the same seed, steps and examples, (6) full-catalog
evaluation of both, (7) `report.md` with the protocol, the table, wall times and training curves
(PNG). The recipe (steps, batch, history,
what is trained) is chosen by the device; docs/decisions.md gives the measurements behind it.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from karma.config import Config, load_config


def with_overrides(recipe: list[str], *changes: str) -> list[str]:
    """`recipe` (a list of `key=value` overrides) with every key of `changes` replaced: the
    entries it had for those keys are dropped and `changes` appended in order."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in recipe if o.split("=", 1)[0] not in keys] + list(changes)


# The prompt recipe, the CPU demo's until issue 10 and still the base of benchmarks/funnel.py and
# shop_experiment.py (docs/decisions.md, "CPU demo recipe"): LoRA, a short history, few steps.
# Its search models do not read the history (docs/decisions.md, "Personalization").
CPU_RECIPE = [
    "model.backbone=smollm2-135m",
    "model.lora=true",
    "model.history_source=cache",
    "model.cache_refresh_steps=50",
    "data.max_history=10",
    "data.query_mode=genre",
    "train.steps=100",
    "train.batch_size=16",
    "train.lr=5e-4",
    "train.head_lr=2e-3",
    "train.warmup_steps=10",
    "train.eval_every=100",
    "train.save_every=50",
    "train.eval_users=200",
    "train.log_every=5",
    "train.device=cpu",
    "train.num_threads=2",
]
# Without a query (data.query_mode=none) the demo trains the dense sequence objective instead
# (docs/decisions.md, "Personalization"): every history position is a next-item readout scored
# against the whole catalog, the lower 26 layers are frozen and run once per user sequence, LoRA
# trains the top 4, item states are standardized and items carry a learnable ID embedding. With
# the prompt recipe above the no-query demo learned nothing (HR@10 0.007, popularity 0.084).
SEQUENCE_CPU_RECIPE = [
    "model.backbone=smollm2-135m",
    "model.lora=true",
    "model.history_source=cache",
    "model.train_item_tower=false",
    "model.freeze_layers=26",
    "model.readout=history",
    "model.item_norm=standardize",
    "model.item_ids=true",
    "model.id_dropout=0.1",
    # with images (karma_mm): the image token's projection would be frozen at its random start
    # with the cached tower; the late maps train (shop colour probe: benchmarks/results/
    # shop_experiment_search_cpu.md)
    "model.image_fusion=late",
    "data.query_mode=none",
    "data.max_history=50",
    "train.objective=sequence",
    "train.sequence_max_len=50",
    "loss.rec_users=4",
    "train.steps=400",
    "train.batch_size=16",
    "train.lr=5e-4",
    "train.head_lr=2e-3",
    "train.warmup_steps=10",
    "train.eval_every=400",
    "train.save_every=100",
    "train.eval_users=200",
    "train.log_every=5",
    "train.device=cpu",
    "train.num_threads=2",
]
# With a query (the search setting, the demo's default) the same recipe also trains four search
# examples per user and step, `History: x_1..x_c Query: q <EMB>` (karma/sequence.py), so one
# checkpoint serves search and recommendation. Four instead of one lift search HR@10 from 0.31
# to 0.39 (action_only; karma 0.27 to 0.38) at the same wall time, since the readouts share the
# cached lower layers (row search-k4, benchmarks/results/personalization_cpu.md). History 20
# and 150 steps hold `make demo` (two trainings, two evaluations of 943 users with their own and
# another user's history, set-up included) under 20 minutes on 2 cores even when the machine
# runs slow (benchmarks/results/demo_cpu.md). With the prompt recipe above the search models
# ignored the history (another user's history: +0%).
SEARCH_CPU_RECIPE = with_overrides(
    SEQUENCE_CPU_RECIPE,
    "data.query_mode=genre",
    "model.prompt_layout=history_first",
    "data.max_history=20",
    "train.sequence_max_len=20",
    "train.steps=150",
    "train.eval_every=150",
    "train.search_examples=4",
)
# On a CUDA GPU the same command trains the full model on full histories for many more steps.
GPU_RECIPE = [
    "model.backbone=smollm2-135m",
    "model.lora=false",
    "data.max_history=20",
    "data.query_mode=genre",
    "train.steps=3000",
    "train.batch_size=128",
    "train.warmup_steps=100",
    "train.eval_every=500",
    "train.save_every=500",
    "train.log_every=20",
    "train.device=cuda",
]
PRESETS = ("action_only", "karma")
REPORT_METRICS = ("hr@10", "hr@50", "hr@200", "ndcg@10", "mrr@10")


def _stage(n: int, total: int, name: str) -> float:
    print(f"\n=== [{n}/{total}] {name}", flush=True)
    return time.time()


def demo_config(config_path: str | None, overrides: list[str], cuda: bool) -> Config:
    """The recipe for this device and query setting, then the user's config file, then the
    user's overrides. On the CPU the sequence objective: SEARCH_CPU_RECIPE with a query,
    SEQUENCE_CPU_RECIPE without (data.query_mode=none, also on a GPU)."""
    recipe = GPU_RECIPE if cuda else SEARCH_CPU_RECIPE
    cfg = load_config(config_path, list(overrides), base=load_config(None, recipe))
    if cfg.data.query_mode == "none":
        recipe = SEQUENCE_CPU_RECIPE
        if cuda:  # the same recipe, more data per step and more steps
            recipe = recipe + ["train.device=cuda", "train.batch_size=64", "train.steps=2000",
                               "train.eval_every=500", "train.save_every=500"]
        cfg = load_config(config_path, list(overrides), base=load_config(None, recipe))
    return cfg


def run_demo(config_path: str | None, overrides: list[str], out_dir: str = "runs/demo") -> Path:
    import torch

    from karma.backbones import ensure_backbone
    from karma.baselines import run_baseline
    from karma.data import prepare_dataset
    from karma.evaluate import evaluate_checkpoint
    from karma.train import train

    out = Path(out_dir)
    cuda = torch.cuda.is_available()
    cfg = demo_config(config_path, overrides, cuda)
    cfg.data.prepared_dir = str(out / "data" / f"ml-100k-{cfg.data.query_mode}")
    total = 7
    walls: dict[str, float] = {}
    t_all = time.time()

    t = _stage(1, total, f"backbone {cfg.model.backbone}")
    if Path(cfg.model.backbone).is_dir() or cfg.model.backbone == "tiny-random":
        print(f"backbone {cfg.model.backbone} needs no conversion")
    else:
        print(f"converted backbone at {ensure_backbone(cfg.model.backbone)}")
    walls["backbone"] = time.time() - t

    t = _stage(2, total, f"data: ML-100K, query setting '{cfg.data.query_mode}'")
    prepare_dataset(cfg)
    walls["data"] = time.time() - t

    t = _stage(3, total, "popularity baseline")
    results = {"popularity": run_baseline("popularity", cfg, out_dir=str(out / "popularity"))}
    walls["popularity"] = time.time() - t

    runs = {}
    for i, preset in enumerate(PRESETS):
        t = _stage(4 + i, total, f"train {preset} ({cfg.train.steps} steps, batch "
                   f"{cfg.train.batch_size}, {'GPU' if cuda else 'CPU'} recipe)")
        run_cfg = copy.deepcopy(cfg)
        run_cfg.loss.preset = preset
        run_cfg.train.output_dir = str(out / preset)
        # a finished run is reused, an interrupted one resumes from checkpoints/last
        done = (out / preset / "train_summary.json").exists()
        runs[preset] = out / preset if done else train(
            run_cfg, resume=(out / preset / "checkpoints" / "last").exists())
        walls[f"train {preset}"] = time.time() - t

    t = _stage(6, total, "full-catalog evaluation")
    for preset, run_dir in runs.items():
        results[preset] = evaluate_checkpoint(run_dir / "checkpoints" / "best",
                                              out_dir=out / preset / "eval")
    walls["evaluation"] = time.time() - t

    t = _stage(7, total, "report")
    walls["total"] = time.time() - t_all
    report = write_report(out, cfg, results, runs, walls)
    print(report.read_text())
    return out


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """Training loss parts and validation HR@10 per step, one line per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("loss", "act_loss", "gen_loss", "rec_loss")
    fig, axes = plt.subplots(1, len(parts) + 1, figsize=(4 * (len(parts) + 1), 3.2))
    for preset, run_dir in runs.items():
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
                if line.strip()]
        for ax, part in zip(axes, parts):
            pts = [(r["step"], r[part]) for r in rows if part in r]
            if any(v for _, v in pts):  # a preset without this part logs zeros: leave it out
                ax.plot(*zip(*pts), label=preset)
            ax.set_title(part)
        val = [(r["step"], r["val/hr@10"]) for r in rows if "val/hr@10" in r]
        if val:
            axes[-1].plot(*zip(*val), marker="o", label=preset)
        axes[-1].set_title("validation HR@10")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def personalization_lines(results: dict[str, dict[str, Any]], cold_threshold: int) -> list[str]:
    """Does the model read the history? HR@10 with each user's own history and with another
    user's (a seeded permutation of the histories, queries kept), and on cold targets."""
    lines = ["## Personalization", "",
             "HR@10 (test, masked) with each user's own history and with another user's history "
             "(seeded permutation of the histories, queries kept): a model that reads the history "
             f"loses when the history is not the user's. Cold: test users whose target was a "
             f"training target fewer than {cold_threshold} times.", "",
             "| model | own history | other history | change | cold HR@10 (users) |",
             "| --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        m = res["metrics"]
        own = m["masked"]["hr@10"]
        other = (m.get("other history") or {}).get("hr@10")
        cold = (m.get("cold") or {}).get("hr@10")
        n_cold = res["protocol"].get("cold_users", "")
        change = f"{100 * (other / own - 1):+.0f}%" if other is not None and own else ""
        lines.append(f"| {name} | {own:.4f} | {'' if other is None else f'{other:.4f}'} | "
                     f"{change} | {'' if cold is None else f'{cold:.4f}'} ({n_cold}) |")
    return lines + [""]


def write_report(out: Path, cfg: Config, results: dict[str, dict[str, Any]], runs: dict[str, Path],
                 walls: dict[str, float]) -> Path:
    from karma.evaluate import format_metrics_table
    from karma.report import device_name

    plot_curves(runs, out / "training_curves.png")
    primary = "masked" if cfg.eval.mask_history else "unmasked"
    columns = {name: {k: v for k, v in res["metrics"][primary].items() if k in REPORT_METRICS}
               for name, res in results.items()}
    protocol = dict(results[PRESETS[-1]]["protocol"])
    for key in ("checkpoint", "loss_preset", "prepared_dir"):
        protocol.pop(key, None)
    lines = ["# karma demo: action_only vs karma on ML-100K", ""]
    lines.append(f"Machine: {device_name()}. Backbone: {cfg.model.backbone} "
                 f"({'LoRA' if cfg.model.lora else 'full fine-tuning'}, "
                 f"interface {cfg.model.interface}, history {cfg.data.max_history}, "
                 f"{cfg.model.history_source} history vectors). Training: objective "
                 f"{cfg.train.objective}, {cfg.train.steps} steps "
                 f"x batch {cfg.train.batch_size}, seed {cfg.train.seed}, query setting "
                 f"'{cfg.data.query_mode}'.")
    lines += ["", "```", format_metrics_table(columns, protocol), "```", ""]
    lines += personalization_lines(results, cfg.eval.cold_threshold)
    lines += ["## Wall time", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {sec:.0f} |" for name, sec in walls.items()]
    lines += ["", "| training run | steps | examples seen | training wall s | best val HR@10 |",
              "| --- | --- | --- | --- | --- |"]
    for preset, run_dir in runs.items():
        summary = json.loads((run_dir / "train_summary.json").read_text())
        best = (summary.get("best_val") or {}).get("hr@10", float("nan"))
        lines.append(f"| {preset} | {summary['steps']} | {summary['examples_seen']} | "
                     f"{summary['wall_time_s']:.0f} | {best:.4f} |")
    lines += ["", "![training curves](training_curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
