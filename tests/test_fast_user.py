"""The fast user path (karma/fast_user.py) against the training-time plain forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karma.fast_user import FastUserEncoder, HistoryFirstPrompt, plain_user_embeddings
from karma.inference import encode_catalog


def build(interface: str = "continuous", history_first: bool = False):
    from karma.config import load_config
    from karma.model import build_model

    cfg = load_config(None, [
        "model.backbone=tiny-random", "model.emb_dim=16", f"model.interface={interface}",
    ])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if history_first:
        model.prompt = HistoryFirstPrompt(model.tokenizer, cfg.model)
    texts = [f"Movie {i} | Comedy" for i in range(30)]
    catalog = encode_catalog(model, texts, progress=False)
    return model, catalog, texts


CASES = [  # (history, query): the sequence of one user's requests
    ([3, 5, 7], "comedy"),
    ([3, 5, 7], "drama films"),  # new query, same history
    ([3, 5, 7, 11], "drama films"),  # a new click
    ([3, 5, 7, 11], ""),  # no query (recommendation)
    ([3, 5, 7, 11], ""),  # exact repeat
    ([], "horror"),  # query only
]


def assert_parity(model, catalog, texts, enc, histories, queries, keys) -> None:
    fast = enc.encode(histories, queries, keys)
    plain = plain_user_embeddings(model, histories, queries, catalog, texts)
    cos = F.cosine_similarity(fast, plain, dim=-1)
    assert bool((cos >= 0.999).all()), cos
    assert torch.allclose(fast, plain, atol=1e-4)


@pytest.mark.parametrize(
    ("interface", "history_first"),
    [("continuous", False), ("continuous", True), ("text", False)],
)
def test_fast_matches_plain_one_user_sequence(interface: str, history_first: bool) -> None:
    model, catalog, texts = build(interface, history_first)
    enc = FastUserEncoder(model, catalog, texts)
    run = []
    for history, query in CASES:
        before = enc.stats["tokens_run"]
        assert_parity(model, catalog, texts, enc, [history], [query], ["u1"])
        run.append(enc.stats["tokens_run"] - before)
    assert run[4] == 1  # the exact repeat runs <EMB> alone
    assert run[1] < run[0] and run[2] < run[0]  # a new query or click reuses a prefix


def test_new_query_runs_only_its_tokens_when_history_comes_first() -> None:
    model, catalog, texts = build(history_first=True)
    enc = FastUserEncoder(model, catalog, texts)
    enc.encode([[1, 2, 3, 4]], ["comedy"], ["u"])
    before = dict(enc.stats)
    enc.encode([[1, 2, 3, 4]], ["drama"], ["u"])
    query_tokens = len(model.prompt.encode(" Query:") + model.prompt.encode(" drama"))
    # at most the query's own tokens and <EMB> (" Query:" itself is a common prefix too)
    assert enc.stats["tokens_run"] - before["tokens_run"] <= query_tokens + 1
    before = dict(enc.stats)
    enc.encode([[1, 2, 3, 4, 9]], ["drama"], ["u"])  # a click: the new item onwards
    assert enc.stats["tokens_run"] - before["tokens_run"] == 1 + query_tokens + 1


@pytest.mark.parametrize("history_first", [False, True])
def test_batched_mixed_prefixes_match_plain(history_first: bool) -> None:
    model, catalog, texts = build(history_first=history_first)
    enc = FastUserEncoder(model, catalog, texts)
    enc.encode([[1, 2, 3]], ["comedy"], ["a"])  # warm one user's cache
    histories = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10], [1, 2, 3, 4]]
    queries = ["drama", "", "action film", "comedy", "comedy"]
    assert_parity(model, catalog, texts, enc, histories, queries, ["a", "b", None, None, "a"])
    # a second round hits every cache, in one batch
    assert_parity(model, catalog, texts, enc, histories, queries, ["a", "b", None, None, "a"])


def test_user_cache_is_bounded() -> None:
    model, catalog, texts = build()
    enc = FastUserEncoder(model, catalog, texts, max_cached_users=2)
    for u in range(5):
        enc.encode([[u, u + 1]], [""], [f"u{u}"])
    assert len(enc.users) == 2 and enc.users.get("u0") is None and enc.users.get("u4") is not None
