"""Learning-rate schedules and the hybrid curriculum alpha(T), as plain functions of time.

Time is measured in epochs and may be fractional (``epoch + step / steps_per_epoch``), so
warm-up is smooth within an epoch while decays happen at epoch boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from longtail.config import OptimConfig
from longtail.registry import Registry


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


# alpha(T) weighs the feature-learning loss; 1 - alpha weighs the classifier loss. T counts
# epochs from 1 (the first epoch) to T_max (the last), so the last epoch of a parabolic or
# linear curriculum trains the classifier branch alone, as in BBN's cumulative learning.
CURRICULA: Registry[Callable[..., float]] = Registry("curriculum")


@CURRICULA.register("parabolic")
def parabolic(epoch: int, total_epochs: int, value: float = 0.5) -> float:
    return 1.0 - ((epoch + 1) / total_epochs) ** 2


@CURRICULA.register("linear")
def linear(epoch: int, total_epochs: int, value: float = 0.5) -> float:
    return 1.0 - (epoch + 1) / total_epochs


@CURRICULA.register("constant")
def constant(epoch: int, total_epochs: int, value: float = 0.5) -> float:
    return value


def curriculum_alpha(name: str, epoch: int, total_epochs: int, value: float = 0.5) -> float:
    """alpha for 0-based ``epoch`` of ``total_epochs``; ``value`` is used by ``constant``."""
    return CURRICULA.get(name)(epoch, total_epochs, value)
