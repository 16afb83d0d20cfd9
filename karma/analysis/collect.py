"""Run a KarmaModel's user tower with eager attention and keep what the sink metrics need.

    with eager_attention(model.base_lm):
        probe = collect_emb_attention(model, histories, queries, catalog, item_texts)
    summary = summarize_attention(probe, item_frequency, eps=0.3)   # per-layer arrays + scalars

Only `<EMB>`'s attention to the first token and to each history slot is kept per user (plus the
running first-token scores over all query positions for Gu et al.'s sink rate), so the probe
costs O(L H B n) memory whatever the prompt length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.analysis import attention as A
from karma.inference import build_user_inputs


@contextmanager
def eager_attention(backbone: torch.nn.Module) -> Iterator[None]:
    """Switch a HF model to eager attention (the only one that returns attention weights) and
    back. Sdpa and eager compute the same function, so results do not change."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone  # peft
    previous = base.config._attn_implementation
    if previous != "eager":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            base.set_attn_implementation(previous)


@dataclass
class EmbAttention:
    """`<EMB>`'s attention of B probe users, gathered per layer and head.

    first `(L, H, B)`: to the first real token; history `(L, H, B, n)`: to each history slot
    (oldest first, 0 where the user has fewer items); history_mask `(B, n)`; history_items
    `(B, n)` item_idx (-1 pad); all_first `(L, H)`: mean attention to the first token over all
    query positions after it (Gu et al.'s sink score), over the B users.
    """

    first: torch.Tensor
    history: torch.Tensor
    history_mask: torch.Tensor
    history_items: torch.Tensor
    all_first: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.first.shape[0]


def _pad_right(t: torch.Tensor, n: int, value: float) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, n - t.shape[-1]), value=value)


@torch.no_grad()
def collect_emb_attention(
    model: torch.nn.Module,
    histories: Sequence[Sequence[int]],
    queries: Sequence[str],
    catalog: object,
    item_texts: Sequence[str],
    batch_size: int = 16,
    progress: bool = True,
) -> EmbAttention:
    """Forward the user prompts through the model's decoder with `output_attentions=True` (it
    must use eager attention: see `eager_attention(model.base_lm)`) and gather `<EMB>`'s rows."""
    device = next(model.parameters()).device
    firsts, hists, masks, items = [], [], [], []
    all_sum, all_count = None, 0.0
    starts = range(0, len(histories), batch_size)
    for start in tqdm(starts, desc="attention probe", disable=not progress, leave=False):
        batch_hist = [list(h) for h in histories[start : start + batch_size]]
        inputs = build_user_inputs(
            model,
            batch_hist, list(queries[start : start + batch_size]), catalog, item_texts
        )
        attention_mask = inputs["attention_mask"].to(device)
        # The decoder alone (no LM head over the vocabulary), with the model's position ids.
        # Item IDs and late image maps join the residual stream as in run_decoder.
        with model.history_residual_injected(inputs["history_ids"]):
            out = model.base_lm.get_decoder()(
                inputs_embeds=inputs["inputs_embeds"].to(device),
                attention_mask=attention_mask,
                position_ids=inputs["position_ids"].to(device),
                output_attentions=True,
                use_cache=False,
            )
        attn = A.to_lhbqk(out.attentions)  # (L, H, B, T, T)
        first_positions = inputs["first_positions"].to(device)
        history_positions = inputs["history_positions"].to(device)  # (B, n), -1 pad
        T = attention_mask.shape[1]
        # Gu et al.: every real query after the first token (the first token attends only itself).
        query_mask = attention_mask.bool() & (
            torch.arange(T, device=device)[None] > first_positions[:, None]
        )  # (B, T)
        count = float(query_mask.sum())
        scores = A.key_attention(attn, first_positions, query_mask) * count  # (L, H)
        all_sum = scores if all_sum is None else all_sum + scores
        all_count += count
        emb = A.select_queries(attn, inputs["emb_positions"].to(device))  # (L, H, B, T)
        firsts.append(A.gather_keys(emb, first_positions).cpu())  # (L, H, B)
        hists.append(A.gather_keys(emb, history_positions).cpu())  # (L, H, B, n)
        masks.append((history_positions >= 0).cpu())
        item_ids = torch.full(history_positions.shape, -1, dtype=torch.long)
        for b, h in enumerate(batch_hist):
            item_ids[b, : len(h)] = torch.tensor(h, dtype=torch.long)  # one slot per item
        items.append(item_ids)
    n = max(h.shape[-1] for h in hists)
    return EmbAttention(
        first=torch.cat(firsts, dim=2),
        history=torch.cat([_pad_right(h, n, 0.0) for h in hists], dim=2),
        history_mask=torch.cat([_pad_right(m, n, False) for m in masks]),
        history_items=torch.cat([_pad_right(i, n, -1) for i in items]),
        all_first=(all_sum / max(all_count, 1.0)).cpu(),
    )


def summarize_attention(
    probe: EmbAttention, item_frequency: np.ndarray | None = None, eps: float = 0.3
) -> dict[str, object]:
    """Scalars and per-layer arrays (numpy, length L) of the sink metrics.

    Scalars: sink_rate_first (all queries, Gu et al.), sink_rate_first_emb (<EMB> query only),
    sink_rate_history (<EMB> query, top history slot), emb_to_first_mass, history_mass, entropy,
    entropy_norm, top1_share, gini, freq_spearman (means over layers). Per layer under
    `layers`: the same names. Maps under `maps`: first_scores / history_scores `(L, H)`.
    """
    mask = probe.history_mask
    emb_first_scores = probe.first.mean(dim=2)  # (L, H) mean over users
    history_scores, _ = A.history_sink_scores(probe.history, mask)  # (L, H)
    entropy = A.history_entropy(probe.history, mask)  # (L, H)
    entropy_norm = A.history_entropy(probe.history, mask, normalized=True)
    concentration = A.column_concentration(probe.history.mean(dim=1), mask)  # (L,) each
    layers = {
        "sink_rate_first": A.sink_rate_per_layer(probe.all_first, eps),
        "sink_rate_first_emb": A.sink_rate_per_layer(emb_first_scores, eps),
        "sink_rate_history": A.sink_rate_per_layer(history_scores, eps),
        "emb_to_first_mass": emb_first_scores.mean(dim=1),
        "history_mass": probe.history.sum(dim=-1).mean(dim=(1, 2)),
        "entropy": entropy.mean(dim=1),
        "entropy_norm": entropy_norm.mean(dim=1),
        "top1_share": concentration["top1_share"],
        "gini": concentration["gini"],
    }
    layers = {k: v.numpy().astype(np.float64) for k, v in layers.items()}
    if item_frequency is not None:
        layers["freq_spearman"] = A.frequency_correlation(
            probe.history, mask, probe.history_items, item_frequency
        )
    scalars = {
        k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in layers.items()
    }
    scalars["sink_rate_first"] = A.sink_rate(probe.all_first, eps)
    scalars["sink_rate_first_emb"] = A.sink_rate(emb_first_scores, eps)
    scalars["sink_rate_history"] = A.sink_rate(history_scores, eps)
    return {
        **scalars,
        "layers": layers,
        "maps": {
            "first_scores": probe.all_first.numpy(),
            "emb_first_scores": emb_first_scores.numpy(),
            "history_scores": history_scores.numpy(),
        },
    }
