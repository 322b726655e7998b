"""Where a new run's backbone starts: ``model.pretrained`` read into weights and into the
preprocessing those weights expect.

``model.pretrained`` is False (random weights), True (the backbone's published weights,
fetched by torchvision or timm), or a path: a weights file (see
:mod:`longtail.models.pretrained`), a longtail run directory (its last checkpoint) or one of
its checkpoints. Published weights and earlier runs bring their own normalisation and resize,
which fill the ``data`` keys the config leaves unset.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from longtail.config import Config
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.run_dir import RunDir
from longtail.errors import UsageError, shown
from longtail.models.backbones import published_preprocessing
from longtail.models.pretrained import read_weights
from longtail.runs.read import read_run_config, read_run_info

KEY = "config key 'model.pretrained'"


def _run_of(path: Path) -> RunDir | None:
    """The run directory that ``path`` is, or holds the checkpoint ``path``; else None."""
    for candidate in (path, path.parent.parent):
        run = RunDir(candidate)
        is_run = run.config.is_file() and run.data_json.is_file()
        if is_run and (candidate == path or path.parent == run.checkpoints):
            return run
    return None


def _weights_file(path: Path) -> Path:
    """The file to read the weights from: ``path`` itself, or a run directory's last
    checkpoint. Raises UsageError naming what is wrong with ``path``."""
    if not path.exists():
        raise UsageError(
            f"{KEY}: no file {shown(path)}; give a weights file (.pth, .pt, .bin, "
            ".safetensors), a longtail run directory, or true for the published weights"
        )
    if path.is_file():
        return path
    run = _run_of(path)
    if run is None:
        raise UsageError(
            f"{KEY}: {shown(path)} is a folder but not a longtail run directory (it has no "
            "config.yaml and data.json); give the run directory or a weights file"
        )
    if not run.last.is_file():
        raise UsageError(f"{KEY}: the run {shown(path)} has no checkpoint yet; train it first")
    return run.last


def _trained_backbone(path: Path) -> str | None:
    """The backbone that a longtail run directory or checkpoint trained (None for another
    weights file)."""
    run = _run_of(path)
    if run is not None:
        return read_run_config(run.path).model.backbone
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: read_weights says it
            warnings.simplefilter("ignore")
            saved: Any = load_checkpoint(path)
    except Exception:  # not a longtail checkpoint: read_weights says what it is
        return None
    config = saved.get("config") if isinstance(saved, Mapping) else None
    return config.get("model", {}).get("backbone") if isinstance(config, Mapping) else None


def pretrained_weights(cfg: Config) -> bool | dict[str, Tensor]:
    """The backbone's start for a new run of ``cfg``: False (random), True (published
    weights, loaded when the backbone is built) or the state_dict read from the path.

    Raises:
        UsageError: One line naming ``model.pretrained``: a path that does not exist, a
            folder that is no run, a file that holds no state_dict, or a run that trained
            another backbone.
    """
    given = cfg.model.pretrained
    if isinstance(given, bool):
        return given
    path = _weights_file(Path(given).expanduser())
    trained = _trained_backbone(path)
    if trained is not None and trained != cfg.model.backbone:
        raise UsageError(
            f"{KEY}: {shown(given)} trained a {trained}, not the {cfg.model.backbone} of "
            f"model.backbone; set model.backbone: {trained}"
        )
    try:
        return read_weights(path)
    except ValueError as e:
        raise UsageError(f"{KEY}: {e}") from None


def _weights_preprocessing(cfg: Config) -> dict[str, Any] | None:
    """Mean, std, crop fraction and interpolation that the start's weights were trained
    with: the published metadata, or the earlier run's data.json; None for random weights or
    a plain weights file (which carries none)."""
    given = cfg.model.pretrained
    if given is True:
        return published_preprocessing(cfg.model.backbone)
    if given is False:
        return None
    run = _run_of(Path(given).expanduser())
    if run is None:
        return None
    info = read_run_info(run.path)
    return {
        "mean": info.mean,
        "std": info.std,
        "crop_fraction": info.resize.crop_fraction,
        "interpolation": info.resize.interpolation,
    }


def with_weights_preprocessing(cfg: Config) -> Config:
    """``cfg`` with the ``data`` keys it leaves unset (mean, std, crop_fraction,
    interpolation) taken from its pretrained weights, so that training, evaluation, predict
    and export all preprocess images as those weights expect; keys the config sets stay."""
    pre = _weights_preprocessing(cfg)
    if pre is None:
        return cfg
    data = cfg.data
    fill = {
        key: pre[key]
        for key in ("mean", "std", "crop_fraction", "interpolation")
        if key not in data.model_fields_set or getattr(data, key) is None
    }
    if not fill:
        return cfg
    return cfg.model_copy(update={"data": data.model_copy(update=fill)})
