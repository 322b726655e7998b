"""The torch Dataset the engine iterates: a source, a subset of its indices and a transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch.utils.data

from longtail.data.sources import Source
from longtail.errors import DataError


class LTDataset(torch.utils.data.Dataset):
    """A (possibly long-tailed) subset of a source with a transform.

    Item ``j`` is ``(x, label, j)``: ``j`` is the position in this dataset, which methods that
    keep per-sample state (memory banks, per-sample weights) use as a key.

    Args:
        source: Where images and labels come from.
        indices: Indices into ``source`` to keep (e.g. from ``long_tail_indices``); None keeps
            all.
        transform: Applied to each loaded image; may be a MultiView returning a list.
    """

    def __init__(
        self,
        source: Source,
        indices: np.ndarray | None,
        transform: Callable[[Any], Any] | None,
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

    def __getitem__(self, j: int) -> tuple[Any, int, int]:
        x = self.source.load(int(self.indices[j]))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self._labels[j]), int(j)
