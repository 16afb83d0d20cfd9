"""The split protocol: chronological leave-one-out per user, with a search query per example
(the real `query` column, or one synthesized from the target item's genres).

    from karma.split import split_leave_one_out
    splits, dropped = split_leave_one_out(source, max_history=20, query_mode="genre", seed=0)
    splits["test"].targets            # (U,) int64 item_idx, each user's last item

See `split_leave_one_out` and docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from karma.config import ConfigError, DataConfig
from karma.errors import KarmaError
from karma.tables import SourceData

QUERY_MODES = ("none", "genre", "genre_decade")
SPLITS = ("train", "valid", "test")


@dataclass
class Examples:
    """One split: one row per (user, target) example."""

    user_ids: list[str]
    histories: list[list[int]]  # item_idx, oldest first, at most max_history
    targets: np.ndarray  # (N,) int64 item_idx
    queries: list[str]
    impressions: list[list[int]]
    seen: list[list[int]]  # valid/test: every earlier item of the user (uncapped); [] in train
    timestamps: np.ndarray  # (N,) int64, of the target

    def __len__(self) -> int:
        return len(self.user_ids)


def training_windows(n: int, max_len: int, last_only: bool = False) -> list[tuple[int, int]]:
    """The training windows [start, end) of a sequence of n items, newest first: up to
    max_len + 1 items each, cut from the end backwards and overlapping by one item, so inputs
    window[:-1] and targets window[1:] cover every transition once. last_only: the newest
    window alone (the older transitions are not trained on). Shared by SASRec
    (`baseline.sasrec.windows`) and the LLM sequence objective (`train.sequence_windows`)."""
    windows, end = [], n
    while end >= 2:
        start = max(0, end - max_len - 1)
        windows.append((start, end))
        if last_only:
            break
        end = start + 1
    return windows


# ---------------------------------------------------------------------------------------------
# Queries


def example_rng(seed: int, user_id: str, position: int) -> random.Random:
    """A generator owned by one example, so queries do not depend on iteration order."""
    digest = hashlib.blake2b(f"{seed}\x1f{user_id}\x1f{position}".encode(), digest_size=8)
    return random.Random(int.from_bytes(digest.digest(), "little"))


def synthesize_query(
    categories: Sequence[str],
    year: int | None,
    mode: str,
    rng: random.Random,
    noun: str = "movies",
) -> str:
    """A search query from the TARGET item's genres: "comedy romance movies", and with
    mode=genre_decade "1990s comedy movies". mode=none gives "".

    A seeded random non-empty subset (at most 3) of the genres, in random order. Items without
    genres fall back to the noun alone ("movies", or "1990s movies").
    """
    if mode not in QUERY_MODES:
        known = ", ".join(QUERY_MODES)
        raise KarmaError(f"data.query_mode: unknown mode '{mode}' (known: {known})")
    if mode == "none":
        return ""
    genres = [c.strip().lower() for c in categories if c and c.strip()]
    words = []
    if mode == "genre_decade" and year is not None:
        words.append(f"{year // 10 * 10}s")
    if genres:
        k = rng.randint(1, min(3, len(genres)))
        picked = rng.sample(genres, k)  # sample() returns them in random order
        words.extend(picked)
    if noun:
        words.append(noun)
    return " ".join(words) or "items"


def category_matrix(categories: Sequence) -> tuple[np.ndarray, dict[str, int]]:
    """(N, C) bool item x category, and each lowercased category name's column."""
    sets = [{c.strip().lower() for c in (cs or []) if c and c.strip()} for cs in categories]
    columns = {c: j for j, c in enumerate(sorted(set().union(*sets)))}
    matrix = np.zeros((len(sets), len(columns)), dtype=bool)
    for i, cs in enumerate(sets):
        matrix[i, [columns[c] for c in cs]] = True
    return matrix, columns


def query_categories(query: str, vocabulary: set[str]) -> set[str]:
    """The categories a query names: its words that are (lowercased) category names, the inverse
    of `synthesize_query` for single-word categories (every MovieLens genre)."""
    return {w for w in query.lower().split() if w in vocabulary}


