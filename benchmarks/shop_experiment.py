"""Does KARMA's "M" help where the text is silent? popularity, SASRec, action_only, karma and
karma_mm on the simulated shop, overall, on cold items and on test queries whose target's colour
is missing from its title (issue 11, part 4).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/shop_experiment.py \
        --items 1000 --users 1500 --seeds 0 --steps 100 --out runs/shop_experiment \
        --results benchmarks/results/shop_experiment_cpu

Stages: `karma shop` (Fashion-MNIST pictures, seed 0), `karma data prepare` (frozen
EfficientNet-Lite0 features), then per method and seed the test-split user and item embeddings:
popularity and SASRec from karma.baselines, the LLM presets trained with a CPU demo recipe
(`--recipe prompt`: karma.demo.CPU_RECIPE, SmolLM2-135M, LoRA, cached history; `--recipe search`:
SEARCH_CPU_RECIPE, the dense sequence objective with four search examples per user and step;
`--steps` overrides the recipe's steps) and exported from checkpoints/best with
`karma.evaluate.export_embeddings`, the path of `karma export`. Every method is scored by
`karma.evaluate.evaluate_embeddings` (full catalog, seen items masked, pessimistic ties) on all
test users, on the cold rows (eval.cold_threshold) and on the rows whose target has
`colour_in_title == false` in the shop's truth/items.parquet. The oracle row is the simulator's own
top-200 (oracle.parquet) for the same test clicks, with the same masking. Finished runs are reused
(their embeddings are kept in the run folder), so an interrupted experiment resumes. Writes
<results>.md, .json and .png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from karma.config import load_config  # noqa: E402
from karma.data import load_or_prepare, prepare_dataset  # noqa: E402
from karma.datasets.shop import ShopConfig, generate_shop  # noqa: E402
from karma.demo import CPU_RECIPE, SEARCH_CPU_RECIPE  # noqa: E402
from karma.evaluate import cold_rows, evaluate_embeddings  # noqa: E402
from karma.metrics import metrics_from_ranks, target_ranks  # noqa: E402
from karma.report import shared_cpu_run  # noqa: E402

# karma_mm takes the recipe's image fusion (the search recipe: late, model.image_fusion);
# karma_mm_token is karma_mm with the image token only, the path the paper describes
LLM_METHODS = ("action_only", "karma", "karma_mm", "karma_mm_token")
METHODS = ("popularity", "sasrec", *LLM_METHODS)
DEFAULT_METHODS = ("popularity", "sasrec", "action_only", "karma", "karma_mm")
SLICES = ("all", "cold", "colour missing", "colour in title")
COLUMNS = ("hr@10", "ndcg@10", "hr@50", "hr@200")
RECIPES = {"prompt": CPU_RECIPE, "search": SEARCH_CPU_RECIPE}


def subset(examples, rows: np.ndarray):
    """The examples at `rows` (a karma.data.Examples of the same kind)."""
    fields = {}
    for f in dataclasses.fields(examples):
        value = getattr(examples, f.name)
        fields[f.name] = value[rows] if isinstance(value, np.ndarray) else [value[i] for i in rows]
    return dataclasses.replace(examples, **fields)


def slice_rows(data, examples, in_title: np.ndarray, cold_threshold: int) -> dict[str, np.ndarray]:
    """Test rows per slice; in_title (N,): whether each item's title names its colour."""
    has_colour = in_title[np.asarray(examples.targets, dtype=np.int64)]
    return {
        "all": np.arange(len(examples)),
        "cold": np.flatnonzero(cold_rows(data, examples, cold_threshold)),
        "colour missing": np.flatnonzero(~has_colour),
        "colour in title": np.flatnonzero(has_colour),
    }


