"""Tests for karma.data: validation messages, the split protocol, query synthesis, prepared I/O."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karma.cli import main
from karma.config import Config, ConfigError
from karma.data import (
    EXAMPLES_SCHEMA,
    ITEMS_SCHEMA,
    example_rng,
    format_stats,
    load_files,
    load_prepared,
    parse_timestamp,
    prepare_dataset,
    split_leave_one_out,
    synthesize_query,
)
from karma.errors import DataError

ITEMS = [
    {"item_id": "m1", "title": "Toy Story", "year": 1995, "category": ["Animation", "Comedy"]},
    {"item_id": "m2", "title": "Heat", "year": 1995, "category": ["Action", "Crime", "Thriller"]},
    {"item_id": "m3", "title": "Fargo", "year": 1996, "category": ["Crime", "Drama"]},
    {"item_id": "m4", "title": "Alien", "year": 1979, "category": ["Horror", "Sci-Fi"]},
    {"item_id": "m5", "title": "Clueless", "year": 1995, "category": ["Comedy", "Romance"]},
    {"item_id": "m6", "title": "Unwatched", "year": None, "category": []},
]


def _interactions(n_users: int = 5, seed: int = 0) -> list[dict]:
    """Random interactions with timestamp ties, in shuffled row order, no exact duplicates."""
    rng = random.Random(seed)
    rows = {}
    for u in range(n_users):
        n, user_rows = rng.randint(3, 8), {}
        while len(user_rows) < n:
            key = (f"u{u}", f"m{rng.randint(1, 5)}", rng.randint(1, 6))
            user_rows[key] = {"user_id": key[0], "item_id": key[1], "timestamp": key[2]}
        rows.update(user_rows)
    out = list(rows.values())
    rng.shuffle(out)
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    """Write rows as CSV (lists as "a|b"), JSONL or Parquet, by suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {
                        k: "|".join(v) if isinstance(v, list) else ("" if v is None else v)
                        for k, v in r.items()
                    }
                )
    return path


def _cfg(items: Path, inter: Path, out: Path, **data) -> Config:
    cfg = Config()
    cfg.data.source = "files"
    cfg.data.items_path = str(items)
    cfg.data.interactions_path = str(inter)
    cfg.data.prepared_dir = str(out)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _error(tmp_path: Path, items: list[dict], inter: list[dict], suffix: str = ".csv") -> str:
    with pytest.raises(DataError) as exc:
        load_files(
            _write(tmp_path / f"items{suffix}", items), _write(tmp_path / f"inter{suffix}", inter)
        )
    return str(exc.value)


# --- validation ------------------------------------------------------------------------------


def test_missing_column_names_file_and_field(tmp_path):
    msg = _error(
        tmp_path,
        [{"item_id": "m1", "name": "x"}],
        [{"user_id": "u", "item_id": "m1", "timestamp": 1}],
    )
    assert "items.csv" in msg and "field 'title': missing column" in msg


def test_empty_title_duplicate_id_unknown_item_bad_timestamp_all_reported(tmp_path):
    items = [
        {"item_id": "m1", "title": "A"},
        {"item_id": "m2", "title": "  "},
        {"item_id": "m1", "title": "C"},
    ]
    inter = [
        {"user_id": "u1", "item_id": "m1", "timestamp": "5"},
        {"user_id": "u1", "item_id": "nope", "timestamp": "6"},
        {"user_id": "u1", "item_id": "m1", "timestamp": "yesterday"},
    ]
    msg = _error(tmp_path, items, inter)
    assert msg.startswith("4 data errors (rows are 1-based data rows, header not counted)")
    assert "items.csv: row 2, field 'title': empty title" in msg
    assert "items.csv: row 3, field 'item_id': duplicate item_id 'm1' (first at row 1)" in msg
    assert "inter.csv: row 2, field 'item_id': unknown item id 'nope'" in msg
    assert "inter.csv: row 3, field 'timestamp': unparseable timestamp 'yesterday'" in msg


def test_bad_types_in_jsonl(tmp_path):
    items = [
        {"item_id": 1.5, "title": "A"},
        {"item_id": "m2", "title": 7},
        {"item_id": "m3", "title": "C"},
    ]
    inter = [{"user_id": "u", "item_id": "m3", "timestamp": 1, "clicked": "maybe"}]
    msg = _error(tmp_path, items, inter, suffix=".jsonl")
    assert "items.jsonl: row 1, field 'item_id': bad type float" in msg
    assert "items.jsonl: row 2, field 'title': bad type int" in msg
    assert "inter.jsonl: row 1, field 'clicked': bad value 'maybe'" in msg


