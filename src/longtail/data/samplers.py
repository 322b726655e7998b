"""Epoch samplers for re-balancing: instance, class-balanced, square-root, reversed, progressive.

Every sampler draws the whole epoch's index list from ``np.random.default_rng([seed, epoch])``:
an epoch's draws depend on nothing but the seed and the epoch number, so a resumed run sees
the same batches as an uninterrupted one. A class-probability sampler picks a class per draw,
then an image uniformly within it; that is what ``torch.utils.data.WeightedRandomSampler``
does with per-image weights ``p_c / n_c``, in O(C) rather than O(N) work per draw, and it keeps
the published runs of this project reproducible.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch.utils.data

from longtail.errors import DataError
from longtail.registry import Registry


def _labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size == 0:
        raise DataError("cannot sample from an empty dataset")
    if labels.min() < 0:
        raise DataError(f"labels must be >= 0; found {int(labels.min())}")
    return labels


class EpochSampler(torch.utils.data.Sampler[int], abc.ABC):
    """Base of the epoch samplers.

    Args:
        labels: Label of every image in the dataset.
        num_samples: Draws per epoch; defaults to ``len(labels)``.
        seed: Base seed; the epoch's draws use ``default_rng([seed, epoch])``.
        **kw: ``total_epochs`` is accepted by every sampler (only "progressive" uses it) so
            callers can pass the same options to any of them.
    """

    name: ClassVar[str] = ""

    def __init__(
        self, labels: np.ndarray, *, num_samples: int | None = None, seed: int = 0, **kw: Any
    ) -> None:
        unknown = sorted(set(kw) - {"total_epochs"})
        if unknown:
            raise TypeError(
                f"unknown sampler option(s) {', '.join(unknown)}; valid: num_samples, seed, "
                "total_epochs"
            )
        super().__init__()
        self.labels = _labels(labels)
        self.num_samples = len(self.labels) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        self.seed = int(seed)
        self.epoch = 0
        self.rank, self.world_size, self.global_batch = 0, 1, 0
        self.counts = np.bincount(self.labels).astype(np.int64)
        # Images grouped by class: class c's images are by_class[starts[c]:starts[c] + counts[c]].
        self.by_class = np.argsort(self.labels, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws the next iteration yields."""
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int, global_batch: int) -> EpochSampler:
        """Yield only this process's part of each global batch (its ``rank``-th slice).

        Every process draws the same epoch (same seed and epoch), cuts it into global
        batches of ``global_batch`` (dropping the incomplete last one) and takes the
        ``rank``-th of ``world_size`` equal slices of each: the slices are disjoint and, put
        together in rank order, are exactly the single-process batches.
        """
        if world_size < 1 or not 0 <= rank < world_size or global_batch % world_size:
            raise ValueError(
                f"need 0 <= rank < world_size and a batch divisible by world_size; got rank "
                f"{rank}, world_size {world_size}, batch {global_batch}"
            )
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        return self

    @abc.abstractmethod
    def class_probabilities(self) -> np.ndarray:
        """Probability that one draw comes from each class, at the current epoch."""

    def full_indices(self) -> np.ndarray:
        """The whole epoch's index list."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return self._draw(rng)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """Pick a class per draw from ``class_probabilities``, then an image uniformly in it."""
        cls = rng.choice(self.num_classes, size=self.num_samples, p=self.class_probabilities())
        within = np.floor(rng.random(self.num_samples) * self.counts[cls]).astype(np.int64)
        return self.by_class[self.starts[cls] + within]

    def __iter__(self) -> Iterator[int]:
        full = self.full_indices()
        if self.world_size > 1:
            steps, local = (
                self.num_samples // self.global_batch,
                self.global_batch // self.world_size,
            )
            full = full[: steps * self.global_batch].reshape(steps, self.world_size, local)
            full = full[:, self.rank].reshape(-1)
        return iter(full.tolist())

    def __len__(self) -> int:
        if self.world_size > 1:
            return self.num_samples // self.global_batch * (self.global_batch // self.world_size)
        return self.num_samples


SAMPLERS: Registry[type[EpochSampler]] = Registry("sampler")


def _register(name: str) -> Callable[[type[EpochSampler]], type[EpochSampler]]:
    def add(cls: type[EpochSampler]) -> type[EpochSampler]:
        cls.name = name
        return SAMPLERS.register(name)(cls)

    return add


@_register("instance")
class InstanceSampler(EpochSampler):
    """Uniform over images: a random permutation, without replacement."""

    def class_probabilities(self) -> np.ndarray:
        return self.counts / self.counts.sum()

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.labels)
        # More draws than images: whole permutations back to back, each image once per pass.
        reps = -(-self.num_samples // n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[: self.num_samples]


@_register("class-balanced")
class ClassBalancedSampler(EpochSampler):
    """Class uniformly at random (among classes with images), then an image uniformly."""

    def class_probabilities(self) -> np.ndarray:
        present = (self.counts > 0).astype(np.float64)
        return present / present.sum()


@_register("sqrt")
class SqrtSampler(EpochSampler):
    """Square-root sampling: p_c proportional to sqrt(n_c)."""

    def class_probabilities(self) -> np.ndarray:
        w = np.sqrt(self.counts.astype(np.float64))
        return w / w.sum()


@_register("reversed")
class ReversedSampler(EpochSampler):
    """BBN's reversed sampling: p_c proportional to n_max / n_c."""

    def class_probabilities(self) -> np.ndarray:
        n = self.counts.astype(np.float64)
        w = np.divide(n.max(), n, out=np.zeros_like(n), where=n > 0)
        return w / w.sum()


