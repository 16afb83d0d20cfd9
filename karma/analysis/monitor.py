"""Training-time probe: attention-sink and fidelity numbers of a small fixed set of users.

It is handed to the train loop as a factory, `train(cfg, monitor=SinkMonitor.from_config)` (the
CLI does so when train.monitor_every > 0); the loop builds one monitor on rank 0 and calls it every
step (it acts every `every` steps) with the unwrapped model (no DDP forward, no collectives, no
RNG drawn):

    monitor = SinkMonitor.from_config(cfg, prepared)   # cfg.train.monitor_every=0: no-op
    record.update(monitor(model, step) or {})

    probe(model, probe_batch)  # -> {"sink_rate_first": ..., "emb_to_first_mass": ...,
                               #     "fidelity_token_f1": ..., ...}

A warning is logged when `sink_rate_first_emb` (share of (layer, head) where `<EMB>` puts more
than eps of its attention on the first token) rises from below to above
`cfg.train.sink_warn_threshold` between two probes (see `SinkMonitor`).
The first-token sink rate over all queries (`sink_rate_first`, Gu et al.) is a property of the
pretrained LM and barely moves in fine-tuning; `<EMB>`'s own row is what collapses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from karma.analysis.collect import collect_emb_attention, eager_attention, summarize_attention
from karma.analysis.fidelity import text_metrics
from karma.inference import decode_from_embedding, encode_catalog, encode_users

logger = logging.getLogger(__name__)

WARN_KEY = "sink_rate_first_emb"
SUMMARY_KEYS = (
    "sink_rate_first",
    "sink_rate_first_emb",
    "sink_rate_history",
    "emb_to_first_mass",
    "entropy",
    "entropy_norm",
    "top1_share",
    "gini",
)


@dataclass
class ProbeBatch:
    """A few users in a small local catalog: only the probe's items are encoded each time.

    histories index into `item_texts` (local indices, not the dataset's item_idx).
    """

    histories: list[list[int]]
    queries: list[str]
    targets: list[int]
    item_texts: list[str]
    target_categories: list[list[str]]
    image_features: np.ndarray | None = None  # (len(item_texts), D) for a model with images
    item_ids: list[int] | None = None  # each local item's index in the catalog


def build_probe_batch(
    examples, items, n_users: int = 32, seed: int = 0, image_features: np.ndarray | None = None
) -> ProbeBatch:
    """Pick `n_users` examples (seeded, without replacement) and remap their items to a local
    catalog. `examples`: karma.data.Examples; `items`: karma.data.ItemTable; `image_features`:
    the catalog's (n_items, D) features when the model reads images."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(examples), size=min(n_users, len(examples)), replace=False))
    used = sorted(
        {i for r in rows for i in examples.histories[r]} | {int(examples.targets[r]) for r in rows}
    )
    local = {item: j for j, item in enumerate(used)}
    return ProbeBatch(
        histories=[[local[i] for i in examples.histories[r]] for r in rows],
        queries=[examples.queries[r] for r in rows],
        targets=[local[int(examples.targets[r])] for r in rows],
        item_texts=[items.texts[i] for i in used],
        target_categories=[list(items.categories[int(examples.targets[r])]) for r in rows],
        image_features=None if image_features is None else image_features[used],
        item_ids=used,
    )


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    probe_batch: ProbeBatch,
    eps: float = 0.3,
    decode: bool = True,
    max_new_tokens: int = 24,
) -> dict[str, float]:
    """Sink metrics (means over layers, see `summarize_attention`) and, with `decode`, the
    fidelity of greedy text decoded from R(u) (`fidelity_token_f1`, `fidelity_rouge_l`,
    `fidelity_exact_match`). Leaves the model in the train/eval mode it was in."""
    was_training = model.training
    model.eval()
    try:
        catalog = encode_catalog(
            model, probe_batch.item_texts, image_features=probe_batch.image_features,
            progress=False, item_ids=probe_batch.item_ids,
        )
        with eager_attention(model.base_lm):
            attention = collect_emb_attention(
                model,
                probe_batch.histories,
                probe_batch.queries,
                catalog,
                probe_batch.item_texts,
                progress=False,
            )
        summary = summarize_attention(attention, eps=eps)
        out = {k: float(summary[k]) for k in SUMMARY_KEYS}
        if decode:
            user_emb = encode_users(
                model,
                probe_batch.histories, probe_batch.queries, catalog, probe_batch.item_texts
            )
            decoded = decode_from_embedding(model, user_emb, max_new_tokens=max_new_tokens)
            targets = [probe_batch.item_texts[t] for t in probe_batch.targets]
            scores = text_metrics(decoded, targets, probe_batch.target_categories)
            out.update({f"fidelity_{k}": v for k, v in scores.items()})
    finally:
        model.train(was_training)
    return out


