"""Does the user tower read the history? Recipe ablation, demo and long recipes, SASRec (issue 10).

    karma data prepare --config configs/ml100k.yaml                # once per dataset
    PYTHONPATH=. python benchmarks/personalization.py --list       # the rows and their commands
    PYTHONPATH=. python benchmarks/personalization.py --only 'ablation'   # a regex over row ids
    PYTHONPATH=. python benchmarks/personalization.py --report     # the tables from finished rows

Every row runs the same CLI a user would (`karma train` then `karma eval` on the last checkpoint,
or `karma baseline`), keeps its output under runs/personalization/<row id>/ and its figures in
row.json there, so an interrupted benchmark resumes at the first unfinished row, and a row
killed while training goes on from its last checkpoint (`karma train --resume`). The report
(`benchmarks/results/personalization_<device>.md` and `.json`) is rewritten from every finished
row after each one; a row not run on this machine keeps its record from the published JSON.

Rows:
- ablation: ML-100K without a query, `action_only`, seed 0, the same budget per row (steps x
  batch, same seed and data order: train.steps=ABLATION_STEPS, batch 16). The first row is the
  recipe the demo used before this work (`karma.demo.CPU_RECIPE`, prompt objective); each other
  row is one change from it or from the chosen recipe (`karma.demo.SEQUENCE_CPU_RECIPE`). For
  the sequence objective a batch is 16 users, each a dense readout at every history position;
  the wall-clock column says what each row cost.
- demo: the recipes of `karma demo` at its budget, both presets, both query modes
  (SEQUENCE_CPU_RECIPE without a query, SEARCH_CPU_RECIPE with genre queries), and the no-query
  one on ML-1M (`demo/ml-1m/*`, the checkpoints of the ML-1M funnel); demo-filter: the
  genre checkpoints evaluated with `eval.query_filter=true`; prompt: the search setting's demo
  recipe before issue 10 (`karma.demo.CPU_RECIPE`).
- long: `configs/ml100k_long.yaml` / `configs/ml1m_long.yaml`, 3 seeds, evaluated at
  checkpoints/best (the step with the best validation HR@10); long-search: the search setting
  as long (`configs/ml100k_search_long.yaml`, genre queries, history 50), seed 0.
- sasrec / popularity: the baselines on the same prepared splits, 3 seeds for SASRec; in the
  search setting (`*/genre-filter`) they rank only the items of the query's genres
  (`eval.query_filter`), the query-aware ID baselines.

The columns: final action loss (training log), validation HR@10 / NDCG@10 (the loop's last
validation, 200 seeded validation users), test HR@10 / NDCG@10, test HR@10 when each user is
scored with another user's history (seeded permutation, `eval.other_history`), cold-item HR@10 (test
users whose target was a training target fewer than 5 times) and their number, the mean pairwise
cosine of the history tokens and of the item embeddings over the catalog, wall seconds; the
JSON also names each row's machine (the same seeded SASRec moves by 0.02 HR@10 between two CPUs
of one model name: compare rows of one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from karma.demo import CPU_RECIPE, SEARCH_CPU_RECIPE, SEQUENCE_CPU_RECIPE, with_overrides

ROOT = Path("runs/personalization")
ABLATION_STEPS = 100
SEEDS = (0, 1, 2)
# recipes trained past their best validation point (every long* recipe): their rows test
# checkpoints/best
LONG_PREFIX = "long"
DATA = {
    "ml-100k": ("configs/ml100k.yaml", "runs/data/ml-100k"),
    "ml-1m": ("configs/ml1m.yaml", "runs/data/ml-1m"),
}


def _llm(row_id, recipe, preset, query_mode, dataset, seed, overrides, default=False, config=None):
    return {
        "id": row_id, "recipe": recipe, "preset": preset, "query_mode": query_mode,
        "dataset": dataset, "seed": seed, "overrides": overrides, "default": default,
        "config": config or DATA[dataset][0],
    }


def _prepared(dataset: str, query_mode: str, max_history: int) -> str:
    return f"{DATA[dataset][1]}-{query_mode}-h{max_history}"


def rows() -> list[dict]:
    today = with_overrides(CPU_RECIPE, "data.query_mode=none",
                           f"data.prepared_dir={_prepared('ml-100k', 'none', 10)}")
    chosen = with_overrides(SEQUENCE_CPU_RECIPE,
                            f"data.prepared_dir={_prepared('ml-100k', 'none', 50)}")
    budget = [f"train.steps={ABLATION_STEPS}", "train.batch_size=16", "loss.preset=action_only",
              f"train.eval_every={ABLATION_STEPS}", f"train.save_every={ABLATION_STEPS}",
              "train.eval_users=200", "train.seed=0"]
    ablation = [
        ("today", today, []),
        ("today+standardize", today, ["model.item_norm=standardize"]),
        ("today+catalog_softmax", today, ["loss.catalog_softmax=true"]),
        ("today+item_ids", today, ["model.item_ids=true", "model.id_dropout=0.1"]),
        ("chosen", chosen, []),
        ("chosen-item_ids", chosen, ["model.item_ids=false", "model.id_dropout=0.0"]),
        ("chosen-standardize", chosen, ["model.item_norm=none"]),
    ]
    out = [
        _llm(f"ablation/{name}", name, "action_only", "none", "ml-100k", 0,
             base + extra + budget, default=name == "chosen")
        for name, base, extra in ablation
    ]
    search = SEARCH_CPU_RECIPE + [f"data.prepared_dir={_prepared('ml-100k', 'genre', 20)}"]
    # the search recipe before search-k4 made it the default: one search example per user and
    # step, the base of the search ablation rows measured before the switch
    one = with_overrides(search, "train.search_examples=1")
    prompt = with_overrides(CPU_RECIPE, "data.query_mode=genre",
                            f"data.prepared_dir={_prepared('ml-100k', 'genre', 10)}")
    for preset in ("action_only", "karma"):
        out.append(_llm(f"demo/none/{preset}", "demo", preset, "none", "ml-100k", 0,
                        chosen + [f"loss.preset={preset}"], default=True))
        if preset == "action_only":  # the no-query demo with the top 8 layers trained, not 4
            out.append(_llm("demo-f22/none/action_only", "demo-f22", preset, "none", "ml-100k",
                            0, chosen + [f"loss.preset={preset}", "model.freeze_layers=22"]))
        demo_genre = _llm(f"demo/genre/{preset}", "demo", preset, "genre", "ml-100k", 0,
                          search + [f"loss.preset={preset}"], default=True)
        # the same checkpoint ranking only the items of the query's genres: what the model adds
        # to the filter (genre popularity and SASRec with it: */genre-filter)
        out += [demo_genre, _filtered(demo_genre, f"demo/genre-filter/{preset}")]
        if preset == "action_only":  # the search recipe with the no-query demo's history (50)
            # (run at the search recipe's earlier 200 steps)
            h50 = with_overrides(one, "data.max_history=50", "train.sequence_max_len=50",
                                 "train.steps=200", "train.eval_every=200",
                                 f"data.prepared_dir={_prepared('ml-100k', 'genre', 50)}")
            out.append(_llm("search-h50/genre/action_only", "search-h50", preset, "genre",
                            "ml-100k", 0, h50 + [f"loss.preset={preset}"]))
            h50_400 = with_overrides(h50, "train.steps=400", "train.eval_every=400")
            out.append(_llm("search-h50-400/genre/action_only", "search-h50-400", preset,
                            "genre", "ml-100k", 0, h50_400 + [f"loss.preset={preset}"]))
        # the search embedding adds the query-less readout at the last history token
        out.append(_llm(f"search-sum/genre/{preset}", "search-sum", preset, "genre", "ml-100k",
                        0, one + ["model.search_readout=sum", f"loss.preset={preset}"]))
        # a second search loss over the query's candidates only (hard negatives)
        cand = _llm(f"search-cand/genre/{preset}", "search-cand", preset, "genre", "ml-100k", 0,
                    one + ["loss.query_candidates_weight=1.0", f"loss.preset={preset}"])
        out += [cand, _filtered(cand, f"search-cand/genre-filter/{preset}")]
        if preset == "action_only":
            # search cuts that see at least 10 of the (up to 20) history items
            out.append(_llm("search-min10/genre/action_only", "search-min10", preset, "genre",
                            "ml-100k", 0, one + ["train.search_min_history=10",
                                                    f"loss.preset={preset}"]))
        # 4 search examples per user and step instead of 1: since then the demo's recipe
        out.append(_llm(f"search-k4/genre/{preset}", "search-k4", preset, "genre", "ml-100k", 0,
                        with_overrides(one, "train.search_examples=4") +
                        [f"loss.preset={preset}"]))
        # one change each from the demo's search recipe (4 examples), one thread a row: the
        # query-less readout added to the search embedding, one ID table (as the long config),
        # history 50 (with karma too), history 50 with the sum
        h50 = ["data.max_history=50", "train.sequence_max_len=50",
               f"data.prepared_dir={_prepared('ml-100k', 'genre', 50)}"]
        for name, extra, presets in (
            ("search-k4-sum", ["model.search_readout=sum"], ("action_only",)),
            ("search-k4-tie", ["model.tie_item_ids=true"], ("action_only",)),
            ("search-k4-h50", h50, ("action_only", "karma")),
            ("search-k4-h50-sum", h50 + ["model.search_readout=sum"], ("action_only",)),
            # ... and at the no-query demo's 400 steps: does the history's share keep growing?
            ("search-k4-h50-sum-400", h50 + ["model.search_readout=sum", "train.steps=400",
                                             "train.eval_every=400"], ("action_only", "karma")),
        ):
            if preset in presets:
                row = _llm(f"{name}/genre/{preset}", name, preset, "genre", "ml-100k", 0,
                           search + extra + [f"loss.preset={preset}", "train.num_threads=1"])
                out += [row, _filtered(row, f"{name}/genre-filter/{preset}")]
        # the search setting's demo before issue 10: the prompt recipe
        out.append(_llm(f"prompt/genre/{preset}", "prompt", preset, "genre", "ml-100k", 0,
                        prompt + [f"loss.preset={preset}"]))
    # the no-query demo recipe on ML-1M at the same budget (400 steps of 16 users, each user's
    # newest window): ML-1M's own-vs-other history at the demo budget, and the checkpoints of
    # the ML-1M funnel (benchmarks/funnel.py --checkpoints runs/personalization/demo/ml-1m)
    ml1m = with_overrides(SEQUENCE_CPU_RECIPE,
                          f"data.prepared_dir={_prepared('ml-1m', 'none', 50)}")
    for preset in ("action_only", "karma"):
        out.append(_llm(f"demo/ml-1m/{preset}", "demo", preset, "none", "ml-1m", 0,
                        ml1m + [f"loss.preset={preset}"], default=True))
    for dataset in ("ml-100k", "ml-1m"):
        long_cfg = DATA[dataset][0].replace(".yaml", "_long.yaml")
        # ML-100K's long config ties its ID tables since session 28: the rows measured before
        # pin the two tables they trained with
        untied = ["model.tie_item_ids=false"] if dataset == "ml-100k" else []
        for seed in SEEDS:
            # ML-100K's were measured before sequence_windows=all entered its config (rows
            # long-all/*): the newest window only
            newest = (["train.sequence_windows=last", "model.freeze_layers=26"]
                      if dataset == "ml-100k" else [])
            out.append(_llm(f"long/{dataset}/seed{seed}", "long", "karma", "none", dataset, seed,
                            [f"train.seed={seed}", *newest, *untied], config=long_cfg))
        if dataset == "ml-100k":  # every training transition, not each user's newest 51 items
            for seed in SEEDS:
                out.append(_llm(f"long-all/ml-100k/seed{seed}", "long-all", "karma", "none",
                                dataset, seed, [f"train.seed={seed}", "train.sequence_windows=all",
                                                "model.freeze_layers=26", *untied],
                                config=long_cfg))
            # the same with LoRA on the top 8 or 12 layers, not 4 (demo-f22 gained 0.015 HR@10
            # at the demo budget): is trainable depth what the long recipe lacks against SASRec?
            for frozen, seeds in ((22, SEEDS), (18, (0,))):
                for seed in seeds:
                    out.append(_llm(f"long-all-f{frozen}/ml-100k/seed{seed}",
                                    f"long-all-f{frozen}", "karma", "none", dataset, seed,
                                    [f"train.seed={seed}", "train.sequence_windows=all",
                                     f"model.freeze_layers={frozen}", *untied],
                                    config=long_cfg))
            # The config with L_rec four times as strong (lambda_rec 2, not 0.5): at 0.5 its
            # jointly trained decoder collapsed onto one title at this budget
            # (benchmarks/results/analysis_long_ml100k_cpu): do the Knowledge regularizers need
            # more weight before they can be judged here?
            out.append(_llm("long-rec2/ml-100k/seed0", "long-rec2", "karma", "none", dataset, 0,
                            ["train.seed=0", "loss.lambda_rec=2.0", *untied], config=long_cfg))
            # The same without the Knowledge regularizers (loss.preset=action_only, a 2.5 times
            # cheaper step): what do L_gen and L_rec bring at the long budget? And one change
            # each from it: 2,000 steps (does more data help?), LoRA on the MLP projections too
            # (is adapter capacity short?), more ID dropout and LoRA dropout (validation stops
            # rising while the training loss falls: is it memorizing?), one ID table for targets
            # and history (model.tie_item_ids, as SASRec ties its item embeddings)
            for name, extra, seeds in (
                ("long-action", untied, SEEDS),
                ("long-action-2k", ["train.steps=2000", *untied], (0,)),
                ("long-action-mlp", ["model.lora_mlp=true", *untied], (0,)),
                ("long-action-id03", ["model.id_dropout=0.3", *untied], (0,)),
                ("long-action-ldrop", ["model.lora_dropout=0.1", *untied], (0, 1)),
                ("long-action-tie", ["model.tie_item_ids=true"], SEEDS),
            ):
                for seed in seeds:
                    out.append(_llm(f"{name}/ml-100k/seed{seed}", name, "action_only", "none",
                                    dataset, seed, [f"train.seed={seed}",
                                                    "loss.preset=action_only", *extra],
                                    config=long_cfg))
            # The config with one ID table (karma, L_gen and L_rec kept): does KARMA keep what
            # the table gave action_only (long-action-tie)? One thread a seed, seeds run side
            # by side on the 2-core CPU
            for seed in SEEDS:
                out.append(_llm(f"long-tie/ml-100k/seed{seed}", "long-tie", "karma", "none",
                                dataset, seed, [f"train.seed={seed}", "model.tie_item_ids=true",
                                                "train.num_threads=1"], config=long_cfg))
            # long-action seed 0 again on the later machine of the sasrec-rerun rows
            out.append(_llm("long-action-rerun/ml-100k/seed0", "long-action-rerun", "action_only",
                            "none", dataset, 0, ["train.seed=0", "loss.preset=action_only",
                                                 *untied], config=long_cfg))
        if dataset == "ml-100k":  # the search setting trained as long (one seed so far)
            long_search = _llm("long-search/ml-100k/seed0", "long-search", "karma", "genre",
                               dataset, 0, ["train.seed=0"],
                               config="configs/ml100k_search_long.yaml")
            out += [long_search, _filtered(long_search, "long-search/genre-filter/seed0")]
        out.append(_baseline(f"popularity/{dataset}", "popularity", dataset, 0, "none", []))
        for seed in SEEDS:
            out.append(_baseline(f"sasrec/{dataset}/seed{seed}", "sasrec", dataset, seed, "none",
                                 [f"train.seed={seed}", "train.num_threads=1"]))
        if dataset == "ml-100k":  # SASRec reading the 50 items the LLM recipes read, not 200
            for seed in SEEDS:
                out.append(_baseline(f"sasrec-h50/{dataset}/seed{seed}", "sasrec", dataset, seed,
                                     "none", [f"train.seed={seed}", "train.num_threads=1",
                                              "baseline.sasrec.max_len=50"]))
            # The same seeds again on a later machine: its 'AMD EPYC' runs AVX2 kernels and
            # gave seed 0 test HR@10 0.1601 where the rows above recorded 0.1803 (how much of
            # the bar is the machine?)
            for seed in SEEDS:
                out.append(_baseline(f"sasrec-rerun/{dataset}/seed{seed}", "sasrec", dataset,
                                     seed, "none", [f"train.seed={seed}", "train.num_threads=1"]))
            # ... and trained on what the LLM recipe trains on: each user's newest 51 items
            for seed in SEEDS:
                out.append(_baseline(f"sasrec-last50/{dataset}/seed{seed}", "sasrec", dataset,
                                     seed, "none", [f"train.seed={seed}", "train.num_threads=1",
                                                    "baseline.sasrec.max_len=50",
                                                    "baseline.sasrec.windows=last"]))
    # The search setting's ID baselines: the demo's genre split, ranking only the items of the
    # query's genres (what the history can add to the query, and what a swap of it costs)
    genre = ["data.query_mode=genre", "data.max_history=20", "eval.query_filter=true",
             f"data.prepared_dir={_prepared('ml-100k', 'genre', 20)}"]
    out.append(_baseline("popularity/ml-100k/genre-filter", "popularity", "ml-100k", 0, "genre",
                         genre))
    for seed in SEEDS:
        out.append(_baseline(f"sasrec/ml-100k/genre-filter/seed{seed}", "sasrec", "ml-100k", seed,
                             "genre", genre + [f"train.seed={seed}", "train.num_threads=1"]))
    # The cold subset with targets seen fewer than 20 times in training, not 5 (12 ML-100K test
    # users): the long recipe's checkpoints evaluated again, the baselines trained again with
    # the same seeds (SASRec keeps no model)
    cold20 = ["eval.cold_threshold=20"]
    by_id = {r["id"]: r for r in out}
    for seed in SEEDS:
        out.append(_reevaluated(by_id[f"long-all/ml-100k/seed{seed}"],
                                f"cold20/long-all/ml-100k/seed{seed}", "-cold20", cold20))
    # ... and the long recipe with 8 trained layers, also scoring the items a training target
    # fewer than 20 times on their text alone (eval.id_min_count=20): are their thin ID rows or
    # the text what fails on the cold subset?
    for seed in SEEDS:
        f22 = by_id[f"long-all-f22/ml-100k/seed{seed}"]
        out.append(_reevaluated(f22, f"cold20/long-all-f22/ml-100k/seed{seed}", "-cold20",
                                cold20))
        out.append(_reevaluated(f22, f"cold20-text20/long-all-f22/ml-100k/seed{seed}",
                                "-cold20-text20", [*cold20, "eval.id_min_count=20"]))
    # ... and with one ID table (model.tie_item_ids): does a rare item's row, trained by its
    # clicks as history too, reach the cold subset?
    for seed in SEEDS:
        out.append(_reevaluated(by_id[f"long-action-tie/ml-100k/seed{seed}"],
                                f"cold20/long-action-tie/ml-100k/seed{seed}", "-cold20", cold20))
    for seed in SEEDS:
        out.append(_reevaluated(by_id[f"long-tie/ml-100k/seed{seed}"],
                                f"cold20/long-tie/ml-100k/seed{seed}", "-cold20", cold20))
    out.append(_baseline("cold20/popularity/ml-100k", "popularity", "ml-100k", 0, "none", cold20))
    # SASRec again on the machine of the sasrec-rerun rows (its kernels move SASRec's figures)
    for name in ("sasrec", "sasrec-rerun"):
        for seed in SEEDS:
            out.append(_baseline(f"cold20/{name}/ml-100k/seed{seed}", "sasrec", "ml-100k", seed,
                                 "none", [f"train.seed={seed}", "train.num_threads=1", *cold20]))
    return out


def _reevaluated(row: dict, row_id: str, suffix: str, overrides: list[str]) -> dict:
    """The checkpoint `row` is tested on, evaluated with other eval settings (no training of
    its own)."""
    return {**row, "id": row_id, "recipe": row["recipe"] + suffix, "default": False,
            "overrides": overrides, "checkpoint_of": row["id"], "checkpoint": _checkpoint(row)}


def _filtered(row: dict, row_id: str) -> dict:
    """`row`'s checkpoint evaluated with eval.query_filter."""
    return _reevaluated(row, row_id, "-filter", ["eval.query_filter=true"])


