"""Tests for karma.data: dropped counts and stats, prepared dataset I/O, the CLI exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_tables import ITEMS, random_interactions, write_table

from karma.cli import main
from karma.config import Config, ConfigError
from karma.data import (
    EXAMPLES_SCHEMA,
    ITEMS_SCHEMA,
    format_stats,
    load_prepared,
    prepare_dataset,
)
from karma.errors import DataError


def _cfg(items: Path, inter: Path, out: Path, **data) -> Config:
    cfg = Config()
    cfg.data.source = "files"
    cfg.data.items_path = str(items)
    cfg.data.interactions_path = str(inter)
    cfg.data.prepared_dir = str(out)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# --- stats -----------------------------------------------------------------------------------


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
        write_table(tmp_path / "i.csv", ITEMS),
        write_table(tmp_path / "x.csv", inter),
        tmp_path / "out",
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


# --- prepared dataset ------------------------------------------------------------------------


def test_csv_jsonl_parquet_give_identical_prepared_output(tmp_path):
    inter = random_interactions(n_users=8, seed=2)
    outs = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        items = write_table(tmp_path / f"items{suffix}", ITEMS)
        x = write_table(tmp_path / f"inter{suffix}", inter)
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
    inter = random_interactions(n_users=6)
    cfg = _cfg(
        write_table(tmp_path / "i.csv", ITEMS),
        write_table(tmp_path / "x.csv", inter),
        tmp_path / "p",
    )
    out = prepare_dataset(cfg)
    assert sorted(p.name for p in out.iterdir()) == [
        ".karma-output",
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
    items = write_table(tmp_path / "i.csv", ITEMS)
    cfg = _cfg(items, write_table(tmp_path / "x.csv", random_interactions(seed=1)), tmp_path / "p")
    before = (prepare_dataset(cfg) / "train.parquet").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("karma.data.save_config", boom)
    cfg.data.interactions_path = str(write_table(tmp_path / "y.csv", random_interactions(seed=2)))
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg)
    assert (tmp_path / "p" / "train.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_broken_csv_raises_and_cli_exits_2(tmp_path, capsys):
    items = write_table(tmp_path / "items.csv", ITEMS)
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


# --- the output directory never takes a user's files ------------------------------------------


def test_prepare_into_the_folder_of_the_inputs_deletes_nothing(tmp_path, capsys):
    """The reported data loss: data.prepared_dir = the folder holding the user's own files."""
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    items = write_table(mydata / "items.csv", ITEMS)
    inter = write_table(mydata / "interactions.csv", random_interactions())
    (mydata / "notes.txt").write_text("unrelated\n")
    before = {p.name: p.read_bytes() for p in mydata.iterdir()}
    argv = ["data", "prepare", "data.source=files", f"data.items_path={items}",
            f"data.interactions_path={inter}", f"data.prepared_dir={mydata}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"karma: error: {mydata}: holds the input {items}" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in mydata.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"]  # no temp sibling left

    # Inputs elsewhere: the folder is still not karma's, so it is refused, not emptied.
    other = tmp_path / "inputs"
    other.mkdir()
    argv[3:5] = [f"data.items_path={write_table(other / 'i.csv', ITEMS)}",
                 f"data.interactions_path={write_table(other / 'x.csv', random_interactions())}"]
    assert main(argv) == 2
    assert "not written by karma (no .karma-output file)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mydata.iterdir()} == before


def test_prepare_replaces_its_own_output(tmp_path):
    items = write_table(tmp_path / "i.csv", ITEMS)
    cfg = _cfg(items, write_table(tmp_path / "x.csv", random_interactions(seed=1)), tmp_path / "p")
    first = (prepare_dataset(cfg) / "train.parquet").read_bytes()
    cfg.data.interactions_path = str(write_table(tmp_path / "y.csv", random_interactions(seed=2)))
    out = prepare_dataset(cfg)
    assert (out / "train.parquet").read_bytes() != first
    assert (out / ".karma-output").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_damaged_stats_json_is_named(tmp_path):
    cfg = _cfg(write_table(tmp_path / "i.csv", ITEMS),
               write_table(tmp_path / "x.csv", random_interactions()), tmp_path / "p")
    stats = prepare_dataset(cfg) / "stats.json"
    stats.write_text(stats.read_text()[:40])
    with pytest.raises(DataError, match=r"stats.json: damaged \(.*\); run `karma data prepare`"):
        load_prepared(tmp_path / "p")
    stats.write_text('{"source": "files", "users": "three"}')
    with pytest.raises(DataError, match="key 'users' missing or of the wrong type"):
        format_stats(tmp_path / "p")
