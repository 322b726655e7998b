"""The fast data path: batched augmentation with per-image parameters, matching the per-image
transforms in distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as v2f
from PIL import Image

from longtail.config import DataConfig
from longtail.data import ArraySource, RunData, build_sampler, build_transform
from longtail.data.batch_augment import Draw, _apply, pad_crop
from longtail.data.pipeline import DeviceLoader
from longtail.data.transforms import batched_transform

MEAN, STD = (0.0,), (1.0,)


SIZE = 32


def _dots(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey 32 x 32 images, black with one white pixel in the left quarter (at least 5 pixels
    from every edge): its place after augmentation gives the crop offset and the flip."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    where = np.stack([rng.integers(5, SIZE - 5, n), rng.integers(5, 9, n)], axis=1)
    images[np.arange(n), where[:, 0], where[:, 1]] = 255
    return images, where


def _moves(out: torch.Tensor, where: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row shift, column shift (undoing a flip) and whether each image was flipped."""
    flat = out.reshape(len(out), -1).argmax(1).numpy()
    rows, cols = flat // SIZE, flat % SIZE
    flipped = cols >= SIZE // 2  # a left-quarter dot lands in the right half only when flipped
    dx = np.where(flipped, (SIZE - 1 - cols) - where[:, 1], cols - where[:, 1])
    return rows - where[:, 0], dx, flipped


def test_pad_crop_and_flip_match_the_per_image_transform_in_distribution():
    n, size = 4000, SIZE
    images, where = _dots(n)
    batched = batched_transform("crop-flip", size, 1, MEAN, STD, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    out = batched(torch.from_numpy(images)[:, None], Draw(g, n, slice(0, n)))
    per_image = build_transform("crop-flip", size, 1, MEAN, STD)
    torch.manual_seed(0)
    ref = torch.stack([per_image(torch.from_numpy(im)[None]) for im in images])
    for got in (out, ref):
        dy, dx, flipped = _moves(got, where)
        for shift in (dy, dx):  # offsets -4..4, uniform (dy: the -dy of the crop offset)
            counts = np.bincount(shift + 4, minlength=9)
            assert counts.size == 9 and counts.min() > 0.8 * n / 9 and counts.max() < 1.2 * n / 9
        assert abs(flipped.mean() - 0.5) < 0.03
    # every image gets its own offset: a batch is not shifted as one
    assert len(set(_moves(out[:64], where[:64])[0].tolist())) > 5


def test_pad_crop_pads_with_zeros_like_random_crop():
    x = torch.full((2, 1, 6, 6), 1.0)
    g = torch.Generator().manual_seed(1)
    out = pad_crop(4)(x, Draw(g, 2, slice(0, 2)))
    assert out.shape == x.shape and set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", ["hybrid", "hybrid-jitter", "simclr"])
def test_rgb_transforms_grey_and_jitter_rates(name):
    n, size = 3000, 16  # the centre pixel stays inside the image after a 4-pixel shift
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 215, (n, 3))
    images = torch.from_numpy(
        np.broadcast_to(colours[:, :, None, None], (n, 3, size, size)).copy()
    ).to(torch.uint8)
    transform = batched_transform(name, size, 3, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    out = transform(images, Draw(torch.Generator().manual_seed(2), n, slice(0, n)))
    assert out.shape == (n, 3, size, size) and out.min() >= 0 and out.max() <= 1
    centre = out[:, :, size // 2, size // 2]
    grey = (centre.max(1).values - centre.min(1).values) < 1e-5
    changed = (centre - images[:, :, 0, 0].float() / 255).abs().amax(1) > 1e-4
    assert abs(grey.float().mean() - 0.2) < 0.03  # RandomGrayscale(0.2)
    if name != "hybrid":  # colour jitter with p 0.8 changes about 80% of the (non-grey) images
        assert abs(changed[~grey].float().mean() - 0.8) < 0.04
    else:
        assert not changed[~grey].any()


def test_simclr_crops_match_random_resized_crop_in_distribution():
    n, size = 2000, 16
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, :, : size // 2] = 255  # left half white
    transform = batched_transform("simclr", size, 1, MEAN, STD, torch.device("cpu"))
    transform.ops = transform.ops[:1]  # the random-resized crop alone
    out = transform(x, Draw(torch.Generator().manual_seed(3), n, slice(0, n)))
    white = out.mean(dim=(1, 2, 3))
    from torchvision.transforms import v2

    torch.manual_seed(3)
    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0))
    ref = torch.stack([crop(img).float().mean() / 255 for img in x])
    # the share of white in a crop: same mean and spread as torchvision's, to 0.03
    assert abs(white.mean() - ref.mean()) < 0.03 and abs(white.std() - ref.std()) < 0.03


