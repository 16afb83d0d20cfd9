"""The shop's world: its constants, configuration and vocabulary (brands, query words,
typos), and the Arrow helpers that turn word indices into strings without Python loops. Everything
else in karma.datasets.shop builds on this module."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
START = 1_735_689_600  # 2025-01-01 00:00:00 UTC, the first simulated second
CHUNK_USERS = 20_000  # users simulated together; fixed, so results do not depend on it

# Fashion-MNIST classes: (category, title noun, query synonyms)
CATEGORIES = (
    ("T-shirt/top", "t-shirt", ("tee", "top", "tshirt")),
    ("Trouser", "trousers", ("pants", "jeans", "slacks")),
    ("Pullover", "pullover", ("sweater", "jumper")),
    ("Dress", "dress", ("gown", "frock")),
    ("Coat", "coat", ("jacket", "overcoat")),
    ("Sandal", "sandals", ("flip flops", "slides")),
    ("Shirt", "shirt", ("blouse", "button down")),
    ("Sneaker", "sneakers", ("trainers", "running shoes")),
    ("Bag", "bag", ("handbag", "purse", "tote")),
    ("Ankle boot", "ankle boots", ("boots", "booties")),
)
# name, RGB tint, query synonyms; white is left out (a white tint is invisible on white)
COLOURS = (
    ("black", (25, 25, 25), ()),
    ("grey", (128, 128, 128), ("gray",)),
    ("navy", (20, 30, 110), ("dark blue",)),
    ("blue", (40, 90, 210), ()),
    ("red", (200, 30, 40), ()),
    ("pink", (235, 120, 170), ()),
    ("green", (40, 140, 60), ()),
    ("olive", (110, 120, 40), ("khaki",)),
    ("beige", (215, 185, 135), ("tan", "sand")),
    ("brown", (120, 70, 30), ()),
    ("yellow", (235, 200, 40), ("mustard",)),
    ("purple", (120, 50, 160), ("violet",)),
)
MATERIALS = ("cotton", "wool", "denim", "leather", "linen", "polyester", "silk", "suede", "canvas")
STYLES = ("casual", "formal", "sporty", "vintage", "minimalist", "streetwear", "classic", "boho")
PRICE_BANDS = ("budget", "mid-range", "premium", "luxury")
PRICE_WORDS = ("cheap", "affordable", "premium", "luxury")  # how a query says the band
N_BRANDS = 40
ATTRIBUTES = ("category", "brand", "colour", "material", "style", "price")
# How strongly a user's taste spreads over each attribute's values (std of the taste logits).
TASTE_SCALE = np.array([1.5, 1.0, 1.2, 0.7, 0.9, 0.8])
# Probability that a query types each attribute of its intent (the category is always typed).
TYPE_PROB = np.array([1.0, 0.15, 0.45, 0.25, 0.2, 0.1])
TYPED_BONUS = 2.0  # utility of an item matching a typed intent attribute
UNTYPED_BONUS = 0.7  # ... matching an intent attribute the user did not type
POP_WEIGHT = 0.4  # weight of log-popularity in the true utility
NO_CLICK = 4.0  # utility of leaving the page without a click
POSITION_DECAY = 0.7  # examination probability of position p (0-based): 1 / (p + 1)^0.7
SYNONYM_PROB = 0.3
FEED_CATEGORY_SHARE = 0.5  # feed pages: candidates from the user's intent category, the rest any


@dataclass
class ShopConfig:
    items: int = 2000
    users: int = 0  # 0: items // 2, at least 100
    requests_per_user: float = 30.0  # mean; negative binomial, at least 3
    seed: int = 0
    days: int = 90  # simulated period
    cold_share: float = 0.2  # items arriving during the period (the rest exist at the start)
    colour_missing: float = 0.3  # share of titles that leave the colour out
    query_share: float = 0.7  # typed queries; the rest are query-less feed visits
    typo_rate: float = 0.05  # per typed word
    drift: float = 0.05  # std of the per-request random walk of every taste logit
    page_size: int = 10  # impressions per result page
    candidates: int = 40  # items the baseline ranker scores per request
    ranker_noise: float = 1.0  # std of the baseline ranker's score noise
    oracle_users: int = 5000  # users (first by index) whose test request gets an oracle ranking
    oracle_top: int = 200
    images: bool = True  # write tinted product pictures (the `image` column)


def attribute_sizes() -> list[int]:
    return [len(CATEGORIES), N_BRANDS, len(COLOURS), len(MATERIALS), len(STYLES), len(PRICE_BANDS)]


def attribute_names(brands: list[str]) -> list[list[str]]:
    return [
        [c[0] for c in CATEGORIES],
        brands,
        [c[0] for c in COLOURS],
        list(MATERIALS),
        list(STYLES),
        list(PRICE_BANDS),
    ]


def brand_names(n: int, seed: int) -> list[str]:
    """`n` distinct made-up brand names from syllables (seeded)."""
    rng = np.random.default_rng([seed, 7])
    first = "nor vel ka lu mar so ber ta zen ri ol fa du".split()
    second = "dvik ora mi xa ello no line vo tex ria ko ra".split()
    names: list[str] = []
    while len(names) < n:
        name = str(rng.choice(first)) + str(rng.choice(second))
        if name not in names:
            names.append(name)
    return names


def typo(word: str, rng: np.random.Generator) -> str:
    """One keyboard slip: drop, double or swap a letter (words of 4+ letters only)."""
    if len(word) < 4 or " " in word:
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return word[:i] + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i] + word[i:]
    return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]


class Vocabulary:
    """Query words as integer ids so that millions of queries are built by Arrow, not Python.

    `canonical[a][v]` is the word id of value v of attribute a; `synonyms[a][v]` lists the ids of
    its synonyms; `typo_of[w]` the id of a misspelled variant of word w (itself if too short)."""

    def __init__(self, brands: list[str], seed: int) -> None:
        rng = np.random.default_rng([seed, 11])
        self.words: list[str] = []
        values = (
            [(noun, syn) for _, noun, syn in CATEGORIES],
            [(b, ()) for b in brands],
            [(name, syn) for name, _, syn in COLOURS],
            [(m, ()) for m in MATERIALS],
            [(s, ()) for s in STYLES],
            [(w, ()) for w in PRICE_WORDS],
        )
        self.canonical = [np.array([self._add(w) for w, _ in vals]) for vals in values]
        self.synonyms = [
            [np.array([self._add(s) for s in syn], int) for _, syn in vals] for vals in values
        ]
        self.typo_of = np.array([self._add(typo(w, rng)) for w in list(self.words)])
        self.array = pa.array(self.words, pa.string())

    def _add(self, word: str) -> int:
        self.words.append(word)
        return len(self.words) - 1


def strings(values: np.ndarray, prefix: str) -> pa.Array:
    """prefix + decimal integer, built by Arrow ("i42")."""
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(values), pa.string()), "")


def take(dictionary: pa.Array, indices: np.ndarray) -> pa.Array:
    """dictionary[indices] as a plain Arrow array (vectorized)."""
    return pa.DictionaryArray.from_arrays(pa.array(indices), dictionary).cast(dictionary.type)


def join_words(
    slots: np.ndarray, present: np.ndarray, tables: list[pa.Array] | pa.Array
) -> pa.Array:
    """One string per row: the present slots' words joined by spaces. `slots` (R, S) holds word
    indices into `tables[s]` (one table per slot) or into the one shared table."""
    if isinstance(tables, list):
        offsets = np.cumsum([0] + [len(t) for t in tables[:-1]])
        dictionary = pa.concat_arrays(tables)
        slots = slots + offsets[None, :]
    else:
        dictionary = tables
    counts = present.sum(axis=1)
    list_offsets = np.zeros(len(slots) + 1, dtype=np.int32)
    np.cumsum(counts, out=list_offsets[1:])
    values = take(dictionary, slots[present])  # row-major: each row's words in slot order
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(list_offsets), values), " ")
