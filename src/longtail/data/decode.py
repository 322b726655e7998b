"""JPEG training images decoded and augmented on the training device.

At 224 px the per-image path spends its time in the loader workers, one CPU core per image:
PIL's decode of a camera-size JPEG, the random-resized crop and RandAugment (see
benchmarks/throughput.py --jpeg-folder). Here the workers only read each file's bytes; the
batch is decoded on the device (torchvision.io.decode_jpeg: nvJPEG on a CUDA device), each
image is cropped and resized to the training size there (its own random-resized crop, or the
evaluation resize and centre crop), and the rest of the transform runs on the whole batch
(:class:`~longtail.data.batch_augment.BatchedTransform`). As on the fast path, the draws of a
batch come from a generator seeded by (seed, epoch, batch, view), drawn for the global batch
and sliced per process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as v2f

from longtail.data.batch_augment import BatchedTransform, Draw
from longtail.data.dataset import item_seed
from longtail.data.sources import FileSource, Source
from longtail.errors import DataError, shown

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec's, which is
# not a dependency here; they still ship (and are what nvJPEG is reached through).
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities", DeprecationWarning
)


def jpeg_files(source: Source, indices: np.ndarray) -> bool:
    """Whether images ``indices`` of ``source`` are all JPEG files (by their names)."""
    if not isinstance(source, FileSource):
        return False
    return all(source.paths[int(i)].lower().endswith(JPEG_SUFFIXES) for i in indices)


class EncodedFiles(Dataset):
    """Item ``j`` (or key ``(j, epoch)``) of a file source subset: the file's bytes as a 1-D
    uint8 tensor, its label and ``j``; decoding is left to the device."""

    def __init__(self, source: FileSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.labels = source.targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, int]:
        j = key[0] if isinstance(key, tuple) else key
        path = self.source.root / self.source.paths[int(self.indices[j])]
        return read_file(str(path)), int(self.labels[j]), int(j)


def collate_encoded(
    items: list[tuple[Tensor, int, int]],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The batch's files end to end in one uint8 tensor, with their lengths: one shared
    buffer per batch crosses from a worker (a tensor per file would take a file descriptor
    each), split again by :func:`split_encoded`. Labels and positions become tensors."""
    data, labels, positions = zip(*items, strict=True)
    lengths = torch.tensor([len(d) for d in data])
    return torch.cat(data), lengths, torch.tensor(labels), torch.tensor(positions)


def split_encoded(flat: Tensor, lengths: Tensor) -> list[Tensor]:
    """The files of a collated batch, one 1-D uint8 tensor each."""
    return list(torch.split(flat, lengths.tolist()))


@dataclass(frozen=True)
class Crop:
    """How a decoded image of any size becomes a ``size`` x ``size`` one.

    ``scale`` set: RandomResizedCrop's box (area fraction in ``scale``, aspect ratio
    log-uniform in ``ratio``, ten tries, then the whole image clipped to ``ratio``). ``scale``
    None: the evaluation resize (shorter side to ``size / crop_fraction``) and centre crop.
    """

    size: int
    scale: tuple[float, float] | None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"

    def boxes(self, heights: Tensor, widths: Tensor, d: Draw) -> Tensor:
        """(B, 4) integer boxes (top, left, height, width), one per image."""
        tries = 10
        h, w = heights.double()[:, None], widths.double()[:, None]
        lo, hi = self.scale or (1.0, 1.0)
        area = h * w * d.uniform(lo, hi, tries).double().cpu()
        log_r = d.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), tries)
        r = torch.exp(log_r.double().cpu())
        bw, bh = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
        fits = (bw > 0) & (bw <= w) & (bh > 0) & (bh <= h)
        first = torch.where(fits.any(1), fits.float().argmax(1), -1)
        rows = torch.arange(len(first))
        # None fits: the whole image, clipped to the aspect-ratio range, centred.
        aspect = (w / h).squeeze(1)
        fw = torch.where(aspect < self.ratio[0], w.squeeze(1), torch.round(torch.minimum(
            w.squeeze(1), h.squeeze(1) * self.ratio[1])))  # fmt: skip
        fh = torch.where(aspect < self.ratio[0], torch.round(w.squeeze(1) / self.ratio[0]),
                         h.squeeze(1))  # fmt: skip
        ok = first >= 0
        cw = torch.where(ok, bw[rows, first.clamp(min=0)], fw)
        ch = torch.where(ok, bh[rows, first.clamp(min=0)], fh)
        u = d.uniform(0.0, 1.0, 2).double().cpu()
        top = torch.where(ok, torch.floor(u[:, 0] * (h.squeeze(1) - ch + 1)),
                          torch.div(h.squeeze(1) - ch, 2, rounding_mode="floor"))  # fmt: skip
        left = torch.where(ok, torch.floor(u[:, 1] * (w.squeeze(1) - cw + 1)),
                           torch.div(w.squeeze(1) - cw, 2, rounding_mode="floor"))  # fmt: skip
        return torch.stack([top, left, ch, cw], 1).long()

    def __call__(self, images: Sequence[Tensor], d: Draw) -> Tensor:
        """(B, C, size, size) uint8 from decoded (C, H, W) uint8 images."""
        mode = InterpolationMode(self.interpolation)
        out = []
        if self.scale is None:
            side = int(self.size / self.crop_fraction)
            for img in images:
                img = v2f.resize(img, [side], interpolation=mode, antialias=True)
                out.append(v2f.center_crop(img, [self.size]))
            return torch.stack(out)
        heights = torch.tensor([int(img.shape[-2]) for img in images])
        widths = torch.tensor([int(img.shape[-1]) for img in images])
        for img, (t, left, h, w) in zip(images, self.boxes(heights, widths, d).tolist(),
                                        strict=True):  # fmt: skip
            patch = img[:, t : t + h, left : left + w].float()
            patch = v2f.resize(patch, [self.size, self.size], interpolation=mode, antialias=True)
            out.append(patch.round_().clamp_(0, 255).to(torch.uint8))
        return torch.stack(out)


