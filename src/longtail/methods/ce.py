"""Plain cross-entropy: the baseline every table starts from.

The whole method: a backbone and a classifier (the base class's ``setup``), one loader drawn
with ``train.sampler`` (instance sampling by default) and augmented with
``train.transform``, and the cross-entropy of each batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from longtail.data import RunData
from longtail.methods.base import Batches, Method, Stage, register_method


class CrossEntropy(Method):
    """Cross-entropy on ``train.sampler`` batches."""

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        t = self.cfg.train
        loader = data.train_loader(
            sampler=t.sampler,
            batch_size=t.batch_size,
            transforms=t.transform,
            total_epochs=t.epochs,
        )
        return {"cls": loader}

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        x, y, _ = batches["cls"]
        ce = F.cross_entropy(self.classifier(self.backbone(x)), y)
        return {"loss": ce, "ce": ce}


register_method(
    "ce",
    CrossEntropy,
    description="Cross-entropy on train.sampler batches (instance sampling: the CE baseline)",
    paper="the standard baseline; recipe of Cao et al., NeurIPS 2019 (LDAM-DRW)",
)
