"""The pre-ranking stage: each request's candidate set is the top-N of retrieval (or, on data
with result pages, the page it was shown), re-scored by a light model over the embedding
features, scored by HR@K / NDCG@K within the candidate set.

    cands = candidate_sets(user_emb, item_emb, examples, n=500)   # (U, N) ids, best first
    cands = page_candidates(user_emb, item_emb, pages)            # (U, P) the pages by u.e
    metrics = run_preranking(valid_u, test_u, item_emb, valid, test, popularity, cfg.funnel, seed)

The light model is trained on the valid requests (the second-last interaction of each user) and
evaluated on the test requests (the last), so nothing it learns comes from a later interaction.
It is residual on the retrieval score and its epoch (0 = the retrieval order) is chosen on a
held-out fifth of the valid requests.
Candidates mask the items the user saw before the target, as full-catalog recall does
(karma/metrics.py); a target outside its candidate set is a miss at every K.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from karma.config import FunnelConfig
from karma.errors import KarmaError
from karma.metrics import compute_metrics, top_k_masked


def candidate_sets(
    user_emb: np.ndarray, item_emb: np.ndarray, examples: Any, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` items per request by u.e, seen items (except the target) masked: (ids (U, n) with
    -1 padding, retrieval scores (U, n))."""
    if n < 1:
        raise KarmaError(f"funnel.candidates must be >= 1, got {n}")
    scores = torch.as_tensor(user_emb).float() @ torch.as_tensor(item_emb).float().T  # (U, N)
    top_scores, top_ids = top_k_masked(scores, n, seen=examples.seen, targets=examples.targets)
    return top_ids.numpy(), top_scores.numpy()


