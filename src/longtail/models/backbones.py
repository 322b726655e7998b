"""Backbone registry: name -> builder returning a feature extractor.

Every builder takes ``in_channels`` (plus optional keyword arguments) and returns an
``nn.Module`` with an int attribute ``feature_dim`` whose ``forward(x)`` gives
``(N, feature_dim)`` features. Classifiers are separate (see :mod:`longtail.models.heads`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

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
        A module with ``feature_dim`` mapping images to ``(N, feature_dim)`` features.

    Raises:
        UsageError: If ``name`` is not registered.
    """
    return BACKBONES.get(name)(in_channels=in_channels, **kw)


def _register_cifar_resnet(depth: int) -> None:
    def build(in_channels: int = 3, **kw: Any) -> nn.Module:
        return ResNetCifar(depth=depth, in_channels=in_channels, **kw)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)."
    BACKBONES.register(f"resnet{depth}")(build)


for _depth in (20, 32, 44, 56, 110):
    _register_cifar_resnet(_depth)


def _torchvision_features(arch: str, in_channels: int, **kw: Any) -> nn.Module:
    """A randomly initialised torchvision ResNet(-like) with its ``fc`` turned into a no-op."""
    # weights=None: never download; this library trains from scratch.
    model = getattr(torchvision.models, arch)(weights=None, **kw)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=False,
        )
        # Same init torchvision gives its own convs, so the stem is not the odd one out.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.feature_dim = feature_dim
    return model


def _register_torchvision(name: str) -> None:
    def build(in_channels: int = 3, **kw: Any) -> nn.Module:
        return _torchvision_features(name, in_channels, **kw)

    build.__doc__ = f"torchvision {name} (random init, fc removed)."
    BACKBONES.register(name)(build)


for _arch in ("resnet18", "resnet50", "resnext50_32x4d"):
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
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.features(x), 1)


@BACKBONES.register("convnet-tiny")
def _build_convnet_tiny(in_channels: int = 3, **kw: Any) -> nn.Module:
    return ConvNetTiny(in_channels=in_channels, **kw)
