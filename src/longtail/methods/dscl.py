"""Decoupled supervised contrastive learning with patch-based self-distillation, DSCL + PBSD
(Xuan & Zhang, AAAI 2024).

Stage "features" (uniform sampling, two views per image): a query encoder (backbone + MLP
head) and its momentum copy, the key encoder, which fills a labelled FIFO queue. The loss

    L = L_DSCL(q, k, queue) + lambda * L_PBSD

pulls each query to its own key with a fixed share alpha of the target and to its other
classmates with the rest (DSCL), and makes the embedding of small boxes cropped from the
query view (the student) match the distribution that the same boxes pooled from the query's
feature map (the teacher, by RoIAlign) give over the own key and the queue (PBSD).
Stage "classifier": a new linear classifier on the frozen backbone (BatchNorm statistics
frozen too), class-balanced sampling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.ops import roi_align

from longtail import parallel
from longtail.config import Config
from longtail.data import RunData
from longtail.data.batch_augment import Draw
from longtail.data.dataset import item_seed
from longtail.errors import UsageError
from longtail.losses import decoupled_contrastive_loss, pbsd_loss
from longtail.methods.base import (
    Batches,
    Method,
    MethodOptions,
    Stage,
    TransformName,
    full_precision,
    register_method,
)
from longtail.methods.classifier_stage import (
    ClassifierStageOptions,
    FirstStageWarmStart,
    check_stage_lengths,
    standardised_classifier,
    with_classifier_stage,
)
from longtail.methods.contrastive import EmbeddingHealth, WatchesEmbeddings
from longtail.models import LabelledQueue, ProjectionMLP, momentum_copy, momentum_update

PAPER = "Xuan & Zhang, Decoupled Contrastive Learning for Long-Tailed Recognition, AAAI 2024"


class DSCLOptions(MethodOptions, ClassifierStageOptions):
    """Defaults for 28-32 px images (ours); the ImageNet-LT recipe sets the paper's values."""

    moved = {"sampler": "train.sampler"}  # its own option before 0.3

    beta: float = Field(8.0, ge=0)  # alpha = 1 / (1 + beta): the own key's share of the target
    temperature: float = Field(0.07, gt=0)
    momentum: float = Field(0.99, ge=0, lt=1)  # key encoder EMA (0.999 in the paper)
    queue_size: int = Field(1024, ge=0)  # K labelled keys (65,536 on ImageNet-LT)
    pbsd_weight: float = Field(1.5, ge=0)  # lambda; 0 turns PBSD off (the DSCL ablation)
    patches: int = Field(5, ge=1)  # L boxes per query view
    patch_scale: tuple[float, float] = (0.05, 0.6)  # box area as a fraction of the view
    patch_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # box aspect ratio range
    patch_size: int = Field(16, ge=4)  # student crops are resized to this (64 at 224 px)
    con_transforms: list[TransformName] = Field(
        default_factory=lambda: ["simclr", "simclr"], min_length=2, max_length=2
    )  # query view, key view
    classifier_epochs: int = Field(10, ge=1)
    classifier_lr: float = Field(0.5, gt=0)
    classifier_weight_decay: float = Field(0.0, ge=0)
    classifier_transform: TransformName = "crop-flip"
    classifier_bn: bool = True  # ours: contrastive features make plain SGD diverge


