"""Semantic fidelity: can the user embedding u be decoded back into the target item's text?

    prefix = model.reconstruction_prefix(user_emb)             # (B, m, d) soft tokens R(u)
    token_ids = greedy_decode(model.backbone, prefix, eos_token_id=model.tokenizer.eos_token_id)
    texts = model.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    scores = text_metrics(texts, target_texts, target_categories)  # token_f1, rouge_l, ...

For a model trained without L_rec (presets action_only, gen) R never learned anything, so
`fit_reconstruction_head` fits it post hoc with everything else frozen, on the same data (the
target texts of training examples) and for the same number of steps, before decoding.

Metric definitions (recorded in docs/decisions.md). Texts are compared as lowercase alphanumeric
tokens (`normalize_tokens`):
- `token_f1`: F1 of the bag-of-tokens overlap (SQuAD style); `rouge_l`: F1 of the longest common
  subsequence (precision LCS/|decoded|, recall LCS/|target|); `exact_match`: equal token sequences.
- `genre_any` / `genre_all`: share of decoded texts containing at least one / all of the target's
  categories (a category matches when its tokens occur contiguously in the decoded tokens, so
  "Children's" matches "children s" and "Sci-Fi" matches "sci fi"); over targets with categories.
- `text_query_*`: the decoded text is encoded by the item tower and used as a query over the
  catalog: rank of the true item (1 = best; ties count against it), reported as median rank, MRR
  and hr@10.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)


def normalize_tokens(text: str) -> list[str]:
    """Lowercase alphanumeric tokens: "Toy Story (1995) | Children's" ->
    ['toy', 'story', '1995', 'children', 's']."""
    return _TOKEN.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 between two texts (1.0 when both are empty)."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(|a| |b|) dynamic programme, one row kept)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on normalized tokens (1.0 when both are empty)."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_tokens(prediction) == normalize_tokens(reference))


def _contains(tokens: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(tokens[i : i + n] == phrase for i in range(len(tokens) - n + 1))


def genre_match(prediction: str, categories: Sequence[str]) -> tuple[bool, bool]:
    """(contains at least one category, contains all categories) of a decoded text."""
    tokens = normalize_tokens(prediction)
    hits = [_contains(tokens, normalize_tokens(c)) for c in categories]
    return any(hits), bool(hits) and all(hits)


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    categories: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Mean token_f1, rouge_l, exact_match, and genre_any / genre_all over the examples whose
    target has categories (nan if none has)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    out = {
        "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(predictions, references)])),
        "rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)])),
        "exact_match": float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)])),
    }
    if categories is not None:
        matches = [genre_match(p, c) for p, c in zip(predictions, categories) if len(c) > 0]
        out["genre_any"] = float(np.mean([m[0] for m in matches])) if matches else float("nan")
        out["genre_all"] = float(np.mean([m[1] for m in matches])) if matches else float("nan")
    return out


def target_ranks(
    query_emb: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """1-based rank of each target among all items by inner product; items tied with the target
    rank ahead of it (pessimistic, so ties never inflate the metric).

    query_emb `(B, k)`, item_emb `(N, k)`, targets `(B,)` item_idx -> `(B,)` long.
    """
    scores = query_emb.float() @ item_emb.float().T  # (B, N)
    targets = targets.long()
    target_score = scores.gather(1, targets[:, None])  # (B, 1)
    ahead = (scores >= target_score).sum(dim=1)  # includes the target itself
    return ahead


def rank_metrics(
    ranks: torch.Tensor, prefix: str = "text_query_", ks: Sequence[int] = (10,)
) -> dict[str, float]:
    """Median rank, MRR and hr@k of 1-based ranks."""
    ranks = ranks.float()
    out = {f"{prefix}rank_median": float(ranks.median()), f"{prefix}mrr": float((1 / ranks).mean())}
    for k in ks:
        out[f"{prefix}hr@{k}"] = float((ranks <= k).float().mean())
    return out


def _cache_keyword(backbone: torch.nn.Module) -> str:
    """transformers >= 5.24 calls the KV cache argument `cache` (`past_key_values` before)."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone  # peft
    return (
        "cache"
        if "cache" in inspect.signature(type(base).forward).parameters
        else ("past_key_values")
    )


