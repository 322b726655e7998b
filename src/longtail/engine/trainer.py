"""The training loop. It knows epochs, steps, stages, optimizers and checkpoints; the
method supplies the model, the loaders of its branches and the loss of one step."""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from longtail.config import (
    Config,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    dump_config,
    method_options,
)
from longtail.engine.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from longtail.engine.rundata import RunData, set_loader_epoch, to_device
from longtail.engine.schedules import learning_rate
from longtail.errors import LongtailError, UsageError
from longtail.evaluation.metrics import evaluate_logits
from longtail.methods import METHODS
from longtail.methods.base import Method, Network, Stage

CHECKPOINT_DIR = "checkpoints"


def build_method(cfg: Config) -> Method:
    return METHODS.get(cfg.method_name)(cfg, method_options(cfg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={name!r} but no CUDA device is visible; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"train.device={name!r} is not a device; use auto, cpu or cuda[:N]"
        ) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [p for p in params if p.requires_grad],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def locate_stage(stages: list[Stage], epoch: int) -> tuple[int, Stage, int]:
    """(stage index, stage, epoch within the stage) of a global 0-based epoch."""
    start = 0
    for i, s in enumerate(stages):
        if epoch < start + s.epochs:
            return i, s, epoch - start
        start += s.epochs
    raise ValueError(f"epoch {epoch} is past the last stage")


def prepare_run_dir(out: Path, resume: bool) -> None:
    """Refuse to overwrite a run silently; ``resume`` needs an existing one."""
    last = out / CHECKPOINT_DIR / "last.pt"
    if resume:
        if not last.is_file():
            raise UsageError(f"--resume: no checkpoint at {last}; start the run without --resume")
        return
    if out.exists() and any(out.iterdir()):
        raise UsageError(
            f"run directory {out} already exists; pass --resume to continue it or choose "
            "another --out"
        )
    out.mkdir(parents=True, exist_ok=True)


class MetricsLog:
    """Appends one JSON object per epoch to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool = True) -> None:
        self.path = out / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self.tb.add_scalar(k, v, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def predict_loader(
    method: Method,
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole evaluation loader, in eval mode."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for x, y, _ in loader:
        logits = method.predict(model, to_device(x, device, channels_last))
        all_logits.append(logits.float().cpu())
        all_labels.append(y)
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate_split(
    method: Method,
    model: nn.Module,
    data: RunData,
    split: str,
    device: torch.device,
    train_cfg: TrainConfig,
    batch_size: int = 256,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Metrics, logits and labels of ``split`` with the run's test view and memory format."""
    loader = data.eval_loader(split, batch_size, train_cfg.test_view)
    logits, labels = predict_loader(method, model, loader, device, train_cfg.channels_last)
    return evaluate_logits(logits, labels, data.counts.tolist()), logits, labels


class _Progress:
    """A rich progress bar on a terminal; one plain line per epoch otherwise."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self.bar.start()
        self.task = None

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch}/{total_epochs}", total=steps, info="")

    def advance(self, info: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, info=info)

    def end_epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt(record: dict[str, Any]) -> str:
    keys = [k for k in record if k.startswith(("train/", "test/top1", "val/top1"))]
    parts = [f"epoch {record['epoch']}/{record['epochs']}", f"lr {record['lr']:.4g}"]
    if "alpha" in record:
        parts.append(f"alpha {record['alpha']:.3f}")
    parts += [
        f"{k.split('/', 1)[1] if k.startswith('train/') else k} {record[k]:.4f}" for k in keys
    ]
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return "  ".join(parts)


def train(
    cfg: Config, out: str | Path, *, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out`` and evaluate the last epoch on the test split.

    Returns:
        The test metrics of the last epoch (also written to ``eval_test.json``).
    """
    out = Path(out)
    prepare_run_dir(out, resume)
    if resume:  # the run's own config wins over the one given on the command line
        cfg = config_from_dict(_read_run_config(out))
    else:
        atomic_write_bytes(out / "config.yaml", dump_config(cfg).encode())
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)

    data = RunData.from_config(cfg.data, seed=cfg.seed)
    data.pin_memory = device.type == "cuda"
    if not resume:
        summary = {
            "dataset": cfg.data.dataset,
            "ratio": cfg.data.ratio,
            "profile": cfg.data.profile,
            "num_classes": data.num_classes,
            "classes": data.train_source.classes,
            "counts": data.counts.tolist(),
            "total": len(data),
            "groups": data.groups,
        }
        atomic_write_bytes(out / "data.json", json.dumps(summary, indent=1).encode())

    method = build_method(cfg)
    model: Network = method.build_model(data).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stages = method.stages()
    total_epochs = sum(s.epochs for s in stages)

    start_epoch, ckpt, best = 0, None, None
    if resume:
        ckpt = load_checkpoint(out / CHECKPOINT_DIR / "last.pt", map_location=device)
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt.get("method", {}))
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        start_epoch, best = ckpt["epoch"] + 1, ckpt.get("best")

    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.amp and device.type == "cuda"
        else nullcontext()
    )
    log = MetricsLog(out)
    bar = _Progress(progress)
    optimizer, stage_idx, optim_cfg = None, -1, cfg.optim
    try:
        for epoch in range(start_epoch, total_epochs):
            idx, stage, stage_epoch = locate_stage(stages, epoch)
            method.stage = stage
            if idx != stage_idx:
                optim_cfg = cfg.optim.model_copy(update=stage.optim)
                optimizer = build_optimizer(method.trainable_parameters(model), optim_cfg)
                if ckpt is not None and ckpt.get("stage") == idx:
                    optimizer.load_state_dict(ckpt["optimizer"])
                stage_idx = idx
            assert optimizer is not None
            scalars = method.on_epoch_start(model, epoch)
            loaders = method.loaders(data, epoch)
            for loader in loaders.values():
                set_loader_epoch(loader, epoch)
            steps = min(len(loader) for loader in loaders.values())
            method.train_mode(model)
            bar.start_epoch(epoch + 1, total_epochs, steps)
            sums: dict[str, torch.Tensor] = {}
            images, t0, lr = 0, time.perf_counter(), optim_cfg.lr
            forwarded = method.forwarded_branches() or set(loaders)
            for step, batch in enumerate(zip(*loaders.values(), strict=False)):
                lr = learning_rate(optim_cfg, stage_epoch + step / steps, stage.epochs)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                batches = {
                    k: to_device(b, device, cfg.train.channels_last)
                    for k, b in zip(loaders, batch, strict=True)
                }
                with amp:
                    terms = method.step(model, batches, epoch)
                loss = terms["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                images += sum(
                    _batch_images(b) for k, b in zip(loaders, batch, strict=True) if k in forwarded
                )
                if step % cfg.train.log_every == 0 or step == steps - 1:
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise LongtailError(
                            f"the loss became {value} at epoch {epoch + 1} step {step + 1}; "
                            "lower optim.lr or check the data"
                        )
                    bar.advance(f"loss {value:.4f}")
                else:
                    bar.advance("")
            elapsed = time.perf_counter() - t0
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "epochs": total_epochs,
                "stage": stage.name,
                "lr": lr,
                **scalars,
                **{f"train/{k}": float(v) / steps for k, v in sums.items()},
                "epoch_time_s": elapsed,
                "images_per_s": images / max(elapsed, 1e-9),
            }
            last = epoch == total_epochs - 1
            every = cfg.train.eval_every
            if data.test_source is not None and not last and every and (epoch + 1) % every == 0:
                res, _, _ = evaluate_split(method, model, data, "test", device, cfg.train)
                record.update({f"test/{k}": res[k] for k in ("top1", "many", "medium", "few")})
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "stage": idx,
                "method": method.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "best": best,
            }
            if data.val_source is not None:
                res, _, _ = evaluate_split(method, model, data, "val", device, cfg.train)
                record.update({f"val/{k}": res[k] for k in ("top1", "many", "medium", "few")})
                if best is None or res["top1"] > best["top1"]:
                    best = {"epoch": epoch + 1, "top1": res["top1"]}
                    state["best"] = best
                    save_checkpoint(state, out / CHECKPOINT_DIR / "best.pt")
            save_checkpoint(state, out / CHECKPOINT_DIR / "last.pt")
            log.write(record)
            bar.end_epoch(_fmt(record))
    finally:
        bar.close()
        log.close()

    return evaluate_run(out, cfg=cfg, method=method, model=model, data=data, device=device)


