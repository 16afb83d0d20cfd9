"""Where does a training step of the search recipe go? (issue 10: what would buy more steps)

    PYTHONPATH=. .venv/bin/python benchmarks/search_step_cost.py --out benchmarks/results/X.md
    PYTHONPATH=. .venv/bin/python benchmarks/search_step_cost.py --set train.search_examples=1

For each variant, the demo's genre recipe (`karma.demo.SEARCH_CPU_RECIPE`, loss.preset=action_only,
ML-100K, seed 0) is set up as `karma train` sets it up (the frozen lower layers cached per user)
and timed over `--steps` steps after one untimed: building the batch, of which the search examples
(`UserSequences._query_examples`: the frozen lower layers run over each example's query tokens
against the cached history key/values), then the forward and the backward of the objective. The
search examples are timed a second time on their own, on the same users and cut draws. Medians
of wall seconds on `--threads` intra-op threads; the load average is printed with the results.
Data is prepared on first use (`runs/data/ml-100k-genre-h<history>`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from karma.config import load_config
from karma.data import load_prepared, prepare_dataset
from karma.demo import SEARCH_CPU_RECIPE
from karma.report import cpu_name
from karma.train import _setup_objective

VARIANTS = {
    "demo (history 20, 4 search examples)": [],
    "1 search example": ["train.search_examples=1"],
    "history 50": ["data.max_history=50", "train.sequence_max_len=50"],
}


class _Single:
    """The single-process stand-in for karma.distributed's state that _setup_objective reads."""

    device = torch.device("cpu")
    rank = 0
    world_size = 1
    is_main = True


def time_variant(overrides: list[str], steps: int) -> dict[str, float]:
    cfg = load_config("configs/ml100k.yaml",
                      [*SEARCH_CPU_RECIPE, "loss.preset=action_only", *overrides])
    # the prepared split of benchmarks/personalization.py's rows with this history
    cfg.data.prepared_dir = f"runs/data/ml-100k-genre-h{cfg.data.max_history}"
    if not Path(cfg.data.prepared_dir, "stats.json").exists():
        prepare_dataset(cfg)
    data = load_prepared(cfg.data.prepared_dir)
    objective, _, sequences = _setup_objective(cfg, _Single, data)
    model = objective.model
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    rng = np.random.default_rng(0)
    parts: dict[str, list[float]] = {"batch": [], "search examples": [], "forward": [],
                                     "backward": [], "step": []}
    for step in range(steps + 1):
        rows = rng.choice(len(sequences.items), cfg.train.batch_size, replace=False)
        t0 = time.perf_counter()
        batch = sequences.batch(model, rows, generator=torch.Generator().manual_seed(step))
        t1 = time.perf_counter()
        out = objective(batch)
        t2 = time.perf_counter()
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        t3 = time.perf_counter()
        sequences._query_examples(model, list(rows), torch.Generator().manual_seed(step))
        t4 = time.perf_counter()
        if step == 0:  # untimed warm-up
            continue
        for name, value in (("batch", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2),
                            ("step", t3 - t0), ("search examples", t4 - t3)):
            parts[name].append(value)
    return {name: statistics.median(values) for name, values in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=None,
                        help="time only this variant (config overrides) instead of VARIANTS")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"custom": args.set} if args.set is not None else VARIANTS
    lines = [
        "# Search recipe: where a training step goes",
        "",
        f"CPU: {cpu_name()}, {args.threads} threads; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end; median wall seconds of "
        f"{args.steps} steps after one untimed (`benchmarks/search_step_cost.py`). 'search "
        "examples' (the frozen lower layers over the query tokens) is part of 'batch'.",
        "",
        "| variant | step | batch | search examples | forward | backward + AdamW |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, overrides in variants.items():
        t = time_variant(overrides, args.steps)
        lines.append(f"| {name} | {t['step']:.2f} | {t['batch']:.2f} | "
                     f"{t['search examples']:.2f} | {t['forward']:.2f} | {t['backward']:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
