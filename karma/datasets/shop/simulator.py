"""Users and requests: latent drifting tastes, typed queries and feed visits, the noisy baseline
ranker's result pages and the choice model's clicks, simulated a chunk of users at a time."""

from __future__ import annotations

from typing import Any

import numpy as np

from karma.datasets.shop.catalog import Catalog
from karma.datasets.shop.world import (
    ATTRIBUTES,
    CATEGORIES,
    COLOURS,
    FEED_CATEGORY_SHARE,
    NO_CLICK,
    POP_WEIGHT,
    POSITION_DECAY,
    START,
    SYNONYM_PROB,
    TASTE_SCALE,
    TYPE_PROB,
    TYPED_BONUS,
    UNTYPED_BONUS,
    ShopConfig,
    Vocabulary,
    attribute_sizes,
)

# ---------------------------------------------------------------------------------------------
# Users and requests


class Simulator:
    """Simulates one chunk of users at a time; everything is vectorized over the chunk."""

    def __init__(self, cfg: ShopConfig, cat: Catalog, vocab: Vocabulary) -> None:
        self.cfg, self.cat, self.vocab = cfg, cat, vocab
        self.sizes = attribute_sizes()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])  # into the taste vector
        self.n_values = int(sum(self.sizes))
        self.item_values = (cat.attrs + self.offsets[None, :]).astype(np.int32)  # (n, 6)
        n = len(cat.arrival)
        # Items grouped by category and by (category, colour shown in the title), each group in
        # arrival order: the items of group g available at time t are a prefix of it.
        self.cat_groups = Groups(cat.attrs[:, 0], len(CATEGORIES), n)
        colour_group = np.where(
            cat.colour_in_title, cat.attrs[:, 0] * len(COLOURS) + cat.attrs[:, 2], -1
        )
        self.colour_groups = Groups(colour_group, len(CATEGORIES) * len(COLOURS), n)

    def available(self, t: np.ndarray) -> np.ndarray:
        """Number of items (a prefix in item_idx order) that exist at times t."""
        return np.searchsorted(self.cat.arrival, t, side="right")

    def utility(
        self, taste: np.ndarray, items: np.ndarray, intent: np.ndarray, typed: np.ndarray
    ) -> np.ndarray:
        """True utility (R, K) of items (R, K) for requests with taste (R, V), intent (R, 6)
        and typed (R, 6): taste + intent match (on TRUE attributes) + popularity."""
        values = self.item_values[items]  # (R, K, 6)
        rows = np.arange(len(items))[:, None, None]
        util = taste[rows, values].sum(axis=2)
        match = self.cat.attrs[items] == intent[:, None, :]  # (R, K, 6)
        bonus = np.where(typed[:, None, :], TYPED_BONUS, UNTYPED_BONUS)
        return util + (match * bonus).sum(axis=2) + POP_WEIGHT * self.cat.log_pop[items]

    def run_chunk(self, users: np.ndarray, chunk_index: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2, chunk_index])
        n_users = len(users)
        taste = np.concatenate(
            [rng.normal(0.0, s, (n_users, k)) for s, k in zip(TASTE_SCALE, self.sizes)], axis=1
        ).astype(np.float32)  # (U, V)
        # At least 3 requests (the split needs 3 clicks), a heavy tail capped at 10x the mean.
        extra = cfg.requests_per_user - 3
        n_requests = np.full(n_users, 3)
        if extra > 0:
            n_requests += rng.negative_binomial(2, 2 / (2 + extra), n_users)
        n_requests = np.minimum(n_requests, max(3, int(10 * cfg.requests_per_user)))
        horizon = cfg.days * 86_400
        now = rng.integers(0, horizon // 3, n_users).astype(np.int64)
        gap = (horizon - now) / (n_requests + 1)  # mean seconds between a user's requests
        clicks: list[tuple[np.ndarray, ...]] = []
        no_click = 0
        oracle_rows = users < cfg.oracle_users
        last_click: dict[str, np.ndarray] = {}
        for step in range(int(n_requests.max())):
            active = np.flatnonzero(n_requests > step)
            r = len(active)
            taste[active] += rng.normal(0.0, cfg.drift, (r, self.n_values)).astype(np.float32)
            now[active] += 1 + rng.exponential(gap[active]).astype(np.int64)
            t = now[active]
            user_taste = taste[active]
            # Intent: one value per attribute, drawn from the current taste (Gumbel-max).
            intent = np.empty((r, len(ATTRIBUTES)), dtype=np.int32)
            for a, (off, size) in enumerate(zip(self.offsets, self.sizes)):
                logits = user_taste[:, off : off + size] + rng.gumbel(size=(r, size))
                intent[:, a] = logits.argmax(axis=1)
            is_query = rng.random(r) < cfg.query_share
            typed = (rng.random((r, len(ATTRIBUTES))) < TYPE_PROB[None, :]) & is_query[:, None]
            candidates = self.candidates(rng, t, intent, typed, is_query)  # (R, M)
            page, valid = self.rank(rng, candidates, typed, intent)  # (R, K)
            util = self.utility(user_taste, page, intent, typed)
            exam = -POSITION_DECAY * np.log1p(np.arange(cfg.page_size, dtype=np.float32))
            logits = np.where(valid, util + exam[None, :], -np.inf)
            logits = np.concatenate([logits, np.full((r, 1), NO_CLICK)], axis=1)
            choice = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
            clicked = choice < cfg.page_size
            no_click += int((~clicked).sum())
            rows = np.flatnonzero(clicked)
            words = self.query_words(rng, intent[rows], typed[rows])
            clicks.append(
                (
                    users[active[rows]],
                    page[rows, choice[rows]],
                    t[rows] + START,
                    words,
                    page[rows],
                    valid[rows],
                )
            )
            # The oracle needs the state at each oracle user's LAST click: overwrite as we go.
            keep = rows[oracle_rows[active[rows]]]
            if len(keep):
                self._remember(
                    last_click,
                    active[keep],
                    user_taste[keep],
                    intent[keep],
                    typed[keep],
                    t[keep],
                    n_users,
                )
        return {
            "clicks": clicks,
            "no_click": no_click,
            "requests": int(n_requests.sum()),
            "last_click": last_click,
        }

    @staticmethod
    def _remember(
        state: dict[str, np.ndarray],
        rows: np.ndarray,
        taste: np.ndarray,
        intent: np.ndarray,
        typed: np.ndarray,
        t: np.ndarray,
        n_users: int,
    ) -> None:
        if not state:
            state["taste"] = np.zeros((n_users, taste.shape[1]), np.float32)
            state["intent"] = np.zeros((n_users, intent.shape[1]), np.int32)
            state["typed"] = np.zeros((n_users, typed.shape[1]), bool)
            state["t"] = np.full(n_users, -1, np.int64)
        state["taste"][rows], state["intent"][rows] = taste, intent
        state["typed"][rows], state["t"][rows] = typed, t

    def candidates(
        self,
        rng: np.random.Generator,
        t: np.ndarray,
        intent: np.ndarray,
        typed: np.ndarray,
        is_query: np.ndarray,
    ) -> np.ndarray:
        """(R, M) item indices the baseline ranker scores. Queries: items of the typed category;
        when a colour is typed, half of them from items whose TITLE has that colour (a text
        engine cannot find the others). Feed: half the intent category, half anything."""
        r, m = len(t), self.cfg.candidates
        n_avail = self.available(t)
        u = rng.random((r, m))
        out = np.minimum(
            (u * n_avail[:, None]).astype(np.int64), np.maximum(n_avail - 1, 0)[:, None]
        )
        from_cat = is_query[:, None] | (np.arange(m)[None, :] < FEED_CATEGORY_SHARE * m)
        out = np.where(from_cat, self.cat_groups.sample(intent[:, 0], n_avail, u, out), out)
        colour_key = intent[:, 0] * len(COLOURS) + intent[:, 2]
        by_colour = typed[:, 2:3] & (np.arange(m)[None, :] < m // 2)
        u_colour = rng.random((r, m))
        return np.where(
            by_colour, self.colour_groups.sample(colour_key, n_avail, u_colour, out), out
        )

    def rank(
        self,
        rng: np.random.Generator,
        candidates: np.ndarray,
        typed: np.ndarray,
        intent: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The noisy baseline ranker: title-word matches + popularity + noise, top page_size;
        duplicates are removed (`valid` False where a page has fewer distinct items)."""
        cat = self.cat
        shown = cat.attrs[candidates]  # (R, M, 6)
        match = (shown == intent[:, None, :]) & typed[:, None, :]
        match[:, :, 2] &= cat.colour_in_title[candidates]  # the ranker reads titles only
        score = match.sum(axis=2) + 0.5 * cat.log_pop[candidates]
        score = score + self.cfg.ranker_noise * rng.normal(size=score.shape)
        order = np.argsort(candidates, axis=1, kind="stable")
        sorted_items = np.take_along_axis(candidates, order, axis=1)
        dup = np.zeros_like(candidates, dtype=bool)
        dup[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
        np.put_along_axis(
            score, order, np.where(dup, -np.inf, np.take_along_axis(score, order, 1)), 1
        )
        top = np.argsort(-score, axis=1, kind="stable")[:, : self.cfg.page_size]
        page = np.take_along_axis(candidates, top, axis=1)
        valid = np.isfinite(np.take_along_axis(score, top, axis=1))
        return page, valid

    def query_words(
        self, rng: np.random.Generator, intent: np.ndarray, typed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(R, 6) word ids and presence of a query (order: brand colour material style noun
        price), with synonyms for category and colour and typos."""
        vocab = self.vocab
        order = (1, 2, 3, 4, 0, 5)
        ids = np.stack([vocab.canonical[a][intent[:, a]] for a in order], axis=1)
        present = typed[:, order]
        for slot, a in ((4, 0), (1, 2)):  # synonyms of the category noun and of the colour
            use = rng.random(len(ids)) < SYNONYM_PROB
            for v in range(self.sizes[a]):
                syn = vocab.synonyms[a][v]
                rows = np.flatnonzero(use & (intent[:, a] == v))
                if len(syn) and len(rows):
                    ids[rows, slot] = syn[rng.integers(0, len(syn), len(rows))]
        slip = rng.random(ids.shape) < self.cfg.typo_rate
        ids = np.where(slip, vocab.typo_of[ids], ids)
        return ids, present


class Groups:
    """Items grouped by a key (-1: in no group), each group in item_idx (= arrival) order, so
    that the members available at time t (index < n_avail) are a prefix of the group."""

    def __init__(self, key: np.ndarray, n_groups: int, n_items: int) -> None:
        order = np.argsort(key, kind="stable")
        self.members = order[key[order] >= 0]
        keys = key[self.members].astype(np.int64)
        self.start = np.searchsorted(keys, np.arange(n_groups + 1))
        self.stride = n_items + 1
        self.sorted_key = keys * self.stride + self.members  # one searchsorted for all requests

    def sample(
        self, group: np.ndarray, n_avail: np.ndarray, u: np.ndarray, fallback: np.ndarray
    ) -> np.ndarray:
        """(R, M) uniform available members of `group` (R,) from uniforms u (R, M); `fallback`
        (R, M) where the group has no available member."""
        if len(self.members) == 0:
            return fallback
        start = self.start[group]
        end = np.searchsorted(self.sorted_key, group.astype(np.int64) * self.stride + n_avail)
        count = end - start
        pos = start[:, None] + np.minimum(
            (u * count[:, None]).astype(np.int64), np.maximum(count - 1, 0)[:, None]
        )
        picked = self.members[np.minimum(pos, len(self.members) - 1)]
        return np.where(count[:, None] > 0, picked, fallback)