@dataclass
class DeviceTransform:
    """A large image's transform on the device: its crop, then the batched rest."""

    crop: Crop
    rest: BatchedTransform

    def __call__(self, images: Sequence[Tensor], d: Draw) -> Tensor:
        return self.rest(self.crop(images, d), d)


class DecodeLoader:
    """Batches of JPEG files read by loader workers, decoded and augmented on the device; a
    DataLoader's stand-in yielding ``(x, labels, indices)`` (x a list per view when
    ``transforms`` is a list), with the per-image loader's sampler and sharding.

    Args:
        loader: A DataLoader over :class:`EncodedFiles` with :func:`collate_encoded`.
        sampler: The epoch sampler that orders ``loader`` (has ``set_epoch``, ``epoch``).
        transforms: One device transform, or several for a multi-view batch.
        channels: 1 (decoded grey) or 3 (RGB).
        device: Where to decode and augment.
        seed: Seed of the augmentation draws.
        global_batch: Images per step over all processes.
        rows: This process's rows of the global batch.
    """

    def __init__(
        self,
        loader: DataLoader,
        sampler: Any,
        transforms: DeviceTransform | list[DeviceTransform],
        channels: int,
        device: torch.device,
        seed: int,
        global_batch: int,
        rows: slice,
    ) -> None:
        self.loader, self.sampler, self.transforms = loader, sampler, transforms
        self.mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        self.device, self.seed, self.global_batch, self.rows = device, seed, global_batch, rows

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _decode(self, data: list[Tensor], idx: Tensor) -> list[Tensor]:
        try:
            return decode_jpeg(data, mode=self.mode, device=self.device)
        except RuntimeError:  # find the file that fails, to name it
            dataset: EncodedFiles = self.loader.dataset  # type: ignore[assignment]
            for one, j in zip(data, idx.tolist(), strict=True):
                try:
                    decode_jpeg(one, mode=self.mode)
                except RuntimeError as e:
                    path = dataset.source.root / dataset.source.paths[int(dataset.indices[j])]
                    reason = str(e).splitlines()[0]
                    raise DataError(
                        f"cannot decode JPEG {shown(path.resolve())} ({reason}); fix or remove "
                        "the file, or set data.decode: workers"
                    ) from None
            raise

    def __iter__(self) -> Iterator[tuple[Any, Tensor, Tensor]]:
        epoch = self.sampler.epoch
        views = self.transforms if isinstance(self.transforms, list) else [self.transforms]
        for b, (flat, lengths, labels, idx) in enumerate(self.loader):
            images = self._decode(split_encoded(flat, lengths), idx)
            out = []
            for v, transform in enumerate(views):
                g = torch.Generator(device=self.device)
                g.manual_seed(item_seed(self.seed, epoch, b * 64 + v))
                out.append(transform(images, Draw(g, self.global_batch, self.rows)))
            x = out if isinstance(self.transforms, list) else out[0]
            yield x, labels.to(self.device), idx
