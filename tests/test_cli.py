"""CLI front end: parsing, `python -m karma`, and one-line errors for bad input (exit 2)."""

import subprocess
import sys

import pytest

from karma.cli import build_parser, main


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
