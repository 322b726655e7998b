"""Evaluation metrics: pure functions of predictions and labels, no training state.

Inputs may be torch tensors (any device) or numpy arrays; everything is computed on the CPU.
Accuracies are fractions in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ArrayLike = Tensor | np.ndarray | Sequence[Any]

#: The standard long-tail split of classes by training-set size (Liu et al. 2019).
SHOT_GROUP_NAMES = ("many", "medium", "few")


def _tensor(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.asarray(x))


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_scores(scores: Tensor, labels: Tensor, what: str) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{what} must be (N, C), got shape {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = {scores.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]})")


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, k: int = 1) -> float:
    """Fraction of samples whose true class is among the ``k`` highest scores.

    Args:
        logits: ``(N, C)`` scores (logits or probabilities; only the ranking matters).
        labels: ``(N,)`` true class indices.
        k: How many top classes count as a hit.

    Returns:
        The top-k accuracy in ``[0, 1]``. Ties are broken towards the lower class index.

    Raises:
        ValueError: On mismatched shapes, no samples, or ``k`` outside ``[1, C]``.
    """
    scores, target = _tensor(logits), _tensor(labels).long()
    _check_scores(scores, target, "logits")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    # A stable sort breaks ties towards the lower class index, like argmax, so top-1 agrees
    # with the confusion matrix and per-class accuracy (torch.topk's tie order is unspecified).
    top = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return (top == target[:, None]).any(dim=1).double().mean().item()


def confusion_matrix(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Count matrix with rows = true class and columns = predicted class.

    Args:
        preds: ``(N,)`` predicted class indices.
        labels: ``(N,)`` true class indices.
        num_classes: ``C``.

    Returns:
        An int64 ``(C, C)`` array whose entry ``[i, j]`` counts samples of class ``i`` predicted
        as ``j``.

    Raises:
        ValueError: On mismatched lengths or indices outside ``[0, C)``.
    """
    p, t = _numpy(preds).astype(np.int64).ravel(), _numpy(labels).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {t.size}")
    for name, v in (("preds", p), ("labels", t)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Recall of each class: correct predictions of class ``c`` over samples of class ``c``.

    Args:
        preds: ``(N,)`` predicted class indices.
        labels: ``(N,)`` true class indices.
        num_classes: ``C``.

    Returns:
        A float ``(C,)`` array, NaN for classes with no sample in ``labels``.
    """
    cm = confusion_matrix(preds, labels, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def reliability_bins(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, list]:
    """Top-1 confidence against accuracy in ``n_bins`` equal-width confidence bins.

    Samples are put in the bins ``((b-1)/B, b/B]`` by their confidence (the max probability).

    Args:
        probs: ``(N, C)`` class probabilities (e.g. a softmax).
        labels: ``(N,)`` true class indices.
        n_bins: Number of bins.

    Returns:
        ``{"edges": B + 1 bin edges, "count": samples per bin, "accuracy": mean correctness
        per bin, "confidence": mean confidence per bin}``; the means are None for empty bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    p, t = _tensor(probs).double(), _tensor(labels).long()
    _check_scores(p, t, "probs")
    conf, pred = p.max(dim=1)
    conf_np = conf.numpy()
    correct = (pred == t).double().numpy()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge in the bin that edge closes (right-closed).
    bins = np.clip(np.searchsorted(edges, conf_np, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    hits = np.bincount(bins, weights=correct, minlength=n_bins)
    confs = np.bincount(bins, weights=conf_np, minlength=n_bins)
    return {
        "edges": [float(e) for e in edges],
        "count": [int(c) for c in count],
        "accuracy": [float(h / c) if c else None for h, c in zip(hits, count, strict=True)],
        "confidence": [float(s / c) if c else None for s, c in zip(confs, count, strict=True)],
    }


def expected_calibration_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (Guo et al. 2017).

    ECE is ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over the bins of
    :func:`reliability_bins`.

    Args:
        probs: ``(N, C)`` class probabilities (e.g. a softmax).
        labels: ``(N,)`` true class indices.
        n_bins: Number of confidence bins.

    Returns:
        The ECE in ``[0, 1]``.
    """
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(bins["count"])
    # |B|/N * |acc - conf|; empty bins contribute 0.
    return float(
        sum(
            c * abs(a - f)
            for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
            if c
        )
        / total
    )


def shot_groups(train_counts: ArrayLike, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Split classes into many/medium/few-shot groups by training-set size.

    The single definition of the split: many ``n > many``, medium ``few <= n <= many``, few
    ``n < few``.

    Args:
        train_counts: Training images per class, indexed by class.
        many: Above this count a class is many-shot.
        few: Below this count a class is few-shot.

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}``: sorted class indices per group.
    """
    if few > many:
        raise ValueError(f"few ({few}) must not exceed many ({many})")
    counts = _numpy(train_counts).ravel()
    return {
        "many": [int(c) for c in np.flatnonzero(counts > many)],
        "medium": [int(c) for c in np.flatnonzero((counts >= few) & (counts <= many))],
        "few": [int(c) for c in np.flatnonzero(counts < few)],
    }


def _group_mean(per_class: np.ndarray, classes: list[int]) -> float | None:
    values = per_class[classes]
    values = values[~np.isnan(values)]
    # None both when the group is empty and when none of its classes is in the test set.
    return float(values.mean()) if values.size else None


def evaluate_logits(logits: ArrayLike, labels: ArrayLike, train_counts: ArrayLike) -> dict:
    """All standard long-tail metrics for one set of predictions.

    Args:
        logits: ``(N, C)`` raw classifier outputs (softmax is applied for ECE and NLL).
        labels: ``(N,)`` true class indices.
        train_counts: Training images per class (``C`` entries), for the shot groups.

    Returns:
        A JSON-friendly dict of plain Python values: ``top1``; ``top5`` (None if ``C < 5``);
        ``per_class`` (NaN for classes absent from ``labels``); ``many``/``medium``/``few`` (mean
        per-class accuracy over the group's classes present in ``labels``, None if there are none);
        ``ece`` and its ``reliability`` bins; ``nll`` (mean negative log-likelihood);
        ``confusion`` (rows = true class); ``num_samples``.

    Raises:
        ValueError: On mismatched shapes or if ``train_counts`` does not have ``C`` entries.
    """
    scores, target = _tensor(logits).double(), _tensor(labels).long()
    _check_scores(scores, target, "logits")
    num_classes = scores.shape[1]
    counts = _numpy(train_counts).ravel()
    if counts.size != num_classes:
        raise ValueError(f"train_counts has {counts.size} entries for {num_classes} classes")

    preds = scores.argmax(dim=1)
    per_class = per_class_accuracy(preds, target, num_classes)
    groups = shot_groups(counts)
    log_probs = F.log_softmax(scores, dim=1)
    result: dict[str, Any] = {
        "top1": topk_accuracy(scores, target, 1),
        "top5": topk_accuracy(scores, target, 5) if num_classes >= 5 else None,
        "per_class": [float(a) for a in per_class],
    }
    for name in SHOT_GROUP_NAMES:
        result[name] = _group_mean(per_class, groups[name])
    reliability = reliability_bins(log_probs.exp(), target)
    result["ece"] = expected_calibration_error(log_probs.exp(), target)
    result["reliability"] = reliability
    result["nll"] = F.nll_loss(log_probs, target).item()
    result["confusion"] = confusion_matrix(preds, target, num_classes).tolist()
    result["num_samples"] = int(target.shape[0])
    return result
