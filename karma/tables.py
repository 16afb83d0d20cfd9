"""Validate raw item / interaction tables (read by `karma.readers`) into the in-memory
`SourceData` that every loader (`load_files` here, the ones in `karma.datasets`) returns.

    from karma.readers import read_table
    from karma.tables import validate_tables
    source = validate_tables(read_table("items.csv"), read_table("interactions.csv"))
    source.items.texts[0]             # "Toy Story (1995) | Animation, Children's, Comedy"
    source.interactions.item_idx      # (N,) int64 dense item_idx of the clicked rows

Input tables (Parquet, CSV or JSONL; `.gz` JSONL too):
- items: `item_id`, `title`; optional `year`, `category` (alias `categories`), `attributes`,
  `image` (alias `image_path`: an image file, relative to the items table's folder or absolute;
  a path that does not exist is an error). Lists may be real lists, JSON strings ('["a", "b"]')
  or "a|b" strings (CSV).
- interactions: `user_id`, `item_id`, `timestamp` (integer, or ISO-8601 string read as UTC
  seconds; one kind per file, never mixed); optional `query`, `impressions` (item ids shown in
  the same request), `clicked`. Only clicked rows (all rows when there is no `clicked` column)
  become interactions. An unclicked row is an impression: it joins the hard negatives of the
  clicked rows of the same request (same user, timestamp and query); alone it is only counted.

Errors: every problem raises `karma.errors.DataError` naming file, row and field. Rows are the
1-based data row of the file, header not counted (CSV row N is line N + 1; JSONL row N is line N;
Parquet row N is index N - 1). All errors of a file (first 20 shown) come in one message.
Recoverable problems (exact duplicate interactions) are dropped and counted in `dropped`;
out-of-order input is reported in `notes`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from karma.errors import DataError
from karma.readers import ErrorLog, RawTable, read_table
from karma.text import render_item_text

# ---------------------------------------------------------------------------------------------
# In-memory tables


@dataclass
class ItemTable:
    """The catalog in `item_idx` order."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    categories: list[list[str]]
    years: list[int | None]
    image_paths: list[str | None] = field(default_factory=list)  # resolved, None = no image
    rows: list[int] = field(default_factory=list)  # source data row of each item (for errors)
    source_path: str = ""  # the items table the rows refer to

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def index(self) -> dict[str, int]:
        """item_id -> item_idx."""
        return {item_id: i for i, item_id in enumerate(self.item_ids)}


@dataclass
class InteractionTable:
    """Validated clicked interactions in input row order; items are dense `item_idx`."""

    user_ids: list[str]
    item_idx: np.ndarray  # (N,) int64
    timestamps: np.ndarray  # (N,) int64
    queries: list[str] | None  # None when the input has no query column
    impressions: list[list[int]]  # per row: item_idx shown in the same request, not clicked
    rows: np.ndarray  # (N,) int64 source row numbers

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class SourceData:
    """What every loader returns: validated items + interactions and what was dropped on the way."""

    name: str
    items: ItemTable
    interactions: InteractionTable
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, dropped rows
    notes: dict[str, int] = field(default_factory=dict)  # reported, nothing dropped
    query_noun: str = ""  # "movies" makes "comedy movies"; "" gives "comedy"


class _FieldError(Exception):
    """A bad value in one field; the caller adds file and row."""


# ---------------------------------------------------------------------------------------------
# Field parsers (raise _FieldError with a message; the caller names file, row and field)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _parse_id(value: Any) -> str:
    if isinstance(value, bool) or _is_missing(value):
        raise _FieldError("missing value" if not isinstance(value, bool) else "bad type bool")
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int):
        return str(value)
    raise _FieldError(f"bad type {type(value).__name__} (expected a string or an integer id)")


_INT = re.compile(r"[+-]?\d+")
_INTEGRAL_FLOAT = re.compile(r"[+-]?\d+\.0*")


_INT64 = 2**63


def _int64(value: int) -> int:
    if not -_INT64 <= value < _INT64:
        raise _FieldError(f"timestamp {value} out of range (must fit a 64-bit integer)")
    return value