def test_error_limit_shows_first_20_and_counts_the_rest(tmp_path):
    inter = [{"user_id": "u", "item_id": f"x{i}", "timestamp": i} for i in range(30)]
    msg = _error(tmp_path, ITEMS[:1], inter)
    assert msg.startswith("30 data errors")
    assert "row 20, field 'item_id'" in msg and "row 21," not in msg
    assert msg.endswith("... and 10 more")


def test_malformed_csv_row_and_json_line(tmp_path):
    items = _write(tmp_path / "items.csv", ITEMS)
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\nu1,m1,1\nu1,m2,2,extra\n")
    with pytest.raises(DataError, match=r"inter.csv: row 2, field '\*': expected 3 columns, got 4"):
        load_files(items, inter)
    bad = tmp_path / "inter.jsonl"
    bad.write_text('{"user_id": "u1", "item_id": "m1", "timestamp": 1}\n{"user_id": \n')
    with pytest.raises(DataError, match=r"inter.jsonl: row 2, field '\*': not valid JSON"):
        load_files(items, bad)


def test_parse_timestamp_int_and_iso():
    assert parse_timestamp(881250949) == 881250949
    assert parse_timestamp("881250949") == 881250949
    assert parse_timestamp("881250949.0") == 881250949
    assert parse_timestamp("1970-01-02T00:00:00") == 86400  # naive = UTC
    assert parse_timestamp("1970-01-02T01:00:00+01:00") == 86400
    assert parse_timestamp("1970-01-02T00:00:00Z") == 86400


def test_duplicates_and_short_users_dropped_and_counted(tmp_path):
    inter = [
        {"user_id": "a", "item_id": "m1", "timestamp": 1},
        {"user_id": "a", "item_id": "m1", "timestamp": 1},  # exact duplicate
        {"user_id": "a", "item_id": "m2", "timestamp": 2},
        {"user_id": "a", "item_id": "m3", "timestamp": 3},
        {"user_id": "b", "item_id": "m1", "timestamp": 1},
        {"user_id": "b", "item_id": "m2", "timestamp": 2},
    ]
    cfg = _cfg(
        _write(tmp_path / "i.csv", ITEMS), _write(tmp_path / "x.csv", inter), tmp_path / "out"
    )
    stats = load_prepared(prepare_dataset(cfg)).stats
    assert stats["dropped"] == {
        "duplicate_interactions": 1,
        "users_below_min_interactions": 1,
        "interactions_of_dropped_users": 2,
    }
    assert stats["users"] == 1 and stats["interactions"] == 3
    table = format_stats(cfg.data.prepared_dir)
    assert re.search(r"dropped users_below_min_interactions +1\n", table)
    assert "protocol: chronological leave-one-out" in table


# --- split -----------------------------------------------------------------------------------


def _split(tmp_path: Path, inter: list[dict], **kw):
    source = load_files(_write(tmp_path / "i.csv", ITEMS), _write(tmp_path / "x.csv", inter))
    return source, split_leave_one_out(source, **kw)[0]


def test_split_protocol_properties(tmp_path):
    inter = _interactions(n_users=20, seed=1)
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
        _write(tmp_path / "i.csv", ITEMS), _write(tmp_path / "x.csv", _interactions())
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
    inter = _interactions(n_users=10)
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


# --- impressions -----------------------------------------------------------------------------


def test_unclicked_rows_and_impressions_become_hard_negatives(tmp_path):
    inter = [
        {"user_id": "a", "item_id": "m1", "timestamp": 1, "clicked": "true", "impressions": ""},
        {
            "user_id": "a",
            "item_id": "m2",
            "timestamp": 2,
            "clicked": "true",
            "impressions": '["m4"]',
        },
        {"user_id": "a", "item_id": "m3", "timestamp": 2, "clicked": "false", "impressions": ""},
        {
            "user_id": "a",
            "item_id": "m5",
            "timestamp": 2,
            "clicked": "true",
            "impressions": "m2|m6",
        },
        {"user_id": "a", "item_id": "m6", "timestamp": 9, "clicked": "1", "impressions": ""},
        {"user_id": "a", "item_id": "m1", "timestamp": 5, "clicked": "0", "impressions": ""},
    ]
    source, splits = _split(tmp_path, inter)
    idx = source.items.index()
    assert len(source.interactions) == 4 and source.notes["unclicked_rows"] == 2
    assert source.notes["unclicked_rows_without_click"] == 1
    # m2's request (user a, t=2): shown m4 + unclicked m3; m5 (also clicked) is not a negative.
    assert splits["train"].impressions == [[idx["m4"], idx["m3"]]]
    assert splits["valid"].impressions == [[idx["m6"], idx["m3"]]]  # m2 was clicked: excluded
    assert splits["test"].impressions == [[]]
    with pytest.raises(DataError, match=r"row 2, field 'impressions': unknown item id 'zz'"):
        load_files(
            _write(tmp_path / "i2.csv", ITEMS),
            _write(tmp_path / "x2.csv", [inter[0], {**inter[1], "impressions": "zz"}]),
        )


