"""Full-catalog retrieval evaluation (`karma eval`) and embedding export (`karma export`).

    karma eval --checkpoint runs/train/checkpoints/best eval.split=valid eval.index=hnsw
    karma export --checkpoint runs/train/checkpoints/best --out runs/export --format npy

From Python (baselines reuse the second half with their own embeddings or scores):

    results = evaluate_checkpoint("runs/train/checkpoints/best", ["eval.max_users=200"])
    results = evaluate_embeddings(user_emb, item_emb, examples, cfg, protocol={"method": "sasrec"})
    results = evaluate_scores(scores, examples, cfg, protocol={"method": "popularity"})
    results["metrics"]["masked"]["hr@10"], results["protocol"]["catalog_size"]
    print(format_metrics_table({"karma": m1, "sasrec": m2}, protocol))

Every user of the split is ranked against the WHOLE catalog by inner product (FAISS index of kind
`eval.index`; the embeddings are used as given, not re-normalized). Metrics are computed twice:
`masked` (items the user saw before the target are removed, the target never is) and `unmasked`;
ties are broken pessimistically (see karma/metrics.py). The returned dict, written as
`metrics.json`, is `{"protocol": {...}, "metrics": {"masked": {...}, "unmasked": {...}}}`, and the
table printed with it is headed by the protocol (split, masking, query mode, catalog size, users,
seed, checkpoint) so that no number is ever read without its protocol.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from karma.atomic import ensure_output_dir, write_json_atomic
from karma.config import Config, config_to_dict
from karma.errors import KarmaError
from karma.index import build_index, search, torch_topk_search
from karma.metrics import compute_metrics, mean_pairwise_cosine, rank_with_mask

VAL_KS = (10,)  # what the training loop's validation reports
TIE_BREAK = "pessimistic (target ranked after every item with an equal score)"
MASKING = "masked = seen items removed except the target; unmasked = nothing removed"


@torch.no_grad()
def validate(model: torch.nn.Module, data: Any, rows: np.ndarray, cfg: Config) -> dict[str, float]:
    """Periodic validation of the training loop: HR@10 / NDCG@10 / MRR@10 of `rows` of the
    valid split, exact dot product over the full catalog (no index to build).

    Items the user saw before the target are masked when eval.mask_history is set (the target
    itself never is), with karma.metrics' pessimistic tie rule.
    """
    from karma.inference import catalog_from_history_cache, encode_catalog, encode_users

    was_training = model.training
    model.eval()
    valid = data.split("valid")
    item_texts = list(data.items.texts)
    histories = [list(valid.histories[i]) for i in rows]
    queries = [valid.queries[i] for i in rows]
    targets = np.asarray(valid.targets)[rows].astype(np.int64)
    seen = [list(valid.seen[i]) for i in rows] if cfg.eval.mask_history else None
    catalog = catalog_from_history_cache(model) or encode_catalog(
        model, item_texts, batch_size=cfg.eval.batch_size,
        image_features=data.model_image_features(cfg.model.image_dim),
    )
    user_emb = encode_users(
        model, histories, queries, catalog, item_texts, batch_size=cfg.eval.batch_size
    )  # (U, k)
    item_emb = torch.as_tensor(catalog.item_emb).float().cpu()  # (N, k)
    scores = torch.as_tensor(user_emb).float().cpu() @ item_emb.T  # (U, N)
    # one more than max(K) so that the tie rule is exact at K (see karma.metrics)
    top_scores, top_ids = rank_with_mask(scores, max(VAL_KS) + 1, seen=seen, targets=targets)
    model.train(was_training)
    return compute_metrics(top_ids, targets, VAL_KS, scores=top_scores)


def select_users(examples: Any, max_users: int, seed: int = 0) -> Any:
    """All examples when `max_users` is 0 or covers them, else a seeded sample in file order.

    `examples` is a dataclass of per-example lists / arrays (`karma.data.Examples`).
    """
    n = len(examples)
    if max_users <= 0 or max_users >= n:
        return examples
    # a fixed seed (not the training seed) so every method is scored on the same users
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max_users, replace=False))
    subset = {}
    for f in dataclasses.fields(examples):
        value = getattr(examples, f.name)
        subset[f.name] = value[keep] if isinstance(value, np.ndarray) else [value[i] for i in keep]
    return dataclasses.replace(examples, **subset)


def _check_examples(examples: Any, n_users: int, n_items: int) -> tuple[np.ndarray, list]:
    targets = np.asarray(examples.targets, dtype=np.int64)
    seen = list(examples.seen)
    if len(targets) != n_users or len(seen) != n_users:
        raise KarmaError(
            f"{n_users} user embeddings/score rows but {len(targets)} examples: they must match"
        )
    if n_users == 0:
        raise KarmaError("the evaluation split has no examples")
    bad = np.flatnonzero((targets < 0) | (targets >= n_items))
    if len(bad):
        raise KarmaError(
            f"example row {bad[0]}: field 'target' = {targets[bad[0]]} is not an item_idx in "
            f"[0, {n_items})"
        )
    return targets, seen


def _exclude_lists(seen: list, targets: np.ndarray) -> list[list[int]]:
    """Seen items minus the target: the target is never masked (karma/metrics.py)."""
    return [[int(i) for i in s if int(i) != int(t)] for s, t in zip(seen, targets)]


def _finish(
    metrics: dict[str, dict[str, float]],
    protocol: dict[str, Any],
    print_table: bool,
) -> dict[str, Any]:
    results = {"protocol": protocol, "metrics": metrics}
    if print_table:
        print(format_metrics_table(metrics, protocol))
    return results


def base_protocol(cfg: Config, n_users: int, n_items: int, **extra: Any) -> dict[str, Any]:
    """The protocol fields shared by every evaluation (extra keys are added or override)."""
    protocol = {
        "split": cfg.eval.split,
        "masking": MASKING,
        "primary": "masked" if cfg.eval.mask_history else "unmasked",
        "query_mode": cfg.data.query_mode,
        "catalog_size": int(n_items),
        "users": int(n_users),
        "ranking": "full catalog",
        "tie_break": TIE_BREAK,
        "seed": cfg.train.seed,
        "data_seed": cfg.data.seed,
        "ks": sorted(set(cfg.eval.ks)),
    }
    protocol.update(extra)
    return protocol


def build_index_from_config(item_emb: Any, cfg: Config, **extra: Any) -> Any:
    """`karma.index.build_index` with the `eval.*` index settings (embeddings used as given)."""
    return build_index(
        item_emb,
        cfg.eval.index,
        normalize=False,
        hnsw_m=cfg.eval.hnsw_m,
        ef_search=cfg.eval.hnsw_ef_search,
        ef_construction=cfg.eval.hnsw_ef_construction,
        nlist=cfg.eval.ivf_nlist,
        nprobe=cfg.eval.ivf_nprobe,
        seed=cfg.data.seed,
        **extra,
    )


QUERY_FILTER = "only items with every category the query names (eval.query_filter)"


def evaluate_embeddings(
    user_emb: np.ndarray | torch.Tensor,
    item_emb: np.ndarray | torch.Tensor,
    examples: Any,
    cfg: Config,
    protocol: dict[str, Any] | None = None,
    print_table: bool = True,
    show_progress: bool = True,
    cold: np.ndarray | None = None,
    other_user_emb: np.ndarray | torch.Tensor | None = None,
    item_filter: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Rank the full catalog for every user by `user_emb @ item_emb.T` and compute the metrics.

    user_emb: (U, k), one row per example of `examples` (anything with `targets` (U,) item_idx
    and `seen` (U lists of item_idx), e.g. `karma.data.Examples`); item_emb: (N, k) in item_idx
    order. The index is `cfg.eval.index`; exact search on a CUDA machine whose FAISS has no GPU
    support uses `torch_topk_search` instead. `protocol` adds fields (checkpoint, method, ...).
    cold (U,) bool adds a "cold" column: the primary setting on those rows only (see
    `cold_rows`); other_user_emb (U, k) adds "other history": the primary setting scored with
    embeddings built from another user's history (the personalization check). item_filter (U
    lists of item_idx) removes those items in every setting (a query filter; never the target).
    """
    import faiss

    n_items, n_users = len(item_emb), len(user_emb)
    targets, seen = _check_examples(examples, n_users, n_items)
    ks = sorted(set(cfg.eval.ks))
    # one more than max(ks): the pessimistic tie rule is then exact at every K (karma/metrics.py)
    k_fetch = max(ks) + 1
    exclude = _exclude_lists(seen, targets)
    unmasked: list | None = None
    if item_filter is not None:
        if len(item_filter) != n_users:
            raise KarmaError(f"item_filter has {len(item_filter)} lists for {n_users} users")
        unmasked = _exclude_lists(item_filter, targets)
        exclude = [sorted(set(e) | set(f)) for e, f in zip(exclude, unmasked)]
    use_torch = (
        cfg.eval.index == "exact"
        and torch.cuda.is_available()
        and not hasattr(faiss, "StandardGpuResources")
    )
    index_info: dict[str, Any] = {"kind": cfg.eval.index}
    if use_torch:
        index_info["backend"] = "torch cuda"

        def rank(users: Any, excl: list | None) -> tuple[Any, Any]:
            return torch_topk_search(
                item_emb, users, k_fetch, exclude=excl, show_progress=show_progress
            )
    else:
        index = build_index_from_config(item_emb, cfg)
        index_info.update(index.params)
        index_info["backend"] = "faiss gpu" if index.gpu_index is not None else "faiss cpu"

        def rank(users: Any, excl: list | None) -> tuple[Any, Any]:
            return search(
                index, users, k_fetch, cfg.eval.batch_size, exclude=excl,
                show_progress=show_progress,
            )
    metrics, ranked = {}, {}
    for name, excl in (("masked", exclude), ("unmasked", unmasked)):
        scores, ids = ranked[name] = rank(user_emb, excl)
        metrics[name] = compute_metrics(ids, targets, ks, scores=scores)
    primary = "masked" if cfg.eval.mask_history else "unmasked"
    extra: dict[str, Any] = {}
    if cold is not None:
        rows = np.flatnonzero(np.asarray(cold, dtype=bool))
        extra["cold_users"] = int(rows.size)
        if rows.size:
            scores, ids = ranked[primary]
            metrics["cold"] = compute_metrics(
                np.asarray(ids)[rows], targets[rows], ks, scores=np.asarray(scores)[rows]
            )
    if other_user_emb is not None:
        scores, ids = rank(other_user_emb, exclude if primary == "masked" else unmasked)
        metrics["other history"] = compute_metrics(ids, targets, ks, scores=scores)
    full_protocol = base_protocol(
        cfg, n_users, n_items, index=index_info, **extra, **(protocol or {})
    )
    return _finish(_ordered(metrics, full_protocol), full_protocol, print_table)


def cold_rows(data: Any, examples: Any, threshold: int) -> np.ndarray | None:
    """(U,) bool: the examples whose target was a training target fewer than `threshold` times
    (never, for most of them on MovieLens): where an ID model has little to go on and an LLM's
    knowledge of the text must carry the ranking. None when threshold is 0."""
    if threshold <= 0:
        return None
    return target_counts(data)[np.asarray(examples.targets, dtype=np.int64)] < threshold


def target_counts(data: Any) -> np.ndarray:
    """(n_items,) how often each item is a training target."""
    targets = np.asarray(data.split("train").targets, dtype=np.int64)
    return np.bincount(targets, minlength=data.items.n_items)


def query_filter(data, examples) -> list[list[int]] | None:
    """Per example, the items that lack a category its query names (`eval.query_filter`). An
    ID baseline ranking only the items that match a genre query is the query-aware baseline of
    the search setting; a model with the filter shows what it adds to it. None when no example
    has a query. A synthesized query's categories are drawn from the target's, so the target
    always matches (and `evaluate_embeddings` never hides it)."""
    from karma.split import category_matrix, query_items

    if not any(examples.queries):
        return None
    matrix, columns = category_matrix(data.items.categories)
    hidden: dict[str, list[int]] = {}
    for query in set(examples.queries):
        hidden[query] = np.flatnonzero(~query_items(matrix, columns, query)).tolist()
    return [hidden[query] for query in examples.queries]


