"""How long does `karma shop` take, and how much memory does it hold, at 1M and 10M items?
(issue 11, part 3: the simulated shop at scale)

    .venv/bin/python benchmarks/shop_scale.py --items 1000000 \
        --out benchmarks/results/shop_scale_cpu.md
    .venv/bin/python benchmarks/shop_scale.py --items 10000000 --users 40000 \
        --out benchmarks/results/shop_scale_cpu.md    # 10M catalog, 2 user chunks: memory + rate
    .venv/bin/python benchmarks/shop_scale.py --items 10000 --keep runs/shop-10k     # smoke run

Each size runs `generate_shop` in a fresh child process (so that one size's memory does not
count against the next) and reports wall time by phase (catalog tables, pictures, simulation)
and the child's peak resident memory (ru_maxrss). Defaults are `karma shop`'s: users = items / 2,
30 requests per user on average, Fashion-MNIST pictures, oracle rankings for `--oracle-users`
users (scoring every item per oracle user is the one cost that grows with items x users, so
the benchmark keeps it small). Rows appended to --out; the machine may be shared with other
jobs, which inflates wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from karma.report import cpu_name  # noqa: E402

CHILD = """
import json, resource, sys
from karma.datasets.shop import ShopConfig, generate_shop
cfg = ShopConfig(**json.loads(sys.argv[1]))
summary = generate_shop(cfg, sys.argv[2])
summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(summary))
"""


def run(cfg: dict, out_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg), out_dir],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--oracle-users", type=int, default=100)
    parser.add_argument(
        "--users",
        type=int,
        default=0,
        help="0: karma shop's default (items / 2); fewer users "
        "measure the catalog's full memory and a per-user rate when the full run is too long",
    )
    parser.add_argument("--no-images", action="store_true")
    parser.add_argument("--keep", default=None, help="keep the last shop here (else a temp dir)")
    parser.add_argument("--out", default=None, help="append Markdown rows to this file")
    args = parser.parse_args()

    rows = []
    for items in args.items:
        cfg = {
            "items": items,
            "users": args.users,
            "oracle_users": args.oracle_users,
            "images": not args.no_images,
        }
        tmp = args.keep or tempfile.mkdtemp(prefix="karma-shop-")
        try:
            r = run(cfg, tmp)
            disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        phases = r["seconds_by_phase"]
        row = (
            f"| {items:,} | {r['users']:,} | {r['requests']:,} | {r['clicks']:,} | "
            f"{r['images']:,} | {phases['catalog']:.0f} | {phases['pictures']:.0f} | "
            f"{phases['simulation']:.0f} | {r['seconds']:.0f} | "
            f"{r['clicks'] / max(phases['simulation'], 1e-9):,.0f} | "
            f"{r['peak_rss_mb']:,.0f} | {disk / 2**30:.2f} |"
        )
        print(row, flush=True)
        rows.append(row)

    header = [
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, shared with other jobs while measured; "
        f"one thread. Command: `python benchmarks/shop_scale.py --items "
        f"{' '.join(map(str, args.items))} --oracle-users {args.oracle_users}"
        f"{f' --users {args.users}' if args.users else ''}"
        f"{' --no-images' if args.no_images else ''}`",
        "",
        "| items | users | requests | clicks (rows) | images | catalog s | pictures s | "
        "simulation s | total s | clicks / simulation s | peak RSS MB | disk GiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
