"""Prompt layout and training batches: token ids for the item tower, the user tower and L_rec.

The layout of every sequence the LLM reads is defined here once (`PromptFormat`) and shared by
training (`BatchBuilder`) and inference (`karma.inference`); `collate_user_prompts` pads the user
prompts of a batch for both:

    item:  <bos> [<IMG>] {item text} <ITEM>
    user:  <bos> Query: {query} History: <HIST> ... <HIST> <EMB> [ Next: {target text}<eos>]
    text:  <bos> Query: {query} History: {text 1}; ...; {text n} <EMB> [ Next: ...]
    rec:   <REC> x m {target text}<eos>

`<HIST>`, `<IMG>` and `<REC>` are placeholders whose input embeddings the model replaces by
P_h(h_i), the image projection and R(u). "Query:" is left out when the query is "". With
model.prompt_layout=history_first the query follows the history instead:

    user:  <bos> History: <HIST> ... <HIST> Query: {query} <EMB> [ Next: ...]

so the key/values of a user's history serve every new query (karma/fast_user.py).

    builder = BatchBuilder(model.tokenizer, prepared.items, cfg, seed=cfg.train.seed + rank)
    batch = builder(prepared.split("train"), indices)   # dict[str, Tensor] for KarmaObjective
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from karma.config import Config, ModelConfig
from karma.errors import KarmaError
from karma.losses import loss_weights

ITEM_TOKEN = "<ITEM>"
EMB_TOKEN = "<EMB>"
HIST_TOKEN = "<HIST>"
IMG_TOKEN = "<IMG>"
REC_TOKEN = "<REC>"
SPECIAL_TOKENS = (ITEM_TOKEN, EMB_TOKEN, HIST_TOKEN, IMG_TOKEN, REC_TOKEN)
IGNORE_INDEX = -100


def add_special_tokens(tokenizer: Any) -> int:
    """Add karma's special tokens (and a pad token if missing); return how many were new."""
    if tokenizer.eos_token_id is None:
        raise KarmaError("the backbone tokenizer has no eos token; karma needs one to end targets")
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    added = 0
    if missing:
        added = tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token_id is None:
        # Padding is always masked and never labelled, so eos can double as pad.
        tokenizer.pad_token = tokenizer.eos_token
    return added


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
    value_dtype: torch.dtype = torch.long,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad lists of ids to (B, T); returns (ids, attention_mask, shift) where shift (B,) is the
    number of pad tokens placed before each sequence (non-zero only with left padding)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be left or right, got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=value_dtype)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    shift = torch.zeros(len(seqs), dtype=torch.long)
    for b, seq in enumerate(seqs):
        n = len(seq)
        start = width - n if side == "left" else 0
        ids[b, start : start + n] = torch.as_tensor(list(seq), dtype=value_dtype)
        mask[b, start : start + n] = 1
        shift[b] = start
    return ids, mask, shift


