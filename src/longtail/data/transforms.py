"""Augmentation transforms built with torchvision.transforms.v2.

Every transform starts with ``ToImage`` (so it accepts PIL images and uint8 (C, H, W) tensors)
and ends with float conversion to [0, 1] and per-channel normalisation. "View" is kept for
what contrastive methods mean by it: one of several augmented copies of the same image
(:class:`MultiView`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from longtail.data.batch_augment import (
    AutoAugmentPolicy,
    BatchedTransform,
    Op,
    RandAugmentBatch,
    color_jitter,
    cutout,
    flip,
    gaussian_blur,
    grayscale,
    pad_crop,
    resized_crop,
)
from longtail.data.decode import Crop, DeviceTransform
from longtail.registry import Registry

# Images up to this side get the CIFAR-style treatment (pad-and-crop, no centre crop margin).
SMALL_MAX = 64
# Evaluation resize for large images: the usual 224 / 256 centre-crop fraction.
CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Resize:
    """How images over SMALL_MAX are resized: the evaluation resize (shorter side to
    ``size / crop_fraction``, then a centre crop of ``size``) and the interpolation of every
    resize. A pretrained network's weights come with their own."""

    crop_fraction: float = CROP_FRACTION
    interpolation: str = "bilinear"

    @property
    def mode(self) -> v2.InterpolationMode:
        return v2.InterpolationMode(self.interpolation)


TransformBuilder = Callable[
    [int, int, Sequence[float], Sequence[float], Resize], Callable[[Any], Any]
]
#: Each transform: its per-image builder (torchvision v2, on PIL images or uint8
#: tensors), and in its metadata ``batched``, ``(size, channels) -> (ops, ops after
#: normalisation)``, the same operations on a whole batch on the device (the fast path) for
#: images up to SMALL_MAX; and in ``device``, ``(size, channels) -> (crop scale or None,
#: ops, ops after normalisation)``, its form for larger JPEGs decoded on the device (the crop
#: to ``size`` per image, None for the evaluation resize and centre crop; then the ops on the
#: batch). A transform without the form it needs trains on the per-image path.
TRANSFORMS: Registry[TransformBuilder] = Registry("transform")
BatchedBuilder = Callable[[int, int], tuple[list[Op], list[Op]]]
RRC_SCALE = (0.08, 1.0)  # RandomResizedCrop's default area range


def _batched_jitter(channels: int) -> Op:
    return color_jitter(0.4, 0.4, 0.4 if channels == 3 else 0, 0.1 if channels == 3 else 0, 0.8)


def _wrap(
    steps: list[Any], mean: Sequence[float], std: Sequence[float], after: Sequence[Any] = ()
) -> v2.Compose:
    """ToImage, ``steps`` on the uint8 image, float in [0, 1], normalise, then ``after``."""
    return v2.Compose(
        [
            v2.ToImage(),
            *steps,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            *after,
        ]
    )


def _grayscale(channels: int) -> list[Any]:
    # A grey image is already grey; RandomGrayscale would only cost time.
    return [v2.RandomGrayscale(p=0.2)] if channels == 3 else []


def _jitter(channels: int) -> list[Any]:
    # Saturation and hue are undefined for one channel, so grey images get brightness/contrast.
    jitter = v2.ColorJitter(0.4, 0.4, 0.4, 0.1) if channels == 3 else v2.ColorJitter(0.4, 0.4)
    return [v2.RandomApply([jitter], p=0.8)]


def _crop_flip(size: int) -> list[Any]:
    # Resize is a no-op for images already at `size`, so native CIFAR/MNIST images pass through.
    return [v2.Resize(size), v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]


def _resized_crop_flip(size: int, resize: Resize) -> list[Any]:
    return [v2.RandomResizedCrop(size, interpolation=resize.mode), v2.RandomHorizontalFlip()]


