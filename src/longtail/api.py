"""Training and evaluating run directories: what ``longtail train`` and ``evaluate`` do.

A run directory holds ``config.yaml`` (the resolved config), ``data.json`` (class counts and
shot groups), ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/last.pt`` (and ``best.pt``
with a validation split) and ``eval_<split>.json``. The config, the data and the model are
checked before the directory is created.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from longtail.build import build_data, build_method, config_key, validate
from longtail.config import Config, config_from_dict, dump_config
from longtail.data import RunData
from longtail.engine import distributed
from longtail.engine.checkpoint import atomic_write_bytes, load_checkpoint
from longtail.engine.run_dir import CHECKPOINT_DIR, RunDir
from longtail.engine.trainer import (
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


# Settings that may differ between the run that wrote a checkpoint and the one that reads it:
# where the data lives and how this machine runs, not what is trained.
MACHINE_KEYS = frozenset(
    {
        "data.root",
        "data.files",
        "data.num_workers",
        "train.device",
        "train.threads",
        "train.log_every",
        "train.eval_every",
    }
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and key not in MACHINE_KEYS:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def check_checkpoint(ckpt: dict[str, Any], cfg: Config, path: Path, method: Method) -> None:
    """Load the checkpoint's weights into ``method``, after checking that it comes from this
    config and fits this method's modules."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise LongtailError(f"{path} is not a longtail checkpoint")
    saved = ckpt.get("config")
    if isinstance(saved, dict):
        a, b = _flat(saved), _flat(cfg.model_dump(mode="json"))
        differ = sorted(
            k for k in a.keys() | b.keys() if k not in MACHINE_KEYS and a.get(k) != b.get(k)
        )
        if differ:
            k = differ[0]
            raise LongtailError(
                f"checkpoint {path} was written with another config: {k} is {a.get(k)!r} there "
                f"and {b.get(k)!r} in config.yaml; restore config.yaml or start a new run"
            )
    mismatch = _state_mismatch(method.state_dict(), ckpt["model"])
    if mismatch:
        raise LongtailError(
            f"checkpoint {path} does not fit the model of config.yaml ({mismatch}); it was "
            "written by another config"
        )
    method.load_state_dict(ckpt["model"])


def _state_mismatch(expected: dict[str, Any], given: Any) -> str:
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


def load_first_stage(method: Method, cfg: Config, source: Path) -> None:
    """Weights of a finished first stage from run ``source`` (``method.from_run``), all but
    the classifier, which stays new for the classifier stage."""
    run = RunDir(source)
    if not run.started():
        raise UsageError(f"method.from_run: {source} has no checkpoint; train its first stage")
    other = read_run_config(run.path)
    if other.method_name != cfg.method_name or other.model != cfg.model:
        raise UsageError(
            f"method.from_run: {source} trained {other.method_name} with another model section; "
            "give a run of the same method and model"
        )
    ckpt = load_checkpoint(run.last)
    first = other.train.epochs - int(other.method.get("classifier_epochs", 0))
    if ckpt.get("stage", 0) == 0 and ckpt["epoch"] + 1 < first:
        raise UsageError(
            f"method.from_run: {source} stopped at epoch {ckpt['epoch'] + 1} of its first "
            f"stage's {first}; finish it (longtail train --out {source} --resume) first"
        )
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("classifier.")}
    mismatch = _state_mismatch(
        {k: v for k, v in method.state_dict().items() if not k.startswith("classifier.")}, state
    )
    if mismatch:
        raise UsageError(f"method.from_run: {source} does not fit this model ({mismatch})")
    method.load_state_dict(state, strict=False)


def checkpoint_bytes(method: Method) -> int:
    """About how large one checkpoint of ``method`` is: its state and SGD's momentum."""
    state = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in method.parameters())
    return state + momentum


def train(
    cfg: Config, out: str | Path, *, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out`` and evaluate the last epoch on the test split.

    The config, the data and the model are checked before anything is written: a run that
    fails before its first checkpoint leaves nothing that blocks the same command, and a
    directory left by such a run is taken over. With ``resume``, the run's own
    ``config.yaml`` is used and training continues from ``checkpoints/last.pt``.

    Returns:
        The test metrics of the last epoch (also written to ``eval_test.json``).
    """
    main = distributed.is_main_from_env()  # under torchrun only rank 0 touches the run dir
    run = RunDir(out)
    if main:
        run.check_path()
        run.check_not_in_use()
    if resume:
        if main:
            run.check_resumable()
        cfg = read_run_config(run.path)
    else:
        cfg = validate(cfg)
        if main:
            run.check_new()
    distributed.setup(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = distributed.local_device(_device(cfg))
    if cfg.train.sync_bn and device.type != "cuda":
        raise UsageError(
            "config key 'train.sync_bn': PyTorch's SyncBatchNorm runs on CUDA devices only; "
            "set it to false on the CPU"
        )
    seed_everything(cfg.seed)
    data = build_data(cfg)
    data.pin_memory, data.device = device.type == "cuda", device
    method = build_method(cfg, data, device)
    if cfg.train.sync_bn:
        method = distributed.sync_batch_norm(method)
    if cfg.train.compile:  # the module stays as it is (its state_dict keys unchanged)
        method.backbone.forward = torch.compile(method.backbone.forward)
    from_run = getattr(method.opts, "from_run", None)
    if from_run and not resume:
        load_first_stage(method, cfg, Path(from_run).expanduser())

    with run.locked() if main else contextlib.nullcontext():
        if main and not resume:
            run.check_new()  # again, now that no other process can start it meanwhile
            if run.clear_failed_start():
                print(
                    f"{run.path} held a run that stopped before its first checkpoint; "
                    "starting it again",
                    file=sys.stderr,
                )
        if main:
            if resume:
                run.remove_partial_writes()
            copies = 3 if data.val_source is not None else 2  # last, best, a write in flight
            run.check_writable(copies * checkpoint_bytes(method) + 16 * 2**20)
            if not resume:
                atomic_write_bytes(run.path / "config.yaml", dump_config(cfg).encode())
                summary = json.dumps(data_summary(cfg, data), indent=1)
                atomic_write_bytes(run.path / "data.json", summary.encode())
        distributed.barrier()  # the run directory is ready for every process
        ckpt = None
        if resume:
            ckpt = load_checkpoint(run.last, map_location=device)
            check_checkpoint(ckpt, cfg, run.last, method)
        fit(method, data, cfg, run.path, device, ckpt=ckpt, progress=progress)
        return evaluate_run(run.path, cfg=cfg, method=method, data=data, device=device)


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
        path = out / CHECKPOINT_DIR / f"{checkpoint}.pt"
        ckpt = load_checkpoint(path, map_location=device)
        check_checkpoint(ckpt, cfg, path, method)
        epoch = ckpt["epoch"] + 1
    else:
        epoch = sum(s.epochs for s in method.stages())
    res, _, _ = evaluate(method, data, split, device, cfg.train)
    res = {"split": split, "checkpoint": checkpoint, "epoch": epoch, **res}
    if save and distributed.is_main():
        atomic_write_bytes(out / f"eval_{split}.json", json.dumps(res, indent=1).encode())
    return res
