"""karma.atomic: whole files or nothing; output directories that never take a user's files."""

import json
import os

import pytest

from karma.atomic import (
    OUTPUT_MARKER,
    check_output_dir,
    ensure_output_dir,
    is_karma_output,
    replace_dir,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from karma.errors import KarmaError


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert sorted(os.listdir(path.parent)) == ["a.json"]


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    write_text_atomic(path, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_bytes_atomic(path, b"new")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


# --- output directories ----------------------------------------------------------------------


def test_replace_dir_marks_renames_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "out"
    with replace_dir(out, "--out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("1")
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "a.txt"]
    with replace_dir(out, "--out") as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "b.txt"]  # replaced as a whole
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_replace_dir_failure_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    with replace_dir(out, "--out") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), replace_dir(out, "--out") as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("crash while writing")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("late", [False, True])
def test_replace_dir_refuses_a_folder_karma_did_not_write(tmp_path, late):
    out = tmp_path / "mine"
    if not late:
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    with pytest.raises(KarmaError, match=r"mine: not empty and not written by karma.*--out"):
        with replace_dir(out, "--out") as tmp:
            (tmp / "a.txt").write_text("x")
            if late:  # the folder appears while karma works: checked again before the swap
                out.mkdir()
                (out / "thesis.tex").write_text("years of work")
    assert os.listdir(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_output_dir_never_one_holding_the_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / OUTPUT_MARKER).write_text("")  # even if marked
    (data / "items.csv").write_text("item_id,title\n")
    for out in (data, tmp_path):
        with pytest.raises(KarmaError, match="holds the input .*items.csv.*set data.prepared_dir"):
            check_output_dir(out, "data.prepared_dir", inputs=[data / "items.csv"])
    check_output_dir(data / "prepared", "data.prepared_dir", inputs=[data / "items.csv"])


def test_ensure_output_dir_marks_new_and_empty_dirs_and_refuses_others(tmp_path):
    assert is_karma_output(ensure_output_dir(tmp_path / "new" / "run", "train.output_dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_karma_output(ensure_output_dir(empty, "train.output_dir"))
    ensure_output_dir(empty, "train.output_dir")  # reused: it is karma's now
    (tmp_path / "f").write_text("")
    with pytest.raises(KarmaError, match="not a directory"):
        ensure_output_dir(tmp_path / "f", "train.output_dir")
    with pytest.raises(KarmaError, match="not written by karma"):
        ensure_output_dir(tmp_path, "train.output_dir")
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(KarmaError, match="symbolic link"):
        ensure_output_dir(tmp_path / "link", "train.output_dir")
