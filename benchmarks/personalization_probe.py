"""Probe behind train.objective=sequence: dense next-item readouts over whole ML-100K user
sequences (no query), lower 26 SmolLM2 layers frozen and cached once, top layers trained (full
fine-tune here), standardized catalog states, full-catalog softmax, optional item IDs.

    karma data prepare --config configs/ml100k.yaml
    PYTHONPATH=. python benchmarks/personalization_probe.py --steps 150 --ids 1 \
        --cache runs/proto/lower26_w.pt

Prints one JSON line: test HR@10 with each user's own history and with another user's history
(seeded permutation). Measured on the 2-core CPU (shared, load ~6): see docs/decisions.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from karma.config import load_config
from karma.data import load_prepared
from karma.inference import encode_catalog
from karma.metrics import compute_metrics, rank_with_mask
from karma.model import build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--freeze", type=int, default=26)  # frozen, cached lower layers
    ap.add_argument("--ids", type=int, default=0)
    ap.add_argument("--whiten", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head_lr", type=float, default=1e-3)
    ap.add_argument("--max_len", type=int, default=200)
    ap.add_argument("--id_dropout", type=float, default=0.1)
    ap.add_argument("--cache", default="")  # where the lower-layer states are kept
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(
        "configs/ml100k.yaml", ["model.history_source=cache", f"model.freeze_layers={args.freeze}"]
    )
    data = load_prepared(cfg.data.prepared_dir)
    model = build_model(cfg)
    texts = list(data.items.texts)
    n_items = len(texts)
    test = data.split("test")
    seqs = [list(s)[-(args.max_len + 1) :] for s in test.seen]  # train part + valid item
    targets_test = np.asarray(test.targets, dtype=np.int64)
    seen_test = [list(s) for s in test.seen]
    t0 = time.time()

    if os.path.exists("runs/proto/catalog.pt"):
        h = torch.load("runs/proto/catalog.pt")
    else:
        h = encode_catalog(model, texts, batch_size=64, progress=False).item_hidden.float()
        torch.save(h, "runs/proto/catalog.pt")
    mu, sd = h.mean(0), h.std(0) + 1e-6
    hw = (h - mu) / sd if args.whiten else h
    print(f"catalog {time.time() - t0:.0f}s")
    lf = args.freeze
    prefix = model.prompt.bos + model.prompt.history_first_ids
    P = len(prefix)
    with torch.no_grad():
        x_all = model.history_proj(hw)  # (N, d)
        pre_emb = model.embed_tokens(torch.tensor([prefix]))[0]  # (P, d)
    # lower cache
    t0 = time.time()
    cache_states = []
    if args.cache and os.path.exists(args.cache):
        cache_states = torch.load(args.cache)
    else:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        cache_states = [None] * len(seqs)
        with torch.no_grad():
            for s in range(0, len(order), 16):
                idx = order[s : s + 16]
                T = P + max(len(seqs[i]) for i in idx)
                emb = torch.zeros(len(idx), T, pre_emb.shape[1])
                mask = torch.zeros(len(idx), T, dtype=torch.long)
                for b, i in enumerate(idx):
                    n = P + len(seqs[i])
                    emb[b, :P] = pre_emb
                    emb[b, P:n] = x_all[torch.tensor(seqs[i])]
                    mask[b, :n] = 1
                out = model.run_lower(emb, mask)
                for b, i in enumerate(idx):
                    cache_states[i] = out[b, : P + len(seqs[i])].clone()
        if args.cache:
            torch.save(cache_states, args.cache)
    print(f"lower cache {time.time() - t0:.0f}s")
    d = pre_emb.shape[1]
    k = cfg.model.emb_dim
    train_count = np.zeros(n_items)
    for s in seqs:
        for i in s[:-1]:
            train_count[i] += 1
    known = torch.tensor(train_count > 0)
    hist_id = nn.Embedding(n_items, d)
    item_id = nn.Embedding(n_items, k)
    nn.init.zeros_(hist_id.weight)
    nn.init.zeros_(item_id.weight)
    log_tau = nn.Parameter(torch.tensor(np.log(0.05), dtype=torch.float32))
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = model.base_lm.get_decoder()
    top_params = [p for layer in decoder.layers[lf:] for p in layer.parameters()]
    top_params += list(decoder.norm.parameters())
    for p in top_params:
        p.requires_grad_(True)
    heads = list(model.user_proj.parameters()) + list(model.item_proj.parameters()) + [log_tau]
    if args.ids:
        heads += [hist_id.weight, item_id.weight]
    for p in heads:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": top_params, "lr": args.lr}, {"params": heads, "lr": args.head_lr}],
        weight_decay=0.0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1, (s + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1, s / args.steps))))
        ),
    )

    def item_emb(train):
        z = model.item_proj(hw)
        if args.ids:
            ids = item_id.weight
            if not train:
                ids = ids * known[:, None]
            z = z + ids
        return F.normalize(z.float(), dim=-1)

    def run_top(users, train, which):
        """Readouts (R, k) and targets."""
        T = max(cache_states[u].shape[0] for u in users)
        emb = torch.zeros(len(users), T, d)
        mask = torch.zeros(len(users), T, dtype=torch.long)
        for b, u in enumerate(users):
            st = cache_states[u]
            emb[b, : st.shape[0]] = st
            mask[b, : st.shape[0]] = 1
            if args.ids:
                it = torch.tensor(seqs[u])
                ide = hist_id(it)
                if train:
                    keep = (torch.rand(len(it)) > args.id_dropout).float()[:, None]
                    ide = ide * keep
                else:
                    ide = ide * known[it][:, None]
                emb[b, P : st.shape[0]] = emb[b, P : st.shape[0]] + ide
        return model.run_from_layer(emb, mask, lf)

    n_users = len(seqs)
    rng = np.random.default_rng(0)
    t0 = time.time()
    losses = []
    perm = rng.permutation(n_users)
    ptr = 0
    for step in range(args.steps):
        if ptr + args.batch > n_users:
            perm, ptr = rng.permutation(n_users), 0
        users = perm[ptr : ptr + args.batch].tolist()
        ptr += args.batch
        hid = run_top(users, True, None)
        rows, cols, tg = [], [], []
        for b, u in enumerate(users):
            n_tr = len(seqs[u]) - 1  # train part length
            for t in range(n_tr - 1):
                rows.append(b)
                cols.append(P + t)
                tg.append(seqs[u][t + 1])
        r = hid[torch.tensor(rows), torch.tensor(cols)]
        ue = F.normalize(model.user_proj(r).float(), dim=-1)
        ie = item_emb(True)
        tau = log_tau.clamp(np.log(0.01), 0).exp()
        loss = F.cross_entropy(ue @ ie.T / tau, torch.tensor(tg))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            print(
                f"step {step} loss {np.mean(losses[-10:]):.3f} tau {tau.item():.3f} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    train_s = time.time() - t0
    with torch.no_grad():
        ue_all = []
        order = list(range(n_users))
        for s in range(0, n_users, 32):
            users = order[s : s + 32]
            hid = run_top(users, False, None)
            pos = torch.tensor([P + len(seqs[u]) - 1 for u in users])
            ue_all.append(
                F.normalize(model.user_proj(hid[torch.arange(len(users)), pos]).float(), dim=-1)
            )
        ue_all = torch.cat(ue_all)
        ie = item_emb(False)
        res = {}
        for name, uemb in (
            ("own", ue_all),
            ("other", ue_all[torch.as_tensor(np.random.default_rng(1).permutation(n_users))]),
        ):
            scores = uemb @ ie.T
            ts, ti = rank_with_mask(scores, 11, seen=seen_test, targets=targets_test)
            res[name] = compute_metrics(ti, targets_test, (10,), scores=ts)
    print(
        json.dumps(
            {
                "args": vars(args),
                "train_s": train_s,
                "final_loss": float(np.mean(losses[-10:])),
                **res,
            }
        )
    )


if __name__ == "__main__":
    main()
