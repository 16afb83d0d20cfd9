"""`karma shop`: a seeded, simulated Taobao-like shop written through karma's data contract. It is
SIMULATED: nothing in it is real user behaviour; its ground truth is known (docs/shop.md).

    karma shop --items 2000 --out runs/shop                  # Fashion-MNIST product pictures
    karma data prepare --config configs/shop.yaml            # data.source=shop data.path=runs/shop
    karma shop --items 2000 --out runs/shop-synth --pictures synthetic   # no Debian package needed

    from karma.datasets.shop import ShopConfig, generate_shop
    summary = generate_shop(ShopConfig(items=2000, seed=0), "runs/shop")

What it writes into the output folder (the same files a user brings, see karma/tables.py):
- `items.parquet`: item_id, title ("Nordvik red wool casual pullover"; the colour is left out of a
  `colour_missing` share of titles, so that for those items it is only in the image), category
  (the Fashion-MNIST class), attributes (price band), image (`images/{picture}-{colour}.png`,
  the item's Fashion-MNIST picture tinted with its colour, shared by items with the same pair).
- `interactions.parquet`: one row per click: user_id, item_id, timestamp, query ("" for a feed
  visit), impressions (the whole result page, clicked item included; the rest become hard
  negatives). Requests without a click are counted in shop.json, not written.
- `truth/items.parquet`: every item's attributes, colour_in_title, picture, arrival, popularity.
- `oracle.parquet`: for the last click of each of the first `oracle_users` users (the test
  example of the leave-one-out split): the simulator's own ideal ranking (top `oracle_top` items by
  expected utility given the user's taste and intent at that moment), for an oracle row.
- `shop.json`: the configuration, counts, timings and a plain statement that the data is simulated.

The world: products of 10 Fashion-MNIST classes with a brand, colour, material, style and price
band. Users hold latent tastes (logits over every attribute value) that drift by a random walk at
each request. A request is a typed query (category word or synonym, plus a random subset of the
intent's other attributes, with typos) or a query-less feed visit. A noisy text ranker (it matches
query words against TITLES, plus popularity and noise) shows a page; the user examines position p
with probability 1/(p+1)^0.7 and clicks at most one item by a multinomial logit over the page and
a no-click option, on the items' TRUE attributes (the colour she sees in the picture). A share of
items arrives during the simulated period (cold items).

Memory is bounded: items live in a few numpy arrays (~30 bytes an item), users are simulated in
chunks of CHUNK_USERS and written as Parquet row groups.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from karma.errors import KarmaError
from karma.tables import SourceData, load_files

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


# ---------------------------------------------------------------------------------------------
# Pictures


def load_fashion_mnist(folder: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST pictures (N, 28, 28) uint8 (white article on black) and their
    class labels (N,) from the Debian package's idx files."""
    folder = Path(folder)
    if not all((folder / f).is_file() for pair in FASHION_MNIST_FILES for f in pair):
        raise KarmaError(
            f"{folder}: Fashion-MNIST not found. Install it with `apt-get install "
            "dataset-fashion-mnist` (Debian/Ubuntu, as root; `make setup` does it where it can), "
            "or pass --fashion-mnist DIR (the four *-ubyte.gz files) or --pictures synthetic"
        )
    images, labels = [], []
    for image_file, label_file in FASHION_MNIST_FILES:
        with gzip.open(folder / image_file) as f:
            raw = f.read()
        # idx3: magic, count, rows, cols as big-endian int32, then the pixels.
        n, rows, cols = np.frombuffer(raw, ">i4", 3, offset=4)
        images.append(np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols))
        with gzip.open(folder / label_file) as f:
            labels.append(np.frombuffer(f.read(), np.uint8, offset=8))
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def synthetic_pictures(
    per_class: int = 20, size: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Small generated stand-ins for Fashion-MNIST (tests, machines without the package): one
    bright shape per class (a bar at a class-specific row), with per-picture jitter."""
    rng = np.random.default_rng(seed)
    n_classes = len(CATEGORIES)
    pictures = np.zeros((n_classes * per_class, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    for k, c in enumerate(labels):
        top = c * (size - 2) // n_classes
        left = int(rng.integers(0, size // 3))
        pictures[k, top : top + 3, left : size - left] = rng.integers(150, 256)
    return pictures, labels


def tint(pictures: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8: each article (..., H, W) in its colour rgb (..., 3) on white, the
    article's intensity as the blend weight (Fashion-MNIST articles are bright on black)."""
    alpha = pictures.astype(np.float32)[..., None] / 255.0  # (..., H, W, 1)
    colour = np.asarray(rgb, np.float32)[..., None, None, :]  # (..., 1, 1, 3)
    return np.round(255.0 * (1.0 - alpha) + colour * alpha).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Vocabulary


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


# ---------------------------------------------------------------------------------------------
# The catalog


@dataclass
class Catalog:
    """Items in arrival order (item_idx i arrives at arrival[i], non-decreasing)."""

    attrs: np.ndarray  # (n, 6) int32 value of each attribute in ATTRIBUTES order
    colour_in_title: np.ndarray  # (n,) bool
    picture: np.ndarray  # (n,) int64 index into the picture set
    arrival: np.ndarray  # (n,) int64 seconds after START
    log_pop: np.ndarray  # (n,) float32 latent popularity


def build_catalog(cfg: ShopConfig, labels: np.ndarray) -> Catalog:
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.items
    sizes = attribute_sizes()
    attrs = np.empty((n, len(ATTRIBUTES)), dtype=np.int32)
    for a, size in enumerate(sizes):
        # Skewed value frequencies, as in a real catalog (a few colours and brands dominate).
        p = rng.dirichlet(np.full(size, 2.0))
        attrs[:, a] = rng.choice(size, n, p=p)
    by_class = [np.flatnonzero(labels == c) for c in range(len(CATEGORIES))]
    picture = np.empty(n, dtype=np.int64)
    for c, pool in enumerate(by_class):
        rows = np.flatnonzero(attrs[:, 0] == c)
        picture[rows] = pool[rng.integers(0, len(pool), len(rows))]
    horizon = cfg.days * 86_400
    cold = rng.random(n) < cfg.cold_share
    arrival = np.where(cold, rng.integers(1, horizon, n), 0)
    order = np.argsort(arrival, kind="stable")
    return Catalog(
        attrs=attrs[order],
        colour_in_title=(rng.random(n) >= cfg.colour_missing)[order],
        picture=picture[order],
        arrival=arrival[order],
        log_pop=rng.normal(0.0, 1.0, n).astype(np.float32)[order],
    )


def attribute_sizes() -> list[int]:
    return [len(CATEGORIES), N_BRANDS, len(COLOURS), len(MATERIALS), len(STYLES), len(PRICE_BANDS)]


def image_name(picture: int, colour: int) -> str:
    return f"images/{picture:05d}-{COLOURS[colour][0]}.png"


def write_catalog(cat: Catalog, brands: list[str], cfg: ShopConfig, out: Path) -> None:
    """items.parquet and truth/items.parquet, in chunks of a million items."""
    n = len(cat.arrival)
    chunk = 1_000_000
    a = cat.attrs
    # Title words: brand colour material style noun (colour only when in the title).
    word_tables = [
        pa.array(brands),
        pa.array([c[0] for c in COLOURS]),
        pa.array(list(MATERIALS)),
        pa.array(list(STYLES)),
        pa.array([c[1] for c in CATEGORIES]),
    ]
    items_writer = truth_writer = None
    (out / "truth").mkdir(parents=True, exist_ok=True)
    try:
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            m = sl.stop - sl.start
            slots = np.stack([a[sl, 1], a[sl, 2], a[sl, 3], a[sl, 4], a[sl, 0]], axis=1)
            present = np.ones_like(slots, dtype=bool)
            present[:, 1] = cat.colour_in_title[sl]
            titles = join_words(slots, present, word_tables)
            ids = strings(np.arange(sl.start, sl.stop), "i")
            images: pa.Array = pa.nulls(m, pa.string())
            if cfg.images:
                images = pa.array([image_name(p, c) for p, c in zip(cat.picture[sl], a[sl, 2])])
            items = pa.table(
                {
                    "item_id": ids,
                    "title": titles,
                    "category": pa.ListArray.from_arrays(
                        pa.array(np.arange(m + 1, dtype=np.int32)),
                        take(pa.array([c[0] for c in CATEGORIES]), a[sl, 0]),
                    ),
                    "attributes": take(pa.array(list(PRICE_BANDS)), a[sl, 5]),
                    "image": images,
                }
            )
            truth = pa.table(
                {
                    "item_id": ids,
                    **{
                        name: take(pa.array(vocab), a[sl, k])
                        for k, (name, vocab) in enumerate(zip(ATTRIBUTES, _attribute_names(brands)))
                    },
                    "colour_in_title": cat.colour_in_title[sl],
                    "picture": cat.picture[sl],
                    "arrival": cat.arrival[sl] + START,
                    "cold": cat.arrival[sl] > 0,
                    "log_popularity": cat.log_pop[sl],
                }
            )
            if items_writer is None:
                items_writer = pq.ParquetWriter(out / "items.parquet", items.schema)
                truth_writer = pq.ParquetWriter(out / "truth" / "items.parquet", truth.schema)
            items_writer.write_table(items)
            truth_writer.write_table(truth)
    finally:
        for writer in (items_writer, truth_writer):
            if writer is not None:
                writer.close()


def write_pictures(cat: Catalog, pictures: np.ndarray, out: Path) -> int:
    """One PNG per distinct (picture, colour) of the catalog; returns how many."""
    (out / "images").mkdir(exist_ok=True)
    keys = np.unique(cat.picture * len(COLOURS) + cat.attrs[:, 2])
    palette = np.array([rgb for _, rgb, _ in COLOURS])
    bar = tqdm(total=len(keys), desc="shop pictures", unit="img", disable=None)
    for start in range(0, len(keys), 4096):
        picture, colour = np.divmod(keys[start : start + 4096], len(COLOURS))
        for p, c, pixels in zip(picture, colour, tint(pictures[picture], palette[colour])):
            Image.fromarray(pixels).save(out / image_name(p, c))
        bar.update(len(picture))
    bar.close()
    return len(keys)


def _attribute_names(brands: list[str]) -> list[list[str]]:
    return [
        [c[0] for c in CATEGORIES],
        brands,
        [c[0] for c in COLOURS],
        list(MATERIALS),
        list(STYLES),
        list(PRICE_BANDS),
    ]


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


# ---------------------------------------------------------------------------------------------
# Writing


INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("query", pa.string()),
        ("impressions", pa.list_(pa.string())),
    ]
)
ORACLE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("timestamp", pa.int64()),
        ("ranking", pa.list_(pa.string())),
    ]
)


