"""CLI front end: parsing, `python -m karma`, and one-line errors for bad input (exit 2)."""

import subprocess
import sys

import pytest

from karma.cli import REPORT_BUG, build_parser, main


def test_subcommands_are_wired():
    parser = build_parser()
    for argv in (["data", "stats", "x"], ["train", "--config", "c.yaml", "train.steps=2"],
                 ["eval", "--checkpoint", "ck"], ["baseline", "sasrec"], ["backbones", "list"],
                 ["analyze", "--checkpoint", "a", "--compare", "b"], ["demo"]):
        args = parser.parse_args(argv)
        assert callable(args.func)


def test_python_dash_m_karma_help():
    out = subprocess.run([sys.executable, "-m", "karma", "--help"], capture_output=True,
                         text=True, check=True)
    assert "karma" in out.stdout and "train" in out.stdout


def test_bad_config_key_exits_2_with_message(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  sourc: files\n")
    assert main(["data", "prepare", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.sourc'" in err and str(cfg) in err


def test_unknown_subcommand_is_argparse_error():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_overrides_may_follow_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("karma.cli._cmd_baseline", lambda args: seen.update(vars(args)) or 0)
    parser_args = ["baseline", "popularity", "train.seed=1", "--config", "c.yaml", "eval.ks=[10]",
                   "--out", "d", "data.seed=2"]
    assert main(parser_args) == 0
    assert seen["overrides"] == ["train.seed=1", "eval.ks=[10]", "data.seed=2"]
    with pytest.raises(SystemExit):
        main(["baseline", "popularity", "--bogus"])


# --- the one error path: user errors are one line (exit 2), bugs keep their traceback (exit 1)


def _run_with(monkeypatch, capsys, exc: BaseException) -> tuple[int, str]:
    def handler(args):
        raise exc

    monkeypatch.setattr("karma.cli._cmd_data_stats", handler)
    rc = main(["data", "stats", "somewhere"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (PermissionError(13, "Permission denied", "/d/items.csv"),
         "karma: error: /d/items.csv: Permission denied; check the file's permissions\n"),
        (IsADirectoryError(21, "Is a directory", "/d/conf"),
         "karma: error: /d/conf: Is a directory; give a file, not a directory\n"),
        (OSError(28, "No space left on device"), "karma: error: No space left on device\n"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
         "karma: error: an input file is not valid UTF-8"),
    ],
)
def test_expected_errors_are_one_line_exit_2(monkeypatch, capsys, exc, message):
    rc, err = _run_with(monkeypatch, capsys, exc)
    assert rc == 2 and err.startswith(message) and len(err.splitlines()) == 1


def test_damaged_safetensors_error_is_a_user_error(monkeypatch, capsys):
    from safetensors import SafetensorError

    rc, err = _run_with(monkeypatch, capsys, SafetensorError("invalid JSON in header"))
    assert rc == 2 and "weights file is damaged" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_says_how_to_report_it(monkeypatch, capsys):
    rc, err = _run_with(monkeypatch, capsys, ZeroDivisionError("division by zero"))
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert err.rstrip().splitlines()[-1] == REPORT_BUG


def test_bad_values_fail_before_any_work(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr("karma.data.prepare_dataset", never)
    assert main(["data", "prepare", "eval.ks=[0]"]) == 2
    assert "config key 'eval.ks'" in capsys.readouterr().err
