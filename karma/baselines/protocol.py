"""What every baseline shares: the users' full training sequences and the quiet evaluation.

    sequences = training_sequences(data)                     # user_id -> items, oldest first
    inputs = split_sequences(data, data.split("test"), "test")
    results = evaluate_split(user_emb, item_emb, examples, cfg, method="sasrec")

Kept apart from `karma/baselines/__init__.py` so that the baseline modules import it without
importing their own package's front door (which imports them).
"""

from __future__ import annotations

import numpy as np

from karma.config import Config
from karma.errors import DataError


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
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    examples,
    cfg: Config,
    cold: np.ndarray | None = None,
    other_user_emb: np.ndarray | None = None,
    item_filter: list[list[int]] | None = None,
    **protocol,
) -> dict:
    """Quiet `karma.evaluate.evaluate_embeddings` (scores = user_emb @ item_emb.T, as given);
    `cold` (U,) bool adds the cold-item column (`karma.evaluate.cold_rows`), other_user_emb the
    other-history column, item_filter (per example, items never ranked) a query filter."""
    from karma.evaluate import evaluate_embeddings

    return evaluate_embeddings(
        user_emb,
        item_emb,
        examples,
        cfg,
        protocol=protocol,
        print_table=False,
        show_progress=False,
        cold=cold,
        other_user_emb=other_user_emb,
        item_filter=item_filter,
    )


def primary_metrics(results: dict) -> dict[str, float]:
    """The metrics of the primary setting (`eval.mask_history`) of an evaluation result."""
    return results["metrics"][results["protocol"]["primary"]]