def _batch_images(batch: Any) -> int:
    x = batch[0]
    if isinstance(x, (list, tuple)):
        return sum(v.shape[0] for v in x)
    return int(x.shape[0])


def _read_run_config(out: Path) -> dict[str, Any]:
    import yaml

    path = out / "config.yaml"
    if not path.is_file():
        raise LongtailError(f"{out} is not a run directory: {path} is missing")
    return yaml.safe_load(path.read_text())


def evaluate_run(
    out: str | Path,
    *,
    checkpoint: str = "last",
    split: str = "test",
    cfg: Config | None = None,
    method: Method | None = None,
    model: nn.Module | None = None,
    data: RunData | None = None,
    device: torch.device | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Evaluate a run directory's checkpoint on ``split``; writes ``eval_<split>.json``."""
    out = Path(out)
    if cfg is None:
        cfg = config_from_dict(_read_run_config(out))
    device = device or resolve_device(cfg.train.device)
    if data is None:
        data = RunData.from_config(cfg.data, seed=cfg.seed)
        if split == "val" and data.val_source is None:
            raise UsageError(
                f"{cfg.data.dataset} has no validation split configured (data.val_split)"
            )
    if method is None or model is None:
        method = build_method(cfg)
        model = method.build_model(data).to(device)
        ckpt = load_checkpoint(out / CHECKPOINT_DIR / f"{checkpoint}.pt", map_location=device)
        model.load_state_dict(ckpt["model"])
        method.load_state_dict(ckpt.get("method", {}))
        epoch = ckpt["epoch"] + 1
    else:
        epoch = sum(s.epochs for s in method.stages())
    res, logits, labels = evaluate_split(method, model, data, split, device, cfg.train)
    res = {"split": split, "checkpoint": checkpoint, "epoch": epoch, **res}
    if save:
        atomic_write_bytes(out / f"eval_{split}.json", json.dumps(res, indent=1).encode())
    return res
