"""How long does full-catalog top-k retrieval take on this machine? (issue "Evaluation at
full-catalog scale", part 6)

    .venv/bin/python benchmarks/eval_scale.py --items 100000 1000000 --users 10000 100000 \
        --max-measured-users 10000 --out benchmarks/results/eval_scale_cpu.md
    .venv/bin/python benchmarks/eval_scale.py --items 20000 --users 2000    # quick smoke run

Random L2-normalized float32 embeddings (dim 256), top-k (200) by inner product with:
- `faiss_exact`: karma.index.search over IndexFlatIP (the default `karma eval` path),
- `torch`: karma.index.torch_topk_search (chunked matmul + torch.topk),
- `hnsw`: karma.index.search over IndexHNSWFlat; recall@k = |approx top-k & exact top-k| / k,
  averaged over users, with `faiss_exact` as the reference (build time reported separately).
Each configuration searches min(users, max(1000, --pair-budget // items)) users; when that is fewer
than its users, the total is extrapolated linearly (search cost is linear in users) and the table
marks the row. Both wall-clock and process CPU seconds are reported: on a shared machine wall time
is inflated by other jobs, CPU seconds / cores estimates the time on an idle machine.
HNSW is built only for catalogs up to --hnsw-max-items (its build is the slow part).
Random vectors have no cluster structure, the hardest case for HNSW: recall on real embeddings
is higher at the same settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from karma.index import build_index, search, torch_topk_search
from karma.report import cpu_name


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def machine() -> str:
    model = cpu_name()
    import faiss

    return (
        f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads), numpy {np.__version__}"
    )


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["faiss_exact", "torch", "hnsw"],
                        choices=["faiss_exact", "torch", "hnsw"])
    parser.add_argument("--pair-budget", type=float, default=1e9,
                        help="measure at most max(1000, budget // items) users, extrapolate")
    parser.add_argument("--hnsw-max-items", type=int, default=200_000)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[256])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", default=None, help="markdown results file")
    args = parser.parse_args(argv)

    header = [
        "# Full-catalog top-k retrieval time (benchmarks/eval_scale.py)",
        "",
        f"- machine: {machine()}",
        f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; load average at start: "
        f"{load()}",
        f"- command: `{' '.join(['.venv/bin/python', *sys.argv])}`",
        f"- data: random L2-normalized float32 embeddings, dim {args.dim}, top-{args.k} by "
        f"inner product; HNSW M={args.hnsw_m}, efConstruction={args.ef_construction}",
        "",
        "| items | users | measured users | method | build s | search wall s (measured) | "
        "search CPU s (measured) | total wall s (all users) | total CPU s / cores | "
        "recall@k vs exact |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: list[str] = []
    print("\n".join(header), flush=True)

    cores = os.cpu_count() or 1

    def emit(n, u, m, method, build, timing, rec):
        wall, cpu = timing
        mark = "" if m == u else " (extrapolated)"
        row = (f"| {n:,} | {u:,} | {m:,} | {method} | {build} | {wall:.1f} | {cpu:.1f} | "
               f"{wall * u / m:.1f}{mark} | {cpu * u / m / cores:.1f}{mark} | {rec} |")
        rows.append(row)
        print(row, flush=True)

    def timed(fn, *a, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*a, **kw)
        return out, (time.perf_counter() - wall, time.process_time() - cpu)

    for n_items in args.items:
        items = random_unit(n_items, args.dim, seed=n_items)
        t0 = time.perf_counter()
        flat = build_index(items, "exact", normalize=False, use_gpu=False)
        flat_build = f"{time.perf_counter() - t0:.1f}"
        hnsw = None
        if "hnsw" in args.methods and n_items > args.hnsw_max_items:
            print(f"# HNSW skipped for {n_items:,} items (> --hnsw-max-items)", flush=True)
        elif "hnsw" in args.methods:
            hnsw, (wall, cpu) = timed(
                build_index, items, "hnsw", normalize=False, use_gpu=False, hnsw_m=args.hnsw_m,
                ef_construction=args.ef_construction, ef_search=args.ef_search[0],
            )
            hnsw_build = f"{wall:.1f} wall / {cpu / cores:.1f} CPU/cores"
            print(f"# HNSW build over {n_items:,} items: {hnsw_build}", flush=True)
        # one measurement per measured-user count, shared by the configurations that need it
        measurements: dict[int, list[tuple[str, str, tuple[float, float], str]]] = {}
        for n_users in args.users:
            measured = min(n_users, max(1000, int(args.pair_budget // n_items)))
            if measured not in measurements:
                measurements[measured] = results = []
                queries = random_unit(measured, args.dim, seed=10**9 + measured)
                (_, exact), t = timed(search, flat, queries, args.k, args.batch_size,
                                      show_progress=False)
                results.append(("faiss_exact", flat_build, t, "1 (ref)"))
                if "torch" in args.methods:
                    (_, ids), t = timed(torch_topk_search, items, queries, args.k, device="cpu",
                                        show_progress=False)
                    results.append(("torch matmul+topk", "0", t, f"{recall(ids, exact):.4f}"))
                for ef in args.ef_search if hnsw is not None else []:
                    hnsw.params["ef_search"] = ef
                    (_, ids), t = timed(search, hnsw, queries, args.k, args.batch_size,
                                        show_progress=False)
                    results.append((f"hnsw efSearch={ef}", hnsw_build, t,
                                    f"{recall(ids, exact):.4f}"))
            for method, build, t, rec in measurements[measured]:
                if method != "faiss_exact" or "faiss_exact" in args.methods:
                    emit(n_items, n_users, measured, method, build, t, rec)
        del flat, hnsw, items

    footer = ["", f"- load average at end: {load()}"]
    print("\n".join(footer))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(header + rows + footer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
