"""The frozen lower layers' output per user sequence, computed once and cached on disk
(`$KARMA_HOME/sequence_cache`, keyed by backbone, frozen depth, prompt prefix, item states and
sequences), for `karma.sequence.UserSequences`: a step of the sequence objective then runs only
the trainable top layers."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.atomic import write_tensor_atomic
from karma.batching import pad_sequences
from karma.config import Config
from karma.model import KarmaModel


@torch.no_grad()
def lower_states(
    model: KarmaModel,
    prefix: list[int],
    x_all: torch.Tensor,
    items: list[list[int]],
    batch_size: int,
    progress: bool,
    keep_kv: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The frozen lower layers over `<bos> History: x_1 .. x_{n-1}` of every user, by length:
    per user the residual stream entering the first trainable layer (T, d), and with keep_kv
    the lower layers' key/values (L, 2, h, T, hd), all bf16 on CPU."""
    from transformers import DynamicCache

    prefix_emb = model.embed_tokens(torch.tensor([prefix], device=model.device))[0]  # (P, d)
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    out: list[torch.Tensor | None] = [None] * len(items)
    kv: list[torch.Tensor | None] = [None] * len(items)
    users_per_batch = max(1, batch_size // 16)
    starts = range(0, len(order), users_per_batch)
    for s in tqdm(starts, desc="cache lower layers", disable=not progress, leave=False):
        idx = order[s : s + users_per_batch]
        lengths = [len(prefix) + len(items[i]) - 1 for i in idx]
        emb = torch.zeros(len(idx), max(lengths), x_all.shape[1], device=model.device)
        mask = torch.zeros(len(idx), max(lengths), dtype=torch.long, device=model.device)
        for b, i in enumerate(idx):
            hist = torch.tensor(items[i][:-1], device=model.device)
            emb[b, : len(prefix)] = prefix_emb
            emb[b, len(prefix) : lengths[b]] = x_all[hist]
            mask[b, : lengths[b]] = 1
        past = DynamicCache() if keep_kv else None
        lower = model.run_lower(emb, mask, past=past)
        for b, i in enumerate(idx):
            out[i] = lower[b, : lengths[b]].to(torch.bfloat16).cpu()
            if keep_kv:
                n = lengths[b]
                pairs = [torch.stack((k.keys[b, :, :n], k.values[b, :, :n])) for k in past.layers]
                kv[i] = torch.stack(pairs).to(torch.bfloat16).cpu()  # (L, 2, h, n, hd)
    return out, (kv if keep_kv else None)  # type: ignore[return-value]


@torch.no_grad()
def suffix_states(
    model: KarmaModel,
    target_ids: list[list[int]],
    starts: list[int],
    batch_size: int,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Lower states of " Next: {x_n text}<eos>" per user on their own (they meet the history only
    in the trainable top layers), positions continuing at starts[u]; right-padded batches, so
    each row's real tokens are exact. -> per user (len(next) + len(target), d) bf16."""
    next_ids = model.prompt.next_ids
    seqs = [next_ids + list(t) for t in target_ids]
    out: list[torch.Tensor] = []
    batches = range(0, len(seqs), batch_size)
    for s in tqdm(batches, desc="cache target text", disable=not progress, leave=False):
        chunk = seqs[s : s + batch_size]
        ids, mask, _ = pad_sequences(chunk, model.prompt.pad_id)
        ids, mask = ids.to(model.device), mask.to(model.device)
        offsets = torch.tensor(starts[s : s + batch_size], device=model.device)[:, None]
        position_ids = offsets + torch.arange(ids.shape[1], device=model.device)[None]
        lower = model.run_lower(model.embed_tokens(ids), mask, position_ids)
        out += [lower[b, : len(seq)].to(torch.bfloat16).cpu() for b, seq in enumerate(chunk)]
    return out


def cache_key(cfg: Config, prefix: list[int], x_all: torch.Tensor, items: list[list[int]]) -> str:
    h = hashlib.sha256()
    h.update(repr((cfg.model.backbone, cfg.model.freeze_layers, prefix)).encode())
    h.update(x_all.detach().float().cpu().numpy().tobytes())
    for seq in items:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def load_or_compute(path: Path, compute: Any) -> Any:
    """torch.load(path) if it exists, else compute() written there atomically."""
    if path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    write_tensor_atomic(path, value)
    return value


def cache_dir() -> Path:
    from karma.backbones import karma_home

    return karma_home() / "sequence_cache"
