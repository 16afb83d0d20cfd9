"""The ranking stage: a click-through-rate model on impressions and clicks, with and without
KARMA's embedding features (u, e and u.e).

    rows = build_ctr_rows(data, cfg, users=set(test.user_ids))
    u = encode_users(model, rows.histories, rows.queries, catalog, item_texts)  # (R, k)
    features = ctr_features(rows, data, u, catalog.item_emb)
    result = train_and_score(features, rows, n_items, KARMA_FEATURES, seed=0, cfg=cfg.funnel)
    result["auc"], result["gauc"], result["logloss"]

Rows follow the retrieval split (karma/split.py): the evaluation requests are each user's valid
and test interactions (the two retrieval holds out, so the KARMA model never trained on them);
the training requests are the last `funnel.train_window` of the user's training part.
- MovieLens (no result pages): every rating of a user is an impression, one row per request, and
  a rating >= `funnel.click_rating` is a click.
- Data with result pages (the shop, or `impressions` in a user's own tables): each request gives
  a row per item on its page, the clicked item 1 and the items shown beside it 0.
Every row's history (behaviour sequence, and the input of u) is the user's clicks before its
request, so no feature of a row looks at the row itself or later (tests/test_ctr.py checks both
rules). The rows of one page share a request, and so one u.

The model is DeepFM from torch-rechub (a maintained CTR library; its DIN drops dense inputs, see
docs/decisions.md): FM over user, item, genres, the mean-pooled history (sharing the item table)
and, where requests carry queries, the mean-pooled query words; the deep part over those plus,
with KARMA, the dense u (k), e (k) and u.e (1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from karma.config import Config, FunnelConfig
from karma.errors import KarmaError
from karma.metrics import auc, gauc, logloss

STAGES = ("train", "valid", "test")  # the `stage` codes of CtrRows: 0, 1, 2
KARMA_FEATURES = ("u", "e", "ue")  # the dense features ctr_features adds from the embeddings


@dataclass
class CtrRows:
    """One row per impression, users in the order given, each user's rows oldest first."""

    user_ids: list[str]
    items: np.ndarray  # (R,) int64 item_idx shown
    positions: np.ndarray  # (R,) int64 0-based position in the user's chronological sequence
    timestamps: np.ndarray  # (R,) int64
    histories: list[list[int]]  # items before the row (at most data.max_history), oldest first
    queries: list[str]  # the request's query (the retrieval split's, "" in no-query mode)
    labels: np.ndarray  # (R,) float32 1 = click
    stage: np.ndarray  # (R,) int8 index into STAGES
    # (R,) int64 the row's request, numbered 0.. in row order: the rows of a result page share
    # one (and its history, query and u); on MovieLens every row is its own request
    requests: np.ndarray
    pages: bool = False  # rows come from result pages (clicked vs shown), not ratings
    # the CTR model is fitted on the rows of this stage and scored on the later ones
    # (funnel.ctr_fit: 0 = train, scored on valid + test; 1 = valid, scored on test)
    fit_stage: int = 0

    def fit_rows(self) -> np.ndarray:
        return np.flatnonzero(self.stage == self.fit_stage)

    def eval_rows(self) -> np.ndarray:
        return np.flatnonzero(self.stage > self.fit_stage)

    def __len__(self) -> int:
        return len(self.user_ids)

    def request_rows(self) -> np.ndarray:
        """(Q,) the first row of each request, in request order."""
        return np.flatnonzero(np.r_[True, self.requests[1:] != self.requests[:-1]])

    def page_items(self, stage: int) -> list[list[int]]:
        """The items of each request of `stage` (its result page), in request order."""
        out: dict[int, list[int]] = {}
        for r in np.flatnonzero(self.stage == stage):
            out.setdefault(int(self.requests[r]), []).append(int(self.items[r]))
        return list(out.values())


