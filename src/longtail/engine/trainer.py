"""The training loop. It knows epochs, steps, stages, optimizers and checkpoints; the method
supplies its modules, the loaders of its branches and the loss terms of a step.

    fit             stages x epochs: optimizer per stage, evaluation, checkpoint, log
    train_one_epoch steps: lr schedule, forward (the method), backward, optimizer, hooks
    evaluate        a split's logits through ``method.predict`` -> metrics
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from longtail import parallel
from longtail.config import Config, OptimConfig, TrainConfig
from longtail.data import RunData, set_loader_epoch, to_device
from longtail.engine import distributed
from longtail.engine.checkpoint import save_checkpoint
from longtail.engine.logging import RESERVED_KEYS, MetricsLog, ProgressBar, format_record
from longtail.engine.run_dir import RunDir
from longtail.engine.schedules import learning_rate
from longtail.errors import LongtailError, shown
from longtail.evaluation import evaluate_logits
from longtail.methods import Method, Stage

EVAL_KEYS = ("top1", "many", "medium", "few")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when visible, else the CPU; a CUDA device must be visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name!r} but no CUDA device is visible; use cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):  # meta holds no data; others are not supported
        raise ValueError(f"{name!r} is not a device longtail trains on; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name!r} but only {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(method: Method, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the method's parameter groups (:meth:`Method.parameter_groups`);
    each group's ``lr_scale`` multiplies the schedule's lr at every step."""
    groups = [{**g, "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in method.parameter_groups(cfg)]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
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


class StepBatches(Mapping[str, Any]):
    """One step's batches, moved to the device when a method first reads them.

    The engine counts the images of the batches a step actually read, so a branch that a
    method skips (a zero curriculum weight, say) neither travels to the device nor counts.
    """

    def __init__(self, raw: dict[str, Any], device: torch.device, channels_last: bool) -> None:
        self._raw, self._device, self._channels_last = raw, device, channels_last
        self._moved: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._moved:
            self._moved[key] = to_device(self._raw[key], self._device, self._channels_last)
        return self._moved[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def images_read(self) -> int:
        """Images in the batches read so far (every view of a multi-view batch counts)."""
        total = 0
        for batch in self._moved.values():
            x = batch[0]
            total += sum(v.shape[0] for v in x) if isinstance(x, (list, tuple)) else x.shape[0]
        return int(total)


class NonFiniteGuard:
    """Finds the first step whose loss terms were not finite, syncing only when asked.

    Each step's terms stay on the device until :meth:`check`, which the engine calls at its
    logging steps and before every checkpoint: a bad step never reaches a checkpoint, and
    the error names the term, the epoch and the step.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, list[str], Tensor]] = []

    def add(self, step: int, terms: dict[str, Tensor]) -> None:
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        self._pending.append((step, list(terms), values))

    def check(self, epoch: int) -> None:
        """Raise on every process if a step on any of them had a non-finite term."""
        pending, self._pending = self._pending, []
        ok = not pending or bool(torch.isfinite(torch.cat([v for _, _, v in pending])).all())
        if not distributed.any_process(not ok):
            return
        for step, names, values in pending:
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise LongtailError(
                    f"loss term {names[i]!r} became {float(values[i])} at epoch {epoch + 1} "
                    f"step {step + 1}; training stopped, its last checkpoint (if any) kept; lower "
                    "optim.lr or check the data"
                )
        raise LongtailError(
            f"a loss term of another process became non-finite in epoch {epoch + 1}; training "
            "stopped and the last checkpoint is kept"
        )


@dataclass
class Tally:
    """What an epoch has summed so far: its loss terms, images read and steps skipped."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    images: int = 0
    skipped: int = 0

    @classmethod
    def carried(cls, carry: dict[str, Any]) -> Tally:
        """The tally a preempted epoch saved (:meth:`carry`)."""
        sums = {k: torch.tensor(v) for k, v in carry.get("sums", {}).items()}
        return cls(sums, carry.get("images", 0), carry.get("skipped", 0))

    def carry(self, step: int, steps: int) -> dict[str, Any]:
        """The epoch so far, to continue it after ``step`` steps of ``steps``."""
        sums = {k: float(v) for k, v in self.sums.items()}
        return {"step": step, "steps": steps, "sums": sums, "images": self.images,
                "skipped": self.skipped}  # fmt: skip

    def add(self, terms: dict[str, Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()

    def record(self, steps: int, skip: bool, lr: float, elapsed: float) -> dict[str, Any]:
        """The epoch's line: mean terms over its computed steps (over all processes)."""
        done = steps - self.skipped
        means = distributed.mean_over_processes({k: float(v) / done for k, v in self.sums.items()})
        images = int(distributed.sum_over_processes({"images": self.images})["images"])
        return {
            "lr": lr,
            **{f"train/{k}": v for k, v in means.items()},
            "steps": steps,
            **({"skipped_steps": self.skipped} if skip else {}),
            "epoch_time_s": elapsed,
            "images_per_s": images / max(elapsed, 1e-9),
        }


def _train_step(
    method: Method,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: StepBatches,
    epoch: int,
    amp: Any,
    skip: bool,
) -> dict[str, Tensor] | None:
    """Forward, backward, optimizer step and the method's after-step hook; None when the
    terms were not finite and ``skip`` drops such steps (BatchNorm statistics restored)."""
    saved = [b.detach().clone() for b in method.buffers()] if skip else []
    with amp:
        terms = model(batches, epoch)
    if skip and distributed.any_process(
        not all(bool(torch.isfinite(v.detach()).all()) for v in terms.values())
    ):
        with torch.no_grad():  # the forward pass moved BatchNorm statistics: undo that
            for b, old in zip(method.buffers(), saved, strict=True):
                b.copy_(old)
        return None
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    method.after_optimizer_step()
    return terms


def train_one_epoch(
    method: Method,
    model: nn.Module,
    loaders: dict[str, DataLoader],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[float], float],
    epoch: int,
    device: torch.device,
    train_cfg: TrainConfig,
    bar: ProgressBar,
    carry: dict[str, Any] | None = None,
    stop: Callable[[int], bool] | None = None,
) -> dict[str, Any]:
    """One pass over the shortest of ``loaders``; returns the epoch's record (no evaluation),
    or, when ``stop(step)`` turns true after a step, ``{"preempted": {...}}``: the steps done and
    the sums so far, from which ``carry`` continues the epoch exactly.

    Args:
        method: The method, on ``device``.
        model: What computes the step: the method, or it inside DistributedDataParallel.
        loaders: The stage's named loaders, re-seeded here for ``epoch``.
        optimizer: The stage's optimizer; each group's lr is ``lr_at`` times its lr_scale.
        lr_at: Learning rate at a fraction of this epoch (0 at its first step).
        epoch: Global 0-based epoch.
        device: Training device.
        train_cfg: The config's ``train`` section.
        bar: Progress display.
        carry: A preempted epoch's state: its first ``step`` steps are skipped (their batches
            drawn, not computed) and its tally continues.
        stop: Asked after every step whether to stop the epoch there (SIGTERM).
    """
    for loader in loaders.values():
        set_loader_epoch(loader, epoch)
    steps = min(len(loader) for loader in loaders.values())
    method.train()
    use_amp = train_cfg.amp and device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else nullcontext()
    guard, skip = NonFiniteGuard(), train_cfg.nonfinite == "skip"
    tally, first = Tally.carried(carry or {}), (carry or {}).get("step", 0)
    lr, t0 = float("nan"), time.perf_counter()
    for step, batch in enumerate(zip(*loaders.values(), strict=False)):
        if step < first:  # done before the preemption: the batch is drawn, not computed
            bar.advance("")
            continue
        lr = lr_at(step / steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        batches = StepBatches(
            dict(zip(loaders, batch, strict=True)), device, train_cfg.channels_last
        )
        method.step_in_epoch = step
        terms = _train_step(method, model, optimizer, batches, epoch, amp, skip)
        tally.images += batches.images_read()
        if terms is None:
            tally.skipped += 1
            bar.advance("skipped a non-finite step")
            continue
        guard.add(step, terms)
        tally.add(terms)
        logged = step % train_cfg.log_every == 0 or step == steps - 1
        if logged:
            guard.check(epoch)
        bar.advance(f"loss {float(terms['loss'].detach()):.4f}" if logged else "")
        if stop is not None and step < steps - 1 and stop(step):
            guard.check(epoch)
            return {"preempted": tally.carry(step + 1, steps)}
    guard.check(epoch)
    if tally.skipped == steps:
        raise LongtailError(
            f"every step of epoch {epoch + 1} had a non-finite loss and was skipped; training "
            "stopped and the last checkpoint is kept; lower optim.lr or check the data"
        )
    return tally.record(steps, skip, lr, time.perf_counter() - t0)


@torch.no_grad()
def predict_loader(
    method: Method,
    loader: Iterable,
    device: torch.device,
    channels_last: bool = False,
    fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``fn`` (default ``method.predict``) over a whole evaluation loader, in eval mode;
    returns the stacked outputs and the labels.

    The random state is put back afterwards (a loader draws a seed when it starts), so
    evaluating during training never changes what training does next.
    """
    fn = fn or method.predict
    was_training = method.training
    method.eval()
    outputs, labels, where = [], [], []
    positions = torch.as_tensor(loader.dataset.indices)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for x, y, j in loader:
            outputs.append(fn(to_device(x, device, channels_last)).float().cpu())
            labels.append(y)
            where.append(positions[j])
    method.train(was_training)
    parts = distributed.gather_objects((torch.cat(outputs), torch.cat(labels), torch.cat(where)))
    # Each process predicted every world_size-th image: put the split back in its order.
    order = torch.cat([p[2] for p in parts]).argsort()
    return torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order]


def _collector(
    method: Method, data: RunData, device: torch.device, train_cfg: TrainConfig
) -> Callable[[str, Callable[[Tensor], Tensor]], tuple[Tensor, Tensor]]:
    """``collect(split, fn)`` for :meth:`Method.calibrate`."""

    def collect(split: str, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        loader = data.eval_loader(split, 256, train_cfg.test_transform)
        return predict_loader(method, loader, device, train_cfg.channels_last, fn)

    return collect


def evaluate(
    method: Method,
    data: RunData,
    split: str,
    device: torch.device,
    train_cfg: TrainConfig,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of ``split`` with the run's test transform and memory format."""
    loader = data.eval_loader(split, batch_size, train_cfg.test_transform)
    logits, labels = predict_loader(method, loader, device, train_cfg.channels_last)
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad:
        raise Diverged(
            f"the model's predictions are not finite for {bad} of the {len(logits)} {split} "
            "images: training diverged; lower optim.lr (or add optim.warmup_epochs) and train "
            "again"
        )
    return evaluate_logits(logits, labels, data.counts.tolist())


class Diverged(LongtailError):
    """The model's outputs stopped being numbers."""


class Preempted(LongtailError):
    """Training stopped at a SIGTERM (what a cluster's scheduler sends before it kills a
    job), with a checkpoint that continues the epoch where it stopped."""

    exit_code = 143  # 128 + SIGTERM, what the shell reports for a job ended by it


@contextlib.contextmanager
def preemption(every: int = 1) -> Iterator[Callable[[int], bool]]:
    """While training: SIGTERM only asks to stop after the current step. Yields
    ``stop(step)``, true once the process has been asked; under torchrun it asks the others
    (a collective) only every ``every`` steps, so that all stop at the same step without a
    collective per step."""
    asked = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        asked["stop"] = True

    def stop(step: int) -> bool:
        if not parallel.is_distributed():
            return asked["stop"]
        return step % every == 0 and distributed.any_process(asked["stop"])

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _evaluate_epoch(
    method: Method,
    data: RunData,
    split: str,
    device: torch.device,
    train_cfg: TrainConfig,
    epoch: int,
) -> dict[str, Any]:
    """:func:`evaluate` during training: a divergence names its epoch."""
    try:
        return evaluate(method, data, split, device, train_cfg)
    except Diverged as e:
        raise Diverged(
            f"epoch {epoch + 1}: {e.template}; the last checkpoint (epoch {epoch}) is kept"
        ) from None


def _check_finite(method: Method, epoch: int) -> None:
    """Raise Diverged if a weight or buffer of the method is not finite after ``epoch``."""
    floats = [t for t in method.state_dict().values() if t.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        bad = next(k for k, t in method.state_dict().items()
                   if t.is_floating_point() and not bool(torch.isfinite(t).all()))  # fmt: skip
        raise Diverged(
            f"epoch {epoch + 1}: the model's {bad} is not finite: training diverged; the last "
            f"checkpoint (epoch {epoch}) is kept; lower optim.lr (or add optim.warmup_epochs)"
        )


def _restore(method: Method, ckpt: dict[str, Any]) -> None:
    method.load_state_dict(ckpt["model"])
    torch.set_rng_state(ckpt["torch_rng"].cpu())


def _save(state: dict[str, Any], path: Path) -> None:
    try:
        save_checkpoint(state, path)
    except OSError as e:
        raise LongtailError(
            f"cannot write {shown(path)}: {e.strerror or e}; the previous checkpoint is kept: free "
            "some space (or fix the folder), then continue with {resume}"
        ) from None


def fit(
    method: Method,
    data: RunData,
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    *,
    ckpt: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> None:
    """Train ``method`` through all its stages, checkpointing ``run_dir`` after every epoch.

    Args:
        method: A set-up method on ``device``.
        data: The run's data.
        cfg: The validated config.
        run_dir: The run directory (exists; checkpoints and metrics go here).
        device: Training device.
        ckpt: A checkpoint to continue from, whose weights ``method`` already holds (as
            :func:`longtail.runs.read.check_checkpoint` leaves them); its epoch is the last finished
            one (with ``partial``, the epoch after it continues where a SIGTERM stopped it).
        progress: Show a progress bar (default: when stderr is a terminal).
    """
    Trainer(method, data, cfg, run_dir, device, ckpt, progress).run()


class Trainer:
    """The loop of :func:`fit`: stages and epochs, each epoch trained, recorded, evaluated
    where asked, checked and checkpointed; rank 0 alone writes."""

    def __init__(
        self,
        method: Method,
        data: RunData,
        cfg: Config,
        run_dir: Path,
        device: torch.device,
        ckpt: dict[str, Any] | None,
        progress: bool | None,
    ) -> None:
        self.method, self.data, self.cfg, self.run_dir, self.device = (
            method,
            data,
            cfg,
            run_dir,
            device,
        )
        self.ckpt = ckpt
        self.stages = method.stages()
        self.total = sum(s.epochs for s in self.stages)
        self.start, self.best = 0, None
        if ckpt is not None:  # its weights are the method's already (checked and loaded)
            torch.set_rng_state(ckpt["torch_rng"].cpu())
            self.start, self.best = ckpt["epoch"] + 1, ckpt.get("best")
        self.main = distributed.is_main()
        self.log = MetricsLog(run_dir) if self.main else None
        if self.log is not None and ckpt is not None:
            self.log.repair(ckpt.get("record"), ckpt["epoch"] + 1)
        self.bar = ProgressBar(progress if self.main else False, quiet=not self.main)
        self.stage_idx, self.optimizer, self.optim_cfg = -1, None, cfg.optim
        self.loaders: dict[str, DataLoader] = {}
        self.model: nn.Module = method

    def run(self) -> None:
        with preemption(self.cfg.train.log_every) as stop, contextlib.ExitStack() as closing:
            closing.callback(self.bar.close)
            if self.log is not None:
                closing.callback(self.log.close)
            for epoch in range(self.start, self.total):
                idx, stage, stage_epoch = locate_stage(self.stages, epoch)
                if idx != self.stage_idx:
                    self.enter_stage(idx, stage)
                stats = self.train_epoch(epoch, stage, stage_epoch, stop)
                if "preempted" in stats:
                    self.preempted(epoch, idx, stats["preempted"])
                self.end_epoch(epoch, idx, stage, stats)

    def enter_stage(self, idx: int, stage: Stage) -> None:
        """The stage's start hook, optimizer and loaders (restored when resuming in it)."""
        method, ckpt = self.method, self.ckpt
        method.on_stage_start(stage)
        resuming_here = ckpt is not None and ckpt["stage"] == idx
        if resuming_here:  # undo what starting the stage re-initialised
            _restore(method, ckpt)  # type: ignore[arg-type]
        self.optim_cfg = self.cfg.optim.model_copy(update=dict(stage.optim))
        self.optimizer = build_optimizer(method, self.optim_cfg)
        if resuming_here:
            self.optimizer.load_state_dict(ckpt["optimizer"])  # type: ignore[index]
        self.loaders = method.loaders(self.data, stage)
        self.model = distributed.wrap(method, self.device)
        self.stage_idx = idx

    def train_epoch(
        self, epoch: int, stage: Stage, stage_epoch: int, stop: Callable[[int], bool]
    ) -> dict[str, Any]:
        method, ckpt = self.method, self.ckpt
        method.on_epoch_start(epoch)
        carry = ckpt.get("partial") if ckpt is not None and epoch == self.start else None
        if carry is not None:  # continue the epoch as it was when it stopped
            method.load_epoch_state(carry["method"])
            torch.set_rng_state(ckpt["torch_rng"].cpu())  # type: ignore[index]
        steps = min(len(x) for x in self.loaders.values())
        self.bar.start_epoch(epoch + 1, self.total, steps)
        optim_cfg, n = self.optim_cfg, stage.epochs
        assert self.optimizer is not None
        return train_one_epoch(
            method, self.model, self.loaders, self.optimizer,
            lambda f: learning_rate(optim_cfg, stage_epoch + f, n),
            epoch, self.device, self.cfg.train, self.bar, carry, stop,
        )  # fmt: skip

    def state(self, epoch: int, idx: int, record: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (0-based): weights, optimizer, random state, the
        best validation epoch, the config and the epoch's metrics line."""
        assert self.optimizer is not None
        return {
            "record": record,  # the epoch's metrics line: one record with the weights
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "stage": idx,
            "torch_rng": torch.get_rng_state(),
            "best": self.best,
            "config": self.cfg.model_dump(mode="json"),
        }

    def preempted(self, epoch: int, idx: int, carry: dict[str, Any]) -> None:
        """Save the epoch in progress (as of the SIGTERM) and stop."""
        state = self.state(epoch - 1, idx, None)  # the last whole epoch; then the partial one
        state["partial"] = {**carry, "epoch": epoch, "method": self.method.epoch_state()}
        if self.main:
            _save(state, RunDir(self.run_dir).last)
        distributed.barrier()
        shown_dir = shown(self.run_dir)
        raise Preempted(
            f"stopped by SIGTERM in epoch {epoch + 1} after step {carry['step']} of "
            f"{carry['steps']}; saved in {shown_dir}: continue with "
            f"`longtail train --out {shown_dir} --resume`"
        )

    def end_epoch(self, epoch: int, idx: int, stage: Stage, stats: dict[str, Any]) -> None:
        """Record, evaluate where asked, check and checkpoint the epoch just trained."""
        record = self.record(epoch, stage, stats)
        every, last = self.cfg.train.eval_every, epoch == self.total - 1
        if self.data.test_source is not None and not last and every and (epoch + 1) % every == 0:
            res = _evaluate_epoch(
                self.method, self.data, "test", self.device, self.cfg.train, epoch
            )
            record.update({f"test/{k}": res[k] for k in EVAL_KEYS})
        _check_finite(self.method, epoch)  # a diverged model never reaches a checkpoint
        state = self.state(epoch, idx, record)
        if self.data.val_source is not None:
            res = self.evaluate("val", epoch)
            record.update({f"val/{k}": res[k] for k in EVAL_KEYS})
            if self.best is None or res["top1"] > self.best["top1"]:
                self.best = state["best"] = {"epoch": epoch + 1, "top1": res["top1"]}
                if self.main:
                    _save(state, RunDir(self.run_dir).best)
        if self.main:
            _save(state, RunDir(self.run_dir).last)
            assert self.log is not None
            self.log.write(record)
            self.bar.end_epoch(format_record(record))
            for w in record.get("warnings", []):
                self.bar.end_epoch(f"warning: epoch {epoch + 1}: {w}")
        distributed.barrier()  # the others wait until the epoch is saved

    def evaluate(self, split: str, epoch: int) -> dict[str, Any]:
        return _evaluate_epoch(self.method, self.data, split, self.device, self.cfg.train, epoch)

    def record(self, epoch: int, stage: Stage, stats: dict[str, Any]) -> dict[str, Any]:
        """The epoch's line of metrics.jsonl: the method's scalars, then the engine's."""
        method = self.method
        scalars = method.scalars()
        if epoch == self.total - 1:
            collect = _collector(method, self.data, self.device, self.cfg.train)
            scalars.update(method.calibrate(collect))
        clash = RESERVED_KEYS.intersection(scalars)
        if clash:
            raise ValueError(f"{type(method).__name__}.scalars() uses reserved keys {clash}")
        record = {"epoch": epoch + 1, "epochs": self.total, "stage": stage.name, **scalars, **stats}
        warnings = method.warnings()
        if warnings:
            record["warnings"] = warnings
        return record
