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

import difflib
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from longtail.errors import UsageError
from longtail.models.pretrained import load_backbone_weights
from longtail.models.resnet_cifar import ResNetCifar
from longtail.registry import Registry

try:  # optional: pip install 'longtail[timm]'
    import timm
    from timm.models import group_parameters
except ImportError:  # pragma: no cover - exercised where timm is absent
    timm = None

BackboneBuilder = Callable[..., nn.Module]

BACKBONES: Registry[BackboneBuilder] = Registry("backbone")


TIMM_PREFIX = "timm/"


def build_backbone(
    name: str, in_channels: int = 3, pretrained: bool = False, **kw: Any
) -> nn.Module:
    """Build the backbone registered as ``name``, or timm's model ``timm/<name>``.

    Args:
        name: A name from ``BACKBONES.names()`` or ``timm/`` and a timm model name.
        in_channels: Image channels.
        pretrained: Start from the published weights (timm's, or torchvision's for its
            ResNets), downloaded and cached by those libraries.
        **kw: Passed to the builder (e.g. ``widths`` for the CIFAR ResNets).

    Returns:
        A module with ``feature_dim``, ``forward_features`` and ``forward_head``.

    Raises:
        ValueError: If ``name`` is not a backbone, or has no published weights.
        UsageError: If timm is needed but not installed, or the weights cannot be had.
    """
    check_backbone(name)
    if name.startswith(TIMM_PREFIX):
        return TimmBackbone(name.removeprefix(TIMM_PREFIX), in_channels, pretrained, **kw)
    net = BACKBONES.get(name)(in_channels=in_channels, **kw)
    if pretrained:
        published = getattr(net, "load_published_weights", None)
        if published is None:
            raise ValueError(
                f"{name} has no published weights: give model.pretrained a file or a longtail "
                "run directory, or use a torchvision or timm/<name> backbone"
            )
        published()
    return net


def check_backbone(name: str) -> None:
    """Raise ValueError if ``name`` names no backbone (UsageError if it needs timm)."""
    if not name.startswith(TIMM_PREFIX):
        BACKBONES.get(name)
        return
    if timm is None:
        raise UsageError(
            f"backbone {name!r} needs timm: pip install 'longtail[timm]' (or pip install timm)"
        )
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        near = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; near: {', '.join(near)}" if near else ""
        raise ValueError(f"timm has no model {arch!r} (timm.list_models() lists them){hint}")


def published_preprocessing(name: str) -> dict[str, Any] | None:
    """How the published weights of backbone ``name`` want an image, from their own
    metadata (timm's pretrained config, torchvision's weights transforms): ``mean``, ``std``
    ([0, 1] units), ``crop_fraction``, ``interpolation`` and ``image_size``; None where the
    backbone has no published weights."""
    if name.startswith(TIMM_PREFIX):
        check_backbone(name)
        cfg = timm.models.get_pretrained_cfg(name.removeprefix(TIMM_PREFIX))
        if cfg is None:
            return None
        interpolation = cfg.interpolation if cfg.interpolation == "bicubic" else "bilinear"
        return {
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "crop_fraction": float(cfg.crop_pct),
            "interpolation": interpolation,
            "image_size": int(cfg.input_size[-1]),
        }
    if name not in _TORCHVISION_ARCHS:
        return None
    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return {
        "mean": list(t.mean),
        "std": list(t.std),
        "crop_fraction": t.crop_size[0] / t.resize_size[0],
        "interpolation": t.interpolation.value,
        "image_size": int(t.crop_size[0]),
    }


def _unavailable(what: str, error: Exception) -> UsageError:
    text = " ".join(str(error).split()) or type(error).__name__
    reason = text.split(". ")[0][:120]
    return UsageError(
        f"model.pretrained: cannot get {what} (offline, with no cached copy? {reason}); "
        "download them once where online, or give a local file: model.pretrained: "
        "path/to/weights.pth (a state_dict, .safetensors too) or a longtail run directory"
    )


class TimmBackbone(nn.Module):
    """A timm model without its classifier, behind longtail's backbone contract.

    ``forward_features`` is timm's (a feature map for CNNs, tokens for ViTs), ``forward_head``
    its ``forward_head(..., pre_logits=True)``: the pooled vector its classifier would see.

    Args:
        arch: A timm model name.
        in_channels: Image channels (timm adapts a pretrained first layer to them).
        pretrained: Load timm's published weights (downloaded to the Hugging Face cache).
        **kw: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(self, arch: str, in_channels: int = 3, pretrained: bool = False, **kw: Any):
        super().__init__()
        try:
            self.model = timm.create_model(
                arch, pretrained=pretrained, num_classes=0, in_chans=in_channels, **kw
            )
        except (OSError, RuntimeError, ValueError) as e:
            if not pretrained:
                raise
            raise _unavailable(f"timm's weights for {arch}", e) from None
        self.arch = arch
        hidden = getattr(self.model, "head_hidden_size", None)
        self.feature_dim: int = int(hidden or self.model.num_features)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.model.forward_head(features, pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def layer_groups(self) -> list[list[str]]:
        """timm's own grouping of the model, stem to head (one group per block)."""
        matcher = self.model.group_matcher(coarse=False)
        groups = group_parameters(self.model, matcher)
        return [[f"model.{n}" for n in groups[k]] for k in sorted(groups)]


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
        self.arch = arch
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

    def load_published_weights(self) -> None:
        """torchvision's default ImageNet weights for this architecture (downloaded to the
        torch hub cache); a grey stem gets the sum of the RGB filters."""
        weights = torchvision.models.get_model_weights(self.arch).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except (OSError, RuntimeError, ValueError) as e:
            raise _unavailable(f"torchvision's {weights} weights", e) from None
        load_backbone_weights(self, state)

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