def clicks_table(clicks: list[tuple[np.ndarray, ...]], vocab: Vocabulary) -> pa.Table:
    """One chunk's clicks, rows sorted by (user, time), as an interactions table."""
    user = np.concatenate([c[0] for c in clicks])
    item = np.concatenate([c[1] for c in clicks])
    t = np.concatenate([c[2] for c in clicks])
    words = np.concatenate([c[3][0] for c in clicks])
    present = np.concatenate([c[3][1] for c in clicks])
    page = np.concatenate([c[4] for c in clicks])
    valid = np.concatenate([c[5] for c in clicks])
    order = np.lexsort((t, user))
    page, valid = page[order], valid[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    impressions = pa.ListArray.from_arrays(pa.array(offsets), strings(page[valid], "i"))
    return pa.Table.from_arrays(
        [
            strings(user[order], "u"),
            strings(item[order], "i"),
            pa.array(t[order]),
            join_words(words[order], present[order], vocab.array),
            impressions,
        ],
        schema=INTERACTIONS_SCHEMA,
    )


def oracle_table(sim: Simulator, state: dict[str, np.ndarray], users: np.ndarray) -> pa.Table:
    """The simulator's ideal ranking for each oracle user's last click: every item available
    then, by expected utility (taste + intent match + popularity, no position, no noise)."""
    top = sim.cfg.oracle_top
    rows = np.flatnonzero(state["t"] >= 0) if state else np.zeros(0, np.int64)
    rankings = []
    for k in rows.tolist():
        n_avail = int(sim.available(state["t"][k : k + 1])[0])
        items = np.arange(n_avail)[None, :]
        util = sim.utility(
            state["taste"][k : k + 1], items, state["intent"][k : k + 1], state["typed"][k : k + 1]
        )[0]
        best = np.argpartition(-util, min(top, n_avail) - 1)[:top]
        rankings.append(best[np.argsort(-util[best], kind="stable")])
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rankings], out=offsets[1:])
    flat = np.concatenate(rankings) if rankings else np.zeros(0, np.int64)
    return pa.Table.from_arrays(
        [
            strings(users[rows], "u"),
            pa.array(state["t"][rows] + START if state else np.zeros(0, np.int64)),
            pa.ListArray.from_arrays(pa.array(offsets), strings(flat, "i")),
        ],
        schema=ORACLE_SCHEMA,
    )


