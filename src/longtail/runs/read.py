"""Reading run directories: their config, data summary, checkpoints and evaluation.

A run directory holds ``config.yaml`` (the resolved config), ``data.json`` (class names,
counts, shot groups and the images' preprocessing), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/last.pt`` (and ``best.pt`` with a validation split), ``eval_<split>.json``,
``report.html`` and ``plots/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from longtail import jsonio
from longtail.build import build_data, build_method, config_key, method_options, validate
from longtail.config import (
    Config,
    config_from_dict,
    deep_merge,
    flat,
    load_yaml,
    parse_overrides,
)
from longtail.data import RunData, default_root
from longtail.data.transforms import CROP_FRACTION, Resize
from longtail.engine import distributed
from longtail.engine.checkpoint import atomic_write_bytes, load_checkpoint
from longtail.engine.run_dir import RunDir
from longtail.engine.trainer import evaluate, resolve_device
from longtail.errors import LongtailError, UsageError, shown
from longtail.evaluation import shot_groups
from longtail.methods import METHODS, Method
from longtail.methods.base import state_mismatch


def config_device(cfg: Config) -> torch.device:
    """The device ``train.device`` names (``auto``: CUDA where there is one)."""
    with config_key("train.device"):
        return resolve_device(cfg.train.device)


def read_run_config(run_dir: Path) -> Config:
    """The validated config a run directory was trained with."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise UsageError(f"{shown(run_dir)} is not a run directory: {shown(path)} is missing")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LongtailError(f"{shown(path)} is not valid YAML ({type(e).__name__})") from None
    if not isinstance(raw, dict) or not raw:
        raise LongtailError(
            f"{shown(path)} is empty or not a mapping of sections: the run's config is damaged; "
            "restore it, or train the run again"
        )
    try:
        return validate(config_from_dict(raw))
    except UsageError as e:
        raise UsageError(f"{shown(path)}: {e.template}") from None


# Data sets whose long tail is made by data.ratio (the benchmark); any other is the user's own,
# already as long-tailed as it is.
BENCHMARKS = frozenset({"cifar10", "cifar100", "fashion-mnist"})


def data_location(cfg: Config) -> str:
    """Where the training images were read from."""
    d = cfg.data
    if d.root is not None:
        return str(Path(d.root).expanduser())
    if d.files:
        return str(Path(next(iter(d.files.values()))).expanduser().parent)
    return str(default_root(d.dataset))


def subsampling_warning(cfg: Config, data: RunData) -> str | None:
    """One line when data.ratio or data.n_max drops images of a data set the user brought."""
    d = cfg.data
    found, used = len(data.train_source), len(data)
    held = len(data.val_source) if d.val_per_class and data.val_source is not None else 0
    keys = [f"data.{k}={v}" for k, v in (("ratio", d.ratio), ("n_max", d.n_max)) if v is not None]
    if d.dataset in BENCHMARKS or used + held == found or not keys:
        return None
    whole = np.bincount(data.train_source.targets, minlength=data.num_classes)
    rarest = int(np.argmin(whole))
    return (
        f"{' and '.join(keys)} keep{'s' if len(keys) == 1 else ''} {used:,} of the {found:,} "
        f"training images in {shown(data_location(cfg))} (rarest class "
        f"{shown(data.classes[rarest])}: {whole[rarest]} -> {int(data.counts[rarest])}); set "
        f"{' and '.join(k.split('=')[0] + '=null' for k in keys)} to train on the data as it is"
    )


def skipped_links_warning(cfg: Config, data: RunData) -> str | None:
    """One line naming the symlinked folders that reading the data did not enter."""
    sources = (data.train_source, data.val_source, data.test_source)
    links = sorted({x for s in sources if s is not None for x in s.skipped})
    if not links:
        return None
    more = f" and {len(links) - 3} more" if len(links) > 3 else ""
    return (
        f"{len(links)} symlinked folder{'s' if len(links) > 1 else ''} in "
        f"{shown(data_location(cfg))} not entered ({', '.join(map(shown, links[:3]))}{more}): "
        "a link back into the tree would repeat images under another class; copy or move the "
        "images into the tree to use them"
    )


