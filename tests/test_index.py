"""FAISS index kinds, exclusion, save/load and the torch top-k, against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from karma.errors import KarmaError
from karma.index import (
    build_index,
    filter_excluded,
    load_index,
    save_index,
    search,
    torch_topk_search,
)


def normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(items: np.ndarray, queries: np.ndarray, k: int, exclude=None):
    """Plain loop reference: per query, sort all non-excluded items by score."""
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for u, q in enumerate(queries):
        banned = set(exclude[u]) if exclude is not None else set()
        cand = [j for j in range(len(items)) if j not in banned]
        cand.sort(key=lambda j: -float(items[j] @ q))
        ids[u, : min(k, len(cand))] = cand[:k]
    return ids


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    items = normalized(rng.normal(size=(300, 16)))
    queries = normalized(rng.normal(size=(37, 16)))
    exclude = [rng.choice(300, size=rng.integers(0, 40), replace=False).tolist() for _ in range(37)]
    return items, queries, exclude


@pytest.mark.parametrize("use_exclude", [False, True])
def test_exact_faiss_and_torch_match_brute_force(data, use_exclude: bool) -> None:
    items, queries, exclude = data
    exclude = exclude if use_exclude else None
    want = brute_force(items, queries, 25, exclude)
    index = build_index(items, "exact")
    scores, ids = search(index, queries, 25, batch_size=8, exclude=exclude, show_progress=False)
    np.testing.assert_array_equal(ids, want)
    t_scores, t_ids = torch_topk_search(
        items, queries, 25, batch_size=5, exclude=exclude, show_progress=False
    )
    np.testing.assert_array_equal(t_ids, want)
    np.testing.assert_allclose(scores, t_scores, atol=1e-5)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, want, 1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_k_larger_than_catalog_and_everything_excluded() -> None:
    rng = np.random.default_rng(1)
    items = normalized(rng.normal(size=(6, 4)))
    queries = normalized(rng.normal(size=(3, 4)))
    exclude = [[0, 1], list(range(6)), []]
    index = build_index(items)
    for scores, ids in (
        search(index, queries, 10, exclude=exclude, show_progress=False),
        torch_topk_search(items, queries, 10, exclude=exclude, show_progress=False),
    ):
        assert ids.shape == (3, 10)
        assert (ids >= 0).sum(axis=1).tolist() == [4, 0, 6]
        assert np.isneginf(scores[ids < 0]).all()
        assert not set(ids[0].tolist()) & {0, 1}


def test_normalize_flag_changes_ranking_as_documented() -> None:
    items = np.array([[1.0, 0.0], [10.0, 10.0]], dtype=np.float32)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    # cosine prefers item 0, raw inner product item 1 (10 > 1)
    assert search(build_index(items), query, 1, show_progress=False)[1][0, 0] == 0
    raw = build_index(items, normalize=False)
    assert search(raw, query, 1, show_progress=False)[1][0, 0] == 1


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    assign = rng.integers(0, len(centers), size=n)
    return normalized(centers[assign] + 0.3 * rng.normal(size=(n, dim)))


@pytest.mark.parametrize("kind,params", [
    ("hnsw", {"hnsw_m": 16, "ef_search": 128, "ef_construction": 64}),
    ("ivf", {"nlist": 32, "nprobe": 8}),
])
def test_approximate_indexes_have_high_recall(kind: str, params: dict) -> None:
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(20, 32))
    items = clustered(rng, 4000, 32, centers)
    queries = clustered(rng, 100, 32, centers)
    _, exact = search(build_index(items), queries, 20, show_progress=False)
    index = build_index(items, kind, **params)
    _, approx = search(index, queries, 20, show_progress=False)
    recall = np.mean([len(set(a) & set(e)) / 20 for a, e in zip(approx, exact)])
    assert recall > 0.9, recall
    # exclusion still holds for approximate kinds
    exclude = [e[:5].tolist() for e in exact]
    _, ids = search(index, queries, 20, exclude=exclude, show_progress=False)
    assert all(not set(i) & set(x) for i, x in zip(ids.tolist(), exclude))


def test_ivf_nlist_is_capped_for_small_catalogs() -> None:
    items = normalized(np.random.default_rng(3).normal(size=(100, 8)))
    index = build_index(items, "ivf", nlist=1024, nprobe=64)
    assert index.params == {"nlist": 2, "nprobe": 2}  # 100 // 39 = 2


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path: Path, data, kind: str) -> None:
    items, queries, exclude = data
    ids = [f"item-{i}" for i in range(len(items))]
    index = build_index(items, kind, item_ids=ids, nlist=4, nprobe=2)
    before = search(index, queries, 10, exclude=exclude, show_progress=False)
    save_index(index, tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    after = search(loaded, queries, 10, exclude=exclude, show_progress=False)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert loaded.kind == kind and loaded.item_ids.tolist() == ids and loaded.params == index.params


def test_filter_excluded_matches_loop() -> None:
    rng = np.random.default_rng(4)
    ids = np.stack([rng.permutation(50)[:20] for _ in range(10)]).astype(np.int64)
    ids[3, 15:] = -1  # padding survives as padding
    scores = -np.sort(rng.random((10, 20)), axis=1).astype(np.float32)
    exclude = [rng.choice(50, size=rng.integers(0, 15), replace=False).tolist() for _ in range(10)]
    f_scores, f_ids = filter_excluded(scores, ids, exclude, 12)
    for u in range(10):
        kept = [(s, i) for s, i in zip(scores[u], ids[u]) if i >= 0 and i not in exclude[u]][:12]
        want_ids = [i for _, i in kept] + [-1] * (12 - len(kept))
        assert f_ids[u].tolist() == want_ids
        np.testing.assert_array_equal(f_scores[u][: len(kept)], [s for s, _ in kept])


def test_bad_inputs(tmp_path: Path) -> None:
    items = normalized(np.random.default_rng(5).normal(size=(10, 4)))
    with pytest.raises(KarmaError, match="unknown index kind"):
        build_index(items, "annoy")
    with pytest.raises(KarmaError, match="dim"):
        search(build_index(items), np.ones((2, 5), np.float32), 3, show_progress=False)
    with pytest.raises(KarmaError, match="NaN"):
        build_index(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(KarmaError, match="missing index.faiss"):
        load_index(tmp_path)