@_register("progressive")
class ProgressiveSampler(EpochSampler):
    """Progressively-balanced sampling (Kang et al. 2020).

    ``p(t) = (1 - t/T) p_instance + (t/T) p_balanced`` with ``t`` the current epoch (clipped to
    T), drawn with replacement.

    Args:
        labels: Label of every image.
        total_epochs: T, the epoch at which sampling becomes fully class-balanced.
        **kw: As for :class:`EpochSampler`.
    """

    def __init__(self, labels: np.ndarray, *, total_epochs: int | None = None, **kw: Any) -> None:
        super().__init__(labels, **kw)
        if total_epochs is None or total_epochs < 1:
            raise ValueError(
                f"sampler 'progressive' needs total_epochs >= 1 (the training length); "
                f"got {total_epochs}"
            )
        self.total_epochs = int(total_epochs)

    def class_probabilities(self) -> np.ndarray:
        t = min(max(self.epoch, 0), self.total_epochs) / self.total_epochs
        n = self.counts.astype(np.float64)
        present = (n > 0).astype(np.float64)
        return (1 - t) * n / n.sum() + t * present / present.sum()


def build_sampler(name: str, labels: np.ndarray, **kw: Any) -> EpochSampler:
    """Build a registered epoch sampler.

    Args:
        name: One of ``SAMPLERS.names()``.
        labels: Label of every image in the dataset.
        **kw: num_samples, seed, total_epochs.

    Returns:
        The sampler, at epoch 0.
    """
    return SAMPLERS.get(name)(labels, **kw)


class SwitchingSampler(torch.utils.data.Sampler[int]):
    """One sampler's draws before epoch ``at``, another's from then on (deferred re-sampling,
    DRS: instance sampling, then class-balanced from the 160th of 200 epochs).

    Args:
        first: Sampler of the epochs before ``at``.
        then: Sampler of epoch ``at`` and later; must draw as many indices per epoch.
        at: The 0-based epoch of the switch.
    """

    def __init__(self, first: EpochSampler, then: EpochSampler, at: int) -> None:
        super().__init__()
        if len(first) != len(then):
            raise ValueError(
                f"both samplers must draw as many indices ({len(first)} vs {len(then)})"
            )
        self.first, self.then, self.at = first, then, int(at)
        self.name = f"{first.name}->{then.name}@{at}"
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.first.set_epoch(epoch)
        self.then.set_epoch(epoch)

    def shard(self, rank: int, world_size: int, global_batch: int) -> SwitchingSampler:
        self.first.shard(rank, world_size, global_batch)
        self.then.shard(rank, world_size, global_batch)
        return self

    @property
    def active(self) -> EpochSampler:
        return self.then if self.epoch >= self.at else self.first

    def __iter__(self) -> Iterator[int]:
        return iter(self.active)

    def __len__(self) -> int:
        return len(self.first)


