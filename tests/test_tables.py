"""Tests for karma.tables: reading CSV / JSONL / Parquet, validation messages, field parsing,
impressions. `ITEMS`, `random_interactions` and `write_table` are shared with test_split.py and
test_data.py."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karma.errors import DataError
from karma.split import split_leave_one_out
from karma.tables import load_files, parse_timestamp

ITEMS = [
    {"item_id": "m1", "title": "Toy Story", "year": 1995, "category": ["Animation", "Comedy"]},
    {"item_id": "m2", "title": "Heat", "year": 1995, "category": ["Action", "Crime", "Thriller"]},
    {"item_id": "m3", "title": "Fargo", "year": 1996, "category": ["Crime", "Drama"]},
    {"item_id": "m4", "title": "Alien", "year": 1979, "category": ["Horror", "Sci-Fi"]},
    {"item_id": "m5", "title": "Clueless", "year": 1995, "category": ["Comedy", "Romance"]},
    {"item_id": "m6", "title": "Unwatched", "year": None, "category": []},
]


def random_interactions(n_users: int = 5, seed: int = 0) -> list[dict]:
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


def write_table(path: Path, rows: list[dict]) -> Path:
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


def _error(tmp_path: Path, items: list[dict], inter: list[dict], suffix: str = ".csv") -> str:
    with pytest.raises(DataError) as exc:
        load_files(
            write_table(tmp_path / f"items{suffix}", items),
            write_table(tmp_path / f"inter{suffix}", inter),
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
    items = write_table(tmp_path / "items.csv", ITEMS)
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


def test_timestamps_must_fit_int64_and_not_mix_kinds(tmp_path):
    items = [{"item_id": f"m{i}", "title": f"T{i}"} for i in range(3)]
    inter = [{"user_id": "u", "item_id": f"m{i}", "timestamp": 10**20 if i == 1 else i}
             for i in range(3)]
    assert "row 2, field 'timestamp': timestamp 100000000000000000000 out of range" in _error(
        tmp_path, items, inter
    )
    # ISO dates and millisecond epochs: sorting them together would scramble the history.
    inter = [{"user_id": "u", "item_id": "m0", "timestamp": "2020-01-01"},
             {"user_id": "u", "item_id": "m1", "timestamp": 1577923200000},
             {"user_id": "u", "item_id": "m2", "timestamp": "2020-01-03"}]
    for suffix in (".csv", ".jsonl"):
        assert "field 'timestamp': mixes ISO-8601 (rows 1, 3) and integer (rows 2)" in _error(
            tmp_path, items, inter, suffix
        )


def test_header_only_tables_are_named(tmp_path):
    (tmp_path / "i.csv").write_text("item_id,title\n")
    write_table(tmp_path / "x.csv", [{"user_id": "u", "item_id": "m1", "timestamp": 1}])
    with pytest.raises(DataError, match=r"i.csv: items file has no rows"):
        load_files(tmp_path / "i.csv", tmp_path / "x.csv")


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
    source = load_files(
        write_table(tmp_path / "i.csv", ITEMS), write_table(tmp_path / "x.csv", inter)
    )
    splits = split_leave_one_out(source)[0]
    idx = source.items.index()
    assert len(source.interactions) == 4 and source.notes["unclicked_rows"] == 2
    assert source.notes["unclicked_rows_without_click"] == 1
    # m2's request (user a, t=2): shown m4 + unclicked m3; m5 (also clicked) is not a negative.
    assert splits["train"].impressions == [[idx["m4"], idx["m3"]]]
    assert splits["valid"].impressions == [[idx["m6"], idx["m3"]]]  # m2 was clicked: excluded
    assert splits["test"].impressions == [[]]
    with pytest.raises(DataError, match=r"row 2, field 'impressions': unknown item id 'zz'"):
        load_files(
            write_table(tmp_path / "i2.csv", ITEMS),
            write_table(tmp_path / "x2.csv", [inter[0], {**inter[1], "impressions": "zz"}]),
        )
