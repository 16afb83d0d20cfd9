"""Raw table readers: one RawTable whatever the format, row numbers as the file counts them."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karma.errors import DataError
from karma.readers import ErrorLog, iter_jsonl, read_table

ROWS = [{"item_id": "a", "title": "A"}, {"item_id": "b", "title": "B"}]


def test_csv_jsonl_parquet_give_the_same_columns_and_rows(tmp_path):
    (tmp_path / "t.csv").write_text("item_id,title\na,A\nb,B\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS) + "\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "t.parquet")
    tables = [read_table(tmp_path / n) for n in ("t.csv", "t.jsonl", "t.jsonl.gz", "t.parquet")]
    for table in tables:
        assert table.columns == {"item_id": ["a", "b"], "title": ["A", "B"]}
        assert table.rows == [1, 2]  # 1-based data rows, header not counted


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"item_id": "a"}\n\nnot json\n[1, 2]\n')
    errors = ErrorLog()
    assert [n for n, _ in iter_jsonl(path, errors)] == [1]
    with pytest.raises(DataError) as exc:
        errors.raise_if_any()
    assert f"{path}: row 3, field '*': not valid JSON" in str(exc.value)
    assert f"{path}: row 4, field '*': expected a JSON object" in str(exc.value)


def test_bom_is_stripped_and_blank_rows_skipped_keeping_row_numbers(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbfitem_id,title\na,A\n\n,\nb,B\n\n")
    table = read_table(path)
    assert table.columns == {"item_id": ["a", "b"], "title": ["A", "B"]}
    assert table.rows == [1, 4]  # the rows' own numbers: blank lines 2 and 3 skipped
    (tmp_path / "t.jsonl").write_bytes(b'\xef\xbb\xbf{"item_id": "a"}\n')
    assert read_table(tmp_path / "t.jsonl").columns == {"item_id": ["a"]}


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("h.csv", b"item_id,t\xe9tle\n", r"h.csv: line 1 is not valid UTF-8 \(byte 0xe9\)"),
        ("r.csv", b"item_id,title\na,A\nb,\xff\n", r"line 3 is not valid UTF-8 \(byte 0xff\)"),
        ("j.jsonl", b'{"a": 1}\n{"a": "\xe9"}\n', r"j.jsonl: line 2 is not valid UTF-8"),
        ("d.csv", b"a,b,a\n1,2,3\n", r"header: column 'a' appears twice \(columns 1 and 3\)"),
        ("g.csv.gz", b"not gzip", r"g.csv.gz: damaged gzip file"),
    ],
)
def test_unreadable_tables_name_file_and_line(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_table(tmp_path / name)


def test_jsonl_key_twice_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1, "a": 2}\n')
    with pytest.raises(DataError, match=r"row 1, field 'a': key appears twice"):
        read_table(path)


def test_error_log_shows_the_first_errors_and_counts_the_rest():
    errors = ErrorLog(limit=2)
    for row in range(1, 6):
        errors.add("f.csv", row, "title", "empty title")
    with pytest.raises(DataError, match=r"5 data errors .*\n  f.csv: row 1.*\n  f.csv: row 2.*"
                                        r"\n  \.\.\. and 3 more"):
        errors.raise_if_any()


def test_unreadable_input_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """chmod 000 does not stop root (CI containers), so the refusal is simulated at open()."""
    from karma.cli import main

    items = tmp_path / "items.csv"
    items.write_text("item_id,title\na,A\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("karma.readers.open", denied, raising=False)
    argv = ["data", "prepare", "data.source=files", f"data.items_path={items}",
            f"data.interactions_path={items}", f"data.prepared_dir={tmp_path / 'p'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"karma: error: {items}: Permission denied; check the file's permissions\n"