class PromptFormat:
    """Token ids of every sequence karma feeds the LLM (see the module docstring)."""

    def __init__(self, tokenizer: Any, cfg: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise KarmaError(f"tokenizer lacks karma tokens {missing}; call add_special_tokens")
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        self.item_id, self.emb_id, self.hist_id, self.img_id, self.rec_id = ids
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.query_ids = self.encode("Query:")
        self.history_ids = self.encode(" History:")
        self.history_first_ids = self.encode("History:")
        self.suffix_query_ids = self.encode(" Query:")
        self.sep_ids = self.encode(";")
        self.next_ids = self.encode(" Next:")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def item(self, text_ids: Sequence[int], image: bool = False) -> list[int]:
        """<bos> [<IMG>] text <ITEM>; the text is cut to max_item_tokens."""
        img = [self.img_id] if image else []
        return self.bos + img + list(text_ids[: self.cfg.max_item_tokens]) + [self.item_id]

    def target(self, text: str) -> list[int]:
        """The target text tokens plus <eos> (shared by L_gen and L_rec)."""
        return self.encode(" " + text)[: self.cfg.max_target_tokens] + [self.eos_id]

    def user(
        self,
        query: str,
        n_history: int = 0,
        history_texts: Sequence[str] | None = None,
        target_ids: Sequence[int] | None = None,
    ) -> tuple[list[int], list[int], int, list[int]]:
        """User sequence; returns (ids, history_positions, emb_position, labels).

        Continuous interface: `n_history` <HIST> placeholders. Text interface: `history_texts`
        written out, separated by ";" (history position = last token of each text). With
        `target_ids`, " Next: {target}<eos>" follows <EMB> and labels mark the target tokens.
        With model.readout=history a query-less continuous prompt has no <EMB>: the embedding
        position is its last <HIST>.
        """
        ids = list(self.bos)
        query_ids = self.encode(" " + query)[: self.cfg.max_query_tokens] if query else []
        if query and self.cfg.prompt_layout == "query_first":
            ids += self.query_ids + query_ids + self.history_ids
        else:
            ids += self.history_first_ids
        positions: list[int] = []
        if history_texts is None:
            positions = list(range(len(ids), len(ids) + n_history))
            ids += [self.hist_id] * n_history
        else:
            for j, text_ids in enumerate(self.encode_many([" " + t for t in history_texts])):
                ids += text_ids[: self.cfg.max_item_tokens]
                positions.append(len(ids) - 1)
                if j < len(history_texts) - 1:
                    ids += self.sep_ids
        if query and self.cfg.prompt_layout == "history_first":
            ids += self.suffix_query_ids + query_ids
        if self.cfg.readout == "history" and not query and positions and history_texts is None:
            # u is read at the last history token (model.readout=history): exactly what each
            # position of a user sequence is trained to predict under train.objective=sequence
            emb_position = positions[-1]
        else:
            emb_position = len(ids)
            ids.append(self.emb_id)
        labels = [IGNORE_INDEX] * len(ids)
        if target_ids is not None:
            ids += self.next_ids
            labels += [IGNORE_INDEX] * len(self.next_ids)
            ids += list(target_ids)
            labels += list(target_ids)
        return ids, positions, emb_position, labels

    def rec(self, target_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """<REC> x m followed by the target tokens; returns (ids, labels)."""
        m = self.cfg.rec_tokens
        return [self.rec_id] * m + list(target_ids), [IGNORE_INDEX] * m + list(target_ids)


def collate_user_prompts(
    prompt: PromptFormat,
    histories: Sequence[Sequence[int]],
    queries: Sequence[str | None],
    history_texts: Sequence[Sequence[str]] | None = None,
    target_ids: Sequence[Sequence[int]] | None = None,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """User prompts of a batch, padded: the one collation training and inference share.

    `history_texts` (one list of item texts per user) selects the text interface, else each
    history item is one <HIST> placeholder. With `target_ids`, " Next: {target}<eos>" follows
    <EMB> and `labels` (B, T) is returned too. Returns input_ids, attention_mask (B, T),
    emb_positions (B,), history_positions (B, n) (-1 padded) and first_positions (B,) (<bos>),
    positions already shifted by the padding.
    """
    seqs, hist_pos, emb_pos, labels = [], [], [], []
    for b, (hist, query) in enumerate(zip(histories, queries)):
        texts = history_texts[b] if history_texts is not None else None
        target = target_ids[b] if target_ids is not None else None
        ids, pos, e, lab = prompt.user(
            query or "", n_history=len(hist), history_texts=texts, target_ids=target
        )
        seqs.append(ids)
        hist_pos.append(pos)
        emb_pos.append(e)
        labels.append(lab)
    ids, mask, shift = pad_sequences(seqs, prompt.pad_id, padding_side)
    n = max((len(p) for p in hist_pos), default=0)
    history_positions = torch.full((len(seqs), n), -1, dtype=torch.long)
    for b, pos in enumerate(hist_pos):
        history_positions[b, : len(pos)] = torch.tensor(pos, dtype=torch.long) + shift[b]
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "emb_positions": torch.tensor(emb_pos, dtype=torch.long) + shift,
        "history_positions": history_positions,
        "first_positions": shift,
    }
    if target_ids is not None:
        out["labels"], _, _ = pad_sequences(labels, IGNORE_INDEX, padding_side)
    return out


def history_id_map(
    history_items: torch.Tensor, history_positions: torch.Tensor, length: int
) -> torch.Tensor:
    """(B, length) item index at each history token position, -1 elsewhere: where a hybrid
    model adds item-ID embeddings. history_items / history_positions (B, n), -1 padded."""
    out = torch.full((history_items.shape[0], length), -1, dtype=torch.long,
                     device=history_items.device)
    rows, cols = (history_positions >= 0).nonzero(as_tuple=True)
    out[rows, history_positions[rows, cols]] = history_items[rows, cols]
    return out


class BatchBuilder:
    """Turns examples into the tensors `karma.objective.KarmaObjective` reads.

    `items` is a `karma.data.ItemTable` (uses `texts`, `n_items`); `examples` a
    `karma.data.Examples` (uses `histories`, `targets`, `queries`, `impressions`).
    `image_features` (n_items, image_dim) is required when cfg.model.image_dim > 0.
    Sampled negatives come from `generator` if given to `__call__`, else from the builder's own
    generator seeded with `seed` (save `builder.generator.get_state()` to resume exactly).

    Batch keys (U = unique items embedded by the item tower, the first `candidate_count` of them
    are the InfoNCE candidates: targets, then hard and sampled negatives):
      item_input_ids, item_attention_mask (U, Ti); item_ids (U,) global item index;
      candidate_count () ; positive_index (B,) into the candidates;
      user_input_ids, user_attention_mask (B, T); emb_positions (B,);
      history_items (B, n) global index, history_positions (B, n) their token positions, -1
      padded (continuous interface);
      history_index (B, n) into the U items, -1 padded (history_source=live only);
      user_labels (B, T) (gen on); rec_input_ids, rec_attention_mask, rec_labels (rec on);
      item_image_features (U, D), target_image_features (B, D) (images).
    """

    def __init__(
        self,
        tokenizer: Any,
        items: Any,
        cfg: Config,
        image_features: np.ndarray | torch.Tensor | None = None,
        seed: int = 0,
        padding_side: str = "right",
    ) -> None:
        self.cfg = cfg
        self.items = items
        self.prompt = PromptFormat(tokenizer, cfg.model)
        self.padding_side = padding_side
        self.lambda_gen, self.lambda_rec, self.lambda_img = loss_weights(cfg.loss)
        if cfg.model.interface not in ("continuous", "text"):
            raise KarmaError(
                f"config key 'model.interface': expected continuous or text, got "
                f"{cfg.model.interface!r}"
            )
        if cfg.model.history_source not in ("live", "cache"):
            raise KarmaError(
                f"config key 'model.history_source': expected live or cache, got "
                f"{cfg.model.history_source!r}"
            )
        self.image_features = None
        if cfg.model.image_dim > 0:
            if image_features is None:
                raise KarmaError(
                    f"model.image_dim={cfg.model.image_dim} but BatchBuilder got no image_features"
                )
            feats = torch.as_tensor(np.asarray(image_features), dtype=torch.float32)
            if feats.shape != (items.n_items, cfg.model.image_dim):
                raise KarmaError(
                    f"image_features: expected shape ({items.n_items}, "
                    f"{cfg.model.image_dim}), got {tuple(feats.shape)}"
                )
            self.image_features = feats
        self.generator = torch.Generator().manual_seed(seed)
        self._text_ids: dict[int, list[int]] = {}

    def _item_text_ids(self, idx: list[int]) -> list[list[int]]:
        todo = [i for i in dict.fromkeys(idx) if i not in self._text_ids]
        for i, ids in zip(todo, self.prompt.encode_many([self.items.texts[i] for i in todo])):
            self._text_ids[i] = ids
        return [self._text_ids[i] for i in idx]

    def _check_item(self, idx: int, field: str, row: int) -> int:
        if not 0 <= idx < self.items.n_items:
            raise KarmaError(
                f"examples row {row}, field '{field}': item index {idx} outside "
                f"[0, {self.items.n_items})"
            )
        return idx

    def __call__(
        self,
        examples: Any,
        indices: Sequence[int] | np.ndarray,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        gen = generator if generator is not None else self.generator
        cfg, prompt = self.cfg, self.prompt
        rows = [int(i) for i in indices]
        targets = [self._check_item(int(examples.targets[r]), "target", r) for r in rows]
        histories = [
            [self._check_item(int(i), "history", r) for i in examples.histories[r]] for r in rows
        ]
        queries = [examples.queries[r] if examples.queries is not None else "" for r in rows]
        if cfg.train.query_dropout > 0:  # no draw at 0: the default batches stay as they were
            drop = torch.rand(len(rows), generator=gen) < cfg.train.query_dropout
            queries = ["" if d else q for q, d in zip(queries, drop.tolist())]

        # Candidate pool: targets, then hard negatives, then sampled negatives (unique, ordered).
        pool: dict[int, int] = {}
        for t in targets:
            pool.setdefault(t, len(pool))
        if cfg.loss.hard_negatives and getattr(examples, "impressions", None) is not None:
            cap = cfg.loss.max_hard_negatives
            for r in rows:
                shown = [
                    self._check_item(int(i), "impressions", r) for i in examples.impressions[r]
                ]
                if cap and len(shown) > cap:
                    pick = torch.randperm(len(shown), generator=gen)[:cap].tolist()
                    shown = [shown[j] for j in sorted(pick)]
                for i in shown:
                    pool.setdefault(i, len(pool))
        if cfg.loss.sampled_negatives > 0:
            sampled = torch.randint(
                self.items.n_items, (cfg.loss.sampled_negatives,), generator=gen
            )
            for i in sampled.tolist():
                pool.setdefault(i, len(pool))
        candidate_count = len(pool)
        continuous = cfg.model.interface == "continuous"
        live = continuous and cfg.model.history_source == "live"
        if live:
            for h in histories:
                for i in h:
                    pool.setdefault(i, len(pool))
        unique = list(pool)

        image = self.image_features is not None
        item_seqs = [
            prompt.item(ids, image=image and self.cfg.model.image_token)
            for ids in self._item_text_ids(unique)
        ]
        item_ids, item_mask, _ = pad_sequences(item_seqs, prompt.pad_id, self.padding_side)
        batch: dict[str, torch.Tensor] = {
            "item_input_ids": item_ids,
            "item_attention_mask": item_mask,
            "item_ids": torch.tensor(unique, dtype=torch.long),
            "candidate_count": torch.tensor(candidate_count, dtype=torch.long),
            "positive_index": torch.tensor([pool[t] for t in targets], dtype=torch.long),
        }

        use_targets = self.lambda_gen > 0 or self.lambda_rec > 0
        target_ids = [prompt.target(self.items.texts[t]) for t in targets] if use_targets else None
        texts = self.items.texts
        history_texts = None if continuous else [[texts[i] for i in h] for h in histories]
        user = collate_user_prompts(
            prompt,
            histories,
            queries,
            history_texts,
            target_ids=target_ids if self.lambda_gen > 0 else None,
            padding_side=self.padding_side,
        )
        batch["user_input_ids"] = user["input_ids"]
        batch["user_attention_mask"] = user["attention_mask"]
        batch["emb_positions"] = user["emb_positions"]
        if self.lambda_gen > 0:
            batch["user_labels"] = user["labels"]
        if continuous:
            n = max((len(h) for h in histories), default=0)
            hist_items = torch.full((len(rows), n), -1, dtype=torch.long)
            for b, h in enumerate(histories):
                hist_items[b, : len(h)] = torch.tensor(h, dtype=torch.long)
            batch["history_items"] = hist_items
            batch["history_positions"] = user["history_positions"]
            if live:
                hist_index = torch.full((len(rows), n), -1, dtype=torch.long)
                for b, h in enumerate(histories):
                    hist_index[b, : len(h)] = torch.tensor([pool[i] for i in h], dtype=torch.long)
                batch["history_index"] = hist_index
        if self.lambda_rec > 0:
            rec = [prompt.rec(t) for t in target_ids]
            batch["rec_input_ids"], batch["rec_attention_mask"], _ = pad_sequences(
                [r[0] for r in rec], prompt.pad_id, self.padding_side
            )
            batch["rec_labels"], _, _ = pad_sequences(
                [r[1] for r in rec], IGNORE_INDEX, self.padding_side
            )
        if image:
            batch["item_image_features"] = self.image_features[batch["item_ids"]]
            batch["target_image_features"] = self.image_features[torch.tensor(targets)]
        return batch
