"""Semantic fidelity: can the user embedding u be decoded back into the target item's text?

    texts = karma.inference.decode_from_embedding(model, user_emb)   # greedy text from R(u)
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

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.losses import TokenCrossEntropy
from karma.metrics import target_ranks

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


def catalog_ranks(
    query_emb: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor
) -> np.ndarray:
    """0-based rank of each target among all items by inner product, ties pessimistic
    (`karma.metrics.target_ranks` over the whole catalog).

    query_emb `(B, k)`, item_emb `(N, k)`, targets `(B,)` item_idx -> `(B,)` int64.
    """
    scores = (query_emb.float() @ item_emb.float().T).numpy()  # (B, N)
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return target_ranks(ids, np.asarray(targets), scores)


def rank_metrics(
    ranks: np.ndarray, prefix: str = "text_query_", ks: Sequence[int] = (10,)
) -> dict[str, float]:
    """Median rank (1 = best), MRR and hr@k of 0-based ranks."""
    ranks = torch.as_tensor(np.asarray(ranks)).float() + 1  # 1-based
    out = {f"{prefix}rank_median": float(ranks.median()), f"{prefix}mrr": float((1 / ranks).mean())}
    for k in ks:
        out[f"{prefix}hr@{k}"] = float((ranks <= k).float().mean())
    return out


def _reconstruction_states(
    model: torch.nn.Module, user_emb: torch.Tensor, target_texts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[R(u)] {target text}<eos>` through the decoder: last hidden states `(B, T, d)` and the
    labels `(B, T)` (-100 off the text), as L_rec sees them in training."""
    from karma.batching import pad_sequences

    m = model.cfg.model.rec_tokens
    seqs, labels = zip(*(model.prompt.rec(model.prompt.target(t)) for t in target_texts))
    ids, mask, _ = pad_sequences(seqs, model.prompt.pad_id)  # right padding: R(u) at 0..m-1
    label_ids, _, _ = pad_sequences(labels, -100)
    ids, mask, label_ids = ids.to(model.device), mask.to(model.device), label_ids.to(model.device)
    prefix = model.reconstruction_prefix(user_emb.to(model.device))  # (B, m, d)
    text_emb = model.embed_tokens(ids[:, m:])  # (B, T - m, d)
    hidden = model.run_decoder(torch.cat([prefix.to(text_emb.dtype), text_emb], dim=1), mask)
    return hidden, label_ids


def reconstruction_loss(
    model: torch.nn.Module, user_emb: torch.Tensor, target_texts: Sequence[str]
) -> torch.Tensor:
    """L_rec exactly as in training: `[R(u)] {target text}<eos>`, cross-entropy on the text."""
    hidden, labels = _reconstruction_states(model, user_emb, target_texts)
    return TokenCrossEntropy()(hidden, labels, model.base_lm.get_output_embeddings())


@torch.no_grad()
def reconstruction_nll(
    model: torch.nn.Module,
    user_emb: torch.Tensor,
    target_texts: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Teacher-forced L_rec of each example, `(B,)`: the mean -log p of its text tokens given
    R(u). Greedy decoding judges only the most likely continuation, so a decoder whose first
    token collapses onto one title reads as knowing nothing; this scores the whole target text,
    and with another user's u in place of the own (`analyze`'s `rec_nll_other`) says how much
    of it u itself carries."""
    lm_head = model.base_lm.get_output_embeddings()
    out = []
    for start in range(0, len(user_emb), batch_size):
        hidden, labels = _reconstruction_states(
            model, user_emb[start : start + batch_size], target_texts[start : start + batch_size]
        )
        nll, rows = TokenCrossEntropy.token_nll(hidden, labels, lm_head)  # (N,), (N,)
        tokens = (labels[:, 1:] != -100).sum(dim=1)  # (b,)
        out.append(torch.zeros(len(labels)).index_add_(0, rows.cpu(), nll.cpu()) / tokens.cpu())
    return torch.cat(out)


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
