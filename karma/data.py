"""The data contract: read and validate item / interaction tables, split them, write and load the
prepared dataset that every other module reads.

    karma data prepare data.source=files data.items_path=items.csv \
        data.interactions_path=interactions.csv data.prepared_dir=runs/data/mine

    from karma.data import load_prepared
    data = load_prepared("runs/data/ml-100k")
    data.items.texts[0]               # "Toy Story (1995) | Animation, Children's, Comedy"
    test = data.split("test")         # Examples: user_ids, histories, targets, queries, seen, ...

Input tables (Parquet, CSV or JSONL; `.gz` JSONL too):
- items: `item_id`, `title`; optional `year`, `category` (alias `categories`), `attributes`,
  `image_path`. Lists may be real lists, JSON strings ('["a", "b"]') or "a|b" strings (CSV).
- interactions: `user_id`, `item_id`, `timestamp` (integer, or ISO-8601 string read as UTC
  seconds); optional `query`, `impressions` (item ids shown in the same request), `clicked`.
  Only clicked rows (all rows when there is no `clicked` column) become interactions. An
  unclicked row is an impression: it joins the hard negatives of the clicked rows of the same
  request (same user, timestamp and query); alone it is only counted.

Errors: every problem raises `karma.errors.DataError` naming file, row and field. Rows are the
1-based data row of the file, header not counted (CSV row N is line N + 1; JSONL row N is line N;
Parquet row N is index N - 1). All errors of a file (first 20 shown) come in one message.
Recoverable problems (exact duplicate interactions, users below `data.min_interactions`) are
dropped and counted in stats.json; out-of-order input is reported there too.

Split protocol: see `split_leave_one_out` and docs/architecture.md.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from karma.config import Config, ConfigError, DataConfig, save_config
from karma.errors import DataError, KarmaError
from karma.text import render_item_text

SOURCES = ("ml-100k", "movielens", "recbole", "amazon", "files")
QUERY_MODES = ("none", "genre", "genre_decade")
SPLITS = ("train", "valid", "test")
MAX_ERRORS = 20
ROW_CONVENTION = "rows are 1-based data rows, header not counted"

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


# ---------------------------------------------------------------------------------------------
# In-memory tables


@dataclass
class RawTable:
    """A table as read from a file: column name -> Python values, plus the row number of each
    record (1-based data row, for error messages)."""

    path: str
    columns: dict[str, list[Any]]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class ItemTable:
    """The catalog in `item_idx` order."""

    item_ids: list[str]
    titles: list[str]
    texts: list[str]
    categories: list[list[str]]
    years: list[int | None]
    image_paths: list[str | None] = field(default_factory=list)

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


@dataclass
class Examples:
    """One split: one row per (user, target) example."""

    user_ids: list[str]
    histories: list[list[int]]  # item_idx, oldest first, at most max_history
    targets: np.ndarray  # (N,) int64 item_idx
    queries: list[str]
    impressions: list[list[int]]
    seen: list[list[int]]  # valid/test: every earlier item of the user (uncapped); [] in train
    timestamps: np.ndarray  # (N,) int64, of the target

    def __len__(self) -> int:
        return len(self.user_ids)


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


# ---------------------------------------------------------------------------------------------
# Errors


class ErrorLog:
    """Collects data errors so that one message lists them all (the first `limit` shown)."""

    def __init__(self, limit: int = MAX_ERRORS):
        self.limit = limit
        self.messages: list[str] = []
        self.count = 0

    def add(self, path: str, row: int | None, field_name: str, message: str) -> None:
        self.count += 1
        if len(self.messages) < self.limit:
            where = f"row {row}, " if row is not None else ""
            self.messages.append(f"{path}: {where}field '{field_name}': {message}")

    def raise_if_any(self) -> None:
        if self.count == 0:
            return
        if self.count == 1:
            raise DataError(self.messages[0])
        more = (
            f"\n  ... and {self.count - len(self.messages)} more" if self.count > self.limit else ""
        )
        raise DataError(
            f"{self.count} data errors ({ROW_CONVENTION}):\n  " + "\n  ".join(self.messages) + more
        )


class _FieldError(Exception):
    """A bad value in one field; the caller adds file and row."""


# ---------------------------------------------------------------------------------------------
# Reading tables


def _is_jsonl(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in (".jsonl", ".json", ".ndjson")


def read_table(path: str | Path) -> RawTable:
    """Read a Parquet, CSV/TSV or JSONL file into a RawTable (values as in the file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    if _is_jsonl(path):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv") or path.name.lower().endswith((".csv.gz", ".tsv.gz")):
        return _read_csv(path, delimiter="\t" if ".tsv" in path.name.lower() else ",")
    raise DataError(f"{path}: unknown table format (expected .parquet, .csv, .tsv or .jsonl)")


def _read_parquet(path: Path) -> RawTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return RawTable(str(path), columns, list(range(1, table.num_rows + 1)))


def _read_csv(path: Path, delimiter: str = ",") -> RawTable:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise DataError(f"{path}: empty file (expected a header row)")
    return read_delimited(path, header, delimiter=delimiter)


def read_delimited(
    path: str | Path, column_names: list[str], delimiter: str = ",", quoting: bool = True
) -> RawTable:
    """Read a delimited file with one header line into a RawTable, every value a string (the type
    checks and their messages are ours). Rows with the wrong number of fields are errors."""
    import pyarrow.csv as pacsv

    bad_rows = ErrorLog()

    def on_invalid(row: Any) -> str:
        # row.number is the 1-based line (known because use_threads=False); header = line 1.
        data_row = row.number - 1 if row.number is not None else None
        got = f"expected {row.expected_columns} columns, got {row.actual_columns}"
        bad_rows.add(str(path), data_row, "*", got)
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=column_names, skip_rows=1, use_threads=False
            ),
            # Empty lines stay rows, so that row numbers match the file.
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoting else False,
                invalid_row_handler=on_invalid,
                ignore_empty_lines=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in column_names}
            ),
        )
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable delimited file: {exc}") from exc
    bad_rows.raise_if_any()
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return RawTable(str(path), columns, list(range(1, table.num_rows + 1)))


