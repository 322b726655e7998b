"""JPEG folders decoded and augmented on the device (data.decode): the crops are torchvision's
in distribution, the device forms of the transforms match the per-image ones, and the loader
is seeded, sharded and ordered like the per-image loader. On the CPU here; the same code runs
with nvJPEG on a CUDA device."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as v2f
from PIL import Image
from torchvision.transforms import v2

from longtail.config import DataConfig, load_config
from longtail.data import RunData, build_transform
from longtail.data.batch_augment import Draw, RandAugmentBatch, gaussian_blur
from longtail.data.decode import Crop, DecodeLoader
from longtail.data.transforms import TRANSFORMS, Resize, device_transform
from longtail.errors import DataError

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SIZE = 72  # over SMALL_MAX: the large-image transforms
FOLDER_RECIPES = sorted(Path("configs/folder").glob("[!_]*.yaml"))


def _draw(n: int, seed: int = 0) -> Draw:
    return Draw(torch.Generator().manual_seed(seed), n, slice(0, n))


def _jpeg_folder(root: Path, counts=(10, 6, 4), suffix: str = ".jpg") -> Path:
    """train/ and test/ of 3 classes, RGB JPEGs of several sizes (landscape and portrait)."""
    rng = np.random.default_rng(0)
    sizes = [(90, 120), (120, 90), (80, 80), (100, 150)]
    for split, per_class in (("train", counts), ("test", (2, 2, 2))):
        for c, n in enumerate(per_class):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                h, w = sizes[k % len(sizes)]
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([(xx * (c + 1) + yy * k) % 256, yy % 200, xx % 150], -1)
                img = img + rng.integers(0, 30, (h, w, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                    folder / f"{k}{suffix}", quality=92
                )
    return root


def _rundata(root: Path, **cfg) -> RunData:
    base = {"dataset": "folder", "root": str(root), "ratio": None, "image_size": SIZE,
            "mean": list(MEAN), "std": list(STD), "decode": "device"}  # fmt: skip
    return RunData.from_config(DataConfig(**{**base, **cfg}))


def test_random_boxes_are_torchvisions_in_distribution():
    """Area fraction and aspect ratio of the boxes against RandomResizedCrop.get_params over
    images of three shapes (one too narrow for most draws, so the fallback is exercised)."""
    n = 3000
    crop = Crop(SIZE, (0.08, 1.0))
    for h, w in ((375, 500), (500, 375), (60, 400)):
        boxes = crop.boxes(torch.full((n,), h), torch.full((n,), w), _draw(n))
        top, left, bh, bw = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + bh <= h).all() and (left + bw <= w).all() and (bh > 0).all()
        img = torch.zeros(1, h, w)
        torch.manual_seed(0)
        ref = torch.tensor([v2.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                            for _ in range(n)])  # fmt: skip
        # the box's place: uniform over the places it fits
        room = (bh < h) & (bw < w)
        for start, side, full in ((top, bh, h), (left, bw, w)):
            place = start[room].double() / (full - side[room]).double()
            assert abs(place.mean().item() - 0.5) < 0.03 and place.max() <= 1.0
        area, ref_area = (bh * bw).double() / (h * w), (ref[:, 2] * ref[:, 3]).double() / (h * w)
        aspect, ref_aspect = (bw / bh).double().log(), (ref[:, 3] / ref[:, 2]).double().log()
        for ours, theirs in ((area, ref_area), (aspect, ref_aspect)):
            se = math.sqrt((ours.var() + theirs.var()).item() / n)
            assert abs(ours.mean() - theirs.mean()).item() < 4 * se + 1e-3, (h, w)
            assert abs(ours.std() - theirs.std()).item() < 0.1 * theirs.std().item() + 1e-3


def test_boxes_fall_back_to_the_whole_image_clipped_to_the_ratio():
    crop = Crop(SIZE, (1.0, 1.0), ratio=(1.0, 1.0))
    top, left, h, w = crop.boxes(torch.tensor([50]), torch.tensor([100]), _draw(1))[0].tolist()
    assert (top, left, h, w) == (0, 25, 50, 50)  # torchvision's fallback: centred, ratio 1


def test_the_test_crop_is_the_per_image_evaluation_transform():
    """Resize the shorter side to size / crop fraction, centre crop: the device form and the
    per-image transform (PIL) agree to within the two resizers' rounding."""
    rng = np.random.default_rng(1)
    resize = Resize(0.9, "bicubic")
    per_image = build_transform("test", SIZE, 3, MEAN, STD, resize)
    form = device_transform("test", SIZE, 3, MEAN, STD, resize, CPU)
    for h, w in ((90, 130), (140, 100)):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 2 % 256, yy * 2 % 256, (xx + yy) % 256], -1).astype(np.uint8)
        img = (img + rng.integers(0, 10, img.shape)).clip(0, 255).astype(np.uint8)
        ours = form([torch.from_numpy(img).permute(2, 0, 1)], _draw(1))[0]
        ref = per_image(Image.fromarray(img))
        assert ours.shape == ref.shape == (3, SIZE, SIZE)
        assert (ours - ref).abs().mean() < 2 / 255 / STD[0], (ours - ref).abs().mean()