@torch.no_grad()
def greedy_decode(
    backbone: torch.nn.Module,
    prefix_embeds: torch.Tensor,
    eos_token_id: int,
    max_new_tokens: int = 32,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy tokens generated after soft prefix embeddings, stopping at eos (not included).

    backbone: a HF causal LM; prefix_embeds `(B, m, d)` (R(u): nothing from the history is
    visible); embed: token ids `(B, 1)` -> `(B, 1, d)` (default: the backbone's input
    embeddings; KarmaModel passes `embed_tokens`, its learnable special rows included). Uses the
    KV cache, so each step feeds only the last token.
    """
    embed = embed or backbone.get_input_embeddings()
    B = prefix_embeds.shape[0]
    cache_kw = _cache_keyword(backbone)
    out = backbone(inputs_embeds=prefix_embeds, use_cache=True)
    cache, logits = getattr(out, cache_kw), out.logits[:, -1]  # (B, V)
    tokens: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=prefix_embeds.device)
    for _ in range(max_new_tokens):
        next_ids = logits.argmax(dim=-1)  # (B,)
        finished |= next_ids == eos_token_id
        for b in (~finished).nonzero().flatten().tolist():
            tokens[b].append(int(next_ids[b]))
        if bool(finished.all()):
            break
        # Finished rows keep decoding (the batch stays rectangular); their tokens are dropped.
        out = backbone(inputs_embeds=embed(next_ids[:, None]), use_cache=True, **{cache_kw: cache})
        cache, logits = getattr(out, cache_kw), out.logits[:, -1]
    return tokens


@torch.no_grad()
def decode_user_embeddings(
    model: torch.nn.Module, user_emb: torch.Tensor, max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy text from R(u) for each row of user_emb `(B, k)` (nothing else visible)."""
    device = next(model.parameters()).device
    tokenizer = model.tokenizer
    texts: list[str] = []
    for start in range(0, user_emb.shape[0], batch_size):
        prefix = model.reconstruction_prefix(user_emb[start : start + batch_size].to(device))
        ids = greedy_decode(
            model.base_lm, prefix, tokenizer.eos_token_id, max_new_tokens, embed=model.embed_tokens
        )
        texts.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    return texts


def reconstruction_loss(
    model: torch.nn.Module, user_emb: torch.Tensor, target_texts: Sequence[str]
) -> torch.Tensor:
    """L_rec exactly as in training: `[R(u)] {target text}<eos>`, cross-entropy on the text."""
    from karma.batching import pad_sequences

    m = model.cfg.model.rec_tokens
    seqs, labels = zip(*(model.prompt.rec(model.prompt.target(t)) for t in target_texts))
    ids, mask, _ = pad_sequences(seqs, model.prompt.pad_id)  # right padding: R(u) at 0..m-1
    label_ids, _, _ = pad_sequences(labels, -100)
    ids, mask, label_ids = ids.to(model.device), mask.to(model.device), label_ids.to(model.device)
    prefix = model.reconstruction_prefix(user_emb.to(model.device))  # (B, m, d)
    text_emb = model.embed_tokens(ids[:, m:])  # (B, T - m, d)
    hidden = model.run_decoder(torch.cat([prefix.to(text_emb.dtype), text_emb], dim=1), mask)
    return model.token_loss(hidden, label_ids, model.base_lm.get_output_embeddings())


def fit_reconstruction_head(
    model: torch.nn.Module,
    user_emb: torch.Tensor,
    target_texts: Sequence[str],
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    schedule: Callable[[int], float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit R (rec_head, rec_norm) post hoc with everything else frozen; returns the losses.

    user_emb `(N, k)`: u of training examples from the frozen model (computed once, since
    nothing upstream of R changes), target_texts their targets. Batches are drawn from seeded
    permutations of the N examples, `steps` AdamW steps with `schedule(step)` scaling lr (the
    training run's warmup + cosine, for a fair comparison with a jointly trained R). Other
    parameters' requires_grad flags are restored afterwards; the model is left in eval mode.
    """
    if len(user_emb) != len(target_texts):
        raise ValueError(f"{len(user_emb)} user embeddings vs {len(target_texts)} target texts")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    head = [*model.rec_head.parameters(), *model.rec_norm.parameters()]
    for p in head:
        p.requires_grad_(True)
    model.eval()  # the frozen backbone runs without dropout
    optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or (lambda step: 1.0))
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(len(user_emb)) for _ in range(steps * batch_size // len(user_emb) + 1)]
    )
    losses = []
    try:
        for step in tqdm(range(steps), desc="fit R post hoc", disable=not progress, leave=False):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = reconstruction_loss(model, user_emb[idx], [target_texts[i] for i in idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return losses
