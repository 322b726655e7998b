"""Run configuration: a pydantic schema, YAML loading, ``_base_`` files and ``--set`` overrides.

The schema holds names as plain strings and imports nothing else of longtail's (and no torch):
checking a name against its registry, and a method's options against the method, happens in
:mod:`longtail.build`. Every section rejects unknown keys, so a typo is an error rather than a
silently ignored setting. Method options live under ``method:`` beside ``name:``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from longtail.errors import UsageError, shown


def _numeric(annotation: Any) -> bool:
    """Whether a field holds a number (int or float, optional or not)."""
    if annotation in (int, float):
        return True
    return any(a in (int, float) for a in getattr(annotation, "__args__", ()))


def reject_booleans_for_numbers(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """YAML's true/false where a number belongs is a mistake, not 1/0 (``train.epochs: true``
    would train one epoch): pydantic's lax mode would take it."""
    field = model.model_fields.get(info.field_name or "")
    if isinstance(value, bool) and field is not None and _numeric(field.annotation):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        return reject_booleans_for_numbers(cls, value, info)


class DataConfig(_Strict):
    """Where the images come from and how the training set is made long-tailed."""

    dataset: str = "fashion-mnist"
    root: str | None = None
    files: dict[str, str] = Field(default_factory=dict)  # split -> list/json file
    ratio: float | None = 100.0  # imbalance ratio n_max / n_min; None keeps the data as is
    profile: Literal["exp", "step"] = "exp"
    n_max: int | None = Field(None, ge=1)  # images of the largest class; None = all it has
    seed: int = 0  # seed of the long-tail subsampling (the standard recipe uses 0)
    image_size: int = Field(32, ge=8)  # pixels, side of the network input
    val_split: str | None = None  # a split of the dataset used for "best" selection
    # Or a validation split held out of the training split: this many images per class, first
    # from those the long-tailed subset leaves out, else (at most a fifth) from its own.
    val_per_class: int | None = Field(None, ge=1)
    # Keep only these classes (names or indices of the dataset's classes), labelled in this
    # order: e.g. Fashion-MNIST's 0-4 to pretrain on and 5-9 to transfer to.
    classes: list[int | str] | None = Field(None, min_length=1)
    # Normalisation, [0, 1] units, one value per channel (3 for grey images are averaged);
    # None = the data set's own statistics (ImageNet's for folders). model.pretrained fills
    # in its weights' values.
    mean: list[float] | None = None
    std: list[float] | None = None
    # Evaluation resize of images over 64 px: shorter side to image_size / crop_fraction, then
    # a centre crop of image_size (None = 0.875), with this interpolation.
    crop_fraction: float | None = Field(None, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    num_workers: int = Field(0, ge=0)  # loader processes; 0 loads in the training process
    # Keep the training images on the training device and augment whole batches there when
    # they fit (in-memory sets, folders up to fast_path_max_images) and every transform has a
    # batched form; false: per-image loaders always.
    fast_path: bool = True
    # JPEG folders over 64 px: "device" reads the files in the loader workers and decodes and
    # augments each batch on the training device (nvJPEG on CUDA) when every transform has a
    # device form; "workers" decodes and augments with PIL in the workers; "auto" is device
    # on a CUDA device, else workers.
    decode: Literal["auto", "workers", "device"] = "auto"
    fast_path_max_images: int = Field(200_000, ge=0)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(0 < x < float("inf") for x in v):
            raise ValueError("every std must be a finite number > 0")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio_at_least_one(cls, v: float | None) -> float | None:
        if v is not None and not v >= 1:  # `not >=` also rejects NaN
            raise ValueError("must be >= 1 (n_max / n_min); use 1 for the balanced set")
        return v


class ModelConfig(_Strict):
    """Backbone and heads."""

    backbone: str = "resnet32"
    classifier: str | None = None  # None: the method's own (linear for most, cosine for BCL)
    classifier_options: dict[str, Any] = Field(default_factory=dict)  # over the method's own
    projection_hidden: int = Field(512, ge=1)  # units in the projection MLP's hidden layer
    projection_dim: int = Field(128, ge=1)  # dimension of the contrastive embedding z
    projection_bn: bool = False  # BatchNorm1d on the projection MLP's hidden layer
    # Start the backbone from weights: true = the published ones of a timm/<name> or
    # torchvision backbone (downloaded and cached by timm / torchvision); or a file (a
    # state_dict, .pth/.pt/.bin/.safetensors) or a longtail run directory or checkpoint.
    pretrained: bool | str = False
    freeze_backbone: bool = False  # a linear probe: the backbone fixed (BatchNorm too)


class OptimConfig(_Strict):
    """The optimizer, its parameter groups and the learning-rate schedule (time in epochs,
    fractional inside an epoch). SGD with momentum is the papers' choice; AdamW is for
    fine-tuning pretrained networks."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = Field(0.9, ge=0)  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    weight_decay: float = Field(2e-4, ge=0)
    # Parameter groups: the backbone's lr as a multiple of lr (below 1 for a pretrained one),
    # and no weight decay on biases, normalisation layers and the method's learnable centres
    # or prototypes (timm's rule for fine-tuning; off reproduces the papers).
    backbone_lr_scale: float = Field(1.0, ge=0)
    # Layer-wise lr decay: each backbone depth nearer the input (stem, stages or blocks)
    # trains at this factor times the lr of the one after it; 1 = off.
    layer_decay: float = Field(1.0, gt=0, le=1)
    decay_exempt: bool = False
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [160, 180])  # epochs
    gamma: float = 0.1  # multistep decay factor
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up from lr * warmup_start_factor
    warmup_start_factor: float = Field(0.1, ge=0, le=1)
    min_lr: float = Field(0.0, ge=0)  # cosine floor

    @field_validator("lr", "gamma")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not 0 < v < float("inf"):
            raise ValueError("must be a finite number > 0")
        return v


class TrainConfig(_Strict):
    """The training loop."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)  # images per step of the (first) branch
    sampler: str = "instance"
    transform: str = "crop-flip"  # transform for training
    test_transform: str = "test"
    eval_every: int = Field(0, ge=0)  # epochs between test evaluations; 0 = only the last
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: bool = False  # bfloat16 autocast on CUDA (losses still computed in float32)
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch
    compile: bool = False  # torch.compile the backbone's forward (first steps slower)
    channels_last: bool = True  # NHWC memory format: +26% images/s for ResNet-32 on this CPU
    threads: int = Field(0, ge=0)  # torch CPU threads; 0 = torch's default
    log_every: int = Field(50, ge=1)  # steps between progress updates
    report: bool = True  # write report.html and plots/ when training ends
    # A step whose loss terms are not finite: stop (keeping the last checkpoint), or skip it
    # (no update; BatchNorm statistics restored) at the cost of a device sync per step.
    nonfinite: Literal["stop", "skip"] = "stop"


class Config(_Strict):
    """A whole run."""

    name: str = "run"
    seed: int = 0
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "ce"})
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or v in (".", "..") or any(c in v for c in "/\\") or shown(v) != v:
            raise ValueError(
                "must be a plain name (it names the run's folder under runs/), e.g. my-run; "
                "give the run's path with --out instead"
            )
        return v

    @field_validator("method")
    @classmethod
    def _method_has_a_name(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("name", "ce"), str):
            raise ValueError("method.name must be a string, e.g. hybrid-sc")
        return {"name": "ce", **v}

    @property
    def method_name(self) -> str:
        return str(self.method["name"])

    @property
    def method_options(self) -> dict[str, Any]:
        """``method`` without its name: what the method's Options model validates."""
        return {k: v for k, v in self.method.items() if k != "name"}


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    """One line naming the config key of the first error of ``e``."""
    err = e.errors()[0]
    loc = prefix + ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}; remove it or check its spelling"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"config key {loc!r}: {msg} (got {err.get('input')!r})"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["optim.lr=0.05", "train.epochs=3"]`` into a nested dict (values parsed as YAML)."""
    dotted: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise UsageError(f"--set {pair!r}: expected key=value, e.g. --set optim.lr=0.05")
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw  # not YAML: keep the text as a string; the schema decides
        dotted[key] = value
        try:
            nested(dotted)
        except ValueError as e:
            raise UsageError(f"--set {pair!r}: {e}") from None
    return nested(dotted)


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 0.1}`` as ``{"optim": {"lr": 0.1}}``.

    Raises:
        ValueError: When a key is a value and, in another key, a section.
    """
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *path, last = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{p!r} is set twice as a value and a section")
        node[last] = value
    return out


def flat(d: Mapping[str, Any], keep: Iterable[str] = (), prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` as ``{"optim.lr": 0.1}``; empty sections and the dotted
    keys in ``keep`` stay whole values."""
    keep = frozenset(keep)
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v and key not in keep:
            out.update(flat(v, keep, key))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursing into sections that both have as mappings."""
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def config_from_dict(raw: Any) -> Config:
    """Validate a plain mapping as a :class:`Config` (schema only: names are not looked up)."""
    if not isinstance(raw, dict):
        raise UsageError(f"a config must be a mapping of sections; got {type(raw).__name__}")
    try:
        return Config(**{str(k): v for k, v in raw.items()})
    except ValidationError as e:
        raise UsageError(format_validation_error(e)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``_base_`` files are merged first), apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML
    itself would keep the last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text with the safe loader, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def yaml_problem(e: Exception) -> str:
    """What is wrong with a YAML text and where, on one line."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"config file {shown(path)} does not exist; see configs/ for recipes")
    if path.resolve() in _seen:
        raise UsageError(f"config file {shown(path)}: _base_ loop")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(
            f"config file {shown(path)} is not valid YAML: {yaml_problem(e)}"
        ) from None
    if raw is None:
        raise UsageError(
            f"config file {shown(path)} is empty; give a recipe (see configs/), or leave out "
            "--config to train the defaults"
        )
    if not isinstance(raw, dict):
        raise UsageError(f"config file {shown(path)} must hold a mapping of sections")
    if "_base_" in raw:
        base = raw.pop("_base_")
        if not isinstance(base, str) or shown(base) != base:
            raise UsageError(
                f"config file {shown(path)}: _base_ must be the name of the YAML file it extends "
                f"(a path relative to this file, e.g. _base_: base.yaml), got {base!r}"
            )
        base_raw = _read_yaml((path.parent / base), (*_seen, path.resolve()))
        raw = deep_merge(base_raw, raw)
    return raw


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
