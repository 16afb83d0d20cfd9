"""`karma funnel`: the paper's three-stage table (recall, pre-ranking, ranking) for one or two
checkpoints side by side, with its protocol header, a Markdown report and a PNG.

    karma funnel --checkpoint runs/ao/checkpoints/last --compare runs/karma/checkpoints/last \\
        --out runs/funnel funnel.max_users=0

Per checkpoint: the catalog (with its image features, where the model reads them) and every
needed request are encoded once (karma.inference); recall is full-catalog HR@K of the test
requests (karma.evaluate, seen items masked); pre-ranking re-scores the top `funnel.candidates`
of that retrieval, or on data with result pages (the shop) each request's page
(`funnel.prerank_candidates`, karma/preranking.py); ranking trains a DeepFM CTR model without
the checkpoint's features, with u.e alone and with u, e, u.e (karma/ctr.py). Trained scorers run
once per seed of `funnel.seeds`, reported as mean +- std. The ranking model without KARMA
features does not depend on the checkpoint: it is trained once and shown in every column.
Outputs in --out: funnel.json, funnel.md, funnel.png.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.atomic import ensure_output_dir, write_json_atomic, write_text_atomic
from karma.errors import KarmaError

RANKING_METRICS = ("auc", "gauc", "logloss")


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "values": [float(v) for v in arr]}


def _aggregate(runs: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {key: _mean_std([r[key] for r in runs]) for key in runs[0]}


def _encode_checkpoint(
    checkpoint: Path, overrides: Sequence[str] | None, show_progress: bool = False
) -> dict[str, Any]:
    """Load a checkpoint, build the CTR rows of the sampled test users, encode the catalog and
    the u of every request (its valid / test requests are the retrieval requests), one per row."""
    from karma.checkpoint import load_model
    from karma.ctr import build_ctr_rows
    from karma.data import load_or_prepare
    from karma.evaluate import select_users
    from karma.inference import encode_catalog, encode_users

    model, cfg = load_model(checkpoint, overrides)
    data = load_or_prepare(cfg)
    images = data.model_image_features(cfg.model.image_dim)
    model.set_image_table(images)
    test = select_users(data.split("test"), cfg.funnel.max_users)
    valid = select_users(data.split("valid"), cfg.funnel.max_users)
    if list(valid.user_ids) != list(test.user_ids):
        raise KarmaError(f"{cfg.data.prepared_dir}: valid and test splits list different users")
    rows = build_ctr_rows(data, cfg, list(test.user_ids))
    t = time.time()
    texts = list(data.items.texts)
    catalog = encode_catalog(model, texts, batch_size=cfg.eval.batch_size, image_features=images,
                             progress=show_progress)
    first = rows.request_rows()  # the rows of a result page share their request's u
    u = encode_users(model, [rows.histories[i] for i in first], [rows.queries[i] for i in first],
                     catalog, texts, cfg.eval.batch_size, progress=show_progress)
    u = np.asarray(torch.as_tensor(u).float().cpu(), dtype=np.float32)[rows.requests]  # (R, k)
    wall = time.time() - t
    del model
    return {"cfg": cfg, "data": data, "valid": valid, "test": test, "rows": rows, "u": u,
            "item_emb": np.asarray(catalog.item_emb, dtype=np.float32), "encode_s": wall}


def _stages(enc: dict[str, Any], show_progress: bool) -> dict[str, Any]:
    """Recall and pre-ranking of one encoded checkpoint, and its ranking with KARMA features."""
    from karma.ctr import KARMA_FEATURES, ctr_features, train_and_score
    from karma.evaluate import evaluate_embeddings
    from karma.preranking import run_preranking

    cfg, data, rows, u = enc["cfg"], enc["data"], enc["rows"], enc["u"]
    # the valid / test requests of each user are the retrieval requests, in the users' order
    first = rows.request_rows()
    valid_u, test_u = (u[first][rows.stage[first] == s] for s in (1, 2))
    pages = (rows.page_items(1), rows.page_items(2)) if _on_pages(cfg, rows) else None
    recall = evaluate_embeddings(
        test_u, enc["item_emb"], enc["test"], cfg, print_table=False, show_progress=False
    )["metrics"]["masked"]
    popularity = np.bincount(
        np.asarray(data.split("train").targets, dtype=np.int64), minlength=data.items.n_items
    )
    seeds = list(cfg.funnel.seeds)
    pre = [
        run_preranking(valid_u, test_u, enc["item_emb"], enc["valid"], enc["test"], popularity,
                       cfg.funnel, seed, show_progress, pages)
        for seed in seeds
    ]
    features = ctr_features(rows, data, u, enc["item_emb"])

    def ranking(karma: tuple[str, ...]) -> dict[str, Any]:
        return _aggregate([
            train_and_score(features, rows, data.items.n_items, karma, seed, cfg.funnel,
                            show_progress)
            for seed in seeds
        ])

    # the scalar u.e alone, and the whole embeddings with it (k + k + 1 dense inputs)
    return {"recall": recall, "preranking": _aggregate(pre), "ranking_ue": ranking(("ue",)),
            "ranking_karma": ranking(KARMA_FEATURES)}


def _on_pages(cfg: Any, rows: Any) -> bool:
    """Whether pre-ranking re-scores result pages (funnel.prerank_candidates) or retrieval's top."""
    mode = cfg.funnel.prerank_candidates
    if mode == "page" and not rows.pages:
        raise KarmaError(f"funnel.prerank_candidates=page: the requests in {cfg.data.prepared_dir} "
                         "carry no result pages (impressions); use retrieval or auto")
    return mode == "page" or (mode == "auto" and rows.pages)


