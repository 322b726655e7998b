"""One branch, another loss, weights or sampler: the re-weighting and re-balancing baselines
that the hybrid paper's tables compare against.

    focal             focal loss (Lin et al. 2017)
    cb-focal          focal loss with class-balanced weights (Cui et al. 2019)
    ce-drw            CE, class-balanced weights from a late epoch (deferred re-weighting)
    ce-drs            CE, class-balanced sampling from a late epoch (deferred re-sampling)
    ldam-drw          LDAM margins on a cosine classifier, with DRW (Cao et al. 2019)
    logit-adjust      CE of logits + tau log prior (Menon et al. 2021), training form
    logit-adjust-posthoc   plain CE, tau log prior subtracted at prediction
    balanced-softmax  CE of logits + log n_c (Ren et al. 2020)

Every variant is this one class with other defaults; weight balancing's MaxNorm on the
classifier (Alshammari et al. 2022) is an option of all of them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from longtail.data import RunData
from longtail.losses.classification import (
    class_balanced_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    weighted_cross_entropy,
)
from longtail.methods.base import (
    Batches,
    Method,
    MethodOptions,
    SamplerName,
    Stage,
    full_precision,
    register_method,
)


class ReweightingOptions(MethodOptions):
    """Plain CE by default; the registered variants set the rest."""

    loss: Literal["ce", "focal", "ldam", "logit-adjust", "balanced-softmax"] = "ce"
    gamma: float = Field(1.0, ge=0)  # focal
    weighting: Literal["none", "class-balanced"] = "none"
    beta: float = Field(0.9999, ge=0, lt=1)  # effective-number weights
    reweight_epoch: int = Field(0, ge=0)  # 0-based epoch from which the weights apply (DRW)
    resample_epoch: int | None = Field(None, ge=0)  # switch to resample_sampler then (DRS)
    resample_sampler: SamplerName = "class-balanced"
    max_margin: float = Field(0.5, gt=0)  # LDAM: the rarest class's margin
    scale: float = Field(30.0, gt=0)  # LDAM: logit scale s on the cosines
    tau: float = Field(1.0, ge=0)  # logit-adjust: training-time adjustment
    posthoc_tau: float = Field(0.0, ge=0)  # subtract posthoc_tau * log prior when predicting
    classifier_max_norm: float | None = Field(None, gt=0)  # MaxNorm of each class weight row


class Reweighting(Method):
    """Cross-entropy and its re-weighted, margin and logit-adjusted relatives."""

    Options = ReweightingOptions
    opts: ReweightingOptions

    @classmethod
    def default_classifier_for(cls, options: ReweightingOptions) -> tuple[str, dict[str, Any]]:
        # LDAM needs cosines: a normalised classifier at scale 1; the loss applies s.
        return ("cosine", {"scale": 1.0}) if options.loss == "ldam" else cls.default_classifier

    def setup(self, data: RunData) -> None:
        super().setup(data)
        o = self.opts
        counts = torch.as_tensor(data.counts, dtype=torch.float64)
        self.register_buffer("log_prior", torch.log(counts / counts.sum()).float())
        weights = class_balanced_weights(data.counts, o.beta)
        self.register_buffer("class_weights", weights.float())
        self.register_buffer("margins", ldam_margins(data.counts, o.max_margin).float())
        self.weighted = False

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        o, t = self.opts, self.cfg.train
        switch = (o.resample_epoch, o.resample_sampler) if o.resample_epoch is not None else None
        loader = data.train_loader(
            sampler=t.sampler,
            batch_size=t.batch_size,
            transforms=t.transform,
            switch=switch,
            total_epochs=t.epochs,
        )
        return {"cls": loader}

    def on_epoch_start(self, epoch: int) -> None:
        o = self.opts
        self.weighted = o.weighting == "class-balanced" and epoch >= o.reweight_epoch

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        o = self.opts
        x, y, _ = batches["cls"]
        out = full_precision(self.classifier(self.backbone(x)))
        weight = self.class_weights if self.weighted else None
        if o.loss == "focal":
            loss = focal_loss(out, y, o.gamma, weight)
        elif o.loss == "ldam":
            loss = ldam_loss(out, y, self.margins, o.scale, weight)
        elif o.loss == "logit-adjust":
            loss = logit_adjusted_loss(out, y, self.log_prior, o.tau, weight)
        elif o.loss == "balanced-softmax":
            loss = logit_adjusted_loss(out, y, self.log_prior, 1.0, weight)
        else:
            loss = weighted_cross_entropy(out, y, weight)
        return {"loss": loss, o.loss: loss}

    def after_optimizer_step(self) -> None:
        if self.opts.classifier_max_norm is not None:
            with torch.no_grad():  # project each class's weight row back into the ball
                w = self.classifier.weight
                w.copy_(torch.renorm(w, 2, 0, self.opts.classifier_max_norm))

    def predict(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.backbone(x))
        if self.opts.loss == "ldam":  # the cosines at the trained scale, without margins
            logits = self.opts.scale * logits
        if self.opts.posthoc_tau:
            logits = logits - self.opts.posthoc_tau * self.log_prior.to(logits.dtype)
        return logits

    def scalars(self) -> dict[str, float]:
        return {"class_weighted": float(self.weighted)} if self.opts.weighting != "none" else {}


VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "focal": (
        "Focal loss",
        "Lin et al., Focal Loss for Dense Object Detection, ICCV 2017",
        {"loss": "focal", "gamma": 1.0},
    ),
    "cb-focal": (
        "Focal loss with class-balanced (effective number) weights",
        "Cui et al., Class-Balanced Loss Based on Effective Number of Samples, CVPR 2019",
        {"loss": "focal", "gamma": 1.0, "weighting": "class-balanced"},
    ),
    "ce-drw": (
        "CE, class-balanced weights from reweight_epoch (deferred re-weighting)",
        "Cao et al., Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss, "
        "NeurIPS 2019",
        {"weighting": "class-balanced", "reweight_epoch": 160},
    ),
    "ce-drs": (
        "CE, class-balanced sampling from resample_epoch (deferred re-sampling)",
        "Cao et al., NeurIPS 2019",
        {"resample_epoch": 160},
    ),
    "ldam-drw": (
        "LDAM margins (n^-1/4, largest 0.5, scale 30) on a cosine classifier, with DRW",
        "Cao et al., NeurIPS 2019",
        {"loss": "ldam", "weighting": "class-balanced", "reweight_epoch": 160},
    ),
    "logit-adjust": (
        "Logit-adjusted CE (training form): CE of logits + tau log prior",
        "Menon et al., Long-tail Learning via Logit Adjustment, ICLR 2021",
        {"loss": "logit-adjust", "tau": 1.0},
    ),
    "logit-adjust-posthoc": (
        "Plain CE, tau log prior subtracted from the logits at prediction (post-hoc form)",
        "Menon et al., ICLR 2021",
        {"posthoc_tau": 1.0},
    ),
    "balanced-softmax": (
        "Balanced softmax: CE of logits + log n_c",
        "Ren et al., Balanced Meta-Softmax for Long-Tailed Visual Recognition, NeurIPS 2020",
        {"loss": "balanced-softmax"},
    ),
}

for _name, (_description, _paper, _defaults) in VARIANTS.items():
    register_method(_name, Reweighting, description=_description, paper=_paper, defaults=_defaults)