def timestamp_kind(value: Any) -> str:
    """'ISO-8601' or 'integer': how a (valid) timestamp value is written. One column must not
    mix the two: an integer of another unit would sort against the ISO dates at random."""
    if isinstance(value, (datetime, date)):
        return "ISO-8601"
    if isinstance(value, str):
        text = value.strip()
        if not (_INT.fullmatch(text) or _INTEGRAL_FLOAT.fullmatch(text)):
            return "ISO-8601"
    return "integer"


def parse_timestamp(value: Any) -> int:
    """An integer (or integral float, or a string of one) as is; ISO-8601 -> Unix seconds (UTC
    when no zone is given). Values that do not fit int64 are errors."""
    if _is_missing(value):
        raise _FieldError("missing value")
    if isinstance(value, bool):
        raise _FieldError(f"unparseable timestamp {value!r}")
    if isinstance(value, int):
        return _int64(value)
    if isinstance(value, float):
        if value.is_integer():
            return _int64(int(value))
        raise _FieldError(f"unparseable timestamp {value!r} (not an integer)")
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(dt.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
    if isinstance(value, str):
        text = value.strip()
        if _INT.fullmatch(text):
            return _int64(int(text))
        if _INTEGRAL_FLOAT.fullmatch(text):
            return _int64(int(float(text)))
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return parse_timestamp(dt)
    raise _FieldError(f"unparseable timestamp {value!r} (expected an integer or ISO-8601)")


def _parse_str_list(value: Any) -> list[str]:
    """A list, a JSON list string, or a "a|b" string; missing -> []."""
    if _is_missing(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _FieldError(f"not a valid JSON list: {exc.msg}") from exc
            if not isinstance(value, list):
                raise _FieldError("expected a JSON list")
        else:
            return [part.strip() for part in text.split("|") if part.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise _FieldError(f"bad list entry {v!r} (expected strings)")
            if str(v).strip():
                out.append(str(v).strip())
        return out
    raise _FieldError(f"bad type {type(value).__name__} (expected a list or a string)")


def _parse_year(value: Any) -> int | None:
    if _is_missing(value):
        return None
    if isinstance(value, bool):
        raise _FieldError("bad type bool (expected an integer year)")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    raise _FieldError(f"bad year {value!r} (expected an integer)")


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _FieldError(f"bad value {value!r} (expected a boolean: true/false/1/0)")


def _parse_attributes(value: Any) -> str | list[str] | dict[str, Any] | None:
    if _is_missing(value):
        return None
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and not value.strip().startswith("["):
        return value.strip()
    return _parse_str_list(value)


def _parse_optional_str(value: Any) -> str | None:
    if _is_missing(value):
        return None
    if not isinstance(value, str):
        raise _FieldError(f"bad type {type(value).__name__} (expected a string)")
    return value.strip()


# ---------------------------------------------------------------------------------------------
# Validation


def _require_columns(table: RawTable, names: Sequence[str], errors: ErrorLog) -> bool:
    ok = True
    for name in names:
        if name not in table.columns:
            found = ", ".join(table.columns) or "none"
            errors.add(table.path, None, name, f"missing column (columns found: {found})")
            ok = False
    return ok


def _image_path_parser(table_path: str) -> Any:
    """Parser of the `image` column: a path relative to the items table (or absolute) that
    must exist; missing -> None (the item has no image, see `data.image_policy`)."""
    base = Path(table_path).parent

    def parse(value: Any) -> str | None:
        text = _parse_optional_str(value)
        if text is None:
            return None
        path = os.path.abspath(base / text)
        if not os.path.isfile(path):
            raise _FieldError(f"image file not found: {path}")
        return path

    return parse


def _checked(errors: ErrorLog, path: str, row: int, name: str, parse: Any, value: Any) -> Any:
    """`parse(value)`, or None after logging the error at (path, row, name)."""
    try:
        return parse(value)
    except _FieldError as exc:
        errors.add(path, row, name, str(exc))
        return None


def validate_items(table: RawTable, errors: ErrorLog) -> tuple[ItemTable, set[str]]:
    """Validate an items table. Returns the catalog and the set of every item id seen (also on
    bad rows, so that interactions pointing at them do not add a second error per row)."""
    items = ItemTable([], [], [], [], [], [], [], table.path)
    all_ids: set[str] = set()
    if not _require_columns(table, ("item_id", "title"), errors):
        return items, all_ids
    cols = table.columns
    category_col = next((c for c in ("category", "categories") if c in cols), None)
    image_col = next((c for c in ("image", "image_path") if c in cols), None)
    parse_image = _image_path_parser(table.path)
    first_row: dict[str, int] = {}
    n = len(table)
    none = [None] * n
    for i, row in enumerate(table.rows):
        n_errors = errors.count

        def check(name: str, parse: Any, value: Any) -> Any:
            return _checked(errors, table.path, row, name, parse, value)  # noqa: B023 (called now)

        item_id = check("item_id", _parse_id, cols["item_id"][i])
        if item_id is not None:
            if item_id in first_row:
                errors.add(
                    table.path,
                    row,
                    "item_id",
                    f"duplicate item_id {item_id!r} (first at row {first_row[item_id]})",
                )
            else:
                first_row[item_id] = row
            all_ids.add(item_id)
        title_value = cols["title"][i]
        if _is_missing(title_value):
            errors.add(table.path, row, "title", "empty title")
            title = None
        elif not isinstance(title_value, str):
            errors.add(table.path, row, "title", f"bad type {type(title_value).__name__}")
            title = None
        else:
            title = title_value.strip()
        year = check("year", _parse_year, cols.get("year", none)[i])
        categories = (
            check(category_col, _parse_str_list, cols[category_col][i]) if category_col else []
        )
        attributes = check("attributes", _parse_attributes, cols.get("attributes", none)[i])
        image_path = check(image_col, parse_image, cols[image_col][i]) if image_col else None
        if errors.count > n_errors:
            continue
        items.item_ids.append(item_id)
        items.titles.append(title)
        items.categories.append(categories)
        items.years.append(year)
        items.image_paths.append(image_path)
        items.rows.append(row)
        items.texts.append(render_item_text(title, year, categories, attributes))
    return items, all_ids


def validate_interactions(
    table: RawTable, index: dict[str, int], known_ids: set[str], errors: ErrorLog
) -> tuple[InteractionTable, dict[str, int], dict[str, int]]:
    """Validate an interactions table against the catalog `index` (item_id -> item_idx).

    Returns the clicked interactions (exact duplicates removed), dropped counts and notes.
    """
    no_rows = np.zeros(0, np.int64)
    empty = InteractionTable([], no_rows, no_rows, None, [], no_rows)
    if not _require_columns(table, ("user_id", "item_id", "timestamp"), errors):
        return empty, {}, {}
    cols = table.columns
    n = len(table)
    has_query = "query" in cols
    none = [None] * n

    def parse_item(value: Any) -> int:
        item_id = _parse_id(value)
        if item_id not in index:
            if item_id in known_ids:
                # Its own row in the items file is bad (reported there): say so, not 'unknown'.
                raise _FieldError(f"item id {item_id!r} has a bad row in the items table")
            raise _FieldError(f"unknown item id {item_id!r}")
        return index[item_id]

    def parse_query(value: Any) -> str:
        if _is_missing(value):
            return ""
        if not isinstance(value, str):
            raise _FieldError(f"bad type {type(value).__name__} (expected a string)")
        return value.strip()

    def parse_impressions(value: Any) -> list[int]:
        return [parse_item(item_id) for item_id in _parse_str_list(value)]

    parsed: list[tuple[str, int, int, str, bool, list[int], int]] = []
    rows_of_kind: dict[str, list[int]] = {}  # timestamp kind -> rows (ISO-8601 / integer)
    for i, row in enumerate(table.rows):
        n_errors = errors.count
        user_id = _checked(errors, table.path, row, "user_id", _parse_id, cols["user_id"][i])
        item = _checked(errors, table.path, row, "item_id", parse_item, cols["item_id"][i])
        timestamp = _checked(
            errors, table.path, row, "timestamp", parse_timestamp, cols["timestamp"][i]
        )
        if timestamp is not None:
            rows_of_kind.setdefault(timestamp_kind(cols["timestamp"][i]), []).append(row)
        query = _checked(errors, table.path, row, "query", parse_query, cols.get("query", none)[i])
        clicked = (
            _checked(errors, table.path, row, "clicked", _parse_bool, cols["clicked"][i])
            if "clicked" in cols
            else True
        )
        shown = _checked(
            errors,
            table.path,
            row,
            "impressions",
            parse_impressions,
            cols.get("impressions", none)[i],
        )
        if errors.count == n_errors:
            parsed.append((user_id, item, timestamp, query, clicked, shown, row))
    if len(rows_of_kind) > 1:
        kinds = " and ".join(
            f"{kind} (rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
            for kind, rows in rows_of_kind.items()
        )
        errors.add(
            table.path,
            None,
            "timestamp",
            f"mixes {kinds}; write every timestamp the same way (all ISO-8601 or all integers)",
        )
    if errors.count:
        return empty, {}, {}

    # A request = (user, timestamp, query): unclicked rows and clicked siblings are its negatives.
    clicked_in: dict[tuple[str, int, str], set[int]] = {}
    unclicked_in: dict[tuple[str, int, str], list[int]] = {}
    for user_id, item, timestamp, query, clicked, _, _ in parsed:
        key = (user_id, timestamp, query)
        if clicked:
            clicked_in.setdefault(key, set()).add(item)
        else:
            unclicked_in.setdefault(key, []).append(item)
    notes: dict[str, int] = {}
    n_unclicked = sum(len(v) for v in unclicked_in.values())
    if n_unclicked:
        notes["unclicked_rows"] = n_unclicked
        orphan = sum(len(v) for k, v in unclicked_in.items() if k not in clicked_in)
        if orphan:
            notes["unclicked_rows_without_click"] = orphan

    out = InteractionTable([], no_rows, no_rows, [] if has_query else None, [], no_rows)
    items: list[int] = []
    timestamps: list[int] = []
    rows: list[int] = []
    seen_rows: set[tuple[str, int, int, str]] = set()
    duplicates = 0
    for user_id, item, timestamp, query, clicked, shown, row in parsed:
        if not clicked:
            continue
        key = (user_id, item, timestamp, query)
        if key in seen_rows:
            duplicates += 1
            continue
        seen_rows.add(key)
        request = (user_id, timestamp, query)
        positives = clicked_in[request]
        negatives = dict.fromkeys(chain(shown, unclicked_in.get(request, ())))
        out.user_ids.append(user_id)
        items.append(item)
        timestamps.append(timestamp)
        rows.append(row)
        out.impressions.append([j for j in negatives if j not in positives])
        if out.queries is not None:
            out.queries.append(query)
    out.item_idx = np.asarray(items, dtype=np.int64)
    out.timestamps = np.asarray(timestamps, dtype=np.int64)
    out.rows = np.asarray(rows, dtype=np.int64)
    dropped = {"duplicate_interactions": duplicates} if duplicates else {}

    # Out-of-order input is legal (we sort), but worth knowing about.
    last: dict[str, int] = {}
    out_of_order: set[str] = set()
    for user_id, timestamp in zip(out.user_ids, timestamps):
        if timestamp < last.get(user_id, timestamp):
            out_of_order.add(user_id)
        last[user_id] = timestamp
    if out_of_order:
        notes["users_out_of_order"] = len(out_of_order)
    return out, dropped, notes


def validate_tables(
    items: RawTable, interactions: RawTable, *, name: str = "files", query_noun: str = ""
) -> SourceData:
    """Validate both tables; raise one DataError listing every problem found (first 20)."""
    for table, what in ((items, "items"), (interactions, "interactions")):
        if len(table) == 0:
            raise DataError(f"{table.path}: {what} file has no rows; add rows below the header")
    errors = ErrorLog()
    catalog, known_ids = validate_items(items, errors)
    if catalog.n_items == 0:
        # No usable item: every interaction would be an 'unknown item id' hiding the real cause.
        errors.raise_if_any()
    table, dropped, notes = validate_interactions(interactions, catalog.index(), known_ids, errors)
    errors.raise_if_any()
    if catalog.n_items == 0:
        raise DataError(f"{items.path}: no items")
    if len(table) == 0:
        raise DataError(f"{interactions.path}: no (clicked) interactions")
    return SourceData(name, catalog, table, dropped, notes, query_noun)


def load_files(items_path: str | Path, interactions_path: str | Path) -> SourceData:
    """source=files: read and validate an items table and an interactions table."""
    return validate_tables(read_table(items_path), read_table(interactions_path))


__all__ = [
    "InteractionTable",
    "ItemTable",
    "SourceData",
    "load_files",
    "parse_timestamp",
    "timestamp_kind",
    "validate_interactions",
    "validate_items",
    "validate_tables",
]
