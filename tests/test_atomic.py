"""karma.atomic: whole files or nothing."""

import json
import os

import pytest

from karma.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic


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