def user_sequences(cfg: Config) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Each user's chronological item_idx and star ratings, ordered as karma/split.py orders
    them (stable sort by timestamp, ties in input row order). Returns (items, ratings, the
    ratings file)."""
    from karma.data import load_source
    from karma.datasets.movielens import load_ratings

    source = load_source(cfg.data)
    path, ratings = load_ratings(cfg.data.source)
    inter = source.interactions
    by_user: dict[str, list[int]] = {}
    for i, user in enumerate(inter.user_ids):
        by_user.setdefault(user, []).append(i)
    items, stars = {}, {}
    for user, idx in by_user.items():
        idx = np.asarray(idx)
        idx = idx[np.argsort(inter.timestamps[idx], kind="stable")]
        items[user] = inter.item_idx[idx].astype(np.int64)
        missing = [int(r) for r in inter.rows[idx] if int(r) not in ratings]
        if missing:
            raise KarmaError(f"{path}: row {missing[0]}: no rating for this interaction")
        stars[user] = np.asarray([ratings[int(r)] for r in inter.rows[idx]], dtype=np.float64)
    return items, stars, path


def has_pages(data: Any) -> bool:
    """Whether the prepared requests carry result pages (items shown beside the click)."""
    return any(len(page) for page in data.split("test").impressions)


def build_ctr_rows(data: Any, cfg: Config, users: list[str]) -> CtrRows:
    """The CTR rows of `users` (prepared-split user ids) from the prepared dataset `data`: its
    result pages where the requests carry them, else the source's ratings. Histories and queries
    are the prepared split's own, so the u of an evaluation row is exactly the u retrieval is
    scored with."""
    window = cfg.funnel.train_window
    if window < 0:
        raise KarmaError(f"funnel.train_window must be >= 0 (0 = all), got {window}")
    splits = {name: data.split(name) for name in STAGES}
    index = {name: {} for name in STAGES}  # user -> row indices in the split, oldest first
    for name, ex in splits.items():
        for i, user in enumerate(ex.user_ids):
            index[name].setdefault(user, []).append(i)
    out = CtrRows([], [], [], [], [], [], [], [], [], fit_stage=STAGES.index(cfg.funnel.ctr_fit))
    if has_pages(data):
        _page_rows(out, splits, index, users, cfg)
    else:
        _rating_rows(out, splits, index, users, cfg)
    out.items = np.asarray(out.items, dtype=np.int64)
    out.positions = np.asarray(out.positions, dtype=np.int64)
    out.timestamps = np.asarray(out.timestamps, dtype=np.int64)
    out.labels = np.asarray(out.labels, dtype=np.float32)
    out.stage = np.asarray(out.stage, dtype=np.int8)
    out.requests = np.asarray(out.requests, dtype=np.int64)
    return out


def _placed(index: dict, user: str, cfg: Config) -> list[tuple[str, int, int]]:
    """(split, row in it, position in the user's sequence) of a user's CTR requests: the last
    `funnel.train_window` training ones (0 = all; none with funnel.ctr_fit=valid), then valid
    and test. Prepared train rows are positions 1 .. n-3, valid n-2, test n-1 (karma/split.py)."""
    train_rows = index["train"].get(user, [])
    n = len(train_rows) + 3
    placed = [("train", i, 1 + j) for j, i in enumerate(train_rows)]
    window = cfg.funnel.train_window
    if cfg.funnel.ctr_fit == "valid":
        placed = []
    elif window:
        placed = placed[-window:]
    return placed + [("valid", index["valid"][user][0], n - 2),
                     ("test", index["test"][user][0], n - 1)]


def _append(out: CtrRows, user: str, ex: Any, i: int, name: str, pos: int, item: int,
            label: float, request: int) -> None:
    out.user_ids.append(user)
    out.items.append(item)
    out.positions.append(pos)
    out.timestamps.append(int(ex.timestamps[i]))
    out.histories.append([int(h) for h in ex.histories[i]])
    out.queries.append(ex.queries[i])
    out.labels.append(label)
    out.stage.append(STAGES.index(name))
    out.requests.append(request)


def _page_rows(out: CtrRows, splits: dict, index: dict, users: list[str], cfg: Config) -> None:
    """Result-page rows: per request the clicked item (1), then each item shown beside it (0)."""
    out.pages = True
    request = 0
    for user in users:
        if user not in index["test"] or user not in index["valid"]:
            raise KarmaError(f"user '{user}' has no valid / test request in prepared_dir "
                             f"{cfg.data.prepared_dir}")
        for name, i, pos in _placed(index, user, cfg):
            ex = splits[name]
            page = [int(ex.targets[i])] + [int(j) for j in ex.impressions[i]]
            for k, item in enumerate(page):
                _append(out, user, ex, i, name, pos, item, float(k == 0), request)
            request += 1


def _rating_rows(out: CtrRows, splits: dict, index: dict, users: list[str], cfg: Config) -> None:
    """MovieLens rows: one per rated item, a click where the rating is >= funnel.click_rating."""
    sequences, ratings, path = user_sequences(cfg)
    for user in users:
        seq = sequences.get(user)
        if seq is None or user not in index["test"]:
            raise KarmaError(f"user '{user}' is in the prepared data or the request but not both "
                             f"(prepared_dir {cfg.data.prepared_dir}, ratings {path})")
        n = len(seq)
        for name, i, pos in _placed(index, user, cfg):
            ex = splits[name]
            if int(ex.targets[i]) != int(seq[pos]) or len(index["train"].get(user, [])) != n - 3:
                raise KarmaError(
                    f"{cfg.data.prepared_dir}: user '{user}', {name} row {i}: the prepared split "
                    f"does not match data.source={cfg.data.source} ({path}); prepare it again"
                )
            _append(out, user, ex, i, name, pos, int(seq[pos]),
                    float(ratings[user][pos] >= cfg.funnel.click_rating), len(out.requests))


def ctr_features(
    rows: CtrRows, data: Any, user_emb: np.ndarray | None, item_emb: np.ndarray | None
) -> dict[str, torch.Tensor]:
    """The model inputs of every row. Ids are shifted by one so that 0 pads the sequences.

    user (R,), item (R,), genres (R, G), history (R, H); where any request has a query also
    query (R, W) (its lower-cased words known from the training rows: a search ranker sees
    what was typed, with or without KARMA); with embeddings also u (R, k) (the KARMA interest
    embedding of the row's request), e (R, k) (the shown item's) and ue (R,).
    """
    codes = {u: i + 1 for i, u in enumerate(dict.fromkeys(rows.user_ids))}
    genre_code: dict[str, int] = {}
    item_genres = [
        [genre_code.setdefault(g, len(genre_code) + 1) for g in cats]
        for cats in data.items.categories
    ]

    def padded(lists: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(x) for x in lists))
        out = torch.zeros(len(lists), width, dtype=torch.long)
        for r, x in enumerate(lists):
            out[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        return out

    features = {
        "user": torch.as_tensor([codes[u] for u in rows.user_ids], dtype=torch.long),
        "item": torch.as_tensor(rows.items + 1, dtype=torch.long),
        "genres": padded([item_genres[i] for i in rows.items]),
        "history": padded([[h + 1 for h in hist] for hist in rows.histories]),
    }
    if any(rows.queries):
        # the vocabulary of the training rows; a word first typed in an evaluation request has no
        # trained embedding and is dropped (code 0, the padding)
        words: dict[str, int] = {}
        for r in rows.fit_rows():
            for w in rows.queries[r].lower().split():
                words.setdefault(w, len(words) + 1)
        features["query"] = padded([
            [words[w] for w in q.lower().split() if w in words] for q in rows.queries
        ])
    if user_emb is not None and item_emb is not None:
        u = torch.as_tensor(np.asarray(user_emb), dtype=torch.float32)  # (R, k)
        if len(u) != len(rows):
            raise KarmaError(f"{len(u)} user embeddings for {len(rows)} CTR rows")
        e = torch.as_tensor(np.asarray(item_emb)[rows.items], dtype=torch.float32)  # (R, k)
        features.update(u=u, e=e, ue=(u * e).sum(dim=1))
    return features


def build_deepfm(features: dict[str, torch.Tensor], n_items: int, karma: Sequence[str],
                 cfg: FunnelConfig) -> torch.nn.Module:
    """torch-rechub's DeepFM over the `ctr_features` inputs and the dense KARMA features named in
    `karma` (a subset of KARMA_FEATURES; DeepFM feeds dense inputs to its deep part only)."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import DeepFM

    d = cfg.ctr_embed_dim
    sparse = [
        SparseFeature("user", vocab_size=int(features["user"].max()) + 1, embed_dim=d),
        SparseFeature("item", vocab_size=n_items + 1, embed_dim=d),
        SequenceFeature("genres", vocab_size=int(features["genres"].max()) + 1, embed_dim=d,
                        pooling="mean", padding_idx=0),
        SequenceFeature("history", vocab_size=n_items + 1, embed_dim=d, pooling="mean",
                        shared_with="item", padding_idx=0),
    ]
    if "query" in features:
        sparse.append(SequenceFeature("query", vocab_size=int(features["query"].max()) + 1,
                                      embed_dim=d, pooling="mean", padding_idx=0))
    dense = [DenseFeature(name, embed_dim=features[name].shape[1] if name != "ue" else 1)
             for name in karma]
    mlp = {"dims": list(cfg.ctr_hidden), "dropout": cfg.ctr_dropout, "activation": "relu"}
    return DeepFM(deep_features=sparse + dense, fm_features=sparse, mlp_params=mlp)


def standardize_dense(
    features: dict[str, torch.Tensor], names: Sequence[str], train_idx: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The dense features `names`, each dimension z-scored with the mean and std of the training
    rows `train_idx` (the evaluation rows use the same statistics). Raw, u.e is a cosine-sized
    scalar beside embeddings of unit scale, and 4 epochs of Adam barely move its weight: the
    ranker ignored the signal that orders a page by itself."""
    out = {}
    for name in names:
        x = features[name]
        fit = x[train_idx]
        out[name] = (x - fit.mean(dim=0)) / fit.std(dim=0).clamp(min=1e-6)
    return out


def _batch(features: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value[idx] for name, value in features.items()}


def train_and_score(
    features: dict[str, torch.Tensor],
    rows: CtrRows,
    n_items: int,
    karma: Sequence[str],
    seed: int,
    cfg: FunnelConfig,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train DeepFM on the training rows (binary cross-entropy, Adam, `funnel.ctr_epochs`) with
    the KARMA features named in `karma` (() = none; standardized on the training rows), score the
    rows after them (`CtrRows.eval_rows`: valid + test, or test with funnel.ctr_fit=valid),
    return AUC, gAUC (per user, weighted by impressions) and logloss."""
    unknown = [name for name in karma if name not in KARMA_FEATURES or name not in features]
    if unknown:
        raise KarmaError(f"KARMA features {unknown}: expected some of {KARMA_FEATURES}, computed "
                         "by ctr_features with embeddings")
    features = {k: v for k, v in features.items() if k not in KARMA_FEATURES or k in karma}
    train_idx = torch.as_tensor(rows.fit_rows())
    if len(train_idx) == 0:
        raise KarmaError("no CTR training rows (users need more than 3 interactions)")
    features.update(standardize_dense(features, karma, train_idx))
    torch.manual_seed(seed)
    model = build_deepfm(features, n_items, karma, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.ctr_lr, weight_decay=cfg.ctr_weight_decay)
    labels = torch.as_tensor(rows.labels)
    eval_idx = torch.as_tensor(rows.eval_rows())
    gen = torch.Generator().manual_seed(seed)
    bs = cfg.ctr_batch_size
    model.train()
    steps = range(cfg.ctr_epochs)
    for _ in tqdm(steps, desc=f"ctr {'+' + '+'.join(karma) if karma else 'base'} seed {seed}",
                  disable=not show_progress, leave=False):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for s in range(0, len(perm), bs):
            idx = perm[s : s + bs]
            prob = model(_batch(features, idx))  # (B,) sigmoid outputs
            loss = torch.nn.functional.binary_cross_entropy(prob, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        probs = torch.cat([
            model(_batch(features, eval_idx[s : s + 4096])) for s in range(0, len(eval_idx), 4096)
        ]).numpy()  # (E,)
    y = rows.labels[eval_idx.numpy()]
    groups = [rows.user_ids[i] for i in eval_idx.tolist()]
    classes: dict[str, set[bool]] = {}
    for user, label in zip(groups, y):
        classes.setdefault(user, set()).add(bool(label))
    # with one evaluation row per user (MovieLens, funnel.ctr_fit=valid) no user has both
    # classes: gAUC is undefined there, NaN, and AUC / logloss still stand
    mixed = any(len(c) == 2 for c in classes.values())
    g, n_groups = gauc(y, probs, groups) if mixed else (float("nan"), 0)
    return {"auc": auc(y, probs), "gauc": g, "logloss": logloss(y, probs),
            "gauc_users": float(n_groups)}


__all__ = ["KARMA_FEATURES", "CtrRows", "build_ctr_rows", "ctr_features", "standardize_dense",
           "train_and_score", "user_sequences"]
