"""Config: defaults -> YAML -> overrides, strict keys and types, round trip."""

from pathlib import Path

import pytest
import yaml

from karma.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 0.001\nloss:\n  preset: gen\n")
    cfg = load_config(path, ["train.steps=9", "eval.ks=[1,10]", "model.lora=true"])
    assert cfg.train.steps == 9  # override wins over YAML
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML wins over default
    assert cfg.loss.preset == "gen"
    assert cfg.eval.ks == [1, 10]
    assert cfg.model.lora is True
    assert cfg.data.max_history == Config().data.max_history  # untouched default


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.steps=3", "data.query_mode=none", "loss.lambda_rec=0.25"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'train.stepz'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        apply_overrides(Config(), ["modle.lora=true"])


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.steps=abc", "train.steps"), ("model.lora=3", "model.lora"),
     ("eval.ks=[1,x]", r"eval.ks\[1\]"), ("loss.lambda_gen=[1]", "loss.lambda_gen")],
)
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        apply_overrides(Config(), [override])


def test_int_coerces_to_float_but_not_bool_to_int():
    cfg = config_from_dict({"loss": {"temperature": 1}})
    assert isinstance(cfg.loss.temperature, float)
    with pytest.raises(ConfigError):
        config_from_dict({"train": {"steps": True}})


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match="'train': expected a mapping"):
        config_from_dict({"train": 3})


def test_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["train.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_saved_yaml_is_plain(tmp_path):
    save_config(Config(), tmp_path / "c.yaml")
    values = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert {"data", "model", "loss", "train", "eval", "serve"} <= set(values)


def test_base_config_then_file_then_overrides(tmp_path):
    base = load_config(None, ["train.steps=5", "train.lr=0.5"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.25\n")
    cfg = load_config(path, ["train.batch_size=3"], base=base)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (5, 0.25, 3)
    assert base.train.batch_size == Config().train.batch_size  # base is copied, not mutated


def test_exponent_without_dot_is_a_float():
    cfg = apply_overrides(Config(), ["train.lr=5e-4"])
    assert cfg.train.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match="train.lr"):
        apply_overrides(Config(), ["train.lr=fast"])


def test_yaml_key_set_twice_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 3\n  lr: 0.1\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"line 4: key 'steps' is set twice \(first at line 2\)"):
        load_config(path)
    path.write_text("train:\n  steps: 3\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="key 'train' is set twice"):
        load_config(path)


def test_config_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain:\n  steps: 2\n")  # a byte-order mark is fine
    assert load_config(path).train.steps == 2
    path.write_bytes(b"train:\n  steps: 2 # \xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 2 is not valid UTF-8 \(byte 0xe9\)"):
        load_config(path)


@pytest.mark.parametrize(
    "override",
    ["eval.ks=[]", "eval.ks=[0,10]", "eval.split=dev", "eval.index=flat", "train.steps=0",
     "train.batch_size=0", "data.min_interactions=2", "train.device=tpu"],
)
def test_values_out_of_range_name_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}': expected"):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_every_shipped_config_loads(path):
    """The recipes a user runs with one command load with strict keys and pass the checks of
    their objective (a typo in a rarely run long recipe fails here, not after set-up)."""
    from karma.sequence import check_sequence_config

    cfg = load_config(path)
    if cfg.train.objective == "sequence":
        check_sequence_config(cfg)
