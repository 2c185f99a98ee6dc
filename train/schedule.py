"""The MAE optimisation recipe: AdamW parameter groups and the warmup + half-cycle cosine learning rate."""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch: linear warmup from 0, then cosine from ``base_lr`` to ``min_lr``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool):
    """AdamW with no weight decay on biases, norms (1-D params) and the model's tokens / position embeddings."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)
