"""SASRec (Kang & McAuley, ICDM 2018), our own PyTorch implementation, trained with cross-entropy
over the full catalog (the stronger variant, RecBole's default `loss_type: CE`; the paper used
binary cross-entropy with one sampled negative).

    model = SASRec(n_items=1682, max_len=200, hidden=64, blocks=2, heads=2, dropout=0.2)
    hidden = model(seqs)                       # (B, T, d), seqs left-padded with 0, item i -> i + 1
    model, log = train_sasrec(data, cfg)       # best epoch on validation ndcg@10 (early stopping)
    user_emb, item_emb = encode_sasrec(model, sequences)   # score = user_emb @ item_emb.T

The model reads a user's FULL training sequence (the last `baseline.sasrec.max_len` items), not
the 20-item history that the LLM models see: that is the standard SASRec protocol (LlamaRec's
code uses max_len 200 on ML-100K too). Longer sequences are cut into windows whose targets do not
overlap, so every training interaction is a target exactly once per epoch. Positions are counted
back from the most recent item, so a batch only needs padding to its own longest sequence.

Seeded and deterministic on CPU: the same `train.seed` (and thread count, `train.num_threads`)
gives the same weights and metrics.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from karma.baselines.protocol import split_sequences, training_sequences
from karma.config import Config
from karma.split import training_windows


class SASRecBlock(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention, then a point-wise FFN."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, T, d); allowed (B, 1, T, T) bool, True where query t may attend to key s."""
        B, T, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
        # (B, T, d) -> (B, heads, T, d / heads)
        q, k, v = (t.view(B, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        # No dropout on the attention probabilities: on CPU it costs ~5x the attention itself.
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.attn_dropout(self.out(h.transpose(1, 2).reshape(B, T, d)))
        return x + self.ffn(self.ffn_norm(x))


class SASRec(nn.Module):
    """Item + learned positional embeddings, causal self-attention blocks, final layer norm.

    Index 0 is padding; catalog item `i` is token `i + 1`. The output item embedding is the input
    one (tied, as in the paper), so `score(u, i) = hidden[u, -1] . item_emb[i]`.
    """

    def __init__(
        self,
        n_items: int,
        max_len: int = 200,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 2,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.n_items = n_items
        self.max_len = max_len
        self.hidden = hidden
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        nn.init.normal_(self.item_emb.weight, std=hidden**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (B, T) int64, left-padded with 0 -> hidden states (B, T, d)."""
        B, T = seqs.shape
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {self.max_len}")
        pad = seqs == 0  # (B, T)
        # Position 0 is the most recent item (the last column), whatever the padding length.
        positions = torch.arange(T - 1, -1, -1, device=seqs.device)
        x = self.item_emb(seqs) * math.sqrt(self.hidden) + self.pos_emb(positions)
        x = self.emb_dropout(x) * ~pad[..., None]
        causal = torch.ones(T, T, dtype=torch.bool, device=seqs.device).tril()
        # Padding keys are hidden; every query still sees itself, so a padding row is never empty.
        allowed = (causal & ~pad[:, None, :]) | torch.eye(T, dtype=torch.bool, device=seqs.device)
        allowed = allowed[:, None]  # (B, 1, T, T), broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * ~pad[..., None]
        return self.final_norm(x)

    def item_embeddings(self) -> torch.Tensor:
        """(N, d) output embeddings of the catalog, in item_idx order (padding row dropped)."""
        return self.item_emb.weight[1:]


def pad_left(seqs: list[list[int]], max_len: int) -> torch.Tensor:
    """Last `max_len` items of each sequence, shifted by +1 (0 = padding), left-padded: (B, T)."""
    seqs = [s[-max_len:] for s in seqs]
    T = max(1, max(len(s) for s in seqs))
    out = torch.zeros(len(seqs), T, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            out[row, T - len(seq) :] = torch.as_tensor(seq, dtype=torch.long) + 1
    return out


def make_windows(
    sequences: list[list[int]], max_len: int, last_only: bool = False
) -> list[list[int]]:
    """Each sequence cut into windows of up to max_len + 1 items (`karma.split.training_windows`):
    every transition once, or with last_only the newest window of each sequence only."""
    return [
        seq[start:end]
        for seq in sequences
        for start, end in training_windows(len(seq), max_len, last_only)
    ]


def length_bucketed_batches(
    windows: list[list[int]], batch_size: int, generator: torch.Generator, bucket: int = 4
) -> list[list[int]]:
    """Shuffled batches of window indices with little padding: shuffle, sort each run of
    `bucket` batches by length, cut into batches, shuffle the batch order."""
    order = torch.randperm(len(windows), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size * bucket):
        chunk = sorted(order[start : start + batch_size * bucket], key=lambda i: len(windows[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def sasrec_loss(model: SASRec, windows: list[list[int]]) -> torch.Tensor:
    """Mean cross-entropy of the next item over the full catalog, at every non-padded position."""
    batch = pad_left(windows, model.max_len + 1)  # (B, T + 1)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    hidden = model(inputs)  # (B, T, d)
    keep = (inputs != 0) & (labels != 0)
    logits = hidden[keep] @ model.item_embeddings().T  # (M, N)
    return F.cross_entropy(logits, labels[keep] - 1)


@torch.no_grad()
def encode_sasrec(
    model: SASRec, sequences: list[list[int]], batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """User embedding = hidden state at the most recent item; item embedding = the output table.

    Returns (user_emb (B, d), item_emb (N, d)) as float32, unnormalized (scores are dot products).
    """
    was_training = model.training
    model.eval()
    users = []
    for start in range(0, len(sequences), batch_size):
        seqs = pad_left(sequences[start : start + batch_size], model.max_len)
        users.append(model(seqs)[:, -1])  # (B, d): left padding puts the last item in column -1
    model.train(was_training)
    user_emb = torch.cat(users) if users else torch.zeros(0, model.hidden)
    return user_emb.float().numpy(), model.item_embeddings().detach().float().numpy().copy()


def train_sasrec(data, cfg: Config, log_path: str | Path | None = None) -> tuple[SASRec, list]:
    """Train on every user's training sequence; keep the epoch with the best validation ndcg@10.

    Validation uses the same protocol as the test (full catalog, `eval.mask_history`) through
    `karma.evaluate.evaluate_embeddings`. Stops after `baseline.sasrec.patience` epochs without a
    gain. Returns the best model (eval mode) and one log record per epoch (also appended to
    `log_path` as JSON lines when given).
    """
    from karma.baselines.protocol import evaluate_split, primary_metrics

    s = cfg.baseline.sasrec
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    sequences = list(training_sequences(data).values())
    windows = make_windows(sequences, s.max_len, last_only=s.windows == "last")
    valid = data.split("valid")
    valid_cfg = copy.deepcopy(cfg)
    valid_cfg.eval.ks = sorted(set(cfg.eval.ks) | {10})  # model selection is on ndcg@10
    valid_seqs = split_sequences(data, valid, "valid")
    model = SASRec(data.items.n_items, s.max_len, s.hidden, s.blocks, s.heads, s.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    best_score, best_state, best_epoch, log = -1.0, None, 0, []
    if log_path is not None:
        Path(log_path).write_text("")
    bar = tqdm(range(1, s.epochs + 1), desc="sasrec", unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        for batch in length_bucketed_batches(windows, s.batch_size, generator):
            loss = sasrec_loss(model, [windows[i] for i in batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        user_emb, item_emb = encode_sasrec(model, valid_seqs)
        metrics = primary_metrics(evaluate_split(user_emb, item_emb, valid, valid_cfg))
        score = metrics["ndcg@10"]
        record = {
            "epoch": epoch,
            "loss": total / len(windows),
            "valid_ndcg@10": score,
            "valid_hr@10": metrics["hr@10"],
            "seconds": time.perf_counter() - t0,
        }
        log.append(record)
        if log_path is not None:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{record['loss']:.3f}", ndcg10=f"{score:.4f}", best=best_epoch)
        if epoch - best_epoch >= s.patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), log
