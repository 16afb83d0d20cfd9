"""The prepared dataset: load a source, split it, write the directory every other module reads,
and read it back.

    karma data prepare data.source=files data.items_path=items.csv \
        data.interactions_path=interactions.csv data.prepared_dir=runs/data/mine

    from karma.data import load_prepared
    data = load_prepared("runs/data/ml-100k")
    data.items.texts[0]               # "Toy Story (1995) | Animation, Children's, Comedy"
    test = data.split("test")         # Examples: user_ids, histories, targets, queries, seen, ...

Input tables and their errors: `karma.tables`. Split protocol: `karma.split` and
docs/architecture.md. Users below `data.min_interactions` are dropped and counted in stats.json
with the rows dropped while validating.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from karma.atomic import check_output_dir, replace_dir, write_json_atomic
from karma.config import (
    Config,
    ConfigError,
    DataConfig,
    config_to_dict,
    load_config,
    save_config,
)
from karma.errors import DataError, KarmaError
from karma.split import QUERY_MODES, SPLITS, Examples, protocol_line, split_leave_one_out
from karma.tables import ItemTable, SourceData, load_files

SOURCES = ("ml-100k", "ml-1m", "movielens", "recbole", "amazon", "files", "shop")
IMAGE_FEATURES_FILE = "image_features.npy"  # (n_items, 1280) float32, item_idx order

ITEMS_SCHEMA = pa.schema(
    [
        ("item_idx", pa.int32()),
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("category", pa.list_(pa.string())),
        ("year", pa.int32()),
        ("image_path", pa.string()),
    ]
)
EXAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("history", pa.list_(pa.int32())),
        ("target", pa.int32()),
        ("query", pa.string()),
        ("timestamp", pa.int64()),
        ("impressions", pa.list_(pa.int32())),
        ("seen", pa.list_(pa.int32())),
    ]
)


@dataclass
class PreparedData:
    """A prepared dataset directory (`karma data prepare` output), read on demand."""

    dir: Path
    items: ItemTable
    stats: dict[str, Any]
    _splits: dict[str, Examples] = field(default_factory=dict, repr=False)

    def split(self, name: str) -> Examples:
        if name not in SPLITS:
            raise KarmaError(f"unknown split '{name}' (known: {', '.join(SPLITS)})")
        if name not in self._splits:
            self._splits[name] = _read_examples(self.dir / f"{name}.parquet")
        return self._splits[name]

    def model_image_features(self, image_dim: int) -> np.ndarray | None:
        """What a model with `model.image_dim = image_dim` reads for this catalog: None without
        an image token (0), else the stored features, whose width must be image_dim. Every
        consumer of a trained model (train, eval, export, analyze, serve) goes through this."""
        if image_dim <= 0:
            return None
        features = load_image_features(self.dir)
        if features is None:
            raise DataError(
                f"{self.dir}: the model reads an image token (model.image_dim={image_dim}) but "
                f"this prepared dataset has no {IMAGE_FEATURES_FILE} (its items have no images)"
            )
        if features.shape[1] != image_dim:
            raise DataError(
                f"{self.dir / IMAGE_FEATURES_FILE}: {features.shape[1]}-d features but the model "
                f"was built for model.image_dim={image_dim}"
            )
        return features


# ---------------------------------------------------------------------------------------------
# Prepared dataset I/O


def _check_data_config(cfg: DataConfig) -> None:
    if cfg.source not in SOURCES:
        known = ", ".join(SOURCES)
        raise ConfigError(f"data.source: unknown source '{cfg.source}' (known: {known})")
    if cfg.query_mode not in QUERY_MODES:
        raise ConfigError(
            f"data.query_mode: unknown mode '{cfg.query_mode}' (known: {', '.join(QUERY_MODES)})"
        )
    if not cfg.prepared_dir:
        raise ConfigError("data.prepared_dir must be set")


def _inputs(cfg: DataConfig) -> list[str]:
    """The files and directories `cfg.source` reads (none for ml-100k, shipped in a wheel)."""
    return [p for p in (cfg.path, cfg.items_path, cfg.interactions_path) if p]


def load_source(cfg: DataConfig) -> SourceData:
    """Load and validate `cfg.source` into the common in-memory tables."""
    _check_data_config(cfg)
    if cfg.source == "files":
        if not cfg.items_path or not cfg.interactions_path:
            raise ConfigError("data.source=files needs data.items_path and data.interactions_path")
        return load_files(cfg.items_path, cfg.interactions_path)
    if cfg.source == "ml-100k":
        from karma.datasets.movielens import load_ml100k

        return load_ml100k()
    if cfg.source == "ml-1m":
        from karma.datasets.movielens import load_ml1m

        return load_ml1m()
    if cfg.source == "movielens":
        from karma.datasets.movielens import load_movielens

        return load_movielens(cfg.path)
    if cfg.source == "shop":
        from karma.datasets.shop import load_shop

        return load_shop(cfg.path)
    if cfg.source == "recbole":
        from karma.datasets.recbole import load_recbole

        return load_recbole(cfg.path)
    from karma.datasets.amazon import load_amazon

    return load_amazon(cfg.path, items_path=cfg.items_path, reviews_path=cfg.interactions_path)


def _list_array(lists: Sequence[Sequence[int]]) -> pa.ListArray:
    lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(chain.from_iterable(lists), np.int32, int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _examples_table(ex: Examples) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(ex.user_ids, pa.string()),
            _list_array(ex.histories),
            pa.array(ex.targets.astype(np.int32)),
            pa.array(ex.queries, pa.string()),
            pa.array(ex.timestamps.astype(np.int64)),
            _list_array(ex.impressions),
            _list_array(ex.seen),
        ],
        schema=EXAMPLES_SCHEMA,
    )


def _items_table(items: ItemTable) -> pa.Table:
    n = items.n_items
    image_paths = items.image_paths or [None] * n
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n, dtype=np.int32)),
            pa.array(items.item_ids, pa.string()),
            pa.array(items.titles, pa.string()),
            pa.array(items.texts, pa.string()),
            pa.array(items.categories, pa.list_(pa.string())),
            pa.array(items.years, pa.int32()),
            pa.array(image_paths, pa.string()),
        ],
        schema=ITEMS_SCHEMA,
    )


def compute_stats(
    source: SourceData, splits: dict[str, Examples], split_dropped: dict[str, int], cfg: DataConfig
) -> dict[str, Any]:
    users = len(splits["test"])
    interactions = sum(len(s) for s in splits.values()) + users  # + each user's position-1 item
    n_items = source.items.n_items
    return {
        "source": source.name,
        "users": users,
        "items": n_items,
        "items_with_interactions": len(
            set(chain.from_iterable(splits["test"].seen)) | set(splits["test"].targets.tolist())
        ),
        "interactions": interactions,
        "examples": {name: len(splits[name]) for name in SPLITS},
        "dropped": {**source.dropped, **split_dropped},
        "notes": dict(source.notes),
        "sparsity": 1.0 - interactions / (users * n_items) if users else 1.0,
        "avg_interactions_per_user": interactions / users if users else 0.0,
        "query_mode": cfg.query_mode,
        "max_history": cfg.max_history,
        "min_interactions": cfg.min_interactions,
        "seed": cfg.seed,
        "protocol": protocol_line(cfg),
    }


def prepare_dataset(cfg: Config) -> Path:
    """Load `cfg.data.source`, validate, split, synthesize queries and write
    `cfg.data.prepared_dir` (items/train/valid/test.parquet, stats.json, config.yaml, and
    image_features.npy when the items have images: karma.images).

    The directory is written to a temporary sibling and renamed into place, so an interrupted
    run never leaves a half dataset behind; only a directory karma wrote is ever replaced
    (`karma.atomic.replace_dir`), never one holding the input files.
    """
    from karma.images import prepare_images  # torch and PIL: only when preparing

    data_cfg = cfg.data
    _check_data_config(data_cfg)
    # Refuse a bad output directory now, not after minutes of loading and splitting.
    check_output_dir(data_cfg.prepared_dir, "data.prepared_dir", _inputs(data_cfg))
    source = load_source(data_cfg)
    source, images = prepare_images(source, data_cfg)
    splits, split_dropped = split_leave_one_out(
        source,
        max_history=data_cfg.max_history,
        min_interactions=data_cfg.min_interactions,
        query_mode=data_cfg.query_mode,
        seed=data_cfg.seed,
    )
    if len(splits["test"]) == 0:
        raise DataError(
            f"{source.name}: no user has >= {data_cfg.min_interactions} interactions "
            "(data.min_interactions)"
        )
    stats = compute_stats(source, splits, split_dropped, data_cfg)
    if images is not None:
        stats["images"] = images.info

    with replace_dir(data_cfg.prepared_dir, "data.prepared_dir", _inputs(data_cfg)) as tmp:
        pq.write_table(_items_table(source.items), tmp / "items.parquet")
        if images is not None:
            np.save(tmp / IMAGE_FEATURES_FILE, images.features)
        for name in SPLITS:
            pq.write_table(_examples_table(splits[name]), tmp / f"{name}.parquet")
        write_json_atomic(tmp / "stats.json", stats)
        save_config(cfg, tmp / "config.yaml")
    out = Path(data_cfg.prepared_dir)
    return out


def _read_parquet_checked(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: not found (run `karma data prepare` first)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: damaged ({exc}); run `karma data prepare` again") from exc
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (prepared by another karma version?)"
        )
    return table


def _read_examples(path: Path) -> Examples:
    table = _read_parquet_checked(path, EXAMPLES_SCHEMA)
    return Examples(
        user_ids=table.column("user_id").to_pylist(),
        histories=table.column("history").to_pylist(),
        targets=table.column("target").to_numpy().astype(np.int64),
        queries=table.column("query").to_pylist(),
        impressions=table.column("impressions").to_pylist(),
        seen=table.column("seen").to_pylist(),
        timestamps=table.column("timestamp").to_numpy().astype(np.int64),
    )


def load_prepared(dir: str | Path) -> PreparedData:
    """Open a prepared dataset directory; splits are read when first asked for."""
    path = Path(dir)
    if not path.is_dir():
        raise DataError(f"{path}: prepared dataset directory not found (run `karma data prepare`)")
    table = _read_parquet_checked(path / "items.parquet", ITEMS_SCHEMA)
    items = ItemTable(
        item_ids=table.column("item_id").to_pylist(),
        titles=table.column("title").to_pylist(),
        texts=table.column("text").to_pylist(),
        categories=table.column("category").to_pylist(),
        years=table.column("year").to_pylist(),
        image_paths=table.column("image_path").to_pylist(),
    )
    return PreparedData(path, items, read_stats(path))


# Keys `format_stats` and the evaluation protocol read; a stats.json without them is damaged.
_STATS_KEYS = {
    "source": str,
    "users": int,
    "items": int,
    "items_with_interactions": int,
    "interactions": int,
    "avg_interactions_per_user": (int, float),
    "sparsity": (int, float),
    "examples": dict,
    "dropped": dict,
    "notes": dict,
    "query_mode": str,
    "protocol": str,
}


def read_stats(dir: str | Path) -> dict[str, Any]:
    """The `stats.json` of a prepared dataset, checked: a damaged one names the file and key."""
    path = Path(dir) / "stats.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (run `karma data prepare` first)")
    try:
        stats = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: damaged ({exc}); run `karma data prepare` again") from exc
    if not isinstance(stats, dict):
        raise DataError(f"{path}: damaged (not a JSON object); run `karma data prepare` again")
    for key, kind in _STATS_KEYS.items():
        if not isinstance(stats.get(key), kind):
            raise DataError(
                f"{path}: damaged (key '{key}' missing or of the wrong type); "
                "run `karma data prepare` again"
            )
    return stats


# Keys that define the split protocol: a prepared directory made with other values is refused.
PROTOCOL_KEYS = ("query_mode", "max_history", "min_interactions")


def load_or_prepare(cfg: Config, is_main: bool = True) -> PreparedData:
    """The prepared dataset of `cfg.data.prepared_dir`, prepared first when it is missing: the one
    rule train, eval, export, analyze and the baselines follow.

    Under DDP only rank 0 (`is_main`) prepares; the others wait at a barrier. A directory
    prepared with other protocol settings (`PROTOCOL_KEYS`, read from stats.json) is an error,
    since it would silently change the protocol; other differing data settings are reported.
    """
    from karma import distributed

    prepared = Path(cfg.data.prepared_dir)
    if not (prepared / "stats.json").is_file():
        if is_main:
            print(f"prepared dataset not found at {prepared}; preparing it")
            prepare_dataset(cfg)
        distributed.barrier()
    data = load_prepared(prepared)
    for key in PROTOCOL_KEYS:
        if key in data.stats and data.stats[key] != getattr(cfg.data, key):
            raise KarmaError(
                f"{prepared / 'stats.json'}: prepared with {key}={data.stats[key]!r} but the "
                f"config says data.{key}={getattr(cfg.data, key)!r}; point data.prepared_dir "
                "elsewhere or re-run `karma data prepare`"
            )
    if is_main and (prepared / "config.yaml").is_file():
        old = config_to_dict(load_config(prepared / "config.yaml"))["data"]
        new = config_to_dict(cfg)["data"]
        diffs = [f"data.{k}: {old[k]!r} (prepared) vs {new[k]!r}" for k in new if old[k] != new[k]]
        if diffs:
            print(
                f"warning: {prepared} was prepared with other data settings ({'; '.join(diffs)}); "
                f"using it as is -- run `karma data prepare` or set data.prepared_dir to change it"
            )
    return data


def load_image_features(dir: str | Path) -> np.ndarray | None:
    """The frozen image features of a prepared dataset, (n_items, 1280) float32 in item_idx
    order (zeros for items without an image: their `image_path` is null), or None when the
    dataset has no images. Pass them to `BatchBuilder(..., image_features=)` with
    model.image_dim = feats.shape[1]."""
    path = Path(dir)
    file = path / IMAGE_FEATURES_FILE
    if not file.is_file():
        return None
    features = np.load(file)
    n_items = pq.read_metadata(path / "items.parquet").num_rows
    if features.dtype != np.float32 or features.ndim != 2 or len(features) != n_items:
        raise DataError(
            f"{file}: expected float32 ({n_items}, D) features, got {features.dtype} "
            f"{features.shape} (re-run `karma data prepare`)"
        )
    return features


def resolve_image_dim(cfg: Config, data: PreparedData) -> Config:
    """The config a new model is built from: `model.image_dim` left at 0 under
    loss.preset=karma_mm becomes the width of the dataset's image features, so `karma train
    loss.preset=karma_mm` needs no second key (and the checkpoint's config records the width).
    Other presets keep 0 (text only) unless model.image_dim is set, so `karma` and `karma_mm`
    differ only by the images."""
    if cfg.loss.preset != "karma_mm" or cfg.model.image_dim > 0:
        return cfg
    features = load_image_features(data.dir)
    if features is None:
        raise ConfigError(
            f"loss.preset=karma_mm reads item images, but the prepared dataset {data.dir} has "
            f"none (no {IMAGE_FEATURES_FILE}: the items table has no image column, or "
            "data.images=off); prepare a dataset with images (e.g. `karma shop`) or pick "
            "another preset"
        )
    cfg = copy.deepcopy(cfg)
    cfg.model.image_dim = int(features.shape[1])
    return cfg


def format_stats(dir: str | Path) -> str:
    """The stats of a prepared dataset as a human-readable table."""
    stats = read_stats(dir)
    rows: list[tuple[str, str]] = [
        ("source", str(stats["source"])),
        ("users", f"{stats['users']:,}"),
        ("items", f"{stats['items']:,} ({stats['items_with_interactions']:,} with interactions)"),
        ("interactions", f"{stats['interactions']:,}"),
        ("interactions / user", f"{stats['avg_interactions_per_user']:.1f}"),
        ("sparsity", f"{stats['sparsity']:.4%}"),
    ]
    rows += [(f"examples {name}", f"{n:,}") for name, n in stats["examples"].items()]
    rows += [(f"dropped {reason}", f"{n:,}") for reason, n in stats["dropped"].items()]
    if not stats["dropped"]:
        rows.append(("dropped", "none"))
    rows += [(f"note {reason}", f"{n:,}") for reason, n in stats["notes"].items()]
    if "images" in stats:
        img = stats["images"]
        rows.append(
            (
                "images",
                f"{img['items_with_image']:,} items ({img['unique_images']:,} distinct), "
                f"{img['items_without_image']:,} without (policy {img['policy']}), "
                f"{img['dim']}-d {img['encoder'].split(' ')[0]}",
            )
        )
    rows.append(("query_mode", str(stats["query_mode"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"protocol: {stats['protocol']}")
    return "\n".join(lines)


__all__ = [
    "Examples",
    "ItemTable",
    "PreparedData",
    "format_stats",
    "load_image_features",
    "load_prepared",
    "load_source",
    "prepare_dataset",
    "read_stats",
    "resolve_image_dim",
]
