"""Metrics over attention tensors: attention sinks, entropy and "barcode" column concentration.

Pure functions (no model needed). Attention is `(L, H, B, Q, K)` (layers, heads, users, query
positions, key positions) or the per-layer tuple of `(B, H, Q, K)` a Hugging Face model returns
with `output_attentions=True`; `to_lhbqk` turns the latter into the former.

    attn = to_lhbqk(outputs.attentions)                         # (L, H, B, Q, K)
    scores = key_attention(attn, first_positions, query_mask)   # (L, H) mean attention to <bos>
    sink_rate(scores, eps=0.3)                                  # share of (layer, head) above eps
    emb = select_queries(attn, emb_positions)                   # (L, H, B, K): <EMB>'s row
    hist = gather_keys(emb, history_positions)                  # (L, H, B, n): to history slots
    history_entropy(hist, history_positions >= 0)               # (L, H)

The analysis keeps only `<EMB>`'s attention to the first token and to each history slot (the
compact `(L, H, B)` and `(L, H, B, n)` tensors), so hundreds of users fit in memory; all metrics
below take those.

Definitions (recorded in docs/decisions.md):
- sink rate (Gu et al., ICLR 2025): share of (layer, head) whose attention to key k, averaged over
  users and query positions, exceeds eps. For the history, k is the history slot (j-th item of the
  history, oldest first) with the largest such average, per (layer, head).
- history entropy: entropy of `<EMB>`'s attention renormalized over the user's history slots
  (0 log 0 = 0; a row with no mass on the history has entropy 0).
- column concentration: per layer, the attention mass each history slot receives summed over
  users (each user's row renormalized over the history first, so every user weighs the same);
  top-1 share = largest column / total, Gini over columns (0 = uniform, (n-1)/n = one column).
- frequency correlation: Spearman rank correlation, over the items seen in the probe histories,
  between an item's training frequency and the mean renormalized attention it receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_TINY = 1e-12


def to_lhbqk(attentions: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer `(B, H, Q, K)` tensors (as HF returns them) or an `(L, H, B, Q, K)` tensor ->
    one float32 `(L, H, B, Q, K)` tensor."""
    if isinstance(attentions, torch.Tensor):
        if attentions.dim() != 5:
            raise ValueError(
                f"attention tensor must be (L, H, B, Q, K), got {tuple(attentions.shape)}"
            )
        return attentions.float()
    layers = [a.float() for a in attentions]
    if not layers or any(a.dim() != 4 for a in layers):
        raise ValueError(
            "per-layer attentions must be a non-empty sequence of (B, H, Q, K) tensors"
        )
    return torch.stack(layers).permute(0, 2, 1, 3, 4)  # (L, B, H, Q, K) -> (L, H, B, Q, K)


