"""Learning-rate schedules as plain functions of time.

Time is measured in epochs and may be fractional (``epoch + step / steps_per_epoch``), so
warm-up is smooth within an epoch while multistep decays happen at epoch boundaries.
"""

from __future__ import annotations

import math

from longtail.config import OptimConfig


def learning_rate(cfg: OptimConfig, t: float, total_epochs: int) -> float:
    """Learning rate at time ``t`` epochs of a stage that lasts ``total_epochs``."""
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        frac = t / cfg.warmup_epochs
        return cfg.lr * (cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * frac)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        # Decay applies from the start of each milestone epoch.
        passed = sum(1 for m in cfg.milestones if int(t) >= m)
        return cfg.lr * cfg.gamma**passed
    # cosine from the end of warm-up to the end of the stage
    span = max(total_epochs - cfg.warmup_epochs, 1e-12)
    progress = min(max((t - cfg.warmup_epochs) / span, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
