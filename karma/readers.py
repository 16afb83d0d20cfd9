"""Read raw tables from Parquet, CSV/TSV or JSONL(.gz) files, and collect data errors.

    from karma.readers import ErrorLog, read_table
    table = read_table("interactions.csv")   # RawTable: column -> values, plus row numbers
    table.columns["item_id"][0], table.rows[0]

Row numbers are the 1-based data row of the file, header not counted (CSV row N is line N + 1;
JSONL row N is line N; Parquet row N is index N - 1). `ErrorLog` gathers every problem of a file
into one `DataError` naming file, row and field (the first 20 shown). Validation of the values
against the data contract is `karma.tables`.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from karma.errors import DataError, utf8_error

MAX_ERRORS = 20
ROW_CONVENTION = "rows are 1-based data rows, header not counted"


@dataclass
class RawTable:
    """A table as read from a file: column name -> Python values, plus the row number of each
    record (1-based data row, for error messages)."""

    path: str
    columns: dict[str, list[Any]]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)


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
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise DataError(f"{path}: not a file; give the path of a table file")
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
    _check_header(path, table.column_names)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return RawTable(str(path), columns, list(range(1, table.num_rows + 1)))


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of a file, gunzipped if it ends in .gz."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, start=1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: damaged gzip file ({exc})") from exc


def _decode_line(path: Path, line_no: int, raw: bytes) -> str:
    """A line as text; a UTF-8 byte-order mark at the start of the file is dropped."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(utf8_error(path, line_no, exc)) from exc


def _check_utf8(path: Path) -> None:
    """Raise naming the first line that is not UTF-8 (run only after a read failed)."""
    for line_no, raw in _raw_lines(path):
        _decode_line(path, line_no, raw)


def _check_header(path: Path, names: list[str]) -> None:
    first: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in first:
            raise DataError(
                f"{path}: header: column '{name}' appears twice (columns {first[name]} and {i}); "
                "rename or remove one"
            )
        first[name] = i


def _read_csv(path: Path, delimiter: str = ",") -> RawTable:
    first_line = next((raw for _, raw in _raw_lines(path)), b"")
    header = next(csv.reader([_decode_line(path, 1, first_line)], delimiter=delimiter), None)
    if not header:
        raise DataError(f"{path}: empty file (expected a header row)")
    _check_header(path, header)
    return read_delimited(path, header, delimiter=delimiter)


def read_delimited(
    path: str | Path, column_names: list[str], delimiter: str = ",", quoting: bool = True
) -> RawTable:
    """Read a delimited file with one header line into a RawTable, every value a string (the type
    checks and their messages are ours). Rows with the wrong number of fields are errors.

    Blank lines, and rows whose every field is empty (spreadsheets export them), are skipped
    like every CSV reader does; the other rows keep their numbers."""
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
        _check_utf8(Path(path))  # arrow's own message names neither the line nor the byte
        raise DataError(f"{path}: not a readable delimited file: {exc}") from exc
    bad_rows.raise_if_any()
    blank = None
    for column in table.columns:
        empty = pc.fill_null(pc.equal(column, ""), True)
        blank = empty if blank is None else pc.and_(blank, empty)
    keep = np.arange(table.num_rows)
    if blank is not None:
        keep = np.flatnonzero(~blank.to_numpy(zero_copy_only=False))
        table = table.take(keep)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return RawTable(str(path), columns, (keep + 1).tolist())


class _DuplicateKey(Exception):
    """A JSON object with a key twice (json keeps the last silently); the arg is the key."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def iter_jsonl(path: Path, errors: ErrorLog) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line of a JSONL(.gz) file; bad lines are logged."""
    for line_no, raw in _raw_lines(path):
        line = _decode_line(path, line_no, raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            errors.add(str(path), line_no, "*", f"not valid JSON: {exc.msg}")
            continue
        except _DuplicateKey as exc:
            errors.add(str(path), line_no, str(exc), "key appears twice in the object")
            continue
        if not isinstance(record, dict):
            errors.add(str(path), line_no, "*", "expected a JSON object")
            continue
        yield line_no, record


def _read_jsonl(path: Path) -> RawTable:
    errors = ErrorLog()
    rows, records = [], []
    for line_no, record in iter_jsonl(path, errors):
        rows.append(line_no)
        records.append(record)
    errors.raise_if_any()
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns = {name: [r.get(name) for r in records] for name in names}
    return RawTable(str(path), columns, rows)
