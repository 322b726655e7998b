"""Data layer: sources, long-tailed subsets, samplers, transforms (augmentations) and loaders."""

from longtail.data.dataset import LTDataset
from longtail.data.imbalance import (
    PROFILES,
    check_counts,
    class_counts,
    long_tail_indices,
    profile_counts,
)
from longtail.data.pipeline import RunData, loader_sampler, set_loader_epoch, to_device
from longtail.data.samplers import (
    SAMPLERS,
    EpochSampler,
    KPerClassBatchSampler,
    SwitchingSampler,
    build_sampler,
)
from longtail.data.sources import (
    DATASETS,
    DOWNLOADABLE,
    SPLITS,
    ArraySource,
    FileSource,
    Source,
    dataset_for_path,
    default_root,
    download,
    load_source,
)
from longtail.data.transforms import TRANSFORMS, MultiView, build_transform

__all__ = [
    "DATASETS",
    "DOWNLOADABLE",
    "PROFILES",
    "SAMPLERS",
    "SPLITS",
    "TRANSFORMS",
    "ArraySource",
    "EpochSampler",
    "FileSource",
    "KPerClassBatchSampler",
    "LTDataset",
    "MultiView",
    "RunData",
    "Source",
    "SwitchingSampler",
    "build_sampler",
    "build_transform",
    "check_counts",
    "class_counts",
    "dataset_for_path",
    "default_root",
    "download",
    "load_source",
    "loader_sampler",
    "long_tail_indices",
    "profile_counts",
    "set_loader_epoch",
    "to_device",
]
