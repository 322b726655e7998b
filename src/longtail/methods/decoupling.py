"""Decoupling representation and classifier (Kang et al., ICLR 2020): joint training with
cross-entropy and instance sampling, then one of

    crt       re-train a re-initialised classifier on the frozen features, class-balanced
    lws       learn one scale per class on the frozen classifier, class-balanced
    tau-norm  no second stage: w_c / ||w_c||^tau (no bias), tau set or chosen on the
              validation split after training (never on the test split)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from longtail.config import Config
from longtail.data import RunData
from longtail.evaluation import topk_accuracy
from longtail.methods.base import (
    Batches,
    Collect,
    Method,
    MethodOptions,
    Stage,
    TransformName,
    register_method,
)
from longtail.methods.classifier_stage import (
    ClassifierStageOptions,
    FirstStageWarmStart,
    check_stage_lengths,
    classifier_stage,
)

PAPER = (
    "Kang et al., Decoupling Representation and Classifier for Long-Tailed Recognition, ICLR 2020"
)
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0


class DecouplingOptions(MethodOptions, ClassifierStageOptions):
    kind: Literal["crt", "lws", "tau-norm"] = "crt"
    tau: float | None = Field(None, ge=0)  # tau-norm: None = choose on the validation split
    classifier_epochs: int = Field(10, ge=1)
    classifier_transform: TransformName = "crop-flip"


class ClassScales(nn.Module):
    """LWS: one learnable scale per class on a frozen classifier's weight vectors."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes))


class Decoupling(FirstStageWarmStart, Method):
    """Joint CE training, then cRT, LWS or tau-normalisation."""

    Options = DecouplingOptions
    opts: DecouplingOptions

    @classmethod
    def check_config(cls, cfg: Config, options: DecouplingOptions) -> None:  # type: ignore[override]
        if options.kind != "tau-norm":
            check_stage_lengths(cfg, options)
        elif options.tau is None and cfg.data.val_split is None:
            raise ValueError(
                "tau-norm chooses tau on a validation split (never on the test split): set "
                "data.val_split, or give method.tau"
            )
        if options.kind in ("lws", "tau-norm") and cfg.model.classifier != "linear":
            raise ValueError(
                f"{options.kind} rescales a linear classifier: set model.classifier=linear"
            )

    def setup(self, data: RunData) -> None:
        super().setup(data)
        if self.opts.kind == "lws":
            self.scales = ClassScales(data.num_classes)
        self.register_buffer("tau", torch.tensor(float(self.opts.tau or 0.0)))

    def stages(self) -> list[Stage]:
        o, epochs = self.opts, self.cfg.train.epochs
        if o.kind == "tau-norm":
            return [Stage("joint", epochs, loaders=self._joint_loaders, step=self._joint_step)]
        joint = Stage(
            "joint",
            epochs - o.classifier_epochs,
            start=self._freeze_scales,
            loaders=self._joint_loaders,
            step=self._joint_step,
        )
        second = classifier_stage(
            self,
            o,
            trainable="scales" if o.kind == "lws" else "classifier",
            reinit=o.kind == "crt",
        )
        return [second] if o.from_run else [joint, second]

    def _freeze_scales(self) -> None:
        if self.opts.kind == "lws":
            self.freeze(self.scales)

    def _joint_loaders(self, data: RunData) -> dict[str, DataLoader]:
        t = self.cfg.train
        loader = data.train_loader(
            sampler=t.sampler,
            batch_size=t.batch_size,
            transforms=t.transform,
            total_epochs=t.epochs,
        )
        return {"cls": loader}

    def _joint_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        x, y, _ = batches["cls"]
        ce = F.cross_entropy(self.classifier(self.backbone(x)), y)
        return {"loss": ce, "ce": ce}

    def classify(self, h: Tensor) -> Tensor:
        kind = self.opts.kind
        if kind == "lws":
            fc = self.classifier.fc
            return self.scales.scales * F.linear(h, fc.weight) + fc.bias
        if kind == "tau-norm" and not self.training:
            return F.linear(h, tau_normalised(self.classifier.weight, float(self.tau)))
        return self.classifier(h)

    def calibrate(self, collect: Collect) -> dict[str, float]:
        if self.opts.kind != "tau-norm":
            return {}
        if self.opts.tau is None:
            features, labels = collect("val", self.backbone)
            w = self.classifier.weight.detach().float().cpu()
            scores = [topk_accuracy(features @ tau_normalised(w, t).T, labels) for t in TAU_GRID]
            best = max(range(len(TAU_GRID)), key=lambda i: (scores[i], -i))  # ties: smaller tau
            self.tau.fill_(TAU_GRID[best])
            return {"tau": TAU_GRID[best], "val_top1_at_tau": scores[best]}
        return {"tau": float(self.tau)}

    def scalars(self) -> dict[str, float]:
        return {}


def tau_normalised(weight: Tensor, tau: float) -> Tensor:
    """Each class's weight vector divided by its norm to the power tau (0: unchanged)."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12) ** tau


_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "crt": ("Joint CE, then a re-initialised classifier re-trained class-balanced (cRT)",
            {"kind": "crt"}),
    "lws": ("Joint CE, then one learned scale per class, class-balanced (LWS)", {"kind": "lws"}),
    "tau-norm": ("Joint CE, then w / ||w||^tau with tau chosen on the validation split",
                 {"kind": "tau-norm"}),
}  # fmt: skip
for _name, (_description, _defaults) in _VARIANTS.items():
    register_method(_name, Decoupling, description=_description, paper=PAPER, defaults=_defaults)
