import gzip
import os
import pathlib
import struct
import sys

import numpy as np
import pytest
import torch
from hypothesis import settings

# Tests run against the source tree even before `pip install -e .`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

# Property tests draw new examples on every run of a developer's; CI (HYPOTHESIS_PROFILE=ci,
# set by .ci/run) draws the same ones every time, so a rare draw cannot fail an unrelated
# change there.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine two threads
# per process made model tests 10-40x slower.
torch.set_num_threads(1)

from longtail.data.sources import system_root  # noqa: E402  (after the sys.path insert)

# Debian's dataset-fashion-mnist; CI first runs the suite with LONGTAIL_SYSTEM_DATA pointing
# at an empty folder, as on a machine where it is not installed.
FMNIST_ROOT = system_root("fashion-mnist")


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_fashion_mnist(
    root: pathlib.Path,
    train_per_class: int = 40,
    test_per_class: int = 8,
    num_classes: int = 10,
    gz: bool = True,
    seed: int = 0,
) -> pathlib.Path:
    """A tiny learnable Fashion-MNIST: class c is a bright 8x8 square at a class-specific spot."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(num_classes), per_class).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 4)
            images[i, 2 + 6 * r : 10 + 6 * r, 2 + 6 * q : 10 + 6 * q] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return root


@pytest.fixture
def tiny_fmnist(tmp_path: pathlib.Path) -> pathlib.Path:
    return make_fashion_mnist(tmp_path / "fmnist")


def tiny_config(root: pathlib.Path, **sections) -> dict:
    """A config dict that trains for one short epoch on ``tiny_fmnist``."""
    cfg = {
        "name": "tiny",
        "method": {"name": "ce"},
        "data": {"dataset": "fashion-mnist", "root": str(root), "ratio": 4, "image_size": 28},
        "model": {"backbone": "convnet-tiny", "projection_hidden": 32, "projection_dim": 16},
        # Reports cost seconds of plotting per run; tests/test_outputs.py checks them.
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "transform": "crop-flip",
            "device": "cpu",
            "report": False,
        },
        "optim": {"lr": 0.05, "milestones": [], "weight_decay": 0.0},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def short_run_options(name: str, epochs: int, val_split: bool = False) -> dict:
    """Method options that let ``name`` run in ``epochs`` epochs on tiny data: a classifier
    stage of at most half the run, and an explicit tau for tau-norm without a val split."""
    from longtail.methods import METHODS

    fields = METHODS.get(name).Options.model_fields
    section: dict = {"name": name}
    if "classifier_epochs" in fields:
        section["classifier_epochs"] = max(1, epochs // 2)
    if name == "tau-norm" and not val_split:
        section["tau"] = 1.0
    return section


def poison_step(monkeypatch, method: str, epoch: int, step: int, value: float, *terms: str):
    """Make the loss terms ``terms`` of one step (0-based epoch, 1-based step) ``value``,
    and ``loss`` with them, by wrapping the method's training_step."""
    from longtail.methods import METHODS

    cls = METHODS.get(method)
    original = cls.training_step
    steps: dict[int, int] = {}

    def poisoned(self, batches, e):
        out = original(self, batches, e)
        steps[e] = steps.get(e, 0) + 1
        if (e, steps[e]) == (epoch, step):
            out = {k: v * value if k in terms or k == "loss" else v for k, v in out.items()}
        return out

    monkeypatch.setattr(cls, "training_step", poisoned)


PATTERNS = ("solid", "rows", "columns", "checker")


def make_pattern_folder(
    root: pathlib.Path,
    train_counts: tuple[int, ...] = (24, 16, 10, 6),
    eval_per_class: int = 6,
    size: int = 12,
    seed: int = 0,
) -> pathlib.Path:
    """An ImageFolder tree (train/val/test) of 4 easy classes: a solid tone, horizontal
    stripes, vertical stripes and a checkerboard, each with noise and a random phase.

    Flips, padded crops, grayscale and brightness/contrast jitter keep every class
    recognisable, so any method should learn it within a few epochs.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    i, j = np.mgrid[0:size, 0:size]
    for split in ("train", "val", "test"):
        for c, name in enumerate(PATTERNS):
            n = train_counts[c] if split == "train" else eval_per_class
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                phase = int(rng.integers(2))
                bright = {
                    "solid": np.ones_like(i, dtype=bool) if phase else np.zeros_like(i, dtype=bool),
                    "rows": (i + phase) % 2 == 0,
                    "columns": (j + phase) % 2 == 0,
                    "checker": (i + j + phase) % 2 == 0,
                }[name]
                img = np.where(bright, 200, 60) + rng.integers(-25, 26, size=(size, size))
                rgb = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
                Image.fromarray(rgb).save(folder / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def pattern_folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_pattern_folder(tmp_path_factory.mktemp("patterns"))


def folder_config(root: pathlib.Path, **sections) -> dict:
    """A config dict that trains convnet-tiny on ``pattern_folder`` with its validation split."""
    cfg = {
        "name": "patterns",
        "method": {"name": "ce"},
        "data": {
            "dataset": "folder",
            "root": str(root),
            "ratio": None,
            "image_size": 12,
            "val_split": "val",
        },
        "model": {"backbone": "convnet-tiny", "projection_hidden": 32, "projection_dim": 16},
        "train": {"epochs": 8, "batch_size": 8, "device": "cpu", "report": False},
        "optim": {"lr": 0.05, "milestones": [6], "weight_decay": 5e-4},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg
