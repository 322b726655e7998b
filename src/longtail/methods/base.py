"""The Method protocol: the one place that knows a paper.

A method is an ``nn.Module`` that owns its backbone, heads, buffers and any teacher, so its
whole state is its ``state_dict``. The engine drives it through these hooks and never looks
inside:

    check_config(cfg, options)    (class method) options against the rest of the config
    setup(data)                   build the modules (needs class count, channels, counts)
    stages()                      spans of epochs with their own optimizer settings
    on_stage_start(stage)         freeze / unfreeze / re-initialise for the stage
    loaders(data, stage)          the named training loaders of the stage's branches
    on_epoch_start(epoch)         per-epoch settings (a curriculum weight, a switch)
    training_step(batches, epoch) named loss terms of one step; "loss" is back-propagated
    after_optimizer_step()        momentum encoders, queues, centre updates
    calibrate(collect)            after the last epoch: post-hoc choices on the validation split
    predict(x)                    logits used for evaluation
    scalars()                     numbers to log each epoch, reported as they are
    warnings()                    messages about the epoch (a loss stuck at chance, say)

A method with several stages can give each :class:`Stage` its own ``start``, ``loaders`` and
``step``; the default hooks call them, so no method branches on a stage's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    ValidationInfo,
    field_validator,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader

from longtail.config import Config, OptimConfig, reject_booleans_for_numbers
from longtail.data import SAMPLERS, TRANSFORMS, RunData
from longtail.errors import UsageError
from longtail.models import (
    PrototypeBank,
    build_backbone,
    build_classifier,
    layer_depths,
    load_backbone_weights,
)
from longtail.registry import Registry

Batches = Mapping[str, Any]
#: Option types of a sampler's and a transform's name, checked against their
#: registries when the options are validated.
SamplerName = Annotated[str, AfterValidator(SAMPLERS.check)]
TransformName = Annotated[str, AfterValidator(TRANSFORMS.check)]
StepFn = Callable[[Batches, int], dict[str, Tensor]]
Collect = Callable[[str, Callable[[Tensor], Tensor]], tuple[Tensor, Tensor]]


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32 if it is half precision (autocast), else unchanged: float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def was(name: str) -> AliasChoices:
    """Accept ``classifier_<name>`` and its name before 0.2, ``cls_<name>`` (old configs and
    runs keep loading; configs are saved with the new name)."""
    return AliasChoices(f"classifier_{name}", f"cls_{name}")


class MethodOptions(BaseModel):
    """Base of every method's options (the ``method:`` section): unknown keys are errors, and
    so is true/false for a number."""

    model_config = ConfigDict(extra="forbid")
    #: Options that became config keys (option -> key, e.g. ``{"sampler": "train.sampler"}``):
    #: build moves them where earlier configs and runs still give them.
    moved: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        return reject_booleans_for_numbers(cls, value, info)


@dataclass(frozen=True)
class Stage:
    """A span of epochs with its own optimizer and schedule (e.g. a classifier re-training).

    Attributes:
        name: Shown in logs; checkpoints store the stage's index.
        epochs: Length of the stage.
        optim: Overrides of the config's ``optim`` section for this stage.
        start: Called when the stage starts (after the method's own on_stage_start work).
        loaders: The stage's training loaders, when they differ from the method's.
        step: The stage's training step, when it differs from the method's.
    """

    name: str
    epochs: int
    optim: Mapping[str, Any] = field(default_factory=dict)
    start: Callable[[], None] | None = None
    loaders: Callable[[RunData], dict[str, DataLoader]] | None = None
    step: StepFn | None = None


class Method(nn.Module):
    """Base class: a backbone and a classifier from the config's ``model`` section.

    Subclasses set ``Options`` and define ``loaders`` and ``training_step`` (or give their
    stages their own); everything else has a default.

    Args:
        cfg: The whole validated run config.
        options: The ``method:`` section, validated by ``Options``.
    """

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: The classifier (and its options) when the config's ``model.classifier`` is not set.
    default_classifier: ClassVar[tuple[str, dict[str, Any]]] = ("linear", {})

    def __init__(
        self,
        cfg: Config,
        options: MethodOptions,
        weights: bool | Mapping[str, Tensor] = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.opts = options
        #: What :meth:`new_backbone` starts from: random (False), the published weights
        #: (True) or a state_dict; build_method gives ``model.pretrained`` for a new run only.
        self.weights = weights
        self.stage: Stage | None = None
        self._frozen: list[nn.Module] = []
        #: The 0-based step of the epoch that ``training_step`` computes (set by the engine),
        #: for draws that must not depend on how the epoch was run (resumed mid-way, say).
        self.step_in_epoch = 0

    # -- structure ----------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Config, options: MethodOptions) -> None:
        """Raise ValueError if the options do not fit the rest of the config (read no data)."""

    @classmethod
    def default_classifier_for(cls, options: MethodOptions) -> tuple[str, dict[str, Any]]:
        """The classifier when ``model.classifier`` is unset (a variant may want another)."""
        return cls.default_classifier

    def new_backbone(self, channels: int) -> nn.Module:
        """A backbone as the config names it, from :attr:`weights`."""
        name = self.cfg.model.backbone
        backbone = build_backbone(name, channels, pretrained=self.weights is True)
        if isinstance(self.weights, Mapping):
            try:
                load_backbone_weights(backbone, self.weights)
            except ValueError as e:
                raise UsageError(f"config key 'model.pretrained': {e}") from None
        return backbone

    def setup(self, data: RunData) -> None:
        """Build the modules; the default is ``backbone`` and ``classifier``."""
        m = self.cfg.model
        self.backbone = self.new_backbone(data.channels)
        name = m.classifier or self.default_classifier[0]
        self.classifier = build_classifier(
            name, self.backbone.feature_dim, data.num_classes, **m.classifier_options
        )

    def stages(self) -> list[Stage]:
        """One stage of ``train.epochs`` by default."""
        return [Stage("train", self.cfg.train.epochs)]

    def on_stage_start(self, stage: Stage) -> None:
        """Make every parameter trainable again, then run the stage's own ``start``."""
        self.stage = stage
        self.unfreeze()
        if self.cfg.model.freeze_backbone:  # a linear probe
            self.freeze(self.backbone)
        if stage.start is not None:
            stage.start()

    def loaders(self, data: RunData, stage: Stage) -> dict[str, DataLoader]:
        """Named training loaders; each step gets one batch of each (shortest sets the epoch)."""
        if stage.loaders is None:
            raise TypeError(f"{type(self).__name__} defines no loaders for stage {stage.name!r}")
        return stage.loaders(data)

    def warm_start_from(self) -> tuple[str, str] | None:
        """``(option, run directory)`` when the method's options name a run whose weights
        this one starts from (a classifier stage on a finished first stage, say); None
        trains from scratch."""
        return None

    def warm_start(self, run_dir: str, run_cfg: Config, ckpt: Mapping[str, Any]) -> None:
        """Take the weights this method wants from ``ckpt``, the last checkpoint of run
        directory ``run_dir`` (trained with ``run_cfg``); raise ValueError naming what does not
        fit. Called before training, for :meth:`warm_start_from`'s run."""
        raise TypeError(f"{type(self).__name__} does not start from another run")

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that ``optim.decay_exempt`` frees from weight decay besides
        biases and normalisation parameters: learnable class prototypes by default (a method
        with other learnable centres adds them)."""
        return {
            f"{name}.{p}" if p else name
            for name, module in self.named_modules()
            if isinstance(module, PrototypeBank)
            for p, _ in module.named_parameters()
        }

    def parameter_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        """The trainable parameters in optimizer groups, each ``{"params", "lr_scale",
        "weight_decay"}``: the backbone at ``optim.backbone_lr_scale`` times the lr (its
        depth ``i`` of ``L`` times ``optim.layer_decay ** (L - 1 - i)`` more), and, with
        ``optim.decay_exempt``, biases, normalisation parameters and :meth:`no_weight_decay`
        without weight decay. With the defaults, one group of every trainable parameter in
        module order (the papers' SGD)."""
        exempt = self.no_weight_decay() if optim.decay_exempt else set()
        depths, count = layer_depths(self.backbone)
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            if name.startswith("backbone."):
                below = count - 1 - depths[name.removeprefix("backbone.")]
                scale = optim.backbone_lr_scale * optim.layer_decay**below
            decay_free = optim.decay_exempt and (p.ndim <= 1 or name in exempt)
            decay = 0.0 if decay_free else optim.weight_decay
            groups.setdefault((scale, decay), []).append(p)
        return [
            {"params": params, "lr_scale": scale, "weight_decay": decay}
            for (scale, decay), params in groups.items()
        ]

    # -- training -----------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based, counted over all stages)."""

    def training_step(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        """Named loss terms of one step; ``loss`` is the one that is back-propagated.

        Args:
            batches: One batch per loader name, each ``(images, labels, indices)`` on the
                training device; a method reads only the ones it uses.
            epoch: The 0-based epoch.
        """
        if self.stage is None or self.stage.step is None:
            name = self.stage.name if self.stage else None
            raise TypeError(f"{type(self).__name__} defines no training_step for stage {name!r}")
        return self.stage.step(batches, epoch)

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (EMA teachers, queues, centre updates)."""

    def scalars(self) -> dict[str, float]:
        """Numbers to log with the epoch (a curriculum weight, a margin, ...)."""
        return {}

    def epoch_state(self) -> dict[str, Any]:
        """What the epoch has gathered so far outside the state_dict (statistics behind
        :meth:`scalars` and :meth:`warnings`), for a checkpoint written mid-epoch: every
        attribute of the method's modules that has ``epoch_state``/``load_epoch_state``."""
        return {key: obj.epoch_state() for key, obj in self._epoch_parts()}

    def load_epoch_state(self, state: Mapping[str, Any]) -> None:
        """Continue an epoch from :meth:`epoch_state` (after ``on_epoch_start``)."""
        for key, obj in self._epoch_parts():
            if key in state:
                obj.load_epoch_state(state[key])

    def _epoch_parts(self) -> list[tuple[str, Any]]:
        return [
            (f"{path}.{name}" if path else name, obj)
            for path, module in self.named_modules()
            for name, obj in vars(module).items()
            if hasattr(obj, "load_epoch_state") and not isinstance(obj, nn.Module)
        ]

    def warnings(self) -> list[str]:
        """Things about the epoch just trained that the user should look at (a loss that
        learned nothing, say); printed and kept in metrics.jsonl."""
        return []

    # -- inference ----------------------------------------------------------------------
    def predict(self, x: Tensor) -> Tensor:
        """Logits used for evaluation."""
        return self.classify(self.backbone(x))

    def representation(self, x: Tensor) -> Tensor:
        """The representation the classifier reads (what the report's embedding plots)."""
        return self.backbone(x)

    def classify(self, h: Tensor) -> Tensor:
        """Logits of backbone features (what a classifier stage trains through)."""
        return self.classifier(h)

    def calibrate(self, collect: Collect) -> dict[str, float]:
        """Called once after the last training epoch, before its checkpoint: post-hoc
        choices made on the validation split (tau-normalisation's tau, say).

        Args:
            collect: ``collect(split, fn)`` runs ``fn`` on every image of a split (eval
                mode, no gradients) and returns the stacked outputs and the labels.

        Returns:
            Scalars to log with the last epoch.
        """
        return {}

    def forward(self, batches: Batches, epoch: int) -> dict[str, Tensor]:
        """The loss terms of a training step: what DistributedDataParallel wraps and calls.

        A method is a module that returns its losses; :meth:`predict` gives the logits.
        """
        return self.training_step(batches, epoch)

    # -- freezing -----------------------------------------------------------------------
    def freeze(self, *modules: nn.Module) -> None:
        """No gradients and eval mode (BatchNorm statistics kept) for ``modules``."""
        for m in modules:
            m.requires_grad_(False)
            m.eval()
            self._frozen.append(m)

    def unfreeze(self) -> None:
        """Undo every :meth:`freeze`."""
        for m in self._frozen:
            m.requires_grad_(True)
        self._frozen = []
        self.train(self.training)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self


def state_mismatch(expected: dict[str, Any], given: Any) -> str:
    """What keeps ``given`` from loading as ``expected`` (a state dict), or ''."""
    if not isinstance(given, dict):
        return "it holds no weights"
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    shapes = [
        k
        for k in expected
        if k in given
        and hasattr(given[k], "shape")
        and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{len(keys)} {what} (first {keys[0]})"
        for keys, what in ((missing, "missing"), (extra, "unexpected"), (shapes, "of other shape"))
        if keys
    ]
    return ", ".join(parts)


METHODS: Registry[type[Method]] = Registry("method")


def register_method(
    name: str,
    cls: type[Method],
    *,
    description: str,
    paper: str,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Register ``cls`` under ``name``; a variant is the same class with other defaults.

    Args:
        name: What users type as ``method.name``.
        cls: The Method subclass.
        description: One line for ``longtail methods``.
        paper: The paper the method comes from (authors, venue, year).
        defaults: Option values of this variant, applied under the user's ``method:`` keys.
    """
    METHODS.register(name, cls, description=description, paper=paper, defaults=dict(defaults or {}))
