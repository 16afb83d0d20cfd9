"""The personalization paths: item conditioning, hybrid IDs, the dense sequence objective."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from karma.config import load_config
from karma.model import build_model


def _cfg(tmp_path, *extra):
    return load_config(
        "configs/debug.yaml",
        [
            f"data.prepared_dir={tmp_path}/data",
            f"train.output_dir={tmp_path}/run",
            "data.query_mode=none",
            "model.item_norm=standardize",
            "model.item_ids=true",
            "model.id_dropout=0.5",
            *extra,
        ],
    )


def _search_cfg(tmp_path, *extra, preset="action_only", steps=2):
    """The search setting's sequence recipe on the debug model (`extra` applied last)."""
    return _cfg(
        tmp_path, "data.query_mode=genre", "model.prompt_layout=history_first",
        "train.objective=sequence", "model.readout=history", "model.history_source=cache",
        "model.lora=true", "model.train_item_tower=false", "model.freeze_layers=1",
        f"loss.preset={preset}", f"train.steps={steps}", "train.eval_every=0",
        f"train.save_every={steps}", "train.sequence_max_len=12", *extra,
    )


def test_standardized_catalog_has_zero_mean_unit_variance(tmp_path):
    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path))
    h = torch.randn(50, model.hidden_size) * 7 + 3
    model.set_item_statistics(h)
    z = model.condition(h)
    assert torch.allclose(z.mean(0), torch.zeros(model.hidden_size), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(model.hidden_size), atol=1e-4)


def test_id_dropout_never_touches_cold_items_and_is_off_in_eval(tmp_path):
    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path))
    known = torch.tensor([True, True, False, False])
    model.init_item_ids(4, known)
    with torch.no_grad():
        model.item_id_emb.fill_(1.0)
    ids = torch.tensor([0, 1, 2, 3] * 50)
    model.train()
    rows = model._id_rows(model.item_id_emb, ids)
    cold = ids >= 2
    assert rows[cold].abs().sum() == 0  # cold items never get an ID, in training either
    dropped = rows[~cold].abs().sum(-1) == 0
    assert 0.3 < dropped.float().mean() < 0.7  # id_dropout=0.5 on known items
    model.eval()
    rows = model._id_rows(model.item_id_emb, ids)
    assert rows[cold].abs().sum() == 0 and bool((rows[~cold] == 1).all())


def test_tied_item_ids_read_one_table_for_targets_and_history(tmp_path):
    """model.tie_item_ids: a history token's ID part is id_to_history of the item's output ID
    row, so its clicks as history train that row; unknown items and padding still get none."""
    from karma.config import ConfigError

    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path, "model.tie_item_ids=true")).eval()
    model.init_item_ids(4, torch.tensor([True, True, True, False]))
    with torch.no_grad():
        model.item_id_emb.normal_()
    assert not hasattr(model, "history_id_emb")
    residual = model.history_residual(torch.tensor([[0, 2, 3, -1]]))  # (1, 4, d)
    expected = model.id_to_history(model.item_id_emb[[0, 2]])
    torch.testing.assert_close(residual[0, :2], expected)
    assert residual[0, 2:].abs().sum() == 0  # never seen in training, and padding
    residual.pow(2).sum().backward()
    grad = model.item_id_emb.grad.abs().sum(-1)
    assert grad[0] > 0 and grad[2] > 0 and grad[1] == 0 and grad[3] == 0
    copy = build_model(_cfg(tmp_path, "model.tie_item_ids=true")).eval()
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy.history_residual(torch.tensor([[0, 2]])), residual[:, :2])
    with pytest.raises(ConfigError, match="model.tie_item_ids"):
        build_model(_cfg(tmp_path, "model.item_ids=false", "model.tie_item_ids=true"))


