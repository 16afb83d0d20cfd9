"""Optimizer and learning-rate schedule of the training loop (and of the post hoc R fit).

    optimizer = build_optimizer(objective, cfg)     # AdamW, backbone at lr, heads at head_lr
    scheduler = build_scheduler(optimizer, cfg)     # linear warmup, cosine decay to a floor

Two rates because the backbone is pretrained and the heads (projections, R, g, the special
embeddings, the temperature) start from scratch. No weight decay on biases, norms, embeddings
and the temperature. Frozen parameters are left out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from karma.config import Config


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`.

    `step` is the number of optimizer steps already taken, so the first update uses
    1 / warmup_steps of the peak rate rather than zero.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    objective: nn.Module, lr: float, head_lr: float, weight_decay: float
) -> list[dict]:
    """AdamW groups of a `karma.objective.KarmaObjective`: backbone (lr) and everything else
    (head_lr), each split into decayed and not decayed. Empty groups are left out."""
    backbone = {id(p) for p in objective.model.backbone.parameters()}
    groups: dict[str, list[nn.Parameter]] = {
        "backbone": [],
        "backbone_no_decay": [],
        "heads": [],
        "heads_no_decay": [],
    }
    for name, p in objective.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if id(p) in backbone else "heads"
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name
        groups[part + ("_no_decay" if no_decay else "")].append(p)
    settings = {
        "backbone": (lr, weight_decay),
        "backbone_no_decay": (lr, 0.0),
        "heads": (head_lr, weight_decay),
        "heads_no_decay": (head_lr, 0.0),
    }
    return [
        {"name": n, "params": ps, "lr": settings[n][0], "weight_decay": settings[n][1]}
        for n, ps in groups.items()
        if ps
    ]


def build_optimizer(objective: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over `param_groups` (backbone at train.lr, heads at train.head_lr)."""
    groups = param_groups(objective, cfg.train.lr, cfg.train.head_lr, cfg.train.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR scaling every group's own base rate by `lr_factor`."""
    warmup, total, min_ratio = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
