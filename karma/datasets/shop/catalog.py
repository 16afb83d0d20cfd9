"""The catalog: product pictures (Fashion-MNIST or generated stand-ins, tinted with the item's
colour), the items' attributes and arrival times, and the items tables it writes
(items.parquet, truth/items.parquet, images/)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from karma.datasets.shop.world import (
    ATTRIBUTES,
    CATEGORIES,
    COLOURS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    MATERIALS,
    PRICE_BANDS,
    START,
    STYLES,
    ShopConfig,
    attribute_names,
    attribute_sizes,
    join_words,
    strings,
    take,
)
from karma.errors import KarmaError

# ---------------------------------------------------------------------------------------------
# Pictures


def load_fashion_mnist(folder: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST pictures (N, 28, 28) uint8 (white article on black) and their
    class labels (N,) from the Debian package's idx files."""
    folder = Path(folder)
    if not all((folder / f).is_file() for pair in FASHION_MNIST_FILES for f in pair):
        raise KarmaError(
            f"{folder}: Fashion-MNIST not found. Install it with `apt-get install "
            "dataset-fashion-mnist` (Debian/Ubuntu, as root; `make setup` does it where it can), "
            "or pass --fashion-mnist DIR (the four *-ubyte.gz files) or --pictures synthetic"
        )
    images, labels = [], []
    for image_file, label_file in FASHION_MNIST_FILES:
        with gzip.open(folder / image_file) as f:
            raw = f.read()
        # idx3: magic, count, rows, cols as big-endian int32, then the pixels.
        n, rows, cols = np.frombuffer(raw, ">i4", 3, offset=4)
        images.append(np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols))
        with gzip.open(folder / label_file) as f:
            labels.append(np.frombuffer(f.read(), np.uint8, offset=8))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def synthetic_pictures(
    per_class: int = 20, size: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Small generated stand-ins for Fashion-MNIST (tests, machines without the package): one
    bright shape per class (a bar at a class-specific row), with per-picture jitter."""
    rng = np.random.default_rng(seed)
    n_classes = len(CATEGORIES)
    pictures = np.zeros((n_classes * per_class, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    for k, c in enumerate(labels):
        top = c * (size - 2) // n_classes
        left = int(rng.integers(0, size // 3))
        pictures[k, top : top + 3, left : size - left] = rng.integers(150, 256)
    return pictures, labels


def tint(pictures: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8: each article (..., H, W) in its colour rgb (..., 3) on white, the
    article's intensity as the blend weight (Fashion-MNIST articles are bright on black)."""
    alpha = pictures.astype(np.float32)[..., None] / 255.0  # (..., H, W, 1)
    colour = np.asarray(rgb, np.float32)[..., None, None, :]  # (..., 1, 1, 3)
    return np.round(255.0 * (1.0 - alpha) + colour * alpha).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The catalog


@dataclass
class Catalog:
    """Items in arrival order (item_idx i arrives at arrival[i], non-decreasing)."""

    attrs: np.ndarray  # (n, 6) int32 value of each attribute in ATTRIBUTES order
    colour_in_title: np.ndarray  # (n,) bool
    picture: np.ndarray  # (n,) int64 index into the picture set
    arrival: np.ndarray  # (n,) int64 seconds after START
    log_pop: np.ndarray  # (n,) float32 latent popularity


def build_catalog(cfg: ShopConfig, labels: np.ndarray) -> Catalog:
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.items
    sizes = attribute_sizes()
    attrs = np.empty((n, len(ATTRIBUTES)), dtype=np.int32)
    for a, size in enumerate(sizes):
        # Skewed value frequencies, as in a real catalog (a few colours and brands dominate).
        p = rng.dirichlet(np.full(size, 2.0))
        attrs[:, a] = rng.choice(size, n, p=p)
    by_class = [np.flatnonzero(labels == c) for c in range(len(CATEGORIES))]
    picture = np.empty(n, dtype=np.int64)
    for c, pool in enumerate(by_class):
        rows = np.flatnonzero(attrs[:, 0] == c)
        picture[rows] = pool[rng.integers(0, len(pool), len(rows))]
    horizon = cfg.days * 86_400
    cold = rng.random(n) < cfg.cold_share
    arrival = np.where(cold, rng.integers(1, horizon, n), 0)
    order = np.argsort(arrival, kind="stable")
    return Catalog(
        attrs=attrs[order],
        colour_in_title=(rng.random(n) >= cfg.colour_missing)[order],
        picture=picture[order],
        arrival=arrival[order],
        log_pop=rng.normal(0.0, 1.0, n).astype(np.float32)[order],
    )


def image_name(picture: int, colour: int) -> str:
    return f"images/{picture:05d}-{COLOURS[colour][0]}.png"


def write_catalog(cat: Catalog, brands: list[str], cfg: ShopConfig, out: Path) -> None:
    """items.parquet and truth/items.parquet, in chunks of a million items."""
    n = len(cat.arrival)
    chunk = 1_000_000
    a = cat.attrs
    # Title words: brand colour material style noun (colour only when in the title).
    word_tables = [
        pa.array(brands),
        pa.array([c[0] for c in COLOURS]),
        pa.array(list(MATERIALS)),
        pa.array(list(STYLES)),
        pa.array([c[1] for c in CATEGORIES]),
    ]
    items_writer = truth_writer = None
    (out / "truth").mkdir(parents=True, exist_ok=True)
    try:
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            m = sl.stop - sl.start
            slots = np.stack([a[sl, 1], a[sl, 2], a[sl, 3], a[sl, 4], a[sl, 0]], axis=1)
            present = np.ones_like(slots, dtype=bool)
            present[:, 1] = cat.colour_in_title[sl]
            titles = join_words(slots, present, word_tables)
            ids = strings(np.arange(sl.start, sl.stop), "i")
            images: pa.Array = pa.nulls(m, pa.string())
            if cfg.images:
                images = pa.array([image_name(p, c) for p, c in zip(cat.picture[sl], a[sl, 2])])
            items = pa.table(
                {
                    "item_id": ids,
                    "title": titles,
                    "category": pa.ListArray.from_arrays(
                        pa.array(np.arange(m + 1, dtype=np.int32)),
                        take(pa.array([c[0] for c in CATEGORIES]), a[sl, 0]),
                    ),
                    "attributes": take(pa.array(list(PRICE_BANDS)), a[sl, 5]),
                    "image": images,
                }
            )
            truth = pa.table(
                {
                    "item_id": ids,
                    **{
                        name: take(pa.array(vocab), a[sl, k])
                        for k, (name, vocab) in enumerate(zip(ATTRIBUTES, attribute_names(brands)))
                    },
                    "colour_in_title": cat.colour_in_title[sl],
                    "picture": cat.picture[sl],
                    "arrival": cat.arrival[sl] + START,
                    "cold": cat.arrival[sl] > 0,
                    "log_popularity": cat.log_pop[sl],
                }
            )
            if items_writer is None:
                items_writer = pq.ParquetWriter(out / "items.parquet", items.schema)
                truth_writer = pq.ParquetWriter(out / "truth" / "items.parquet", truth.schema)
            items_writer.write_table(items)
            truth_writer.write_table(truth)
    finally:
        for writer in (items_writer, truth_writer):
            if writer is not None:
                writer.close()


def write_pictures(cat: Catalog, pictures: np.ndarray, out: Path) -> int:
    """One PNG per distinct (picture, colour) of the catalog; returns how many."""
    (out / "images").mkdir(exist_ok=True)
    keys = np.unique(cat.picture * len(COLOURS) + cat.attrs[:, 2])
    palette = np.array([rgb for _, rgb, _ in COLOURS])
    bar = tqdm(total=len(keys), desc="shop pictures", unit="img", disable=None)
    for start in range(0, len(keys), 4096):
        picture, colour = np.divmod(keys[start : start + 4096], len(COLOURS))
        for p, c, pixels in zip(picture, colour, tint(pictures[picture], palette[colour])):
            Image.fromarray(pixels).save(out / image_name(p, c))
        bar.update(len(picture))
    bar.close()
    return len(keys)
