"""SGD with momentum (or AdamW) and weight decay; linear warm-up, then step or cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from everyseg.config import TrainConfig

SCHEDULES = ("step", "cosine")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step` (0-based)."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    else:
        warmup = 1.0
    if cfg.schedule == "step":
        decay = cfg.gamma ** sum(step >= m for m in cfg.milestones)
    else:
        decay = 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / max(cfg.steps, 1)))
    return warmup * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    lr_factor(0, cfg)  # validates the schedule name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