def test_gaussian_blur_is_torchvisions():
    x = torch.rand(3, 3, 40, 40)
    for sigma in (0.4, 1.5):
        got = gaussian_blur(9, (sigma, sigma), 1.0)(x, _draw(3))
        torch.testing.assert_close(got, v2f.gaussian_blur(x, [9, 9], [sigma, sigma]))
    off = gaussian_blur(9, (0.1, 2.0), 0.0)(x, _draw(3))
    assert torch.equal(off, x)


def test_randaugment_draws_each_operation_equally_often(monkeypatch):
    from longtail.data import batch_augment

    n, drawn = 2800, {}
    real = batch_augment._apply

    def counting(name, x, m):
        drawn[name] = drawn.get(name, 0) + len(x)
        return real(name, x, m)

    monkeypatch.setattr(batch_augment, "_apply", counting)
    batch = RandAugmentBatch(2, 9, 16)
    batch(torch.rand(n, 3, 16, 16), _draw(n))
    expected = 2 * n / 14  # two rounds, 14 operations (Identity is not applied)
    assert set(drawn) == set(batch.names) - {"Identity"}
    for name, count in drawn.items():
        assert abs(count - expected) < 5 * math.sqrt(expected), (name, count)


def test_randaugment_batch_is_torchvisions_in_distribution():
    """Each of torchvision's 14 RandAugment operations is drawn about equally often, and the
    augmented images' mean and spread match the per-image RandAugment."""
    n, size = 1200, 32
    gen = torch.Generator().manual_seed(0)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = ((i * 3 + j * 5) % 200)[None, None] + torch.randint(0, 50, (n, 3, size, size),
                                                                  generator=gen)  # fmt: skip
    images = images.clamp(0, 255).to(torch.uint8)
    batch = RandAugmentBatch(2, 9, size)
    assert batch.names == list(v2.RandAugment()._AUGMENTATION_SPACE)
    out = batch(images.float() / 255, _draw(n))
    torch.manual_seed(0)
    reference = v2.RandAugment(num_ops=2, magnitude=9)
    ref = torch.stack([reference(im) for im in images]).float() / 255
    changed = (out - images.float() / 255).abs().amax((1, 2, 3)) > 1e-6
    ref_changed = (ref - images.float() / 255).abs().amax((1, 2, 3)) > 1.5 / 255
    assert abs(changed.float().mean() - ref_changed.float().mean()) < 0.05
    means, ref_means = out.mean((1, 2, 3)), ref.mean((1, 2, 3))
    se = math.sqrt((means.var() + ref_means.var()).item() / n)
    assert abs(means.mean() - ref_means.mean()).item() < 4 * se
    assert abs(out.std() / ref.std() - 1).item() < 0.03


