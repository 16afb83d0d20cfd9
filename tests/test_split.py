"""Tests for karma.split: the leave-one-out protocol, query synthesis, per-example seeding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_tables import ITEMS, random_interactions, write_table

from karma.config import ConfigError
from karma.split import example_rng, split_leave_one_out, synthesize_query, training_windows
from karma.tables import load_files

# --- split -----------------------------------------------------------------------------------


def _split(tmp_path: Path, inter: list[dict], **kw):
    source = load_files(
        write_table(tmp_path / "i.csv", ITEMS), write_table(tmp_path / "x.csv", inter)
    )
    return source, split_leave_one_out(source, **kw)[0]


def test_split_protocol_properties(tmp_path):
    inter = random_interactions(n_users=20, seed=1)
    source, splits = _split(tmp_path, inter, max_history=3)
    idx = source.items.index()
    for u in {r["user_id"] for r in inter}:
        rows = [r for r in inter if r["user_id"] == u]
        rows.sort(key=lambda r: r["timestamp"])  # Python's sort is stable: the reference order
        seq = [idx[r["item_id"]] for r in rows]
        times = [r["timestamp"] for r in rows]
        n = len(seq)
        train = [i for i, x in enumerate(splits["train"].user_ids) if x == u]
        (v,) = [i for i, x in enumerate(splits["valid"].user_ids) if x == u]
        (t,) = [i for i, x in enumerate(splits["test"].user_ids) if x == u]
        # Every prefix t >= 2 of the train part, in order, histories capped at 3.
        assert [splits["train"].targets[i] for i in train] == seq[1 : n - 2]
        for k, i in enumerate(train, start=1):
            assert splits["train"].histories[i] == seq[max(0, k - 3) : k]
            assert splits["train"].timestamps[i] <= times[n - 2]
            assert splits["train"].seen[i] == []
        assert splits["valid"].targets[v] == seq[n - 2]
        assert splits["test"].targets[t] == seq[n - 1]
        assert splits["valid"].histories[v] == seq[: n - 2][-3:]
        assert splits["test"].histories[t][-1] == seq[n - 2]  # test history ends with valid item
        assert splits["test"].histories[t] == seq[: n - 1][-3:]
        assert splits["valid"].seen[v] == seq[: n - 2]  # uncapped
        assert splits["test"].seen[t] == seq[: n - 1]


def test_ties_keep_row_order_not_item_id_order(tmp_path):
    # Same timestamp, item ids in descending order: the split must follow the rows.
    inter = [{"user_id": "a", "item_id": f"m{i}", "timestamp": 7} for i in (5, 3, 4, 1, 2)]
    source, splits = _split(tmp_path, inter)
    idx = source.items.index()
    order = [idx[f"m{i}"] for i in (5, 3, 4, 1, 2)]
    assert splits["test"].seen[0] + [splits["test"].targets[0]] == order
    assert list(splits["train"].targets) == order[1:3]


def test_min_interactions_below_3_is_a_config_error(tmp_path):
    source = load_files(
        write_table(tmp_path / "i.csv", ITEMS),
        write_table(tmp_path / "x.csv", random_interactions()),
    )
    with pytest.raises(ConfigError, match="data.min_interactions"):
        split_leave_one_out(source, min_interactions=2)


# --- queries ---------------------------------------------------------------------------------


def test_synthesize_query_modes():
    genres = ["Comedy", "Romance", "Drama", "War"]
    for seed in range(50):
        q = synthesize_query(genres, 1995, "genre", random.Random(seed))
        words = q.split()
        assert words[-1] == "movies" and 1 <= len(words) - 1 <= 3
        assert set(words[:-1]) <= {"comedy", "romance", "drama", "war"}
        q = synthesize_query(genres, 1995, "genre_decade", random.Random(seed))
        assert q.startswith("1990s ") and q.endswith(" movies")
    assert synthesize_query(genres, 1995, "none", random.Random(0)) == ""
    assert synthesize_query([], None, "genre_decade", random.Random(0)) == "movies"
    assert synthesize_query(["Comedy"], None, "genre", random.Random(0), noun="") == "comedy"
    # Subsets are shuffled, not always in catalog order.
    seen = {synthesize_query(genres, None, "genre", random.Random(s)) for s in range(200)}
    assert "romance comedy movies" in seen and "comedy romance movies" in seen


def test_example_rng_is_per_example():
    a = [example_rng(0, "u1", 5).random() for _ in range(2)]
    assert a[0] == a[1]
    assert example_rng(0, "u1", 5).random() != example_rng(1, "u1", 5).random()
    assert example_rng(0, "u1", 5).random() != example_rng(0, "u1", 6).random()


def test_queries_deterministic_and_seeded(tmp_path):
    inter = random_interactions(n_users=10)
    _, s1 = _split(tmp_path, inter, query_mode="genre", seed=3)
    _, s2 = _split(tmp_path, inter, query_mode="genre", seed=3)
    _, s3 = _split(tmp_path, inter, query_mode="genre", seed=4)
    _, s4 = _split(tmp_path, inter, query_mode="none", seed=3)
    assert s1["train"].queries == s2["train"].queries
    assert s1["train"].queries != s3["train"].queries
    assert set(s4["train"].queries) == {""}
    # Reordering users (rows) does not change any user's queries.
    _, s5 = _split(
        tmp_path,
        sorted(inter, key=lambda r: r["user_id"], reverse=True),
        query_mode="genre",
        seed=3,
    )
    q1 = dict(zip(zip(s1["test"].user_ids, s1["test"].targets.tolist()), s1["test"].queries))
    q5 = dict(zip(zip(s5["test"].user_ids, s5["test"].targets.tolist()), s5["test"].queries))
    assert q1 == q5


def test_real_query_column_is_used(tmp_path):
    inter = [
        {"user_id": "a", "item_id": f"m{i}", "timestamp": i, "query": f"q{i}"} for i in range(1, 5)
    ]
    _, splits = _split(tmp_path, inter, query_mode="genre")
    assert splits["train"].queries == ["q2"] and splits["test"].queries == ["q4"]


@pytest.mark.parametrize("n", [0, 1, 2, 6, 7, 23])
def test_training_windows_cover_every_transition_once_or_the_newest_window(n):
    windows = training_windows(n, max_len=5)
    targets = [t for start, end in windows for t in range(start + 1, end)]
    assert sorted(targets) == list(range(1, n))  # every transition (i - 1 -> i) exactly once
    assert all(2 <= end - start <= 6 for start, end in windows)
    assert windows == sorted(windows, reverse=True)  # newest first
    last = training_windows(n, max_len=5, last_only=True)
    assert last == windows[:1] and (not last or last[0] == (max(0, n - 6), n))
