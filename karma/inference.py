"""Inference with a KarmaModel: encode a catalog, encode users, decode text from u.

    model, cfg = karma.checkpoint.load_model(checkpoint_dir)
    catalog = encode_catalog(model, item_texts, batch_size=64)     # CatalogEncoding
    user_emb = encode_users(model, histories, queries, catalog, item_texts)   # (B, k)
    texts = decode_from_embedding(model, user_emb)                  # greedy text from R(u)

Everything here runs in eval mode without gradients (the model's mode is restored afterwards)
and returns float32 tensors on CPU. Prompts come from karma/batching.py, the same layout and
collation as training, so an embedding computed here equals the one the loss saw (tested).
Evaluation, analysis, the training loop's validation and serving all use this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from karma.atomic import write_tensor_atomic
from karma.batching import collate_user_prompts, history_id_map, pad_sequences
from karma.distributed import gather_no_grad
from karma.errors import KarmaError
from karma.model import KarmaModel, cache_keyword


@dataclass
class CatalogEncoding:
    """Item tower outputs for a catalog, float32 on CPU, rows in item_idx order."""

    item_emb: torch.Tensor  # (N, k) L2-normalized e_i
    item_hidden: torch.Tensor  # (N, d) h_i, the input of P_h for history tokens
    # (N,) each row's index in the model's catalog, where its ID embedding and image table row
    # are (-1: text that is no catalog item); None: row n is item n (the whole catalog)
    item_ids: torch.Tensor | None = None

    def model_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """Row indices (any shape, -1 = none) -> indices in the model's catalog (-1 stays)."""
        if self.item_ids is None:
            return rows
        ids = self.item_ids.to(rows.device)[rows.clamp(min=0)]
        return torch.where(rows >= 0, ids, rows)


def check_image_features(model: KarmaModel, image_features: Any, n: int) -> torch.Tensor | None:
    """Image features as a float32 (n, image_dim) tensor, or None for a model without images."""
    image_dim = model.cfg.model.image_dim
    if image_dim <= 0:
        if image_features is not None:
            raise KarmaError("image_features given but the model has model.image_dim=0")
        return None
    if image_features is None:
        raise KarmaError(
            f"the model has an image token (model.image_dim={image_dim}); pass image_features"
        )
    feats = torch.as_tensor(np.asarray(image_features), dtype=torch.float32)
    if feats.shape != (n, image_dim):
        raise KarmaError(
            f"image_features: expected shape ({n}, {image_dim}), got {tuple(feats.shape)}"
        )
    return feats


@torch.no_grad()
def encode_catalog(
    model: KarmaModel,
    item_texts: Sequence[str],
    batch_size: int = 64,
    image_features: np.ndarray | torch.Tensor | None = None,
    progress: bool = True,
    item_ids: Sequence[int] | None = None,
) -> CatalogEncoding:
    """Item tower over a catalog; rows follow `item_texts` (and `image_features`). item_ids
    (N,): each row's index in the model's catalog, for a part of it (a probe's local catalog)
    or -1 for text that is no item (decoded text): a hybrid model's ID embeddings are looked up
    there; default: row n is item n."""
    feats = check_image_features(model, image_features, len(item_texts))
    rows = None
    if item_ids is not None:
        rows = torch.as_tensor(np.asarray(item_ids, dtype=np.int64))
        if rows.shape != (len(item_texts),):
            raise KarmaError(
                f"item_ids: expected {len(item_texts)} catalog indices, got {tuple(rows.shape)}"
            )
    # Each row's features go with it, to the image token and to the late image maps
    # (model.image_fusion), so any catalog is encoded right (the model's, a probe's local one).
    tower_reads_image = feats is not None and model.cfg.model.image_token
    was_training = model.training
    model.eval()
    prompt = model.prompt
    seqs = [
        prompt.item(ids, image=tower_reads_image)
        for ids in prompt.encode_many(list(item_texts))
    ]
    # A frozen item tower (model.train_item_tower=false: the pretrained LLM, adapters off) is a
    # pure function of the backbone, the <ITEM> row and the item tokens: its states are kept on
    # disk, so training, validation and evaluation of the same catalog run it once.
    cache_path = None
    if not model.cfg.model.train_item_tower and not tower_reads_image:
        cache_path = _frozen_catalog_path(model, seqs)
        if cache_path.exists():
            item_hidden = torch.load(cache_path, weights_only=True)
            ids = torch.arange(len(seqs)) if rows is None else rows
            late = feats.to(model.device) if feats is not None else None
            item_emb = model.item_embedding(item_hidden.to(model.device), ids.to(model.device),
                                            late)  # fmt: skip
            model.train(was_training)
            return CatalogEncoding(item_emb.float().cpu(), item_hidden, rows)
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    item_emb = torch.zeros(len(seqs), model.cfg.model.emb_dim)
    item_hidden = torch.zeros(len(seqs), model.hidden_size)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="encode items", disable=not progress, leave=False):
        idx = order[s : s + batch_size]
        ids, mask, _ = pad_sequences([seqs[i] for i in idx], prompt.pad_id)
        img = feats[idx].to(model.device) if feats is not None else None
        item_ids = torch.tensor(idx, dtype=torch.long) if rows is None else rows[idx]
        item_ids = item_ids.to(model.device)
        hidden, emb = model.encode_items(
            ids.to(model.device), mask.to(model.device), img, item_ids=item_ids
        )
        item_emb[idx] = emb.float().cpu()
        item_hidden[idx] = hidden.float().cpu()
    if cache_path is not None:
        write_tensor_atomic(cache_path, item_hidden)
    model.train(was_training)
    return CatalogEncoding(item_emb=item_emb, item_hidden=item_hidden, item_ids=rows)


