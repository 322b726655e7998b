"""Backbones (feature extractors) and heads (classifiers, projection, prototypes)."""

from longtail.models.backbones import (
    BACKBONES,
    ConvNetTiny,
    TorchvisionResNet,
    build_backbone,
    layer_depths,
)
from longtail.models.ema import EMPTY, LabelledQueue, momentum_copy, momentum_update
from longtail.models.heads import (
    CLASSIFIERS,
    CosineClassifier,
    LinearClassifier,
    ProjectionMLP,
    PrototypeBank,
    build_classifier,
)
from longtail.models.resnet_cifar import ResNetCifar

__all__ = [
    "BACKBONES",
    "CLASSIFIERS",
    "ConvNetTiny",
    "CosineClassifier",
    "EMPTY",
    "LabelledQueue",
    "LinearClassifier",
    "ProjectionMLP",
    "PrototypeBank",
    "ResNetCifar",
    "TorchvisionResNet",
    "build_backbone",
    "build_classifier",
    "layer_depths",
    "momentum_copy",
    "momentum_update",
]
