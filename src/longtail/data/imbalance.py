"""Long-tailed subsets of balanced datasets and class counts (shot groups: evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from longtail.errors import DataError

PROFILES = ("exp", "step")


def profile_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp") -> list[int]:
    """Per-class image counts of a long-tailed profile (Cao et al. 2019).

    ``exp``: ``n_i = floor(n_max * (1/ratio)^(i/(C-1)))``; ``step``: the first ``C // 2`` classes
    keep ``n_max``, the rest get ``floor(n_max / ratio)``.

    Args:
        n_max: Count of the largest (first) class.
        num_classes: Number of classes C.
        ratio: Imbalance ratio n_max / n_min (>= 1; 1 is balanced).
        profile: "exp" or "step".

    Returns:
        One count per class, in label order.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown imbalance profile {profile!r}; valid: {', '.join(PROFILES)}")
    if not ratio >= 1:  # also rejects NaN
        raise ValueError(f"the imbalance ratio must be >= 1 (1 means balanced); got {ratio}")
    if n_max < 1 or num_classes < 1:
        raise ValueError(f"need n_max >= 1 and num_classes >= 1; got {n_max} and {num_classes}")
    if profile == "step":
        half = num_classes // 2
        return [n_max] * half + [int(n_max / ratio)] * (num_classes - half)
    if num_classes == 1:
        return [n_max]
    inv = 1.0 / ratio
    return [int(n_max * inv ** (i / (num_classes - 1))) for i in range(num_classes)]


def long_tail_indices(
    targets: np.ndarray,
    ratio: float,
    profile: str = "exp",
    seed: int = 0,
    n_max: int | None = None,
) -> np.ndarray:
    """Indices of a long-tailed subset, with the standard CIFAR-LT recipe.

    One ``RandomState(seed)`` (equivalent to ``np.random.seed(seed)``) shuffles each class's
    indices in label order and keeps the first ``n_c``; a class with fewer images keeps all.

    Args:
        targets: Labels of the full (usually balanced) training set.
        ratio: Imbalance ratio (>= 1).
        profile: "exp" or "step".
        seed: Seed of the shuffles.
        n_max: Count of class 0; defaults to the largest class count.

    Returns:
        int64 indices into ``targets``, grouped by class in label order.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size == 0:
        raise DataError("cannot make a long-tailed subset of an empty dataset")
    num_classes = int(targets.max()) + 1
    if n_max is None:
        n_max = int(np.bincount(targets, minlength=num_classes).max())
    counts = profile_counts(n_max, num_classes, ratio, profile)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept).astype(np.int64)


def class_counts(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Number of images per class.

    Args:
        targets: Labels.
        num_classes: Length of the result (classes without images count 0).

    Returns:
        int64 array of shape (num_classes,).
    """
    targets = np.asarray(targets, dtype=np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise DataError(
            f"labels must lie in 0..{num_classes - 1}; found {int(targets.min())}.."
            f"{int(targets.max())}"
        )
    return np.bincount(targets, minlength=num_classes).astype(np.int64)


def check_counts(
    counts: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    fix: str = "lower the imbalance ratio or check the data",
) -> None:
    """Raise DataError if some class has no training images.

    Args:
        counts: Training images per class.
        classes: Class names (same order).
        fix: What to do about it, for the message.
    """
    empty = [i for i, n in enumerate(counts) if n <= 0]
    if not empty:
        return
    i = empty[0]
    name = classes[i] if i < len(classes) else str(i)
    more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
    raise DataError(f"class {i} ({name!r}){more} has no training images; {fix}")


def hold_out(
    targets: np.ndarray, kept: np.ndarray, per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A validation split of ``per_class`` images per class, held out of the training split.

    Each class's images come first from those the long-tailed subset ``kept`` leaves out (a
    subsampled benchmark leaves many: its training set is unchanged), then from its kept
    images, at most a fifth of them (a folder that is long-tailed already loses little of a
    rare class, which then has fewer validation images).

    Returns:
        ``kept`` without the held-out images (order kept) and the held-out indices.
    """
    rng = np.random.default_rng([seed, 7919])  # its own stream: the subset's draw is unchanged
    in_kept = np.zeros(len(targets), dtype=bool)
    in_kept[kept] = True
    held: list[np.ndarray] = []
    for c in np.unique(targets):
        outside = rng.permutation(np.flatnonzero((targets == c) & ~in_kept))[:per_class]
        inside = np.flatnonzero((targets == c) & in_kept)
        need = min(per_class - len(outside), len(inside) // 5)
        taken = rng.permutation(inside)[: max(need, 0)]
        held += [outside, taken]
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    return kept[~np.isin(kept, held_out)], held_out
