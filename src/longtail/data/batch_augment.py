"""The fast data path: images resident on the training device, augmented a batch at a time.

For data sets that fit in memory (CIFAR, Fashion-MNIST, small image folders) the images are
decoded once, kept as one uint8 tensor on the training device, and each batch is augmented
there with tensor operations, every image with its own random parameters: no per-image
Python, no workers, no host-to-device copies. The random parameters of a batch come from a
generator seeded by (seed, epoch, batch, view) and are drawn for the whole global batch, of
which each process keeps its slice: the images do not depend on the number of processes,
and a resumed run sees the same ones.

This module holds the batched operations; each transform's batched form is registered with
the transform itself in :mod:`longtail.data.transforms` (its ``batched`` metadata: the same
operations and parameters as the per-image form; random draws differ), BCL's ``strong`` view
(AutoAugment's CIFAR-10 policy and Cutout) included. A transform without one (RandAugment,
blur, large-image crops) leaves its loader on the per-image path, and the run says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

GREY = (0.299, 0.587, 0.114)  # the luma weights torchvision's grayscale uses


class Draw:
    """Random numbers for a global batch, of which this process keeps its rows."""

    def __init__(self, generator: torch.Generator, global_batch: int, rows: slice) -> None:
        self.g, self.n, self.rows = generator, global_batch, rows

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        u = torch.rand(self.n, *shape, generator=self.g, device=self.g.device)
        return (low + (high - low) * u)[self.rows]

    def chance(self, p: float) -> Tensor:
        return self.uniform(0.0, 1.0) < p

    def integers(self, high: int) -> Tensor:
        return torch.randint(0, high, (self.n,), generator=self.g, device=self.g.device)[self.rows]


Op = Callable[[Tensor, Draw], Tensor]


def pad_crop(padding: int) -> Op:
    """RandomCrop(size, padding): zero padding, then a window at a random offset."""

    def op(x: Tensor, d: Draw) -> Tensor:
        b, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        oy, ox = d.integers(2 * padding + 1), d.integers(2 * padding + 1)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chans, rows, cols]

    return op


def flip(x: Tensor, d: Draw) -> Tensor:
    """RandomHorizontalFlip(0.5)."""
    return torch.where(d.chance(0.5)[:, None, None, None], x.flip(-1), x)


def resized_crop(size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> Op:
    """RandomResizedCrop: a box of random area fraction and aspect ratio, resampled to
    ``size`` (bilinear). Boxes that would not fit are clipped instead of redrawn."""

    def op(x: Tensor, d: Draw) -> Tensor:
        b, _, h, w = x.shape
        area = h * w * d.uniform(*scale)
        aspect = torch.exp(d.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw = torch.sqrt(area * aspect).clamp(1, w)
        bh = torch.sqrt(area / aspect).clamp(1, h)
        x0, y0 = d.uniform(0, 1) * (w - bw), d.uniform(0, 1) * (h - bh)
        boxes = torch.stack(
            [torch.arange(b, device=x.device, dtype=x.dtype), x0, y0, x0 + bw, y0 + bh], 1
        )
        return roi_align(
            x, boxes.to(x.dtype), size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )

    return op


def _grey(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GREY, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x * w).sum(1, keepdim=True)


def grayscale(p: float) -> Op:
    """RandomGrayscale(p) for RGB images (grey ones are left alone)."""

    def op(x: Tensor, d: Draw) -> Tensor:
        if x.shape[1] == 1:
            return x
        return torch.where(d.chance(p)[:, None, None, None], _grey(x).expand_as(x), x)

    return op


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    top, _ = x.max(1)
    low, _ = x.min(1)
    delta = top - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        top == r,
        ((g - b) / safe) % 6,
        torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    sat = torch.where(top > 0, delta / torch.where(top > 0, top, torch.ones_like(top)), 0.0)
    return torch.stack([hue, sat, top], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k)).clamp(0, 1)


def color_jitter(brightness: float, contrast: float, saturation: float, hue: float, p: float) -> Op:
    """RandomApply([ColorJitter(...)], p): brightness, contrast, saturation, hue factors drawn
    per image (applied in this order; torchvision draws the order per image)."""

    def op(x: Tensor, d: Draw) -> Tensor:
        on = d.chance(p)[:, None, None, None]
        y = x
        if brightness:
            y = (y * d.uniform(1 - brightness, 1 + brightness)[:, None, None, None]).clamp(0, 1)
        if contrast:
            f = d.uniform(1 - contrast, 1 + contrast)[:, None, None, None]
            mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
            y = (f * y + (1 - f) * mean).clamp(0, 1)
        if saturation and x.shape[1] == 3:
            f = d.uniform(1 - saturation, 1 + saturation)[:, None, None, None]
            y = (f * y + (1 - f) * _grey(y)).clamp(0, 1)
        if hue and x.shape[1] == 3:
            hsv = _rgb_to_hsv(y)
            shift = d.uniform(-hue, hue)[:, None, None]
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            y = _hsv_to_rgb(hsv)
        return torch.where(on, y, x)

    return op


@dataclass
class BatchedTransform:
    """A batched transform: ops on float images in [0, 1], then normalisation."""

    ops: list[Op]
    mean: Tensor
    std: Tensor
    after: list[Op] = field(default_factory=list)  # on the normalised images (Cutout)

    def __call__(self, images: Tensor, draw: Draw) -> Tensor:
        x = images.float() / 255
        for op in self.ops:
            x = op(x, draw)
        x = (x - self.mean) / self.std
        for op in self.after:
            x = op(x, draw)
        return x


# --- AutoAugment and Cutout (BCL's strong view), batched -------------------------------------
# The policy and the magnitude of each bin are read from torchvision's AutoAugment, so the
# batched view draws from exactly the per-image transform's policy. Ops work on floats in [0, 1]
# (the per-image path rounds to uint8 after each op; the difference is below 1/255).


def _inverse_affine(
    angle: Tensor, shear_x: Tensor, shear_y: Tensor, tx: Tensor, ty: Tensor, cx: float, cy: float
) -> Tensor:
    """(B, 2, 3) maps from output to input pixel coordinates (relative to the image centre)
    of the affine transforms torchvision's ``affine`` describes: rotation by ``angle``,
    shears (degrees), translation, about the point (cx, cy)."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    # The inverse of [[a, b], [c, d]] (determinant 1), then the centre and translation undone.
    m00, m01, m10, m11 = d, -b, -c, a
    m02 = m00 * (-cx - tx) + m01 * (-cy - ty) + cx
    m12 = m10 * (-cx - tx) + m11 * (-cy - ty) + cy
    return torch.stack([torch.stack([m00, m01, m02], 1), torch.stack([m10, m11, m12], 1)], 1)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Nearest-neighbour resampling with zero fill, ``theta`` as from :func:`_inverse_affine`."""
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2  # pixel centres
    xs = torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, h * w, 3)
    src = base @ theta.to(x.dtype).transpose(1, 2)  # (B, HW, 2) input coordinates
    grid = src / torch.tensor([w / 2, h / 2], device=x.device, dtype=x.dtype)
    return F.grid_sample(
        x, grid.view(b, h, w, 2), mode="nearest", padding_mode="zeros", align_corners=False
    )


def _blend(x: Tensor, y: Tensor, factor: Tensor) -> Tensor:
    return (factor[:, None, None, None] * x + (1 - factor[:, None, None, None]) * y).clamp(0, 1)


def _sharpen(x: Tensor, factor: Tensor) -> Tensor:
    c = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    blurred = x.clone()  # the one-pixel border keeps the image's own values
    blurred[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return _blend(x, blurred, factor)


def _autocontrast(x: Tensor) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), 1 / (high - low).clamp_min(1e-12))
    return ((x - torch.where(flat, torch.zeros_like(low), low)) * scale).clamp(0, 1)


def _equalize(x: Tensor) -> Tensor:
    """PIL's histogram equalisation of each channel of each image, on 8-bit levels."""
    b, c, h, w = x.shape
    levels = (x * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.long)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    last = hist.gather(1, (levels.amax(1, keepdim=True)))  # the count of the top level
    step = (h * w - last) // 255
    before = hist.cumsum(1) - hist
    lut = ((step // 2 + before) // step.clamp_min(1)).clamp(max=255)
    out = lut.gather(1, levels).to(x.dtype) / 255
    return torch.where(step > 0, out, x.view(b * c, h * w)).view(b, c, h, w)


def _apply(name: str, x: Tensor, m: Tensor) -> Tensor:
    """AutoAugment operation ``name`` with per-image magnitudes ``m`` (signed)."""
    n, zero = x.shape[0], torch.zeros_like(m)
    h, w = x.shape[-2:]
    if name in ("ShearX", "ShearY"):
        deg = torch.rad2deg(torch.atan(m))
        sx, sy = (deg, zero) if name == "ShearX" else (zero, deg)
        return _warp(x, _inverse_affine(zero, sx, sy, zero, zero, -w / 2, -h / 2))
    if name in ("TranslateX", "TranslateY"):
        t = torch.trunc(m)  # whole pixels, as torchvision's int(magnitude)
        tx, ty = (t, zero) if name == "TranslateX" else (zero, t)
        return _warp(x, _inverse_affine(zero, zero, zero, tx, ty, 0.0, 0.0))
    if name == "Rotate":  # rotate() turns counter-clockwise: the affine angle is -m
        return _warp(x, _inverse_affine(-m, zero, zero, zero, zero, 0.0, 0.0))
    if name == "Brightness":
        return _blend(x, torch.zeros_like(x), 1 + m)
    if name == "Color":  # saturation: a grey image has none to change
        return x if x.shape[1] == 1 else _blend(x, _grey(x).expand_as(x), 1 + m)
    if name == "Contrast":
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean.expand_as(x), 1 + m)
    if name == "Sharpness":
        return _sharpen(x, 1 + m)
    if name == "Posterize":  # keep the top `bits` bits of each 8-bit level
        keep = (2 ** (8 - m.long()))[:, None, None, None]
        return torch.div((x * 255).round(), keep, rounding_mode="floor") * keep / 255
    if name == "Solarize":
        return torch.where(x >= m[:, None, None, None], 1 - x, x)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 1 - x
    raise ValueError(f"no batched form of AutoAugment's {name!r} (n={n})")


def _apply_rows(name: str, x: Tensor, rows: Tensor, m: Tensor) -> Tensor:
    """``x`` with operation ``name`` applied to its images ``rows`` (magnitudes ``m``, float64
    on the CPU, signed), the others as they are."""
    if name == "Solarize":  # a threshold in [0, 1]
        m = m.clamp(max=1.0)
    rows = rows.to(x.device)
    return x.index_copy(0, rows, _apply(name, x[rows], m.to(x.device, x.dtype)))


class AutoAugmentPolicy:
    """torchvision's AutoAugment for a batch: each image draws its own sub-policy, whether
    each of its two operations applies, and each magnitude's sign."""

    def __init__(self, policy: v2.AutoAugmentPolicy, size: int) -> None:
        reference = v2.AutoAugment(policy)
        self.policies = reference._policies  # [((op, p, bin), (op, p, bin)), ...]
        self.names = sorted({op for sub in self.policies for op, _, _ in sub})
        space = reference._AUGMENTATION_SPACE
        self.magnitudes: dict[str, Tensor | None] = {}
        self.signed: dict[str, bool] = {}
        for name in self.names:
            values, signed = space[name][0](10, size, size), space[name][1]
            self.magnitudes[name] = None if values is None else values.double()
            self.signed[name] = signed
        # Per sub-policy and slot: operation index, probability, magnitude bin.
        self.op = torch.tensor([[self.names.index(o) for o, _, _ in sub] for sub in self.policies])
        self.p = torch.tensor([[p for _, p, _ in sub] for sub in self.policies])
        self.bin = torch.tensor([[b or 0 for _, _, b in sub] for sub in self.policies])

    def __call__(self, x: Tensor, d: Draw) -> Tensor:
        k = d.integers(len(self.policies)).cpu()
        for slot in range(2):
            applies = d.uniform(0.0, 1.0).cpu() <= self.p[k, slot]
            negative = d.uniform(0.0, 1.0).cpu() <= 0.5
            op, bins = self.op[k, slot], self.bin[k, slot]
            for i, name in enumerate(self.names):
                rows = torch.nonzero(applies & (op == i)).flatten()
                if not len(rows):
                    continue
                values = self.magnitudes[name]
                m = torch.zeros(len(rows), dtype=torch.float64)
                if values is not None:
                    m = values[bins[rows]]
                    if self.signed[name]:
                        m = torch.where(negative[rows], -m, m)
                x = _apply_rows(name, x, rows, m)
        return x


def cutout(fraction: float) -> Op:
    """RandomErasing(p=1, scale=(f, f), ratio=(1, 1), value=0) on normalised images: a
    square of ``fraction`` of the area, inside the image, set to 0 (the mean)."""

    def op(x: Tensor, d: Draw) -> Tensor:
        _, _, h, w = x.shape
        side = int(round(math.sqrt(fraction * h * w)))
        if not (side < h and side < w):
            return x
        top, left = d.integers(h - side + 1), d.integers(w - side + 1)
        ys = torch.arange(h, device=x.device)[None, :, None]
        xs = torch.arange(w, device=x.device)[None, None, :]
        inside = (ys >= top[:, None, None]) & (ys < top[:, None, None] + side)
        inside = inside & (xs >= left[:, None, None]) & (xs < left[:, None, None] + side)
        return x.masked_fill(inside[:, None], 0.0)

    return op


class RandAugmentBatch:
    """torchvision's RandAugment for a batch: for each of ``num_ops`` rounds every image
    draws one of its 14 operations uniformly (Identity included) and a sign for the
    magnitude, which is bin ``magnitude`` of 31 as torchvision's (sizes for translations from
    the ``size`` x ``size`` images)."""

    def __init__(self, num_ops: int, magnitude: int, size: int) -> None:
        reference = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        space = reference._AUGMENTATION_SPACE
        self.names = list(space)
        self.num_ops = num_ops
        self.magnitudes: dict[str, float] = {}
        self.signed: dict[str, bool] = {}
        for name, (values_of, signed) in space.items():
            values = values_of(reference.num_magnitude_bins, size, size)
            self.magnitudes[name] = 0.0 if values is None else float(values[magnitude])
            self.signed[name] = bool(signed)

    def __call__(self, x: Tensor, d: Draw) -> Tensor:
        for _ in range(self.num_ops):
            op = d.integers(len(self.names)).cpu()
            negative = (d.uniform(0.0, 1.0) <= 0.5).cpu()
            for i, name in enumerate(self.names):
                rows = torch.nonzero(op == i).flatten()
                if name == "Identity" or not len(rows):
                    continue
                m = torch.full((len(rows),), self.magnitudes[name], dtype=torch.float64)
                if self.signed[name]:
                    m = torch.where(negative[rows], -m, m)
                x = _apply_rows(name, x, rows, m)
        return x


def gaussian_blur(kernel: int, sigma: tuple[float, float], p: float) -> Op:
    """RandomApply([GaussianBlur(kernel, sigma)], p): each chosen image blurred with its own
    sigma, uniform in ``sigma``, by a separable kernel with reflected borders."""
    half = kernel // 2

    def op(x: Tensor, d: Draw) -> Tensor:
        b, c, h, w = x.shape
        s = d.uniform(*sigma)[:, None]
        on = d.chance(p)
        t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)[None, :]
        k = torch.exp(-0.5 * (t / s.to(x.dtype)) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, kernel)
        y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")
        y = F.conv2d(y, k[:, None, None, :], groups=b * c)
        y = F.conv2d(y, k[:, None, :, None], groups=b * c).view(b, c, h, w)
        return torch.where(on[:, None, None, None], y, x)

    return op