@TRANSFORMS.register(
    "test", batched=lambda size, c: ([], []), device=lambda size, c: (None, [], [])
)
def _test(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    if size <= SMALL_MAX:
        return _wrap([v2.Resize(size), v2.CenterCrop(size)], mean, std)
    side = int(size / resize.crop_fraction)
    return _wrap([v2.Resize(side, interpolation=resize.mode), v2.CenterCrop(size)], mean, std)


@TRANSFORMS.register("crop-flip", batched=lambda size, c: ([pad_crop(4), flip], []))
def _cf(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    return _wrap(_crop_flip(size), mean, std)


@TRANSFORMS.register("hybrid", batched=lambda size, c: ([pad_crop(4), flip, grayscale(0.2)], []))
def _hybrid(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    return _wrap(_crop_flip(size) + _grayscale(channels), mean, std)


@TRANSFORMS.register(
    "hybrid-jitter",
    batched=lambda size, c: ([pad_crop(4), flip, _batched_jitter(c), grayscale(0.2)], []),
)
def _hj(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    return _wrap(_crop_flip(size) + _jitter(channels) + _grayscale(channels), mean, std)


@TRANSFORMS.register(
    "strong",
    batched=lambda size, c: (
        [pad_crop(4), flip, AutoAugmentPolicy(v2.AutoAugmentPolicy.CIFAR10, size)],
        [cutout(0.25)],  # after normalisation: the square is set to the mean
    ),
    device=lambda size, c: (RRC_SCALE, [flip, RandAugmentBatch(2, 9, size)], []),
)
def _strong(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    """BCL's classifier view. Small images: pad-crop, flip, AutoAugment's CIFAR-10 policy and
    Cutout (a square of half the side set to the mean, inside the image); large ones:
    random-resized crop, flip and RandAugment (2 ops, magnitude 9)."""
    if size <= SMALL_MAX:
        policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
        cutout = v2.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0)
        return _wrap([*_crop_flip(size), policy], mean, std, after=[cutout])
    return _wrap(
        [*_resized_crop_flip(size, resize), v2.RandAugment(num_ops=2, magnitude=9)], mean, std
    )


@TRANSFORMS.register(
    "simclr",
    batched=lambda size, c: (
        [resized_crop(size, (0.2, 1.0), (3 / 4, 4 / 3)), flip, _batched_jitter(c), grayscale(0.2)],
        [],
    ),
    device=lambda size, c: (
        (0.2, 1.0),
        [flip, _batched_jitter(c), grayscale(0.2), _batched_blur(size)],
        [],
    ),
)
def _simclr(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    """SimCLR's views as BCL uses them: random-resized crop (20-100% of the area), flip,
    colour jitter (p 0.8), grayscale (p 0.2); large images also get Gaussian blur (p 0.5)."""
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=resize.mode)
    steps = [crop, v2.RandomHorizontalFlip()]
    steps += _jitter(channels) + _grayscale(channels)
    if size > SMALL_MAX:
        blur = v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))
        steps.append(v2.RandomApply([blur], p=0.5))
    return _wrap(steps, mean, std)


def _blur_kernel(size: int) -> int:
    return 2 * (size // 20) + 1  # about a tenth of the side, odd


def _batched_blur(size: int) -> Op:
    return gaussian_blur(_blur_kernel(size), (0.1, 2.0), 0.5)


@TRANSFORMS.register("imagenet", device=lambda size, c: (RRC_SCALE, [flip], []))
def _inet(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    return _wrap(_resized_crop_flip(size, resize), mean, std)


@TRANSFORMS.register(
    "imagenet-hybrid", device=lambda size, c: (RRC_SCALE, [flip, grayscale(0.2)], [])
)
def _ih(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    return _wrap(_resized_crop_flip(size, resize) + _grayscale(channels), mean, std)


@TRANSFORMS.register(
    "imagenet-hybrid-jitter",
    device=lambda size, c: (RRC_SCALE, [flip, _batched_jitter(c), grayscale(0.2)], []),
)
def _ihj(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float], resize: Resize
) -> v2.Compose:
    return _wrap(
        _resized_crop_flip(size, resize) + _jitter(channels) + _grayscale(channels), mean, std
    )


def build_transform(
    name: str,
    image_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: Resize | None = None,
) -> Callable[[Any], torch.Tensor]:
    """Build a registered transform.

    Args:
        name: One of ``TRANSFORMS.names()``.
        image_size: Side of the square output.
        channels: 1 or 3; must match the images and ``mean``/``std``.
        mean: Per-channel normalisation mean in [0, 1] units.
        std: Per-channel normalisation std in [0, 1] units.
        resize: How images over SMALL_MAX are resized (default: 0.875 crop, bilinear).

    Returns:
        A callable mapping a PIL image or uint8 tensor to a normalised float tensor.
    """
    builder = TRANSFORMS.get(name)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} value(s); got {mean} and {std}")
    if image_size < 1:
        raise ValueError(f"image size must be >= 1; got {image_size}")
    return builder(int(image_size), channels, mean, std, resize or Resize())


class MultiView:
    """Several augmented views of the same image, e.g. the two views of contrastive learning.

    Args:
        transforms: One transform per view.
    """

    def __init__(self, transforms: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> list[torch.Tensor]:
        return [t(x) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"MultiView({self.transforms!r})"


def batched_transform(
    name: str,
    size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> BatchedTransform | None:
    """The batched form of transform ``name``, or None where it has none (images over
    SMALL_MAX, or a transform registered without ``batched``): the per-image path then."""
    batched = TRANSFORMS.meta(name).get("batched")
    if size > SMALL_MAX or batched is None:
        return None
    ops, after = batched(size, channels)
    shape = (1, channels, 1, 1)
    return BatchedTransform(
        ops,
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
        after,
    )


def device_transform(
    name: str,
    size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: Resize,
    device: torch.device,
) -> DeviceTransform | None:
    """The form of transform ``name`` for JPEGs decoded on ``device``, or None where it has
    none (images up to SMALL_MAX, which the fast path serves, or no ``device`` form)."""
    form = TRANSFORMS.meta(name).get("device")
    if size <= SMALL_MAX or form is None:
        return None
    scale, ops, after = form(size, channels)
    shape = (1, channels, 1, 1)
    rest = BatchedTransform(
        ops,
        torch.tensor(mean, device=device).view(shape),
        torch.tensor(std, device=device).view(shape),
        after,
    )
    crop = Crop(size, scale, crop_fraction=resize.crop_fraction, interpolation=resize.interpolation)
    return DeviceTransform(crop, rest)
