"""Leave-one-out ranking metrics over ranked item ids: HR@K (== Recall@K), NDCG@K, MRR@K.

    top_scores, top_ids = rank_with_mask(scores, k=201, seen=seen, targets=targets)
    metrics = compute_metrics(top_ids, targets, ks=[10, 200], scores=top_scores)
    metrics["hr@10"], metrics["ndcg@10"], metrics["mrr@10"]

Protocol rules (the same everywhere in karma, printed with every table):

- One target per user (chronological leave-one-out), so Recall@K equals HR@K; we report `hr@K`.
- Masking: with `seen` given, every item the user interacted with before the target is removed
  from the ranking, EXCEPT the target itself. Data with repeat consumption (a shop re-purchase) can
  have the target in `seen`; masking it would make the example unanswerable, so it stays. In ML-100K
  ratings are unique per (user, item), so the target is never in `seen` there.
- Ties are broken pessimistically: when `scores` are given, the target's rank is the number of
  OTHER ranked items whose score is >= the target's score. A tie never favours the target
  (id-ordered tie breaks do, and inflate published numbers, see DESIGN.md section 4); a collapsed
  model that maps many items to one vector is charged for it. Deterministic, needs no seed.
  Without `scores` the caller's order is taken as is.
- A ranked list must be longer than max(ks) for the tie rule to be exact at K = max(ks): an item
  tied with the target just past the end of the list cannot be seen. `rank_with_mask` and
  `karma.evaluate` therefore retrieve max(ks) + 1 items.
- A target missing from the list (or a list shorter than K, e.g. K larger than the catalog) is a
  miss at that K; padding ids are negative (FAISS pads with -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MISS = np.iinfo(np.int64).max  # rank of a target that is not in the ranked list


def target_ranks(
    ranked_ids: np.ndarray, targets: np.ndarray, scores: np.ndarray | None = None
) -> np.ndarray:
    """0-based rank of each target in its ranked list, `MISS` where it is absent.

    ranked_ids: (U, L) item ids, best first, negative = padding. targets: (U,).
    scores: (U, L) scores of `ranked_ids`; when given, ties are broken pessimistically (the rank
    is the number of other valid entries scoring >= the target), else the list position is used.
    """
    ranked_ids = np.asarray(ranked_ids)
    targets = np.asarray(targets).reshape(-1, 1)  # (U, 1)
    if ranked_ids.ndim != 2 or ranked_ids.shape[0] != targets.shape[0]:
        raise ValueError(f"ranked_ids {ranked_ids.shape} does not match targets {targets.shape}")
    is_target = ranked_ids == targets  # (U, L)
    found = is_target.any(axis=1)  # (U,)
    if scores is None:
        ranks = is_target.argmax(axis=1).astype(np.int64)
    else:
        scores = np.asarray(scores)
        # first occurrence of the target gives its score; a list should hold it at most once
        target_score = scores[np.arange(len(scores)), is_target.argmax(axis=1)][:, None]  # (U, 1)
        others = (ranked_ids >= 0) & ~is_target  # (U, L)
        ranks = ((scores >= target_score) & others).sum(axis=1).astype(np.int64)
    return np.where(found, ranks, MISS)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K averaged over users, from 0-based target ranks (MISS = absent)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("no users to compute metrics over")
    out: dict[str, float] = {}
    # log2(rank + 2) / (rank + 1) only where hit; the MISS sentinel never enters the arithmetic
    for k in sorted(set(int(k) for k in ks)):
        if k < 1:
            raise ValueError(f"metric cutoff K must be >= 1, got {k}")
        hit = ranks < k
        safe = np.where(hit, ranks, 0).astype(np.float64)
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(safe + 2.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (safe + 1.0), 0.0).mean())
    return out


def compute_metrics(
    ranked_ids: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int],
    scores: np.ndarray | None = None,
) -> dict[str, float]:
    """`{"hr@10": ..., "ndcg@10": ..., "mrr@10": ..., ...}` for every K in `ks`.

    ranked_ids: (U, L) best first; targets: (U,); scores: optional (U, L), see `target_ranks`.
    """
    return metrics_from_ranks(target_ranks(ranked_ids, targets, scores), ks)


def mask_seen_(
    scores: torch.Tensor, seen: Sequence[Sequence[int]], targets: Sequence[int] | None = None
) -> torch.Tensor:
    """Set scores[u, seen[u]] = -inf in place, except at targets[u]. scores: (U, N)."""
    lengths = [len(s) for s in seen]
    if sum(lengths) == 0:
        return scores
    row = torch.repeat_interleave(torch.arange(len(seen)), torch.tensor(lengths)).to(scores.device)
    col = torch.as_tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in seen]))
    col = col.to(scores.device)
    if targets is not None:
        tgt = torch.as_tensor(np.asarray(targets, dtype=np.int64), device=scores.device)
        keep = col == tgt[row]  # the target is never masked
        row, col = row[~keep], col[~keep]
    scores[row, col] = float("-inf")
    return scores


def top_k_masked(
    scores: torch.Tensor,
    k: int,
    seen: Sequence[Sequence[int]] | None = None,
    targets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, ids) per row of a dense (U, N) score tensor, seen items masked in place.

    The one exact ranking rule (`rank_with_mask` on CPU, `karma.index.torch_topk_search` block by
    block on any device): masked items never appear, rows with fewer than k valid entries are
    padded with id -1 and score -inf (FAISS's convention). Results stay on `scores`' device.
    """
    if seen is not None:
        mask_seen_(scores, seen, targets)
    top_scores, top_ids = scores.topk(min(k, scores.shape[1]), dim=1)  # (U, min(k, N))
    top_ids = torch.where(torch.isneginf(top_scores), -1, top_ids)
    pad = k - top_ids.shape[1]
    if pad > 0:
        top_scores = torch.nn.functional.pad(top_scores, (0, pad), value=float("-inf"))
        top_ids = torch.nn.functional.pad(top_ids, (0, pad), value=-1)
    return top_scores, top_ids


