"""Training and evaluating run directories: what ``longtail train`` and ``evaluate`` do.

A run directory holds ``config.yaml`` (the resolved config), ``data.json`` (class counts and
shot groups), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/last.pt`` (and ``best.pt``
with a validation split) and ``eval_<split>.json``. The config, the data and the model are
checked before the directory is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from longtail.build import build_data, build_method, config_key, validate
from longtail.config import Config, config_from_dict, dump_config
from longtail.data import RunData
from longtail.engine.checkpoint import atomic_write_bytes, load_checkpoint
from longtail.engine.trainer import (
    CHECKPOINT_DIR,
    evaluate,
    fit,
    resolve_device,
    seed_everything,
)
from longtail.errors import LongtailError, UsageError
from longtail.evaluation import shot_groups
from longtail.methods import Method


def _device(cfg: Config) -> torch.device:
    with config_key("train.device"):
        return resolve_device(cfg.train.device)


def read_run_config(out: Path) -> Config:
    """The validated config a run directory was trained with."""
    path = out / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{out} is not a run directory: {path} is missing")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LongtailError(f"{path} is not valid YAML ({type(e).__name__})") from None
    return validate(config_from_dict(raw))


def data_summary(cfg: Config, data: RunData) -> dict[str, Any]:
    """What ``data.json`` records: the training set's classes, counts and shot groups."""
    counts = data.counts.tolist()
    return {
        "dataset": cfg.data.dataset,
        "ratio": cfg.data.ratio,
        "profile": cfg.data.profile,
        "num_classes": data.num_classes,
        "classes": data.classes,
        "counts": counts,
        "total": len(data),
        "groups": shot_groups(counts),
    }


def _check_new_run_dir(out: Path) -> None:
    """Refuse to overwrite an existing run."""
    if out.exists() and any(out.iterdir()):
        raise UsageError(
            f"run directory {out} already exists; pass --resume to continue it or choose "
            "another --out"
        )


def train(
    cfg: Config, out: str | Path, *, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out`` and evaluate the last epoch on the test split.

    With ``resume``, the run's own ``config.yaml`` is used and training continues from
    ``checkpoints/last.pt``.

    Returns:
        The test metrics of the last epoch (also written to ``eval_test.json``).
    """
    out = Path(out)
    last = out / CHECKPOINT_DIR / "last.pt"
    if resume:
        if not last.is_file():
            raise UsageError(f"--resume: no checkpoint at {last}; start the run without --resume")
        cfg = read_run_config(out)
    else:
        cfg = validate(cfg)
        _check_new_run_dir(out)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = _device(cfg)
    seed_everything(cfg.seed)
    data = build_data(cfg)
    data.pin_memory = device.type == "cuda"
    method = build_method(cfg, data, device)

    ckpt = None
    if resume:
        ckpt = load_checkpoint(last, map_location=device)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", dump_config(cfg).encode())
        summary = json.dumps(data_summary(cfg, data), indent=1)
        atomic_write_bytes(out / "data.json", summary.encode())
    fit(method, data, cfg, out, device, ckpt=ckpt, progress=progress)
    return evaluate_run(out, cfg=cfg, method=method, data=data, device=device)


def evaluate_run(
    out: str | Path,
    *,
    checkpoint: str = "last",
    split: str = "test",
    cfg: Config | None = None,
    method: Method | None = None,
    data: RunData | None = None,
    device: torch.device | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Evaluate a run directory's checkpoint on ``split``; writes ``eval_<split>.json``.

    ``cfg``, ``method``, ``data`` and ``device`` skip rebuilding what the caller holds (the
    method with the weights to evaluate).
    """
    out = Path(out)
    cfg = cfg or read_run_config(out)
    device = device or _device(cfg)
    data = data or build_data(cfg)
    if split == "val" and data.val_source is None:
        raise UsageError(
            f"{cfg.data.dataset} has no validation split configured (config key data.val_split)"
        )
    if method is None:
        method = build_method(cfg, data, device)
        ckpt = load_checkpoint(out / CHECKPOINT_DIR / f"{checkpoint}.pt", map_location=device)
        method.load_state_dict(ckpt["model"])
        epoch = ckpt["epoch"] + 1
    else:
        epoch = sum(s.epochs for s in method.stages())
    res, _, _ = evaluate(method, data, split, device, cfg.train)
    res = {"split": split, "checkpoint": checkpoint, "epoch": epoch, **res}
    if save:
        atomic_write_bytes(out / f"eval_{split}.json", json.dumps(res, indent=1).encode())
    return res