def describe_schedule(optim: Any, epochs: int) -> str:
    """The learning-rate schedule of a stage in words, e.g. ``lr 0.1, x0.1 at epoch 160, 180``."""
    text = f"lr {optim.lr:g}"
    if optim.schedule == "multistep":
        steps = [m for m in optim.milestones if m < epochs]
        late = [m for m in optim.milestones if m >= epochs]
        text += (
            f", x{optim.gamma:g} at epoch {', '.join(map(str, steps))}" if steps else " constant"
        )
        if late:  # a 200-epoch recipe shortened with train.epochs, say
            text += f" (milestone {', '.join(map(str, late))} past the last epoch, {epochs})"
    elif optim.schedule == "cosine":
        text += f" cosine to {optim.min_lr:g}"
    else:
        text += " constant"
    if optim.warmup_epochs:
        text += f" after {optim.warmup_epochs:g} warm-up epochs"
    return text


def run_plan(cfg: Config, method: Method, data: RunData) -> list[dict[str, Any]]:
    """Each stage of the run: its epochs, steps per epoch and learning-rate schedule."""
    plan = []
    for stage in method.stages():
        optim = cfg.optim.model_copy(update=dict(stage.optim))
        loaders = method.loaders(data, stage)
        plan.append(
            {
                "stage": stage.name,
                "epochs": stage.epochs,
                "steps_per_epoch": min(len(x) for x in loaders.values()),
                "schedule": describe_schedule(optim, stage.epochs),
            }
        )
    return plan


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The two lines a run prints before its first epoch, from :func:`data_summary`."""
    pre = summary["preprocess"]
    splits = ", ".join(f"{k} {summary[k]:,}" for k in ("val", "test") if summary.get(k))
    held = summary.get("held_out", 0)
    ratio = ""
    if summary["total"] + held != summary["found"]:
        ratio = f" (data.ratio {summary['ratio']})" if summary["ratio"] else " (data.n_max)"
    if held:
        ratio += f", {held:,} held out for validation (data.val_per_class)"
    data_line = (
        f"data: {summary['dataset']} from {shown(summary['read_from'])}, "
        f"{summary['num_classes']} classes, {summary['total']:,} of {summary['found']:,} "
        f"training images{ratio}{', ' + splits if splits else ''}; {pre['image_size']} px, "
        f"{pre['channels']} channel{'s' if pre['channels'] > 1 else ''}"
    )
    slow = summary.get("per_image_transforms")
    if slow:
        data_line += (
            f"; per-image loaders, the fast path has no batched form of "
            f"{', '.join(map(repr, slow))} at {pre['image_size']} px"
        )
    decoded = summary.get("decoded_on_device")
    if decoded:
        data_line += (
            f"; JPEGs decoded and augmented on the device for {', '.join(map(repr, decoded))}"
        )
    plan = summary["plan"]
    stages = "; ".join(
        f"{'' if len(plan) == 1 else s['stage'] + ' '}{s['epochs']} epochs x "
        f"{s['steps_per_epoch']} steps, {s['schedule']}"
        for s in plan
    )
    backbone = f", {summary['backbone']}" if "backbone" in summary else ""
    return [data_line, f"train: {summary['method']}{backbone}, {stages}"]


def describe_weights(cfg: Config) -> str:
    """The start of the backbone, for the run's summary."""
    p = cfg.model.pretrained
    if p is False:
        return "random init"
    if p is True:
        return "published weights"
    return f"weights of {shown(p)}"


def data_summary(
    cfg: Config, data: RunData, plan: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """What ``data.json`` records: where the data came from, how much of it is used, the
    training set's classes, counts and shot groups, and the run's plan (stages, steps per
    epoch, schedule) when given."""
    counts = data.counts.tolist()
    sources = (("val", data.val_source), ("test", data.test_source))
    sizes = {k: len(s) for k, s in sources if s is not None}
    return {
        "dataset": cfg.data.dataset,
        "read_from": data_location(cfg),
        "found": len(data.train_source),
        **sizes,
        "held_out": sizes.get("val", 0) if cfg.data.val_per_class else 0,
        "method": cfg.method_name,
        "backbone": f"{cfg.model.backbone} from {describe_weights(cfg)}",
        **({"plan": plan} if plan is not None else {}),
        "per_image_transforms": sorted(data.per_image_transforms),
        "decoded_on_device": sorted(data.decoded_on_device),
        "ratio": cfg.data.ratio,
        "n_max": cfg.data.n_max,
        "profile": cfg.data.profile,
        "num_classes": data.num_classes,
        "classes": data.classes,
        "counts": counts,
        "total": len(data),
        "groups": shot_groups(counts),
        # What a new image needs to look like to the model (predict, export).
        "preprocess": {
            "transform": cfg.train.test_transform,
            "image_size": cfg.data.image_size,
            "channels": data.channels,
            "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std],
            "crop_fraction": data.resize.crop_fraction,
            "interpolation": data.resize.interpolation,
        },
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
        "train.report",
    }
)