def _protocol(encs: list[dict[str, Any]], checkpoints: list[Path]) -> dict[str, Any]:
    cfg, data, rows = encs[0]["cfg"], encs[0]["data"], encs[0]["rows"]
    f = cfg.funnel
    n_train, n_eval = len(rows.fit_rows()), len(rows.eval_rows())
    n_pages = len(rows.request_rows())
    if _on_pages(cfg, rows):
        candidates = (f"each request's result page (the clicked item and the items shown beside "
                      f"it, {len(rows) / n_pages:.1f} on average), ordered by u.e")
    else:
        candidates = f"top-{f.candidates} of recall per request"
    if f.ctr_fit == "valid":
        fit = (f"train rows = the valid requests, eval rows = the test requests (the checkpoint "
               f"trained on neither); {n_train} / {n_eval} rows")
    else:
        fit = (f"train rows = the last {f.train_window or 'all'} training requests per user, "
               f"eval rows = valid + test requests; {n_train} / {n_eval} rows")
    if rows.pages:
        impressions = "result pages: the clicked item = 1, the items shown beside it = 0"
    else:
        impressions = f"impressions = rated items, click = rating >= {f.click_rating:g}"
    query = ", query words" if any(rows.queries) else ""
    return {
        "checkpoints": [str(c) for c in checkpoints],
        "data": f"{cfg.data.source}, prepared_dir {cfg.data.prepared_dir}",
        "split_protocol": data.stats.get("protocol", ""),
        "users": len(encs[0]["test"]),
        "catalog_size": int(data.items.n_items),
        "recall": "test requests, full catalog, seen items masked, pessimistic ties, exact "
                  "inner product",
        "preranking": f"{candidates}, re-scored by s*u.e + a light MLP "
                      "over [u*e, u.e, log(1+train popularity)] (output layer zero at start: "
                      "the retrieval order), fitted on 4/5 of the valid requests, epoch "
                      f"(0..{f.prerank_epochs}) chosen on the other fifth, scored on the test "
                      "requests",
        "ranking": f"DeepFM (torch-rechub) on {impressions}; {fit} (eval click rate "
                   f"{rows.labels[rows.eval_rows()].mean():.3f}); "
                   f"{f.ctr_epochs} epochs; features: user, item, genres, history{query} "
                   "(+ u.e alone; + u, e, u.e)",
        "seeds": list(f.seeds),
        "features_rule": "every row's history (and so its u) ends before the row",
    }


