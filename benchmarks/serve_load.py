"""Load test of `karma serve` on the loopback address: throughput and latency at 1, 8 and 32
concurrent clients, and a count of 5xx answers (must be zero).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_load.py \
        --out benchmarks/results/serve_load_cpu.md                      # tiny-random + smollm2
    .venv/bin/python benchmarks/serve_load.py --backbones tiny-random --duration 5   # smoke
    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/train/checkpoints/best
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_load.py --backbones smollm2-135m \
        --runtimes torch onnx --out benchmarks/results/serve_load_onnx_cpu.md  # serve.runtime

Without --checkpoint, a checkpoint is made per backbone from configs/debug.yaml (ML-100K, the
debug prepared data) with that backbone and random karma heads (throughput does not depend on
trained weights). The server is started as a subprocess (`python -m karma serve`, bound to
127.0.0.1 only), its catalog encoded once before the clock starts. Clients are asyncio tasks
sharing one httpx connection pool; each sends `POST /search` (a random user of the dataset, a
random genre query, k=10) back to back. Every level is bounded both in time (`--duration` s) and
in requests (`--max-requests`). The per-user key/value cache (serve.user_cache_size=256 of 943
users) sees a mix of hits and misses, and most requests bring a query the user's cache has not
seen, as in a live search box.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["Comedy", "Drama", "Action", "Thriller", "Romance", "Sci-Fi", "Horror", "Children's",
           "Animation", "War", "Western", "Musical", "Crime", "Film-Noir", "Documentary"]
HOST = "127.0.0.1"  # loopback only: this benchmark never listens on or calls another address


def make_checkpoint(backbone: str, out: Path) -> Path:
    """configs/debug.yaml with `backbone`, random heads, saved as a checkpoint (no training)."""
    import torch

    from karma.checkpoint import save_checkpoint
    from karma.config import load_config
    from karma.data import prepare_dataset
    from karma.model import build_model

    cfg = load_config(ROOT / "configs" / "debug.yaml", [
        f"model.backbone={backbone}", f"data.prepared_dir={out / 'data'}",
        "eval.batch_size=32",
    ])
    prepare_dataset(cfg)
    torch.manual_seed(0)
    save_checkpoint(out / "ckpt", build_model(cfg).eval(), None, None, 0, cfg)
    return out / "ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, threads: int, runtime: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "karma", "serve", "--checkpoint", str(checkpoint),
           f"serve.host={HOST}", f"serve.port={port}", f"serve.num_threads={threads}",
           f"serve.runtime={runtime}"]
    log = open(checkpoint.parent / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start; see {checkpoint.parent / 'server.log'}")
        time.sleep(0.5)


async def run_level(base: str, users: list[str], clients: int, duration: float,
                    max_requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    server_ms: list[float] = []  # the handler's own latency_ms: queueing + batch + search
    statuses: dict[int, int] = {}
    sent = 0
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.perf_counter() < stop_at and sent < max_requests:
            sent += 1
            body = {"user_id": rng.choice(users), "query": rng.choice(QUERIES), "k": 10}
            start = time.perf_counter()
            try:
                r = await c.post("/search", json=body)
                code = r.status_code
                if code == 200:
                    server_ms.append(r.json()["latency_ms"])
            except httpx.HTTPError:
                code = 0  # transport failure: counted, never hidden
            latencies.append(1000 * (time.perf_counter() - start))
            statuses[code] = statuses.get(code, 0) + 1

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    s50, s99 = np.percentile(server_ms, [50, 99]) if server_ms else (np.nan, np.nan)
    return {"server_p50": s50, "server_p99": s99, "clients": clients,
            "requests": len(latencies), "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50": p50, "p95": p95, "p99": p99,
            "statuses": statuses, "errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
            "failed": statuses.get(0, 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny-random", "smollm2-135m"])
    parser.add_argument("--checkpoint", default=None, help="serve this checkpoint instead")
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--max-requests", type=int, default=3000, help="requests per level")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--runtimes", nargs="+", default=["torch"],
                        choices=["torch", "onnx", "onnx-int8"],
                        help="serve.runtime of the server's decoder (karma/onnx_decoder.py), "
                        "one server each")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    start = time.time()
    sections = []
    bad = 0
    with tempfile.TemporaryDirectory(prefix="karma-load-") as tmp:
        targets = ([("checkpoint", Path(args.checkpoint))] if args.checkpoint else
                   [(b, None) for b in args.backbones])
        made: dict[str, Path] = {}  # one checkpoint per backbone, served by each runtime
        for (name, ckpt), runtime in itertools.product(targets, args.runtimes):
            if ckpt is None and name not in made:
                print(f"making a {name} checkpoint from configs/debug.yaml ...", flush=True)
                made[name] = make_checkpoint(name, Path(tmp) / name)
            ckpt = ckpt or made[name]
            port = free_port()
            t0 = time.time()
            proc = start_server(ckpt, port, args.threads, runtime)
            startup = time.time() - t0
            base = f"http://{HOST}:{port}"
            try:
                users = httpx.get(base + "/users?limit=500").json()["users"]
                rows = []
                for level in args.levels:
                    print(f"{name} ({runtime}): {level} clients ...", flush=True)
                    rows.append(asyncio.run(run_level(base, users, level, args.duration,
                                                      args.max_requests, seed=level)))
                    r = rows[-1]
                    print(f"  {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, "
                          f"p99 {r['p99']:.0f} ms, statuses {r['statuses']}", flush=True)
                    bad += r["errors_5xx"] + r["failed"]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            sections.append((name, runtime, startup, rows))

    from karma.report import shared_cpu_run

    env, machine = shared_cpu_run(args.threads)
    lines = [
        "# Serving load test: POST /search on the loopback address, CPU",
        "",
        f"Command: `{env} .venv/bin/python benchmarks/serve_load.py "
        + (f"--checkpoint {args.checkpoint} " if args.checkpoint else
           f"--backbones {' '.join(args.backbones)} ")
        + f"--runtimes {' '.join(args.runtimes)} --levels {' '.join(map(str, args.levels))} "
        f"--duration {args.duration:g} "
        f"--max-requests {args.max_requests}`",
        f"Machine: {machine} in the server, clients on the same cores; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {time.time() - start:.0f} s in all.",
        "Server: `karma serve` (uvicorn, one model worker with dynamic batching and the prefix "
        "key/value caches, exact FAISS index) over ML-100K (1,682 items, 943 users) with the "
        "configs/debug.yaml model and the named backbone, random karma heads. Requests: a random "
        "user, a random genre query, k=10, back to back per client; each level bounded by "
        f"{args.duration:g} s and {args.max_requests} requests. Latency is client-side; server = "
        "the handler's own time (queueing for the model worker, the batch, the index search).",
        "",
        "| backbone | runtime | clients | requests | req/s | p50 ms | p95 ms | p99 ms "
        "| server p50 / p99 ms | 5xx | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runtime, _, rows in sections:
        for r in rows:
            lines.append(
                f"| {name} | {runtime} | {r['clients']} | {r['requests']} | {r['rps']:.1f} "
                f"| {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['server_p50']:.0f} / "
                f"{r['server_p99']:.0f} | {r['errors_5xx']} | {r['failed']} |"
            )
    lines.append("")
    for name, runtime, startup, _ in sections:
        lines.append(f"- {name} ({runtime}): server start (model load, catalog encoding"
                     f"{', decoder export' if runtime != 'torch' else ''}) {startup:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
