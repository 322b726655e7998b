"""The contrastive feature branch shared by the hybrid networks and two-stage SC.

Two augmented views of each image go through the backbone; a projection MLP maps the
features onto the unit sphere, where the SC, PSC or MPSC loss of Wang et al. (CVPR 2021)
acts. ``loss: ce`` replaces projection and contrastive loss by a second linear classifier
trained with cross-entropy (the hybrid paper's CE-CE ablation).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from longtail.config import Config
from longtail.data import SAMPLERS, TRANSFORMS, RunData
from longtail.losses import mpsc_loss, psc_loss, sup_con_loss
from longtail.methods.base import MethodOptions
from longtail.models import ProjectionMLP, PrototypeBank, build_classifier

SamplerName = Annotated[str, AfterValidator(SAMPLERS.check)]
TransformName = Annotated[str, AfterValidator(TRANSFORMS.check)]
FeatureLoss = Literal["sc", "psc", "mpsc", "ce"]


class ContrastiveOptions(MethodOptions):
    """Options of the feature branch; defaults are the hybrid paper's CIFAR recipe."""

    loss: FeatureLoss = "sc"
    temperature: float = Field(0.1, gt=0)  # tau of the contrastive loss
    num_prototypes: int = Field(1, ge=1)  # M, prototypes per class (mpsc)
    con_sampler: SamplerName = "instance"
    con_batch_size: int | None = Field(None, ge=2)  # images (x views); None = train.batch_size
    # The paper's two PSC views are the shared pipeline with and without colour jitter; we use
    # the same pair for SC (our choice, configurable).
    con_transforms: list[TransformName] = Field(
        default_factory=lambda: ["hybrid-jitter", "hybrid"], min_length=1
    )
    con_k_per_class: int | None = Field(None, ge=1)  # k same-class images per sampled class
    block_size: int | None = Field(1024, ge=1)  # SC anchors per block; None = direct N^2


class FeatureBranch(nn.Module):
    """Heads and loss of the feature branch: ``branch(h, labels)`` is the branch's loss.

    Args:
        opts: The branch's options.
        feature_dim: Size of the backbone feature h.
        num_classes: Number of classes C.
        hidden_dim: Hidden units of the projection MLP.
        out_dim: Size of the embedding z (and of the prototypes).
    """

    def __init__(
        self,
        opts: ContrastiveOptions,
        feature_dim: int,
        num_classes: int,
        hidden_dim: int,
        out_dim: int,
    ) -> None:
        super().__init__()
        self.opts = opts
        if opts.loss == "ce":
            self.aux_classifier = build_classifier("linear", feature_dim, num_classes)
            return
        self.projector = ProjectionMLP(feature_dim, hidden_dim, out_dim)
        if opts.loss in ("psc", "mpsc"):
            self.prototypes = PrototypeBank(num_classes, opts.num_prototypes, out_dim)

    def embed(self, h: Tensor) -> Tensor:
        """The L2-normalised embedding z of backbone features h (float32 even under autocast)."""
        return self.projector(h).float()

    def forward(self, h: Tensor, labels: Tensor) -> Tensor:
        """The branch's loss on backbone features ``h`` (all views stacked) and their labels."""
        o = self.opts
        if o.loss == "ce":
            return F.cross_entropy(self.aux_classifier(h), labels)
        z = self.embed(h)
        if o.loss == "sc":
            return sup_con_loss(z, labels, o.temperature, block_size=o.block_size)
        protos = self.prototypes().float()
        if o.loss == "psc":
            return psc_loss(z, labels, protos[:, 0], o.temperature)
        return mpsc_loss(z, labels, protos, o.temperature)


def contrastive_loader(data: RunData, opts: ContrastiveOptions, cfg: Config) -> DataLoader:
    """The feature branch's loader: a list of ``len(con_transforms)`` views per image."""
    return data.train_loader(
        sampler=opts.con_sampler,
        batch_size=opts.con_batch_size or cfg.train.batch_size,
        transforms=opts.con_transforms,
        k_per_class=opts.con_k_per_class,
        total_epochs=cfg.train.epochs,
    )