def rank_with_mask(
    scores: torch.Tensor | np.ndarray,
    k: int,
    seen: Sequence[Sequence[int]] | None = None,
    targets: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_masked` of a copy of a dense (U, N) score matrix, as numpy arrays.

    Pass the result to `compute_metrics(ids, targets, ks, scores=top_scores)` with k > max(ks).
    """
    top_scores, top_ids = top_k_masked(torch.as_tensor(scores).float().clone(), k, seen, targets)
    return top_scores.numpy(), top_ids.numpy()


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over all ordered pairs of distinct rows of `vectors` (N, d): how much a set of
    vectors (history tokens, item embeddings) has collapsed onto one direction (1.0 = all equal).
    """
    unit = torch.nn.functional.normalize(torch.as_tensor(vectors).float(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        raise ValueError("mean_pairwise_cosine needs at least 2 vectors")
    total = unit.sum(0)  # sum_ij u_i.u_j = |sum_i u_i|^2, without the (N, N) matrix
    return float((total @ total - n) / (n * (n - 1)))

# ---------------------------------------------------------------------------------------------
# Click-through metrics of the ranking stage (karma/ctr.py): labels 0/1, scores = P(click)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: the probability that a random click scores above a random non-click, ties
    counted one half (Mann-Whitney with average ranks). labels, scores: (R,)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} clicks and {n_neg} non-clicks")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct score: its block ends at cumsum(counts)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: Sequence) -> tuple[float, int]:
    """Grouped AUC: the AUC of each group (user) with both classes, weighted by the group's
    number of impressions. Returns (gAUC, groups used); groups with one class carry no ranking
    signal and are left out."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    total, weight, used = 0.0, 0, 0
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for rows in np.split(order, bounds):
        y = labels[rows]
        if y.all() or not y.any():
            continue
        total += len(rows) * auc(y, scores[rows])
        weight += len(rows)
        used += 1
    if used == 0:
        raise ValueError("gAUC needs at least one group with both clicks and non-clicks")
    return total / weight, used


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of click probabilities (clipped to [eps, 1 - eps])."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    return float(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)).mean())