def _loader(labels: np.ndarray, images: np.ndarray, rank: int, world: int, epoch: int, batch=8):
    s = build_sampler("instance", labels, seed=0).shard(rank, world, batch)
    s.set_epoch(epoch)
    transform = batched_transform("crop-flip", images.shape[-1], 1, MEAN, STD, torch.device("cpu"))
    loader = DeviceLoader(torch.from_numpy(images)[:, None], torch.as_tensor(labels), s,
                          batch // world, batch, rank, transform, seed=5)  # fmt: skip
    return list(loader)


def test_device_loader_is_seeded_sharded_and_per_epoch():
    images, _ = _dots(40, seed=1)
    labels = np.arange(40) % 4
    one = _loader(labels, images, 0, 1, epoch=3)
    assert len(one) == 5 and torch.equal(one[0][0], _loader(labels, images, 0, 1, 3)[0][0])
    assert not torch.equal(one[0][0], _loader(labels, images, 0, 1, 4)[0][0])
    halves = [_loader(labels, images, r, 2, epoch=3) for r in range(2)]
    for b in range(5):  # the two processes' slices make up the single process's batch exactly
        torch.testing.assert_close(torch.cat([halves[0][b][0], halves[1][b][0]]), one[b][0])
        assert torch.equal(torch.cat([halves[0][b][2], halves[1][b][2]]), one[b][2])
        assert torch.equal(one[b][1], torch.as_tensor(labels)[one[b][2]])


def _rundata(tmp_path, images: np.ndarray, **cfg) -> RunData:
    src = ArraySource(images, np.arange(len(images)) % 4, list("abcd"), MEAN, STD)
    return RunData(DataConfig(image_size=images.shape[1], ratio=None, **cfg), src,
                   np.arange(len(images)), None, None)  # fmt: skip


def test_the_fast_path_is_chosen_only_where_it_applies(tmp_path):
    images, _ = _dots(32)
    data = _rundata(tmp_path, images)
    assert isinstance(
        data.train_loader(sampler="instance", batch_size=8, transforms="crop-flip"), DeviceLoader
    )
    multi = data.train_loader(
        sampler="instance", batch_size=8, transforms=["hybrid-jitter", "hybrid"]
    )
    assert isinstance(multi, DeviceLoader) and len(next(iter(multi))[0]) == 2
    # BCL's three views (AutoAugment + Cutout, two SimCLR views) are batched too
    bcl = data.train_loader(
        sampler="instance", batch_size=8, transforms=["strong", "simclr", "simclr"]
    )
    assert isinstance(bcl, DeviceLoader) and len(next(iter(bcl))[0]) == 3
    # a transform without a batched form (RandAugment's large-image crop): the per-image path
    other = data.train_loader(sampler="instance", batch_size=8, transforms=["imagenet", "simclr"])
    assert isinstance(other, torch.utils.data.DataLoader)
    off = _rundata(tmp_path, images, fast_path=False)
    assert isinstance(off.train_loader(sampler="instance", batch_size=8, transforms="crop-flip"),
                      torch.utils.data.DataLoader)  # fmt: skip


def test_folders_are_cached_when_square(tmp_path):
    from longtail.data.pipeline import cached_images
    from longtail.data.sources import load_source

    for i, size in enumerate([(20, 20), (20, 20), (30, 30)]):
        d = tmp_path / "imgs" / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (i * 40, 0, 0)).save(d / f"{i}.png")
    src = load_source("folder", tmp_path / "imgs", "train")
    cached = cached_images(src, np.arange(3), 16, 10)
    assert cached.shape == (3, 3, 16, 16) and cached.dtype == torch.uint8
    assert cached_images(src, np.arange(3), 16, 2) is None  # over the size limit
    Image.new("RGB", (20, 30)).save(tmp_path / "imgs" / "train" / "c0" / "wide.png")
    src = load_source("folder", tmp_path / "imgs", "train")
    assert cached_images(src, np.arange(4), 16, 10) is None  # not square: per-image crops


# --- AutoAugment and Cutout (BCL's strong view) -------------------------------------------------