def embeddings(method: str, seed: int, cfg, data, examples, run_dir: Path) -> dict:
    """Test-split (user_emb, item_emb) of one (method, seed), cached in run_dir/emb.npz."""
    cache = run_dir / "emb.npz"
    if cache.is_file():
        saved = np.load(cache)
        info = json.loads((run_dir / "run.json").read_text())
        return {"user": saved["user"], "item": saved["item"], **info}
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = seed
    info: dict = {}
    if method == "popularity":
        from karma.baselines.popularity import popularity_counts, popularity_embeddings

        user, item = popularity_embeddings(popularity_counts(data), len(examples))
    elif method == "sasrec":
        from karma.baselines.protocol import split_sequences
        from karma.baselines.sasrec import encode_sasrec, train_sasrec

        model, _ = train_sasrec(data, cfg, log_path=run_dir / "log.jsonl")
        user, item = encode_sasrec(model, split_sequences(data, examples, "test"))
    else:
        from karma.evaluate import export_embeddings
        from karma.train import train

        cfg.loss.preset = "karma_mm" if method == "karma_mm_token" else method
        if method == "karma_mm_token":
            cfg.model.image_fusion = "token"
        info["image_fusion"] = cfg.model.image_fusion if cfg.loss.preset == "karma_mm" else None
        cfg.train.output_dir = str(run_dir / "train")
        resume = (run_dir / "train" / "checkpoints" / "last" / "state.pt").exists()
        train(cfg, resume=resume)
        summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
        info.update(train_wall_s=summary["wall_time_s"], best_val=summary["best_val"],
                    final_losses=summary["final_losses"])  # fmt: skip
        export = export_embeddings(run_dir / "train" / "checkpoints" / "best", run_dir / "export",
                                   fmt="npy", overrides=["eval.split=test"])  # fmt: skip
        user, item = np.load(export / "user_emb.npy"), np.load(export / "item_emb.npy")
    info["wall_s"] = round(time.perf_counter() - start, 1)
    np.savez(cache, user=user, item=item)
    (run_dir / "run.json").write_text(json.dumps(info))
    return {"user": user, "item": item, **info}


def score(user, item, examples, rows: dict[str, np.ndarray], cfg) -> dict[str, dict]:
    """Primary-setting (masked) metrics per slice and the per-user ranks of the whole split."""
    out = {}
    for name, idx in rows.items():
        if len(idx) == 0:
            continue
        res = evaluate_embeddings(user[idx], item, subset(examples, idx), cfg,
                                  print_table=False, show_progress=False)  # fmt: skip
        out[name] = res["metrics"]["masked"]
    return out


def oracle_scores(shop: Path, data, examples, rows: dict[str, np.ndarray], ks) -> dict:
    """The simulator's ideal top-200 at each user's last click, masked like the models (seen
    items removed, the target kept); only users whose oracle timestamp is the test click's."""
    table = pq.read_table(shop / "oracle.parquet").to_pylist()
    index = {i: n for n, i in enumerate(data.items.item_ids)}
    by_user = {r["user_id"]: r for r in table}
    covered = np.zeros(len(examples), dtype=bool)
    top = max(len(r["ranking"]) for r in table)
    ranked = np.full((len(examples), top), -1, dtype=np.int64)
    for n, (user, target, ts) in enumerate(
        zip(examples.user_ids, examples.targets, examples.timestamps)
    ):
        row = by_user.get(user)
        if row is None or int(row["timestamp"]) != int(ts):
            continue
        covered[n] = True
        seen = {int(i) for i in examples.seen[n]} - {int(target)}
        kept = [index[i] for i in row["ranking"] if i in index and index[i] not in seen]
        ranked[n, : len(kept)] = kept
    ranks = target_ranks(ranked, np.asarray(examples.targets))
    out = {}
    for name, idx in rows.items():
        idx = idx[covered[idx]]
        if len(idx):
            out[name] = {**metrics_from_ranks(ranks[idx], ks), "users": int(len(idx))}
    return out


def item_truth(data, shop: Path) -> tuple[np.ndarray, np.ndarray]:
    """(colour (N,) str, colour_in_title (N,) bool) of the catalog's items, in item_idx order."""
    truth = pq.read_table(shop / "truth" / "items.parquet",
                          columns=["item_id", "colour", "colour_in_title"]).to_pydict()  # fmt: skip
    row = {i: n for n, i in enumerate(truth["item_id"])}
    rows = [row[i] for i in data.items.item_ids]
    return (np.array([truth["colour"][r] for r in rows]),
            np.array([truth["colour_in_title"][r] for r in rows]))  # fmt: skip