def _cell(value: Any, digits: int = 4) -> str:
    if isinstance(value, dict):
        return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return f"{value:.{digits}f}"


def _mean(value: Any) -> float:
    return value["mean"] if isinstance(value, dict) else float(value)


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    """(stage, metric, one value per column) rows of the three-stage table."""
    cols = results["columns"]
    per = [results["stages"][c] for c in cols]
    out: list[tuple[str, str, list[Any]]] = []
    for key in per[0]["recall"]:
        if key.startswith(("hr@", "ndcg@")):
            out.append(("recall", key, [p["recall"][key] for p in per]))
    for key in per[0]["preranking"]:
        if key.startswith(("hr@", "ndcg@")) or key == "candidate_recall":
            out.append(("pre-ranking", key, [p["preranking"][key] for p in per]))
    base = results["ranking_base"]
    for key in RANKING_METRICS:
        out.append(("ranking", f"{key} without KARMA", [base[key]] * len(cols)))
        out.append(("ranking", f"{key} with u.e", [p["ranking_ue"][key] for p in per]))
        out.append(("ranking", f"{key} with u, e, u.e", [p["ranking_karma"][key] for p in per]))
    return out


def format_markdown(results: dict[str, Any]) -> str:
    cols = results["columns"]
    lines = ["# KARMA funnel: recall, pre-ranking, ranking", "", "```", "protocol"]
    for key, value in results["protocol"].items():
        lines.append(f"  {key:<15} {value}")
    lines += ["```", ""]
    head = "| stage | metric | " + " | ".join(cols) + (" | delta (2nd - 1st) |" if len(cols) == 2
                                                       else " |")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for stage, metric, values in table_rows(results):
        cells = " | ".join(_cell(v) for v in values)
        delta = f" | {_mean(values[1]) - _mean(values[0]):+.4f}" if len(values) == 2 else ""
        lines.append(f"| {stage} | {metric} | {cells}{delta} |")
    if results.get("runs", 1) > 1:
        seeds = (f"Mean ± std over {results['runs']} pairs of checkpoints trained with different "
                 "seeds, each pair scored with its own scorer seed (recall over the pairs; "
                 "pre-ranking and ranking over every scorer run). `without KARMA` is one model "
                 "per pair, identical in every column.")
    else:
        seeds = ("Mean ± std over the seeds of the trained scorers (pre-ranking, ranking); recall "
                 "has no seed. `without KARMA` is one model, identical in every column.")
    lines += ["", seeds, "", "![funnel](funnel.png)", ""]
    return "\n".join(lines)


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One three-stage table from `run_funnel` results over pairs of checkpoints trained with
    different seeds (same columns and data): recall becomes mean +- std over the runs, the
    trained scorers' values are pooled over every run and scorer seed."""
    first = runs[0]
    cols = first["columns"]
    for r in runs[1:]:
        if r["columns"] != cols or r["protocol"]["data"] != first["protocol"]["data"]:
            raise KarmaError(f"funnel runs to combine differ: columns {r['columns']} vs {cols}, "
                             f"data {r['protocol']['data']} vs {first['protocol']['data']}")

    def pooled(parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: _mean_std([v for p in parts for v in p[k]["values"]]) for k in parts[0]}

    stages = {
        c: {
            "recall": {k: _mean_std([r["stages"][c]["recall"][k] for r in runs])
                       for k in first["stages"][c]["recall"]},
            "preranking": pooled([r["stages"][c]["preranking"] for r in runs]),
            "ranking_ue": pooled([r["stages"][c]["ranking_ue"] for r in runs]),
            "ranking_karma": pooled([r["stages"][c]["ranking_karma"] for r in runs]),
        }
        for c in cols
    }
    protocol = {**first["protocol"], "checkpoints": [r["protocol"]["checkpoints"] for r in runs],
                "seeds": [r["protocol"]["seeds"] for r in runs]}
    return {"protocol": protocol, "columns": cols, "stages": stages, "runs": len(runs),
            "ranking_base": pooled([r["ranking_base"] for r in runs]),
            "wall_s": [r["wall_s"] for r in runs]}


