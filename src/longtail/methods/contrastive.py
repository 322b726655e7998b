"""The contrastive feature branch shared by the hybrid networks and two-stage SC.

Two augmented views of each image go through the backbone; a projection MLP maps the
features onto the unit sphere, where the SC, PSC or MPSC loss of Wang et al. (CVPR 2021)
acts. ``loss: ce`` replaces projection and contrastive loss by a second linear classifier
trained with cross-entropy (the hybrid paper's CE-CE ablation).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from longtail import parallel
from longtail.config import Config, ModelConfig
from longtail.data import RunData
from longtail.losses import mpsc_loss, psc_loss, sup_con_loss
from longtail.methods.base import MethodOptions, SamplerName, TransformName, full_precision
from longtail.models import ProjectionMLP, PrototypeBank, build_classifier

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


def effective_rank(z: Tensor) -> float:
    """exp(entropy) of the normalised singular values of the centred rows of ``z``: about the
    number of directions the embeddings spread over (0 when they all coincide)."""
    s = torch.linalg.svdvals((z - z.mean(0)).float())
    total = s.sum()
    if float(total) <= 1e-6 * max(1, z.shape[0]):
        return 0.0
    p = s / total
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class EmbeddingHealth:
    """Cheap per-epoch signs that a contrastive branch is learning nothing.

    A contrastive loss sits at its chance value, log(N - 1) for SC over N views or
    log(C - 1) for PSC, exactly when every embedding scores the same against every target:
    collapsed embeddings (mean pairwise cosine near 1) or untrained ones. The statistics stay
    on the device until the epoch ends.
    """

    #: An epoch whose every step is this close to chance (relatively) gets a warning.
    TOLERANCE = 0.01

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._cos: Tensor | None = None
        self._dev: Tensor | None = None
        self._last: Tensor | None = None
        self._steps = 0
        self.chance = float("nan")

    def add(self, z: Tensor, loss: Tensor, chance: float) -> None:
        z, n = z.detach(), z.shape[0]
        total = z.sum(0)
        cos = (total @ total - n) / (n * (n - 1))  # mean over pairs i != j of z_i . z_j
        dev = (loss.detach() - chance).abs() / chance
        self._cos = cos if self._cos is None else self._cos + cos
        self._dev = dev if self._dev is None else torch.maximum(self._dev, dev)
        self._last, self._steps, self.chance = z, self._steps + 1, chance

    def epoch_state(self) -> dict[str, Any]:
        """The epoch's statistics so far (for a checkpoint written mid-epoch)."""

        def value(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        return {"cos": value(self._cos), "dev": value(self._dev), "last": value(self._last),
                "steps": self._steps, "chance": self.chance}  # fmt: skip

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        self._cos, self._dev, self._last = state["cos"], state["dev"], state["last"]
        self._steps, self.chance = state["steps"], state["chance"]

    def scalars(self) -> dict[str, float]:
        """``z_cos``: mean pairwise cosine of z over the epoch (1 = collapsed); ``z_rank``: the
        effective rank of the last batch's z."""
        if not self._steps:
            return {}
        assert self._cos is not None and self._last is not None
        return {"z_cos": float(self._cos) / self._steps, "z_rank": effective_rank(self._last)}

    def warning(
        self,
        what: str,
        fix: str = "add warm-up (optim.warmup_epochs), lower optim.lr or set "
        "model.projection_bn=true",
    ) -> str | None:
        if not self._steps or float(self._dev) >= self.TOLERANCE:  # type: ignore[arg-type]
            return None
        cos = float(self._cos) / self._steps  # type: ignore[arg-type]
        return (
            f"the {what} loss sat at its chance value {self.chance:.4f} for the whole epoch "
            f"(mean pairwise cosine of z {cos:.3f}): the embeddings are collapsed or not "
            f"learning; {fix}"
        )


class WatchesEmbeddings:
    """The scalars and the warning of a method whose contrastive embeddings its
    ``self.health`` watches (BCL, DSCL, PaCo, ProCo); ``watched`` names the loss."""

    watched: str
    health: EmbeddingHealth

    def scalars(self) -> dict[str, float]:
        return self.health.scalars()

    def warnings(self) -> list[str]:
        found = self.health.warning(
            self.watched, "add warm-up (optim.warmup_epochs) or lower optim.lr"
        )
        return [found] if found else []


class FeatureBranch(nn.Module):
    """Heads and loss of the feature branch: ``branch(h, labels)`` is the branch's loss.

    Args:
        opts: The branch's options.
        feature_dim: Size of the backbone feature h.
        num_classes: Number of classes C.
        hidden_dim: Hidden units of the projection MLP.
        out_dim: Size of the embedding z (and of the prototypes).
        batch_norm: BatchNorm on the projection MLP's hidden layer.
    """

    def __init__(
        self,
        opts: ContrastiveOptions,
        feature_dim: int,
        num_classes: int,
        hidden_dim: int,
        out_dim: int,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.opts = opts
        self.health = EmbeddingHealth()  # stays empty for loss "ce"
        if opts.loss == "ce":
            self.aux_classifier = build_classifier("linear", feature_dim, num_classes)
            return
        self.projector = ProjectionMLP(feature_dim, hidden_dim, out_dim, batch_norm)
        if opts.loss in ("psc", "mpsc"):
            self.prototypes = PrototypeBank(num_classes, opts.num_prototypes, out_dim)

    @classmethod
    def from_config(
        cls, opts: ContrastiveOptions, model: ModelConfig, feature_dim: int, num_classes: int
    ) -> FeatureBranch:
        """The branch with the projection sizes of the config's ``model`` section."""
        return cls(
            opts,
            feature_dim,
            num_classes,
            model.projection_hidden,
            model.projection_dim,
            model.projection_bn,
        )

    def embed(self, h: Tensor) -> Tensor:
        """The L2-normalised embedding z of backbone features h (float32 even under autocast)."""
        return full_precision(self.projector(h))

    def forward(self, h: Tensor, labels: Tensor) -> Tensor:
        """The branch's loss on backbone features ``h`` (all views stacked) and their labels."""
        o = self.opts
        if o.loss == "ce":
            return F.cross_entropy(self.aux_classifier(h), labels)
        z = self.embed(h)
        if o.loss == "sc":  # in-batch: every process sees the global batch
            z, labels = parallel.gather(z), parallel.gather_detached(labels)
            loss = sup_con_loss(z, labels, o.temperature, block_size=o.block_size)
            chance = math.log(z.shape[0] - 1)
        else:
            protos = full_precision(self.prototypes())
            classes, per_class = protos.shape[:2]
            chance = math.log((classes - 1) * per_class)
            if o.loss == "psc":
                loss = psc_loss(z, labels, protos[:, 0], o.temperature)
            else:
                loss = mpsc_loss(z, labels, protos, o.temperature)
        if self.training:
            self.health.add(z, loss, chance)
        return loss


def contrastive_loader(data: RunData, opts: ContrastiveOptions, cfg: Config) -> DataLoader:
    """The feature branch's loader: a list of ``len(con_transforms)`` views per image."""
    return data.train_loader(
        sampler=opts.con_sampler,
        batch_size=opts.con_batch_size or cfg.train.batch_size,
        transforms=opts.con_transforms,
        k_per_class=opts.con_k_per_class,
        total_epochs=cfg.train.epochs,
    )
