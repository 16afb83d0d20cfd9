"""Nested dataclass configuration: defaults, then YAML, then dotted `a.b=c` overrides.

Each section is owned by the component it configures. Unknown keys and values of the wrong type
are errors that name the full dotted key, so a typo never silently becomes a default.

    cfg = load_config("configs/debug.yaml", ["train.steps=10", "loss.preset=karma"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from karma.errors import KarmaError


class ConfigError(KarmaError):
    """A config file or override that does not match the schema."""


@dataclass
class DataConfig:
    # ml-100k (from the recbole wheel) | movielens (u.data/u.item or ml-1m .dat) | recbole (atomic
    # files) | amazon (Reviews 2023 JSONL) | files (items + interactions tables) | shop (simulated)
    source: str = "ml-100k"
    path: str = ""  # directory or file the source reads; empty for ml-100k
    items_path: str = ""  # source=files: items table (Parquet, CSV or JSONL)
    interactions_path: str = ""  # source=files / amazon: interactions table or reviews JSONL
    prepared_dir: str = "runs/data/ml-100k"  # where `karma data prepare` writes
    max_history: int = 20
    min_interactions: int = 3
    query_mode: str = "genre"  # none | genre | genre_decade
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "smollm2-135m"  # named backbone (karma/backbones.py) or a local HF directory
    interface: str = "continuous"  # continuous (one token per history item) | text (titles)
    emb_dim: int = 256
    history_source: str = "live"  # live (gradients flow) | cache (refreshed every N steps)
    cache_refresh_steps: int = 100
    rec_tokens: int = 2  # m soft tokens R(u) for the reconstruction pass
    image_dim: int = 0  # frozen image feature size; 0 means no image token
    max_item_tokens: int = 32
    max_target_tokens: int = 32
    max_query_tokens: int = 16
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    freeze_layers: int = 0  # freeze embeddings and the lower N transformer layers
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class LossConfig:
    preset: str = "karma"  # action_only | gen | rec | karma | karma_mm
    lambda_gen: float = 0.5
    lambda_rec: float = 0.5
    lambda_img: float = 0.1
    temperature: float = 0.05  # initial value of the learnable temperature
    temperature_min: float = 0.01
    temperature_max: float = 1.0
    learn_temperature: bool = True
    sampled_negatives: int = 0  # uniform catalog negatives per batch
    hard_negatives: bool = True  # use impressions shown but not clicked, when the data has them
    max_hard_negatives: int = 8  # per example; more impressions are subsampled (0 = all)


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    head_lr: float = 1e-3  # projections, R, g, temperature
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * lr (and * head_lr)
    clip_norm: float = 1.0
    eval_every: int = 200
    log_every: int = 10
    save_every: int = 200
    eval_users: int = 0  # validation users per periodic eval; 0 = all
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast on CUDA only
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch default
    monitor_every: int = 0  # attention-sink / fidelity probe every N steps; 0 = off
    sink_warn_threshold: float = 0.5


@dataclass
class EvalConfig:
    split: str = "test"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 50, 200])
    mask_history: bool = True
    index: str = "exact"  # exact | hnsw | ivf
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    hnsw_ef_construction: int = 80
    ivf_nlist: int = 1024
    ivf_nprobe: int = 16
    batch_size: int = 256
    max_users: int = 0  # 0 = all users of the split


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    checkpoint: str = ""
    export: str = ""  # a `karma export` directory whose index/ is loaded; "" = build on start
    prepared_dir: str = ""  # catalog and users; "" = the checkpoint's data.prepared_dir
    token: str = ""  # bearer token required by every route but /health and the page; "" = open
    max_history: int = 50  # items in a request's history (the model reads the last
    # data.max_history of them, as in training)
    max_top_k: int = 1000
    max_query_chars: int = 200
    max_body_bytes: int = 65536
    max_batch: int = 32  # concurrent requests encoded in one forward pass
    user_cache_size: int = 256  # users whose prompt key/values are kept (~1.5 MB each, SmolLM2)
    max_explain_tokens: int = 32
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class SASRecConfig:
    max_len: int = 200  # reads the user's full training sequence (last max_len items), not history
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32  # training windows per step; 128 gives ML-100K only 9 steps per epoch
    epochs: int = 200
    patience: int = 10  # epochs without a gain in validation ndcg@10 before stopping


@dataclass
class BaselineConfig:
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    text_batch_size: int = 64  # frozen / minilm text encoding batch
    minilm_history: int = 0  # minilm: most recent history titles appended to the user text


@dataclass
class AnalysisConfig:
    split: str = "test"  # probe users are drawn from this split
    probe_users: int = 200
    seed: int = 0
    eps: float = 0.3  # sink threshold of Gu et al.
    batch_size: int = 16
    heatmap_layers: list[int] = field(default_factory=list)  # empty = first, middle, last
    max_new_tokens: int = 32
    fit_steps: int = -1  # post-hoc R fit (models without L_rec); -1 = train.steps
    fit_batch_size: int = 0  # 0 = train.batch_size


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` where lossless (int -> float), else raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `5e-4` (no dot) as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Write `values` into dataclass `obj` in place, recursing into nested sections."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _check_value(value, hints[name], key))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=10` -> (['train', 'steps'], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _merge(cfg, nested, "")
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, values or {}, "")
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
) -> Config:
    """Defaults (or a copy of `base`), then the YAML file at `path` (if any), then `overrides`."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        try:
            _merge(cfg, values, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return apply_overrides(cfg, overrides or [])


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)
