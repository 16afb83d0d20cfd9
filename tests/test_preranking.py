"""Pre-ranking (karma/preranking.py): candidate sets follow recall's masking rule, and the light
re-scorer learns what the embeddings carry."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from karma.config import FunnelConfig
from karma.errors import KarmaError
from karma.preranking import candidate_sets, run_preranking


def _requests(rng, n_users, n_items, dim):
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    targets = rng.integers(0, n_items, n_users)
    users = items[targets] + 0.8 * rng.normal(size=(n_users, dim)).astype(np.float32)
    seen = [list(rng.choice(n_items, 5, replace=False)) for _ in range(n_users)]
    return users, items, SimpleNamespace(targets=targets, seen=seen)


def test_candidates_mask_seen_items_but_never_the_target() -> None:
    rng = np.random.default_rng(0)
    users, items, ex = _requests(rng, 40, 100, 8)
    ex.seen[0] = [int(ex.targets[0])] + ex.seen[0]  # a repeat: the target stays rankable
    ids, scores = candidate_sets(users, items, ex, 20)
    assert ids.shape == (40, 20)
    for u in range(40):
        assert not set(ids[u]) & (set(ex.seen[u]) - {int(ex.targets[u])})
        assert np.all(np.diff(scores[u]) <= 0)
    assert int(ex.targets[0]) in set(candidate_sets(users, items, ex, 100)[0][0])
    with pytest.raises(KarmaError, match="funnel.candidates"):
        candidate_sets(users, items, ex, 0)


def test_light_scorer_uses_popularity_it_was_not_given_by_retrieval() -> None:
    """Targets are the popular items while u.e is noise: retrieval order is near chance within
    the candidates, the light model (which sees log popularity) must rank far better."""
    rng = np.random.default_rng(1)
    n_items, dim = 200, 8
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    popularity = np.zeros(n_items)
    popularity[:20] = 1000  # items 0..19 are popular and are the only targets

    def split(n):
        return SimpleNamespace(targets=rng.integers(0, 20, n), seen=[[] for _ in range(n)])

    valid, test = split(300), split(300)
    u_valid = rng.normal(size=(300, dim)).astype(np.float32)
    u_test = rng.normal(size=(300, dim)).astype(np.float32)
    cfg = FunnelConfig(candidates=n_items, ks=[10, 20], prerank_epochs=15)
    out = run_preranking(u_valid, u_test, items, valid, test, popularity, cfg, seed=0,
                         show_progress=False)
    assert out["candidate_recall"] == 1.0
    assert out["retrieval_hr@20"] < 0.3
    assert out["hr@20"] > 0.9
    assert set(out) >= {"hr@10", "ndcg@10", "hr@20", "ndcg@20", "retrieval_hr@10"}


def test_untrained_scorer_ranks_as_retrieval() -> None:
    """The residual scorer starts at the retrieval order: same argsort as u.e on every request."""
    import torch

    from karma.preranking import LightScorer

    rng = np.random.default_rng(2)
    u = torch.as_tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    e = torch.as_tensor(rng.normal(size=(6, 30, 8)), dtype=torch.float32)
    pop = torch.as_tensor(rng.exponential(size=(6, 30)), dtype=torch.float32)
    scores = LightScorer(8, 16)(u, e, pop)
    dot = (u[:, None, :] * e).sum(-1)
    assert torch.equal(scores.argsort(dim=1), dot.argsort(dim=1))


def test_preranker_keeps_the_retrieval_order_when_fitting_does_not_help() -> None:
    """Retrieval finds many targets in its top 10 and popularity is noise: without fitting the
    pre-ranker is the retrieval order exactly, and fitted it stays at retrieval's level."""
    rng = np.random.default_rng(3)
    users_v, items, valid = _requests(rng, 200, 150, 16)
    _, _, test = _requests(rng, 200, 150, 16)  # its targets and seen items, on our catalog
    users_t = items[test.targets] + 0.8 * rng.normal(size=(200, 16)).astype(np.float32)
    popularity = rng.integers(0, 50, 150)
    for epochs in (0, 5):
        cfg = FunnelConfig(candidates=50, ks=[10], prerank_epochs=epochs)
        out = run_preranking(users_v, users_t, items, valid, test, popularity, cfg, seed=0,
                             show_progress=False)
        assert out["retrieval_hr@10"] > 0.3
        if epochs == 0:
            assert out["hr@10"] == out["retrieval_hr@10"] and out["best_epoch"] == 0
        assert out["hr@10"] >= out["retrieval_hr@10"] - 0.03


def test_page_candidates_order_the_page_by_u_e_and_mask_nothing() -> None:
    from karma.preranking import page_candidates

    rng = np.random.default_rng(0)
    users, items, _ = _requests(rng, 3, 30, 4)
    pages = [[5, 1, 9], [2], [7, 8, 3, 4]]
    ids, scores = page_candidates(users, items, pages)
    assert ids.shape == scores.shape == (3, 4)
    for r, page in enumerate(pages):
        assert sorted(ids[r][: len(page)]) == sorted(page) and (ids[r][len(page):] == -1).all()
        np.testing.assert_allclose(scores[r][: len(page)], items[ids[r][: len(page)]] @ users[r],
                                   rtol=1e-5)
        assert np.all(np.diff(scores[r][: len(page)]) <= 0)
        assert np.isneginf(scores[r][len(page):]).all()
    with pytest.raises(KarmaError, match="2 result pages for 3 requests"):
        page_candidates(users, items, pages[:2])