# --- prepared dataset ------------------------------------------------------------------------


def test_csv_jsonl_parquet_give_identical_prepared_output(tmp_path):
    inter = _interactions(n_users=8, seed=2)
    outs = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        items = _write(tmp_path / f"items{suffix}", ITEMS)
        x = _write(tmp_path / f"inter{suffix}", inter)
        outs.append(
            prepare_dataset(_cfg(items, x, tmp_path / suffix[1:], query_mode="genre_decade"))
        )
    for name in ("items", "train", "valid", "test"):
        tables = [pq.read_table(out / f"{name}.parquet") for out in outs]
        assert tables[0].num_rows > 0
        assert tables[0].equals(tables[1]) and tables[0].equals(tables[2]), name
    stats = [json.loads((out / "stats.json").read_text()) for out in outs]
    assert stats[0] == stats[1] == stats[2]


def test_prepared_layout_and_load_prepared(tmp_path):
    inter = _interactions(n_users=6)
    cfg = _cfg(_write(tmp_path / "i.csv", ITEMS), _write(tmp_path / "x.csv", inter), tmp_path / "p")
    out = prepare_dataset(cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "items.parquet",
        "stats.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    assert pq.read_schema(out / "items.parquet").remove_metadata() == ITEMS_SCHEMA
    assert pq.read_schema(out / "train.parquet").remove_metadata() == EXAMPLES_SCHEMA
    data = load_prepared(out)
    assert data.items.n_items == 6 and data.items.item_ids == [r["item_id"] for r in ITEMS]
    assert data.items.texts[0] == "Toy Story (1995) | Animation, Comedy"
    assert data.items.years[5] is None and data.items.categories[5] == []
    test = data.split("test")
    assert len(test) == 6 and test.targets.dtype == np.int64
    assert data.stats["examples"] == {n: len(data.split(n)) for n in ("train", "valid", "test")}
    assert data.stats["interactions"] == len(inter)
    assert not list(tmp_path.glob(".p.*"))


def test_failed_prepare_keeps_previous_dataset(tmp_path, monkeypatch):
    items = _write(tmp_path / "i.csv", ITEMS)
    cfg = _cfg(items, _write(tmp_path / "x.csv", _interactions(seed=1)), tmp_path / "p")
    before = (prepare_dataset(cfg) / "train.parquet").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("karma.data.save_config", boom)
    cfg.data.interactions_path = str(_write(tmp_path / "y.csv", _interactions(seed=2)))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg)
    assert (tmp_path / "p" / "train.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_broken_csv_raises_and_cli_exits_2(tmp_path, capsys):
    items = _write(tmp_path / "items.csv", ITEMS)
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\nu1,m1,1\nu1,m2,2\nu1,m3,not-a-time\n")
    cfg = _cfg(items, inter, tmp_path / "out")
    with pytest.raises(DataError, match=r"inter.csv: row 3, field 'timestamp': unparseable"):
        prepare_dataset(cfg)
    argv = [
        "data",
        "prepare",
        "data.source=files",
        f"data.items_path={items}",
        f"data.interactions_path={inter}",
        f"data.prepared_dir={tmp_path / 'out'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("karma: error: ") and "inter.csv: row 3, field 'timestamp'" in err
    assert not (tmp_path / "out").exists()


def test_unknown_source_and_split_names(tmp_path):
    cfg = Config()
    cfg.data.source = "nope"
    with pytest.raises(ConfigError, match="data.source"):
        prepare_dataset(cfg)
    with pytest.raises(DataError, match="run `karma data prepare`"):
        load_prepared(tmp_path / "missing")
