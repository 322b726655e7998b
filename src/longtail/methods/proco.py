"""ProCo (Du et al., TPAMI 2024): probabilistic contrastive learning.

Three views of each image in one forward: the first feeds the classifier (logit-adjusted
cross-entropy), the other two the projection head, whose unit features z are scored by the
closed-form expected contrastive loss under per-class von Mises-Fisher distributions
(:func:`longtail.losses.proco_loss`): a contrastive loss over infinitely many samples of
every class, so neither a queue nor a large batch. The vMF of each class is estimated online
from the features (:class:`longtail.losses.proco.ClassVMF`): each step's features are in the
estimate its loss uses (written after the optimizer step), and each epoch starts from the
last epoch's means. Loss: CE + proco_weight x mean ProCo loss of the two views. Prediction:
the classifier's plain logits.

Deviations from the official code (documented, ours): both contrastive views update the
estimate before either's loss (the official code updates and scores view by view); kappa is
Banerjee et al.'s approximation R (p - R^2) / (1 - R^2) (the official code has p R /
(1 - R^2), within 1 % of it for R >= 0.5 at p >= 128).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from longtail import parallel
from longtail.data import RunData
from longtail.losses import proco_loss
from longtail.losses.classification import logit_adjusted_loss
from longtail.losses.proco import ClassVMF
from longtail.methods.base import (
    Batches,
    Method,
    MethodOptions,
    Stage,
    TransformName,
    full_precision,
    register_method,
)
from longtail.methods.contrastive import EmbeddingHealth, WatchesEmbeddings
from longtail.models import ProjectionMLP

PAPER = (
    "Du et al., Probabilistic Contrastive Learning for Long-Tailed Visual Recognition, TPAMI 2024"  # noqa: E501
)


class ProCoOptions(MethodOptions):
    """The official CIFAR recipe's values by default."""

    temperature: float = Field(0.1, gt=0)  # tau of the expected contrastive logits
    proco_weight: float = Field(1.0, ge=0)  # alpha: weight of the ProCo loss against CE
    logit_adjust_tau: float = Field(1.0, ge=0)  # weight of log prior in CE and in ProCo
    classifier_transform: TransformName = "strong"
    con_transforms: list[TransformName] = Field(
        default_factory=lambda: ["simclr", "simclr"], min_length=2, max_length=2
    )


class ProCo(WatchesEmbeddings, Method):
    """A classifier branch and a contrastive branch against per-class vMF distributions."""

    watched = "ProCo"

    Options = ProCoOptions
    opts: ProCoOptions

    def setup(self, data: RunData) -> None:
        super().setup(data)  # backbone, classifier
        m, dim = self.cfg.model, self.backbone.feature_dim
        self.head = ProjectionMLP(dim, m.projection_hidden, m.projection_dim, m.projection_bn)
        self.vmf = ClassVMF(data.num_classes, m.projection_dim)
        prior = torch.as_tensor(data.counts, dtype=torch.float32)
        self.register_buffer("log_prior", torch.log(prior / prior.sum()))
        self._pending: dict[str, Tensor] | None = None
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

    def on_epoch_start(self, epoch: int) -> None:
        self.health.reset()
        self.vmf.start_epoch(epoch)

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        o = self.opts
        views, y, _ = batches["views"]
        h = self.backbone(torch.cat(list(views))).split([len(v) for v in views])
        prior = o.logit_adjust_tau * self.log_prior
        ce = logit_adjusted_loss(full_precision(self.classifier(h[0])), y, self.log_prior,
                                 o.logit_adjust_tau)  # fmt: skip
        # every process sees the global batch: view 2s then view 3s, by process
        z = parallel.gather(full_precision(self.head(torch.cat(h[1:]))))
        labels = parallel.gather_detached(y.repeat(2))
        self._pending = self.vmf.absorbed(z, labels)
        mu, kappa = self.vmf.estimate(self._pending["mean"])
        proco = proco_loss(z, labels, mu, kappa, prior, o.temperature)
        self.health.add(z, proco, math.log(len(kappa)))  # every class alike: log C
        return {"loss": ce + o.proco_weight * proco, "ce": ce, "proco": proco}

    def after_optimizer_step(self) -> None:
        """The step's features into the vMF estimate."""
        if self._pending is not None:
            self.vmf.keep(self._pending)
            self._pending = None


register_method(
    "proco",
    ProCo,
    description="Probabilistic contrastive learning: the expected SupCon loss under per-class "
    "vMF distributions, closed form + logit-adjusted CE",
    paper=PAPER,
)
