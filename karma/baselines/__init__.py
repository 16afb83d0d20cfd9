"""Baselines on the identical split and protocol as KARMA: popularity, SASRec, frozen LLM, MiniLM.

    karma baseline sasrec --config configs/ml100k.yaml [--out runs/baselines/sasrec]
    metrics = run_baseline("popularity", cfg)          # writes runs/baselines/popularity/

Every baseline turns into (user_emb, item_emb) for the examples of `eval.split` and is scored by
`karma.evaluate.evaluate_embeddings`, the function that scores KARMA checkpoints, so the numbers
are comparable: full catalog, leave-one-out, pessimistic ties, seen items masked and unmasked.

- popularity: score = number of training-part interactions of the item (every interaction before
  each user's validation item, the uncapped sequence), the same list for every user.
- sasrec: ID-based self-attentive sequential model, cross-entropy over the catalog (`sasrec.py`).
- frozen: the backbone LLM without fine-tuning, last-token hidden states (`frozen.py`).
- minilm: all-MiniLM-L6-v2 text retrieval, query text against item text (`minilm.py`).

ID baselines (popularity, sasrec) ignore the query, so their numbers are the same in the query and
no-query settings. `training_sequences` rebuilds each user's full chronological training sequence
from the prepared train examples (first history + every target), which the 20-item history cap
would otherwise hide.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from karma.config import Config
from karma.errors import DataError, KarmaError

BASELINES = ("popularity", "sasrec", "frozen", "minilm")


def load_data(cfg: Config):
    """The prepared dataset of `cfg.data.prepared_dir`, preparing it first when it is missing."""
    from karma.data import load_prepared, prepare_dataset

    prepared = Path(cfg.data.prepared_dir)
    if not (prepared / "stats.json").is_file():
        prepared = prepare_dataset(cfg)
    data = load_prepared(prepared)
    # A dataset prepared with other split settings would silently change the protocol.
    for key in ("query_mode", "max_history", "min_interactions"):
        if key in data.stats and data.stats[key] != getattr(cfg.data, key):
            raise KarmaError(
                f"{prepared / 'stats.json'}: prepared with {key}={data.stats[key]!r} but the "
                f"config says data.{key}={getattr(cfg.data, key)!r}; point data.prepared_dir "
                "elsewhere or re-run `karma data prepare`"
            )
    return data


def training_sequences(data) -> dict[str, list[int]]:
    """user_id -> every training-part item of the user, oldest first (uncapped).

    Train examples of a user are consecutive prefixes: the first one's history plus every target,
    in order, is the whole training part. A user without train examples (training part of one
    item) takes the validation history. The result is checked against the validation history.
    """
    train, valid = data.split("train"), data.split("valid")
    sequences: dict[str, list[int]] = {}
    for user, history, target in zip(train.user_ids, train.histories, train.targets):
        if user not in sequences:
            sequences[user] = [int(i) for i in history]
        sequences[user].append(int(target))
    for row, (user, history) in enumerate(zip(valid.user_ids, valid.histories)):
        history = [int(i) for i in history]
        seq = sequences.setdefault(user, history)
        if history and seq[-len(history) :] != history:
            raise DataError(
                f"train.parquet: the train examples of user {user!r} do not end with the "
                f"history of valid.parquet row {row} (field 'history'); the splits disagree"
            )
    return sequences


def split_sequences(data, examples, split: str) -> list[list[int]]:
    """Per row of `examples` (of split valid or test), the user's full chronological input: the
    training part, plus the validation item for test. Rows are matched by user_id (one valid and
    one test example per user); a user unknown to train/valid keeps the row's capped history."""
    sequences = training_sequences(data)
    valid = data.split("valid")
    valid_target = {u: int(t) for u, t in zip(valid.user_ids, valid.targets)}
    out = []
    for user, history in zip(examples.user_ids, examples.histories):
        if user not in sequences:
            out.append([int(i) for i in history])
        elif split == "test" and user in valid_target:
            out.append(sequences[user] + [valid_target[user]])
        else:
            out.append(list(sequences[user]))
    return out


def evaluate_split(
    user_emb: np.ndarray, item_emb: np.ndarray, examples, cfg: Config, **protocol
) -> dict:
    """Quiet `karma.evaluate.evaluate_embeddings` (scores = user_emb @ item_emb.T, as given)."""
    from karma.evaluate import evaluate_embeddings

    return evaluate_embeddings(
        user_emb,
        item_emb,
        examples,
        cfg,
        protocol=protocol,
        print_table=False,
        show_progress=False,
    )


def primary_metrics(results: dict) -> dict[str, float]:
    """The metrics of the primary setting (`eval.mask_history`) of an evaluation result."""
    return results["metrics"][results["protocol"]["primary"]]


def _embed_popularity(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.popularity import popularity_counts, popularity_embeddings

    return popularity_embeddings(popularity_counts(data), len(examples))


def _embed_sasrec(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.sasrec import encode_sasrec, train_sasrec

    model, _ = train_sasrec(data, cfg, log_path=out_dir / "log.jsonl")
    return encode_sasrec(model, split_sequences(data, examples, cfg.eval.split))


def _embed_frozen(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.frozen import encode_frozen

    return encode_frozen(data, examples, cfg)


def _embed_minilm(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.minilm import encode_minilm

    return encode_minilm(data, examples, cfg)


_EMBEDDERS: dict[str, Callable] = {
    "popularity": _embed_popularity,
    "sasrec": _embed_sasrec,
    "frozen": _embed_frozen,
    "minilm": _embed_minilm,
}


def run_baseline(name: str, cfg: Config, out_dir: str | Path | None = None) -> dict:
    """Fit/encode baseline `name`, evaluate it on `cfg.eval.split` and write `metrics.json` (the
    `karma eval` format: {"protocol", "metrics": {"masked", "unmasked"}}) and `config.yaml` into
    `out_dir` (default runs/baselines/<name>); SASRec also writes `log.jsonl`. Returns the
    metrics dict written."""
    if name not in _EMBEDDERS:
        raise KarmaError(f"unknown baseline '{name}' (known: {', '.join(BASELINES)})")
    from karma.config import save_config
    from karma.evaluate import format_metrics_table, select_users

    out_dir = Path(out_dir or Path("runs/baselines") / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    data = load_data(cfg)
    # the same seeded user sample as `karma eval` when eval.max_users is set
    examples = select_users(data.split(cfg.eval.split), cfg.eval.max_users)
    t0 = time.perf_counter()
    user_emb, item_emb = _EMBEDDERS[name](data, cfg, examples, out_dir)
    results = evaluate_split(
        user_emb,
        item_emb,
        examples,
        cfg,
        method=name,
        prepared_dir=cfg.data.prepared_dir,
        seconds=round(time.perf_counter() - t0, 1),
    )
    print(format_metrics_table(results))
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "metrics.json")
    print(f"metrics written to {out_dir / 'metrics.json'}")
    return results


__all__ = [
    "BASELINES",
    "evaluate_split",
    "load_data",
    "primary_metrics",
    "run_baseline",
    "split_sequences",
    "training_sequences",
]
