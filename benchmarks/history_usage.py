"""Does a trained user tower use the click history, or only the query?

    python benchmarks/history_usage.py --checkpoint runs/demo/karma/checkpoints/best \
        --prepared runs/demo/data/ml-100k-genre --out benchmarks/results/history_usage_cpu.md

Two measurements on the test users of the prepared dataset:
1. retrieval with each user's own history vs with another user's history (a fixed seeded
   permutation), same queries: if the metrics barely move, the history is not used;
2. how distinguishable the history soft tokens are: mean pairwise cosine of h_i (item tower
   output), of x_i = P_h(h_i) (what the LLM reads for each history item), of e_i, and of real
   word embeddings for reference. Soft tokens that all point the same way cannot carry identity.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from karma.checkpoint import load_model
from karma.data import load_prepared
from karma.inference import encode_catalog, encode_users
from karma.metrics import compute_metrics, mean_pairwise_cosine, rank_with_mask
from karma.report import device_name


def retrieval(model, catalog, histories, examples, texts) -> dict[str, float]:
    user_emb = encode_users(model, histories, examples.queries, catalog, texts, batch_size=64)
    scores = (user_emb @ catalog.item_emb.T).numpy()
    top_scores, top_ids = rank_with_mask(scores, 11, seen=examples.seen, targets=examples.targets)
    return compute_metrics(top_ids, examples.targets, [10], scores=top_scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prepared", required=True, help="prepared dataset directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cosine-items", type=int, default=300)
    parser.add_argument("--out", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.time()
    model, cfg = load_model(args.checkpoint)
    data = load_prepared(args.prepared)
    test = data.split("test")
    texts = list(data.items.texts)
    with torch.no_grad():
        catalog = encode_catalog(model, texts, batch_size=128)
        perm = np.random.default_rng(0).permutation(len(test))
        own = retrieval(model, catalog, test.histories, test, texts)
        other = retrieval(model, catalog, [test.histories[j] for j in perm], test, texts)
        hidden = catalog.item_hidden[: args.cosine_items]
        word = model.base_lm.get_input_embeddings().weight[:5000]
        cosines = {
            "h_i (item tower output)": mean_pairwise_cosine(hidden),
            "x_i = P_h(h_i) (history soft token)": mean_pairwise_cosine(
                model.history_proj(model.condition(hidden))),
            "e_i (item embedding)": mean_pairwise_cosine(catalog.item_emb[: args.cosine_items]),
            "word embeddings (first 5,000 tokens)": mean_pairwise_cosine(word),
        }
    lines = [
        f"## {args.checkpoint} on {args.prepared}",
        "",
        f"Machine: {device_name()}; {len(test)} test users, {data.items.n_items} items, seen items "
        f"masked, pessimistic ties; preset {cfg.loss.preset}, query mode "
        f"{data.stats.get('query_mode', cfg.data.query_mode)}; {time.time() - t0:.0f} s.",
        "",
        "| history given to the user tower | hr@10 | ndcg@10 |",
        "| --- | ---: | ---: |",
        f"| the user's own | {own['hr@10']:.4f} | {own['ndcg@10']:.4f} |",
        f"| another user's (seeded permutation) | {other['hr@10']:.4f} | {other['ndcg@10']:.4f} |",
        "",
        f"| vectors ({args.cosine_items} items) | mean pairwise cosine |",
        "| --- | ---: |",
        *[f"| {name} | {value:.4f} |" for name, value in cosines.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