def _read_jsonl(path: Path) -> RawTable:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    errors = ErrorLog()
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.add(str(path), line_no, "*", f"not valid JSON: {exc.msg}")
                continue
            if not isinstance(record, dict):
                errors.add(str(path), line_no, "*", "expected a JSON object")
                continue
            records.append(record)
            rows.append(line_no)
    errors.raise_if_any()
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns = {name: [r.get(name) for r in records] for name in names}
    return RawTable(str(path), columns, rows)


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


def parse_timestamp(value: Any) -> int:
    """An integer (or integral float, or a string of one) as is; ISO-8601 -> Unix seconds (UTC
    when no zone is given)."""
    if _is_missing(value):
        raise _FieldError("missing value")
    if isinstance(value, bool):
        raise _FieldError(f"unparseable timestamp {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _FieldError(f"unparseable timestamp {value!r} (not an integer)")
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(dt.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
    if isinstance(value, str):
        text = value.strip()
        if _INT.fullmatch(text):
            return int(text)
        if _INTEGRAL_FLOAT.fullmatch(text):
            return int(float(text))
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
    items = ItemTable([], [], [], [], [], [])
    all_ids: set[str] = set()
    if not _require_columns(table, ("item_id", "title"), errors):
        return items, all_ids
    cols = table.columns
    category_col = next((c for c in ("category", "categories") if c in cols), None)
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
        image_path = check("image_path", _parse_optional_str, cols.get("image_path", none)[i])
        if errors.count > n_errors:
            continue
        items.item_ids.append(item_id)
        items.titles.append(title)
        items.categories.append(categories)
        items.years.append(year)
        items.image_paths.append(image_path)
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
    for i, row in enumerate(table.rows):
        n_errors = errors.count
        user_id = _checked(errors, table.path, row, "user_id", _parse_id, cols["user_id"][i])
        item = _checked(errors, table.path, row, "item_id", parse_item, cols["item_id"][i])
        timestamp = _checked(
            errors, table.path, row, "timestamp", parse_timestamp, cols["timestamp"][i]
        )
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
    errors = ErrorLog()
    catalog, known_ids = validate_items(items, errors)
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


# ---------------------------------------------------------------------------------------------
# Queries


def example_rng(seed: int, user_id: str, position: int) -> random.Random:
    """A generator owned by one example, so queries do not depend on iteration order."""
    digest = hashlib.blake2b(f"{seed}\x1f{user_id}\x1f{position}".encode(), digest_size=8)
    return random.Random(int.from_bytes(digest.digest(), "little"))


def synthesize_query(
    categories: Sequence[str],
    year: int | None,
    mode: str,
    rng: random.Random,
    noun: str = "movies",
) -> str:
    """A search query from the TARGET item's genres: "comedy romance movies", and with
    mode=genre_decade "1990s comedy movies". mode=none gives "".

    A seeded random non-empty subset (at most 3) of the genres, in random order. Items without
    genres fall back to the noun alone ("movies", or "1990s movies").
    """
    if mode not in QUERY_MODES:
        known = ", ".join(QUERY_MODES)
        raise KarmaError(f"data.query_mode: unknown mode '{mode}' (known: {known})")
    if mode == "none":
        return ""
    genres = [c.strip().lower() for c in categories if c and c.strip()]
    words = []
    if mode == "genre_decade" and year is not None:
        words.append(f"{year // 10 * 10}s")
    if genres:
        k = rng.randint(1, min(3, len(genres)))
        picked = rng.sample(genres, k)  # sample() returns them in random order
        words.extend(picked)
    if noun:
        words.append(noun)
    return " ".join(words) or "items"


# ---------------------------------------------------------------------------------------------
# Split


def split_leave_one_out(
    source: SourceData,
    *,
    max_history: int = 20,
    min_interactions: int = 3,
    query_mode: str = "none",
    seed: int = 0,
) -> tuple[dict[str, Examples], dict[str, int]]:
    """Chronological leave-one-out per user.

    Per user, interactions are STABLE-sorted by timestamp (ties keep input row order, never item
    id order): last = test, second last = valid, the rest = train. Train examples are every
    position t >= 2 (1-based) of the train part, history = the up to `max_history` items before
    it. Valid history = train part (capped), test history = train part + valid item (capped);
    valid/test also carry `seen` = every earlier item, uncapped. Users are in first-appearance
    order. Users with fewer than `min_interactions` interactions are dropped and counted.

    Returns the three splits and dropped counts by reason.
    """
    if min_interactions < 3:
        raise ConfigError(
            "data.min_interactions must be >= 3 (one train, one valid and one test item)"
        )
    if max_history < 1:
        raise ConfigError("data.max_history must be >= 1")
    inter = source.interactions
    items = source.items
    user_code: dict[str, int] = {}
    codes = np.fromiter(
        (user_code.setdefault(u, len(user_code)) for u in inter.user_ids), np.int64, len(inter)
    )
    users = list(user_code)
    # lexsort is stable: by user, then timestamp, ties in input row order.
    order = np.lexsort((inter.timestamps, codes))
    bounds = np.searchsorted(codes[order], np.arange(len(users) + 1))
    use_real_query = inter.queries is not None and query_mode != "none"

    splits = {name: Examples([], [], [], [], [], [], []) for name in SPLITS}
    dropped = {"users_below_min_interactions": 0, "interactions_of_dropped_users": 0}
    for u in tqdm(range(len(users)), desc="split users", unit="user", disable=None):
        rows = order[bounds[u] : bounds[u + 1]]
        n = len(rows)
        if n < min_interactions:
            dropped["users_below_min_interactions"] += 1
            dropped["interactions_of_dropped_users"] += n
            continue
        user_id = users[u]
        seq = inter.item_idx[rows].tolist()
        for t in range(n):
            name = "test" if t == n - 1 else "valid" if t == n - 2 else "train"
            if name == "train" and t == 0:
                continue  # position 1 has no history
            target = seq[t]
            if use_real_query:
                query = inter.queries[rows[t]]
            else:
                query = synthesize_query(
                    items.categories[target],
                    items.years[target],
                    query_mode,
                    example_rng(seed, user_id, t),
                    noun=source.query_noun,
                )
            split = splits[name]
            split.user_ids.append(user_id)
            split.histories.append(seq[max(0, t - max_history) : t])
            split.targets.append(target)
            split.queries.append(query)
            split.impressions.append(inter.impressions[rows[t]])
            split.seen.append(seq[:t] if name != "train" else [])
            split.timestamps.append(int(inter.timestamps[rows[t]]))
    for split in splits.values():
        split.targets = np.asarray(split.targets, dtype=np.int64)
        split.timestamps = np.asarray(split.timestamps, dtype=np.int64)
    return splits, {k: v for k, v in dropped.items() if v}


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
    if cfg.source == "movielens":
        from karma.datasets.movielens import load_movielens

        return load_movielens(cfg.path)
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


def protocol_line(cfg: DataConfig) -> str:
    """The split protocol in one line, printed with every metric table."""
    return (
        "chronological leave-one-out per user (stable sort by timestamp, ties keep input row "
        "order): test = last, valid = second last, train = every prefix of the rest; history "
        f"capped at {cfg.max_history}; users with < {cfg.min_interactions} interactions dropped; "
        f"query_mode={cfg.query_mode}"
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
    `cfg.data.prepared_dir` (items/train/valid/test.parquet, stats.json, config.yaml).

    The directory is written to a temporary sibling and renamed into place, so an interrupted
    run never leaves a half dataset behind.
    """
    data_cfg = cfg.data
    _check_data_config(data_cfg)
    source = load_source(data_cfg)
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

    out = Path(data_cfg.prepared_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        pq.write_table(_items_table(source.items), tmp / "items.parquet")
        for name in SPLITS:
            pq.write_table(_examples_table(splits[name]), tmp / f"{name}.parquet")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        save_config(cfg, tmp / "config.yaml")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_parquet_checked(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path}: not found (run `karma data prepare` first)")
    table = pq.read_table(path)
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
    stats_path = path / "stats.json"
    if not stats_path.is_file():
        raise DataError(f"{stats_path}: not found (run `karma data prepare` first)")
    return PreparedData(path, items, json.loads(stats_path.read_text()))


def format_stats(dir: str | Path) -> str:
    """The stats of a prepared dataset as a human-readable table."""
    path = Path(dir) / "stats.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (run `karma data prepare` first)")
    stats = json.loads(path.read_text())
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
    rows.append(("query_mode", str(stats["query_mode"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"protocol: {stats['protocol']}")
    return "\n".join(lines)


__all__ = [
    "ErrorLog",
    "Examples",
    "ItemTable",
    "InteractionTable",
    "PreparedData",
    "RawTable",
    "SourceData",
    "example_rng",
    "format_stats",
    "load_files",
    "load_prepared",
    "load_source",
    "parse_timestamp",
    "prepare_dataset",
    "protocol_line",
    "read_delimited",
    "read_table",
    "split_leave_one_out",
    "synthesize_query",
    "validate_interactions",
    "validate_items",
    "validate_tables",
]
