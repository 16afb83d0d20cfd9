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
no-query settings, unless `eval.query_filter=true`: then they rank only the items whose
categories include every category the query names (genre popularity; SASRec within the genre).
`protocol.training_sequences` rebuilds each user's full chronological training sequence from the
prepared train examples (first history + every target), which the 20-item history cap would
otherwise hide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from karma.atomic import write_json_atomic
from karma.baselines.protocol import evaluate_split, split_sequences
from karma.config import Config
from karma.errors import KarmaError

BASELINES = ("popularity", "sasrec", "frozen", "minilm")


# Each embedder returns (user_emb, item_emb, other_user_emb): the last from another user's
# history (`eval.other_history`, the seeded permutation of `karma eval`), None where not built.
def _embed_popularity(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.popularity import popularity_counts, popularity_embeddings

    return *popularity_embeddings(popularity_counts(data), len(examples)), None


def _embed_sasrec(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.sasrec import encode_sasrec, train_sasrec
    from karma.evaluate import other_histories

    model, _ = train_sasrec(data, cfg, log_path=out_dir / "log.jsonl")
    sequences = split_sequences(data, examples, cfg.eval.split)
    user_emb, item_emb = encode_sasrec(model, sequences)
    other = None
    if cfg.eval.other_history:
        other, _ = encode_sasrec(model, [sequences[j] for j in other_histories(examples)])
    return user_emb, item_emb, other


def _embed_frozen(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.frozen import encode_frozen

    return *encode_frozen(data, examples, cfg), None


def _embed_minilm(data, cfg: Config, examples, out_dir: Path):
    from karma.baselines.minilm import encode_minilm

    return *encode_minilm(data, examples, cfg), None


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
    from karma.data import load_or_prepare
    from karma.evaluate import (
        QUERY_FILTER,
        cold_rows,
        format_metrics_table,
        query_filter,
        select_users,
    )

    out_dir = Path(out_dir or Path("runs/baselines") / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    data = load_or_prepare(cfg)
    # the same seeded user sample as `karma eval` when eval.max_users is set
    examples = select_users(data.split(cfg.eval.split), cfg.eval.max_users)
    t0 = time.perf_counter()
    user_emb, item_emb, other = _EMBEDDERS[name](data, cfg, examples, out_dir)
    protocol = {}
    item_filter = query_filter(data, examples) if cfg.eval.query_filter else None
    if item_filter is not None:
        protocol["query_filter"] = QUERY_FILTER
    if other is not None:
        protocol["other_history"] = "seeded permutation of the users' histories (seed 0)"
    results = evaluate_split(
        user_emb,
        item_emb,
        examples,
        cfg,
        method=name,
        cold=cold_rows(data, examples, cfg.eval.cold_threshold),
        other_user_emb=other,
        item_filter=item_filter,
        prepared_dir=cfg.data.prepared_dir,
        seconds=round(time.perf_counter() - t0, 1),
        **protocol,
    )
    print(format_metrics_table(results))
    write_json_atomic(out_dir / "metrics.json", results)
    print(f"metrics written to {out_dir / 'metrics.json'}")
    return results


__all__ = ["BASELINES", "run_baseline"]
