import pytest
import torch
from torch import nn

from longtail.models.resnet_cifar import BasicBlock, ResNetCifar, ShortcutA


def expected_param_count(depth: int, in_channels: int = 3, widths=(16, 32, 64)) -> int:
    """3x3 convs without bias, two BN params per channel, option-A shortcuts free."""
    n = (depth - 2) // 6
    total = 9 * in_channels * widths[0] + 2 * widths[0]
    channels = widths[0]
    for width in widths:
        for _ in range(n):
            total += 9 * channels * width + 9 * width * width + 4 * width
            channels = width
    return total


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet32_parameter_count():
    model = ResNetCifar(32)
    assert num_params(model) == expected_param_count(32) == 463_504
    # The paper's 0.46M includes a 64 -> 10 linear classifier.
    assert round((num_params(model) + 64 * 10 + 10) / 1e6, 2) == 0.46


@pytest.mark.parametrize("depth", [20, 44, 56, 110])
def test_parameter_count_formula_other_depths(depth):
    assert num_params(ResNetCifar(depth)) == expected_param_count(depth)


def test_parameter_count_with_custom_widths_and_grey_input():
    model = ResNetCifar(20, in_channels=1, widths=(8, 16, 40))
    assert num_params(model) == expected_param_count(20, 1, (8, 16, 40))
    assert model.feature_dim == 40


def test_structure_of_resnet32():
    model = ResNetCifar(32)
    assert model.feature_dim == 64
    stages = [model.layer1, model.layer2, model.layer3]
    assert [len(s) for s in stages] == [5, 5, 5]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31  # + the classifier makes 32 weighted layers
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    for stage, stride in zip(stages, [1, 2, 2], strict=True):
        assert stage[0].conv1.stride == (stride, stride)
        assert all(block.conv1.stride == (1, 1) for block in stage[1:])


def test_option_a_shortcuts_are_parameter_free():
    model = ResNetCifar(32)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # first block of stages 2 and 3
    assert all(num_params(s) == 0 and len(list(s.buffers())) == 0 for s in shortcuts)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 7, 7)
    y = ShortcutA(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_option_a_shortcut_rejects_fewer_channels():
    with pytest.raises(ValueError):
        ShortcutA(32, 16, stride=1)


def test_block_output_matches_strided_conv_on_odd_sizes():
    block = BasicBlock(16, 32, stride=2)
    assert block(torch.randn(1, 16, 7, 7)).shape == (1, 32, 4, 4)


@pytest.mark.parametrize("size", [8, 28, 32, 33])
def test_forward_any_input_size(size):
    model = ResNetCifar(20, in_channels=1)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 64)


def test_output_is_non_negative_pooled_relu():
    out = ResNetCifar(20)(torch.randn(2, 3, 16, 16))
    assert (out >= 0).all()


def test_conv_init_is_kaiming_normal():
    torch.manual_seed(0)
    conv = ResNetCifar(32).layer3[1].conv2
    fan_in = conv.in_channels * 9
    std = conv.weight.std().item()
    assert std == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.05)


@pytest.mark.parametrize("depth", [0, 7, 21, 33])
def test_bad_depth_is_a_value_error(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNetCifar(depth)


@pytest.mark.parametrize("widths", [(16, 32), (32, 16, 64), (16, 0, 64)])
def test_bad_widths_is_a_value_error(widths):
    with pytest.raises(ValueError, match="widths"):
        ResNetCifar(20, widths=widths)
