"""Most-popular baseline: every user gets the same ranking, by training interaction count.

    counts = popularity_counts(data)                                   # (N,) int64
    user_emb, item_emb = popularity_embeddings(counts, len(examples))  # score = count

The count is over ALL training-part interactions (each user's uncapped sequence before the
validation item, `karma.baselines.protocol.training_sequences`), not over train targets only,
which would miss each user's first item and everything hidden by the history cap. Validation and
test items are never counted, so nothing leaks. Items with equal counts tie, and the evaluator's
pessimistic tie rule charges the tie to the target.
"""

from __future__ import annotations

import numpy as np

from karma.baselines.protocol import training_sequences


def popularity_counts(data) -> np.ndarray:
    """(N,) int64: number of training-part interactions of each item."""
    counts = np.zeros(data.items.n_items, dtype=np.int64)
    for seq in training_sequences(data).values():
        np.add.at(counts, np.asarray(seq, dtype=np.int64), 1)
    return counts


def popularity_embeddings(counts: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """One-dimensional embeddings whose inner product is the count: user = [1], item = [c_i].

    The evaluator ranks by `user_emb @ item_emb.T` as given (no normalization), so every user
    gets the catalog sorted by count. Returns user_emb (n_users, 1), item_emb (N, 1), float32.
    """
    item_emb = np.asarray(counts, dtype=np.float32).reshape(-1, 1)
    return np.ones((n_users, 1), dtype=np.float32), item_emb