@torch.no_grad()
def test_restricted_item_ids_leave_rare_items_their_text_alone(tmp_path):
    """eval.id_min_count: an item whose ID row is dropped is scored exactly as a never-seen one,
    on its text; the others keep their IDs."""
    from karma.errors import KarmaError
    from karma.inference import encode_catalog

    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path)).eval()
    texts = [f"item number {i} | Drama" for i in range(4)]
    model.init_item_ids(4, torch.tensor([True, True, True, False]))
    model.item_id_emb.normal_()
    full = encode_catalog(model, texts, progress=False, item_ids=list(range(4)))
    model.restrict_item_ids(torch.tensor([True, False, True, True]))
    assert model.id_known.tolist() == [True, False, True, False]  # never-seen stays text-only
    kept = encode_catalog(model, texts, progress=False, item_ids=list(range(4)))
    torch.testing.assert_close(kept.item_emb[[0, 2]], full.item_emb[[0, 2]])
    text_only = model.item_embedding(kept.item_hidden[[1, 3]])
    torch.testing.assert_close(kept.item_emb[[1, 3]], text_only)
    assert not torch.allclose(kept.item_emb[1], full.item_emb[1], atol=1e-3)
    with pytest.raises(KarmaError, match="5 items"):
        model.restrict_item_ids(torch.ones(5, dtype=torch.bool))


def test_no_id_model_refuses_eval_id_min_count(tmp_path):
    from karma.errors import KarmaError

    model = build_model(_cfg(tmp_path, "model.item_ids=false"))
    with pytest.raises(KarmaError, match="eval.id_min_count"):
        model.restrict_item_ids(torch.ones(4, dtype=torch.bool))


@torch.no_grad()
def test_a_part_of_the_catalog_keeps_its_item_ids_and_decoded_text_has_none(tmp_path):
    """encode_catalog(item_ids=): a probe's local catalog gets its items' ID embeddings, in e_i
    and in the users' history residual, and text that is no item (-1) gets none."""
    from karma.inference import encode_catalog, encode_users

    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path))
    model.init_item_ids(10, torch.ones(10, dtype=torch.bool))
    model.item_id_emb.normal_()
    model.history_id_emb.normal_()
    texts = [f"item number {i} | Drama" for i in range(10)]
    full = encode_catalog(model, texts, progress=False)
    part = encode_catalog(model, [texts[7], texts[3]], progress=False, item_ids=[7, 3])
    torch.testing.assert_close(part.item_emb, full.item_emb[[7, 3]])
    text = encode_catalog(model, [texts[7]], progress=False, item_ids=[-1])
    torch.testing.assert_close(text.item_emb, model.item_embedding(text.item_hidden))
    assert not torch.allclose(text.item_emb, full.item_emb[[7]], atol=1e-3)
    users_part = encode_users(model, [[0, 1]], [""], part, [texts[7], texts[3]])
    users_full = encode_users(model, [[7, 3]], [""], full, texts)
    torch.testing.assert_close(users_part, users_full, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def _top_readout(model, states, history_ids, mask, positions, history_end=None):
    """u read at `positions` after the trainable top layers, from lower states and item IDs."""
    hidden = model.run_from_layer(
        states + model.history_residual(history_ids), mask, model.cfg.model.freeze_layers
    )
    return model.user_from_hidden(hidden, positions, history_end)


@torch.no_grad()
def _search_readout(model, cfg, batch):
    """The search examples' u (E, k) as the objective computes it in training: their query
    tokens packed behind their user's dense row, one pass of the top layers."""
    from karma.sequence import SequenceObjective

    return SequenceObjective(model, cfg.loss).top_pass(batch)[1]


def test_sequence_objective_trains_and_its_readout_is_the_inference_path(tmp_path):
    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.inference import encode_catalog, encode_users
    from karma.sequence import UserSequences
    from karma.train import train

    cfg = _cfg(
        tmp_path, "train.objective=sequence", "model.readout=history",
        "model.history_source=cache", "model.lora=true", "model.train_item_tower=false",
        "model.freeze_layers=1", "loss.preset=karma", "train.steps=4", "train.eval_every=0",
        "train.save_every=4", "train.sequence_max_len=12",
    )
    run = train(cfg)
    log = [line for line in (run / "log.jsonl").read_text().splitlines() if line]
    assert log  # losses were logged
    model, cfg2 = load_model(run / "checkpoints" / "last")
    data = load_prepared(cfg.data.prepared_dir)
    seqs = UserSequences.build(model, data, cfg2, progress=False)
    batch = seqs.batch(model, np.arange(3))
    cached = _top_readout(model, batch["states"], batch["history_ids"], batch["attention_mask"],
                          batch["last_cols"])
    catalog = encode_catalog(model, data.items.texts, progress=False)
    histories = [seqs.items[r][:-1] for r in range(3)]
    full = encode_users(model, histories, [""] * 3, catalog, data.items.texts)
    # the cached lower layers + top layers equal the whole LLM on the same prompt
    assert torch.nn.functional.cosine_similarity(cached, full, dim=-1).min() > 0.999
    # eval.id_min_count keeps the ID rows of the items a training target often enough only
    from karma.evaluate import _load_for_eval, evaluate_checkpoint, target_counts

    counts = torch.as_tensor(target_counts(data))
    for n in (2, 100000):
        restricted = _load_for_eval(run / "checkpoints" / "last", [f"eval.id_min_count={n}"])[0]
        assert restricted.id_known.tolist() == (model.id_known & (counts >= n)).tolist()
    assert model.id_known.any() and (counts >= 2).any()  # the check above is not vacuous
    results = evaluate_checkpoint(run / "checkpoints" / "last", ["eval.id_min_count=100000"])
    assert "100000" in results["protocol"]["id_min_count"]


def test_the_plain_decoder_with_injected_ids_equals_run_decoder(tmp_path):
    """karma.analysis calls the HF decoder itself (for its attentions): a hybrid model's item
    IDs must reach it exactly where run_decoder adds them."""
    from karma.inference import build_user_inputs, encode_catalog

    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path, "model.freeze_layers=1")).eval()
    texts = ["Toy Story", "Heat", "Casino", "Babe", "Jumanji"]
    model.init_item_ids(5, torch.tensor([True] * 4 + [False]))
    with torch.no_grad():
        model.history_id_emb.normal_()
        catalog = encode_catalog(model, texts, progress=False)
        inputs = build_user_inputs(model, [[0, 1, 4], [2]], ["", ""], catalog)
        expected = model.run_decoder(
            inputs["inputs_embeds"], inputs["attention_mask"], inputs["history_ids"]
        )
        decoder = model.base_lm.get_decoder()
        kwargs = dict(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], use_cache=False,
        )
        with model.history_residual_injected(inputs["history_ids"]):
            injected = decoder(**kwargs).last_hidden_state
        plain = decoder(**kwargs).last_hidden_state  # the hook is gone again
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(injected[mask], expected[mask], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[mask], expected[mask], atol=1e-3)


