"""Backbone registry: name -> builder of a feature extractor.

Every backbone is an ``nn.Module`` with an int attribute ``feature_dim`` and three methods:
``forward_features(x)`` gives the last feature map ``(N, feature_dim, h, w)`` (what patch- or
region-level methods such as DSCL's PBSD pool from), ``forward_head(f)`` pools that map to
``(N, feature_dim)``, and ``forward(x)`` is the two in a row. ``forward_trunk(x)`` and
``last_stage`` split ``forward_features`` before its last stage (BBN's two branches share the
trunk). ``layer_groups()``, where a backbone has it, lists its parameters' name prefixes by
depth, input to output (for layer-wise lr decay; the default is its top-level children).
Classifiers are separate (:mod:`longtail.models.heads`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from longtail.models.resnet_cifar import ResNetCifar
from longtail.registry import Registry

BackboneBuilder = Callable[..., nn.Module]

BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


def build_backbone(name: str, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build the backbone registered as ``name``.

    Args:
        name: A name from ``BACKBONES.names()``.
        in_channels: Image channels.
        **kw: Passed to the builder (e.g. ``widths`` for the CIFAR ResNets).

    Returns:
        A module with ``feature_dim``, ``forward_features`` and ``forward_head``.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return BACKBONES.get(name)(in_channels=in_channels, **kw)


def layer_depths(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """The depth of each of ``backbone``'s parameters (0 = nearest the input) and the number
    of depths: from its ``layer_groups()`` (lists of name prefixes, input to output), else
    one depth per top-level child that holds parameters, in registration order."""
    groups = getattr(backbone, "layer_groups", None)
    if groups is not None:
        prefixes = groups()
    else:
        prefixes = [
            [n] for n, c in backbone.named_children() if next(c.parameters(), None) is not None
        ]
    depths: dict[str, int] = {}
    for name, _ in backbone.named_parameters():
        found = [
            d
            for d, group in enumerate(prefixes)
            if any(name == p or name.startswith(p + ".") for p in group)
        ]
        depths[name] = found[0] if found else 0  # a stray parameter goes with the stem
    return depths, len(prefixes)


def _register_cifar_resnet(depth: int) -> None:
    def build(in_channels: int = 3, **kw: Any) -> nn.Module:
        return ResNetCifar(depth=depth, in_channels=in_channels, **kw)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)."
    BACKBONES.register(f"resnet{depth}")(build)


for _depth in (20, 32, 44, 56, 110):
    _register_cifar_resnet(_depth)


# torchvision's architectures by name: block, blocks per stage, extra ResNet arguments.
_TORCHVISION_ARCHS: dict[str, tuple[type[nn.Module], list[int], dict[str, int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
}


class TorchvisionResNet(torchvision.models.ResNet):
    """A randomly initialised torchvision ResNet(-like) whose ``fc`` is a no-op.

    It is torchvision's own module (same layers, names and initialisation), so its weights
    load into ``torchvision.models.<arch>`` and back; only the stem changes for grey images.

    Args:
        arch: resnet18, resnet50 or resnext50_32x4d.
        in_channels: Image channels.
        **kw: Passed to ``torchvision.models.ResNet``.
    """

    def __init__(self, arch: str, in_channels: int = 3, **kw: Any) -> None:
        block, layers, defaults = _TORCHVISION_ARCHS[arch]
        super().__init__(block, layers, **{**defaults, **kw})  # type: ignore[arg-type]
        self.feature_dim: int = self.fc.in_features
        self.fc = nn.Identity()
        if in_channels != 3:
            old = self.conv1
            self.conv1 = nn.Conv2d(
                in_channels,
                old.out_channels,
                kernel_size=old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                bias=False,
            )
            # Same init torchvision gives its own convs, so the stem is not the odd one out.
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    @property
    def last_stage(self) -> nn.Module:
        """The last residual stage (BBN gives its re-balancing branch a copy of it)."""
        return self.layer4

    def layer_groups(self) -> list[list[str]]:
        """The stem, then each residual stage."""
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]

    def forward_trunk(self, x: Tensor) -> Tensor:
        """Everything before the last stage."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map (stride 32), before pooling."""
        return self.layer4(self.forward_trunk(x))

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pooling of a feature map to ``(N, feature_dim)``."""
        return torch.flatten(self.avgpool(features), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _register_torchvision(name: str) -> None:
    def build(in_channels: int = 3, **kw: Any) -> nn.Module:
        return TorchvisionResNet(name, in_channels, **kw)

    build.__doc__ = f"torchvision {name} (random init, fc removed)."
    BACKBONES.register(name)(build)


for _arch in _TORCHVISION_ARCHS:
    _register_torchvision(_arch)


class ConvNetTiny(nn.Module):
    """Three conv-BN-ReLU layers and global pooling; for tests and smoke runs only.

    Args:
        in_channels: Image channels.
        feature_dim: Channels of the last conv, i.e. the feature size.
    """

    def __init__(self, in_channels: int = 3, feature_dim: int = 32) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def last_stage(self) -> nn.Module:
        """The last conv block."""
        return self.features[-3:]

    def layer_groups(self) -> list[list[str]]:
        """Each conv block (conv and its BatchNorm)."""
        return [[f"features.{i}", f"features.{i + 1}"] for i in (0, 4, 8)]

    def forward_trunk(self, x: Tensor) -> Tensor:
        return self.features[:-3](x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return torch.flatten(self.pool(features), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@BACKBONES.register("convnet-tiny")
def _build_convnet_tiny(in_channels: int = 3, **kw: Any) -> nn.Module:
    return ConvNetTiny(in_channels=in_channels, **kw)