def _frozen_catalog_path(model: KarmaModel, seqs: list[list[int]]) -> Path:
    """$KARMA_HOME/catalog_cache/<key>.pt, the key hashing everything the frozen tower reads: the
    item token sequences, the <ITEM>/<EMB> rows and a strided sample of every backbone weight."""
    h = hashlib.sha256()
    h.update(repr((model.cfg.model.backbone, model.hidden_size)).encode())
    h.update(model.special_embeds.detach().float().cpu().numpy().tobytes())
    for name, p in model.base_lm.named_parameters():
        if "lora_" not in name:
            h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    for seq in seqs:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
    from karma.backbones import karma_home

    return karma_home() / "catalog_cache" / f"{h.hexdigest()[:24]}.pt"


@torch.no_grad()
def catalog_from_history_cache(model: KarmaModel) -> CatalogEncoding | None:
    """The catalog encoding from `model.history_cache` when the item tower is frozen
    (model.train_item_tower=false, no image token), else None.

    The frozen tower's states are the cache itself, so the training loop's validation need
    not run the item tower again (about a minute per validation for ML-100K on the CPU). Late
    image maps read the image table the cache was filled with.
    """
    cache = model.history_cache
    if model.cfg.model.train_item_tower or model.cfg.model.image_token or cache.shape[0] == 0:
        return None
    ids = torch.arange(cache.shape[0], device=cache.device)
    item_emb = model.item_embedding(cache, ids)
    return CatalogEncoding(item_emb=item_emb.float().cpu(), item_hidden=cache.float().cpu())


