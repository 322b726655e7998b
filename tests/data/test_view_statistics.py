"""What each transform does to an image, measured on both data paths.

Every training image is one test pattern: a left-to-right ramp (its slope's sign tells a
flipped view from an unflipped one) with a bright horizontal bar (its row tells where a crop
put the image). Drawn through the real loaders, per-image (``data.fast_path=false``) and
batched on the device, each registered transform must show the crop and flip rate it promises,
and the two views of a multi-view batch must be drawn independently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_idx
from longtail.build import build_data, validate
from longtail.config import config_from_dict
from longtail.data import TRANSFORMS, set_loader_epoch

SIZE, N = 28, 400
# crop: the image moves (or is rescaled) in the view; flip: the rate of horizontal flips.
EXPECTED = {
    "test": {"crop": False, "flip": 0.0},
    "crop-flip": {"crop": True, "flip": 0.5},
    "hybrid": {"crop": True, "flip": 0.5},
    "hybrid-jitter": {"crop": True, "flip": 0.5},
    "strong": {"crop": True, "flip": 0.5},
    "simclr": {"crop": True, "flip": 0.5},
    "imagenet": {"crop": True, "flip": 0.5},
    "imagenet-hybrid": {"crop": True, "flip": 0.5},
    "imagenet-hybrid-jitter": {"crop": True, "flip": 0.5},
}
BATCHED = {n for n in TRANSFORMS.names() if TRANSFORMS.meta(n).get("batched")}


def pattern() -> np.ndarray:
    ramp = np.tile(np.linspace(30, 170, SIZE), (SIZE, 1))
    ramp[10:13] = 255  # the bar, rows 10-12
    return ramp.astype(np.uint8)


@pytest.fixture(scope="module")
def pattern_set(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pattern-fmnist")
    for prefix, n in (("train", N), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", np.repeat(pattern()[None], n, 0))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return str(root)


def views(root: str, transform: str, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of every training image: two (N, 1, H, W) tensors."""
    raw = {
        "data": {"dataset": "fashion-mnist", "root": root, "ratio": None, "image_size": SIZE,
                 "fast_path": fast},
        "train": {"device": "cpu"},
    }  # fmt: skip
    data = build_data(validate(config_from_dict(raw)))
    loader = data.train_loader(
        sampler="instance", batch_size=100, transforms=[transform, transform], total_epochs=1
    )
    assert (type(loader).__name__ == "DeviceLoader") == fast
    set_loader_epoch(loader, 0)
    batches = list(loader)
    return tuple(torch.cat([b[0][v] for b in batches]) for v in range(2))  # type: ignore[return-value]


def flipped(x: torch.Tensor) -> torch.Tensor:
    """Whether each view's ramp runs right to left (the slope of its column means)."""
    cols = x.mean(dim=(1, 2))
    cols = cols - cols.mean(1, keepdim=True)
    return (cols * torch.linspace(-1, 1, x.shape[-1])).sum(1) < 0


def bar_row(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(1, 3)).argmax(1).float()


CASES = [
    (name, fast)
    for name in TRANSFORMS.names()
    for fast in (False, True)
    if not fast or name in BATCHED
]


def test_every_transform_has_expectations():
    assert set(TRANSFORMS.names()) == set(EXPECTED)


@pytest.mark.parametrize(
    ("name", "fast"), CASES, ids=[f"{n}-{'batched' if f else 'per-image'}" for n, f in CASES]
)
def test_transform_crops_flips_and_draws_its_views_apart(name, fast, pattern_set):
    first, second = views(pattern_set, name, fast)
    want = EXPECTED[name]
    rows = bar_row(first)
    if want["crop"]:
        assert rows.std() > 1.0, f"{name}: the bar stays at row {rows.mode().values}: no crop"
    else:
        assert rows.std() == 0 and torch.equal(first, second), name
    f1, f2 = flipped(first), flipped(second)
    rate = float(torch.cat([f1, f2]).float().mean())
    assert abs(rate - want["flip"]) < 0.08, f"{name}: flip rate {rate:.3f}"
    if want["crop"]:
        # Independent draws agree on a fair coin's flip half the time (always, were the two
        # views drawn from one seed), and put the bar on different rows most of the time.
        agree = float((f1 == f2).float().mean())
        assert abs(agree - 0.5) < 0.1, f"{name}: the views agree on {agree:.2f} of the flips"
        assert float((bar_row(first) != bar_row(second)).float().mean()) > 0.5, name


def test_a_transform_without_a_batched_form_is_said_before_training(pattern_set, tmp_path, capsys):
    from longtail import api
    from longtail.config import config_from_dict

    raw = {
        "data": {"dataset": "fashion-mnist", "root": pattern_set, "ratio": None,
                 "image_size": SIZE},
        "model": {"backbone": "convnet-tiny"},
        "train": {"device": "cpu", "epochs": 1, "batch_size": 100, "transform": "imagenet",
                  "report": False},
        "optim": {"milestones": []},
    }  # fmt: skip
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("; per-image loaders, the fast path has no batched form of "
                          "'imagenet' at 28 px")  # fmt: skip