def other_histories(examples: Any, seed: int = 0) -> np.ndarray:
    """A seeded permutation of the rows without fixed points: row b is scored with the history
    of row perm[b] (its own query, target and seen-mask kept)."""
    n = len(examples)
    rng = np.random.default_rng(seed)
    if n < 2:
        return np.arange(n)
    # a random cyclic shift of a random order moves every row
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = order[np.roll(np.arange(n), 1)]
    return perm


def evaluate_scores(
    scores: np.ndarray | torch.Tensor,
    examples: Any,
    cfg: Config,
    protocol: dict[str, Any] | None = None,
    print_table: bool = True,
) -> dict[str, Any]:
    """Like `evaluate_embeddings` for a dense (U, N) score matrix over the full catalog.

    For scorers that are not an inner product (popularity counts, a cross-encoder). Same masking,
    tie rule, output and table; `protocol["index"]` says "dense scores".
    """
    scores = torch.as_tensor(scores).float()
    n_users, n_items = scores.shape
    targets, seen = _check_examples(examples, n_users, n_items)
    ks = sorted(set(cfg.eval.ks))
    metrics = {}
    for name, excl in (("masked", seen), ("unmasked", None)):
        top_scores, top_ids = rank_with_mask(scores, max(ks) + 1, seen=excl, targets=targets)
        metrics[name] = compute_metrics(top_ids, targets, ks, scores=top_scores)
    full_protocol = base_protocol(
        cfg, n_users, n_items, index={"kind": "dense scores"}, **(protocol or {})
    )
    return _finish(_ordered(metrics, full_protocol), full_protocol, print_table)


