"""The hybrid networks' curriculum alpha(T): the weight of feature learning in epoch T.

``L = alpha * L_features + (1 - alpha) * L_classifier``. T counts epochs from 1 (the first)
to T_max (the last), so the last epoch of a parabolic or linear curriculum trains the
classifier branch alone, as in BBN's cumulative learning.
"""

from __future__ import annotations

from collections.abc import Callable

from longtail.registry import Registry

CURRICULA: Registry[Callable[..., float]] = Registry("curriculum")


@CURRICULA.register("parabolic")
def parabolic(epoch: int, total_epochs: int, value: float = 0.5) -> float:
    """``1 - (T / T_max)^2`` (the paper's CIFAR recipe)."""
    return 1.0 - ((epoch + 1) / total_epochs) ** 2


@CURRICULA.register("linear")
def linear(epoch: int, total_epochs: int, value: float = 0.5) -> float:
    """``1 - T / T_max`` (the paper's iNaturalist recipe)."""
    return 1.0 - (epoch + 1) / total_epochs


@CURRICULA.register("constant")
def constant(epoch: int, total_epochs: int, value: float = 0.5) -> float:
    """``value`` throughout (the "without curriculum" ablation)."""
    return value


def curriculum_alpha(name: str, epoch: int, total_epochs: int, value: float = 0.5) -> float:
    """alpha for 0-based ``epoch`` of ``total_epochs``; ``value`` is used by ``constant``."""
    return CURRICULA.get(name)(epoch, total_epochs, value)
