"""Tests for karma.datasets.shop (`karma shop`): determinism, the data contract it writes, the
simulated mechanisms (colour only in the image, cold items, pages, queries), the oracle, and the
way from `karma shop` through `karma data prepare`. Small generated pictures stand in for
Fashion-MNIST."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from karma.cli import main
from karma.config import Config
from karma.data import load_image_features, load_prepared, load_source
from karma.datasets.shop import (
    COLOURS,
    START,
    ShopConfig,
    generate_shop,
    load_fashion_mnist,
    synthetic_pictures,
    tint,
)
from karma.errors import KarmaError
from karma.images import IMAGE_DIM


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shop")
    generate_shop(ShopConfig(items=300, users=120, seed=3), out, pictures=synthetic_pictures())
    return out


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_same_seed_same_shop_other_seed_other_shop(shop, tmp_path):
    again = tmp_path / "again"
    generate_shop(ShopConfig(items=300, users=120, seed=3), again, pictures=synthetic_pictures())
    for name in ("items.parquet", "interactions.parquet", "oracle.parquet", "truth/items.parquet"):
        assert pq.read_table(shop / name).equals(pq.read_table(again / name)), name
    other = tmp_path / "other"
    generate_shop(ShopConfig(items=300, users=120, seed=4), other, pictures=synthetic_pictures())
    assert not pq.read_table(shop / "interactions.parquet").equals(
        pq.read_table(other / "interactions.parquet")
    )


def test_summary_says_simulated_and_counts_add_up(shop):
    summary = json.loads((shop / "shop.json").read_text())
    assert summary["simulated"].startswith("yes")
    clicks = pq.read_metadata(shop / "interactions.parquet").num_rows
    assert summary["clicks"] == clicks
    assert summary["requests"] == clicks + summary["requests_without_click"]
    assert 0.5 < clicks / summary["requests"] < 1.0


def test_colour_is_left_out_of_a_share_of_titles_but_is_in_the_image(shop):
    items = {r["item_id"]: r for r in _rows(shop / "items.parquet")}
    truth = _rows(shop / "truth" / "items.parquet")
    missing = [t for t in truth if not t["colour_in_title"]]
    assert 0.2 < len(missing) / len(truth) < 0.4  # colour_missing = 0.3
    pictures, _ = synthetic_pictures()
    rgb = {name: np.array(c) for name, c, _ in COLOURS}
    for t in truth:
        item = items[t["item_id"]]
        assert (t["colour"] in item["title"].split()) == t["colour_in_title"]
        image = np.asarray(Image.open(shop / item["image"]))
        assert (image == tint(pictures[t["picture"]], rgb[t["colour"]])).all()


def test_tint_blends_from_white_to_the_colour():
    picture = np.array([[0, 255]], dtype=np.uint8)
    out = tint(picture, np.array([200, 30, 40]))
    assert out.tolist() == [[[255, 255, 255], [200, 30, 40]]]


def test_pages_clicks_and_cold_items(shop):
    truth = {t["item_id"]: t for t in _rows(shop / "truth" / "items.parquet")}
    rows = _rows(shop / "interactions.parquet")
    last_time: dict[str, int] = {}
    for r in rows:
        page = r["impressions"]
        assert r["item_id"] in page and len(set(page)) == len(page) <= 10
        # Nothing is shown before it exists: cold items only after their arrival.
        assert all(truth[i]["arrival"] <= r["timestamp"] for i in page)
        assert r["timestamp"] > last_time.get(r["user_id"], 0)  # strictly increasing per user
        last_time[r["user_id"]] = r["timestamp"]
    assert any(truth[r["item_id"]]["cold"] for r in rows)
    positions = Counter(r["impressions"].index(r["item_id"]) for r in rows)
    assert positions[0] > positions[9]  # position bias


def test_queries_feed_visits_synonyms_and_typos(shop):
    queries = [r["query"] for r in _rows(shop / "interactions.parquet")]
    feed = sum(q == "" for q in queries) / len(queries)
    assert 0.15 < feed < 0.45  # query_share 0.7, clicks slightly likelier on typed queries
    words = Counter(w for q in queries for w in q.split())
    assert words["sneakers"] and (words["trainers"] or words["running"])  # synonyms
    known = set(" ".join(r["title"] for r in _rows(shop / "items.parquet")).split())
    known |= {"cheap", "affordable", "premium", "luxury", "tee", "top", "tshirt", "pants"}
    assert any(w not in known for w in words)  # typos and other synonyms


def test_oracle_ranks_available_items_for_each_users_last_click(shop):
    rows = _rows(shop / "interactions.parquet")
    last = {r["user_id"]: r for r in rows}
    truth = {t["item_id"]: t for t in _rows(shop / "truth" / "items.parquet")}
    oracle = _rows(shop / "oracle.parquet")
    assert {o["user_id"] for o in oracle} == set(last)
    hits = 0
    for o in oracle:
        assert o["timestamp"] == last[o["user_id"]]["timestamp"]
        assert len(set(o["ranking"])) == len(o["ranking"]) <= 200
        assert all(truth[i]["arrival"] <= o["timestamp"] for i in o["ranking"])
        hits += last[o["user_id"]]["item_id"] in o["ranking"][:50]
    popular = [i for i, _ in Counter(r["item_id"] for r in rows).most_common(50)]
    pop_hits = sum(r["item_id"] in popular for r in last.values())
    assert hits > 1.5 * pop_hits  # the simulator's ideal ranking knows the users


def test_fashion_mnist_idx_files_are_read(tmp_path):
    pictures = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = np.array([2051, 2, 3, 4], ">i4").tobytes()
    for split in ("train", "t10k"):
        with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + pictures.tobytes())
        with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, 2], ">i4").tobytes() + bytes([7, 9]))
    images, labels = load_fashion_mnist(tmp_path)
    assert images.shape == (4, 3, 4) and (images[:2] == pictures).all()
    assert labels.tolist() == [7, 9, 7, 9]


def test_missing_fashion_mnist_says_what_to_install(tmp_path, capsys):
    with pytest.raises(KarmaError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    code = main(["shop", "--items", "50", "--out", str(tmp_path / "s"),
                 "--fashion-mnist", str(tmp_path)])  # fmt: skip
    assert code == 2 and "dataset-fashion-mnist" in capsys.readouterr().err


def test_cli_shop_then_prepare_with_image_features(tmp_path, capsys):
    out = tmp_path / "shop"
    code = main(["shop", "--items", "12", "--users", "100", "--out", str(out),
                 "--pictures", "synthetic"])  # fmt: skip
    assert code == 0 and "simulated shop written" in capsys.readouterr().out
    prepared = tmp_path / "prepared"
    code = main(["data", "prepare", "--config", "configs/shop.yaml", f"data.path={out}",
                 f"data.prepared_dir={prepared}"])  # fmt: skip
    assert code == 0
    data = load_prepared(prepared)
    feats = load_image_features(prepared)
    assert feats.shape == (data.items.n_items, IMAGE_DIM) and (feats.any(axis=1)).all()
    assert data.stats["source"] == "shop" and data.stats["images"]["items_without_image"] == 0
    test = data.split("test")
    assert any(q for q in test.queries) and any(imp for imp in test.impressions)
    # Timestamps are the simulated clock.
    assert test.timestamps.min() > START


def test_no_images_shop_is_text_only(tmp_path):
    generate_shop(ShopConfig(items=50, images=False), tmp_path, pictures=synthetic_pictures())
    assert {r["image"] for r in _rows(tmp_path / "items.parquet")} == {None}
    assert not (tmp_path / "images").exists()


def test_source_shop_needs_a_shop_folder(tmp_path):
    cfg = Config()
    cfg.data.source = "shop"
    cfg.data.path = str(tmp_path)
    with pytest.raises(KarmaError, match="not a karma shop folder"):
        load_source(cfg.data)


def test_every_user_makes_at_least_three_requests(tmp_path):
    cfg = ShopConfig(items=50, users=30, requests_per_user=1, images=False)
    summary = generate_shop(cfg, tmp_path, pictures=synthetic_pictures())
    assert summary["requests"] == 3 * 30
