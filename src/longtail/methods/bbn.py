"""BBN: bilateral-branch network with cumulative learning (Zhou et al., CVPR 2020).

The backbone's trunk is shared; its last stage is there twice: the conventional branch sees
instance-sampled batches, the re-balancing branch (its own copy of the last stage,
initialised apart) sees reversed-sampled ones (p_c proportional to n_max / n_c). With
alpha = 1 - (T / T_max)^2 moving from the first branch to the second:

    z = W [alpha f_c ; (1 - alpha) f_r],   L = alpha CE(z, y_c) + (1 - alpha) CE(z, y_r)

At test time both branches see the image and are weighted 0.5 each.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator
from torch import Tensor
from torch.utils.data import DataLoader

from longtail.config import Config
from longtail.data import RunData
from longtail.methods.base import (
    Batches,
    Method,
    MethodOptions,
    SamplerName,
    Stage,
    register_method,
)
from longtail.methods.curriculum import CURRICULA, curriculum_alpha
from longtail.models import TIMM_PREFIX, build_classifier


class BBNOptions(MethodOptions):
    curriculum: Annotated[str, AfterValidator(CURRICULA.check)] = "parabolic"
    conventional_sampler: SamplerName = "instance"
    rebalancing_sampler: SamplerName = "reversed"


class BBN(Method):
    """Two branches over a shared trunk, mixed by a cumulative-learning alpha."""

    Options = BBNOptions
    opts: BBNOptions

    @classmethod
    def check_config(cls, cfg: Config, options: MethodOptions) -> None:
        if cfg.model.backbone.startswith(TIMM_PREFIX):
            raise ValueError(
                "bbn splits a backbone before its last stage (last_stage, forward_trunk): use "
                "a CIFAR or torchvision ResNet, not a timm model"
            )

    def setup(self, data: RunData) -> None:
        m = self.cfg.model
        self.backbone = self.new_backbone(data.channels)
        # The re-balancing branch: the last stage of a second backbone, initialised apart.
        self.rebalancing = self.new_backbone(data.channels).last_stage
        self.classifier = build_classifier(
            str(m.classifier or self.default_classifier[0]),
            2 * self.backbone.feature_dim,
            data.num_classes,
            **m.classifier_options,
        )
        self.alpha = 1.0

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        o, t = self.opts, self.cfg.train
        return {
            name: data.train_loader(
                sampler=sampler,
                batch_size=t.batch_size,
                transforms=t.transform,
                total_epochs=t.epochs,
            )
            for name, sampler in (
                ("conventional", o.conventional_sampler),
                ("rebalancing", o.rebalancing_sampler),
            )
        }

    def on_epoch_start(self, epoch: int) -> None:
        self.alpha = curriculum_alpha(self.opts.curriculum, epoch, self.cfg.train.epochs)

    def branches(self, x_c: Tensor, x_r: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled features of the conventional branch on x_c and the re-balancing one on x_r."""
        b = self.backbone
        f_c = b.forward_head(b.last_stage(b.forward_trunk(x_c)))
        f_r = b.forward_head(self.rebalancing(b.forward_trunk(x_r)))
        return f_c, f_r

    def mix(self, f_c: Tensor, f_r: Tensor, alpha: float) -> Tensor:
        return self.classifier(torch.cat([alpha * f_c, (1 - alpha) * f_r], dim=1))

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        x_c, y_c, _ = batches["conventional"]
        x_r, y_r, _ = batches["rebalancing"]
        a = self.alpha
        logits = self.mix(*self.branches(x_c, x_r), a)
        ce_c, ce_r = F.cross_entropy(logits, y_c), F.cross_entropy(logits, y_r)
        return {"loss": a * ce_c + (1 - a) * ce_r, "ce_conventional": ce_c, "ce_rebalancing": ce_r}

    def predict(self, x: Tensor) -> Tensor:
        return self.mix(*self.branches(x, x), 0.5)

    def representation(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x, x), dim=1)

    def scalars(self) -> dict[str, float]:
        return {"alpha": self.alpha}


register_method(
    "bbn",
    BBN,
    description="Bilateral-branch network: uniform and reversed samplers, cumulative learning",
    paper="Zhou et al., BBN: Bilateral-Branch Network with Cumulative Learning for Long-Tailed "
    "Visual Recognition, CVPR 2020",
)
