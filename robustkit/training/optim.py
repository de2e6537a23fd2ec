"""Optimizers and per-step learning-rate schedules for :func:`robustkit.training.fit`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, InputError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def make_optimizer(
    model: nn.Module | list[nn.Parameter], name: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """SGD with Nesterov-free momentum (the papers' setting) or AdamW over the trainable parameters."""
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    if not params:
        raise InputError("model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'", "optimizer")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0):
    """Per-step LR schedule: ``"cosine"`` (with optional linear warm-up) or ``"constant"``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; use 'cosine' or 'constant'", "schedule")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
