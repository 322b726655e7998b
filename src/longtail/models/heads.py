"""Heads on top of backbone features: classifiers, the contrastive projection, class prototypes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtail.registry import Registry

ClassifierBuilder = Callable[..., nn.Module]

CLASSIFIERS: Registry[ClassifierBuilder] = Registry("classifier")


def build_classifier(name: str, in_dim: int, num_classes: int, **kw: Any) -> nn.Module:
    """Build the classifier registered as ``name``.

    Args:
        name: A name from ``CLASSIFIERS.names()``.
        in_dim: Feature size.
        num_classes: Number of classes (logits per sample).
        **kw: Passed to the classifier (e.g. ``scale`` for "cosine").

    Returns:
        A module mapping ``(N, in_dim)`` features to ``(N, num_classes)`` logits.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return CLASSIFIERS.get(name)(in_dim, num_classes, **kw)


@CLASSIFIERS.register("linear")
class LinearClassifier(nn.Module):
    """Affine classifier ``W f + b``.

    Args:
        in_dim: Feature size.
        num_classes: Number of classes.
        bias: Whether to learn a per-class bias.
    """

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=bias)

    @property
    def weight(self) -> Tensor:
        """Class weight vectors, ``(num_classes, in_dim)``."""
        return self.fc.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


@CLASSIFIERS.register("cosine")
class CosineClassifier(nn.Module):
    """Scaled cosine similarity between the feature and each class weight.

    Logits are ``scale * cos(f, w_c)``, so they lie in ``[-|scale|, |scale|]``; removing the
    norms stops head classes from winning through larger weight norms.

    Args:
        in_dim: Feature size.
        num_classes: Number of classes.
        scale: Temperature-like factor; cosines alone are too flat for softmax training.
        learn_scale: Learn ``scale`` as a parameter (initialised to ``scale``) instead of fixing it.
    """

    def __init__(
        self, in_dim: int, num_classes: int, scale: float = 16.0, learn_scale: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) / in_dim**0.5)
        scale_t = torch.tensor(float(scale))
        self.scale: Tensor
        if learn_scale:
            self.scale = nn.Parameter(scale_t)
        else:
            # A buffer, so it follows .to(device) and is saved with the state dict.
            self.register_buffer("scale", scale_t)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class ProjectionMLP(nn.Module):
    """Contrastive projection head: Linear -> [BatchNorm] -> ReLU -> Linear, on the unit sphere.

    One hidden layer, as in the hybrid-network paper (Wang et al. 2021); BCL (Zhu et al. 2022)
    and SimCLR put BatchNorm after the first layer.

    Args:
        in_dim: Feature size.
        hidden_dim: Hidden layer size.
        out_dim: Size of the embedding ``z``.
        batch_norm: BatchNorm1d on the hidden layer.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False
    ) -> None:
        super().__init__()
        norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            *norm,
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class PrototypeBank(nn.Module):
    """Learnable class prototypes, ``num_prototypes`` per class, returned L2-normalised.

    Args:
        num_classes: Number of classes ``C``.
        num_prototypes: Prototypes per class ``M``.
        dim: Embedding size ``d`` (the projection head's ``out_dim``).
    """

    def __init__(self, num_classes: int, num_prototypes: int, dim: int) -> None:
        super().__init__()
        if min(num_classes, num_prototypes, dim) < 1:
            raise ValueError("num_classes, num_prototypes and dim must be positive")
        # Normalised Gaussian draws are uniform on the sphere: no class starts favoured.
        init = F.normalize(torch.randn(num_classes, num_prototypes, dim), dim=-1)
        self.prototypes = nn.Parameter(init)

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[1]

    @property
    def dim(self) -> int:
        return self.prototypes.shape[2]

    def forward(self) -> Tensor:
        """Return the unit-norm prototypes, ``(C, M, d)``."""
        return F.normalize(self.prototypes, dim=-1)
