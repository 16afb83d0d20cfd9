"""Vectorized metrics and masked ranking against plain Python loops, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from karma.metrics import (
    MISS,
    auc,
    compute_metrics,
    gauc,
    logloss,
    metrics_from_ranks,
    rank_with_mask,
    target_ranks,
)


def loop_rank(scores: np.ndarray, target: int, seen: list[int]) -> int:
    """Pessimistic rank over the full row: other unmasked items scoring >= the target."""
    masked = set(seen) - {target}
    return sum(
        1
        for j in range(len(scores))
        if j != target and j not in masked and scores[j] >= scores[target]
    )


def loop_metrics(ranks: list[int], ks: list[int]) -> dict[str, float]:
    out = {}
    for k in ks:
        hits = [r for r in ranks if r < k]
        out[f"hr@{k}"] = len(hits) / len(ranks)
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in hits) / len(ranks)
        out[f"mrr@{k}"] = sum(1 / (r + 1) for r in hits) / len(ranks)
    return out


def random_case(rng: np.random.Generator, n_users: int, n_items: int, levels: int):
    # few distinct score levels -> many exact ties, including ties with the target
    scores = rng.integers(0, levels, size=(n_users, n_items)).astype(np.float32)
    targets = rng.integers(0, n_items, size=n_users)
    seen = []
    for t in targets:
        s = rng.choice(n_items, size=rng.integers(0, n_items // 2 + 1), replace=False).tolist()
        if rng.random() < 0.3:
            s.append(int(t))  # repeat consumption: the target was seen before
        seen.append(s)
    return scores, targets, seen


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [3, 50, 100000])
def test_rank_with_mask_matches_loop(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(5, 60))
    scores, targets, seen = random_case(rng, 40, n_items, levels)
    ks = [1, 3, 10, 100]  # 100 is larger than the catalog
    top_scores, top_ids = rank_with_mask(scores, max(ks) + 1, seen=seen, targets=targets)
    got = compute_metrics(top_ids, targets, ks, scores=top_scores)
    ranks = [loop_rank(scores[u], targets[u], seen[u]) for u in range(len(targets))]
    want = loop_metrics(ranks, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # the ranked lists never contain a masked item, and always contain the target (never masked)
    for u in range(len(targets)):
        valid = top_ids[u][top_ids[u] >= 0]
        assert not (set(valid.tolist()) & (set(seen[u]) - {int(targets[u])}))
        assert int(targets[u]) in valid.tolist()
    # K larger than the catalog: every target is ranked, so HR@100 is exactly 1
    assert got["hr@100"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_short_lists_with_ties_at_the_cut_are_exact(seed: int) -> None:
    # lists of max(ks) + 1 items over a larger catalog with heavy ties across the cut-off
    rng = np.random.default_rng(100 + seed)
    scores, targets, seen = random_case(rng, 60, 80, levels=4)
    ks = [1, 5, 10]
    top_scores, top_ids = rank_with_mask(scores, max(ks) + 1, seen=seen, targets=targets)
    got = compute_metrics(top_ids, targets, ks, scores=top_scores)
    ranks = [loop_rank(scores[u], targets[u], seen[u]) for u in range(len(targets))]
    want = loop_metrics(ranks, ks)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_ties_never_favour_the_target() -> None:
    scores = np.zeros((2, 5), dtype=np.float32)  # everything tied
    targets = np.array([0, 4])
    top_scores, top_ids = rank_with_mask(scores, 6, targets=targets)
    np.testing.assert_array_equal(target_ranks(top_ids, targets, top_scores), [4, 4])
    m = compute_metrics(top_ids, targets, [1, 4, 5], scores=top_scores)
    assert m["hr@1"] == 0.0 and m["hr@4"] == 0.0 and m["hr@5"] == 1.0
    # masking 2 of the tied items moves the target up by exactly 2
    top_scores, top_ids = rank_with_mask(scores, 6, seen=[[1, 2], [0, 1]], targets=targets)
    np.testing.assert_array_equal(target_ranks(top_ids, targets, top_scores), [2, 2])


def test_positional_ranks_and_known_values() -> None:
    ranked = np.array([[7, 3, 5], [1, 2, 3], [4, 5, 6], [9, -1, -1]])
    targets = np.array([7, 3, 0, 9])
    ranks = target_ranks(ranked, targets)
    np.testing.assert_array_equal(ranks, [0, 2, MISS, 0])
    m = compute_metrics(ranked, targets, [1, 3])
    assert m["hr@1"] == pytest.approx(2 / 4)
    assert m["hr@3"] == pytest.approx(3 / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + 0 + 1) / 4)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)


@pytest.mark.parametrize("seed", range(4))
def test_positional_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ranked = np.stack([rng.permutation(30)[:12] for _ in range(25)])
    targets = rng.integers(0, 30, size=25)
    ranks = []
    for u in range(25):
        row = ranked[u].tolist()
        ranks.append(row.index(targets[u]) if targets[u] in row else 10**9)
    want = loop_metrics(ranks, [1, 5, 12, 20])
    got = compute_metrics(ranked, targets, [1, 5, 12, 20])
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([], dtype=np.int64), [10])
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([0]), [0])
    with pytest.raises(ValueError):
        target_ranks(np.zeros((3, 2)), np.zeros(2))


def test_mean_pairwise_cosine_matches_the_pairwise_loop():
    from karma.metrics import mean_pairwise_cosine

    x = torch.randn(7, 5)
    unit = torch.nn.functional.normalize(x, dim=-1)
    pairs = [float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j]
    assert abs(mean_pairwise_cosine(x) - sum(pairs) / len(pairs)) < 1e-5
    assert abs(mean_pairwise_cosine(torch.ones(4, 3)) - 1.0) < 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300).astype(float)  # few levels: many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 0], [0.5, 0.5]) == 0.5


def test_gauc_weights_users_by_impressions_and_skips_one_class_users() -> None:
    y = np.array([1, 0, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.2, 0.3, 0.8, 0.5, 0.6])
    g = ["a", "a", "a", "b", "b", "c", "c"]  # a: AUC 1 (3 rows), b: AUC 0 (2 rows), c: one class
    value, used = gauc(y, s, g)
    assert used == 2
    assert value == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one group"):
        gauc([1, 0], [0.1, 0.2], ["a", "b"])


def test_logloss_known_value_and_clipping() -> None:
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert math.isfinite(logloss([1, 0], [0.0, 1.0]))  # clipped, not inf
