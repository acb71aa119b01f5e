"""The paper's optimization recipe: AdamW parameter groups and the lr schedule."""

from __future__ import annotations

import math

from torch import nn

from train.config import Derived, RunConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: none on biases, norms (1-D tensors)
    and the model's tokens (cls/mask tokens; pos embeds are fixed buffers)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: RunConfig, d: Derived) -> float:
    """Linear warmup, then half-cycle cosine to min_lr, set every optimizer step."""
    if step < d.warmup_steps:
        return d.lr * step / d.warmup_steps
    span = max(1, d.total_steps - d.warmup_steps)
    progress = min(1.0, (step - d.warmup_steps) / span)
    return cfg.optim.min_lr + (d.lr - cfg.optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
