"""RecBole atomic files (`<name>.inter` + `<name>.item`) as karma tables.

    karma data prepare data.source=recbole data.path=path/to/ml-1m   # holds ml-1m.inter/.item

Atomic files are tab separated with a typed header (`user_id:token  item_id:token
timestamp:float`); `token_seq` fields are space separated. Field names: `user_id`, `item_id`,
`timestamp` in `.inter`; the title is the first of `title`, `movie_title`, `name`, `item_name`;
the year `release_year` or `year`; categories `categories`, `class`, `genre`, `genres` or
`category`. Non-numeric years (ML-100K has "unkonwn") are read as unknown and counted.
"""

from __future__ import annotations

from pathlib import Path

from karma.errors import DataError
from karma.readers import RawTable, read_delimited
from karma.tables import SourceData, validate_tables

TITLE_FIELDS = ("title", "movie_title", "name", "item_name")
YEAR_FIELDS = ("release_year", "year")
CATEGORY_FIELDS = ("categories", "class", "genre", "genres", "category")


def read_atomic_file(path: str | Path) -> tuple[RawTable, dict[str, str]]:
    """Read an atomic file. Returns the table (header types stripped from the column names, all
    values strings) and the RecBole type of each column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").rstrip("\r").split("\t")
    names, types = [], {}
    for column, spec in enumerate(header, start=1):
        name, _, kind = spec.partition(":")
        if not name or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(
                f"{path}: header column {column} {spec!r} is not 'name:type' with type "
                "token, token_seq, float or float_seq"
            )
        names.append(name)
        types[name] = kind
    # Titles contain quotes and commas: tabs are the only structure.
    return read_delimited(path, names, delimiter="\t", quoting=False), types


def find_atomic_files(path: str | Path) -> tuple[Path, Path]:
    """`path` is a directory holding `<dir name>.inter/.item` (or exactly one of each), or the
    `.inter` file itself with its `.item` beside it."""
    path = Path(path)
    if path.is_file() and path.suffix == ".inter":
        inter, item = path, path.with_suffix(".item")
    elif path.is_dir():
        inter, item = path / f"{path.name}.inter", path / f"{path.name}.item"
        if not inter.is_file():
            found = sorted(path.glob("*.inter"))
            if len(found) != 1:
                raise DataError(f"{path}: expected one .inter file, found {len(found)}")
            inter, item = found[0], found[0].with_suffix(".item")
    else:
        raise DataError(f"{path}: not a RecBole dataset directory or .inter file (data.path)")
    if not item.is_file():
        raise DataError(f"{item}: file not found (the items of {inter.name})")
    return inter, item


def load_recbole(
    path: str | Path,
    *,
    name: str = "recbole",
    query_noun: str = "",
    ignore_categories: tuple[str, ...] = (),
    split_categories: bool = False,
) -> SourceData:
    """Load RecBole atomic files into validated karma tables (every row is an interaction).

    `token_seq` category fields are split on whitespace; `split_categories` splits a `token` field
    too, for files that store a list under the wrong type (ML-1M's `genre:token` holds
    "Animation Children's Comedy").
    """
    if not str(path):
        raise DataError("data.path: empty; set it to a RecBole dataset directory or .inter file")
    inter_path, item_path = find_atomic_files(path)
    raw_items, types = read_atomic_file(item_path)
    cols = raw_items.columns
    if "item_id" not in cols:
        raise DataError(f"{item_path}: field 'item_id': missing column")
    title_field = next((f for f in TITLE_FIELDS if f in cols), None)
    if title_field is None:
        raise DataError(
            f"{item_path}: field 'title': missing column (looked for {', '.join(TITLE_FIELDS)})"
        )
    items = {"item_id": cols["item_id"], "title": cols[title_field]}
    notes: dict[str, int] = {}
    year_field = next((f for f in YEAR_FIELDS if f in cols), None)
    if year_field is not None:
        years = [y if y.strip().isdigit() else None for y in cols[year_field]]
        unknown = sum(y is None for y in years)
        if unknown:
            notes["items_without_year"] = unknown
        items["year"] = years
    category_field = next((f for f in CATEGORY_FIELDS if f in cols), None)
    if category_field is not None:
        ignored = set(ignore_categories)
        split = split_categories or types[category_field] == "token_seq"
        items["category"] = [
            [c for c in (value.split() if split else [value.strip()]) if c and c not in ignored]
            for value in cols[category_field]
        ]
    raw_inter, _ = read_atomic_file(inter_path)  # extra fields (rating, ...) are ignored
    source = validate_tables(
        RawTable(raw_items.path, items, raw_items.rows),
        raw_inter,
        name=name,
        query_noun=query_noun,
    )
    source.notes.update(notes)
    return source