def generate_shop(
    cfg: ShopConfig,
    out: str | Path,
    pictures: tuple[np.ndarray, np.ndarray] | None = None,
    fashion_mnist: str | Path = FASHION_MNIST_DIR,
) -> dict[str, Any]:
    """Simulate the shop and write it into `out` (see the module doc). `pictures` (N, H, W)
    uint8 + labels (N,) replace Fashion-MNIST (tests use small generated ones). Returns the
    summary also written to shop.json."""
    if cfg.items < 10 or cfg.page_size < 1 or cfg.candidates < cfg.page_size:
        raise KarmaError("karma shop: needs items >= 10 and candidates >= page_size >= 1")
    started = time.perf_counter()
    images, labels = pictures if pictures is not None else load_fashion_mnist(fashion_mnist)
    n_users = cfg.users or max(100, cfg.items // 2)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    brands = brand_names(N_BRANDS, cfg.seed)
    cat = build_catalog(cfg, labels)
    write_catalog(cat, brands, cfg, out)
    seconds = {"catalog": time.perf_counter() - started}
    n_images = write_pictures(cat, images, out) if cfg.images else 0
    seconds["pictures"] = time.perf_counter() - started - seconds["catalog"]
    vocab = Vocabulary(brands, cfg.seed)
    sim = Simulator(cfg, cat, vocab)

    counts = {"requests": 0, "clicks": 0, "requests_without_click": 0, "cold_clicks": 0}
    writer = pq.ParquetWriter(out / "interactions.parquet", INTERACTIONS_SCHEMA)
    oracle_writer = pq.ParquetWriter(out / "oracle.parquet", ORACLE_SCHEMA)
    bar = tqdm(total=n_users, desc="shop users", unit="user", disable=None)
    try:
        for index, first in enumerate(range(0, n_users, CHUNK_USERS)):
            users = np.arange(first, min(n_users, first + CHUNK_USERS))
            result = sim.run_chunk(users, index)
            table = clicks_table(result["clicks"], vocab)
            writer.write_table(table)
            oracle_writer.write_table(oracle_table(sim, result["last_click"], users))
            clicked = np.concatenate([c[1] for c in result["clicks"]])
            counts["requests"] += result["requests"]
            counts["clicks"] += table.num_rows
            counts["requests_without_click"] += result["no_click"]
            counts["cold_clicks"] += int((cat.arrival[clicked] > 0).sum())
            bar.update(len(users))
    finally:
        bar.close()
        writer.close()
        oracle_writer.close()
    summary = {
        "simulated": "yes: every user, query and click here was generated by karma shop",
        "config": asdict(cfg),
        "users": n_users,
        "items": cfg.items,
        "cold_items": int((cat.arrival > 0).sum()),
        "items_colour_missing_from_title": int((~cat.colour_in_title).sum()),
        "images": n_images,
        "pictures": "fashion-mnist" if pictures is None else "given",
        **counts,
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_by_phase": {
            **{k: round(v, 2) for k, v in seconds.items()},
            "simulation": round(time.perf_counter() - started - sum(seconds.values()), 2),
        },
    }
    (out / "shop.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_shop(path: str | Path) -> SourceData:
    """data.source=shop: a `karma shop` folder, read through the files data contract."""
    folder = Path(path or "")
    if not str(path) or not (folder / "items.parquet").is_file():
        raise KarmaError(
            f"data.path: {folder}: not a karma shop folder (no items.parquet); "
            "run `karma shop --out DIR` and set data.path=DIR"
        )
    source = load_files(folder / "items.parquet", folder / "interactions.parquet")
    source.name = "shop"
    return source