def test_batched_next_text_states_equal_one_user_at_a_time(tmp_path):
    """L_gen's " Next: {text}<eos>" lower states are computed for all users in right-padded
    batches at setup; each row must equal its own unpadded pass."""
    from karma.sequence_cache import suffix_states

    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path, "model.freeze_layers=1")).eval()
    targets = [model.prompt.target(t) for t in ["Heat", "The Usual Suspects (1995)", "Babe"]]
    starts = [5, 12, 3]
    batched = suffix_states(model, targets, starts, batch_size=3)
    single = [suffix_states(model, [t], [s], batch_size=1)[0] for t, s in zip(targets, starts)]
    for b, one, t in zip(batched, single, targets):
        assert b.shape == one.shape == (len(model.prompt.next_ids) + len(t), model.hidden_size)
        torch.testing.assert_close(b.float(), one.float(), atol=2e-2, rtol=2e-2)  # bf16 storage


@pytest.mark.parametrize("search_readout", ["query", "sum"])
def test_search_examples_are_the_inference_prompt(tmp_path, search_readout):
    """With queries, each user also gives one search example per step, `History: x_1..x_c
    Query: q <EMB>`, its query tokens run against the cached lower key/values: the objective's
    readout of it equals encode_users on that history and query, and its query is the one of
    x_{c+1}'s training example. With search_readout=sum both add the readout at x_c."""
    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.inference import encode_catalog, encode_users
    from karma.sequence import UserSequences
    from karma.train import train

    cfg = _search_cfg(tmp_path, f"model.search_readout={search_readout}", steps=3)
    run = train(cfg)
    assert "query_act_loss" in (run / "log.jsonl").read_text()
    model, cfg2 = load_model(run / "checkpoints" / "last")
    data = load_prepared(cfg.data.prepared_dir)
    seqs = UserSequences.build(model, data, cfg2, progress=False)
    train_split = data.split("train")
    pairs = set(zip(train_split.user_ids, train_split.targets.tolist(), train_split.queries))
    valid_users = [u for u, s in zip(data.split("valid").user_ids, data.split("valid").seen)
                   if len(s[-13:]) >= 2]
    for user, seq, queries in zip(valid_users, seqs.items, seqs.queries):
        assert len(queries) == len(seq) - 1
        assert all((user, t, q) in pairs for t, q in zip(seq[1:], queries))

    rows = np.arange(3)
    batch = seqs.batch(model, rows, generator=torch.Generator().manual_seed(5))
    draw = torch.Generator().manual_seed(5)  # the same cuts, drawn again
    cuts = [int(torch.randint(1, len(seqs.items[r]), (1,), generator=draw)) for r in rows]
    assert len(set(cuts)) > 1  # rows with pasts of different lengths (left padding) are covered
    histories = [seqs.items[r][:c] for r, c in zip(rows, cuts)]
    queries = [seqs.queries[r][c - 1] for r, c in zip(rows, cuts)]
    assert batch["query_targets"].tolist() == [seqs.items[r][c] for r, c in zip(rows, cuts)]
    trained = _search_readout(model, cfg2, batch)
    catalog = encode_catalog(model, data.items.texts, progress=False)
    full = encode_users(model, histories, queries, catalog, data.items.texts)
    assert all(queries)
    cos = torch.nn.functional.cosine_similarity
    assert cos(trained, full, dim=-1).min() > 0.999
    model.cfg.model.search_readout = "query"
    at_emb_only = _search_readout(model, cfg2, batch)  # <EMB> alone
    assert (cos(trained, at_emb_only, dim=-1).min() > 0.999) == (search_readout == "query")


