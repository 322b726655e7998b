import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from longtail.data.transforms import TRANSFORMS, MultiView, build_transform

RECIPES = [
    "crop-flip",
    "hybrid",
    "hybrid-jitter",
    "imagenet",
    "imagenet-hybrid",
    "imagenet-hybrid-jitter",
    "simclr",
    "strong",
    "test",
]
GREY = ((0.5,), (0.25,))
RGB = ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))


def _steps(view):
    return [type(t).__name__ for t in view.transforms]


def test_registry():
    assert TRANSFORMS.names() == RECIPES
    with pytest.raises(ValueError, match="unknown transform 'byol'; valid: crop-flip"):
        build_transform("byol", 32, 3, *RGB)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize(
    ("channels", "stats", "image"),
    [
        (1, GREY, torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)),
        (1, GREY, torch.randint(0, 256, (1, 36, 30), dtype=torch.uint8)),
        (3, RGB, torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)),
        (3, RGB, Image.new("RGB", (50, 40), (10, 200, 30))),
    ],
)
def test_output_shape_and_dtype(name, channels, stats, image):
    view = build_transform(name, 28 if channels == 1 else 32, channels, *stats)
    steps = _steps(view)
    assert steps[0] == "ToImage" and steps.index("ToDtype") + 1 == steps.index("Normalize")
    # after normalising only erasing (Cutout, which sets pixels to the mean) is allowed
    assert set(steps[steps.index("Normalize") + 1 :]) <= {"RandomErasing"}
    out = view(image)
    size = 28 if channels == 1 else 32
    assert out.shape == (channels, size, size) and out.dtype == torch.float32


def test_normalisation_and_test_view_is_deterministic():
    mean, std = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)
    image = torch.tensor([51, 102, 153], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32)
    view = build_transform("test", 32, 3, mean, std)
    out = view(image)
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)
    noisy = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(view(noisy), view(noisy))
    expected = (noisy.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    assert torch.allclose(view(noisy), expected, atol=1e-5)


def test_large_test_view_resizes_then_centre_crops():
    view = build_transform("test", 224, 3, *RGB)
    steps = view.transforms
    assert isinstance(steps[1], v2.Resize) and steps[1].size == [256]
    assert isinstance(steps[2], v2.CenterCrop)
    assert view(Image.new("RGB", (500, 300))).shape == (3, 224, 224)


def test_grey_recipes_skip_colour_only_ops():
    grey = build_transform("imagenet-hybrid-jitter", 28, 1, *GREY)
    assert "RandomGrayscale" not in _steps(grey)
    jitter = next(t for t in grey.transforms if isinstance(t, v2.RandomApply)).transforms[0]
    assert jitter.saturation is None and jitter.hue is None and jitter.brightness is not None
    rgb = build_transform("hybrid-jitter", 32, 3, *RGB)
    assert "RandomGrayscale" in _steps(rgb)
    jitter = next(t for t in rgb.transforms if isinstance(t, v2.RandomApply)).transforms[0]
    assert jitter.hue is not None


def test_augmentations_are_random():
    torch.manual_seed(0)
    view = build_transform("hybrid-jitter", 32, 3, *RGB)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    outs = [view(image) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="mean and std need 3"):
        build_transform("test", 32, 3, *GREY)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        build_transform("test", 32, 2, (0.5, 0.5), (0.5, 0.5))


def test_multiview():
    mv = MultiView([build_transform("hybrid", 32, 3, *RGB), build_transform("test", 32, 3, *RGB)])
    outs = mv(Image.new("RGB", (32, 32), (1, 2, 3)))
    assert len(mv) == 2 and isinstance(outs, list) and len(outs) == 2
    assert all(o.shape == (3, 32, 32) for o in outs)


def test_strong_view_cuts_out_a_square_at_the_mean():
    torch.manual_seed(0)
    view = build_transform("strong", 32, 3, *RGB)
    assert [type(t).__name__ for t in view.transforms][-1] == "RandomErasing"
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    out = view(image)
    zero = (out == 0).all(dim=0)  # the erased square is 0 after normalising (the mean)
    assert zero.sum() == 16 * 16
    rows, cols = zero.nonzero().unbind(1)
    assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    large = [type(t).__name__ for t in build_transform("strong", 224, 3, *RGB).transforms]
    assert "RandAugment" in large and "RandomErasing" not in large


def test_simclr_view_crops_from_a_fifth_of_the_area():
    view = build_transform("simclr", 32, 3, *RGB)
    crop = next(t for t in view.transforms if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.2, 1.0)
    assert "GaussianBlur" not in str(view) and "GaussianBlur" in str(
        build_transform("simclr", 224, 3, *RGB)
    )
