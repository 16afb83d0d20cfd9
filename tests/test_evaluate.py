"""evaluate_embeddings / evaluate_scores against a plain loop, the table, the checkpoint path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from karma.checkpoint import apply_checkpoint_overrides
from karma.config import Config
from karma.data import Examples
from karma.errors import KarmaError
from karma.evaluate import (
    evaluate_checkpoint,
    evaluate_embeddings,
    evaluate_scores,
    export_embeddings,
    format_metrics_table,
    select_users,
)
from karma.inference import encode_catalog, encode_users


def make_examples(rng: np.random.Generator, n_users: int, n_items: int) -> Examples:
    targets = rng.integers(0, n_items, size=n_users)
    seen = []
    for t in targets:
        s = rng.choice(n_items, size=rng.integers(0, n_items // 3), replace=False).tolist()
        if rng.random() < 0.2:
            s.append(int(t))  # repeat consumption: the target must stay rankable
        seen.append(s)
    return Examples(
        user_ids=[f"u{i}" for i in range(n_users)],
        histories=[s[-5:] for s in seen],
        targets=targets.astype(np.int64),
        queries=[""] * n_users,
        impressions=[[] for _ in range(n_users)],
        seen=seen,
        timestamps=np.zeros(n_users, dtype=np.int64),
    )


def loop_metrics(scores: np.ndarray, examples: Examples, ks: list[int], mask: bool) -> dict:
    """Reference: pessimistic rank over the whole row by plain Python loops."""
    out = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg", "mrr")}
    n = len(examples)
    for u in range(n):
        t = int(examples.targets[u])
        masked = set(examples.seen[u]) - {t} if mask else set()
        rank = sum(
            1 for j in range(scores.shape[1])
            if j != t and j not in masked and scores[u, j] >= scores[u, t]
        )
        for k in ks:
            if rank < k:
                out[f"hr@{k}"] += 1 / n
                out[f"ndcg@{k}"] += 1 / math.log2(rank + 2) / n
                out[f"mrr@{k}"] += 1 / (rank + 1) / n
    return out


def config(**eval_values) -> Config:
    cfg = Config()
    cfg.eval.ks = [1, 5, 10, 50]
    for key, value in eval_values.items():
        setattr(cfg.eval, key, value)
    return cfg


@pytest.mark.parametrize("seed", range(3))
def test_embeddings_and_scores_match_loop_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 40
    # 0/1 vectors in 4 dims: only 16 distinct items, so exact score ties are everywhere
    item_emb = rng.integers(0, 2, size=(n_items, 4)).astype(np.float32)
    user_emb = rng.integers(0, 3, size=(n_users, 4)).astype(np.float32)
    examples = make_examples(rng, n_users, n_items)
    cfg = config(batch_size=16)
    scores = user_emb @ item_emb.T
    from_emb = evaluate_embeddings(user_emb, item_emb, examples, cfg, print_table=False,
                                   show_progress=False)
    from_scores = evaluate_scores(scores, examples, cfg, print_table=False)
    for name, mask in (("masked", True), ("unmasked", False)):
        want = loop_metrics(scores, examples, cfg.eval.ks, mask)
        for key, value in want.items():
            assert from_emb["metrics"][name][key] == pytest.approx(value, abs=1e-9), (name, key)
            assert from_scores["metrics"][name][key] == pytest.approx(value, abs=1e-9), (name, key)
    # K = 50 exceeds the 40-item catalog and the target is never masked: always a hit
    assert from_emb["metrics"]["masked"]["hr@50"] == 1.0
    # masking seen items can only move targets up
    assert from_emb["metrics"]["masked"]["hr@10"] >= from_emb["metrics"]["unmasked"]["hr@10"]
    protocol = from_emb["protocol"]
    assert protocol["catalog_size"] == n_items and protocol["users"] == n_users
    assert protocol["split"] == "test" and protocol["index"]["kind"] == "exact"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_is_exact_when_it_probes_everything(kind: str) -> None:
    rng = np.random.default_rng(7)
    item_emb = rng.normal(size=(200, 16)).astype(np.float32)
    user_emb = rng.normal(size=(30, 16)).astype(np.float32)
    examples = make_examples(rng, 30, 200)
    exact = evaluate_embeddings(user_emb, item_emb, examples, config(), print_table=False,
                                show_progress=False)
    # ef_search >= catalog / nprobe == nlist: the search visits every item
    cfg = config(index=kind, hnsw_ef_search=400, ivf_nlist=4, ivf_nprobe=4)
    approx = evaluate_embeddings(user_emb, item_emb, examples, cfg, print_table=False,
                                 show_progress=False)
    assert approx["metrics"] == exact["metrics"]
    assert approx["protocol"]["index"]["kind"] == kind


def test_table_is_headed_by_the_protocol(capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(3)
    examples = make_examples(rng, 20, 30)
    results = evaluate_embeddings(
        rng.normal(size=(20, 8)), rng.normal(size=(30, 8)), examples, config(mask_history=False),
        protocol={"checkpoint": "runs/x/best"}, show_progress=False,
    )
    printed = capsys.readouterr().out
    assert list(results["metrics"]) == ["unmasked", "masked"]  # primary setting first
    header, _, table = printed.partition("metric")
    for text in ("split", "test", "catalog_size", "30", "users", "20", "runs/x/best",
                 "pessimistic", "query_mode", "seed"):
        assert text in header
    assert f"{results['metrics']['masked']['ndcg@10']:.4f}" in table
    rows = [line.split()[0] for line in table.splitlines()[1:]]
    assert rows[:4] == ["hr@1", "hr@5", "hr@10", "hr@50"] and "mrr@10" in rows
    # arbitrary columns (baselines side by side) and missing cells
    text = format_metrics_table({"pop": {"hr@10": 0.1}, "karma": {"hr@10": 0.2, "ndcg@10": 0.1}})
    assert "0.1000" in text and "0.2000" in text and "-" in text.splitlines()[-1]


def test_select_users_is_a_consistent_seeded_subset() -> None:
    examples = make_examples(np.random.default_rng(4), 50, 30)
    sub = select_users(examples, 10)
    assert len(sub) == 10 and isinstance(sub, Examples)
    assert sub.user_ids == select_users(examples, 10).user_ids  # deterministic
    for i, uid in enumerate(sub.user_ids):
        j = examples.user_ids.index(uid)
        assert sub.targets[i] == examples.targets[j] and sub.seen[i] == examples.seen[j]
    assert select_users(examples, 0) is examples


def test_bad_inputs() -> None:
    rng = np.random.default_rng(5)
    examples = make_examples(rng, 10, 20)
    with pytest.raises(KarmaError, match="must match"):
        evaluate_embeddings(np.ones((9, 4)), np.ones((20, 4)), examples, config(),
                            print_table=False)
    examples.targets[3] = 25
    with pytest.raises(KarmaError, match="example row 3: field 'target'"):
        evaluate_scores(np.ones((10, 20)), examples, config(), print_table=False)
    with pytest.raises(KarmaError, match="'model.emb_dim' is fixed"):
        apply_checkpoint_overrides(Config(), ["model.emb_dim=8"])
    with pytest.raises(KarmaError, match="'loss.preset' is fixed"):
        apply_checkpoint_overrides(Config(), ["loss.preset=karma"])
    assert apply_checkpoint_overrides(Config(), ["eval.split=valid"]).eval.split == "valid"
    assert apply_checkpoint_overrides(Config(), ["analysis.seed=3"]).analysis.seed == 3


def write_tiny_dataset(root: Path, n_items: int = 24, n_users: int = 10) -> Path:
    """items.csv + interactions.csv for `data.source=files` (6 interactions per user)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror"]
    items = ["item_id,title,year,category"] + [
        f"m{i},Movie {i},{1980 + i},{genres[i % 4]}" for i in range(n_items)
    ]
    (root / "items.csv").write_text("\n".join(items) + "\n")
    rows = ["user_id,item_id,timestamp"]
    for u in range(n_users):
        for t, i in enumerate(rng.permutation(n_items)[:6]):
            rows.append(f"u{u},m{i},{1000 * u + t}")
    (root / "interactions.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config]:
    from karma.checkpoint import save_checkpoint
    from karma.config import load_config
    from karma.data import prepare_dataset
    from karma.model import build_model

    root = tmp_path_factory.mktemp("eval")
    data = write_tiny_dataset(root / "raw")
    cfg = load_config(None, [
        "data.source=files", f"data.items_path={data / 'items.csv'}",
        f"data.interactions_path={data / 'interactions.csv'}",
        f"data.prepared_dir={root / 'prepared'}", "data.max_history=5",
        "model.backbone=tiny-random", "model.emb_dim=16", "model.max_item_tokens=16",
        "eval.ks=[1,5,10]", "eval.batch_size=4",
    ])
    prepare_dataset(cfg)
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", build_model(cfg).eval(), None, None, 0, cfg)
    return root / "ckpt", cfg


def test_evaluate_checkpoint_matches_direct_scoring(tiny_checkpoint, tmp_path: Path) -> None:
    from karma.checkpoint import load_model
    from karma.data import load_prepared

    ckpt, cfg = tiny_checkpoint
    results = evaluate_checkpoint(ckpt, ["eval.split=valid"], out_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == results["metrics"]
    protocol = saved["protocol"]
    assert protocol["split"] == "valid" and protocol["users"] == 10
    assert protocol["catalog_size"] == 24 and protocol["checkpoint"] == str(ckpt)
    assert "leave-one-out" in protocol["split_protocol"]
    # the same numbers from the model's own embeddings scored densely (no index)
    model, _ = load_model(ckpt)
    data = load_prepared(cfg.data.prepared_dir)
    examples = data.split("valid")
    catalog = encode_catalog(model, data.items.texts, batch_size=4)
    user_emb = encode_users(model, examples.histories, examples.queries, catalog, data.items.texts)
    cfg.eval.split = "valid"
    direct = evaluate_scores(user_emb @ catalog.item_emb.T, examples, cfg, print_table=False)
    for name in ("masked", "unmasked"):
        for key, value in direct["metrics"][name].items():
            assert results["metrics"][name][key] == pytest.approx(value, abs=1e-9), (name, key)
    # a seeded subset of users
    sub = evaluate_checkpoint(ckpt, ["eval.max_users=4"], out_dir=tmp_path / "sub")
    assert sub["protocol"]["users"] == 4 and "of 10" in sub["protocol"]["users_note"]
    # the query's hard filter only removes items other than the target: never a lower hit rate
    filtered = evaluate_checkpoint(ckpt, ["eval.split=valid", "eval.query_filter=true"],
                                   out_dir=tmp_path / "filtered")
    assert "query_filter" in filtered["protocol"]
    for key, value in results["metrics"]["masked"].items():
        if key.startswith("hr@"):
            assert filtered["metrics"]["masked"][key] >= value, key


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_export_embeddings(tiny_checkpoint, tmp_path: Path, fmt: str) -> None:
    import pyarrow.parquet as pq

    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.index import load_index, search

    ckpt, cfg = tiny_checkpoint
    out = export_embeddings(ckpt, tmp_path / "export", fmt=fmt)
    if fmt == "parquet":
        items = pq.read_table(out / "items.parquet").to_pydict()
        users = pq.read_table(out / "users.parquet").to_pydict()
        item_emb, item_ids = np.array(items["embedding"]), items["item_id"]
        user_emb, user_ids = np.array(users["embedding"]), users["user_id"]
        assert items["item_idx"] == list(range(24))
    else:
        item_emb, user_emb = np.load(out / "item_emb.npy"), np.load(out / "user_emb.npy")
        item_ids = json.loads((out / "item_ids.json").read_text())
        user_ids = json.loads((out / "user_ids.json").read_text())
    data = load_prepared(cfg.data.prepared_dir)
    assert item_ids == data.items.item_ids and user_ids == data.split("test").user_ids
    assert item_emb.shape == (24, 16) and user_emb.shape == (10, 16)
    model, _ = load_model(ckpt)
    want = encode_catalog(model, data.items.texts, batch_size=4).item_emb.numpy()
    np.testing.assert_allclose(item_emb, want, atol=1e-5)
    index = load_index(out / "index")
    _, rows = search(index, user_emb, 3, show_progress=False)
    np.testing.assert_array_equal(rows, np.argsort(-(user_emb @ item_emb.T), axis=1)[:, :3])
    assert index.item_ids.tolist() == item_ids
    assert json.loads((out / "export.json").read_text())["n_users"] == 10
