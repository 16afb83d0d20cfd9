"""Experiment grids: methods x seeds on one split, summarized as report.md + a PNG bar chart.

    karma experiment --config configs/ml100k.yaml methods=[popularity,sasrec] seeds=[0,1,2] \
        --out runs/experiments/baselines
    report = run_experiment(cfg, ["popularity", "karma"], [0, 1, 2], "runs/experiments/x")

A method is a baseline (`karma.baselines.BASELINES`: popularity, sasrec, frozen, minilm) or a
KARMA loss preset (action_only, gen, rec, karma, karma_mm), which is trained with `karma.train.
train` (loss.preset, train.seed) and scored by `karma.evaluate.evaluate_checkpoint` on
checkpoints/best. Each run writes `<out>/<method>/seed<k>/` (config.yaml, metrics.json, and the
method's own files); a run whose directory already holds metrics.json for the identical resolved
config is reused, so an interrupted grid resumes. The summary is mean +- sample std (ddof=1) over
seeds, for every metric, with the protocol and the published anchors of DESIGN.md section 4.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from karma.atomic import ensure_output_dir
from karma.baselines import BASELINES, run_baseline
from karma.config import Config, config_to_dict, save_config
from karma.data import read_stats
from karma.errors import KarmaError

KARMA_PRESETS = ("action_only", "gen", "rec", "karma", "karma_mm")
DEFAULT_METHODS = ("popularity", "sasrec", "frozen", "action_only", "karma")
DEFAULT_SEEDS = (0, 1, 2)
# Columns of the summary tables, in order; other metrics are kept in results.json.
TABLE_METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@10", "mrr@10", "hr@50", "ndcg@50", "hr@200")
CHART_METRICS = ("hr@10", "ndcg@10")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (results name the machine that produced them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def shared_cpu_run(threads: int) -> tuple[str, str]:
    """(environment prefix of the command, machine sentence) for a CPU benchmark's results file:
    the thread settings that shape the figures and the load of other jobs at the end."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    env = f"OMP_NUM_THREADS={threads}" + (f" OMP_WAIT_POLICY={policy}" if policy else "")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, shared with other jobs (load average "
               f"{load} at the end), torch {torch.__version__}, {threads} intra-op threads")
    return env, machine