def test_several_search_examples_per_user_with_a_minimum_history(tmp_path):
    """train.search_examples=3, train.search_min_history=4: each user gives 3 adjacent search
    examples per step, each cut drawn in [min(4, n - 1), n - 1] in the same seeded order, and
    every one is still the inference prompt (readout equals encode_users), with eager attention
    too."""
    from karma.analysis.collect import eager_attention
    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.sequence import UserSequences
    from karma.train import train

    cfg = _search_cfg(tmp_path, "train.search_examples=3", "train.search_min_history=4")
    run = train(cfg)
    model, cfg2 = load_model(run / "checkpoints" / "last")
    data = load_prepared(cfg.data.prepared_dir)
    seqs = UserSequences.build(model, data, cfg2, progress=False)
    assert (seqs.search_examples, seqs.search_min_history) == (3, 4)
    rows = np.arange(4)
    batch = seqs.batch(model, rows, generator=torch.Generator().manual_seed(7))
    draw = torch.Generator().manual_seed(7)
    users, cuts = [], []
    for r in rows:
        n = len(seqs.items[r])
        for _ in range(3):
            cuts.append(int(torch.randint(min(4, n - 1), n, (1,), generator=draw)))
            users.append(int(r))
            assert cuts[-1] >= min(4, n - 1)
    assert batch["query_lower"].shape[0] == 12 == batch["query_targets"].shape[0]
    assert batch["query_targets"].tolist() == [seqs.items[r][c] for r, c in zip(users, cuts)]
    _assert_search_examples_are_inference(model, cfg2, data, seqs, batch, users, cuts)
    with eager_attention(model.base_lm):  # eager adds its mask: packing gives it a float one
        eager = _search_readout(model, cfg2, batch)
    torch.testing.assert_close(eager, _search_readout(model, cfg2, batch), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def _assert_packing_is_one_prompt_each(model, cfg, batch):
    """pack_search_examples gives each search example what running its own prompt through the
    top layers gives: the row's history states up to x_c, then its query tokens (a tight
    tolerance: a position off by one passes the cosine check against inference)."""
    packed = _search_readout(model, cfg, batch)
    states = batch["states"] + model.history_residual(batch["history_ids"])
    for e, (b, n, h) in enumerate(zip(batch["query_rows"].tolist(),
                                      batch["query_lengths"].tolist(),
                                      batch["query_history_end"].tolist())):
        prompt = torch.cat([states[b, : h + 1], batch["query_lower"][e, :n]])[None]
        hidden = model.run_from_layer(prompt, torch.ones(1, h + 1 + n, dtype=torch.long),
                                      model.cfg.model.freeze_layers)
        alone = model.user_from_hidden(hidden, torch.tensor([h + n]), torch.tensor([h]))
        torch.testing.assert_close(packed[e : e + 1], alone, atol=1e-5, rtol=1e-4)


def _assert_search_examples_are_inference(model, cfg, data, seqs, batch, rows, cuts):
    """The top-layer readout of each search example of `batch` (row, cut) equals the whole LLM
    on the inference prompt: history x_1 .. x_cut and the query of x_{cut+1}."""
    from karma.inference import encode_catalog, encode_users

    histories = [seqs.items[r][:c] for r, c in zip(rows, cuts)]
    queries = [seqs.queries[r][c - 1] for r, c in zip(rows, cuts)]
    _assert_packing_is_one_prompt_each(model, cfg, batch)
    trained = _search_readout(model, cfg, batch)
    catalog = encode_catalog(model, data.items.texts, progress=False)
    full = encode_users(model, histories, queries, catalog, data.items.texts)
    assert torch.nn.functional.cosine_similarity(trained, full, dim=-1).min() > 0.999


def test_every_window_is_a_row_and_keeps_its_targets_queries(tmp_path):
    """train.sequence_windows=all: the rows are every user's training part cut into windows, so
    the readout targets are every training transition once; each row's queries are those of
    the training examples of its targets; a search example cut in an older window is still the
    inference prompt. With =last each user gives its newest window only."""
    from karma.baselines.protocol import training_sequences
    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.sequence import UserSequences
    from karma.split import training_windows
    from karma.train import train

    cfg = _search_cfg(
        tmp_path, "train.sequence_max_len=4", "train.sequence_windows=all", preset="karma"
    )
    run = train(cfg)
    model, cfg2 = load_model(run / "checkpoints" / "last")
    data = load_prepared(cfg.data.prepared_dir)
    seqs = UserSequences.build(model, data, cfg2, progress=False)
    full = training_sequences(data)
    train_split = data.split("train")
    query_of = {}  # (user, target position in the training part) -> query
    position: dict[str, int] = {}
    for user, q in zip(train_split.user_ids, train_split.queries):
        position[user] = position.get(user, 0) + 1
        query_of[(user, position[user])] = q
    valid = data.split("valid")
    users = [u for u, s in zip(valid.user_ids, valid.seen) if len(s) >= 2]
    transitions, r, older = [], 0, []
    for user in users:
        seq = full[user]
        for start, end in training_windows(len(seq), 4):
            assert seqs.items[r] == seq[start:end]
            if end < len(seq):
                older.append(r)
            assert seqs.queries[r] == [query_of[(user, p)] for p in range(start + 1, end)]
            transitions += [(user, p) for p in range(start + 1, end)]
            r += 1
    assert r == len(seqs) > len(users)  # older windows are rows too
    assert sorted(transitions) == sorted(query_of)  # every training transition once
    old = older[:3]
    batch = seqs.batch(model, np.array(old), generator=torch.Generator().manual_seed(3))
    draw = torch.Generator().manual_seed(3)
    cuts = [int(torch.randint(1, len(seqs.items[i]), (1,), generator=draw)) for i in old]
    _assert_search_examples_are_inference(model, cfg2, data, seqs, batch, old, cuts)
    cfg2.train.sequence_windows = "last"
    newest = UserSequences.build(model, data, cfg2, progress=False)
    assert newest.items == [full[u][-5:] for u in users]


def test_search_settings_are_checked():
    from karma.config import ConfigError

    for key in ("train.search_examples=0", "train.search_min_history=0",
                "train.sequence_windows=every", "baseline.sasrec.windows=first"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config("configs/debug.yaml", [key])


def test_sum_readout_needs_the_history_first_layout():
    from karma.config import ConfigError

    with pytest.raises(ConfigError, match="model.search_readout.*history_first.*sequence"):
        load_config(None, ["model.search_readout=sum"])


def test_sequence_objective_with_queries_needs_the_history_first_layout(tmp_path):
    import pytest

    from karma.config import ConfigError
    from karma.sequence import check_sequence_config

    cfg = _cfg(
        tmp_path, "data.query_mode=genre", "train.objective=sequence", "model.readout=history",
        "model.history_source=cache", "model.lora=true", "model.train_item_tower=false",
    )
    with pytest.raises(ConfigError, match="model.prompt_layout=history_first"):
        check_sequence_config(cfg)
    cfg.model.prompt_layout = "history_first"
    check_sequence_config(cfg)


def test_query_candidates_loss_scores_the_target_among_the_query_items(tmp_path):
    """loss.query_candidates_weight: a second search softmax over the items with every category
    the query names; the mask keeps the target, and the loss is the softmax over that subset."""
    from karma.data import load_prepared
    from karma.losses import candidates_softmax_loss
    from karma.sequence import UserSequences
    from karma.split import query_categories
    from karma.train import train

    torch.manual_seed(0)
    user, items = torch.randn(3, 8), torch.randn(10, 8)
    targets, tau = torch.tensor([0, 4, 9]), torch.tensor(0.5)
    full = torch.nn.functional.cross_entropy(user @ items.T / tau, targets)
    everything = torch.ones(3, 10, dtype=torch.bool)
    assert torch.allclose(candidates_softmax_loss(user, items, targets, tau, everything), full)
    keep = torch.tensor([0, 4, 9, 2])
    allowed = torch.zeros(3, 10, dtype=torch.bool)
    allowed[:, keep] = True
    subset = torch.nn.functional.cross_entropy(
        user @ items[keep].T / tau, torch.tensor([0, 1, 2]))
    assert torch.allclose(candidates_softmax_loss(user, items, targets, tau, allowed), subset)

    cfg = _search_cfg(tmp_path, "loss.query_candidates_weight=1.0")
    run = train(cfg)
    assert "query_candidates_loss" in (run / "log.jsonl").read_text()
    from karma.checkpoint import load_model

    model, cfg2 = load_model(run / "checkpoints" / "last")
    data = load_prepared(cfg.data.prepared_dir)
    seqs = UserSequences.build(model, data, cfg2, progress=False)
    batch = seqs.batch(model, np.arange(4), generator=torch.Generator().manual_seed(1))
    cats = [{c.lower() for c in cs} for cs in data.items.categories]
    draw = torch.Generator().manual_seed(1)
    for b, r in enumerate(range(4)):
        c = int(torch.randint(1, len(seqs.items[r]), (1,), generator=draw))
        named = query_categories(seqs.queries[r][c - 1], set().union(*cats))
        expected = [named <= cs for cs in cats]
        assert batch["query_allowed"][b].tolist() == expected
        assert batch["query_allowed"][b, batch["query_targets"][b]]


IMAGE_DIM = 8  # small generated features stand in for the 1280-d EfficientNet ones


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """prepared_dir(query_mode): ML-100K prepared once per query mode, with generated
    (n_items, IMAGE_DIM) image features, so that loss.preset=karma_mm model.image_dim=8 runs."""
    from karma.data import IMAGE_FEATURES_FILE, load_prepared, prepare_dataset

    root = tmp_path_factory.mktemp("sequence_images")
    made = {}

    def prepared_dir(query_mode):
        if query_mode not in made:
            cfg = _cfg(root / query_mode, f"data.query_mode={query_mode}")
            path = prepare_dataset(cfg)
            n_items = load_prepared(path).items.n_items
            rng = np.random.default_rng(0)
            feats = rng.normal(size=(n_items, IMAGE_DIM)).astype(np.float32)
            np.save(path / IMAGE_FEATURES_FILE, feats)
            made[query_mode] = path
        return made[query_mode]

    return prepared_dir


def _mm_cfg(tmp_path, prepared_dir, *extra):
    return _cfg(
        tmp_path, f"data.prepared_dir={prepared_dir}", "train.objective=sequence",
        "model.readout=history", "model.history_source=cache", "model.lora=true",
        "model.train_item_tower=false", "model.freeze_layers=1", "loss.preset=karma_mm",
        f"model.image_dim={IMAGE_DIM}", "train.sequence_max_len=12", *extra,
    )


@pytest.mark.parametrize(
    "query_mode, fusion", [("none", "token"), ("genre", "token"), ("none", "late")]
)
def test_karma_mm_sequence_objective_trains_l_img_and_reads_like_inference(
    tmp_path, tmp_karma_home, image_data, query_mode, fusion
):
    """karma_mm with the sequence objective: img_loss is logged, the image projection stays
    as built (the cached item states read it) while late image maps train, and the readout of
    the cached path equals encode_users over the catalog encoded with the images."""
    from karma.checkpoint import load_model
    from karma.data import load_prepared
    from karma.inference import encode_catalog, encode_users
    from karma.sequence import UserSequences
    from karma.train import _seed_everything, train

    layout = ["model.prompt_layout=history_first"] if query_mode != "none" else []
    cfg = _mm_cfg(
        tmp_path, image_data(query_mode), f"data.query_mode={query_mode}", *layout,
        "train.steps=2", "train.eval_every=2", "train.eval_users=20", "train.save_every=2",
        "train.log_every=1", f"model.image_fusion={fusion}",
    )
    run = train(cfg)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    losses = [r["img_loss"] for r in log if "img_loss" in r]
    assert len(losses) == 2 and all(np.isfinite(v) and v > 0 for v in losses)
    model, cfg2 = load_model(run / "checkpoints" / "last")
    _seed_everything(cfg.train.seed)  # the weights train() started from
    initial = build_model(cfg2)
    modules = {"token": ("image_proj", "image_head"),
               "late": ("image_item", "image_history", "image_head")}[fusion]  # fmt: skip
    assert hasattr(model, "image_proj") == (fusion == "token")
    for name in modules:
        trained, built = getattr(model, name).state_dict(), getattr(initial, name).state_dict()
        same = all(torch.equal(trained[k], built[k]) for k in built)
        assert same == (name == "image_proj")  # g and late maps train, the projection is frozen

    data = load_prepared(cfg.data.prepared_dir)
    feats = data.model_image_features(IMAGE_DIM)
    catalog = encode_catalog(model, data.items.texts, image_features=feats, progress=False)
    if fusion == "late":
        from karma.errors import KarmaError

        # history items look up their features in the table the model meets its catalog with
        with pytest.raises(KarmaError, match="image_fusion=late"):
            encode_users(model, [[0, 1]], [""], catalog, data.items.texts)
        model.set_image_table(feats)
    # the catalog inference encodes is the one training cached, image tokens included
    torch.testing.assert_close(catalog.item_hidden, model.history_cache, atol=1e-5, rtol=1e-4)
    seqs = UserSequences.build(model, data, cfg2, progress=False)
    batch = seqs.batch(model, np.arange(3), generator=torch.Generator().manual_seed(0))
    cached = _top_readout(model, batch["states"], batch["history_ids"], batch["attention_mask"],
                          batch["last_cols"])
    histories = [seqs.items[r][:-1] for r in range(3)]
    full = encode_users(model, histories, [""] * 3, catalog, data.items.texts)
    assert torch.nn.functional.cosine_similarity(cached, full, dim=-1).min() > 0.999


def test_image_features_enter_the_cached_states_and_l_img_trains_g_only(
    tmp_path, tmp_karma_home, image_data
):
    """Other image features give other cached item states and another sequence cache entry;
    L_img regresses every readout's target features and its gradient reaches g, never the
    image projection (frozen: the cached states read it); without L_img, img_loss is zero."""
    from karma.data import load_prepared
    from karma.inference import refresh_history_cache
    from karma.losses import loss_weights
    from karma.sequence import SequenceObjective, UserSequences
    from karma.train import _training_items

    cfg = _mm_cfg(tmp_path, image_data("none"))
    data = load_prepared(cfg.data.prepared_dir)
    feats = data.model_image_features(IMAGE_DIM)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_item_ids(data.items.n_items, _training_items(data))
    texts = list(data.items.texts)

    def sequences(image_features):
        refresh_history_cache(model, texts, 64, image_features)
        return model.history_cache.clone(), UserSequences.build(model, data, cfg, progress=False)

    cache_b, seqs_b = sequences(np.ascontiguousarray(feats[::-1]))
    cache, seqs = sequences(feats)
    assert not torch.allclose(cache, cache_b, atol=1e-3)
    assert not torch.allclose(seqs.states[0].float(), seqs_b.states[0].float(), atol=1e-2)
    keys = {p.name for p in (tmp_karma_home / "sequence_cache").glob("*.pt")
            if not p.stem.endswith(("-next", "-kv"))}
    assert len(keys) == 2  # one on-disk entry per set of image features

    objective = SequenceObjective(model, cfg.loss, image_features=feats)  # eval: no dropout
    batch = seqs.batch(model, np.arange(4))
    out = objective(batch)
    lambda_gen, lambda_rec, lambda_img = loss_weights(cfg.loss)
    assert lambda_img > 0 and torch.isfinite(out["img_loss"]) and out["img_loss"] > 0
    expected = (out["act_loss"] + lambda_gen * out["gen_loss"] + lambda_rec * out["rec_loss"]
                + lambda_img * out["img_loss"])
    torch.testing.assert_close(out["loss"], expected)
    out["img_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.image_head.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.image_proj.parameters())

    # g's regression of every dense readout's target (the features of x_{t+1})
    with torch.no_grad():
        hidden = batch["states"] + model.history_residual(batch["history_ids"])
        hidden = model.run_from_layer(hidden, batch["attention_mask"], cfg.model.freeze_layers)
        u = model.user_proj(hidden[batch["readout_rows"], batch["readout_cols"]])
        pred = model.image_head(torch.nn.functional.normalize(u.float(), dim=-1))
        target = torch.as_tensor(feats)[batch["readout_targets"]]
        expected_img = torch.nn.functional.mse_loss(pred, target)
    assert batch["readout_targets"].shape[0] > 4  # every readout, not one per user
    torch.testing.assert_close(out["img_loss"].detach(), expected_img, atol=1e-4, rtol=1e-4)

    cfg.loss.preset = "karma"  # the image token without L_img
    out = SequenceObjective(model, cfg.loss)(batch)
    assert out["img_loss"] == 0
    assert not any(p.requires_grad for p in model.image_head.parameters())


def test_late_image_maps_start_at_zero_and_add_to_e_and_the_history_residual(
    tmp_path, tmp_karma_home, image_data
):
    """model.image_fusion=late: the item tower reads no image token (other features, the same
    states); the maps start at zero (the text model), then e_i = normalize(W_e cond(h_i) + ID_i
    + map(v_i)) whether v_i is given or looked up by id, and the history residual adds the
    history map of each history item's features, nothing at -1. The action loss of the
    sequence objective trains both maps."""
    from karma.data import load_prepared
    from karma.inference import encode_catalog, refresh_history_cache
    from karma.sequence import SequenceObjective, UserSequences
    from karma.train import _training_items

    cfg = _mm_cfg(tmp_path, image_data("none"), "model.image_fusion=late", "loss.preset=karma")
    data = load_prepared(cfg.data.prepared_dir)
    feats = torch.as_tensor(data.model_image_features(IMAGE_DIM))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_item_ids(data.items.n_items, _training_items(data))
    texts = list(data.items.texts)[:6]
    plain = encode_catalog(model, texts, image_features=feats[:6], progress=False)
    other = encode_catalog(model, texts, image_features=feats[[5, 4, 3, 2, 1, 0]], progress=False)
    torch.testing.assert_close(plain.item_hidden, other.item_hidden)  # no image token
    torch.testing.assert_close(plain.item_emb, other.item_emb)  # zero maps: the text model

    torch.manual_seed(1)
    with torch.no_grad():
        for p in [*model.image_item.parameters(), *model.image_history.parameters(),
                  model.item_id_emb]:  # fmt: skip
            p.normal_()
    model.set_image_table(feats)
    h, ids = plain.item_hidden, torch.arange(6)
    expected = torch.nn.functional.normalize(
        model.item_proj(model.condition(h)) + model._id_rows(model.item_id_emb, ids)
        + model.image_item(feats[:6]), dim=-1,
    )
    torch.testing.assert_close(model.item_embedding(h, ids), expected)
    torch.testing.assert_close(model.item_embedding(h, ids, feats[:6]), expected)
    shuffled = encode_catalog(model, texts, image_features=feats[[5, 4, 3, 2, 1, 0]],
                              progress=False)  # fmt: skip
    assert not torch.allclose(shuffled.item_emb, model.item_embedding(h, ids), atol=1e-3)

    history_ids = torch.tensor([[-1, 3, 5, -1]])
    residual = model.history_residual(history_ids)
    assert residual[0, [0, 3]].abs().sum() == 0
    id_rows = model._id_rows(model.history_id_emb, history_ids[0, 1:3])
    torch.testing.assert_close(residual[0, 1:3], model.image_history(feats[[3, 5]]) + id_rows)

    for module in (model.image_item, model.image_history):
        torch.nn.init.zeros_(module[1].weight)  # as built: the gradient still reaches it
    refresh_history_cache(model, list(data.items.texts), 64, feats)
    seqs = UserSequences.build(model, data, cfg, progress=False)
    objective = SequenceObjective(model, cfg.loss, image_features=feats)
    objective(seqs.batch(model, np.arange(4)))["act_loss"].backward()
    for module in (model.image_item, model.image_history):
        linear = module[1]
        assert linear.weight.requires_grad and linear.weight.grad.abs().sum() > 0


def test_image_fusion_is_checked():
    from karma.config import ConfigError

    with pytest.raises(ConfigError, match="model.image_fusion"):
        load_config("configs/debug.yaml", ["model.image_fusion=early"])