@pytest.mark.parametrize("name", [n for n in TRANSFORMS.names() if "device" in TRANSFORMS.meta(n)])
def test_every_device_form_gives_normalised_images_of_the_training_size(name):
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((90, 120),
              (150, 100), (80, 80))]  # fmt: skip
    form = device_transform(name, SIZE, 3, MEAN, STD, Resize(), CPU)
    out = form(images, _draw(3))
    assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert out.min() >= -2.1 and out.max() <= 2.1  # (x - 0.5) / 0.25 for x in [0, 1]
    assert device_transform(name, 32, 3, MEAN, STD, Resize(), CPU) is None  # the fast path's


def test_every_folder_recipe_trains_on_the_device_decode_path():
    """The transforms of configs/folder/ all have device forms, so a GPU decodes their JPEGs."""
    from longtail.build import method_options, validate

    assert FOLDER_RECIPES
    known = set(TRANSFORMS.names())
    for path in FOLDER_RECIPES:
        cfg = validate(load_config(path))
        names = {cfg.train.transform, cfg.train.test_transform}
        for value in method_options(cfg.method_name, cfg.method_options).model_dump().values():
            values = value if isinstance(value, list) else [value]
            names.update(v for v in values if isinstance(v, str) and v in known)
        for name in names:
            assert "device" in TRANSFORMS.meta(name), (path.name, name)


def test_the_decode_loader_is_seeded_ordered_and_per_epoch(tmp_path):
    data = _rundata(_jpeg_folder(tmp_path / "j"))
    loader = data.train_loader(sampler="instance", batch_size=4, transforms="imagenet-hybrid")
    assert isinstance(loader, DecodeLoader) and data.decoded_on_device == {"imagenet-hybrid"}
    loader.set_epoch(2)
    first = list(loader)
    assert len(first) == len(data) // 4
    for x, labels, idx in first:
        assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
        assert torch.equal(labels, torch.as_tensor(data.train_labels)[idx])
    order = [int(j) for _, _, idx in first for j in idx]
    assert order == list(loader.sampler)[: len(order)]  # the sampler's order
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], first[0][0])


class _FixedOrder:
    """A sampler whose order does not change with the epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def test_the_draws_depend_on_the_epoch_not_on_the_order(tmp_path):
    from longtail.data.dataset import EpochKeys
    from longtail.data.decode import EncodedFiles, collate_encoded

    data = _rundata(_jpeg_folder(tmp_path / "j"))
    order = _FixedOrder(8)
    files = EncodedFiles(data.train_source, data.train_indices)  # type: ignore[arg-type]
    form = device_transform("imagenet", SIZE, 3, MEAN, STD, Resize(), CPU)
    batches = torch.utils.data.DataLoader(files, sampler=EpochKeys(order), batch_size=4,
                                          collate_fn=collate_encoded)  # fmt: skip
    loader = DecodeLoader(batches, order, form, 3, CPU, 7, 4, slice(0, 4))
    seen = {}
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        seen.setdefault(epoch, []).append(torch.cat([x for x, _, _ in loader]))
    assert torch.equal(seen[0][0], seen[0][1])  # the same epoch: the same crops
    assert not torch.equal(seen[0][0], seen[1][0])  # the same images, another epoch


def test_two_processes_slice_the_single_process_batch(tmp_path, monkeypatch):
    root = _jpeg_folder(tmp_path / "j")
    one = _rundata(root).train_loader(sampler="instance", batch_size=4, transforms="imagenet")
    one.set_epoch(1)
    whole = list(one)
    halves = []
    for rank in range(2):
        monkeypatch.setattr("longtail.parallel.rank", lambda r=rank: r)
        monkeypatch.setattr("longtail.parallel.world_size", lambda: 2)
        half = _rundata(root).train_loader(sampler="instance", batch_size=4,
                                           transforms="imagenet")  # fmt: skip
        half.set_epoch(1)
        halves.append(list(half))
    for b, (x, _, idx) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][b][2], halves[1][b][2]]), idx)
        torch.testing.assert_close(torch.cat([halves[0][b][0], halves[1][b][0]]), x)


def test_loader_workers_give_the_same_batches(tmp_path):
    """Files cross from the workers as one buffer per batch (a tensor per file would take a
    file descriptor each); the batches are those of the training process's own reading."""
    root = _jpeg_folder(tmp_path / "j", counts=(40, 30, 20))
    batches = []
    for workers in (0, 2):
        loader = _rundata(root, num_workers=workers).train_loader(
            sampler="instance", batch_size=16, transforms="imagenet"
        )
        loader.set_epoch(1)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 90 // 16
    for (x, labels, idx), (y, labels_y, idx_y) in zip(*batches, strict=True):
        assert torch.equal(idx, idx_y) and torch.equal(labels, labels_y) and torch.equal(x, y)


