"""Classification losses of the long-tail baselines: focal, class-balanced weights, LDAM,
logit adjustment and balanced softmax. Pure functions of tensors; float32 or wider even under
autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from longtail.losses.common import full_precision, upcast


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be (N, C) and labels (N,); got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )


def _weighted_mean(per_sample: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
    """mean_i w_{y_i} l_i (weights normalised to sum to C, as Cui et al. use them)."""
    if weight is None:
        return per_sample.mean()
    return (weight.to(per_sample.dtype)[labels] * per_sample).mean()


def class_balanced_weights(counts: Sequence[int] | np.ndarray, beta: float = 0.9999) -> Tensor:
    """Class weights by the effective number of samples (Cui et al. 2019).

    ``w_c = (1 - beta) / (1 - beta^n_c)``, normalised so that they sum to C. beta = 0 gives
    equal weights; beta -> 1 approaches inverse frequency.

    Args:
        counts: Training images per class (all positive).
        beta: In [0, 1).

    Returns:
        (C,) float64 weights summing to C.
    """
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    if (n <= 0).any():
        raise ValueError("every class needs at least one image for class-balanced weights")
    w = (1 - beta) / (1 - beta**n)
    return w * len(n) / w.sum()


def focal_loss(
    logits: Tensor, labels: Tensor, gamma: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma log p_t``, mean over samples.

    Args:
        logits: (N, C) scores.
        labels: (N,) integer labels.
        gamma: Focusing parameter (0 is cross-entropy).
        weight: (C,) optional class weights (e.g. :func:`class_balanced_weights`).
    """
    _check(logits, labels)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    with full_precision(logits.device):
        logits = upcast(logits)
        log_pt = F.log_softmax(logits, dim=1).gather(1, labels.long()[:, None]).squeeze(1)
        focus = (1 - log_pt.exp()).clamp(min=0) ** gamma if gamma else 1.0
        return _weighted_mean(-focus * log_pt, labels.long(), weight)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy, mean over samples of ``w_y l`` (plain CE without weights)."""
    return focal_loss(logits, labels, 0.0, weight)


def ldam_margins(counts: Sequence[int] | np.ndarray, max_margin: float = 0.5) -> Tensor:
    """LDAM's per-class margins (Cao et al. 2019): ``m_c`` proportional to ``n_c^(-1/4)``,
    the largest (the rarest class's) equal to ``max_margin``. (C,) float64."""
    n = torch.as_tensor(np.asarray(counts), dtype=torch.float64)
    if (n <= 0).any():
        raise ValueError("every class needs at least one image for LDAM margins")
    m = n**-0.25
    return m * (max_margin / m.max())


def ldam_loss(
    cosines: Tensor,
    labels: Tensor,
    margins: Tensor,
    scale: float = 30.0,
    weight: Tensor | None = None,
) -> Tensor:
    """LDAM (Cao et al. 2019): cross-entropy of ``scale * (cos - m_y 1[c = y])``.

    Args:
        cosines: (N, C) cosine similarities of normalised features and class weights.
        labels: (N,) integer labels.
        margins: (C,) per-class margins (:func:`ldam_margins`).
        scale: s, the logit scale.
        weight: (C,) optional class weights (DRW switches these on late in training).
    """
    _check(cosines, labels)
    with full_precision(cosines.device):
        cosines = upcast(cosines)
        labels = labels.long()
        shift = (
            F.one_hot(labels, cosines.shape[1]).to(cosines.dtype)
            * margins.to(cosines)[labels, None]
        )
        return weighted_cross_entropy(scale * (cosines - shift), labels, weight)


def logit_adjusted_loss(
    logits: Tensor,
    labels: Tensor,
    log_prior: Tensor,
    tau: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE of ``logits + tau log pi``.

    Args:
        logits: (N, C) scores.
        labels: (N,) integer labels.
        log_prior: (C,) log of the training class frequencies.
        tau: Adjustment strength.
        weight: (C,) optional class weights, as for :func:`weighted_cross_entropy`.
    """
    _check(logits, labels)
    with full_precision(logits.device):
        logits = upcast(logits)
        adjusted = logits + tau * log_prior.to(logits)
        if weight is None:
            return F.cross_entropy(adjusted, labels.long())
        return weighted_cross_entropy(adjusted, labels, weight)
