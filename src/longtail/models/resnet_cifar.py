"""The CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (2016), sec. 4.2.

A 3x3 stem conv, then three stages of ``n`` basic blocks (widths 16/32/64 by default; the first
block of stages 2 and 3 halves the resolution), then global average pooling. Depth is ``6n + 2``
counting the stem and the (here omitted) classifier, so ResNet-32 has ``n = 5``. Shortcuts that
change shape use the paper's parameter-free "option A": subsample by 2 and zero-pad channels,
which is what keeps ResNet-32 at its published 0.46M parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Option-A identity shortcut: subsample by ``stride`` and append zero channels.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output; must be at least ``in_channels``.
        stride: Spatial subsampling factor.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option-A shortcut can only add channels")
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            # Matches the output size of a stride-s, padding-1 3x3 conv for odd sizes too (7 -> 4).
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            # F.pad pads the last dims first: (W, W, H, H, C_front, C_back).
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection and ReLU after the sum (post-activation).

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the first conv (2 to halve the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet feature extractor (no classifier).

    ``forward_features`` gives the last stage's map ``(N, widths[-1], H/4, W/4)``,
    ``forward_head`` pools it to ``(N, widths[-1])``; ``forward`` does both.

    Args:
        depth: Total depth ``6n + 2`` (20, 32, 44, 56, 110, ...).
        in_channels: Image channels (3 for CIFAR, 1 for Fashion-MNIST).
        widths: Channels of the three stages; the stem uses ``widths[0]``.

    Raises:
        ValueError: If ``depth`` is not ``6n + 2`` with ``n >= 1`` or ``widths`` is not three
            non-decreasing positive ints (option-A shortcuts can only add channels).
    """

    def __init__(
        self, depth: int = 32, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1 or list(widths) != sorted(widths):
            raise ValueError(f"CIFAR ResNet widths must be 3 non-decreasing ints, got {widths}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.widths = widths
        self.feature_dim: int = widths[-1]

        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 init (forward-pass variant), as the paper prescribes.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def last_stage(self) -> nn.Module:
        """The last residual stage (BBN gives its re-balancing branch a copy of it)."""
        return self.layer3

    def layer_groups(self) -> list[list[str]]:
        """The stem, then each residual stage."""
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"]]

    def forward_trunk(self, x: Tensor) -> Tensor:
        """Everything before the last stage."""
        return self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map, before pooling."""
        return self.layer3(self.forward_trunk(x))

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pooling of a feature map to ``(N, feature_dim)``."""
        return torch.flatten(self.pool(features), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
