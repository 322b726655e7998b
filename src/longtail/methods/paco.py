"""PaCo (Cui et al., ICCV 2021) and GPaCo (Cui et al., TPAMI 2023): parametric contrastive
learning.

A MoCo-style contrastive branch whose targets include learnable class centres: the linear
classifier's logits on the pooled feature ``h``, with the log class prior added in training
(Balanced Softmax), so the classifier is learnt inside the contrastive loss
(:func:`longtail.losses.paco_loss`). Each step:

    PaCo:   q = g(f(x_query)) and k = g'(f'(x_key)) from a momentum copy (f', g') of the
            encoder; anchors q; sample targets [q, k, queue]; centres W h(x_query) + b.
    GPaCo:  no momentum copy: both views through (f, g) with gradients; anchors both
            views; sample targets [both views, queue]; centres of both views.

After the optimizer step the momentum copy follows the encoder (PaCo) and the keys (PaCo: k;
GPaCo: the second view, detached) enter the labelled FIFO queue. Prediction is the
classifier's plain logits (the prior lives only in the training loss). The official CIFAR
recipe trains 400 epochs with AutoAugment + Cutout on the query view and SimCLR's views on
the key view; its projection head is Linear-BN-ReLU-Linear (``model.projection_bn``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from longtail import parallel
from longtail.data import RunData
from longtail.losses import paco_loss
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
from longtail.models import LabelledQueue, ProjectionMLP, momentum_copy, momentum_update

PAPER = "Cui et al., Parametric Contrastive Learning, ICCV 2021"
GPAPER = "Cui et al., Generalized Parametric Contrastive Learning, TPAMI 2023"


class PaCoOptions(MethodOptions):
    """The official CIFAR-100-LT r100 recipe's values by default (PaCo)."""

    alpha: float = Field(0.02, ge=0)  # weight of each same-class sample against the centre's 1
    temperature: float = Field(0.05, gt=0)  # tau of the sample logits (the centres have none)
    logit_adjust_tau: float = Field(1.0, ge=0)  # weight of log prior on the centre logits
    momentum_encoder: bool = True  # PaCo: keys from a momentum copy; GPaCo: none
    momentum: float = Field(0.999, ge=0, lt=1)  # EMA of the key encoder (PaCo)
    queue_size: int = Field(1024, ge=0)  # K labelled keys
    # The query view (it also feeds the classifier), then the key view.
    con_transforms: list[TransformName] = Field(
        default_factory=lambda: ["strong", "simclr"], min_length=2, max_length=2
    )


class PaCo(WatchesEmbeddings, Method):
    """Contrastive learning with the classifier's centres among the targets."""

    watched = "PaCo"

    Options = PaCoOptions
    opts: PaCoOptions

    def setup(self, data: RunData) -> None:
        super().setup(data)  # backbone, linear classifier (the centres)
        m, dim = self.cfg.model, self.backbone.feature_dim
        self.head = ProjectionMLP(dim, m.projection_hidden, m.projection_dim, m.projection_bn)
        if self.opts.momentum_encoder:
            self.key_backbone = momentum_copy(self.backbone)
            self.key_head = momentum_copy(self.head)
        self.queue = LabelledQueue(self.opts.queue_size, m.projection_dim)
        prior = torch.as_tensor(data.counts, dtype=torch.float32)
        self.register_buffer("log_prior", torch.log(prior / prior.sum()))
        self._pending: tuple[Tensor, Tensor] | None = None
        self.health = EmbeddingHealth()

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        t = self.cfg.train
        loader = data.train_loader(
            sampler=t.sampler,
            batch_size=t.batch_size,
            transforms=self.opts.con_transforms,
            total_epochs=t.epochs,
        )
        return {"views": loader}

    def on_epoch_start(self, epoch: int) -> None:
        self.health.reset()

    def centre_logits(self, h: Tensor) -> Tensor:
        """The centres' logits of pooled features ``h``, with the training prior."""
        prior = self.opts.logit_adjust_tau * self.log_prior
        return full_precision(self.classifier(h)) + prior

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        o = self.opts
        (x_q, x_k), y, _ = batches["views"]
        if o.momentum_encoder:
            h = self.backbone(x_q)
            anchors, centres, labels = full_precision(self.head(h)), self.centre_logits(h), y
            with torch.no_grad():
                keys = full_precision(self.key_head(self.key_backbone(x_k)))
        else:  # GPaCo: both views are anchors, the second also the queue's keys
            h = self.backbone(torch.cat([x_q, x_k]))
            anchors, centres = full_precision(self.head(h)), self.centre_logits(h)
            labels, keys = y.repeat(2), anchors[len(y) :].detach()
        # The global batch on every process; the same keys join every process's queue.
        z, c = parallel.gather(anchors), parallel.gather(centres)
        z_labels = parallel.gather_detached(labels)
        keys_all, key_labels = parallel.gather_detached(keys), parallel.gather_detached(y)
        bank, bank_labels = self.queue.keys, self.queue.labels
        if o.momentum_encoder:  # the keys are targets too (each anchor's own key a positive)
            bank, bank_labels = torch.cat([keys_all, bank]), torch.cat([key_labels, bank_labels])
        paco = paco_loss(z, c, z_labels, bank, bank_labels, o.alpha, o.temperature)
        self._pending = (keys_all, key_labels)
        targets = c.shape[1] + len(z) - 1 + int((bank_labels >= 0).sum())
        self.health.add(z, paco, math.log(targets))  # every target alike: log of their count
        return {"loss": paco, "paco": paco}

    def after_optimizer_step(self) -> None:
        """EMA of the encoder into the key encoder (PaCo), then the keys into the queue."""
        if self._pending is None:
            return
        if self.opts.momentum_encoder:
            momentum_update(self.key_backbone, self.backbone, self.opts.momentum)
            momentum_update(self.key_head, self.head, self.opts.momentum)
        self.queue.push(*self._pending)
        self._pending = None


register_method(
    "paco",
    PaCo,
    description="Parametric contrastive learning: a MoCo queue and the classifier's centres as "
    "targets, Balanced-Softmax prior",
    paper=PAPER,
)
register_method(
    "gpaco",
    PaCo,
    description="PaCo without the momentum encoder: both views are anchors, the queue kept",
    paper=GPAPER,
    defaults={"momentum_encoder": False, "alpha": 0.01},
)
