"""The data of one run: the long-tailed training set, the evaluation splits, and loaders.

Methods ask a :class:`RunData` for the loaders their branches need (sampler, batch size,
transforms); it knows nothing of any method.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as v2f

from longtail import parallel
from longtail.config import DataConfig
from longtail.data.batch_augment import BatchedTransform, Draw
from longtail.data.dataset import EpochKeys, LTDataset, item_seed
from longtail.data.decode import DecodeLoader, EncodedFiles, collate_encoded, jpeg_files
from longtail.data.imbalance import check_counts, class_counts, hold_out, long_tail_indices
from longtail.data.samplers import KPerClassBatchSampler, SwitchingSampler, build_sampler
from longtail.data.sources import (
    ArraySource,
    FileSource,
    Source,
    load_source,
    select_classes,
    subset,
)
from longtail.data.transforms import (
    CROP_FRACTION,
    SMALL_MAX,
    MultiView,
    Resize,
    batched_transform,
    build_transform,
    device_transform,
)
from longtail.errors import DataError


@dataclass
class RunData:
    """Training indices, counts and sources of one run, plus loader factories.

    Attributes:
        cfg: The config's data section.
        train_source: The whole training split as stored.
        train_indices: The long-tailed subset of ``train_source`` that is trained on.
        test_source: The test split (None when not loaded).
        val_source: The validation split (None unless ``cfg.val_split``).
        seed: Seed of the samplers (the run's seed).
        pin_memory: Pin loader memory (for CUDA).
        device: The training device (where the fast path keeps the images).
    """

    cfg: DataConfig
    train_source: Source
    train_indices: np.ndarray
    test_source: Source | None
    val_source: Source | None
    seed: int = 0
    pin_memory: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _transforms: dict[str, Any] = field(default_factory=dict, repr=False)
    _cache: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    #: Transforms that put a loader on the per-image path although the fast path is on (no
    #: batched form, or images larger than it handles).
    per_image_transforms: set[str] = field(default_factory=set)
    #: Transforms of JPEGs decoded and augmented on the device (``data.decode``).
    decoded_on_device: set[str] = field(default_factory=set)

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int = 0, need_test: bool = True) -> RunData:
        """Read the splits ``cfg`` names and draw the long-tailed training subset."""
        options: dict[str, Any] = {"files": cfg.files} if cfg.files else {}
        train = select_classes(load_source(cfg.dataset, cfg.root, "train", **options), cfg.classes)
        if cfg.ratio is None and cfg.n_max is None:
            indices = np.arange(len(train))
        else:
            indices = long_tail_indices(
                train.targets, cfg.ratio or 1.0, cfg.profile, seed=cfg.seed, n_max=cfg.n_max
            )
        if cfg.dataset in ("list", "json"):  # a split's file may lack the last classes
            options["num_classes"] = train.num_classes
        test = val = None
        if need_test:
            test = select_classes(
                load_source(cfg.dataset, cfg.root, "test", **options), cfg.classes
            )
        if cfg.val_split and cfg.val_per_class:
            raise ValueError(
                "data.val_split and data.val_per_class both name a validation split; keep one"
            )
        if cfg.val_split:
            val = load_source(cfg.dataset, cfg.root, cfg.val_split, **options)
            val = select_classes(val, cfg.classes)
        elif cfg.val_per_class:
            indices, held = hold_out(train.targets, indices, cfg.val_per_class, seed=cfg.seed)
            val = subset(train, held)
        for other in (test, val):
            if other is not None and other.num_classes != train.num_classes:
                raise DataError(
                    f"{cfg.dataset}: train has {train.num_classes} classes but an evaluation "
                    f"split has {other.num_classes}; give num_classes or fix the label files"
                )
        for key in ("mean", "std"):
            given = getattr(cfg, key)
            if given is not None and len(given) not in (train.channels, 3):
                raise ValueError(
                    f"{key} needs {train.channels} value(s), one per channel of the images; "
                    f"got {given}"
                )
        return cls(cfg, train, indices, test, val, seed=seed)

    # -- facts about the training set -------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.train_source.num_classes

    @property
    def classes(self) -> list[str]:
        return self.train_source.classes

    @property
    def channels(self) -> int:
        return self.train_source.channels

    @property
    def mean(self) -> tuple[float, ...]:
        """Normalisation mean, [0, 1] units: ``data.mean`` or the training source's."""
        return self._per_channel(self.cfg.mean, self.train_source.mean)

    @property
    def std(self) -> tuple[float, ...]:
        """Normalisation std, [0, 1] units: ``data.std`` or the training source's."""
        return self._per_channel(self.cfg.std, self.train_source.std)

    def _per_channel(self, given: list[float] | None, own: tuple[float, ...]) -> tuple[float, ...]:
        if given is None:
            return own
        if len(given) == 3 and self.channels == 1:  # RGB weights' values for grey images
            return (sum(given) / 3,)
        return tuple(given)

    @property
    def resize(self) -> Resize:
        """How images over 64 px are resized (``data.crop_fraction``, ``data.interpolation``)."""
        return Resize(self.cfg.crop_fraction or CROP_FRACTION, self.cfg.interpolation)

    @property
    def train_labels(self) -> np.ndarray:
        return self.train_source.targets[self.train_indices]

    @property
    def counts(self) -> np.ndarray:
        """Training images per class, in label order."""
        return class_counts(self.train_labels, self.num_classes)

    def __len__(self) -> int:
        return len(self.train_indices)

    def check_classes(self) -> None:
        """Every class needs training images: raise DataError naming the first that has none."""
        whole = class_counts(self.train_source.targets, self.num_classes)
        elsewhere = np.zeros(self.num_classes, dtype=np.int64)
        for other in (self.test_source, self.val_source):
            if other is not None:
                elsewhere += class_counts(other.targets, self.num_classes)
        absent = whole == 0
        check_counts(
            np.where(absent & (elsewhere > 0), 0, 1),
            self.classes,
            fix="it has images only in other splits: add training images or remove the class",
        )
        check_counts(
            whole, self.classes, fix="it has no images at all: add some or remove the class"
        )
        check_counts(self.counts, self.classes, fix="lower data.ratio or raise data.n_max")

    def check_files(self) -> None:
        """Every split's image files open as images (their headers): a corrupt test image is
        found before training, not after it. Raises DataError naming the first bad file."""
        for source in (self.train_source, self.val_source, self.test_source):
            if source is not None:
                source.check_files()

    # -- loaders ----------------------------------------------------------------------
    def transform(self, name: str) -> Any:
        """The transform ``name`` at this run's image size and statistics."""
        if name not in self._transforms:
            self._transforms[name] = build_transform(
                name, self.cfg.image_size, self.channels, self.mean, self.std, self.resize
            )
        return self._transforms[name]

    def train_loader(
        self,
        *,
        sampler: str,
        batch_size: int,
        transforms: str | Sequence[str],
        k_per_class: int | None = None,
        switch: tuple[int, str] | None = None,
        **sampler_options: Any,
    ) -> DataLoader:
        """A training loader; ``transforms`` as a list gives a list of views per image.

        Args:
            sampler: Sampler name (instance, class-balanced, ...); ignored when
                ``k_per_class`` is set, which draws ``batch_size // k`` classes with k
                images each.
            batch_size: Images per step.
            transforms: One transform, or several for a multi-view batch.
            k_per_class: Build batches of k same-class images per sampled class.
            switch: ``(epoch, sampler)``: from that 0-based epoch on, draw with that sampler
                instead (deferred re-sampling).
            **sampler_options: Passed to the sampler (e.g. ``total_epochs``).
        """
        transform = (
            self.transform(transforms)
            if isinstance(transforms, str)
            else MultiView([self.transform(t) for t in transforms])
        )
        dataset = LTDataset(self.train_source, self.train_indices, transform, seed=self.seed)
        labels = self.train_labels
        if len(labels) < batch_size:
            raise DataError(
                f"the training set has {len(labels)} images, fewer than one batch of "
                f"{batch_size}; lower the batch size"
            )
        rank, world = parallel.rank(), parallel.world_size()
        if batch_size % world:
            raise ValueError(
                f"a global batch of {batch_size} does not split over {world} processes; use a "
                "multiple of the process count"
            )
        local = batch_size // world
        if k_per_class:
            order: Any = KPerClassBatchSampler(labels, batch_size, k_per_class, seed=self.seed)
            order.shard(rank, world)
        else:
            order = build_sampler(sampler, labels, seed=self.seed, **sampler_options)
            if switch is not None:
                then = build_sampler(switch[1], labels, seed=self.seed, **sampler_options)
                order = SwitchingSampler(order, then, switch[0])
            order.shard(rank, world, batch_size)
        fast = self._fast_loader(transforms, order, local, batch_size, rank)
        if fast is not None:
            return fast
        decoded = self._decode_loader(transforms, order, local, batch_size, rank, k_per_class)
        if decoded is not None:
            return decoded
        if k_per_class:
            return self._loader(dataset, batch_sampler=EpochKeys(order))
        return self._loader(dataset, sampler=EpochKeys(order), batch_size=local, drop_last=True)

    # -- the fast path -------------------------------------------------------------------
    def _fast_loader(
        self, transforms: str | Sequence[str], order: Any, local: int, global_batch: int, rank: int
    ) -> DeviceLoader | None:
        if not self.cfg.fast_path:
            return None
        names = [transforms] if isinstance(transforms, str) else list(transforms)
        batched = [
            batched_transform(
                n, self.cfg.image_size, self.channels, self.mean, self.std, self.device
            )
            for n in names
        ]
        missing = [n for n, p in zip(names, batched, strict=True) if p is None]
        if missing:  # said before training: the per-image path is several times slower
            self.per_image_transforms.update(missing)
            return None
        cache = self.device_images()
        if cache is None:
            return None
        chosen = batched[0] if isinstance(transforms, str) else batched
        return DeviceLoader(*cache, order, local, global_batch, rank, chosen, self.seed)  # type: ignore[arg-type]

    def _decode_loader(
        self,
        transforms: str | Sequence[str],
        order: Any,
        local: int,
        global_batch: int,
        rank: int,
        k_per_class: int | None,
    ) -> DecodeLoader | None:
        """JPEGs decoded and augmented on the device (``data.decode``), or None."""
        mode = self.cfg.decode
        if mode == "workers" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if self.cfg.image_size <= SMALL_MAX:
            return None
        if not jpeg_files(self.train_source, self.train_indices):
            if mode == "device":
                raise DataError(
                    "data.decode: device decodes JPEG files only, and the training set has "
                    "others; set data.decode: workers"
                )
            return None
        names = [transforms] if isinstance(transforms, str) else list(transforms)
        forms = [
            device_transform(
                n, self.cfg.image_size, self.channels, self.mean, self.std, self.resize, self.device
            )  # fmt: skip
            for n in names
        ]
        missing = [n for n, f in zip(names, forms, strict=True) if f is None]
        if missing:  # said before training, as for the fast path
            self.per_image_transforms.update(missing)
            return None
        self.decoded_on_device.update(names)
        self.per_image_transforms.difference_update(names)  # the fast path's note
        dataset = EncodedFiles(self.train_source, self.train_indices)  # type: ignore[arg-type]
        if k_per_class:
            loader = self._loader(dataset, batch_sampler=EpochKeys(order),
                                  collate_fn=collate_encoded)  # fmt: skip
        else:
            loader = self._loader(dataset, sampler=EpochKeys(order), batch_size=local,
                                  drop_last=True, collate_fn=collate_encoded)  # fmt: skip
        chosen = forms[0] if isinstance(transforms, str) else forms
        rows = slice(rank * local, (rank + 1) * local)
        return DecodeLoader(loader, order, chosen, self.channels, self.device, self.seed,  # type: ignore[arg-type]
                            global_batch, rows)  # fmt: skip

    def device_images(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The training images at the training size as one (N, C, H, W) uint8 tensor on the
        device, and their labels; None when they do not fit the fast path (too many files,
        sizes that are not square once resized)."""
        if self._cache is None:
            images = cached_images(
                self.train_source, self.train_indices, self.cfg.image_size,
                self.cfg.fast_path_max_images,
            )  # fmt: skip
            if images is None:
                return None
            labels = torch.as_tensor(self.train_labels, dtype=torch.long)
            self._cache = (images.to(self.device), labels.to(self.device))
        return self._cache

    def eval_loader(
        self,
        split: str = "test",
        batch_size: int = 256,
        transform: str = "test",
        indices: np.ndarray | None = None,
    ) -> DataLoader:
        """Every image of ``split`` once, in order (``train``: the long-tailed subset), or
        the images ``indices`` of the split.

        Under several processes each takes every ``world_size``-th image (no padding, so
        no image counts twice); the engine gathers the predictions.
        """
        source = {"test": self.test_source, "val": self.val_source, "train": self.train_source}[
            split
        ]
        if source is None:
            raise DataError(f"{self.cfg.dataset} has no {split!r} split loaded for evaluation")
        if indices is None:
            indices = self.train_indices if split == "train" else np.arange(len(source))
        indices = np.asarray(indices)[parallel.rank() :: parallel.world_size()]
        dataset = LTDataset(source, indices, self.transform(transform))
        return self._loader(dataset, batch_size=batch_size, shuffle=False)

    def _loader(self, dataset: Dataset, **kw: Any) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            **kw,
        )


def cached_images(
    source: Source, indices: np.ndarray, size: int, max_images: int
) -> torch.Tensor | None:
    """Images ``indices`` of ``source`` decoded once, resized (smaller side to ``size``, as
    the per-image transforms do first), as (N, C, size, size) uint8; None if not possible."""
    if isinstance(source, ArraySource):
        images = torch.from_numpy(source.images[indices])
        images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
        if images.shape[-2:] != (size, size):
            if images.shape[-1] != images.shape[-2]:
                return None
            images = v2f.resize(images, [size], antialias=True)
        return images.contiguous()
    if not isinstance(source, FileSource) or len(indices) > max_images:
        return None
    decoded = []
    for i in indices:
        img = v2f.pil_to_tensor(source.load(int(i)))
        img = v2f.resize(img, [size], antialias=True)
        if img.shape[-2:] != (size, size):
            return None  # not square: the per-image path crops each differently
        decoded.append(img)
    return torch.stack(decoded) if decoded else None


def loader_sampler(loader: DataLoader) -> Any:
    """The object that orders a loader's epoch: its batch sampler or its sampler."""
    if isinstance(loader, (DeviceLoader, DecodeLoader)):
        return loader.sampler
    bs = loader.batch_sampler
    found = bs if hasattr(bs, "set_epoch") else loader.sampler
    return found.sampler if isinstance(found, EpochKeys) else found


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Re-seed a loader's sampler for ``epoch`` (samplers are functions of seed and epoch)."""
    for s in (loader.sampler, getattr(loader, "batch_sampler", None)):
        if hasattr(s, "set_epoch"):
            s.set_epoch(epoch)


def to_device(x: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move tensors (nested in lists/tuples) to ``device``; images optionally to NHWC."""
    if isinstance(x, torch.Tensor):
        if channels_last and x.dim() == 4:
            return x.to(device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, channels_last) for v in x)
    return x


class DeviceLoader:
    """Batches of images already on the device, augmented there; a DataLoader's stand-in.

    Yields ``(x, labels, indices)`` like the per-image loaders (x a list with one tensor per
    view for a multi-view loader), with the same sampler, sharded the same way.

    Args:
        images: (N, C, H, W) uint8 images of the (long-tailed) training set, on the device.
        labels: (N,) labels on the device.
        sampler: An epoch sampler (indices) or k-per-class batch sampler (lists).
        batch_size: Images per process per step.
        global_batch: Images per step over all processes.
        rank: This process's rank.
        transforms: One batched transform, or several for a multi-view batch.
        seed: Seed of the augmentation draws.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        sampler: Any,
        batch_size: int,
        global_batch: int,
        rank: int,
        transforms: BatchedTransform | list[BatchedTransform],
        seed: int,
    ) -> None:
        self.images, self.labels = images, labels
        self.sampler, self.batch_size, self.global_batch = sampler, batch_size, global_batch
        self.rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.transforms, self.seed = transforms, seed
        self.batched = isinstance(sampler, KPerClassBatchSampler)  # yields lists, not indices

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.batched else len(self.sampler) // self.batch_size

    def _batches(self) -> Iterator[Tensor]:
        order = list(self.sampler)
        if self.batched:
            for batch in order:
                yield torch.as_tensor(batch)
            return
        flat = torch.as_tensor(order)
        for b in range(len(self)):
            yield flat[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Any, Tensor, Tensor]]:
        epoch, device = self.sampler.epoch, self.images.device
        views = self.transforms if isinstance(self.transforms, list) else [self.transforms]
        for b, idx in enumerate(self._batches()):
            on_device = idx.to(device)
            x = self.images[on_device]
            out = []
            for v, transform in enumerate(views):
                g = torch.Generator(device=device)
                g.manual_seed(item_seed(self.seed, epoch, b * 64 + v))
                out.append(transform(x, Draw(g, self.global_batch, self.rows)))
            images = out if isinstance(self.transforms, list) else out[0]
            yield images, self.labels[on_device], idx