def page_candidates(
    user_emb: np.ndarray, item_emb: np.ndarray, pages: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Each request's result page ordered by u.e: (ids (U, P) with -1 padding, retrieval scores
    (U, P), -inf at the padding). Nothing is masked: the page is what the user was shown."""
    if len(pages) != len(user_emb):
        raise KarmaError(f"{len(pages)} result pages for {len(user_emb)} requests")
    ids = np.full((len(pages), max(1, max(len(p) for p in pages))), -1, dtype=np.int64)
    for r, page in enumerate(pages):
        ids[r, : len(page)] = page
    ids_t = torch.as_tensor(ids)
    u = torch.as_tensor(np.asarray(user_emb)).float()  # (U, k)
    e = torch.as_tensor(np.asarray(item_emb)).float()[ids_t.clamp(min=0)]  # (U, P, k)
    scores = torch.einsum("uk,upk->up", u, e).masked_fill(ids_t < 0, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    return ids_t.gather(1, order).numpy(), scores.gather(1, order).numpy()


class LightScorer(torch.nn.Module):
    """score(u, e) = s * u.e + MLP([u * e, u.e, log(1 + train popularity of e's item)]): a
    pre-ranking-size model (one hidden layer) that can re-weight the embedding dimensions and add
    popularity. Residual on the retrieval score: the MLP's output layer starts at zero, so the
    untrained scorer ranks exactly as retrieval did and fitting can only learn corrections to it
    (fitted from scratch on a few hundred requests it fell below the order it re-scores)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim + 2, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)
        # learnable weight of u.e; any positive start keeps the retrieval order, 1 leaves the
        # MLP's corrections room to matter from the first steps
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, u: torch.Tensor, e: torch.Tensor, pop: torch.Tensor) -> torch.Tensor:
        # u (B, k), e (B, N, k), pop (B, N) -> scores (B, N)
        prod = u[:, None, :] * e
        dot = prod.sum(-1, keepdim=True)  # (B, N, 1) the retrieval score
        x = torch.cat([prod, dot, pop[..., None]], dim=-1)
        return self.scale * dot.squeeze(-1) + self.mlp(x).squeeze(-1)


def _gather(items: torch.Tensor, log_pop: torch.Tensor, ids: np.ndarray, rows: torch.Tensor):
    """e (B, N, k), pop (B, N) and the padding mask (B, N) of candidate `ids[rows]` (-1 = pad);
    gathered per batch: the whole (U, N, k) block is 0.5 GB on ML-100K and 3 GB on ML-1M."""
    ids_t = torch.as_tensor(ids[rows.numpy()], dtype=torch.long)  # (B, N)
    safe = ids_t.clamp(min=0)
    return items[safe], log_pop[safe], ids_t < 0


def run_preranking(
    valid_u: np.ndarray,
    test_u: np.ndarray,
    item_emb: np.ndarray,
    valid: Any,
    test: Any,
    popularity: np.ndarray,
    cfg: FunnelConfig,
    seed: int,
    show_progress: bool = True,
    pages: tuple[list[list[int]], list[list[int]]] | None = None,
) -> dict[str, float]:
    """Train the light scorer on the valid requests' candidate sets (softmax cross-entropy over
    the candidates, requests whose target was not retrieved skipped; the epoch with the best
    MRR on a held-out fifth of them is kept), then rank each test request's candidates by it.
    The candidate sets are the top `cfg.candidates` of retrieval, or with `pages` (valid, test)
    each request's result page. Returns HR@K / NDCG@K within the candidate set for `cfg.ks`,
    the retrieval order's own figures (`retrieval_hr@K`), `candidate_recall` and `best_epoch`
    (0: retrieval order kept)."""
    log_pop = torch.log1p(torch.as_tensor(popularity, dtype=torch.float32))  # (N_items,)
    if pages is None:
        v_ids, _ = candidate_sets(valid_u, item_emb, valid, cfg.candidates)
        t_ids, t_scores = candidate_sets(test_u, item_emb, test, cfg.candidates)
    else:
        v_ids, _ = page_candidates(valid_u, item_emb, pages[0])
        t_ids, t_scores = page_candidates(test_u, item_emb, pages[1])
    items = torch.as_tensor(np.asarray(item_emb), dtype=torch.float32)  # (N_items, k)
    u = torch.as_tensor(np.asarray(valid_u), dtype=torch.float32)  # (U, k)
    hit = torch.as_tensor(v_ids == np.asarray(valid.targets)[:, None])  # (U, N)
    keep = hit.any(dim=1).nonzero().squeeze(1)  # (U_kept,) requests with the target retrieved
    if len(keep) == 0:
        raise KarmaError("no valid request has its target among its candidates: nothing to fit")
    label = hit.float().argmax(dim=1)  # (U,) candidate slot of the target
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # a seeded fifth of the fitting requests (at least one) is held out to pick the epoch,
    # epoch 0 (the retrieval order) included: the scorer never ships worse than what it
    # re-scores on requests it was not fitted on
    keep = keep[torch.randperm(len(keep), generator=gen)]
    n_held = max(1, len(keep) // 5) if len(keep) > 1 else 0
    held, fit = keep[:n_held], keep[n_held:]
    model = LightScorer(u.shape[1], cfg.prerank_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.prerank_lr)

    def held_mrr() -> float:
        """Mean reciprocal rank of the held-out targets within their candidates (an order
        metric: the cross-entropy kept falling while HR fell, as the scale sharpened)."""
        if not n_held:
            return 0.0
        with torch.no_grad():
            e, pop, pad = _gather(items, log_pop, v_ids, held)
            logits = model(u[held], e, pop).masked_fill(pad, float("-inf"))  # (H, N)
            target = logits.gather(1, label[held, None])  # (H, 1)
            rank = (logits >= target).sum(dim=1)  # (H,) 1-based; ties count against it
            return float((1.0 / rank.float()).mean())

    best = (held_mrr(), 0, copy.deepcopy(model.state_dict()))
    for epoch in tqdm(range(1, cfg.prerank_epochs + 1), desc=f"pre-ranker seed {seed}",
                      disable=not show_progress, leave=False):
        perm = fit[torch.randperm(len(fit), generator=gen)]
        for s in range(0, len(perm), 32):
            b = perm[s : s + 32]
            e, pop, pad = _gather(items, log_pop, v_ids, b)
            logits = model(u[b], e, pop).masked_fill(pad, float("-inf"))  # (B, N)
            loss = torch.nn.functional.cross_entropy(logits, label[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        mrr = held_mrr()
        if mrr > best[0] or not n_held:
            best = (mrr, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    u = torch.as_tensor(np.asarray(test_u), dtype=torch.float32)
    chunks = []
    with torch.no_grad():
        for s in range(0, len(u), 256):
            b = torch.arange(s, min(s + 256, len(u)))
            e, pop, pad = _gather(items, log_pop, t_ids, b)
            chunks.append(model(u[b], e, pop).masked_fill(pad, float("-inf")))
    scores = torch.cat(chunks).numpy()  # (U, N)
    targets = np.asarray(test.targets)
    ks = sorted(set(cfg.ks))
    light = compute_metrics(t_ids, targets, ks, scores=scores)
    retrieval = compute_metrics(t_ids, targets, ks, scores=t_scores)
    out = {k: v for k, v in light.items() if not k.startswith("mrr")}
    out.update({f"retrieval_{k}": v for k, v in retrieval.items() if k.startswith("hr")})
    out["candidate_recall"] = float((t_ids == targets[:, None]).any(axis=1).mean())
    out["best_epoch"] = float(best[1])
    return out


__all__ = ["LightScorer", "candidate_sets", "page_candidates", "run_preranking"]
