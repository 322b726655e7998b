"""From a config to objects: the one place that checks the config's names and builds from it.

``validate`` looks every name up in its registry and validates the method's options, so a
typo fails before any file is read; ``build_data`` and ``build_method`` construct. Errors
raised below (``ValueError``/``TypeError`` from the library) come out as one-line
``UsageError`` messages that name the config key to change.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from longtail.config import Config, config_from_dict, format_validation_error
from longtail.data import DATASETS, SAMPLERS, SPLITS, TRANSFORMS, RunData
from longtail.errors import UsageError
from longtail.methods import METHODS, Method, MethodOptions
from longtail.models import CLASSIFIERS, check_backbone, published_preprocessing
from longtail.registry import Registry


@contextlib.contextmanager
def config_key(key: str) -> Iterator[None]:
    """Turn a ValueError/TypeError raised inside into a UsageError naming config ``key``."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise UsageError(f"config key {key!r}: {e}") from None


def method_options(name: str, given: Mapping[str, Any]) -> MethodOptions:
    """The options of method ``name``: its registered defaults with ``given`` on top."""
    with config_key("method.name"):
        cls = METHODS.get(name)
    try:
        return cls.Options(**{**METHODS.meta(name)["defaults"], **given})
    except ValidationError as e:
        raise UsageError(format_validation_error(e, prefix="method.")) from None


def _check_name(key: str, registry: Registry[Any], value: str) -> None:
    with config_key(key):
        registry.get(value)


def validate(cfg: Config) -> Config:
    """Check every name and the method's options; read no file.

    Returns:
        ``cfg`` with the method section completed by the method's defaults, so that a run's
        saved config states every setting it trained with.
    """
    with config_key("method.name"):
        method_cls = METHODS.get(cfg.method_name)
    cfg = _moved_options(cfg, method_cls.Options.moved)
    options = method_options(cfg.method_name, cfg.method_options)
    if cfg.model.classifier is None:  # the method's own classifier, its options under ours
        name, defaults = method_cls.default_classifier_for(options)
        model = {
            "classifier": name,
            "classifier_options": {**defaults, **cfg.model.classifier_options},
        }
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=model)})
    names = [
        ("data.dataset", DATASETS, cfg.data.dataset),
        ("model.classifier", CLASSIFIERS, cfg.model.classifier),
        ("train.sampler", SAMPLERS, cfg.train.sampler),
        ("train.transform", TRANSFORMS, cfg.train.transform),
        ("train.test_transform", TRANSFORMS, cfg.train.test_transform),
    ]
    for key, registry, value in names:
        _check_name(key, registry, value)
    with config_key("model.backbone"):
        check_backbone(cfg.model.backbone)
    if cfg.model.pretrained is True and published_preprocessing(cfg.model.backbone) is None:
        raise UsageError(
            f"config key 'model.pretrained': {cfg.model.backbone} has no published weights; "
            "give a weights file or a longtail run directory, or use a torchvision or "
            "timm/<name> backbone"
        )
    if cfg.data.val_split is not None and cfg.data.val_split not in SPLITS:
        raise UsageError(f"config key 'data.val_split': use one of {', '.join(SPLITS)} or null")
    _check_classifier_options(cfg)
    with config_key("method"):
        method_cls.check_config(cfg, options)
    method = {"name": cfg.method_name, **options.model_dump(mode="json")}
    return cfg.model_copy(update={"method": method})


def _moved_options(cfg: Config, moved: Mapping[str, str]) -> Config:
    """``cfg`` with method options that became config keys (``moved``: option -> key) moved
    there, so earlier configs and runs still load; an error where both are set and differ."""
    given = cfg.method_options
    for option, key in moved.items():
        if option not in given:
            continue
        value = given.pop(option)
        section_name, field = key.split(".")
        section = getattr(cfg, section_name)
        now, default = getattr(section, field), type(section).model_fields[field].default
        if now not in (value, default):
            raise UsageError(
                f"config key 'method.{option}' is now {key!r} and both are set ({value!r}, "
                f"{now!r}): set only {key}"
            )
        update = {section_name: section.model_copy(update={field: value})}
        cfg = cfg.model_copy(update={**update, "method": {"name": cfg.method_name, **given}})
    return cfg


def _check_classifier_options(cfg: Config) -> None:
    builder = CLASSIFIERS.get(str(cfg.model.classifier))
    try:
        inspect.signature(builder).bind(1, 2, **cfg.model.classifier_options)
    except TypeError as e:
        raise UsageError(
            f"config key 'model.classifier_options': {e} for classifier {cfg.model.classifier!r}"
        ) from None


