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

from longtail.config import Config, format_validation_error
from longtail.data import DATASETS, SAMPLERS, SPLITS, TRANSFORMS, RunData
from longtail.errors import UsageError
from longtail.methods import METHODS, Method, MethodOptions
from longtail.models import BACKBONES, CLASSIFIERS
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
        ("model.backbone", BACKBONES, cfg.model.backbone),
        ("model.classifier", CLASSIFIERS, cfg.model.classifier),
        ("train.sampler", SAMPLERS, cfg.train.sampler),
        ("train.transform", TRANSFORMS, cfg.train.transform),
        ("train.test_transform", TRANSFORMS, cfg.train.test_transform),
    ]
    for key, registry, value in names:
        _check_name(key, registry, value)
    if cfg.data.val_split is not None and cfg.data.val_split not in SPLITS:
        raise UsageError(f"config key 'data.val_split': use one of {', '.join(SPLITS)} or null")
    _check_classifier_options(cfg)
    with config_key("method"):
        method_cls.check_config(cfg, options)
    method = {"name": cfg.method_name, **options.model_dump(mode="json")}
    return cfg.model_copy(update={"method": method})


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


def build_method(cfg: Config, data: RunData, device: torch.device | None = None) -> Method:
    """The config's method, set up for ``data`` (and moved to ``device``)."""
    options = method_options(cfg.method_name, cfg.method_options)
    method = METHODS.get(cfg.method_name)(cfg, options)
    method.setup(data)
    if device is not None:
        method = method.to(device)
        if cfg.train.channels_last:
            method = method.to(memory_format=torch.channels_last)
    return method
