import pytest
import torch
import torchvision
from torch import nn

from longtail.models import BACKBONES, ResNetCifar, build_backbone, layer_depths

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
TORCHVISION = {"resnet18": 512, "resnet50": 2048, "resnext50_32x4d": 2048}


def _input_size(model: nn.Module) -> int:
    # The ImageNet stem downsamples 32x; 64x64 keeps a 2x2 map before pooling.
    return 64 if isinstance(model, torchvision.models.ResNet) else 28


def test_expected_names_are_registered():
    expected = set(CIFAR_DEPTHS) | set(TORCHVISION) | {"convnet-tiny"}
    assert expected <= set(BACKBONES.names())


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", BACKBONES.names())
def test_forward_backward(name, in_channels):
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=in_channels)
    assert isinstance(model.feature_dim, int)
    size = _input_size(model)
    x = torch.randn(2, in_channels, size, size)
    features = model(x)
    assert features.shape == (2, model.feature_dim)
    assert torch.isfinite(features).all()
    features.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    # Inference on a single image must work too (BatchNorm uses running stats).
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, model.feature_dim)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_feature_map_then_head_is_forward(name):
    torch.manual_seed(0)
    model = build_backbone(name, in_channels=3).eval()
    size = _input_size(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fmap = model.forward_features(x)
        pooled = model.forward_head(fmap)
        direct = model(x)
    # The map keeps its spatial extent (what region-level methods pool from) and its channels
    # are the features.
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, model.feature_dim)
    assert fmap.shape[2] > 1 and fmap.shape[3] > 1
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(direct, pooled)
    with torch.no_grad():  # the trunk and the last stage make up the feature map
        torch.testing.assert_close(model.last_stage(model.forward_trunk(x)), fmap)
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in model.last_stage.parameters()} < own


@pytest.mark.parametrize(("name", "depth"), sorted(CIFAR_DEPTHS.items()))
def test_cifar_family(name, depth):
    model = build_backbone(name)
    assert isinstance(model, ResNetCifar)
    assert model.depth == depth
    assert model.feature_dim == 64


def test_cifar_kwargs_are_passed_through():
    model = build_backbone("resnet32", in_channels=1, widths=(32, 64, 128))
    assert model.feature_dim == 128
    assert model.conv1.in_channels == 1


@pytest.mark.parametrize(("name", "dim"), sorted(TORCHVISION.items()))
def test_torchvision_family(name, dim):
    model = build_backbone(name, in_channels=1)
    assert model.feature_dim == dim
    assert isinstance(model.fc, nn.Identity)
    assert model.conv1.in_channels == 1
    assert model.conv1.out_channels == 64 and model.conv1.kernel_size == (7, 7)


def test_torchvision_keeps_its_stem_for_rgb():
    model = build_backbone("resnet18")
    assert model.conv1.in_channels == 3


def test_convnet_tiny_is_tiny():
    model = build_backbone("convnet-tiny")
    assert model.feature_dim == 32
    assert sum(p.numel() for p in model.parameters()) < 20_000
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) <= 3


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet33")
    assert "resnet32" in str(info.value) and "convnet-tiny" in str(info.value)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_layer_groups_order_every_parameter_from_input_to_output(name):
    """Layer-wise lr decay needs each parameter's depth: every one has a depth, the stem is
    depth 0, the last stage the deepest, and depth never falls in module order."""
    net = build_backbone(name)
    depths, count = layer_depths(net)
    names = [n for n, _ in net.named_parameters()]
    assert set(depths) == set(names) and count >= 3
    order = [depths[n] for n in names]
    assert order == sorted(order) and order[0] == 0 and order[-1] == count - 1
    assert set(order) == set(range(count))  # no empty depth
    last = {id(p) for p in net.last_stage.parameters()}
    assert all(depths[n] == count - 1 for n, p in net.named_parameters() if id(p) in last)


def test_layer_depths_default_to_the_top_level_children():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    depths, count = layer_depths(net)
    assert count == 2 and depths == {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": 1}