def _baseline(row_id, preset, dataset, seed, query_mode, overrides):
    return {"id": row_id, "recipe": "baseline", "preset": preset, "query_mode": query_mode,
            "dataset": dataset, "seed": seed, "default": False, "config": DATA[dataset][0],
            "overrides": overrides}


def _checkpoint(row: dict) -> str:
    """The checkpoint a row (or a row evaluating another's checkpoint) is tested on: the long
    recipes train past their best validation point (ML-100K: best at step 1,000 of 3,000,
    docs/decisions.md), so their rows evaluate the checkpoint selected on validation."""
    if "checkpoint" in row:  # a row evaluating another's: the one that row is tested on
        return row["checkpoint"]
    return "best" if row["recipe"].startswith(LONG_PREFIX) else "last"


def commands(row: dict) -> list[list[str]]:
    run = ROOT / row["id"]
    karma = [sys.executable, "-m", "karma"]
    if row["recipe"] == "baseline":
        return [karma + ["baseline", row["preset"], "--config", row["config"], "--out", str(run),
                         *row["overrides"]]]
    if row.get("checkpoint_of"):  # another row's checkpoint, evaluated with other settings
        return [karma + ["eval", "--checkpoint", str(ROOT / row["checkpoint_of"] / "checkpoints" /
                                                     _checkpoint(row)), "--out", str(run / "eval"),
                         *row["overrides"]]]
    train = karma + ["train", "--config", row["config"], *row["overrides"],
                     f"train.output_dir={run}"]
    evaluate = karma + ["eval", "--checkpoint", str(run / "checkpoints" / _checkpoint(row)),
                        "--out", str(run / "eval")]
    return [train, evaluate]