CLASS_WEIGHTINGS = ("uniform", "instance")


class KPerClassBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size // k`` distinct classes with ``k`` images each.

    Classes are drawn without replacement within a batch, uniformly or in proportion to their
    size; images are drawn without replacement within the class when it has at least ``k``,
    else with replacement.

    Args:
        labels: Label of every image in the dataset.
        batch_size: Images per batch; must be a multiple of ``k``.
        k: Images per class in a batch.
        num_samples: Images per epoch; the epoch has ``num_samples // batch_size`` batches (at
            least one). Defaults to ``len(labels)``.
        seed: Base seed; the epoch's batches use ``default_rng([seed, epoch])``.
        class_weighting: "uniform" or "instance" (proportional to class size).
    """

    name: ClassVar[str] = "k-per-class"

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        k: int,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        class_weighting: str = "uniform",
    ) -> None:
        super().__init__()
        self.labels = _labels(labels)
        if k < 1 or batch_size < k or batch_size % k:
            raise ValueError(
                f"batch_size must be a positive multiple of k; got batch_size={batch_size}, k={k}"
            )
        if class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(
                f"unknown class_weighting {class_weighting!r}; valid: {', '.join(CLASS_WEIGHTINGS)}"
            )
        self.batch_size, self.k = int(batch_size), int(k)
        self.classes_per_batch = self.batch_size // self.k
        self.counts = np.bincount(self.labels).astype(np.int64)
        self.present = np.flatnonzero(self.counts)
        if self.classes_per_batch > len(self.present):
            raise ValueError(
                f"batch_size // k = {self.classes_per_batch} classes per batch, but only "
                f"{len(self.present)} classes have images; lower batch_size or raise k"
            )
        self.num_samples = len(self.labels) if num_samples is None else int(num_samples)
        self.num_batches = max(1, self.num_samples // self.batch_size)
        self.rank, self.world_size = 0, 1
        self.seed = int(seed)
        self.class_weighting = class_weighting
        self.epoch = 0
        order = np.argsort(self.labels, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(self.counts)])
        self.members = [order[bounds[c] : bounds[c + 1]] for c in range(len(self.counts))]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def full_batches(self) -> np.ndarray:
        """All batches of the epoch, shape (num_batches, batch_size)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        p = None
        if self.class_weighting == "instance":
            n = self.counts[self.present].astype(np.float64)
            p = n / n.sum()
        out = np.empty((self.num_batches, self.batch_size), dtype=np.int64)
        for b in range(self.num_batches):
            chosen = rng.choice(self.present, size=self.classes_per_batch, replace=False, p=p)
            for j, c in enumerate(chosen):
                members = self.members[c]
                pick = rng.choice(len(members), size=self.k, replace=len(members) < self.k)
                out[b, j * self.k : (j + 1) * self.k] = members[pick]
        return out

    def shard(self, rank: int, world_size: int) -> KPerClassBatchSampler:
        """Yield only this process's slice of each batch (see :meth:`EpochSampler.shard`)."""
        if world_size < 1 or not 0 <= rank < world_size or self.batch_size % world_size:
            raise ValueError(
                f"need 0 <= rank < world_size and a batch divisible by world_size; got rank "
                f"{rank}, world_size {world_size}, batch {self.batch_size}"
            )
        self.rank, self.world_size = rank, world_size
        return self

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.full_batches()
        if self.world_size > 1:
            local = self.batch_size // self.world_size
            batches = batches[:, self.rank * local : (self.rank + 1) * local]
        yield from batches.tolist()

    def __len__(self) -> int:
        return self.num_batches
