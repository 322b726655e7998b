"""Data layer: dataset sources, long-tailed subsets, samplers, augmentation views."""

from longtail.data.dataset import LTDataset
from longtail.data.imbalance import (
    PROFILES,
    check_counts,
    class_counts,
    long_tail_indices,
    profile_counts,
    shot_groups,
)
from longtail.data.samplers import (
    SAMPLERS,
    EpochSampler,
    KPerClassBatchSampler,
    build_sampler,
)
from longtail.data.sources import (
    DATASETS,
    SPLITS,
    ArraySource,
    FileSource,
    Source,
    default_root,
    download,
    load_source,
    source_from_path,
)
from longtail.data.views import VIEWS, MultiView, build_view

__all__ = [
    "DATASETS",
    "PROFILES",
    "SAMPLERS",
    "SPLITS",
    "VIEWS",
    "ArraySource",
    "EpochSampler",
    "FileSource",
    "KPerClassBatchSampler",
    "LTDataset",
    "MultiView",
    "Source",
    "build_sampler",
    "build_view",
    "check_counts",
    "class_counts",
    "default_root",
    "download",
    "load_source",
    "long_tail_indices",
    "profile_counts",
    "shot_groups",
    "source_from_path",
]