# What --resume may change: where the data is and how this machine runs (MACHINE_KEYS), and
# train.epochs, to extend a run.
RESUME_KEYS = MACHINE_KEYS | {"train.epochs"}


def resume_config(cfg: Config, changes: list[str]) -> tuple[Config, int | None]:
    """The run's config with the ``--set`` changes a resume allows.

    Returns:
        The new config, and the run's former epoch count when the change extends it.
    """
    given = parse_overrides(changes)
    refused = sorted(k for k in flat(given, MACHINE_KEYS) if k not in RESUME_KEYS)
    if refused:
        raise UsageError(
            f"{{resume}} continues the run as its config.yaml says; {refused[0]} cannot change "
            "(extend a run with train.epochs=N, or move it with data.root, train.device; start "
            "a new run for anything else)"
        )
    new = validate(
        config_from_dict(deep_merge(cfg.model_dump(mode="json"), parse_overrides(changes)))
    )
    extended = cfg.train.epochs if new.train.epochs != cfg.train.epochs else None
    return new, extended


def check_extension(old: Config, new: Config, trained: int) -> None:
    """Raise UsageError unless ``new`` (more epochs) keeps the ``trained`` epochs of ``old``
    in the stages they were trained in."""
    if new.train.epochs < trained:
        raise UsageError(
            f"train.epochs={new.train.epochs} is fewer than the {trained} epochs this run has "
            "trained; give more to extend it"
        )

    def layout(cfg: Config) -> list[tuple[str, int]]:
        cls = METHODS.get(cfg.method_name)
        stages = cls(cfg, method_options(cfg.method_name, cfg.method_options)).stages()
        return [(s.name, i) for s in stages for i in range(s.epochs)]

    before, after = layout(old), layout(new)
    if after[:trained] != before[:trained]:
        raise UsageError(
            f"train.epochs={new.train.epochs} would move the stages of {old.method_name} under "
            f"the {trained} epochs already trained; start a new run (or set the stage lengths "
            "so that they stay)"
        )