def build_user_inputs(
    model: KarmaModel,
    histories: Sequence[Sequence[int]],
    queries: Sequence[str],
    catalog: CatalogEncoding | None,
    item_texts: Sequence[str] | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Inputs of the user tower without targets, on the model's device.

    Returns inputs_embeds (B, T, d), attention_mask (B, T), position_ids (B, T),
    emb_positions (B,), history_positions (B, n) (-1 padded; <HIST> tokens, or the last
    token of each item text for the text interface), first_positions (B,) (<bos>) and
    history_ids (B, T) (item index per history token, for a hybrid model; None for text).
    Run `model.base_lm.get_decoder()` or `model.backbone` on them (same position ids).
    """
    if len(histories) != len(queries):
        raise KarmaError(f"{len(histories)} histories but {len(queries)} queries")
    continuous = model.cfg.model.interface == "continuous"
    if continuous and catalog is None:
        raise KarmaError("the continuous interface needs the catalog encoding")
    if not continuous and item_texts is None:
        raise KarmaError("the text interface needs item_texts")
    n_items = catalog.item_hidden.shape[0] if continuous else len(item_texts)
    for b, hist in enumerate(histories):
        for i in hist:
            if not 0 <= int(i) < n_items:
                raise KarmaError(f"histories[{b}]: item index {i} outside [0, {n_items})")
    history_texts = (
        None if continuous else [[item_texts[int(i)] for i in hist] for hist in histories]
    )
    user = collate_user_prompts(model.prompt, histories, queries, history_texts, None, padding_side)
    device = model.device
    ids, mask = user["input_ids"].to(device), user["attention_mask"].to(device)
    history_hidden = None
    history_ids = None
    if continuous:
        flat = [int(i) for h in histories for i in h]
        history_hidden = catalog.item_hidden[torch.tensor(flat, dtype=torch.long)].to(device)
        positions = user["history_positions"].to(device)
        items = torch.full(positions.shape, -1, dtype=torch.long, device=device)
        for b, hist in enumerate(histories):
            items[b, : len(hist)] = torch.tensor([int(i) for i in hist], dtype=torch.long)
        history_ids = history_id_map(catalog.model_ids(items), positions, ids.shape[1])
    return {
        "inputs_embeds": model.user_embeds(ids, history_hidden),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "emb_positions": user["emb_positions"].to(device),
        "history_positions": user["history_positions"].to(device),
        "first_positions": user["first_positions"].to(device),
        "history_ids": history_ids,
    }


@torch.no_grad()
def encode_users(
    model: KarmaModel,
    histories: Sequence[Sequence[int]],
    queries: Sequence[str],
    catalog: CatalogEncoding | None,
    item_texts: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """User embeddings u (B, k). `item_texts` is needed only by the text interface."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(histories), model.cfg.model.emb_dim)
    # Batches of similar history length waste little compute on padding.
    order = sorted(range(len(histories)), key=lambda i: len(histories[i]))
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="encode users", disable=not progress, leave=False):
        rows = order[s : s + batch_size]
        inputs = build_user_inputs(
            model, [histories[i] for i in rows], [queries[i] for i in rows], catalog, item_texts
        )
        hidden = model.run_decoder(
            inputs["inputs_embeds"], inputs["attention_mask"], inputs["history_ids"]
        )
        history_end = None
        if model.cfg.model.search_readout == "sum":  # (B,) last history token, -1 if none
            positions = inputs["history_positions"]  # (B, n), -1 padded; n = 0 for no history
            history_end = positions.new_full((positions.shape[0],), -1)
            if positions.shape[1]:
                history_end = positions.max(dim=1).values
        out[rows] = model.user_from_hidden(hidden, inputs["emb_positions"], history_end).cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def refresh_history_cache(
    model: KarmaModel,
    item_texts: Sequence[str],
    batch_size: int = 64,
    image_features: np.ndarray | torch.Tensor | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Recompute h_i of every item into `model.history_cache` (history_source=cache). Under DDP
    each rank encodes an interleaved shard and the shards are gathered."""
    n = len(item_texts)
    shard = list(range(rank, n, world_size))
    feats = check_image_features(model, image_features, n)
    enc = encode_catalog(
        model,
        [item_texts[i] for i in shard],
        batch_size,
        feats[shard] if feats is not None else None,
        progress,
    )
    hidden = enc.item_hidden.to(model.device)
    if world_size > 1:
        # Rank r holds items r, r + W, ...: gather, then undo the interleaving.
        gathered = gather_no_grad(hidden)
        index = torch.cat([torch.arange(r, n, world_size) for r in range(world_size)])
        hidden = torch.empty_like(gathered)
        hidden[index.to(model.device)] = gathered
    model.history_cache = hidden.to(model.special_embeds.dtype)
    model.set_item_statistics(hidden)


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
    embeddings; `decode_from_embedding` passes `model.embed_tokens`, its learnable special rows
    included). Uses the KV cache, so each step feeds only the last token.
    """
    embed = embed or backbone.get_input_embeddings()
    B = prefix_embeds.shape[0]
    cache_kw = cache_keyword(backbone)
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
def decode_from_embedding(
    model: KarmaModel, user_emb: torch.Tensor, max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy text from R(u) for each row of user_emb `(B, k)` (nothing else visible)."""
    tokenizer = model.tokenizer
    texts: list[str] = []
    for start in range(0, user_emb.shape[0], batch_size):
        prefix = model.reconstruction_prefix(user_emb[start : start + batch_size].to(model.device))
        ids = greedy_decode(
            model.base_lm, prefix, tokenizer.eos_token_id, max_new_tokens, embed=model.embed_tokens
        )
        texts.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    return texts
