"""The optimizer and its learning-rate schedule (what `train.lr`, `train.beta*`, `train.weight_decay` mean)."""

from __future__ import annotations

import math

import torch

from pipeline.params import TrainParams


def make_optimizer(model: torch.nn.Module, tp: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, decaying matrices only: norms' gains (and any bias) are not pulled towards 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tp.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # Fused: one kernel for the whole update (CUDA, and CPU since torch 2.4) instead of ~10 per tensor.
    return torch.optim.AdamW(groups, lr=tp.lr, betas=(tp.beta1, tp.beta2), fused=True)


def lr_at(step: int, tp: TrainParams, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warmup over warmup_steps reaches lr at step warmup_steps - 1, the only
    step at lr (step 0 without warmup); cosine decay from there reaches min_lr exactly
    at the last step, total_steps - 1. Steps past the end stay at min_lr."""
    if step < tp.warmup_steps:
        return tp.lr * (step + 1) / tp.warmup_steps
    peak = max(tp.warmup_steps - 1, 0)
    progress = (step - peak) / max(total_steps - 1 - peak, 1)
    return tp.min_lr + 0.5 * (tp.lr - tp.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