def select_queries(attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The attention row of one query position per user: `(L, H, B, Q, K)`, positions `(B,)` ->
    `(L, H, B, K)`."""
    L, H, B, Q, K = attn.shape
    index = positions.to(attn.device).long().view(1, 1, B, 1, 1).expand(L, H, B, 1, K)
    return attn.gather(3, index).squeeze(3)


def gather_keys(attn: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Attention to per-user key positions along the last dim.

    attn `(..., B, K)` (e.g. `(L, H, B, K)` or `(L, H, B, Q, K)` with Q moved first by the caller);
    positions `(B,)` -> `(..., B)`, or `(B, n)` padded with -1 -> `(..., B, n)` with 0 where -1.
    """
    positions = positions.to(attn.device).long()
    single = positions.dim() == 1
    if single:
        positions = positions[:, None]
    valid = positions >= 0  # (B, n)
    index = positions.clamp(min=0)
    lead = attn.shape[:-2]
    B = attn.shape[-2]
    out = attn.gather(-1, index.expand(*lead, B, index.shape[1]))  # (..., B, n)
    out = out * valid.to(out.dtype)
    return out.squeeze(-1) if single else out


def key_attention(
    attn: torch.Tensor, key_positions: torch.Tensor | int, query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean attention to one key per user, over users and the query positions in `query_mask`.

    attn `(L, H, B, Q, K)`; key_positions `(B,)` or an int; query_mask `(B, Q)` bool (None = all).
    Returns `(L, H)`.
    """
    L, H, B, Q, K = attn.shape
    if isinstance(key_positions, int):
        key_positions = torch.full((B,), key_positions, dtype=torch.long)
    index = key_positions.to(attn.device).long().view(1, 1, B, 1, 1).expand(L, H, B, Q, 1)
    to_key = attn.gather(4, index).squeeze(4)  # (L, H, B, Q)
    if query_mask is None:
        return to_key.mean(dim=(2, 3))
    weight = query_mask.to(attn.device, attn.dtype)  # (B, Q)
    return (to_key * weight).sum(dim=(2, 3)) / weight.sum().clamp(min=1)


def sink_map(scores: torch.Tensor, eps: float = 0.3) -> torch.Tensor:
    """`(L, H)` mean attention to a key -> `(L, H)` bool: is (layer, head) a sink for that key."""
    return scores > eps


def sink_rate(scores: torch.Tensor, eps: float = 0.3) -> float:
    """Share of (layer, head) whose mean attention to the key exceeds eps (Gu et al. 2025)."""
    return float(sink_map(scores, eps).float().mean())


def sink_rate_per_layer(scores: torch.Tensor, eps: float = 0.3) -> torch.Tensor:
    """`(L, H)` scores -> `(L,)` share of heads above eps in each layer."""
    return sink_map(scores, eps).float().mean(dim=1)


def history_slot_attention(history_attn: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention to each history slot over the users that have it.

    history_attn `(L, H, B, n)` (raw attention, not renormalized); history_mask `(B, n)` bool.
    Returns `(L, H, n)` (0 for a slot no user has).
    """
    weight = history_mask.to(history_attn.device, history_attn.dtype)  # (B, n)
    return (history_attn * weight).sum(dim=2) / weight.sum(dim=0).clamp(min=1)


def history_sink_scores(
    history_attn: torch.Tensor, history_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (layer, head): mean attention to the most-attended history slot, and that slot.

    Returns `(L, H)` scores (feed to `sink_rate`) and `(L, H)` slot indices.
    """
    return history_slot_attention(history_attn, history_mask).max(dim=-1)


def renormalize_history(history_attn: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
    """Each user's attention over its history slots, rescaled to sum to 1 (all zero if it has no
    mass on the history). `(..., B, n)` -> `(..., B, n)`."""
    attn = history_attn * history_mask.to(history_attn.device, history_attn.dtype)
    total = attn.sum(dim=-1, keepdim=True)
    return torch.where(total > _TINY, attn / total.clamp(min=_TINY), torch.zeros_like(attn))


def history_entropy(
    history_attn: torch.Tensor, history_mask: torch.Tensor, normalized: bool = False
) -> torch.Tensor:
    """Entropy (nats) of `<EMB>`'s attention renormalized over the history, mean over users.

    history_attn `(L, H, B, n)`, history_mask `(B, n)` -> `(L, H)`. Uniform over n slots gives
    log(n); all mass on one slot, or none on the history, gives 0. With `normalized`, each user's
    entropy is divided by log(its history length) (users with one item count as 0).
    """
    p = renormalize_history(history_attn, history_mask)
    plogp = torch.where(p > 0, p * torch.log(p.clamp(min=_TINY)), torch.zeros_like(p))
    entropy = -plogp.sum(dim=-1)  # (L, H, B)
    if normalized:
        lengths = history_mask.sum(dim=-1).to(entropy.device, entropy.dtype)  # (B,)
        log_n = torch.log(lengths.clamp(min=1))
        entropy = torch.where(
            log_n > 0, entropy / log_n.clamp(min=_TINY), torch.zeros_like(entropy)
        )
    return entropy.mean(dim=-1)


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient along the last dim of non-negative values: 0 when all equal,
    (n-1)/n when one value holds everything. All-zero rows give 0."""
    x, _ = values.float().sort(dim=-1)
    n = x.shape[-1]
    rank = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    total = x.sum(dim=-1)
    g = ((2 * rank - n - 1) * x).sum(dim=-1) / (n * total.clamp(min=_TINY))
    return torch.where(total > _TINY, g, torch.zeros_like(g))


def column_concentration(
    history_attn: torch.Tensor, history_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How much every user's `<EMB>` attends the SAME history slot (barcode strips).

    history_attn `(..., B, n)`, history_mask `(B, n)`. Each user's row is renormalized over its
    history, then summed over users into column masses `(..., n)`. Returns `top1_share` (largest
    column / total) and `gini` (over the n columns), each `(...)`.
    """
    columns = renormalize_history(history_attn, history_mask).sum(dim=-2)  # (..., n)
    total = columns.sum(dim=-1)
    top1 = columns.max(dim=-1).values / total.clamp(min=_TINY)
    return {
        "top1_share": torch.where(total > _TINY, top1, torch.zeros_like(top1)),
        "gini": gini(columns),
    }


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Boundaries of runs of equal values; every member of a run gets the run's mean rank.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan if either side is constant or
    there are fewer than 2 points."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def item_attention(
    history_attn: torch.Tensor,
    history_mask: torch.Tensor,
    history_items: torch.Tensor,
    n_items: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean renormalized attention each item receives when it is in a history, per layer.

    history_attn `(L, H, B, n)` (averaged over heads here), history_mask `(B, n)`, history_items
    `(B, n)` item_idx (-1 pad). Returns `(L, n_items)` mean attention and `(n_items,)` counts of
    occurrences (0 = never in a probe history).
    """
    p = renormalize_history(history_attn.mean(dim=1), history_mask)  # (L, B, n)
    items = history_items.to(p.device).long()
    valid = (items >= 0) & history_mask.to(p.device)
    flat_items = items[valid]  # (V,)
    L = p.shape[0]
    sums = torch.zeros(L, n_items, dtype=p.dtype, device=p.device)
    sums.index_add_(1, flat_items, p[:, valid])
    counts = torch.bincount(flat_items, minlength=n_items).to(p.dtype)
    return sums / counts.clamp(min=1), counts


def frequency_correlation(
    history_attn: torch.Tensor,
    history_mask: torch.Tensor,
    history_items: torch.Tensor,
    item_frequency: np.ndarray,
) -> np.ndarray:
    """Per layer, Spearman correlation between items' training frequency and the mean attention
    they receive in the probe histories (the ID shortcut: popular items pull attention).

    item_frequency `(N,)` counts. Returns `(L,)`; only items that occur in a history count.
    """
    mean_attn, counts = item_attention(
        history_attn, history_mask, history_items, len(item_frequency)
    )
    seen = (counts > 0).cpu().numpy()
    freq = np.asarray(item_frequency)[seen]
    return np.array([spearman(freq, layer[seen]) for layer in mean_attn.cpu().numpy()])