class SinkMonitor:
    """Calls `probe` every `every` steps and warns when a sink rate rises above a threshold.

    `monitor(model, step)` returns the probe's dict (keys prefixed `monitor/`, plus
    `monitor/sink_warning` 1.0 on the probe that crossed) on probe steps, else None.
    `is_main=False` makes it a no-op, so every rank may call it.

    The warning fires when `warn_key` goes from <= threshold at one probe to > threshold at the
    next. A value already above the threshold at the first probe is logged at INFO only: a
    pretrained LM has first-token sinks before any fine-tuning (SmolLM2-135M: `<EMB>` sink rate
    0.80 on a handful of ML-100K-like prompts), and a warning every run would be noise.
    """

    def __init__(
        self,
        probe_batch: ProbeBatch,
        every: int,
        warn_threshold: float = 0.5,
        eps: float = 0.3,
        decode: bool = True,
        is_main: bool = True,
        warn_key: str = WARN_KEY,
    ) -> None:
        if warn_key not in SUMMARY_KEYS:
            raise ValueError(f"warn_key must be one of {SUMMARY_KEYS}, got {warn_key!r}")
        self.probe_batch = probe_batch
        self.every = every
        self.warn_threshold = warn_threshold
        self.eps = eps
        self.decode = decode
        self.is_main = is_main
        self.warn_key = warn_key
        self.history: list[tuple[int, dict[str, float]]] = []

    @classmethod
    def from_config(cls, cfg, prepared, is_main: bool = True, n_users: int = 32) -> SinkMonitor:
        """Probe users from the validation split, seeded by cfg.train.seed."""
        batch = build_probe_batch(
            prepared.split("valid"), prepared.items, n_users=n_users, seed=cfg.train.seed,
            image_features=prepared.model_image_features(cfg.model.image_dim),
        )
        return cls(
            batch,
            every=cfg.train.monitor_every,
            warn_threshold=cfg.train.sink_warn_threshold,
            is_main=is_main,
        )

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float] | None:
        if not self.is_main or self.every <= 0 or step % self.every != 0:
            return None
        metrics = probe(model, self.probe_batch, eps=self.eps, decode=self.decode)
        value = metrics[self.warn_key]
        above = value > self.warn_threshold
        previous = self.history[-1][1][self.warn_key] if self.history else None
        crossed = above and previous is not None and previous <= self.warn_threshold
        if crossed:
            logger.warning(
                "step %d: %s rose from %.2f to %.2f (> %.2f): in most heads <EMB> now puts more "
                "than %.2f of its attention on one key (semantic collapse?)",
                step,
                self.warn_key,
                previous,
                value,
                self.warn_threshold,
                self.eps,
            )
        elif above and previous is None:
            logger.info(
                "step %d: %s = %.2f already above %.2f at the first probe (pretrained sinks)",
                step,
                self.warn_key,
                value,
                self.warn_threshold,
            )
        metrics["sink_warning"] = float(crossed)
        self.history.append((step, metrics))
        return {f"monitor/{k}": v for k, v in metrics.items()}
