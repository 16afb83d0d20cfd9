"""Batch-1 latency of one user embedding (query + 20-item history): the plain forward vs the
fast paths of karma/fast_user.py, in one run (about 1 minute on 2 idle cores, 3 under load).

    nice -n -5 env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/serve_latency.py \
        --runtime onnx,onnx-int8 --out benchmarks/results/serve_latency_cpu.md
    .venv/bin/python benchmarks/serve_latency.py --backbone tiny-random --iters 5   # smoke

The model is built from the config (backbone SmolLM2-135M, random karma heads: latency and the
parity of the fast path with the plain one do not depend on trained heads, so no checkpoint is
needed) over a synthetic 64-item catalog. Each timed call encodes one request end to end
(prompt building, tokenization, embedding, forward, u). Variants, per prompt layout
(model.prompt_layout: query_first, history_first):

- plain: `karma.inference.encode_users`, the training-time path (a plain HF forward of the
  whole prompt);
- new user: nothing cached for this user (the fixed text, and in the query-first layout a
  query another user sent before, come from the shared prefixes);
- returning user, new query: the user's prompt key/values are cached, the query is new;
- returning user, new click: the same query, one more item at the end of the history;
- no query, new click: the recommendation case (no query), one more item;
- batch of 8 new users: one `encode` call for 8 requests (dynamic batching), per request;
- with `--lowp`: int8 (the decoder's Linear layers dynamically quantized, torch.ao) and bf16
  (the whole model) for the returning user's new query, to see what they cost in cosine;
- with `--runtime onnx,onnx-int8` (serve.runtime): the four fast request kinds and the batch
  again, with the decoder exported to ONNX Runtime with fp32 or int8 weights
  (karma/onnx_decoder.py; the first run exports it, about 2 minutes, then it is cached).

Every variant reports p50/p95/p99 over `--iters` calls (after 3 warm-up calls, all variants
interleaved call by call so that other jobs' load falls on all alike) and the minimum cosine of
its u with the plain path's u on the same inputs (target >= 0.999). The CPU may be shared: the
load average before and after the timed calls goes into the results.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from karma.config import load_config
from karma.fast_user import FastUserEncoder, plain_user_embeddings
from karma.inference import encode_catalog
from karma.model import build_model
from karma.onnx_decoder import INT8_ACCURACY_LEVEL, INT8_BLOCK, RUNTIMES
from karma.report import shared_cpu_run

QUERIES = [
    "comedy films from the nineties", "dark crime thriller", "animated movies for kids",
    "romantic drama set in paris", "science fiction space adventure", "classic western",
    "war documentary", "horror with a twist ending", "musical with great songs",
    "heist film with an ensemble cast",
]
HISTORY = 20
N_ITEMS = 64  # the catalog only supplies h_i for history tokens; its size does not matter here


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def time_round_robin(cases: list[tuple], n: int, desc: str) -> dict[str, dict]:
    """Call i of every case in turn (setup i untimed first), so that the load of other jobs on a
    shared machine falls on all variants alike; the first 3 rounds are warm-up.
    cases: (name, setups, calls, encoder or None). Returns per name: ms, outputs, tokens run."""
    out = {name: {"ms": [], "outs": [], "run": []} for name, *_ in cases}
    for i in tqdm(range(n), desc=desc, leave=False):
        for name, setups, calls, enc in cases:
            setups[i]()
            before = enc.stats["tokens_run"] if enc is not None else 0
            start = time.perf_counter()
            u = calls[i]()
            elapsed = 1000 * (time.perf_counter() - start)
            if i >= 3:
                out[name]["ms"].append(elapsed)
                out[name]["outs"].append(u)
                if enc is not None:
                    out[name]["run"].append(enc.stats["tokens_run"] - before)
    return out


def run_layout(model, catalog, texts, layout: str, iters: int, rng: np.random.Generator,
               lowp: dict[str, object], runtimes: dict[str, FastUserEncoder]) -> list[dict]:
    n = iters + 3
    histories = [rng.choice(N_ITEMS, HISTORY + 1, replace=False).tolist() for _ in range(n)]
    queries = [QUERIES[i % len(QUERIES)] for i in range(n)]
    new_queries = [QUERIES[(i + 3) % len(QUERIES)] for i in range(n)]
    rows = []

    def plain(h, q):
        return lambda: plain_user_embeddings(model, [h], [q], catalog, texts)[0]

    def noop():
        return None

    def fast(e, h, q, key):
        return lambda: e.encode([h], [q], [key])[0]

    def warm(e, h, q, key):
        return lambda: e.encode([h], [q], [key])

    def returning_new_query(e, name):
        return (name,
                [warm(e, h[:HISTORY], q, f"q{i}") for i, (h, q) in
                 enumerate(zip(histories, queries))],
                [fast(e, h[:HISTORY], q, f"q{i}") for i, (h, q) in
                 enumerate(zip(histories, new_queries))],
                [(h[:HISTORY], q) for h, q in zip(histories, new_queries)], e)

    def fast_cases(e, prefix):
        """The request kinds of the fast path, on encoder e."""
        return [
            (f"{prefix}, new user (shared prefixes cached)", [noop] * n,
             [fast(e, h[:HISTORY], q, f"new{i}") for i, (h, q) in
              enumerate(zip(histories, queries))],
             [(h[:HISTORY], q) for h, q in zip(histories, queries)], e),
            returning_new_query(e, f"{prefix}, returning user, new query"),
            (f"{prefix}, returning user, new click",
             [warm(e, h[: HISTORY - 1], q, f"c{i}") for i, (h, q) in
              enumerate(zip(histories, queries))],
             [fast(e, h[:HISTORY], q, f"c{i}") for i, (h, q) in
              enumerate(zip(histories, queries))],
             [(h[:HISTORY], q) for h, q in zip(histories, queries)], e),
            (f"{prefix}, no query, new click",
             [warm(e, h[: HISTORY - 1], "", f"r{i}") for i, h in enumerate(histories)],
             [fast(e, h[:HISTORY], "", f"r{i}") for i, h in enumerate(histories)],
             [(h[:HISTORY], "") for h in histories], e),
        ]

    # (name, setups, calls, inputs (history, query) for the parity check, encoder)
    cases = [("plain forward (training path)", [noop] * n,
              [plain(h[:HISTORY], q) for h, q in zip(histories, queries)],
              [(h[:HISTORY], q) for h, q in zip(histories, queries)], None)]
    encoders = {"fast": FastUserEncoder(model, catalog, texts)}
    for runtime, enc in runtimes.items():
        enc.clear()  # the other layout's prefixes would never match, but take memory
        encoders[f"{runtime} fast"] = enc
    for prefix, enc in encoders.items():
        cases += fast_cases(enc, prefix)
    for kind, lowp_model in lowp.items():
        qenc = FastUserEncoder(lowp_model, catalog, texts)
        cases.append(returning_new_query(qenc, f"{kind} + returning user, new query"))

    timed = time_round_robin([(c[0], c[1], c[2], c[4]) for c in cases], n, layout)
    for name, _, _, inputs, _ in cases:
        reference = plain_user_embeddings(
            model, [h for h, _ in inputs[3:]], [q for _, q in inputs[3:]], catalog, texts
        )
        got = torch.stack(timed[name]["outs"])
        cos = F.cosine_similarity(got, reference, dim=-1).min().item()
        tokens = len(model.prompt.user(inputs[3][1], n_history=HISTORY)[0])
        run = timed[name]["run"]
        rows.append({"layout": layout, "variant": name, "ms": timed[name]["ms"], "cos": cos,
                     "T": tokens, "run": float(np.mean(run)) if run else float(tokens)})

    # dynamic batching: 8 new users in one call, time per request
    batch = 8
    for prefix, enc in encoders.items():
        times, coss = [], []
        for i in range(max(3, iters // 4) + 1):
            hs = [histories[(i * batch + j) % n][:HISTORY] for j in range(batch)]
            qs = [queries[(i * batch + j) % n] for j in range(batch)]
            keys = [f"b{i}-{j}" for j in range(batch)]
            start = time.perf_counter()
            out = enc.encode(hs, qs, keys)
            if i > 0:
                times.append(1000 * (time.perf_counter() - start) / batch)
                ref = plain_user_embeddings(model, hs, qs, catalog, texts)
                coss.append(F.cosine_similarity(out, ref, dim=-1).min().item())
        new_user = next(r for r in rows if r["variant"].startswith(f"{prefix}, new user"))
        rows.append({"layout": layout, "variant": f"{prefix}, batch of {batch} new users, per "
                     "request", "ms": times, "cos": min(coss), "T": rows[0]["T"],
                     "run": new_user["run"]})
    return rows


def quantized_copy(model):
    """The model with its decoder's Linear layers dynamically quantized to int8 (a copy)."""
    qmodel = copy.deepcopy(model)
    layers = qmodel.base_lm.get_decoder().layers
    torch.ao.quantization.quantize_dynamic(layers, {torch.nn.Linear}, dtype=torch.qint8,
                                           inplace=True)
    return qmodel


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--lowp", action="store_true", help="add the int8 and bf16 variants")
    parser.add_argument("--runtime", default="",
                        help="comma-separated ONNX Runtime variants of the fast path to add: "
                             "onnx, onnx-int8 (serve.runtime)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runtimes = [r for r in args.runtime.split(",") if r]
    unknown = set(runtimes) - set(RUNTIMES[1:])
    if unknown:
        parser.error(f"--runtime: unknown {sorted(unknown)}; choose from {RUNTIMES[1:]}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.backbone={args.backbone}", "model.emb_dim=256"])
    model = build_model(cfg).eval()
    texts = [f"Movie {i} ({1950 + i % 50}) | {QUERIES[i % len(QUERIES)].title()}"
             for i in range(N_ITEMS)]
    start = time.time()
    with torch.no_grad():
        catalog = encode_catalog(model, texts, batch_size=64)
        lowp = {} if not args.lowp else {
            "int8": quantized_copy(model), "bf16": copy.deepcopy(model).to(torch.bfloat16)
        }
        onnx = {r: FastUserEncoder(model, catalog, texts, runtime=r, num_threads=args.threads)
                for r in runtimes}
        load_start = os.getloadavg()
        rows = []
        for layout in ("query_first", "history_first"):
            # PromptFormat reads the layout from the model config at every call
            for m in (model, *lowp.values()):
                m.cfg.model.prompt_layout = layout
            rows += run_layout(model, catalog, texts, layout, args.iters,
                               np.random.default_rng(0), lowp, onnx)
        load_end = os.getloadavg()
    env, machine = shared_cpu_run(args.threads)
    loads = [" / ".join(f"{x:.1f}" for x in load) for load in (load_start, load_end)]
    lines = [
        "# Serving latency: one user embedding, batch 1, CPU",
        "",
        f"Command: `{env} .venv/bin/python benchmarks/serve_latency.py --backbone "
        f"{args.backbone} --iters {args.iters}" + (" --lowp" if args.lowp else "")
        + (f" --runtime {args.runtime}" if runtimes else "") + "`"
        f" (niceness {os.nice(0)})",
        f"Machine: {machine}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{time.time() - start:.0f} s.",
        f"Load average (1 / 5 / 15 min) when the timed calls started: {loads[0]}; when they "
        f"ended: {loads[1]}.",
        f"Model: {args.backbone} backbone built from the config with random karma heads (no "
        f"checkpoint: latency and fast-vs-plain parity do not depend on trained heads), "
        f"emb_dim 256; request = query + {HISTORY}-item history; {args.iters} timed calls per "
        f"variant after 3 warm-up calls. cos = minimum cosine of u with the plain path on the "
        f"same inputs (target >= 0.999). T = prompt tokens; tokens run = mean tokens "
        f"through the decoder per call (the rest comes from the caches).",
        *([f"onnx / onnx-int8: the fast path with its decoder in ONNX Runtime "
           f"{onnxruntime_version()} (karma/onnx_decoder.py) with fp32 / int8 weights "
           f"(MatMulNBits, 8 bits, blocks of {INT8_BLOCK}, accuracy_level "
           f"{INT8_ACCURACY_LEVEL}: int8 activations per block), {args.threads} intra-op "
           f"threads."] if runtimes else []),
        "",
        "| layout | variant | T | tokens run | p50 ms | p95 ms | p99 ms | x plain p50 | min cos |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {}
    for r in rows:
        p50, p95, p99 = percentiles(r["ms"])
        base.setdefault(r["layout"], p50)
        lines.append(
            f"| {r['layout']} | {r['variant']} | {r['T']} | {r['run']:.1f} | {p50:.1f} | {p95:.1f} "
            f"| {p99:.1f} | "
            f"{base[r['layout']] / p50:.1f}x | {r['cos']:.6f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
