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

Modules: `world` (constants, ShopConfig, vocabulary, Arrow string helpers), `catalog` (pictures,
items, items tables), `simulator` (users, requests, pages, clicks), `generate` (the run, the
interactions and oracle tables, load_shop).
"""

from karma.datasets.shop.catalog import load_fashion_mnist, synthetic_pictures, tint
from karma.datasets.shop.generate import generate_shop, load_shop
from karma.datasets.shop.world import COLOURS, START, ShopConfig

__all__ = [
    "COLOURS",
    "START",
    "ShopConfig",
    "generate_shop",
    "load_fashion_mnist",
    "load_shop",
    "synthetic_pictures",
    "tint",
]