def plot_funnel(results: dict[str, Any], path: Path) -> None:
    """Three panels (recall, pre-ranking, ranking), one bar per checkpoint, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(results)
    cols = results["columns"]
    panels = [
        ("recall", [r for r in rows if r[0] == "recall" and r[1].startswith("hr@")]),
        ("pre-ranking", [r for r in rows if r[0] == "pre-ranking" and r[1].startswith("hr@")]),
        ("ranking", [r for r in rows if r[0] == "ranking" and r[1].startswith(("auc", "gauc"))]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(cols)
    for ax, (title, prow) in zip(axes, panels):
        x = np.arange(len(prow))
        for j, col in enumerate(cols):
            means = [_mean(r[2][j]) for r in prow]
            errs = [r[2][j]["std"] if isinstance(r[2][j], dict) else 0.0 for r in prow]
            ax.bar(x + j * width, means, width, yerr=errs, label=col, capsize=3)
        ax.set_xticks(x + width * (len(cols) - 1) / 2)
        ax.set_xticklabels([r[1].replace(" with u, e, u.e", "\n+u, e, u.e").replace(
            " with u.e", "\n+u.e").replace(" without KARMA", "\nbase") for r in prow], fontsize=8)
        ax.set_title(title)
        if title == "ranking":
            lo = min(_mean(v) for r in prow for v in r[2])
            ax.set_ylim(max(0.0, lo - 0.05), None)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_funnel(
    checkpoint: str | Path,
    compare: str | Path | None = None,
    out_dir: str | Path = "runs/funnel",
    overrides: Sequence[str] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write funnel.json, funnel.md and funnel.png into `out_dir` and return the results.

    Both checkpoints must use the same prepared dataset (the same split); the column names are
    the checkpoints' loss presets (their paths when those coincide)."""
    from karma.ctr import ctr_features, train_and_score

    out = ensure_output_dir(out_dir, "--out")
    checkpoints = [Path(checkpoint)] + ([Path(compare)] if compare is not None else [])
    t0 = time.time()
    encs = [_encode_checkpoint(c, overrides, show_progress) for c in checkpoints]
    first = encs[0]
    for c, enc in zip(checkpoints[1:], encs[1:]):
        if enc["data"].stats.get("protocol") != first["data"].stats.get("protocol") or (
            enc["cfg"].data.source != first["cfg"].data.source
        ):
            raise KarmaError(
                f"--compare {c}: its prepared data (data.source, split protocol) differs from "
                f"--checkpoint {checkpoints[0]}'s; compare like with like"
            )
        if not np.array_equal(enc["rows"].items, first["rows"].items):
            raise KarmaError(f"--compare {c}: its CTR rows differ from --checkpoint's")
    names = [e["cfg"].loss.preset for e in encs]
    if len(set(names)) < len(names):
        names = [str(c) for c in checkpoints]
    stages = {name: _stages(enc, show_progress) for name, enc in zip(names, encs)}
    base_features = ctr_features(first["rows"], first["data"], None, None)
    base = _aggregate([
        train_and_score(base_features, first["rows"], first["data"].items.n_items, (), seed,
                        first["cfg"].funnel, show_progress)
        for seed in first["cfg"].funnel.seeds
    ])
    results = {
        "protocol": _protocol(encs, checkpoints),
        "columns": names,
        "stages": stages,
        "ranking_base": base,
        "wall_s": {"encode": [round(e["encode_s"], 1) for e in encs],
                   "total": round(time.time() - t0, 1)},
    }
    write_json_atomic(out / "funnel.json", results)
    write_text_atomic(out / "funnel.md", format_markdown(results))
    plot_funnel(results, out / "funnel.png")
    print(format_markdown(results))
    print(f"funnel written to {out}")
    return results


__all__ = ["combine_runs", "format_markdown", "plot_funnel", "run_funnel", "table_rows"]
