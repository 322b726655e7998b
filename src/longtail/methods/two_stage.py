"""Two-stage supervised contrastive learning (the hybrid paper's Table 5 baseline).

Stage "features": the backbone and projection head learn with the contrastive loss alone
on instance-sampled two-view batches. Stage "classifier": the backbone is frozen
(weights and BatchNorm statistics) and a linear classifier is trained with cross-entropy on
class-balanced batches, with its own learning rate and a cosine schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from longtail.engine.rundata import RunData
from longtail.methods.base import Network, Stage
from longtail.methods.hybrid import Hybrid, HybridOptions
from longtail.methods.registry import METHODS


class TwoStageOptions(HybridOptions):
    """Hybrid options plus the classifier stage; the curriculum settings are unused."""

    loss: Literal["sc", "psc", "mpsc", "ce"] = "sc"
    classifier_epochs: int = Field(30, ge=1)  # the last epochs of train.epochs
    classifier_lr: float = Field(0.1, gt=0)  # peak lr of the classifier stage (cosine decay)
    classifier_weight_decay: float = Field(5e-4, ge=0)


@METHODS.register("two-stage-sc")
class TwoStageSC(Hybrid):
    """SC pre-training, then a linear classifier on frozen features."""

    name = "two-stage-sc"
    Options = TwoStageOptions
    opts: TwoStageOptions

    def stages(self) -> list[Stage]:
        o, total = self.opts, self.cfg.train.epochs
        if o.classifier_epochs >= total:
            from longtail.errors import UsageError

            raise UsageError(
                f"method.classifier_epochs={o.classifier_epochs} leaves no feature epochs of "
                f"train.epochs={total}; lower it"
            )
        cls_optim = {
            "lr": o.classifier_lr,
            "schedule": "cosine",
            "warmup_epochs": 0.0,
            "weight_decay": o.classifier_weight_decay,
        }
        return [
            Stage("features", total - o.classifier_epochs),
            Stage("classifier", o.classifier_epochs, cls_optim),
        ]

    def _classifier_stage(self) -> bool:
        return self.stage is not None and self.stage.name == "classifier"

    def loaders(self, data: RunData, epoch: int) -> dict[str, DataLoader]:
        both = super().loaders(data, epoch)
        key = "cls" if self._classifier_stage() else "con"
        return {key: both[key]}

    def trainable_parameters(self, model: Network) -> Iterable[nn.Parameter]:
        if self._classifier_stage():
            return model.classifier.parameters()
        return (p for n, p in model.named_parameters() if not n.startswith("classifier."))

    def train_mode(self, model: Network) -> None:
        model.train()
        if self._classifier_stage():
            model.backbone.eval()  # frozen features: BatchNorm statistics stay as learned

    def on_epoch_start(self, model: Network, epoch: int) -> dict[str, float]:
        self.alpha = 0.0 if self._classifier_stage() else 1.0
        return {"alpha": self.alpha}

    def step(self, model: Network, batches: dict[str, Any], epoch: int) -> dict[str, Tensor]:
        if self._classifier_stage():
            x, y, _ = batches["cls"]
            with torch.no_grad():
                h = model.backbone(x)
            ce = F.cross_entropy(model.classifier(h), y)
            return {"loss": ce, "ce": ce}
        views, y, _ = batches["con"]
        con = self.feature_loss(model, list(views), y)
        return {"loss": con, "con": con}
