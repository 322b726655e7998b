"""The torch Dataset the engine iterates: a source, a subset of its indices and a transform.

Training loaders ask for items as ``(j, epoch)``: the augmentation of item j in an epoch
draws from a random generator seeded by (seed, epoch, j) alone, so it does not depend on
which process or loader worker loads it, on how many there are, on the order of the loaders,
or on what was drawn before: a run gives the same images with 1 or 8 processes and after a
resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch.utils.data

from longtail.data.sources import Source
from longtail.errors import DataError

_MASK = (1 << 64) - 1


def item_seed(seed: int, epoch: int, j: int) -> int:
    """A 63-bit seed for item ``j`` of ``epoch`` (splitmix64 over the three numbers)."""
    x = 0
    for v in (seed, epoch, j):
        x = (x + (v & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        x ^= x >> 31
    return x >> 1


class LTDataset(torch.utils.data.Dataset):
    """A (possibly long-tailed) subset of a source with a transform.

    Item ``j`` is ``(x, label, j)``: ``j`` is the position in this dataset, which methods that
    keep per-sample state (memory banks, per-sample weights) use as a key. A key ``(j,
    epoch)`` augments with a generator seeded by ``(seed, epoch, j)``.

    Args:
        source: Where images and labels come from.
        indices: Indices into ``source`` to keep (e.g. from ``long_tail_indices``); None keeps
            all.
        transform: Applied to each loaded image; may be a MultiView returning a list.
        seed: Base seed of the per-item augmentation.
    """

    def __init__(
        self,
        source: Source,
        indices: np.ndarray | None,
        transform: Callable[[Any], Any] | None,
        seed: int = 0,
    ) -> None:
        self.source = source
        n = len(source)
        if indices is None:
            self.indices = np.arange(n, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
                raise DataError(f"subset indices must lie in 0..{n - 1} for a source of {n} images")
        self.transform = transform
        self.seed = int(seed)
        self._labels = source.targets[self.indices]

    @property
    def labels(self) -> np.ndarray:
        """Labels of the kept images, in dataset order."""
        return self._labels

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int]:
        j, epoch = key if isinstance(key, tuple) else (key, None)
        x = self.source.load(int(self.indices[j]))
        if self.transform is not None:
            if epoch is None:
                x = self.transform(x)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(item_seed(self.seed, epoch, int(j)))
                    x = self.transform(x)
        return x, int(self._labels[j]), int(j)


class EpochKeys(torch.utils.data.Sampler):
    """Wraps a sampler (or batch sampler) so that it yields ``(index, epoch)`` keys."""

    def __init__(self, sampler: Any) -> None:
        super().__init__()
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        for item in self.sampler:
            yield [(j, epoch) for j in item] if isinstance(item, list) else (item, epoch)

    def __len__(self) -> int:
        return len(self.sampler)
