"""The bad-inputs corpus: every case in tests/bad_inputs/ runs through the CLI in-process.

Each case is a folder with its input files and a `case.yaml`:

    about: what the case is                   args: [data, prepare, ...]  (the CLI arguments)
    message: a substring of the output        exit: 2 (user error) or 0 (accepted input)
    kept: [files that must be unchanged]      absent: [paths that must not exist afterwards]
    chmod: {file: mode}                       skip_as_root: true (root reads any file)

`{case}` in args is the case folder (copied to a temp dir first), `{good}` a valid items +
interactions pair (`_good/`), `{out}` a fresh output path. A user error must exit 2 with its
message on one line (several bad rows of a file: listed below it, indented) and no traceback.
Add a case by adding a folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from karma.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "case.yaml").is_file())


def test_corpus_is_large_enough() -> None:
    failing = [c for c in CASES if yaml.safe_load((CORPUS / c / "case.yaml").read_text())["exit"]]
    assert len(failing) >= 30, failing


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load((CORPUS / name / "case.yaml").read_text())
    if spec.get("skip_as_root") and os.geteuid() == 0:
        pytest.skip("root can read files without read permission")
    case = tmp_path / name
    shutil.copytree(CORPUS / name, case)
    places = {"case": str(case), "good": str(CORPUS / "_good"), "out": str(tmp_path / "out")}
    for rel, mode in spec.get("chmod", {}).items():
        os.chmod(case / rel, mode)

    rc = main([arg.format(**places) for arg in spec["args"]])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    assert rc == spec["exit"], err
    assert spec["message"] in out + err, err
    if rc:
        # One line; a data file with several bad rows lists them below it, indented.
        first, *more = err.splitlines()
        assert first.startswith("karma: error: ") and all(m.startswith("  ") for m in more), err
    for rel in spec.get("kept", []):
        assert (case / rel).read_bytes() == (CORPUS / name / rel).read_bytes(), rel
    for path in spec.get("absent", []):
        assert not Path(path.format(**places)).exists(), path