def build_data(cfg: Config, need_test: bool = True, check_classes: bool = True) -> RunData:
    """Read the data the config names (raises DataError for missing or unusable files).

    Args:
        cfg: The config.
        need_test: Also read the test split.
        check_classes: Refuse a training set in which some class has no image.
    """
    with config_key("data"):
        data = RunData.from_config(cfg.data, seed=cfg.seed, need_test=need_test)
    if check_classes:
        data.check_classes()
    return data


def build_method(
    cfg: Config,
    data: RunData,
    device: torch.device | None = None,
    weights: bool | Mapping[str, torch.Tensor] = False,
) -> Method:
    """The config's method, set up for ``data`` (and moved to ``device``).

    Args:
        cfg: A validated config.
        data: The run's data (its class count, channels and counts).
        device: Where to move the method.
        weights: The backbone's start: random (False), the published weights (True) or a
            state_dict. A new run gives its ``model.pretrained``; a run that is read back
            loads its own checkpoint instead.
    """
    options = method_options(cfg.method_name, cfg.method_options)
    method = METHODS.get(cfg.method_name)(cfg, options, weights)
    method.setup(data)
    method.weights = False  # used by setup; not kept beside the weights it gave
    if device is not None:
        method = method.to(device)
        if cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
    return method


def carried_options(options: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A recipe's method options that method ``name`` also has: what a recipe keeps when
    another method (or variant) trains on it, e.g. ``ce-ce`` on the hybrid-sc recipe."""
    fields = METHODS.get(name).Options.model_fields
    return {k: v for k, v in options.items() if k in fields}


# Method options that are epochs of the run: they move with its length.
EPOCH_OPTIONS = ("reweight_epoch", "resample_epoch", "classifier_epochs")


def scale_epochs(cfg: Config, epochs: int) -> tuple[Config, list[str]]:
    """``cfg`` shortened (or lengthened) to ``epochs`` with its whole schedule in proportion:
    lr milestones and warm-up, the switch epochs of deferred re-weighting / re-sampling, and
    the length (and milestones) of a classifier stage, each rounded to whole epochs and kept
    at least 1 and at most the last epoch. A 200-epoch recipe run for 12 otherwise never
    decays its lr (milestones at 160 and 180) and never switches.

    Returns:
        The scaled, validated config and one line per setting that changed.
    """
    if epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {epochs}")
    cfg = validate(cfg)
    full = cfg.train.epochs
    scale = epochs / full

    def at(value: float) -> int:  # an epoch inside the run, so that it takes effect
        return min(max(1, round(value * scale)), max(1, epochs - 1))

    raw = cfg.model_dump(mode="json")
    optim, method = raw["optim"], raw["method"]
    optim["milestones"] = sorted({at(m) for m in optim["milestones"]})
    optim["warmup_epochs"] = optim["warmup_epochs"] * scale
    raw["train"]["epochs"] = epochs
    for key in EPOCH_OPTIONS:
        if method.get(key):
            method[key] = at(method[key])
    if method.get("classifier_milestones"):
        method["classifier_milestones"] = sorted({at(m) for m in method["classifier_milestones"]})
    new = validate(config_from_dict(raw))
    changed = [
        f"{key}: {a} -> {b}"
        for key, a, b in _settings_changed(cfg.model_dump(mode="json"), new.model_dump(mode="json"))
    ]
    return new, changed


def _settings_changed(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in a.keys() | b.keys():
            out += _settings_changed(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return sorted(out)
    return [] if a == b else [(prefix, a, b)]


def schedule_warnings(cfg: Config) -> list[str]:
    """Settings of ``cfg`` in epochs that lie past its last epoch, so never take effect."""
    epochs, out = cfg.train.epochs, []
    late = [m for m in cfg.optim.milestones if m >= epochs]
    if late and cfg.optim.schedule == "multistep":
        out.append(f"optim.milestones {late} lie past the last epoch ({epochs}): that lr decay "
                   "never happens")  # fmt: skip
    for key in ("reweight_epoch", "resample_epoch"):
        value = cfg.method_options.get(key)
        if value and value >= epochs:
            out.append(f"method.{key}={value} lies past the last epoch ({epochs}): that switch "
                       "never happens")  # fmt: skip
    if out:
        out[-1] += (
            f"; give --epochs {epochs} instead of train.epochs to scale the recipe's schedule"
        )
    return out
