"""Optimizers and learning-rate schedules for every training script."""
from __future__ import annotations

import math

import torch

from config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (>= 2-D: embeddings, projections, stacked experts) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up (non-zero at step 1), cosine to min_lr."""
    if cfg.warm_up > 0 and step <= cfg.warm_up:
        return cfg.lr * step / cfg.warm_up
    if cfg.steps <= cfg.warm_up:
        return cfg.lr
    progress = min(1.0, (step - cfg.warm_up) / (cfg.steps - cfg.warm_up))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every parameter group's learning rate for optimizer step `step`; returns the base rate."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
