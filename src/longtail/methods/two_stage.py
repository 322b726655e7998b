"""Two-stage supervised contrastive learning (the hybrid paper's Table 5 baseline).

Stage "features": the backbone and projection head learn with the contrastive loss alone on
instance-sampled two-view batches. Stage "classifier": the backbone is frozen (weights and
BatchNorm statistics) and the linear classifier is trained with cross-entropy on
class-balanced batches, with its own learning rate and a cosine schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from longtail.config import Config
from longtail.data import RunData
from longtail.methods.base import Batches, Method, Stage, register_method
from longtail.methods.classifier_stage import (
    ClassifierStageOptions,
    FirstStageWarmStart,
    check_stage_lengths,
    standardised_classifier,
    with_classifier_stage,
)
from longtail.methods.contrastive import ContrastiveOptions, FeatureBranch, contrastive_loader
from longtail.methods.hybrid import PAPER


class TwoStageOptions(ContrastiveOptions, ClassifierStageOptions):
    """Feature-branch options, then the classifier stage's."""

    classifier_bn: bool = True  # ours: contrastive features make plain SGD diverge


class TwoStageSC(FirstStageWarmStart, Method):
    """SC pre-training, then a linear classifier on frozen features."""

    Options = TwoStageOptions
    opts: TwoStageOptions

    def setup(self, data: RunData) -> None:
        super().setup(data)  # backbone, classifier
        standardised_classifier(self, self.opts)
        self.features = FeatureBranch.from_config(
            self.opts, self.cfg.model, self.backbone.feature_dim, data.num_classes
        )

    @classmethod
    def check_config(cls, cfg: Config, options: TwoStageOptions) -> None:  # type: ignore[override]
        check_stage_lengths(cfg, options)

    def stages(self) -> list[Stage]:
        o, total = self.opts, self.cfg.train.epochs
        features = Stage(
            "features",
            total - o.classifier_epochs,
            start=lambda: self.freeze(self.classifier),
            loaders=self._feature_loaders,
            step=self._feature_step,
        )
        return with_classifier_stage(self, features, o)

    def on_epoch_start(self, epoch: int) -> None:
        self.features.health.reset()

    def scalars(self) -> dict[str, float]:
        return self.features.health.scalars()

    def warnings(self) -> list[str]:
        found = self.features.health.warning(f"{self.opts.loss.upper()}")
        return [found] if found else []

    def _feature_loaders(self, data: RunData) -> dict[str, DataLoader]:
        return {"con": contrastive_loader(data, self.opts, self.cfg)}

    def _feature_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        views, y, _ = batches["con"]
        con = self.features(self.backbone(torch.cat(views)), y.repeat(len(views)))
        return {"loss": con, "con": con}


register_method(
    "two-stage-sc",
    TwoStageSC,
    description="SC pre-training, then a linear classifier on frozen features (Table 5)",
    paper=PAPER,
)