def test_views_and_k_per_class_batches(tmp_path):
    data = _rundata(_jpeg_folder(tmp_path / "j"))
    multi = data.train_loader(sampler="instance", batch_size=4,
                              transforms=["imagenet-hybrid-jitter", "imagenet-hybrid"])  # fmt: skip
    x, labels, _ = next(iter(multi))
    assert isinstance(x, list) and len(x) == 2 and not torch.equal(x[0], x[1])
    k = data.train_loader(sampler="instance", batch_size=4, transforms="strong", k_per_class=2)
    x, labels, _ = next(iter(k))
    assert x.shape[0] == 4 and (labels[::2] == labels[1::2]).all()


def test_where_the_device_path_does_not_apply(tmp_path):
    jpegs = _jpeg_folder(tmp_path / "j")
    auto = _rundata(jpegs, decode="auto")  # on the CPU, auto keeps PIL in the workers
    loader = auto.train_loader(sampler="instance", batch_size=4, transforms="imagenet")
    assert isinstance(loader, torch.utils.data.DataLoader) and not auto.decoded_on_device
    workers = _rundata(jpegs, decode="workers")
    assert isinstance(
        workers.train_loader(sampler="instance", batch_size=4, transforms="imagenet"),
        torch.utils.data.DataLoader,
    )
    pngs = _rundata(_jpeg_folder(tmp_path / "p", suffix=".png"))
    with pytest.raises(DataError, match="decodes JPEG files only.*data.decode: workers"):
        pngs.train_loader(sampler="instance", batch_size=4, transforms="imagenet")


def test_a_corrupt_jpeg_is_named(tmp_path):
    root = _jpeg_folder(tmp_path / "j")
    bad = root / "train/c0/3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a header, then nothing: PIL opens it
    loader = _rundata(root).train_loader(sampler="instance", batch_size=20, transforms="imagenet")
    with pytest.raises(DataError, match=r"cannot decode JPEG .*3\.jpg"):
        list(loader)


def test_a_run_trains_with_device_decoding_and_says_so(tmp_path, capsys):
    from longtail import api
    from longtail.config import config_from_dict

    root = _jpeg_folder(tmp_path / "j")
    raw = {
        "name": "jpegs", "method": {"name": "ce"},
        "data": {"dataset": "folder", "root": str(root), "ratio": None, "image_size": SIZE,
                 "decode": "device"},
        "model": {"backbone": "convnet-tiny"},
        "train": {"epochs": 1, "batch_size": 4, "transform": "imagenet", "device": "cpu",
                  "report": False},
        "optim": {"lr": 0.05, "milestones": []},
    }  # fmt: skip
    res = api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert 0.0 <= res["top1"] <= 1.0
    said = capsys.readouterr().out
    assert "JPEGs decoded and augmented on the device for 'imagenet'" in said
    saved = json.loads((tmp_path / "run/data.json").read_text())
    assert saved["decoded_on_device"] == ["imagenet"] and saved["per_image_transforms"] == []
