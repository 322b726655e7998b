"""Contrastive-learning-based hybrid networks (Wang et al., CVPR 2021).

One backbone, two branches, two samplers, one loss per step:

    L = alpha(T) * L_con(B_con) + (1 - alpha(T)) * L_CE(B_cls)

* feature branch: projection MLP (one hidden layer) -> L2-normalised z, trained with SC,
  PSC or MPSC on instance-sampled batches of two augmented views per image;
* classifier branch: one linear layer on the backbone feature, cross-entropy on
  class-balanced batches of one view;
* alpha(T) moves the weight from feature learning to classifier learning (parabolic on
  CIFAR, linear on iNaturalist, constant for the "w/o curriculum" ablation).

Prediction is the classifier branch. ``ce-ce`` swaps the contrastive loss for
cross-entropy through a second linear head (the paper's Table 4 ablation).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor
from torch.utils.data import DataLoader

from longtail.config import known_name
from longtail.engine.rundata import RunData
from longtail.engine.schedules import curriculum_alpha
from longtail.losses import mpsc_loss, psc_loss, sup_con_loss
from longtail.methods.base import Method, Network, Options
from longtail.methods.registry import METHODS
from longtail.models import ProjectionMLP, PrototypeBank, build_classifier


class HybridOptions(Options):
    """Options of the hybrid network; the defaults are the paper's CIFAR recipe."""

    loss: Literal["sc", "psc", "mpsc", "ce"] = "sc"
    temperature: float = Field(0.1, gt=0)  # tau of the contrastive loss
    num_prototypes: int = Field(1, ge=1)  # M, prototypes per class (mpsc)
    curriculum: str = "parabolic"  # alpha(T): parabolic, linear, constant
    alpha: float = Field(0.5, ge=0, le=1)  # the constant curriculum's value
    con_sampler: str = "instance"  # feature branch sampler
    con_batch_size: int | None = Field(None, ge=2)  # images (x2 views); None = train.batch_size
    # The paper's two PSC views are the shared pipeline with and without colour jitter;
    # we use the same pair for SC (our choice, configurable).
    con_views: list[str] = Field(default_factory=lambda: ["hybrid-jitter", "hybrid"])
    con_k_per_class: int | None = Field(None, ge=1)  # k same-class images per sampled class
    cls_sampler: str = "class-balanced"  # classifier branch sampler
    cls_batch_size: int | None = Field(None, ge=1)
    cls_view: str = "hybrid"
    block_size: int | None = Field(1024, ge=1)  # SC anchors per block; None = direct N^2

    @field_validator("curriculum")
    @classmethod
    def _known_curriculum(cls, v: str) -> str:
        return known_name("curriculum", v)

    @field_validator("con_sampler", "cls_sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        return known_name("sampler", v)

    @field_validator("cls_view")
    @classmethod
    def _known_view(cls, v: str) -> str:
        return known_name("view", v)

    @field_validator("con_views")
    @classmethod
    def _known_views(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one view")
        return [known_name("view", name) for name in v]


class Hybrid(Method):
    """The hybrid network; the registered names differ only in their default loss."""

    name = "hybrid-sc"
    Options = HybridOptions
    opts: HybridOptions

    def __init__(self, cfg: Any, options: HybridOptions) -> None:
        super().__init__(cfg, options)
        self.alpha = 1.0

    def build_model(self, data: RunData) -> Network:
        net = super().build_model(data)
        o, m = self.opts, self.cfg.model
        dim = net.backbone.feature_dim
        if o.loss == "ce":
            net.aux_classifier = build_classifier("linear", dim, data.num_classes)
            return net
        net.projector = ProjectionMLP(dim, m.projection_hidden, m.projection_dim)
        if o.loss in ("psc", "mpsc"):
            net.prototypes = PrototypeBank(data.num_classes, o.num_prototypes, m.projection_dim)
        return net

    def build_loaders(self, data: RunData) -> dict[str, DataLoader]:
        o, t = self.opts, self.cfg.train
        return {
            "con": data.train_loader(
                sampler=o.con_sampler,
                batch_size=o.con_batch_size or t.batch_size,
                views=o.con_views,
                k_per_class=o.con_k_per_class,
                total_epochs=t.epochs,
            ),
            "cls": data.train_loader(
                sampler=o.cls_sampler,
                batch_size=o.cls_batch_size or t.batch_size,
                views=o.cls_view,
                total_epochs=t.epochs,
            ),
        }

    def on_epoch_start(self, model: Network, epoch: int) -> dict[str, float]:
        o = self.opts
        self.alpha = curriculum_alpha(o.curriculum, epoch, self.cfg.train.epochs, o.alpha)
        return {"alpha": self.alpha}

    def feature_loss(self, model: Network, views: list[Tensor], y: Tensor) -> Tensor:
        """The feature branch's loss on all views of a batch, stacked view after view."""
        o = self.opts
        labels = y.repeat(len(views))
        h = model.backbone(torch.cat(views))
        if o.loss == "ce":
            return F.cross_entropy(model.aux_classifier(h), labels)
        z = model.projector(h).float()
        if o.loss == "sc":
            return sup_con_loss(z, labels, o.temperature, block_size=o.block_size)
        protos = model.prototypes().float()
        if o.loss == "psc":
            return psc_loss(z, labels, protos[:, 0], o.temperature)
        return mpsc_loss(z, labels, protos, o.temperature)

    def forwarded_branches(self) -> set[str] | None:
        return {k for k, on in (("con", self.alpha > 0), ("cls", self.alpha < 1)) if on}

    def step(self, model: Network, batches: dict[str, Any], epoch: int) -> dict[str, Tensor]:
        views, y_con, _ = batches["con"]
        x_cls, y_cls, _ = batches["cls"]
        terms: dict[str, Tensor] = {}
        loss = torch.zeros((), device=y_cls.device)
        # A branch whose weight is exactly zero is skipped: it could not change the weights.
        if self.alpha > 0:
            terms["con"] = self.feature_loss(model, list(views), y_con)
            loss = loss + self.alpha * terms["con"]
        if self.alpha < 1:
            terms["ce"] = F.cross_entropy(model(x_cls), y_cls)
            loss = loss + (1 - self.alpha) * terms["ce"]
        terms["loss"] = loss
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha = float(state.get("alpha", self.alpha))


_Loss = Literal["sc", "psc", "mpsc", "ce"]


class HybridPSCOptions(HybridOptions):
    loss: _Loss = "psc"


class HybridMPSCOptions(HybridOptions):
    loss: _Loss = "mpsc"
    num_prototypes: int = Field(2, ge=1)


class CECEOptions(HybridOptions):
    loss: _Loss = "ce"


@METHODS.register("hybrid-sc")
class HybridSC(Hybrid):
    """Hybrid network with the supervised contrastive loss."""

    name = "hybrid-sc"


@METHODS.register("hybrid-psc")
class HybridPSC(Hybrid):
    """Hybrid network with the prototypical supervised contrastive loss."""

    name = "hybrid-psc"
    Options = HybridPSCOptions


@METHODS.register("hybrid-mpsc")
class HybridMPSC(Hybrid):
    """Hybrid network with M prototypes per class (MPSC; M = 1 is PSC)."""

    name = "hybrid-mpsc"
    Options = HybridMPSCOptions


@METHODS.register("ce-ce")
class CECE(Hybrid):
    """Ablation: cross-entropy in both branches (the paper's Table 4)."""

    name = "ce-ce"
    Options = CECEOptions