def _photos(n: int, channels: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure (gradients, a bright square) and noise."""
    gen = torch.Generator().manual_seed(seed)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = (i * 3 + j * 5).float()[None, None] % 200
    noise = torch.randint(0, 50, (n, channels, size, size), generator=gen).float()
    x = base + noise
    x[:, :, 8:16, 10:20] += 40
    return x.clamp(0, 255).to(torch.uint8)


REFERENCE_OPS = {  # name -> (torchvision functional op on uint8, magnitude)
    "ShearX": (lambda x, m: v2f.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
               shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0]), 0.3),
    "ShearY": (lambda x, m: v2f.affine(x, angle=0.0, translate=[0, 0], scale=1.0,
               shear=[0.0, math.degrees(math.atan(m))], center=[0, 0]), -0.2),
    "TranslateX": (lambda x, m: v2f.affine(x, angle=0.0, translate=[int(m), 0], scale=1.0,
                   shear=[0.0, 0.0]), 7.6),
    "TranslateY": (lambda x, m: v2f.affine(x, angle=0.0, translate=[0, int(m)], scale=1.0,
                   shear=[0.0, 0.0]), -5.0),
    "Rotate": (lambda x, m: v2f.rotate(x, angle=m), 23.0),
    "Brightness": (lambda x, m: v2f.adjust_brightness(x, 1 + m), 0.5),
    "Color": (lambda x, m: v2f.adjust_saturation(x, 1 + m), -0.6),
    "Contrast": (lambda x, m: v2f.adjust_contrast(x, 1 + m), 0.7),
    "Sharpness": (lambda x, m: v2f.adjust_sharpness(x, 1 + m), 0.9),
    "Posterize": (lambda x, m: v2f.posterize(x, int(m)), 5),
    "Solarize": (lambda x, m: v2f.solarize(x, 255 * m), 0.4),
    "AutoContrast": (lambda x, m: v2f.autocontrast(x), 0.0),
    "Equalize": (lambda x, m: v2f.equalize(x), 0.0),
    "Invert": (lambda x, m: v2f.invert(x), 0.0),
}  # fmt: skip


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(REFERENCE_OPS))
def test_each_autoaugment_op_is_torchvisions(name, channels):
    images = _photos(6, channels)
    reference, magnitude = REFERENCE_OPS[name]
    expected = torch.stack([reference(im, magnitude) for im in images]).float() / 255
    m = torch.full((len(images),), float(magnitude))
    got = _apply(name, images.float() / 255, m)
    # torchvision rounds to uint8 after the op; a nearest-neighbour sample may also round a
    # coordinate at exactly half a pixel the other way on a few pixels.
    close = (got - expected).abs() <= 1.5 / 255
    assert close.float().mean() > 0.99, (name, (got - expected).abs().max())


def test_autoaugment_magnitudes_are_per_image():
    images = _photos(8, 1)
    m = torch.tensor([0.0, 10.0, 20.0, 30.0, -30.0, -20.0, -10.0, 0.0])
    got = _apply("Rotate", images.float() / 255, m)
    for i, angle in enumerate(m.tolist()):
        expected = v2f.rotate(images[i], angle=angle).float() / 255
        assert ((got[i] - expected).abs() <= 1.5 / 255).float().mean() > 0.99


def test_strong_view_matches_the_per_image_transform_in_distribution():
    """The batched strong view (pad-crop, flip, AutoAugment CIFAR-10, Cutout) against the
    per-image transform: how often pixels change, the mean and spread of the images, and the
    share of pixels Cutout sets to the mean."""
    n, size = 1500, SIZE
    images = _photos(n, 3, seed=1)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    batched = batched_transform("strong", size, 3, mean, std, torch.device("cpu"))
    assert batched is not None
    g = torch.Generator().manual_seed(0)
    out = batched(images, Draw(g, n, slice(0, n)))
    per_image = build_transform("strong", size, 3, mean, std)
    torch.manual_seed(0)
    ref = torch.stack([per_image(im) for im in images])
    # Mean brightness: within 4 standard errors (images differ a lot: Invert, Solarize, ...).
    means_out, means_ref = out.mean((1, 2, 3)), ref.mean((1, 2, 3))
    se = math.sqrt((means_out.var() + means_ref.var()).item() / n)
    assert abs(means_out.mean() - means_ref.mean()).item() < 4 * se
    assert abs(out.std() / ref.std() - 1).item() < 0.02  # spread of the pixel values
    # Cutout: a quarter of the pixels set to exactly the mean (0 once normalised)
    assert abs((out == 0).float().mean().item() - (ref == 0).float().mean().item()) < 0.005
    # Each image's Cutout square: 16 x 16 of 32 x 32 (a quarter), inside the image.
    zero_rows = (out == 0).all(1).sum(2).amax(1)
    assert (zero_rows >= 16).float().mean() > 0.95
    # ... at its own place in each image
    corners = [tuple((im == 0).all(0).nonzero().min(0).values.tolist()) for im in out[:50]]
    assert len(set(corners)) > 16
