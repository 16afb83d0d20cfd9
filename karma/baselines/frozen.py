"""Frozen-LLM baseline: the backbone's own hidden states, no fine-tuning at all.

    user_emb, item_emb = encode_frozen(data, examples, cfg)     # cfg.model.backbone
    emb = encode_last_token(model, tokenizer, ["Toy Story (1995) | Animation"])   # (B, d)

item = L2-normalized last-layer hidden state at the last token of the rendered item text (the
same text the KARMA item tower reads). user = normalized mean of the user's (capped) history item
embeddings; when the example has a query, the normalized last-token state of the query text is
added with equal weight, and the sum normalized again. This is what KARMA's towers start from
before training, so the gap to it measures what fine-tuning adds.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.config import Config


@torch.no_grad()
def encode_last_token(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = 64,
    max_length: int = 64,
    desc: str = "encode",
) -> np.ndarray:
    """(B, d) float32: last-layer hidden state at each text's last real token, L2-normalized."""
    base = model.base_model  # the decoder without the LM head: no (B, T, vocab) logits
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding: real tokens keep positions 0..len-1 (left padding would shift them).
    tokenizer.padding_side = "right"
    # Longest texts first keeps padding low within a batch; the order is undone at the end.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        hidden = base(**batch).last_hidden_state  # (B, T, d)
        mask = batch["attention_mask"]  # (B, T)
        # Index of the last real token: the rightmost 1 in the mask.
        positions = torch.arange(mask.shape[1])
        last = (mask * positions).argmax(dim=1)  # (B,)
        states = hidden[torch.arange(len(idx)), last].float()  # (B, d)
        out[idx] = torch.nn.functional.normalize(states, dim=-1).numpy()
    return out


def pool_users(
    item_emb: np.ndarray, histories: list[list[int]], query_emb: np.ndarray | None = None
) -> np.ndarray:
    """(U, d): normalized mean of history item embeddings (+ normalized query embedding)."""
    users = np.zeros((len(histories), item_emb.shape[1]), dtype=np.float32)
    for row, history in enumerate(histories):
        if len(history):
            users[row] = item_emb[np.asarray(history, dtype=np.int64)].mean(axis=0)
    users /= np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    if query_emb is not None:
        users = users + query_emb
        users /= np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
    return users


def encode_frozen(data, examples, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(user_emb (U, d), item_emb (N, d)) from the frozen `cfg.model.backbone`."""
    from karma.backbones import load_backbone

    model, tokenizer = load_backbone(cfg.model.backbone)
    model.requires_grad_(False)
    bs = cfg.baseline.text_batch_size
    item_emb = encode_last_token(
        model, tokenizer, list(data.items.texts), bs, cfg.model.max_item_tokens, "frozen items"
    )
    queries = list(examples.queries)
    query_emb = None
    if any(queries):
        query_emb = encode_last_token(
            model, tokenizer, queries, bs, cfg.model.max_query_tokens, "frozen queries"
        )
        query_emb[[not q for q in queries]] = 0.0  # no query: the history alone
    return pool_users(item_emb, list(examples.histories), query_emb), item_emb
