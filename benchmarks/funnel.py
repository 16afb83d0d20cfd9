"""The paper's three-stage table: action_only vs karma checkpoints, `karma funnel` over both.

    PYTHONPATH=. python benchmarks/funnel.py --steps 100            # trains both (ML-100K), funnel
    PYTHONPATH=. python benchmarks/funnel.py --steps 100 --max-users 300 --train-window 5
    PYTHONPATH=. python benchmarks/funnel.py --checkpoints runs/demo --max-users 300   # make demo's
    # ML-1M: the demo-budget checkpoints of benchmarks/personalization.py (rows demo/ml-1m/*)
    PYTHONPATH=. python benchmarks/funnel.py --checkpoints runs/personalization/demo/ml-1m \\
        --max-users 1000 --results benchmarks/results/funnel_ml1m_cpu
    # the shop: one (action_only, karma) pair per training seed of benchmarks/shop_experiment.py
    PYTHONPATH=. python benchmarks/funnel.py --results benchmarks/results/funnel_shop_cpu \\
        --pairs 'runs/shop_search/{preset}/seed{seed}/train/checkpoints/best' --seeds 0 1 2 \\
        --set 'funnel.ks=[1,3,5]'   # pages of 10 items

Without --checkpoints / --pairs it trains both presets on ML-100K with the CPU demo recipe
(karma/demo.py CPU_RECIPE); a finished training run in --runs is reused. With --pairs, the pair of
each training seed is scored with that scorer seed and the pairs are combined
(karma.funnel.combine_runs). Writes --results .md (+ .json + .png) with the machine, the recipe,
the wall times and the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from karma.config import load_config
from karma.demo import CPU_RECIPE
from karma.funnel import combine_runs, format_markdown, plot_funnel, run_funnel
from karma.train import train

PRESETS = ("action_only", "karma")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _train_presets(args: argparse.Namespace, runs: Path, walls: dict) -> list[str]:
    """Train both presets with the CPU demo recipe (unless finished); the recipe's overrides."""
    fixed = ("train.steps", "train.num_threads", "train.save_every", "train.eval_every")
    recipe = [o for o in CPU_RECIPE if not o.startswith(fixed)]
    recipe += [f"train.steps={args.steps}", f"train.num_threads={args.threads}",
               f"train.save_every={args.steps}", "train.eval_every=0",
               f"data.prepared_dir={runs / 'data'}"]
    for preset in PRESETS:
        out = runs / preset
        t = time.time()
        if not (out / "train_summary.json").exists():
            cfg = load_config("configs/ml100k.yaml", [*recipe, f"loss.preset={preset}",
                                                      f"train.output_dir={out}"])
            train(cfg, resume=(out / "checkpoints" / "last").exists())
        walls[f"train {preset}"] = round(time.time() - t, 1)
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100, help="LoRA steps per preset (recipe: 100)")
    ap.add_argument("--threads", type=int, default=2, help="train.num_threads")
    ap.add_argument("--runs", default="runs/funnel_bench")
    ap.add_argument("--checkpoints", default="",
                    help="DIR with action_only/ and karma/ runs of the same recipe to reuse, e.g. "
                    "runs/personalization/prompt/genre (benchmarks/personalization.py)")
    ap.add_argument("--pairs", default="", metavar="TEMPLATE",
                    help="checkpoint path with {preset} and {seed}: one pair per --seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-users", type=int, default=0)
    ap.add_argument("--train-window", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides for the funnel, e.g. 'funnel.ks=[1,5,10]'")
    ap.add_argument("--results", default="benchmarks/results/funnel_ml100k_cpu")
    args = ap.parse_args()
    runs = Path(args.runs)
    walls: dict = {}
    overrides = [f"funnel.max_users={args.max_users}", f"funnel.train_window={args.train_window}",
                 f"train.num_threads={args.threads}", "train.device=cpu", *args.set]
    torch.set_num_threads(args.threads)
    if args.pairs:
        pairs = {s: [args.pairs.format(preset=p, seed=s) for p in PRESETS] for s in args.seeds}
        parts = []
        for seed, (a, b) in pairs.items():
            t = time.time()
            parts.append(run_funnel(a, compare=b, out_dir=runs / f"funnel-seed{seed}",
                                    overrides=[*overrides, f"funnel.seeds=[{seed}]"]))
            walls[f"funnel seed {seed}"] = round(time.time() - t, 1)
        results = combine_runs(parts)
        recipe = [f"see {Path(c) / 'config.yaml'}" for c in pairs[args.seeds[0]]]
        trained = f"{len(pairs)} checkpoint pairs (recipe in their config.yaml)"
    else:
        source = Path(args.checkpoints) if args.checkpoints else runs
        if args.checkpoints:  # their recipe is the one they were trained with, not CPU_RECIPE
            recipe = [f"see {source / p / 'config.yaml'}" for p in PRESETS]
            trained = f"checkpoints from {source} (recipe in their config.yaml)"
        else:
            recipe = _train_presets(args, runs, walls)
            trained = (f"Recipe: karma/demo.py CPU_RECIPE with train.steps={args.steps} "
                       f"(SmolLM2-135M, LoRA); checkpoints from {source}")
        t = time.time()
        results = run_funnel(source / "action_only" / "checkpoints" / "last",
                             compare=source / "karma" / "checkpoints" / "last",
                             out_dir=runs / "funnel", overrides=overrides)
        walls["funnel"] = round(time.time() - t, 1)
    dest = Path(args.results)
    dest.parent.mkdir(parents=True, exist_ok=True)
    plot_funnel(results, dest.with_suffix(".png"))
    results["benchmark"] = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads (CPU)",
                            "recipe": recipe, "wall_s": walls, "command": vars(args)}
    dest.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = format_markdown(results).replace("(funnel.png)", f"({dest.with_suffix('.png').name})")
    head = (f"Machine: {results['benchmark']['machine']}. {trained[0].upper()}{trained[1:]}. "
            "Wall seconds: "
            + ", ".join(f"{k} {v}" for k, v in walls.items()) + ".\n\n")
    dest.with_suffix(".md").write_text(md.replace("\n\n", "\n\n" + head, 1))
    print(f"results in {dest}.md")


if __name__ == "__main__":
    main()