def _as_written_now(raw: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version as this one writes it (renamed options under
    their new names, new defaults filled in); as it is where it no longer validates."""
    try:
        return validate(config_from_dict(raw)).model_dump(mode="json")
    except LongtailError:
        return raw


def config_differences(
    saved: dict[str, Any], cfg: Config, may_differ: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """Where a config saved by this or an earlier version trains otherwise than ``cfg``:
    (dotted key, saved value, ``cfg``'s value), sorted, for every key but MACHINE_KEYS and
    ``may_differ``."""
    a = flat(_as_written_now(saved), MACHINE_KEYS)
    b = flat(cfg.model_dump(mode="json"), MACHINE_KEYS)
    skip = MACHINE_KEYS | frozenset(may_differ)
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(a.keys() | b.keys())
        if k not in skip and a.get(k) != b.get(k)
    ]


def check_checkpoint(
    ckpt: dict[str, Any], cfg: Config, path: Path, method: Method, may_differ: Iterable[str] = ()
) -> None:
    """Load the checkpoint's weights into ``method``, after checking that it comes from this
    config (but for the keys ``may_differ``) and fits this method's modules."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise LongtailError(f"{shown(path)} is not a longtail checkpoint")
    saved = ckpt.get("config")
    if isinstance(saved, dict):
        differ = config_differences(saved, cfg, may_differ)
        if differ:
            k, then, now = differ[0]
            raise LongtailError(
                f"checkpoint {shown(path)} was written with another config: {k} is {then!r} "
                f"there and {now!r} in config.yaml; restore config.yaml or start a new run"
            )
    mismatch = state_mismatch(method.state_dict(), ckpt["model"])
    if mismatch:
        raise LongtailError(
            f"checkpoint {shown(path)} does not fit the model of config.yaml ({mismatch}); it was "
            "written by another config"
        )
    method.load_state_dict(ckpt["model"])


def evaluate_run(
    run_dir: str | Path,
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
    run_dir = Path(run_dir)
    if method is None:  # not training's own evaluation: refuse a run that is training
        RunDir(run_dir).check_not_in_use(doing="evaluate")
    cfg = cfg or read_run_config(run_dir)
    device = device or config_device(cfg)
    data = data or build_data(cfg)
    if split == "val" and data.val_source is None:
        raise UsageError(
            f"{cfg.data.dataset} has no validation split configured (config key data.val_split)"
        )
    if method is None:
        method, ckpt = load_method(run_dir, checkpoint, cfg, data, device)
        epoch = ckpt["epoch"] + 1
    else:
        epoch = sum(s.epochs for s in method.stages())
    res = evaluate(method, data, split, device, cfg.train)
    res = {"split": split, "checkpoint": checkpoint, "epoch": epoch, **res}
    res["classes"] = data.classes
    res["train_counts"] = data.counts.tolist()
    res["per_class_by_name"] = dict(zip(data.classes, res["per_class"], strict=True))
    if save and distributed.is_main():
        # eval_<split>.json is the last epoch's alone (what compare and report read); the
        # best checkpoint's result goes beside it.
        path = RunDir(run_dir).evaluation(split, checkpoint)
        try:
            atomic_write_bytes(path, jsonio.dumps(res, indent=1).encode())
        except OSError as e:  # a read-only run directory, a full disk: the result still counts
            print(
                f"warning: could not write {shown(path)} ({e.strerror or e}); the result "
                "is only printed",
                file=sys.stderr,
            )
    return res


@dataclass
class RunInfo:
    """What a run directory's ``data.json`` says about its training data: enough to set a
    method up and to preprocess new images without the data set itself.

    Attributes:
        classes: Class names, indexed by class.
        counts: Training images per class.
        channels: 1 (grey) or 3 (RGB).
        image_size: Side of the square network input, pixels.
        mean: Per-channel normalisation mean, [0, 1] units.
        std: Per-channel normalisation std, [0, 1] units.
        transform: The evaluation transform (``train.test_transform``).
        resize: Its resize of images over 64 px (centre-crop fraction, interpolation).
    """

    classes: list[str]
    counts: np.ndarray
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    transform: str
    resize: Resize = field(default_factory=Resize)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_run_info(run_dir: str | Path) -> RunInfo:
    """The :class:`RunInfo` of run directory ``run_dir``."""
    path = RunDir(run_dir).data_json
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        pre = saved["preprocess"]
        return RunInfo(
            classes=[str(c) for c in saved["classes"]],
            counts=np.asarray(saved["counts"], dtype=np.int64),
            channels=int(pre["channels"]),
            image_size=int(pre["image_size"]),
            mean=[float(v) for v in pre["mean"]],
            std=[float(v) for v in pre["std"]],
            transform=str(pre["transform"]),
            resize=Resize(  # runs before 0.3 have neither: what they used
                float(pre.get("crop_fraction", CROP_FRACTION)),
                str(pre.get("interpolation", "bilinear")),
            ),
        )
    except FileNotFoundError:
        raise UsageError(
            f"{shown(run_dir)} is not a run directory: {shown(path)} is missing"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise LongtailError(
            f"{shown(path)} lacks the preprocessing of the run's images (written by an older "
            "longtail "
            "or edited); train the run again"
        ) from None


def load_method(
    run_dir: str | Path, checkpoint: str, cfg: Config, data: RunData | RunInfo, device: torch.device
) -> tuple[Method, dict[str, Any]]:
    """The method of ``cfg``, set up for ``data`` (a run's data, or its data.json's
    :class:`RunInfo`), with the weights of the run's ``checkpoint`` (``last`` or ``best``),
    checked against the config; and the checkpoint."""
    method = build_method(cfg, data, device)  # type: ignore[arg-type]  # setup reads counts
    path = RunDir(run_dir).checkpoint(checkpoint)
    if not path.is_file():
        why = (
            "a run keeps one only with a validation split (data.val_split)"
            if checkpoint == "best"
            else "train it first"
        )
        raise UsageError(f"{shown(run_dir)} has no checkpoint {checkpoint}.pt; {why}")
    ckpt = load_checkpoint(path, map_location=device)
    check_checkpoint(ckpt, cfg, path, method)
    return method, ckpt


def load_run(
    run_dir: str | Path, checkpoint: str = "last", device: torch.device | None = None
) -> tuple[Config, Method, RunInfo]:
    """The trained method of run directory ``run_dir`` in eval mode, without its data set."""
    cfg = read_run_config(Path(run_dir))
    info = read_run_info(Path(run_dir))
    method, _ = load_method(run_dir, checkpoint, cfg, info, device or config_device(cfg))
    return cfg, method.eval(), info
