"""`karma funnel` end to end on the debug model (tiny random backbone, real ML-100K split), in
seconds: the three-stage table for two checkpoints, its files, and the KARMA features of the
evaluation rows being exactly the u of a history that ends before the row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from karma.cli import main
from karma.errors import KarmaError
from karma.funnel import combine_runs, format_markdown

FAST = ["funnel.max_users=80", "funnel.seeds=[0,1]", "funnel.candidates=100", "funnel.ks=[10,50]",
        "funnel.train_window=4", "funnel.ctr_epochs=1", "funnel.prerank_epochs=1",
        "train.device=cpu"]


def test_funnel_cli_writes_the_three_stage_table(debug_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "funnel"
    code = main(["funnel", "--checkpoint", str(debug_checkpoint), "--compare",
                 str(debug_checkpoint), "--out", str(out), *FAST])
    assert code == 0
    results = json.loads((out / "funnel.json").read_text())
    assert (out / "funnel.png").stat().st_size > 10_000
    md = (out / "funnel.md").read_text()
    for text in ("protocol", "| recall | hr@10 |", "| pre-ranking | hr@10 |",
                 "| ranking | auc with u, e, u.e |", "| ranking | gauc without KARMA |",
                 "| ranking | auc with u.e |"):
        assert text in md
    assert results["protocol"]["users"] == 80
    a, b = (results["stages"][c] for c in results["columns"])
    # the same checkpoint twice: identical recall, pre-ranking and ranking (seeded)
    assert a["recall"] == b["recall"]
    assert a["ranking_karma"]["auc"]["values"] == b["ranking_karma"]["auc"]["values"]
    assert len(results["ranking_base"]["auc"]["values"]) == 2
    assert 0.0 <= a["preranking"]["hr@50"]["mean"] <= a["preranking"]["candidate_recall"]["mean"]
    # two runs (as of two training seeds) combine into one table: recall over runs, scorers pooled
    combined = combine_runs([results, results])
    c = combined["stages"][results["columns"][0]]
    assert c["recall"]["hr@10"] == {"mean": a["recall"]["hr@10"], "std": 0.0,
                                    "values": [a["recall"]["hr@10"]] * 2}
    assert c["ranking_karma"]["auc"]["values"] == a["ranking_karma"]["auc"]["values"] * 2
    assert "over 2 pairs of checkpoints" in format_markdown(combined)
    with pytest.raises(KarmaError, match="differ"):
        combine_runs([results, {**results, "columns": ["x", "y"]}])


def test_evaluation_rows_get_the_u_of_the_history_before_them(debug_checkpoint: Path) -> None:
    from karma.funnel import _encode_checkpoint
    from karma.inference import encode_catalog, encode_users

    enc = _encode_checkpoint(debug_checkpoint, FAST)
    rows, data = enc["rows"], enc["data"]
    ev = np.flatnonzero(rows.stage > 0)
    # the retrieval requests themselves: valid / test histories of the prepared split
    test = data.split("test")
    first = list(test.user_ids).index(rows.user_ids[ev[1]])
    assert rows.histories[ev[1]] == list(test.histories[first])
    assert rows.items[ev[1]] not in rows.histories[ev[1]][-1:]
    from karma.checkpoint import load_model

    model, _ = load_model(debug_checkpoint, ["train.device=cpu"])
    texts = list(data.items.texts)
    catalog = encode_catalog(model, texts, batch_size=256)
    hist = [rows.histories[i] for i in ev[:6]]
    queries = [rows.queries[i] for i in ev[:6]]
    u = np.asarray(encode_users(model, hist, queries, catalog, texts, batch_size=256))
    # batches pad differently here than in the funnel's encoding: float noise only
    np.testing.assert_allclose(enc["u"][ev[:6]], u, atol=1e-4)
    # the check can fail: a history that includes the row's own item gives another u
    leaky = [h + [int(rows.items[i])] for h, i in zip(hist, ev[:6])]
    u_leak = np.asarray(encode_users(model, leaky, queries, catalog, texts))
    assert np.abs(u_leak - u).max() > 1e-3


def test_funnel_bad_inputs(debug_checkpoint: Path, tmp_path: Path) -> None:
    from karma.config import ConfigError
    from karma.funnel import run_funnel

    with pytest.raises(ConfigError, match="funnel.nope"):
        run_funnel(debug_checkpoint, out_dir=tmp_path / "a", overrides=["funnel.nope=1"])
    with pytest.raises(KarmaError, match="funnel.train_window"):
        run_funnel(debug_checkpoint, out_dir=tmp_path / "b",
                   overrides=[*FAST, "funnel.train_window=-2"])
    assert main(["funnel", "--checkpoint", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "c")]) == 2


def test_funnel_on_result_pages_with_a_karma_mm_checkpoint(mm_run, tmp_path: Path) -> None:
    """The shop: pre-ranking re-scores each request's page, the CTR rows are its pages, the
    ranker reads the query words, and the catalog is encoded with its pictures (karma_mm)."""
    out = tmp_path / "shop_funnel"
    code = main(["funnel", "--checkpoint", str(mm_run["run"] / "checkpoints" / "best"),
                 "--out", str(out), "funnel.max_users=40", "funnel.seeds=[0]",
                 "funnel.ks=[1,5]", "funnel.train_window=3", "funnel.ctr_epochs=1",
                 "funnel.prerank_epochs=1", "train.device=cpu"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "funnel.json").read_text())
    protocol = results["protocol"]
    assert "result page" in protocol["preranking"] and "query words" in protocol["ranking"]
    assert "the items shown beside it = 0" in protocol["ranking"]
    (column,) = results["columns"]
    assert column == "karma_mm"
    pre = results["stages"][column]["preranking"]
    assert pre["candidate_recall"]["mean"] == 1.0  # the click is always on its own page
    assert 0.0 <= pre["hr@1"]["mean"] <= pre["hr@5"]["mean"] <= 1.0


def test_page_candidates_need_pages(debug_checkpoint: Path, tmp_path: Path) -> None:
    from karma.funnel import run_funnel

    with pytest.raises(KarmaError, match="prerank_candidates=page"):
        run_funnel(debug_checkpoint, out_dir=tmp_path / "p",
                   overrides=[*FAST, "funnel.prerank_candidates=page"])
