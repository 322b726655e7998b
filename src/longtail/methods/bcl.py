"""Balanced contrastive learning, BCL (Zhu et al., CVPR 2022).

One backbone forward over three views of each image: the first, strongly augmented, feeds a
cosine classifier trained with logit-adjusted cross-entropy; the other two (SimCLR-style)
feed a projection head trained with the balanced contrastive loss, whose targets include one
centre per class made from the classifier's own weight vectors by a second head:

    L = lambda * CE(logits + tau_LA * log prior, y) + mu * L_BCL(z, [y; y], centres)

Instance sampling; the logit adjustment is for training only: prediction is the raw
classifier.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from longtail import parallel
from longtail.config import Config
from longtail.data import RunData
from longtail.losses import balanced_contrastive_loss
from longtail.losses.classification import logit_adjusted_loss
from longtail.methods.base import (
    Batches,
    Method,
    MethodOptions,
    Stage,
    TransformName,
    full_precision,
    register_method,
    was,
)
from longtail.methods.contrastive import EmbeddingHealth, WatchesEmbeddings
from longtail.models import ProjectionMLP

PAPER = "Zhu et al., Balanced Contrastive Learning for Long-Tailed Visual Recognition, CVPR 2022"


class BCLOptions(MethodOptions):
    """The paper's CIFAR recipe by default."""

    moved = {"sampler": "train.sampler"}  # its own option before 0.3

    ce_weight: float = Field(2.0, ge=0)  # lambda
    bcl_weight: float = Field(0.6, ge=0)  # mu
    temperature: float = Field(0.1, gt=0)  # tau of the balanced contrastive loss
    logit_adjust_tau: float = Field(1.0, ge=0)  # tau_LA of the training-time logit adjustment
    # the classifier's view (cls_transform before 0.2, still read)
    classifier_transform: TransformName = Field("strong", validation_alias=was("transform"))
    con_transforms: list[TransformName] = Field(
        default_factory=lambda: ["simclr", "simclr"], min_length=2, max_length=2
    )
    block_size: int | None = Field(1024, ge=1)  # BCL anchors per block; None = all at once


class BCL(WatchesEmbeddings, Method):
    """BCL: a cosine classifier and a balanced contrastive branch with class centres."""

    watched = "BCL"

    Options = BCLOptions
    opts: BCLOptions
    default_classifier = ("cosine", {"scale": 30.0})

    @classmethod
    def check_config(cls, cfg: Config, options: BCLOptions) -> None:  # type: ignore[override]
        if cfg.model.classifier != "cosine":
            raise ValueError(
                f"bcl classifies with a cosine classifier, not {cfg.model.classifier!r}: leave "
                "model.classifier unset (cosine, scale 30 as in the paper) or set it to cosine"
            )

    def setup(self, data: RunData) -> None:
        super().setup(data)  # backbone, cosine classifier
        m, dim = self.cfg.model, self.backbone.feature_dim
        self.projector = ProjectionMLP(dim, m.projection_hidden, m.projection_dim, True)
        # Class centres: the classifier's weight vectors through a second head of that shape.
        self.centre_head = ProjectionMLP(dim, m.projection_hidden, m.projection_dim, True)
        prior = torch.as_tensor(data.counts, dtype=torch.float32)
        self.register_buffer("log_prior", torch.log(prior / prior.sum()))
        self.health = EmbeddingHealth()

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        o, t = self.opts, self.cfg.train
        loader = data.train_loader(
            sampler=t.sampler,
            batch_size=t.batch_size,
            transforms=[o.classifier_transform, *o.con_transforms],
            total_epochs=t.epochs,
        )
        return {"views": loader}

    def forward_views(self, views: list[Tensor]) -> list[Tensor]:
        """Backbone features of each view, from one forward over all of them."""
        return list(self.backbone(torch.cat(views)).split([len(v) for v in views]))

    def centres(self) -> Tensor:
        """One L2-normalised centre per class, from the classifier's weight vectors."""
        return self.centre_head(self.classifier.weight)

    def on_epoch_start(self, epoch: int) -> None:
        self.health.reset()

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        o = self.opts
        views, y, _ = batches["views"]
        h_cls, *h_con = self.forward_views(list(views))
        logits = self.classifier(h_cls)
        ce = logit_adjusted_loss(full_precision(logits), y, self.log_prior, o.logit_adjust_tau)
        # in-batch: every process sees the global batch (view 1s, then view 2s, by process)
        z = parallel.gather(full_precision(self.projector(torch.cat(h_con))))
        labels = parallel.gather_detached(y.repeat(len(h_con)))
        centres = full_precision(self.centres())
        bcl = balanced_contrastive_loss(z, labels, centres, o.temperature, block_size=o.block_size)
        self.health.add(z, bcl, math.log(len(centres)))  # all targets alike: log C
        return {"loss": o.ce_weight * ce + o.bcl_weight * bcl, "ce": ce, "bcl": bcl}


register_method(
    "bcl",
    BCL,
    description="Balanced contrastive learning: class-averaged, class-complemented SupCon + "
    "logit-adjusted CE",
    paper=PAPER,
)
