"""Learning rate per step: linear warm-up to the peak, then decay to the minimum."""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, total: int,
                  style: str = "cosine") -> float:
    """LR for optimizer step `step` (0-based): warm-up reaches `lr` at step `warmup`, the decay
    reaches `min_lr` at step `total - 1` (the decay horizon's last step) and stays there, so a
    run longer than `total` continues at `min_lr`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    progress = min(max(step - warmup, 0) / max(total - warmup - 1, 1), 1.0)
    if style == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