def colour_probe(features: np.ndarray, colour: np.ndarray, in_title: np.ndarray) -> dict:
    """How much of each item's colour a linear read of `features` (N, D) recovers: out-of-fold
    predictions (5 stratified folds, seed 0) of a multinomial logistic regression on the
    standardized features; accuracy on the items whose title names the colour and on those whose
    title leaves it out (only the picture shows it there)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    hit = cross_val_predict(probe, features, colour, cv=folds) == colour
    return {"colour missing": float(hit[~in_title].mean()),
            "colour in title": float(hit[in_title].mean())}  # fmt: skip


def paired_hits(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 10) -> tuple[int, int]:
    """(users only a hits at k, users only b hits at k)."""
    a, b = ranks_a < k, ranks_b < k
    return int((a & ~b).sum()), int((b & ~a).sum())


def user_ranks(user, item, examples) -> np.ndarray:
    """0-based masked rank of each test target under the full-catalog dot product."""
    import torch

    from karma.metrics import rank_with_mask

    scores = torch.as_tensor(user).float() @ torch.as_tensor(item).float().T
    top_scores, top_ids = rank_with_mask(scores, 201, seen=examples.seen, targets=examples.targets)
    return target_ranks(top_ids, np.asarray(examples.targets), scores=top_scores)


def recipe_text(recipe: str, cfg) -> str:
    """How the LLM presets were trained, for the report header."""
    m = cfg.model
    if recipe == "prompt":
        return (f"the CPU demo's prompt recipe (LoRA r={m.lora_r}, cached history refreshed every "
                f"{m.cache_refresh_steps} steps")
    return (f"the CPU demo's search recipe (train.objective=sequence: a next-item readout at "
            f"every history position and {cfg.train.search_examples} search example(s) per user "
            f"and step, the lower "
            f"{m.freeze_layers} layers frozen and cached, LoRA r={m.lora_r} on the rest, item IDs "
            f"with dropout {m.id_dropout}")


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(SLICES)
    for j, name in enumerate(SLICES):
        means = [np.mean(summary[m].get(name, [np.nan])) for m in methods]
        ax.bar(np.arange(len(methods)) + j * width, means, width, label=name)
    ax.set_xticks(np.arange(len(methods)) + width * (len(SLICES) - 1) / 2, methods)
    ax.set_ylabel("HR@10 (seen masked)")
    ax.set_title("simulated shop: HR@10 by test slice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps of LLM presets")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="prompt",
                        help="the LLM presets' demo recipe: prompt (karma.demo.CPU_RECIPE) or "
                        "search (SEARCH_CPU_RECIPE, the dense sequence objective with queries)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: report the (method, seed) runs already under --out "
                        "and name the missing ones")
    parser.add_argument("--out", default="runs/shop_experiment")
    parser.add_argument("--results", default="benchmarks/results/shop_experiment_cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides after the recipe (smoke "
                        "runs: model.backbone=tiny-random)")
    args = parser.parse_args()
    out = Path(args.out)
    walls: dict[str, float] = {}

    shop = out / "shop"
    t = time.perf_counter()
    if not (shop / "shop.json").is_file():
        generate_shop(ShopConfig(items=args.items, users=args.users, seed=0,
                                 oracle_users=args.users), shop)  # fmt: skip
    walls["shop"] = time.perf_counter() - t
    overrides = [*RECIPES[args.recipe], f"train.steps={args.steps}", f"data.path={shop}",
                 f"data.prepared_dir={out / 'prepared'}", "eval.split=test",
                 *args.overrides]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "shop.yaml", overrides)
    t = time.perf_counter()
    if not (out / "prepared" / "stats.json").is_file():
        prepare_dataset(cfg)
    walls["prepare (image features)"] = time.perf_counter() - t
    data = load_or_prepare(cfg)
    examples = data.split("test")
    colour, in_title = item_truth(data, shop)
    rows = slice_rows(data, examples, in_title, cfg.eval.cold_threshold)
    ks = sorted(set(cfg.eval.ks))

    results: dict[str, dict] = {}
    ranks: dict[str, dict[int, np.ndarray]] = {}
    missing: list[str] = []  # --finished-only: runs not there
    probes: dict[str, list[dict]] = {
        "image features (frozen EfficientNet-Lite0)": [
            colour_probe(np.load(out / "prepared" / "image_features.npy"), colour, in_title)
        ]
    }
    for method in args.methods:
        # popularity is deterministic: one run whatever the seeds
        seeds = [0] if method == "popularity" else args.seeds
        for seed in seeds:
            if args.finished_only and not (out / method / f"seed{seed}" / "emb.npz").is_file():
                missing.append(f"{method} seed {seed}")
                continue
            print(f"=== {method} seed {seed}", flush=True)
            emb = embeddings(method, seed, cfg, data, examples, out / method / f"seed{seed}")
            res = score(emb["user"], emb["item"], examples, rows, cfg)
            info = {k: v for k, v in emb.items() if k not in ("user", "item")}
            results.setdefault(method, {})[seed] = {"metrics": res, **info}
            ranks.setdefault(method, {})[seed] = user_ranks(emb["user"], emb["item"], examples)
            if method != "popularity":  # popularity's item vectors are a constant
                probe = colour_probe(emb["item"], colour, in_title)
                probes.setdefault(f"{method} item embeddings", []).append(probe)
            walls[f"{method} seed {seed}"] = info["wall_s"]
    oracle = oracle_scores(shop, data, examples, rows, ks)

    # ---- report
    env, machine = shared_cpu_run(2)
    slice_users = {name: int(len(idx)) for name, idx in rows.items()}
    hr10 = {m: {name: [r["metrics"][name]["hr@10"] for r in by_seed.values()
                       if name in r["metrics"]] for name in SLICES}
            for m, by_seed in results.items()}  # fmt: skip
    hr10["oracle"] = {name: [oracle[name]["hr@10"]] for name in SLICES if name in oracle}
    lines = [
        "# The simulated shop: popularity, SASRec, action_only, karma, karma_mm (CPU)",
        "",
        f"Machine: {machine}. Wall times are upper bounds (the CPU is shared).",
        "",
        f"Command: `{env} .venv/bin/python benchmarks/shop_experiment.py "
        f"{' '.join(args.overrides)} --items {args.items} --users {args.users} --seeds "
        f"{' '.join(map(str, args.seeds))} --steps {args.steps} --recipe {args.recipe} --methods "
        f"{' '.join(args.methods)}{' --finished-only' if args.finished_only else ''}` "
        f"(stages whose outputs already existed under --out were "
        "reused and show about 0 s)",
        "",
        f"Shop: `karma shop --items {args.items} --users {args.users} --seed 0` (Fashion-MNIST "
        f"pictures; SIMULATED users, queries and clicks), prepared with configs/shop.yaml and the "
        f"CPU demo recipe's data settings: {data.stats['users']} users, {data.stats['items']} "
        f"items, {data.stats['interactions']} clicks; protocol: {data.stats['protocol']}.",
        f"LLM presets: {cfg.model.backbone} through {recipe_text(args.recipe, cfg)}, "
        f"history {cfg.data.max_history}, batch {cfg.train.batch_size}, {args.steps} "
        f"steps, validation HR@10 on {cfg.train.eval_users} users picks checkpoints/best; extra "
        f"overrides: {args.overrides or 'none'}), seeds {args.seeds}; karma_mm adds the image "
        f"(model.image_dim=1280, model.image_fusion={cfg.model.image_fusion}) and L_img "
        f"(lambda_img={cfg.loss.lambda_img}); karma_mm_token reads the image as a token only "
        f"(model.image_fusion=token), whose projection this recipe freezes at its random start "
        f"when it caches the item tower (karma/sequence.py). SASRec: "
        f"karma.baselines defaults. Oracle: the simulator's utility ranking without noise "
        f"(oracle.parquet), masked the same way.",
        "",
        f"Methods run: {', '.join(results)}; not run: "
        f"{', '.join(m for m in METHODS if m not in results) or 'none'}"
        + (f"; seeds not run (--finished-only): {', '.join(missing)}" if missing else "") + ".",
        "",
        f"Test users per slice: {slice_users} (cold: target a training target < "
        f"{cfg.eval.cold_threshold} times; colour missing: the target's title leaves its colour "
        f"out, so only the picture shows it).",
        "",
        "Full-catalog ranking, seen items masked, pessimistic ties; mean ± sample std over seeds "
        "where there is more than one.",
        "",
    ]
    for name in SLICES:
        lines += [f"## {name} ({slice_users[name]} test users)", "",
                  "| method | seeds | " + " | ".join(COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 2) + "|"]  # fmt: skip
        for method, by_seed in results.items():
            vals = [r["metrics"][name] for r in by_seed.values() if name in r["metrics"]]
            if vals:
                cells = [fmt([v[c] for v in vals]) for c in COLUMNS]
                lines.append(f"| {method} | {len(vals)} | " + " | ".join(cells) + " |")
        if name in oracle:
            cells = [f"{oracle[name][c]:.4f}" for c in COLUMNS]
            lines.append(f"| oracle ({oracle[name]['users']} users) | - | "
                         + " | ".join(cells) + " |")  # fmt: skip
        lines.append("")
    verdict = []
    if "karma" in ranks and "karma_mm" in ranks:
        idx = rows["colour missing"]
        for seed in sorted(set(ranks["karma"]) & set(ranks["karma_mm"])):
            mm_only, text_only = paired_hits(
                ranks["karma_mm"][seed][idx], ranks["karma"][seed][idx]
            )
            verdict.append(f"seed {seed}: of {len(idx)} colour-missing test users, {mm_only} are "
                           f"hit@10 by karma_mm only and {text_only} by karma only")  # fmt: skip
        mm = np.mean(hr10["karma_mm"]["colour missing"])
        km = np.mean(hr10["karma"]["colour missing"])
        lines += ["## karma_mm vs karma where the colour is only in the picture", "",
                  f"HR@10 on colour-missing queries: karma_mm {mm:.4f}, karma {km:.4f} "
                  f"({'karma_mm higher' if mm > km else 'karma_mm not higher'}); "
                  + "; ".join(verdict) + ".", ""]  # fmt: skip
    majority = max(np.mean(colour[~in_title] == c) for c in set(colour))
    lines += ["## Does the colour reach the item embeddings?", "",
              f"A linear probe reads each item's colour ({len(set(colour))} colours) from its "
              "vector (5-fold out-of-fold logistic regression, `colour_probe`); accuracy on the "
              f"{int((~in_title).sum())} items whose title leaves the colour out (the most "
              f"common colour alone: {majority:.3f}) and on the {int(in_title.sum())} whose "
              "title names it. Mean over seeds.", "",
              "| vectors | seeds | colour missing | colour in title |", "|---|---|---|---|"]
    for name, runs in probes.items():
        cells = [f"{np.mean([r[k] for r in runs]):.3f}" for k in ("colour missing",
                                                                   "colour in title")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "## Wall time (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in walls.items()]
    lines += ["", f"![HR@10 by slice]({Path(args.results).name}.png)", ""]
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    plot(hr10, results_path.with_suffix(".png"))
    results_path.with_suffix(".md").write_text("\n".join(lines))
    results_path.with_suffix(".json").write_text(json.dumps({
        "machine": machine, "args": vars(args), "slice_users": slice_users,
        "results": {m: {str(s): r for s, r in by.items()} for m, by in results.items()},
        "oracle": oracle, "walls_s": walls, "karma_mm_vs_karma": verdict,
        "colour_probe": probes,
    }, indent=1))  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
