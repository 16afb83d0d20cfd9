"""Amazon Reviews 2023 (McAuley Lab) JSONL as karma tables.

    karma data prepare data.source=amazon data.path=path/to/All_Beauty.jsonl.gz
    karma data prepare data.source=amazon data.interactions_path=reviews.jsonl \
        data.items_path=meta.jsonl

`data.path` names the reviews file; its metadata is the `meta_` file beside it
(`All_Beauty.jsonl` -> `meta_All_Beauty.jsonl`). Reviews: `user_id`, `parent_asin`, `timestamp`
(milliseconds, kept as is), `rating`; every review counts as an interaction. Meta:
`parent_asin`, `title`, `categories` (falls back to `[main_category]`), `features` (the first
three become the item's attributes).

The catalog is the reviewed items that have metadata. Public dumps have gaps, which are dropped
and counted in stats.json rather than failing the run: items without a title
(`items_without_title`, with their reviews as `interactions_with_untitled_item`) and reviews of
items missing from the metadata (`interactions_without_metadata`). Malformed lines and bad
fields are errors naming file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from karma.errors import DataError
from karma.readers import ErrorLog, RawTable, iter_jsonl
from karma.tables import SourceData, validate_tables

MAX_FEATURES = 3


def find_amazon_files(path: str, items_path: str = "", reviews_path: str = "") -> tuple[Path, Path]:
    """(reviews, meta) from explicit paths or from the reviews file `path`."""
    reviews = Path(reviews_path or path)
    if not str(reviews_path or path):
        raise DataError("data.path: empty; set it to an Amazon Reviews 2023 reviews JSONL file")
    meta = Path(items_path) if items_path else reviews.with_name(f"meta_{reviews.name}")
    for file in (reviews, meta):
        if not file.is_file():
            raise DataError(f"{file}: file not found")
    return reviews, meta


def load_amazon(path: str = "", *, items_path: str = "", reviews_path: str = "") -> SourceData:
    """Load an Amazon Reviews 2023 category (reviews + meta JSONL, optionally gzipped)."""
    reviews_file, meta_file = find_amazon_files(path, items_path, reviews_path)
    errors = ErrorLog()
    reviews: list[tuple[int, dict[str, Any]]] = [
        (row, {k: r.get(k) for k in ("user_id", "parent_asin", "timestamp")})
        for row, r in iter_jsonl(reviews_file, errors)
    ]
    reviewed = {r["parent_asin"] for _, r in reviews if isinstance(r["parent_asin"], str)}

    items: dict[str, list] = {"item_id": [], "title": [], "category": [], "attributes": []}
    item_rows: list[int] = []
    untitled: set[str] = set()
    for row, meta in iter_jsonl(meta_file, errors):
        asin = meta.get("parent_asin")
        if asin not in reviewed:
            continue
        title = meta.get("title")
        if not isinstance(title, str) or not title.strip():
            untitled.add(asin)
            continue
        categories = meta.get("categories") or []
        if not categories and isinstance(meta.get("main_category"), str):
            categories = [meta["main_category"]]
        features = meta.get("features") or []
        items["item_id"].append(asin)
        items["title"].append(title)
        items["category"].append(categories)
        items["attributes"].append(features[:MAX_FEATURES] if isinstance(features, list) else None)
        item_rows.append(row)
    errors.raise_if_any()

    titled = set(items["item_id"])
    inter: dict[str, list] = {"user_id": [], "item_id": [], "timestamp": []}
    inter_rows: list[int] = []
    dropped = {"interactions_with_untitled_item": 0, "interactions_without_metadata": 0}
    for row, review in reviews:
        asin = review["parent_asin"]
        if asin in untitled:
            dropped["interactions_with_untitled_item"] += 1
            continue
        if isinstance(asin, str) and asin not in titled:
            dropped["interactions_without_metadata"] += 1
            continue
        inter["user_id"].append(review["user_id"])
        inter["item_id"].append(asin)  # a missing parent_asin is reported by validation
        inter["timestamp"].append(review["timestamp"])
        inter_rows.append(row)
    dropped["items_without_title"] = len(untitled)
    source = validate_tables(
        RawTable(str(meta_file), items, item_rows),
        RawTable(str(reviews_file), inter, inter_rows),
        name=f"amazon-{reviews_file.name.split('.')[0]}",
    )
    source.dropped.update({k: v for k, v in dropped.items() if v})
    return source