def query_items(matrix: np.ndarray, columns: dict[str, int], query: str) -> np.ndarray:
    """(N,) bool: the items with every category the query names (all of them if it names none);
    matrix and columns from `category_matrix`."""
    return matrix[:, [columns[c] for c in query_categories(query, set(columns))]].all(axis=1)


# ---------------------------------------------------------------------------------------------
# Split


def split_leave_one_out(
    source: SourceData,
    *,
    max_history: int = 20,
    min_interactions: int = 3,
    query_mode: str = "none",
    seed: int = 0,
) -> tuple[dict[str, Examples], dict[str, int]]:
    """Chronological leave-one-out per user.

    Per user, interactions are STABLE-sorted by timestamp (ties keep input row order, never item
    id order): last = test, second last = valid, the rest = train. Train examples are every
    position t >= 2 (1-based) of the train part, history = the up to `max_history` items before
    it. Valid history = train part (capped), test history = train part + valid item (capped);
    valid/test also carry `seen` = every earlier item, uncapped. Users are in first-appearance
    order. Users with fewer than `min_interactions` interactions are dropped and counted.

    Returns the three splits and dropped counts by reason.
    """
    if min_interactions < 3:
        raise ConfigError(
            "data.min_interactions must be >= 3 (one train, one valid and one test item)"
        )
    if max_history < 1:
        raise ConfigError("data.max_history must be >= 1")
    inter = source.interactions
    items = source.items
    user_code: dict[str, int] = {}
    codes = np.fromiter(
        (user_code.setdefault(u, len(user_code)) for u in inter.user_ids), np.int64, len(inter)
    )
    users = list(user_code)
    # lexsort is stable: by user, then timestamp, ties in input row order.
    order = np.lexsort((inter.timestamps, codes))
    bounds = np.searchsorted(codes[order], np.arange(len(users) + 1))
    use_real_query = inter.queries is not None and query_mode != "none"

    splits = {name: Examples([], [], [], [], [], [], []) for name in SPLITS}
    dropped = {"users_below_min_interactions": 0, "interactions_of_dropped_users": 0}
    for u in tqdm(range(len(users)), desc="split users", unit="user", disable=None):
        rows = order[bounds[u] : bounds[u + 1]]
        n = len(rows)
        if n < min_interactions:
            dropped["users_below_min_interactions"] += 1
            dropped["interactions_of_dropped_users"] += n
            continue
        user_id = users[u]
        seq = inter.item_idx[rows].tolist()
        for t in range(n):
            name = "test" if t == n - 1 else "valid" if t == n - 2 else "train"
            if name == "train" and t == 0:
                continue  # position 1 has no history
            target = seq[t]
            if use_real_query:
                query = inter.queries[rows[t]]
            else:
                query = synthesize_query(
                    items.categories[target],
                    items.years[target],
                    query_mode,
                    example_rng(seed, user_id, t),
                    noun=source.query_noun,
                )
            split = splits[name]
            split.user_ids.append(user_id)
            split.histories.append(seq[max(0, t - max_history) : t])
            split.targets.append(target)
            split.queries.append(query)
            split.impressions.append(inter.impressions[rows[t]])
            split.seen.append(seq[:t] if name != "train" else [])
            split.timestamps.append(int(inter.timestamps[rows[t]]))
    for split in splits.values():
        split.targets = np.asarray(split.targets, dtype=np.int64)
        split.timestamps = np.asarray(split.timestamps, dtype=np.int64)
    return splits, {k: v for k, v in dropped.items() if v}


def protocol_line(cfg: DataConfig) -> str:
    """The split protocol in one line, printed with every metric table."""
    return (
        "chronological leave-one-out per user (stable sort by timestamp, ties keep input row "
        "order): test = last, valid = second last, train = every prefix of the rest; history "
        f"capped at {cfg.max_history}; users with < {cfg.min_interactions} interactions dropped; "
        f"query_mode={cfg.query_mode}"
    )


__all__ = [
    "Examples",
    "example_rng",
    "protocol_line",
    "split_leave_one_out",
    "synthesize_query",
]
