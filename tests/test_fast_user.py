"""The fast user path (karma/fast_user.py) against the training-time plain forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karma.fast_user import FastUserEncoder, plain_user_embeddings
from karma.inference import encode_catalog


def build(interface: str = "continuous", layout: str = "query_first", *overrides: str,
          prepare=None):
    """(model, catalog, texts); `prepare(model)` runs before the catalog is encoded."""
    from karma.config import load_config
    from karma.model import build_model

    cfg = load_config(None, [
        "model.backbone=tiny-random", "model.emb_dim=16", f"model.interface={interface}",
        f"model.prompt_layout={layout}", *overrides,
    ])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    texts = [f"Movie {i} | Comedy" for i in range(30)]
    if prepare is not None:
        prepare(model)
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
    ("interface", "layout"),
    [("continuous", "query_first"), ("continuous", "history_first"), ("text", "query_first"),
     ("text", "history_first")],
)
def test_fast_matches_plain_one_user_sequence(interface: str, layout: str) -> None:
    model, catalog, texts = build(interface, layout)
    enc = FastUserEncoder(model, catalog, texts)
    run = []
    for history, query in CASES:
        before = enc.stats["tokens_run"]
        assert_parity(model, catalog, texts, enc, [history], [query], ["u1"])
        run.append(enc.stats["tokens_run"] - before)
    assert run[4] == 1  # the exact repeat runs <EMB> alone
    assert run[1] < run[0] and run[2] < run[0]  # a new query or click reuses a prefix


def test_new_query_runs_only_its_tokens_when_history_comes_first() -> None:
    model, catalog, texts = build(layout="history_first")
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


@pytest.mark.parametrize("layout", ["query_first", "history_first"])
def test_batched_mixed_prefixes_match_plain(layout: str) -> None:
    model, catalog, texts = build(layout=layout)
    enc = FastUserEncoder(model, catalog, texts)
    enc.encode([[1, 2, 3]], ["comedy"], ["a"])  # warm one user's cache
    histories = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10], [1, 2, 3, 4]]
    queries = ["drama", "", "action film", "comedy", "comedy"]
    assert_parity(model, catalog, texts, enc, histories, queries, ["a", "b", None, None, "a"])
    # a second round hits every cache, in one batch
    assert_parity(model, catalog, texts, enc, histories, queries, ["a", "b", None, None, "a"])


def randomize(params) -> None:
    """Trained-looking values for weights that start at zero (LoRA B, ID embeddings), so that
    leaving them out of the fast path would change u."""
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.5)


@pytest.mark.parametrize("freeze_layers", [0, 1])
def test_lora_is_merged_and_matches_plain(freeze_layers: int) -> None:
    def lora_trained(model) -> None:
        randomize(p for n, p in model.named_parameters() if "lora_B" in n)

    model, catalog, texts = build(
        "continuous", "history_first", "model.lora=true", f"model.freeze_layers={freeze_layers}",
        prepare=lora_trained,
    )
    enc = FastUserEncoder(model, catalog, texts)
    assert not any("lora" in n for n, _ in enc.decoder.named_parameters())  # merged copy
    assert any("lora" in n for n, _ in model.named_parameters())  # the model keeps its adapters
    for history, query in CASES:
        assert_parity(model, catalog, texts, enc, [history], [query], ["u1"])


@pytest.mark.parametrize("freeze_layers", [0, 1])
def test_item_ids_join_the_fast_path(freeze_layers: int) -> None:
    def ids_trained(model) -> None:
        known = torch.ones(30, dtype=torch.bool)
        known[7] = False  # an item never seen in training falls back to its text
        model.init_item_ids(30, known)
        randomize([model.history_id_emb, model.item_id_emb])

    model, catalog, texts = build(
        "continuous", "history_first", "model.item_ids=true",
        f"model.freeze_layers={freeze_layers}", prepare=ids_trained,
    )
    enc = FastUserEncoder(model, catalog, texts)
    for history, query in CASES:
            assert_parity(model, catalog, texts, enc, [history], [query], ["u1"])
    # the IDs matter: without them u moves
    model.cfg.model.item_ids = False
    without = plain_user_embeddings(model, [[3, 5, 11]], ["drama"], catalog, texts)
    model.cfg.model.item_ids = True
    with_ids = plain_user_embeddings(model, [[3, 5, 11]], ["drama"], catalog, texts)
    assert F.cosine_similarity(without, with_ids).item() < 0.99


def test_user_cache_is_bounded() -> None:
    model, catalog, texts = build()
    enc = FastUserEncoder(model, catalog, texts, max_cached_users=2)
    for u in range(5):
        enc.encode([[u, u + 1]], [""], [f"u{u}"])
    assert len(enc.users) == 2 and enc.users.get("u0") is None and enc.users.get("u4") is not None


def test_fast_matches_plain_for_the_search_demo_checkpoint() -> None:
    """The CPU demo's search recipe serves with a history readout (no query: u at the last
    history token, with one: at <EMB> after it), hybrid item IDs and a frozen lower part."""
    def ids(model):
        model.init_item_ids(30, torch.arange(30) < 25)
        with torch.no_grad():
            model.history_id_emb.normal_()
            model.item_id_emb.normal_()

    model, catalog, texts = build(
        "continuous", "history_first", "model.readout=history", "model.item_ids=true",
        "model.lora=true", "model.freeze_layers=1", "model.train_item_tower=false",
        "model.item_norm=standardize", prepare=ids,
    )
    enc = FastUserEncoder(model, catalog, texts)
    for history, query in CASES[:-1] + [([26, 3], "horror"), ([26, 3], "")]:  # 26: a cold item
        assert_parity(model, catalog, texts, enc, [history], [query], ["u1"])