def _train_figures(row: dict) -> dict:
    """The final training action loss and the validation figures of the checkpoint the row is
    tested on: the last validation for checkpoints/last, the best one (the step train.py saved
    checkpoints/best at, from train_summary.json) for checkpoints/best."""
    run = ROOT / row.get("checkpoint_of", row["id"])
    out = {"val_step": None}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "act_loss" in rec:
            out["final_act_loss"] = rec["act_loss"]
        if "val/hr@10" in rec:
            out["val_hr10"], out["val_ndcg10"] = rec["val/hr@10"], rec["val/ndcg@10"]
            out["val_step"] = rec["step"]
    if _checkpoint(row) == "best":
        best = json.loads((run / "train_summary.json").read_text())["best_val"]
        out.update(val_hr10=best["hr@10"], val_ndcg10=best["ndcg@10"], val_step=best["step"])
    return out


def machine() -> str:
    """The device that ran a row, and on a CPU the vector kernels torch dispatches to: the same
    seeded SASRec gave 0.1803 and 0.1601 test HR@10 on two 'AMD EPYC' machines."""
    import torch

    from karma.report import device_name

    name = device_name()
    if torch.cuda.is_available():
        return name
    return f"{name}, {torch.backends.cpu.get_cpu_capability()} kernels"


def collect(row: dict, wall: float) -> dict:
    run = ROOT / row["id"]
    metrics = run / "metrics.json" if row["recipe"] == "baseline" else run / "eval" / "metrics.json"
    res = json.loads(metrics.read_text())
    m = res["metrics"]
    out = {k: v for k, v in row.items() if k not in ("overrides", "checkpoint_of", "checkpoint")}
    out.update({
        "test_hr10": m["masked"]["hr@10"], "test_ndcg10": m["masked"]["ndcg@10"],
        "test_hr50": m["masked"].get("hr@50"),
        "test_hr10_other_history": (m.get("other history") or {}).get("hr@10"),
        "cold_hr10": (m.get("cold") or {}).get("hr@10"),
        "cold_hr50": (m.get("cold") or {}).get("hr@50"),
        "cold_hr200": (m.get("cold") or {}).get("hr@200"),
        "cold_users": res["protocol"].get("cold_users"),
        "history_token_cos": (res.get("geometry") or {}).get("history_token_cos"),
        "item_emb_cos": (res.get("geometry") or {}).get("item_emb_cos"),
        "wall_s": round(wall, 1), "commands": [" ".join(c[2:]) for c in commands(row)],
        "machine": machine(),
    })
    if row["recipe"] != "baseline":
        out.update(_train_figures(row))
    return out