def _ordered(metrics: dict[str, dict[str, float]], protocol: dict[str, Any]) -> dict:
    """The primary setting (eval.mask_history) first, so tables and JSON lead with it."""
    primary = protocol["primary"]
    return {primary: metrics[primary], **{k: v for k, v in metrics.items() if k != primary}}


def format_metrics_table(
    results: dict[str, dict[str, float]], protocol: dict[str, Any] | None = None
) -> str:
    """A plain-text table: protocol header lines, then one row per metric, one column per setting.

    results: {column name: {metric key: value}}, e.g. {"masked": {...}, "unmasked": {...}} or
    {"popularity": {...}, "karma": {...}}; the full `evaluate_*` output is accepted too.
    """
    if "metrics" in results and "protocol" in results:
        protocol = protocol or results["protocol"]
        results = results["metrics"]
    lines = []
    if protocol:
        order = [
            "checkpoint",
            "method",
            "split",
            "users",
            "catalog_size",
            "ranking",
            "query_mode",
            "masking",
            "primary",
            "tie_break",
            "index",
            "seed",
            "data_seed",
        ]
        keys = [k for k in order if k in protocol] + [
            k for k in protocol if k not in order and k != "ks"
        ]
        lines.append("protocol")
        for key in keys:
            value = protocol[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            lines.append(f"  {key:<15} {value}")
    columns = list(results)
    metric_keys = list(dict.fromkeys(k for col in columns for k in results[col]))

    # group by metric family (hr, ndcg, mrr), each by increasing K
    def sort_key(key: str) -> tuple[int, int]:
        name, _, k = key.partition("@")
        family = {"hr": 0, "recall": 1, "ndcg": 2, "mrr": 3}.get(name, 4)
        return family, int(k) if k.isdigit() else 0

    metric_keys.sort(key=sort_key)
    width = max([len(c) for c in columns] + [8])
    lines.append(f"{'metric':<10}" + "".join(f"  {c:>{width}}" for c in columns))
    for key in metric_keys:
        cells = "".join(
            f"  {results[c][key]:>{width}.4f}" if key in results[c] else f"  {'-':>{width}}"
            for c in columns
        )
        lines.append(f"{key:<10}{cells}")
    return "\n".join(lines)


def _load_for_eval(checkpoint: str | Path, overrides: Sequence[str] | None):
    """(model, cfg, prepared data, examples of cfg.eval.split) for a checkpoint."""
    from karma.checkpoint import load_model
    from karma.data import load_or_prepare

    model, cfg = load_model(checkpoint, overrides)
    data = load_or_prepare(cfg)
    model.set_image_table(data.model_image_features(cfg.model.image_dim))
    if cfg.eval.split not in ("train", "valid", "test"):
        raise KarmaError(f"eval.split: expected train, valid or test, got '{cfg.eval.split}'")
    examples = data.split(cfg.eval.split)
    if cfg.eval.id_min_count > 0:
        model.restrict_item_ids(torch.as_tensor(target_counts(data) >= cfg.eval.id_min_count))
    return model, cfg, data, examples


def _encode(model: Any, data: Any, examples: Any, batch_size: int) -> tuple[Any, np.ndarray]:
    from karma.inference import encode_catalog, encode_users

    catalog = encode_catalog(
        model, data.items.texts, batch_size=batch_size,
        image_features=data.model_image_features(model.cfg.model.image_dim),
    )
    user_emb = encode_users(
        model, examples.histories, examples.queries, catalog, data.items.texts, batch_size,
        progress=True,
    )
    return catalog, np.asarray(torch.as_tensor(user_emb).float().cpu(), dtype=np.float32)


@torch.no_grad()
def catalog_geometry(model: Any, catalog: Any) -> dict[str, float]:
    """Mean pairwise cosine of the item embeddings e_i and, for the continuous interface, of the
    history tokens x_i = P_h(condition(h_i)) over the catalog: near 1.0 means the model cannot
    tell items apart (the collapse the personalization work measures)."""
    out = {"item_emb_cos": mean_pairwise_cosine(catalog.item_emb)}
    if model.cfg.model.interface == "continuous":
        hidden = catalog.item_hidden.to(model.device, model.special_embeds.dtype)
        out["history_token_cos"] = mean_pairwise_cosine(
            model.history_proj(model.condition(hidden)).cpu()
        )
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    overrides: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Encode the catalog and the users of `eval.split`, rank the full catalog, write metrics.json.

    overrides: dotted overrides a trained checkpoint allows (`karma.checkpoint.load_model`, e.g.
    `eval.split=valid`, `data.prepared_dir=runs/data/ml-100k-noquery`). out_dir defaults to the
    checkpoint directory.
    """
    checkpoint = Path(checkpoint)
    model, cfg, data, examples = _load_for_eval(checkpoint, overrides)
    examples = select_users(examples, cfg.eval.max_users)
    catalog, user_emb = _encode(model, data, examples, cfg.eval.batch_size)
    protocol = {
        "checkpoint": str(checkpoint),
        "interface": cfg.model.interface,
        "loss_preset": cfg.loss.preset,
        "prepared_dir": cfg.data.prepared_dir,
        "query_mode": data.stats.get("query_mode", cfg.data.query_mode),
        "split_protocol": data.stats.get("protocol", ""),
    }
    n_split = len(data.split(cfg.eval.split))
    if len(examples) < n_split:
        protocol["users_note"] = f"seeded sample (eval.max_users) of {n_split} users"
    other = None
    if cfg.eval.other_history:
        from karma.inference import encode_users

        perm = other_histories(examples)
        if any(examples.queries):
            other = encode_users(
                model, [examples.histories[j] for j in perm], examples.queries, catalog,
                data.items.texts, cfg.eval.batch_size, progress=True,
            )
        else:  # without a query a prompt is its history alone: user j's embedding, unchanged
            other = user_emb[perm]
        protocol["other_history"] = "seeded permutation of the users' histories (seed 0)"
    if cfg.eval.id_min_count > 0:
        protocol["id_min_count"] = (
            f"ID embeddings only for items a training target >= {cfg.eval.id_min_count} times"
        )
    cold = cold_rows(data, examples, cfg.eval.cold_threshold)
    if cold is not None:
        protocol["cold_threshold"] = f"target a training target < {cfg.eval.cold_threshold} times"
    item_filter = query_filter(data, examples) if cfg.eval.query_filter else None
    if item_filter is not None:
        protocol["query_filter"] = QUERY_FILTER
    results = evaluate_embeddings(
        user_emb, np.asarray(catalog.item_emb), examples, cfg, protocol, cold=cold,
        other_user_emb=other, item_filter=item_filter,
    )
    results["geometry"] = catalog_geometry(model, catalog)
    results["config"] = {"eval": config_to_dict(cfg)["eval"], "data": config_to_dict(cfg)["data"]}
    out = Path(out_dir) if out_dir is not None else checkpoint
    write_json_atomic(out / "metrics.json", results)
    print(f"metrics written to {out / 'metrics.json'}")
    return results


def export_embeddings(
    checkpoint: str | Path,
    out_dir: str | Path,
    fmt: str = "parquet",
    overrides: Sequence[str] | None = None,
) -> Path:
    """Write item embeddings (with the item_id map), user embeddings of `eval.split` (with the
    user_id map) and the saved `eval.index` index into `out_dir`.

    parquet: `items.parquet` (item_idx, item_id, embedding), `users.parquet` (user_id, embedding).
    npy: `item_emb.npy` + `item_ids.json`, `user_emb.npy` + `user_ids.json`. Both: `index/`
    (karma.index.save_index) and `export.json` (checkpoint, split, counts, dim).
    """
    from karma.index import save_index

    if fmt not in ("parquet", "npy"):
        raise KarmaError(f"export format must be parquet or npy, got '{fmt}'")
    out = ensure_output_dir(out_dir, "--out")
    model, cfg, data, examples = _load_for_eval(checkpoint, overrides)
    catalog, user_emb = _encode(model, data, examples, cfg.eval.batch_size)
    item_emb = np.asarray(catalog.item_emb, dtype=np.float32)  # (N, k)
    item_ids = [str(i) for i in data.items.item_ids]
    user_ids = [str(u) for u in examples.user_ids]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        def emb_column(emb: np.ndarray) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])

        items = pa.table(
            {
                "item_idx": pa.array(np.arange(len(item_ids), dtype=np.int32)),
                "item_id": pa.array(item_ids, pa.string()),
                "embedding": emb_column(item_emb),
            }
        )
        users = pa.table(
            {"user_id": pa.array(user_ids, pa.string()), "embedding": emb_column(user_emb)}
        )
        pq.write_table(items, out / "items.parquet")
        pq.write_table(users, out / "users.parquet")
    else:
        np.save(out / "item_emb.npy", item_emb)
        np.save(out / "user_emb.npy", user_emb)
        (out / "item_ids.json").write_text(json.dumps(item_ids))
        (out / "user_ids.json").write_text(json.dumps(user_ids))
    index = build_index_from_config(item_emb, cfg, item_ids=item_ids, use_gpu=False)
    save_index(index, out / "index")
    meta = {
        "checkpoint": str(checkpoint),
        "split": cfg.eval.split,
        "format": fmt,
        "n_items": len(item_ids),
        "n_users": len(user_ids),
        "dim": int(item_emb.shape[1]),
        "prepared_dir": cfg.data.prepared_dir,
    }
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    print(f"exported {len(item_ids)} item and {len(user_ids)} user embeddings to {out}")
    return out
