import numpy as np
import pytest
import torch

from longtail.data import (
    ArraySource,
    LTDataset,
    MultiView,
    build_sampler,
    build_transform,
    class_counts,
    long_tail_indices,
)
from longtail.errors import DataError


@pytest.fixture
def source():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    targets = np.arange(40) % 4
    return ArraySource(images, targets, ["a", "b", "c", "d"], (0.5,) * 3, (0.25,) * 3)


def test_items_and_labels(source):
    ds = LTDataset(source, np.array([5, 2, 7]), transform=None)
    assert len(ds) == 3 and ds.labels.tolist() == [1, 2, 3] and ds.num_classes == 4
    x, y, j = ds[1]
    assert torch.equal(x, source.load(2)) and y == 2 and j == 1
    assert isinstance(y, int) and isinstance(j, int)
    assert len(LTDataset(source, None, None)) == 40
    with pytest.raises(DataError, match="0..39"):
        LTDataset(source, np.array([40]), None)


def test_long_tailed_pipeline_through_dataloader(source):
    idx = long_tail_indices(source.targets, ratio=10)
    transform = build_transform("crop-flip", 8, 3, source.mean, source.std)
    ds = LTDataset(source, idx, MultiView([transform, transform]))
    assert class_counts(ds.labels, 4).tolist() == [10, 4, 2, 1]
    sampler = build_sampler("class-balanced", ds.labels, num_samples=16)
    (views, y, j), *_ = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
    assert len(views) == 2 and views[0].shape == (8, 3, 8, 8) and views[0].dtype == torch.float32
    assert torch.equal(y, torch.as_tensor(ds.labels[j.numpy()]))