def run_row(row: dict) -> dict:
    done = ROOT / row["id"] / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.time()
    # Passive OpenMP waits: with another job on the 2 cores, spinning threads slow SmolLM2 5-20x.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": os.getcwd()}
    for cmd in commands(row):
        last = ROOT / row["id"] / "checkpoints" / "last" / "state.pt"
        if cmd[3] == "train" and last.exists():
            cmd = cmd + ["--resume"]  # a killed row goes on from its last checkpoint
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, env=env)
    result = collect(row, time.time() - t0)
    done.write_text(json.dumps(result, indent=2))
    return result


def _fmt(v, digits=4) -> str:
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def write_report(results: list[dict], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    cols = ["id", "final_act_loss", "val_hr10", "val_ndcg10", "val_step", "test_hr10",
            "test_ndcg10",
            "test_hr10_other_history", "cold_hr10", "cold_users", "history_token_cos",
            "item_emb_cos", "wall_s", "default"]
    lines = ["# Personalization: does the user tower read the history?", "",
             "Machines: listed below the tables (each row's `machine` in the JSON). Written by "
             "`benchmarks/personalization.py` from the rows "
             "finished so far; each row's commands are in the JSON beside this file. Test = "
             "full-catalog leave-one-out, seen items masked, pessimistic ties; 'other history' = "
             "each test user scored with another user's history (seeded permutation). "
             "val_hr10 / val_ndcg10 are the validation of the tested checkpoint, taken at step "
             "val_step (checkpoints/best for the long recipes); rows without a val_step were "
             "recorded before that column and show the run's last validation.", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in results:
        other = r.get("test_hr10_other_history")
        row = [_fmt(r.get(c), 1 if c == "wall_s" else 4) for c in cols]
        if other is not None and r["test_hr10"]:
            row[cols.index("test_hr10_other_history")] += (
                f" ({100 * (other / r['test_hr10'] - 1):+.0f}%)")
        lines.append("| " + " | ".join(row) + " |")
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r["recipe"] == "baseline" or r["recipe"].startswith(LONG_PREFIX):  # seeded recipes
            groups.setdefault(r["id"].rsplit("/seed", 1)[0], []).append(r)
    seeded = {k: v for k, v in groups.items() if len(v) > 1}

    def spread(rs: list[dict], key: str) -> str:
        v = [r[key] for r in rs if r.get(key) is not None]  # rows recorded before a column: none
        if len(v) < 2:
            return f"{v[0]:.4f} (one seed)" if v else "not recorded"
        return f"{statistics.mean(v):.4f} +- {statistics.stdev(v):.4f}"

    if seeded:
        lines += ["", "Over seeds (test HR@10, and on the cold subset where it was measured with "
                  "eval.cold_threshold=20; mean +- sample std):", ""]
        for k, rs in seeded.items():
            cold = (f"; cold ({rs[0]['cold_users']} users) HR@10 {spread(rs, 'cold_hr10')}, "
                    f"HR@50 {spread(rs, 'cold_hr50')}, HR@200 {spread(rs, 'cold_hr200')}"
                    if k.startswith("cold20") else "")
            lines.append(f"- {k}: {spread(rs, 'test_hr10')} ({len(rs)} seeds){cold}")
    lines += ["", "Rows: `ablation/*` share one budget (100 steps x 16, action_only, no query, "
              "seed 0; a sequence-objective batch is 16 users with a readout at every history "
              "position); "
              "`demo/*` are the recipes of `karma demo` (no query: 400 steps x 16 users, history "
              "50, also on ML-1M as `demo/ml-1m/*`; genre queries: 150 steps x 16 users, each "
              "with four search examples, history 20); `cold20/*` evaluate the cold subset with "
              "eval.cold_threshold=20 (long-all's checkpoints again, the baselines retrained with "
              "the same seeds), `cold20-text20` the same with eval.id_min_count=20 (items a "
              "training target fewer than 20 times scored on their text alone); "
              "the `search-*` rows are one change from the genre recipe before "
              "that, with one search example per user (the demo/genre rows' records before the "
              "switch are in git history): `search-h50` is that recipe with history 50 and 200 "
              "steps (`-400`: 400); "
              "`search-sum` the genre recipe with model.search_readout=sum; `search-cand` "
              "with loss.query_candidates_weight=1 (a softmax over the query's candidates too); "
              "`search-min10` with train.search_min_history=10 (search cuts see >= 10 items), "
              "`search-k4` with train.search_examples=4 (4 search examples per user and step); "
              "`search-k4-*` one change from the demo's genre recipe (4 examples, history 20, "
              "150 steps, one thread): `-sum` model.search_readout=sum, `-tie` "
              "model.tie_item_ids=true, `-h50` history 50, `-h50-sum` both, `-h50-sum-400` "
              "that at 400 steps; "
              "`*/genre-filter` rank only the items of the query's genres (eval.query_filter); "
              "`demo-f22` the no-query demo with model.freeze_layers=22 (LoRA on the top 8 "
              "layers, not 4), `long-all-f22` / `-f18` the long recipe with the top 8 / 12 layers "
              "trained; `long/*` the long "
              "recipes (checkpoints/best; on ML-100K as "
              "configured before session 21, each user's newest 51 training items), `long-all` "
              "ML-100K's long config of sessions 21-24, train.sequence_windows=all (every "
              "training transition, 4 trained layers; `long-all-f22` is the config since), "
              "`long-action` that config with loss.preset=action_only (no L_gen, no L_rec), "
              "`long-action-2k` / `-mlp` / `-id03` / `-ldrop` / `-tie` one change from it: "
              "2,000 steps, model.lora_mlp=true, model.id_dropout=0.3, model.lora_dropout=0.1, "
              "model.tie_item_ids=true; `long-rec2` the config with loss.lambda_rec=2; "
              "`long-tie` the config (karma) with model.tie_item_ids=true, its seeds run side "
              "by side with one thread each; "
              "`sasrec-rerun` the `sasrec` rows rerun with the same seeds on a later machine, "
              "`long-action-rerun` long-action's seed 0 on that machine; "
              "`long-search` "
              "the search setting as long (history 50, 1,000 steps); `sasrec-h50` SASRec "
              "reading the last 50 "
              "items (the LLM recipes' history) instead of 200, `sasrec-last50` the same "
              "trained on each user's newest 51 training items only (what the LLM recipes "
              "trained on); "
              "`prompt/genre/*` the search demo before issue 10 (prompt objective, 100 steps x "
              "16 prompts, history 10); `default` marks the chosen recipes. Wall seconds are "
              "training plus evaluation on a CPU shared with other jobs: upper bounds.", ""]
    lines += [f"- {r['id']}: {r['note']}" for r in results if r.get("note")]
    by_machine: dict[str, list[str]] = {}
    for r in results:
        by_machine.setdefault(r.get("machine") or "", []).append(r["id"])
    lines += ["", "Machines:", ""]
    for name, ids in by_machine.items():
        lines.append(f"- {name}: {', '.join(ids)}" if name else
                     f"- {len(ids)} rows recorded before rows named their machine: AMD EPYC, "
                     "2 cores (CPU), vector kernels not recorded")
    lines += ["",
              f"![own vs other history]({out.name}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, out.with_suffix(".png"))


def plot(results: list[dict], path: Path) -> None:
    """Test HR@10 with the user's own and with another user's history, per LLM row; the ID
    baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    llm = [r for r in results if r["recipe"] != "baseline"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(llm)), 4))
    xs = range(len(llm))
    ax.bar([x - 0.2 for x in xs], [r["test_hr10"] for r in llm], 0.4, label="own history")
    ax.bar([x + 0.2 for x in xs], [r["test_hr10_other_history"] or 0 for r in llm], 0.4,
           label="another user's history")
    for r, style in zip([r for r in results if r["recipe"] == "baseline"], ("--", ":", "-.") * 9):
        ax.axhline(r["test_hr10"], linestyle=style, color="gray", linewidth=1)
        ax.text(len(llm) - 0.5, r["test_hr10"], r["id"], fontsize=7, va="bottom", ha="right")
    ax.set_xticks(list(xs), [r["id"] for r in llm], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("test HR@10")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=".", help="regex over row ids")
    ap.add_argument("--skip", default="$^", help="regex over row ids not to run")
    ap.add_argument("--list", action="store_true", help="print the rows and commands, run nothing")
    ap.add_argument("--report", action="store_true", help="only rewrite the report")
    ap.add_argument("--recollect", action="store_true",
                    help="with --report: read the figures of the finished rows of --only again "
                    "from their metrics files (wall time kept), e.g. after a new column")
    ap.add_argument("--out", default="benchmarks/results/personalization_cpu")
    args = ap.parse_args()
    selected = [r for r in rows()
                if re.search(args.only, r["id"]) and not re.search(args.skip, r["id"])]
    if args.list:
        for r in selected:
            print(r["id"])
            for c in commands(r):
                print("   ", " ".join(c[2:]))
        return
    if not args.report:
        for r in selected:
            run_row(r)
    elif args.recollect:
        for r in selected:
            done = ROOT / r["id"] / "row.json"
            if done.exists():
                before = json.loads(done.read_text())
                # the figures read again here; wall time and machine stay the run's own
                again = collect(r, before["wall_s"])
                again["machine"] = before.get("machine")
                done.write_text(json.dumps(again, indent=2))
    # A row finished on another machine (runs/ is not committed) keeps its published record.
    out_json = Path(args.out).with_suffix(".json")
    published = ({r["id"]: r for r in json.loads(out_json.read_text())}
                 if out_json.exists() else {})
    finished = []
    for r in rows():
        done = ROOT / r["id"] / "row.json"
        result = json.loads(done.read_text()) if done.exists() else published.get(r["id"])
        if result is not None:
            result["default"] = r["default"]  # the current choice, not the one when it ran
            finished.append(result)
    write_report(finished, Path(args.out))
    print(f"{len(finished)} rows in {args.out}.md")


if __name__ == "__main__":
    main()
