"""Run configuration: pydantic models, YAML loading and dotted ``--set`` overrides.

A config file is YAML; every section rejects unknown keys so a typo is an error, not
a silently ignored setting. Method-specific options live under ``method:`` next to
``name:`` and are validated by the method's own ``Options`` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longtail.errors import UsageError


def known_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a registered ``kind``; else a UsageError listing valid names."""
    # Imported here: the registries' modules import this one.
    from longtail.data import SAMPLERS, VIEWS
    from longtail.engine.schedules import CURRICULA
    from longtail.models import BACKBONES, CLASSIFIERS

    tables = {
        "sampler": SAMPLERS,
        "view": VIEWS,
        "backbone": BACKBONES,
        "classifier": CLASSIFIERS,
        "curriculum": CURRICULA,
    }
    tables[kind].get(value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images come from and how the training set is made long-tailed."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    files: dict[str, str] = Field(default_factory=dict)  # split -> list/json file
    ratio: float | None = 100.0  # imbalance ratio n_max / n_min; None keeps the data as is
    profile: Literal["exp", "step"] = "exp"
    n_max: int | None = Field(None, ge=1)  # images of the largest class; None = all it has
    seed: int = 0  # seed of the long-tail subsampling (the standard recipe uses 0)
    image_size: int = 32  # pixels, side of the network input
    val_split: str | None = None  # a split of the dataset used for "best" selection
    num_workers: int = 0

    @field_validator("ratio")
    @classmethod
    def _ratio_at_least_one(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1 (n_max / n_min); use 1 for the balanced set")
        return v


class ModelConfig(_Strict):
    """Backbone and heads."""

    backbone: str = "resnet32"
    classifier: str = "linear"
    classifier_options: dict[str, Any] = Field(default_factory=dict)
    projection_hidden: int = 512  # units in the projection MLP's hidden layer
    projection_dim: int = 128  # dimension of the contrastive embedding z

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        return known_name("backbone", v)

    @field_validator("classifier")
    @classmethod
    def _known_classifier(cls, v: str) -> str:
        return known_name("classifier", v)


class OptimConfig(_Strict):
    """SGD and the learning-rate schedule (epochs are fractional inside an epoch)."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [160, 180])  # epochs
    gamma: float = 0.1  # multistep decay factor
    warmup_epochs: float = 0.0  # linear warm-up from lr * warmup_start_factor
    warmup_start_factor: float = 0.1
    min_lr: float = 0.0  # cosine floor

    @field_validator("lr", "gamma")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v


class TrainConfig(_Strict):
    """The training loop."""

    epochs: int = 200
    batch_size: int = 128  # images per step of the (first) branch
    sampler: str = "instance"
    view: str = "crop-flip"  # augmentation recipe for training
    test_view: str = "test"
    eval_every: int = 0  # epochs between test evaluations during training; 0 = only the last
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = False  # bfloat16 autocast on CUDA
    channels_last: bool = True  # NHWC memory format: +26% images/s for ResNet-32 on this CPU
    threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 50  # steps between progress updates

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        return known_name("sampler", v)

    @field_validator("view", "test_view")
    @classmethod
    def _known_view(cls, v: str) -> str:
        return known_name("view", v)

    @field_validator("epochs", "batch_size")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


class Config(_Strict):
    """A whole run."""

    name: str = "run"
    seed: int = 0
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "ce"})
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_method(self) -> Config:
        # Resolve the method now so unknown names/options fail at load time, not mid-run.
        method_options(self)
        return self

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "ce"))


def method_options(cfg: Config) -> BaseModel:
    """Validate ``cfg.method`` against the named method's ``Options`` model."""
    from longtail.methods import METHODS

    spec = dict(cfg.method)
    cls = METHODS.get(str(spec.pop("name", "ce")))
    try:
        return cls.Options(**spec)
    except ValidationError as e:
        raise UsageError(_format_validation(e, prefix="method.")) from None


def _format_validation(e: ValidationError, prefix: str = "") -> str:
    err = e.errors()[0]
    loc = prefix + ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}; remove it or check its spelling"
    got = err.get("input")
    return f"config field {loc!r}: {err['msg']} (got {got!r})"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.05", "train.epochs=3"]`` into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected key=value, e.g. --set optim.lr=0.05")
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {pair!r}: {p!r} is set twice as a value and a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def config_from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config(**raw)
    except ValidationError as e:
        raise UsageError(_format_validation(e)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``_base_`` files are merged first), apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def _read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist; see configs/ for recipes")
    if path.resolve() in _seen:
        raise UsageError(f"config file {path}: _base_ loop")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path} must hold a mapping of sections")
    base = raw.pop("_base_", None)
    if base is not None:
        base_raw = _read_yaml((path.parent / base), (*_seen, path.resolve()))
        raw = deep_merge(base_raw, raw)
    return raw


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
