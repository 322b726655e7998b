"""The fast data path: batched augmentation with per-image parameters, matching the per-image
presets in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.config import DataConfig
from longtail.data import ArraySource, RunData, build_sampler, build_transform
from longtail.data.batch_augment import DeviceLoader, Draw, batch_preset, pad_crop

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


def test_pad_crop_and_flip_match_the_per_image_preset_in_distribution():
    n, size = 4000, SIZE
    images, where = _dots(n)
    batched = batch_preset("crop-flip", size, 1, MEAN, STD, torch.device("cpu"))
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
def test_rgb_presets_grey_and_jitter_rates(name):
    n, size = 3000, 16  # the centre pixel stays inside the image after a 4-pixel shift
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 215, (n, 3))
    images = torch.from_numpy(
        np.broadcast_to(colours[:, :, None, None], (n, 3, size, size)).copy()
    ).to(torch.uint8)
    preset = batch_preset(name, size, 3, (0.0,) * 3, (1.0,) * 3, torch.device("cpu"))
    out = preset(images, Draw(torch.Generator().manual_seed(2), n, slice(0, n)))
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
    preset = batch_preset("simclr", size, 1, MEAN, STD, torch.device("cpu"))
    preset.ops = preset.ops[:1]  # the random-resized crop alone
    out = preset(x, Draw(torch.Generator().manual_seed(3), n, slice(0, n)))
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
    preset = batch_preset("crop-flip", images.shape[-1], 1, MEAN, STD, torch.device("cpu"))
    loader = DeviceLoader(torch.from_numpy(images)[:, None], torch.as_tensor(labels), s,
                          batch // world, batch, rank, preset, seed=5)  # fmt: skip
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
    # AutoAugment has no batched form: the per-image path
    strong = data.train_loader(sampler="instance", batch_size=8, transforms=["strong", "simclr"])
    assert isinstance(strong, torch.utils.data.DataLoader)
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
