"""Experiment reports: list parsing, mean ± std, tables, and seeded reruns giving equal numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from karma.config import load_config
from karma.errors import KarmaError
from karma.report import (
    format_mean_std,
    format_summary_table,
    numeric_metrics,
    parse_list,
    run_experiment,
    summarize,
)


def _result(hr10: float, ndcg10: float) -> dict:
    metrics = {"hr@10": hr10, "ndcg@10": ndcg10}
    return {
        "protocol": {"primary": "masked"},
        "metrics": {"masked": metrics, "unmasked": {k: v / 2 for k, v in metrics.items()}},
    }


def test_parse_list():
    assert parse_list("[popularity,sasrec]", "methods") == ["popularity", "sasrec"]
    assert parse_list("popularity, karma", "methods") == ["popularity", "karma"]
    assert parse_list("[0,1,2]", "seeds", int) == [0, 1, 2]
    assert parse_list([3], "seeds", int) == [3]
    with pytest.raises(KarmaError, match="seeds"):
        parse_list("[a]", "seeds", int)
    with pytest.raises(KarmaError, match="non-empty"):
        parse_list("[]", "methods")


def test_mean_std_summary_and_table():
    runs = {
        "sasrec": {0: _result(0.1, 0.05), 1: _result(0.2, 0.05), 2: _result(0.3, 0.05)},
        "pop": {0: _result(0.08, 0.04)},
    }
    assert numeric_metrics(runs["pop"][0]) == {
        "masked/hr@10": 0.08,
        "masked/ndcg@10": 0.04,
        "unmasked/hr@10": 0.04,
        "unmasked/ndcg@10": 0.02,
    }
    summary = summarize(runs)
    mean, std, n = summary["sasrec"]["masked/hr@10"]
    assert (mean, std, n) == (pytest.approx(0.2), pytest.approx(0.1), 3)  # sample std, ddof=1
    assert summary["sasrec"]["masked/ndcg@10"][1] == pytest.approx(0.0, abs=1e-12)
    assert summary["pop"]["masked/hr@10"][1] == 0.0  # one seed: std 0, not NaN
    assert format_mean_std(0.2, 0.1) == "0.2000 ± 0.1000"
    table = format_summary_table(summary, "masked/").splitlines()
    assert table[0] == "| method | seeds | hr@10 | ndcg@10 |"
    assert table[2] == "| sasrec | 3 | 0.2000 ± 0.1000 | 0.0500 ± 0.0000 |"
    assert table[3] == "| pop | 1 | 0.0800 ± 0.0000 | 0.0400 ± 0.0000 |"


def test_unknown_method_is_named(tmp_path):
    with pytest.raises(KarmaError, match="unknown.*'bogus'"):
        run_experiment(load_config(None), "[popularity,bogus]", "[0]", tmp_path)


def _tiny_config(tmp_path: Path):
    items, inter = tmp_path / "items.csv", tmp_path / "interactions.csv"
    with items.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", "title"])
        writer.writerows([f"i{i}", f"Movie {i}"] for i in range(10))
    with inter.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for u in range(12):
            writer.writerows([f"u{u}", f"i{(u * 3 + t) % 10}", t] for t in range(8))
    return load_config(
        None,
        [
            "data.source=files",
            f"data.items_path={items}",
            f"data.interactions_path={inter}",
            f"data.prepared_dir={tmp_path / 'prepared'}",
            "data.query_mode=none",
            "eval.ks=[1,5,10]",
            "baseline.sasrec.epochs=2",
            "baseline.sasrec.hidden=16",
            "baseline.sasrec.max_len=8",
            "baseline.sasrec.batch_size=4",
            "train.num_threads=1",
        ],
    )


def test_rerun_with_same_seeds_gives_same_numbers(tmp_path, capsys):
    threads = torch.get_num_threads()
    cfg = _tiny_config(tmp_path)
    try:
        first = run_experiment(cfg, "[popularity,sasrec]", "[0,1]", tmp_path / "a")
        second = run_experiment(cfg, ["popularity", "sasrec"], [0, 1], tmp_path / "b")
        capsys.readouterr()
        again = run_experiment(cfg, ["popularity", "sasrec"], [0, 1], tmp_path / "a")
    finally:
        torch.set_num_threads(threads)
    assert "reusing" in capsys.readouterr().out  # finished runs are not recomputed
    a = json.loads((first.parent / "results.json").read_text())
    b = json.loads((second.parent / "results.json").read_text())
    assert a["summary"] == b["summary"]
    for method in ("popularity", "sasrec"):
        for seed in ("0", "1"):
            assert a["runs"][method][seed]["metrics"] == b["runs"][method][seed]["metrics"]
    assert a["summary"]["popularity"]["masked/hr@10"]["std"] == 0.0  # seed-independent
    assert again == first
    report = first.read_text()
    assert "| popularity | 2 |" in report and "| sasrec | 2 |" in report
    assert "0.0993" in report and "LlamaRec" in report and "pessimistic" in report
    png = (first.parent / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