def device_name() -> str:
    """The GPU when CUDA is used, else the CPU model and core count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU)"
    return f"{cpu_name()}, {os.cpu_count()} cores (CPU)"
# ML-100K, leave-one-out, full ranking, seen items masked (LlamaRec paper, Yue et al. 2023).
PUBLISHED_ANCHORS = {
    "SASRec": {"hr@10": 0.0993, "ndcg@10": 0.0522},
    "LRURec": {"hr@10": 0.1426, "ndcg@10": 0.0705},
    "LlamaRec": {"hr@10": 0.1524, "ndcg@10": 0.0759},
}
DEFAULT_PROTOCOL = (
    "chronological leave-one-out per user (last = test, second last = valid, ties keep row "
    "order); full-catalog ranking; pessimistic tie breaks"
)


def parse_list(value: Any, name: str, cast: type = str) -> list:
    """A list from a Python list or a CLI string "[a,b]" / "a,b" (YAML syntax)."""
    if isinstance(value, str):
        text = value.strip()
        parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        value = parsed if isinstance(parsed, list) else [parsed]
    if not isinstance(value, (list, tuple)) or not value:
        raise KarmaError(f"experiment {name}: expected a non-empty list, got {value!r}")
    try:
        return [cast(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise KarmaError(f"experiment {name}: {value!r} is not a list of {cast.__name__}") from exc


def _run_karma(cfg: Config, run_dir: Path) -> dict:
    from karma.evaluate import evaluate_checkpoint
    from karma.train import train

    cfg.train.output_dir = str(run_dir)
    run_dir = Path(train(cfg) or run_dir)
    evaluate_checkpoint(run_dir / "checkpoints" / "best", overrides=[], out_dir=run_dir)
    return json.loads((run_dir / "metrics.json").read_text())


def _finished(run_dir: Path, cfg: Config) -> dict | None:
    """The metrics of a finished run of the same resolved config, else None."""
    metrics, saved = run_dir / "metrics.json", run_dir / "config.yaml"
    if not (metrics.is_file() and saved.is_file()):
        return None
    if yaml.safe_load(saved.read_text()) != config_to_dict(cfg):
        return None
    return json.loads(metrics.read_text())


def run_one(method: str, seed: int, cfg: Config, run_dir: Path) -> dict:
    """One (method, seed) run in `run_dir`; returns its evaluation result (metrics.json) with
    the run's wall time added as "wall_seconds" (kept in run.json)."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = seed
    if method in KARMA_PRESETS:
        cfg.loss.preset = method
        cfg.train.output_dir = str(run_dir)
    done = _finished(run_dir, cfg)
    if done is not None:
        print(f"[experiment] {method} seed {seed}: reusing {run_dir / 'metrics.json'}")
        info = run_dir / "run.json"
        wall = json.loads(info.read_text()).get("wall_seconds") if info.is_file() else None
        return {**done, "wall_seconds": wall}
    print(f"[experiment] {method} seed {seed} -> {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # A stale metrics.json must not survive a run that then fails half-way.
    (run_dir / "metrics.json").unlink(missing_ok=True)
    start = time.perf_counter()
    if method in KARMA_PRESETS:
        results = _run_karma(cfg, run_dir)
    else:
        results = run_baseline(method, cfg, out_dir=run_dir)
    wall = round(time.perf_counter() - start, 1)
    (run_dir / "run.json").write_text(
        json.dumps({"method": method, "seed": seed, "wall_seconds": wall})
    )
    save_config(cfg, run_dir / "config.yaml")  # written last: marks the run finished
    return {**results, "wall_seconds": wall}


def numeric_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """Flatten the metrics of an evaluation result ({"protocol", "metrics": {"masked": {...},
    "unmasked": {...}}}) to {"masked/hr@10": float, ...}; a plain metrics dict works too."""
    if prefix == "" and isinstance(results.get("metrics"), dict):
        results = results["metrics"]
    out: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out.update(numeric_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "@" in key:
            out[f"{prefix}{key}"] = float(value)
    return out


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> metric -> (mean, sample std (ddof=1, 0 for one seed), number of seeds)."""
    summary: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method, by_seed in runs.items():
        flat = [numeric_metrics(m) for m in by_seed.values()]
        keys = sorted(set().union(*flat)) if flat else []
        summary[method] = {}
        for key in keys:
            values = np.array([f[key] for f in flat if key in f], dtype=np.float64)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[method][key] = (float(values.mean()), std, len(values))
    return summary


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """0.12345, 0.00678 -> "0.1235 ± 0.0068"."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _settings(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Evaluation settings present ("masked/", "unmasked/"; "" for flat metrics), primary first."""
    primary, found = None, []
    for by_seed in runs.values():
        for results in by_seed.values():
            primary = primary or results.get("protocol", {}).get("primary")
            for key in numeric_metrics(results):
                setting = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
                if setting not in found:
                    found.append(setting)
    return sorted(found, key=lambda p: (p != f"{primary}/", p))


def format_summary_table(summary: dict, prefix: str = "", metrics=TABLE_METRICS) -> str:
    """Markdown table: one row per method, mean ± std per metric (keys `prefix + metric`)."""
    cols = [m for m in metrics if any(prefix + m in s for s in summary.values())]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for method, stats in summary.items():
        n = max((v[2] for v in stats.values()), default=0)
        cells = [
            format_mean_std(*stats[prefix + c][:2]) if prefix + c in stats else "n/a" for c in cols
        ]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _protocol(cfg: Config, runs: dict) -> str:
    for by_seed in runs.values():
        for metrics in by_seed.values():
            if isinstance(metrics.get("protocol"), str):
                return metrics["protocol"]
    if (Path(cfg.data.prepared_dir) / "stats.json").is_file():
        return read_stats(cfg.data.prepared_dir)["protocol"]
    return DEFAULT_PROTOCOL


def _evaluation(runs: dict) -> str:
    """The evaluation protocol of the first run (all runs share cfg.eval)."""
    for by_seed in runs.values():
        for results in by_seed.values():
            p = results.get("protocol")
            if isinstance(p, dict):
                return (
                    f"{p.get('ranking', 'full catalog')} ranking of {p.get('catalog_size')} items "
                    f"for {p.get('users')} users of split `{p.get('split')}`; ties: "
                    f"{p.get('tie_break')}; {p.get('masking')}"
                )
    return "unknown (no protocol in metrics.json)"


def plot_summary(summary: dict, path: Path, prefix: str = "") -> Path:
    """Bar chart of CHART_METRICS (mean ± std error bars) with the published anchors hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CHART_METRICS), figsize=(5.5 * len(CHART_METRICS), 4))
    methods = list(summary)
    anchors = list(PUBLISHED_ANCHORS)
    for ax, metric in zip(np.atleast_1d(axes), CHART_METRICS):
        stats = [summary[m].get(prefix + metric, (np.nan, 0.0, 0)) for m in methods]
        x = np.arange(len(methods))
        ours = ax.bar(
            x,
            [s[0] for s in stats],
            yerr=[s[1] for s in stats],
            capsize=4,
            color="C0",
            label="ours (mean ± std over seeds)",
        )
        xa = np.arange(len(methods), len(methods) + len(anchors))
        published = ax.bar(
            xa,
            [PUBLISHED_ANCHORS[a][metric] for a in anchors],
            color="0.8",
            hatch="//",
            edgecolor="0.4",
            label="published (LlamaRec table)",
        )
        for bars in (ours, published):
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.set_xticks(
            np.concatenate([x, xa]),
            methods + [f"{a}\n(published)" for a in anchors],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(f"{metric} ({prefix.rstrip('/') or 'test'})")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.1)  # room for the value labels
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(cfg: Config, runs: dict[str, dict[int, dict]], out_dir: Path) -> Path:
    """Write results.json, report.md and report.png into out_dir; returns report.md's path."""
    summary = summarize(runs)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "runs": {m: {str(s): r for s, r in by.items()} for m, by in runs.items()},
                "summary": {
                    m: {k: {"mean": v[0], "std": v[1], "n": v[2]} for k, v in s.items()}
                    for m, s in summary.items()
                },
            },
            indent=2,
            sort_keys=True,
        )
    )
    settings = _settings(runs)
    primary = settings[0] if settings else ""
    plot_summary(summary, out_dir / "report.png", prefix=primary)
    seeds = sorted({s for by in runs.values() for s in by})
    lines = [
        f"# Experiment: {', '.join(runs)} x seeds {seeds}",
        "",
        f"Data: `{cfg.data.source}` prepared in `{cfg.data.prepared_dir}` "
        f"(query mode `{cfg.data.query_mode}`, history cap {cfg.data.max_history}); "
        f"split `{cfg.eval.split}`; index `{cfg.eval.index}`.",
        "",
        f"Split protocol: {_protocol(cfg, runs)}.",
        "",
        f"Evaluation: {_evaluation(runs)}.",
        "",
        f"Machine: {device_name()}, torch {torch.__version__}.",
        "",
        "Mean ± sample standard deviation (ddof=1) over seeds.",
    ]
    for setting in settings:
        title = {"masked/": "seen items masked", "unmasked/": "nothing masked"}.get(
            setting, setting.rstrip("/") or "metrics"
        )
        lines += ["", f"## Results: {title}", "", format_summary_table(summary, setting)]
    lines += [
        "",
        "## Published anchors",
        "",
        "ML-100K, leave-one-out, full ranking, seen items masked, from the LlamaRec paper's table "
        "(Yue et al. 2023). Those numbers may be inflated by id-ordered tie breaks and use their "
        "own preprocessing; ours break ties pessimistically.",
        "",
        "| method | hr@10 (= R@10) | ndcg@10 |",
        "|---|---|---|",
        *[f"| {a} | {v['hr@10']:.4f} | {v['ndcg@10']:.4f} |" for a, v in PUBLISHED_ANCHORS.items()],
        "",
        "![hr@10 and ndcg@10](report.png)",
        "",
        "## Runs",
        "",
        "| method | seed | hr@10 | ndcg@10 | seconds |",
        "|---|---|---|---|---|",
    ]
    for method, by_seed in runs.items():
        for seed, metrics in by_seed.items():
            flat = numeric_metrics(metrics)
            secs = metrics.get("wall_seconds")
            lines.append(
                f"| {method} | {seed} | {flat.get(primary + 'hr@10', float('nan')):.4f} | "
                f"{flat.get(primary + 'ndcg@10', float('nan')):.4f} | "
                f"{'n/a' if secs is None else f'{secs:.0f}'} |"
            )
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_experiment(
    cfg: Config,
    methods: list[str] | str | None = None,
    seeds: list[int] | str | None = None,
    out_dir: str | Path | None = None,
) -> Path:
    """Run every (method, seed), then write report.md, report.png and results.json.

    methods: baseline names and/or KARMA presets (a list or the CLI string "[a,b]");
    seeds: ints (or "[0,1,2]"). Returns the path of report.md.
    """
    methods = parse_list(methods if methods is not None else list(DEFAULT_METHODS), "methods")
    seeds = parse_list(seeds if seeds is not None else list(DEFAULT_SEEDS), "seeds", int)
    unknown = [m for m in methods if m not in BASELINES and m not in KARMA_PRESETS]
    if unknown:
        raise KarmaError(
            f"experiment methods: unknown {unknown} (known: {', '.join(BASELINES + KARMA_PRESETS)})"
        )
    out_dir = ensure_output_dir(out_dir or "runs/experiment", "--out")
    runs: dict[str, dict[int, dict]] = {}
    for method in methods:
        runs[method] = {}
        for seed in seeds:
            runs[method][seed] = run_one(method, seed, cfg, out_dir / method / f"seed{seed}")
    path = write_report(cfg, runs, out_dir)
    print(f"[experiment] report written to {path}")
    return path
