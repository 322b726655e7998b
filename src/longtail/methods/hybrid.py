"""Contrastive-learning-based hybrid networks (Wang et al., CVPR 2021).

One backbone, two branches, two samplers, one loss per step:

    L = alpha(T) * L_features(B_con) + (1 - alpha(T)) * L_CE(B_cls)

* feature branch: projection MLP (one hidden layer) -> L2-normalised z, trained with SC,
  PSC or MPSC on instance-sampled batches of two augmented views per image;
* classifier branch: one linear layer on the backbone feature, cross-entropy on
  class-balanced batches of one view;
* alpha(T) moves the weight from feature learning to classifier learning (parabolic on
  CIFAR, linear on iNaturalist, constant for the "w/o curriculum" ablation).

Prediction is the classifier branch. The registered variants differ only in their defaults:
hybrid-sc, hybrid-psc, hybrid-mpsc (M = 2) and ce-ce (the paper's Table 4 ablation, CE in
both branches).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor
from torch.utils.data import DataLoader

from longtail.data import RunData
from longtail.methods.base import Batches, Method, Stage, register_method, was
from longtail.methods.contrastive import (
    ContrastiveOptions,
    FeatureBranch,
    SamplerName,
    TransformName,
    contrastive_loader,
)
from longtail.methods.curriculum import CURRICULA, curriculum_alpha

PAPER = "Wang et al., Contrastive Learning based Hybrid Networks for Long-Tailed Image Classification, CVPR 2021"  # noqa: E501


class HybridOptions(ContrastiveOptions):
    """Feature-branch options plus the classifier branch and the curriculum."""

    curriculum: Annotated[str, AfterValidator(CURRICULA.check)] = "parabolic"
    alpha: float = Field(0.5, ge=0, le=1)  # the constant curriculum's value
    # The classifier branch's batches (before 0.2: cls_sampler, cls_batch_size, cls_transform,
    # still read).
    classifier_sampler: SamplerName = Field("class-balanced", validation_alias=was("sampler"))
    classifier_batch_size: int | None = Field(None, ge=1, validation_alias=was("batch_size"))
    classifier_transform: TransformName = Field("hybrid", validation_alias=was("transform"))


class Hybrid(Method):
    """The hybrid network: a contrastive feature branch and a balanced classifier branch."""

    Options = HybridOptions
    opts: HybridOptions

    def setup(self, data: RunData) -> None:
        super().setup(data)  # backbone, classifier
        self.features = FeatureBranch.from_config(
            self.opts, self.cfg.model, self.backbone.feature_dim, data.num_classes
        )
        self.alpha = 1.0

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        o, t = self.opts, self.cfg.train
        return {
            "con": contrastive_loader(data, o, self.cfg),
            "cls": data.train_loader(
                sampler=o.classifier_sampler,
                batch_size=o.classifier_batch_size or t.batch_size,
                transforms=o.classifier_transform,
                total_epochs=t.epochs,
            ),
        }

    def on_epoch_start(self, epoch: int) -> None:
        o = self.opts
        self.alpha = curriculum_alpha(o.curriculum, epoch, self.cfg.train.epochs, o.alpha)
        self.features.health.reset()

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        loss = torch.zeros((), device=next(self.parameters()).device)
        # A branch whose weight is exactly zero is skipped: it could not change the weights.
        if self.alpha > 0:
            views, y, _ = batches["con"]
            h = self.backbone(torch.cat(views))  # views stacked view after view
            terms["con"] = self.features(h, y.repeat(len(views)))
            loss = loss + self.alpha * terms["con"]
        if self.alpha < 1:
            x, y, _ = batches["cls"]
            terms["ce"] = F.cross_entropy(self.classifier(self.backbone(x)), y)
            loss = loss + (1 - self.alpha) * terms["ce"]
        terms["loss"] = loss
        return terms

    def scalars(self) -> dict[str, float]:
        return {"alpha": self.alpha, **self.features.health.scalars()}

    def warnings(self) -> list[str]:
        found = self.features.health.warning(f"{self.opts.loss.upper()} feature-branch")
        return [found] if found else []


register_method(
    "hybrid-sc",
    Hybrid,
    description="Hybrid network with the supervised contrastive (SC) feature loss",
    paper=PAPER,
    defaults={"loss": "sc"},
)
register_method(
    "hybrid-psc",
    Hybrid,
    description="Hybrid network with the prototypical supervised contrastive (PSC) loss",
    paper=PAPER,
    defaults={"loss": "psc"},
)
register_method(
    "hybrid-mpsc",
    Hybrid,
    description="Hybrid network with M prototypes per class (MPSC; M = 1 is PSC)",
    paper=PAPER,
    defaults={"loss": "mpsc", "num_prototypes": 2},
)
register_method(
    "ce-ce",
    Hybrid,
    description="Ablation: cross-entropy in both branches (the hybrid paper's Table 4)",
    paper=PAPER,
    defaults={"loss": "ce"},
)
