"""Writing the shop: the interactions and oracle tables of each simulated chunk of users,
`generate_shop` (the whole run, bounded memory) and `load_shop` (data.source=shop)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from karma.datasets.shop.catalog import (
    build_catalog,
    load_fashion_mnist,
    write_catalog,
    write_pictures,
)
from karma.datasets.shop.simulator import Simulator
from karma.datasets.shop.world import (
    CHUNK_USERS,
    FASHION_MNIST_DIR,
    N_BRANDS,
    START,
    ShopConfig,
    Vocabulary,
    brand_names,
    join_words,
    strings,
)
from karma.errors import KarmaError
from karma.tables import SourceData, load_files

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
