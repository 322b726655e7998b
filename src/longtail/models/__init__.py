"""Backbones (feature extractors) and heads (classifiers, projection, prototypes)."""

from longtail.models.backbones import (
    BACKBONES,
    TIMM_PREFIX,
    ConvNetTiny,
    TimmBackbone,
    TorchvisionResNet,
    build_backbone,
    check_backbone,
    layer_depths,
    published_preprocessing,
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
from longtail.models.pretrained import load_backbone_weights, read_weights
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
    "TIMM_PREFIX",
    "TimmBackbone",
    "TorchvisionResNet",
    "build_backbone",
    "build_classifier",
    "check_backbone",
    "load_backbone_weights",
    "published_preprocessing",
    "read_weights",
    "layer_depths",
    "momentum_copy",
    "momentum_update",
]
