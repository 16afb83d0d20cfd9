"""BatchBuilder: candidate pool, history indices, labels, negatives, padding and errors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from karma.batching import (
    IGNORE_INDEX,
    BatchBuilder,
    PromptFormat,
    add_special_tokens,
    pad_sequences,
)
from karma.config import Config
from karma.errors import KarmaError


@dataclass
class Items:
    """Stand-in with the fields of karma.data.ItemTable that batching reads."""

    texts: list[str]

    @property
    def n_items(self) -> int:
        return len(self.texts)


@dataclass
class Examples:
    histories: list[list[int]]
    targets: np.ndarray
    queries: list[str]
    impressions: list[list[int]]


ITEMS = Items([f"Toy Story {i} ({1990 + i}) | Animation, Comedy" for i in range(30)])
EXAMPLES = Examples(
    histories=[[1, 2, 3], [4, 5], [6], [2, 7, 8, 9]],
    targets=np.array([10, 11, 10, 12]),
    queries=["comedy movies", "", "action", ""],
    impressions=[[13, 14], [], [15, 10], []],
)


def _cfg(**model) -> Config:
    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


@pytest.fixture
def tokenizer(tiny_tokenizer):
    add_special_tokens(tiny_tokenizer)
    return tiny_tokenizer


def test_pad_sequences_left_and_right():
    ids, mask, shift = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and shift.tolist() == [0, 0]
    ids, mask, shift = pad_sequences([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert shift.tolist() == [0, 2]


def test_candidates_positives_and_history(tokenizer):
    cfg = _cfg()
    batch = BatchBuilder(tokenizer, ITEMS, cfg)(EXAMPLES, [0, 1, 2, 3])
    item_ids = batch["item_ids"]
    n_cand = int(batch["candidate_count"])
    # Targets first (10 shared by rows 0 and 2 appears once), then hard negatives.
    assert item_ids[:n_cand].tolist() == [10, 11, 12, 13, 14, 15]
    assert item_ids[batch["positive_index"]].tolist() == EXAMPLES.targets.tolist()
    hist_index = batch["history_index"]
    for b, hist in enumerate(EXAMPLES.histories):
        assert item_ids[hist_index[b, : len(hist)]].tolist() == hist
        assert (hist_index[b, len(hist) :] == -1).all()
        assert batch["history_items"][b, : len(hist)].tolist() == hist
    prompt = PromptFormat(tokenizer, cfg.model)
    ids = batch["user_input_ids"]
    assert ((ids == prompt.hist_id).sum(1)).tolist() == [len(h) for h in EXAMPLES.histories]
    rows = torch.arange(4)
    assert (ids[rows, batch["emb_positions"]] == prompt.emb_id).all()
    assert ((batch["item_input_ids"] == prompt.item_id).sum(1) == 1).all()


def test_labels_cover_target_tokens_only(tokenizer):
    cfg = _cfg()
    batch = BatchBuilder(tokenizer, ITEMS, cfg)(EXAMPLES, [0, 1])
    prompt = PromptFormat(tokenizer, cfg.model)
    for b, target in enumerate(EXAMPLES.targets[:2]):
        expected = prompt.target(ITEMS.texts[target])
        labels = batch["user_labels"][b]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        # Nothing up to <EMB> is labelled: u never sees the target.
        assert (labels[: int(batch["emb_positions"][b]) + 1] == IGNORE_INDEX).all()
        rec_labels = batch["rec_labels"][b]
        assert rec_labels[rec_labels != IGNORE_INDEX].tolist() == expected
        assert (batch["rec_input_ids"][b, : cfg.model.rec_tokens] == prompt.rec_id).all()
    cfg.loss.preset = "action_only"
    plain = BatchBuilder(tokenizer, ITEMS, cfg)(EXAMPLES, [0, 1])
    assert "user_labels" not in plain and "rec_input_ids" not in plain
    assert plain["user_input_ids"].shape[1] < batch["user_input_ids"].shape[1]


def test_sampled_negatives_are_seeded(tokenizer):
    cfg = _cfg()
    cfg.loss.sampled_negatives = 5
    cfg.loss.hard_negatives = False
    a = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(EXAMPLES, [0, 1])
    b = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(EXAMPLES, [0, 1])
    assert torch.equal(a["item_ids"], b["item_ids"])
    assert int(a["candidate_count"]) > 2  # targets plus (unique) samples
    g = torch.Generator().manual_seed(99)
    c = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(EXAMPLES, [0, 1], generator=g)
    g = torch.Generator().manual_seed(99)
    d = BatchBuilder(tokenizer, ITEMS, cfg, seed=7)(EXAMPLES, [0, 1], generator=g)
    assert torch.equal(c["item_ids"], d["item_ids"])


def test_hard_negatives_are_capped(tokenizer):
    cfg = _cfg()
    cfg.loss.max_hard_negatives = 1
    examples = Examples([[1]], np.array([2]), [""], [[3, 4, 5, 6]])
    batch = BatchBuilder(tokenizer, ITEMS, cfg)(examples, [0])
    assert int(batch["candidate_count"]) == 2
    assert batch["item_ids"][1].item() in (3, 4, 5, 6)


def test_cache_and_text_modes(tokenizer):
    batch = BatchBuilder(tokenizer, ITEMS, _cfg(history_source="cache"))(EXAMPLES, [0, 1])
    assert "history_index" not in batch
    # Only candidates go through the item tower; history comes from the cache.
    assert batch["item_ids"].tolist() == [10, 11, 13, 14]
    text_cfg = _cfg(interface="text")
    batch = BatchBuilder(tokenizer, ITEMS, text_cfg)(EXAMPLES, [0])
    prompt = PromptFormat(tokenizer, text_cfg.model)
    assert not (batch["user_input_ids"] == prompt.hist_id).any()
    assert "history_items" not in batch
    decoded = tokenizer.decode(batch["user_input_ids"][0])
    assert ITEMS.texts[1] in decoded and ITEMS.texts[3] in decoded


def test_left_padding_positions(tokenizer):
    cfg = _cfg()
    right = BatchBuilder(tokenizer, ITEMS, cfg)(EXAMPLES, [0, 1, 2, 3])
    left = BatchBuilder(tokenizer, ITEMS, cfg, padding_side="left")(EXAMPLES, [0, 1, 2, 3])
    rows = torch.arange(4)
    assert torch.equal(
        right["user_input_ids"][rows, right["emb_positions"]],
        left["user_input_ids"][rows, left["emb_positions"]],
    )
    assert (left["user_attention_mask"][:, -1] == 1).all()


def test_bad_item_index_names_row_and_field(tokenizer):
    examples = Examples([[1, 99]], np.array([2]), [""], [[]])
    with pytest.raises(KarmaError, match="row 0, field 'history'"):
        BatchBuilder(tokenizer, ITEMS, _cfg())(examples, [0])


def test_image_features_required_and_batched(tokenizer):
    cfg = _cfg(image_dim=4)
    with pytest.raises(KarmaError, match="image_features"):
        BatchBuilder(tokenizer, ITEMS, cfg)
    feats = np.arange(30 * 4, dtype=np.float32).reshape(30, 4)
    batch = BatchBuilder(tokenizer, ITEMS, cfg, image_features=feats)(EXAMPLES, [0])
    assert torch.equal(batch["target_image_features"][0], torch.tensor(feats[10]))
    assert torch.equal(batch["item_image_features"], torch.tensor(feats)[batch["item_ids"]])
    prompt = PromptFormat(tokenizer, cfg.model)
    assert ((batch["item_input_ids"] == prompt.img_id).sum(1) == 1).all()


def test_query_dropout_blanks_queries_in_training_batches_only_when_asked(tokenizer):
    no_query = Examples(EXAMPLES.histories, EXAMPLES.targets, [""] * 4, EXAMPLES.impressions)
    cfg = _cfg()
    with_queries = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(EXAMPLES, [0, 1, 2, 3])
    blanked = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(no_query, [0, 1, 2, 3])
    cfg.train.query_dropout = 1.0
    dropped = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(EXAMPLES, [0, 1, 2, 3])
    assert torch.equal(dropped["user_input_ids"], blanked["user_input_ids"])
    assert not torch.equal(with_queries["user_input_ids"], blanked["user_input_ids"])
    cfg.train.query_dropout = 0.5
    rows = list(range(4)) * 50
    many = Examples(EXAMPLES.histories * 50, np.tile(EXAMPLES.targets, 50),
                    ["comedy"] * 200, EXAMPLES.impressions * 50)
    half = BatchBuilder(tokenizer, ITEMS, cfg, seed=3)(many, rows)
    query_token = PromptFormat(tokenizer, cfg.model).query_ids[0]
    kept = (half["user_input_ids"] == query_token).any(-1).float().mean()
    assert 0.35 < float(kept) < 0.65
