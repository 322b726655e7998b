"""The classifier stage of decoupled training: a classifier learned on frozen features.

Shared by every method that learns its representation first and its classifier afterwards
(two-stage SC here; cRT, LWS and DSCL build on it). Everything but the classifier is frozen,
BatchNorm statistics included, and the classifier is trained with cross-entropy on batches
from its own (by default class-balanced) sampler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from longtail.config import Config
from longtail.data import RunData
from longtail.methods.base import Batches, Method, SamplerName, Stage, TransformName, state_mismatch


class ClassifierStageOptions(BaseModel):
    """Options of the classifier stage (mixed into a method's options)."""

    classifier_epochs: int = Field(30, ge=1)  # the last epochs of train.epochs
    classifier_lr: float = Field(0.1, gt=0)  # the stage's lr (no warm-up)
    classifier_schedule: Literal["cosine", "multistep"] = "cosine"
    classifier_milestones: list[int] = Field(default_factory=list)  # epochs into the stage
    classifier_weight_decay: float = Field(5e-4, ge=0)
    classifier_sampler: SamplerName = "class-balanced"
    classifier_batch_size: int | None = Field(None, ge=1)  # None = train.batch_size
    classifier_transform: TransformName = "hybrid"
    # BatchNorm without affine parameters in front of the classifier (ours; the linear probe
    # of He et al., MAE, CVPR 2022): batch statistics while the stage trains, running ones
    # when it predicts. Still a linear classifier of the features, only well conditioned:
    # contrastive features sit far from the origin (mean norm ~20 on Fashion-MNIST against
    # ~7 for CE ones), where the recipes' classifier lr makes plain SGD diverge.
    classifier_bn: bool = False
    # A run directory of the same method whose first stage finished: its weights are loaded
    # and only the classifier stage runs here.
    from_run: str | None = None


def standardised_classifier(method: Method, opts: ClassifierStageOptions) -> None:
    """Put the feature BatchNorm of ``classifier_bn`` in front of ``method.classifier``."""
    if opts.classifier_bn:
        dim = method.backbone.feature_dim
        method.classifier = nn.Sequential(nn.BatchNorm1d(dim, affine=False), method.classifier)


def with_classifier_stage(
    method: Method, first: Stage, opts: ClassifierStageOptions
) -> list[Stage]:
    """``first`` then the classifier stage; the classifier stage alone with ``from_run``."""
    second = classifier_stage(method, opts)
    return [second] if opts.from_run else [first, second]


def check_stage_lengths(cfg: Config, opts: ClassifierStageOptions) -> None:
    """The classifier stage must leave the first stage at least one of train.epochs."""
    if opts.from_run is None and opts.classifier_epochs >= cfg.train.epochs:
        raise ValueError(
            f"classifier_epochs={opts.classifier_epochs} leaves no feature epochs of "
            f"train.epochs={cfg.train.epochs}; lower it"
        )


def classifier_stage(
    method: Method,
    opts: ClassifierStageOptions,
    trainable: str = "classifier",
    reinit: bool = False,
) -> Stage:
    """The stage that trains ``method.<trainable>`` (the classifier, or LWS's scales) on
    ``method.backbone``'s frozen features, through ``method.classify``.

    Args:
        method: The method; everything but ``trainable`` is frozen, BatchNorm included.
        opts: The stage's options.
        trainable: The child module that learns.
        reinit: Re-initialise it when the stage starts (cRT's fresh classifier).
    """

    def start() -> None:
        method.freeze(*(m for name, m in method.named_children() if name != trainable))
        if reinit:
            for m in getattr(method, trainable).modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()

    def loaders(data: RunData) -> dict[str, DataLoader]:
        t = method.cfg.train
        return {
            "cls": data.train_loader(
                sampler=opts.classifier_sampler,
                batch_size=opts.classifier_batch_size or t.batch_size,
                transforms=opts.classifier_transform,
                total_epochs=t.epochs,
            )
        }

    def step(batches: Batches, epoch: int) -> dict[str, Tensor]:
        x, y, _ = batches["cls"]
        with torch.no_grad():
            h = method.backbone(x)
        ce = F.cross_entropy(method.classify(h), y)
        return {"loss": ce, "ce": ce}

    optim = {
        "lr": opts.classifier_lr,
        "schedule": opts.classifier_schedule,
        "milestones": opts.classifier_milestones,
        "warmup_epochs": 0.0,
        "weight_decay": opts.classifier_weight_decay,
    }
    return Stage(
        "classifier", opts.classifier_epochs, optim, start=start, loaders=loaders, step=step
    )


class FirstStageWarmStart:
    """For methods with a classifier stage (a :class:`ClassifierStageOptions`): with
    ``from_run``, the weights of a finished first stage of the same method and model, all but
    the classifier, which the classifier stage trains anew."""

    opts: ClassifierStageOptions
    cfg: Config

    def warm_start_from(self) -> tuple[str, str] | None:
        return ("from_run", self.opts.from_run) if self.opts.from_run else None

    def warm_start(self, run_dir: str, run_cfg: Config, ckpt: Mapping[str, Any]) -> None:
        cfg = self.cfg
        if run_cfg.method_name != cfg.method_name or run_cfg.model != cfg.model:
            raise ValueError(
                f"{run_dir} trained {run_cfg.method_name} with another model section; give "
                "a run of the same method and model"
            )
        first = run_cfg.train.epochs - int(run_cfg.method.get("classifier_epochs", 0))
        if ckpt.get("stage", 0) == 0 and ckpt["epoch"] + 1 < first:
            raise ValueError(
                f"{run_dir} stopped at epoch {ckpt['epoch'] + 1} of its first stage's {first}; "
                "finish it first (train it again with {resume})"
            )
        state = {k: v for k, v in ckpt["model"].items() if not k.startswith("classifier.")}
        mine = self.state_dict()  # type: ignore[attr-defined]
        mismatch = state_mismatch(
            {k: v for k, v in mine.items() if not k.startswith("classifier.")}, state
        )
        if mismatch:
            raise ValueError(f"{run_dir} does not fit this model ({mismatch})")
        self.load_state_dict(state, strict=False)  # type: ignore[attr-defined]
