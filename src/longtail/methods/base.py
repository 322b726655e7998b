"""The Method protocol: the one place that knows a paper.

The engine asks a method for its stages, its model, the loaders of its branches, and the
named loss terms of one step; it never looks inside.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.utils.data import DataLoader

from longtail.config import Config
from longtail.engine.rundata import RunData
from longtail.models import build_backbone, build_classifier


class Options(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Stage:
    """A span of epochs with its own optimizer and schedule (e.g. cRT's classifier stage).

    Attributes:
        name: Shown in logs and stored in checkpoints.
        epochs: Length of the stage.
        optim: Overrides of ``cfg.optim`` for this stage (e.g. ``{"lr": 0.1}``).
    """

    name: str
    epochs: int
    optim: dict[str, Any] = field(default_factory=dict)


class Network(nn.Module):
    """A backbone with the heads a method asked for.

    ``forward`` returns classifier logits; methods call the parts directly in training.
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        projector: nn.Module | None = None,
        prototypes: nn.Module | None = None,
        aux_classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.projector = projector
        self.prototypes = prototypes
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x))


class Method:
    """Base class; subclasses set ``Options`` and override what differs.

    The default is plain cross-entropy training of one branch named ``cls``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options

    def __init__(self, cfg: Config, options: Options) -> None:
        self.cfg = cfg
        self.opts = options
        self.stage: Stage | None = None
        self._loaders: dict[str, DataLoader] | None = None

    # -- structure ----------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train", self.cfg.train.epochs)]

    def build_model(self, data: RunData) -> Network:
        m = self.cfg.model
        backbone = build_backbone(m.backbone, in_channels=data.channels)
        classifier = build_classifier(
            m.classifier, backbone.feature_dim, data.num_classes, **m.classifier_options
        )
        return Network(backbone, classifier)

    def trainable_parameters(self, model: Network) -> Iterable[nn.Parameter]:
        return model.parameters()

    # -- data ---------------------------------------------------------------------------
    def loaders(self, data: RunData, epoch: int) -> dict[str, DataLoader]:
        """Loaders of this epoch's branches; built once and re-seeded by the engine."""
        if self._loaders is None:
            self._loaders = self.build_loaders(data)
        return self._loaders

    def build_loaders(self, data: RunData) -> dict[str, DataLoader]:
        t = self.cfg.train
        return {
            "cls": data.train_loader(
                sampler=t.sampler, batch_size=t.batch_size, views=t.view, total_epochs=t.epochs
            )
        }

    # -- training -----------------------------------------------------------------------
    def train_mode(self, model: Network) -> None:
        """Put the model in training mode for the current stage (frozen parts stay in eval)."""
        model.train()

    def on_epoch_start(self, model: Network, epoch: int) -> dict[str, float]:
        """Called before each epoch; returns scalars to log (e.g. the curriculum alpha)."""
        return {}

    def forwarded_branches(self) -> set[str] | None:
        """Loader names whose batches ``step`` forwards this epoch (None: all of them).

        Only used to count images per second honestly when a branch is skipped.
        """
        return None

    def step(self, model: Network, batches: dict[str, Any], epoch: int) -> dict[str, Tensor]:
        """Named loss terms of one step; ``loss`` is the one that is back-propagated."""
        x, y, _ = batches["cls"]
        ce = F.cross_entropy(model(x), y)
        return {"loss": ce, "ce": ce}

    @torch.no_grad()
    def predict(self, model: Network, x: Tensor) -> Tensor:
        """Logits used for evaluation."""
        return model(x)

    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the model's weights, saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