class DSCL(FirstStageWarmStart, WatchesEmbeddings, Method):
    """DSCL + PBSD, then a linear classifier on frozen features."""

    watched = "DSCL"

    Options = DSCLOptions
    opts: DSCLOptions

    @classmethod
    def check_config(cls, cfg: Config, options: DSCLOptions) -> None:  # type: ignore[override]
        check_stage_lengths(cfg, options)
        low, high = options.patch_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"patch_scale must be 0 < low <= high <= 1, got {options.patch_scale}")
        if not 0 < options.patch_ratio[0] <= options.patch_ratio[1]:
            raise ValueError(f"patch_ratio must be 0 < low <= high, got {options.patch_ratio}")

    def setup(self, data: RunData) -> None:
        super().setup(data)  # backbone, classifier (trained in the classifier stage only)
        if self.opts.pbsd_weight > 0:
            self._check_feature_map(data.channels)
        standardised_classifier(self, self.opts)
        m, dim = self.cfg.model, self.backbone.feature_dim
        self.head = ProjectionMLP(dim, m.projection_hidden, m.projection_dim, m.projection_bn)
        # The key encoder: a momentum copy of the query encoder, never trained by gradients.
        self.key_backbone = momentum_copy(self.backbone)
        self.key_head = momentum_copy(self.head)
        self.queue = LabelledQueue(self.opts.queue_size, m.projection_dim)
        self._pending: tuple[Tensor, Tensor] | None = None
        self._epoch = 0  # with step_in_epoch: where the PBSD boxes are drawn from
        self.health = EmbeddingHealth()

    @property
    def alpha(self) -> float:
        return 1.0 / (1.0 + self.opts.beta)

    def stages(self) -> list[Stage]:
        features = Stage(
            "features",
            self.cfg.train.epochs - self.opts.classifier_epochs,
            start=lambda: self.freeze(self.classifier),
            loaders=self._feature_loaders,
            step=self._feature_step,
        )
        return with_classifier_stage(self, features, self.opts)

    def _feature_loaders(self, data: RunData) -> dict[str, DataLoader]:
        o, t = self.opts, self.cfg.train
        loader = data.train_loader(
            sampler=t.sampler,
            batch_size=t.batch_size,
            transforms=o.con_transforms,
            total_epochs=t.epochs,
        )
        return {"views": loader}

    def on_epoch_start(self, epoch: int) -> None:
        self.health.reset()
        self._epoch = epoch

    # -- stage 1 ------------------------------------------------------------------------
    def boxes(self, n: int, height: int, width: int, device: torch.device) -> Tensor:
        """``patches`` random boxes per image, (n * L, 4) as x0, y0, x1, y1 in pixels.

        Drawn like RandomResizedCrop's: area a fraction of the view in ``patch_scale``,
        log-uniform aspect ratio in ``patch_ratio``, clipped to the view. Drawn for the
        global batch from a CPU generator seeded by (seed, epoch, step), each process keeping
        the rows of its images: the boxes do not depend on the number of processes, and a
        resumed epoch draws them again.
        """
        o = self.opts
        step = self.step_in_epoch + 1
        g = torch.Generator().manual_seed(item_seed(self.cfg.seed, self._epoch, step))
        r = parallel.rank()
        draw = Draw(g, n * parallel.world_size(), slice(r * n, (r + 1) * n))
        area = height * width * draw.uniform(*o.patch_scale, o.patches).reshape(-1)
        log_ratio = draw.uniform(math.log(o.patch_ratio[0]), math.log(o.patch_ratio[1]), o.patches)
        ratio = torch.exp(log_ratio.reshape(-1))
        w = torch.sqrt(area * ratio).clamp(1, width)
        h = torch.sqrt(area / ratio).clamp(1, height)
        x0 = draw.uniform(0.0, 1.0, o.patches).reshape(-1) * (width - w)
        y0 = draw.uniform(0.0, 1.0, o.patches).reshape(-1) * (height - h)
        return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).to(device)

    def _check_feature_map(self, channels: int) -> None:
        """PBSD pools boxes of a (N, C, h, w) feature map: a backbone of tokens (a ViT)
        cannot give them."""
        size = self.cfg.data.image_size
        was_training = self.backbone.training
        with torch.no_grad():
            fmap = self.backbone.eval().forward_features(torch.zeros(1, channels, size, size))
        self.backbone.train(was_training)
        if fmap.dim() != 4:
            raise UsageError(
                f"config key 'model.backbone': dscl's PBSD pools boxes of a feature map, but "
                f"{self.cfg.model.backbone} gives shape {tuple(fmap.shape)}; use a "
                "convolutional backbone or set method.pbsd_weight: 0"
            )

    def _feature_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        o = self.opts
        (x_q, x_k), y, _ = batches["views"]
        fmap = self.backbone.forward_features(x_q)
        q = full_precision(self.head(self.backbone.forward_head(fmap)))
        with torch.no_grad():
            k = full_precision(self.key_head(self.key_backbone(x_k)))
        # The global batch on every process; the same keys join every process's queue.
        q_all, k_all = parallel.gather(q), parallel.gather_detached(k)
        y_all = parallel.gather_detached(y)
        queue = self.queue
        dscl = decoupled_contrastive_loss(
            q_all, k_all, y_all, queue.keys, queue.labels, self.alpha, o.temperature
        )
        self._pending = (k_all, y_all)
        chance = math.log(2 * len(q_all) - 1 + queue.filled())
        self.health.add(q_all, dscl, chance)
        terms = {"dscl": dscl}
        loss = dscl
        if o.pbsd_weight > 0:
            terms["pbsd"] = self._pbsd(x_q, fmap, k)
            loss = loss + o.pbsd_weight * terms["pbsd"]
        terms["loss"] = loss
        return terms

    def _pbsd(self, x_q: Tensor, fmap: Tensor, k: Tensor) -> Tensor:
        o = self.opts
        n, _, height, width = x_q.shape
        boxes = self.boxes(n, height, width, x_q.device)
        rois = torch.cat(
            [
                torch.arange(n, device=x_q.device)
                .repeat_interleave(o.patches)[:, None]
                .to(boxes.dtype),
                boxes,
            ],
            dim=1,
        )
        rois = rois.to(full_precision(x_q).dtype)  # roi_align wants the input's dtype
        # Teacher: each box pooled (2 x 2, then averaged) from the query's feature map.
        with torch.no_grad():
            pooled = roi_align(
                full_precision(fmap), rois, 2, spatial_scale=fmap.shape[-1] / width, aligned=True
            )
            teacher = full_precision(self.head(pooled.mean(dim=(2, 3)).to(fmap.dtype)))
        # Student: the same box cut from the image, resized, through the query encoder.
        crops = roi_align(full_precision(x_q), rois, o.patch_size, spatial_scale=1.0, aligned=True)
        student = full_precision(self.head(self.backbone(crops.to(x_q.dtype))))
        shape = (n, o.patches, -1)
        return pbsd_loss(
            student.view(shape),
            teacher.view(shape),
            k,
            self.queue.keys,
            self.queue.labels,
            o.temperature,
        )

    def after_optimizer_step(self) -> None:
        """EMA of the query encoder into the key encoder, then the batch's keys into the queue."""
        if self._pending is None:  # the classifier stage has no keys
            return
        m = self.opts.momentum
        momentum_update(self.key_backbone, self.backbone, m)
        momentum_update(self.key_head, self.head, m)
        self.queue.push(*self._pending)
        self._pending = None

    def _load_from_state_dict(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        # Checkpoints from before LabelledQueue kept the queue as three buffers of the method.
        for old, new in (("queue", "queue.keys"), ("queue_labels", "queue.labels"),
                         ("queue_next", "queue.next")):  # fmt: skip
            if prefix + old in state and prefix + new not in state:
                state[prefix + new] = state.pop(prefix + old)
        super()._load_from_state_dict(state, prefix, *args)

    def scalars(self) -> dict[str, float]:
        health = super().scalars()
        if not health:  # the classifier stage
            return {}
        return {**health, "queue_filled": self.queue.filled()}


register_method(
    "dscl",
    DSCL,
    description="Decoupled SupCon with a momentum queue + patch-based self-distillation, then a "
    "classifier on frozen features",
    paper=PAPER,
)
