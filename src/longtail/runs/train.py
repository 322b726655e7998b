"""Training a run directory: what ``longtail train`` does.

The config, the data and the model are checked before the directory is created; when
training ends the last epoch is evaluated on the test split and the report is written.
Reading finished runs lives beside it in :mod:`longtail.runs.read`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

from longtail import jsonio
from longtail.build import build_data, build_method, config_key, schedule_warnings, validate
from longtail.config import Config, dump_config
from longtail.data import RunData
from longtail.engine import distributed
from longtail.engine.checkpoint import atomic_write_bytes, load_checkpoint
from longtail.engine.run_dir import RunDir
from longtail.engine.trainer import fit, seed_everything
from longtail.errors import LongtailError, UsageError, shown
from longtail.methods import Method
from longtail.runs.pretrained import pretrained_weights, with_weights_preprocessing
from longtail.runs.read import (
    check_checkpoint,
    check_extension,
    config_device,
    data_summary,
    evaluate_run,
    read_run_config,
    resume_config,
    run_plan,
    skipped_links_warning,
    subsampling_warning,
    summary_lines,
)
from longtail.runs.report import report_run


def warm_start(method: Method) -> None:
    """Give ``method`` the weights of the run its options start from, if any (a classifier
    stage on a finished first stage): the run's own config and last checkpoint."""
    found = method.warm_start_from()
    if found is None:
        return
    key, run_dir = found
    run = RunDir(Path(run_dir).expanduser())
    if not run.started():
        raise UsageError(f"method.{key}: {shown(run_dir)} has no checkpoint; train its first stage")
    with config_key(f"method.{key}"):
        method.warm_start(shown(run_dir), read_run_config(run.path), load_checkpoint(run.last))


def checkpoint_bytes(method: Method) -> int:
    """About how large one checkpoint of ``method`` is: its state and SGD's momentum."""
    state = sum(t.numel() * t.element_size() for t in method.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in method.parameters())
    return state + momentum


def train(
    cfg: Config | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    changes: list[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``run_dir`` and evaluate the last epoch on the test split.

    The config, the data and the model are checked before anything is written: a run that
    fails before its first checkpoint leaves nothing behind, and a directory left by a killed
    one is taken over. With ``resume``, the run's own ``config.yaml`` is used (``cfg`` is
    ignored) and training continues from ``checkpoints/last.pt``.

    Args:
        cfg: The run's config (None with ``resume``).
        run_dir: The run directory.
        resume: Continue the run in ``run_dir``.
        changes: With ``resume``, ``key=value`` changes to the run's config: ``train.epochs``
            to extend it (the epochs still to come follow the schedule of a run of that many
            epochs), and the settings of the machine (``data.root``, ``train.device``, ...).
        progress: Show a progress bar (default: when stderr is a terminal).

    Returns:
        The test metrics of the last epoch (also written to ``eval_test.json``).
    """
    main = distributed.is_main_from_env()  # under torchrun only rank 0 touches the run dir
    run = RunDir(run_dir)
    if main:
        run.check_path()
        run.check_not_in_use()
    cfg, before = _run_config(run, cfg, resume, changes, main)
    device, data, method, plan = _set_up(cfg, resume)
    created = run.missing_ancestor() if main and not resume else None
    try:
        return _train_in(run, cfg, method, data, device, plan, resume, progress, before)
    except BaseException:
        if main and not resume:  # a start that failed before its first checkpoint
            run.undo_failed_start(created)  # leaves nothing behind
        raise


def _run_config(
    run: RunDir, cfg: Config | None, resume: bool, changes: list[str] | None, main: bool
) -> tuple[Config, Config | None]:
    """The config to train (the run's own when resuming, with its allowed changes) and,
    when a resume changes it, the config before."""
    if resume:
        if main:
            run.check_resumable()
        saved = read_run_config(run.path)
        return (resume_config(saved, changes)[0], saved) if changes else (saved, None)
    if cfg is None:
        raise UsageError("a new run needs a config (or resume=True to continue one)")
    cfg = with_weights_preprocessing(validate(cfg))
    if main:
        run.check_new()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.batch_size % world:  # before the processes wait for each other
        raise UsageError(
            f"config key 'train.batch_size': a global batch of {cfg.train.batch_size} does not "
            f"split over {world} processes; use a multiple of {world}"
        )
    return cfg, None


def _set_up(cfg: Config, resume: bool) -> tuple[torch.device, RunData, Method, list[dict]]:
    """Device, data, method and the stages' plan: everything checked before the run
    directory is touched."""
    distributed.setup(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = distributed.local_device(config_device(cfg))
    if cfg.train.sync_bn and device.type != "cuda":
        raise UsageError(
            "config key 'train.sync_bn': PyTorch's SyncBatchNorm runs on CUDA devices only; "
            "set it to false on the CPU"
        )
    seed_everything(cfg.seed)
    weights = False if resume else pretrained_weights(cfg)  # a bad file fails before the data
    data = build_data(cfg)
    if distributed.is_main_from_env():
        data.check_files()  # every split: a corrupt test image is found now, not after training
    data.pin_memory, data.device = device.type == "cuda", device
    method = build_method(cfg, data, device, weights)
    if cfg.train.sync_bn:
        method = distributed.sync_batch_norm(method)
    if cfg.train.compile:  # the module stays as it is (its state_dict keys unchanged)
        method.backbone.forward = torch.compile(method.backbone.forward)
    if not resume:
        warm_start(method)
    # The stages' loaders, built before the run directory: a batch that does not split over
    # the processes, or a training image that does not decode (the fast path decodes them
    # all), stops the run before anything is written.
    with config_key("train.batch_size"):
        plan = run_plan(cfg, method, data)
    return device, data, method, plan


def _train_in(
    run: RunDir,
    cfg: Config,
    method: Method,
    data: RunData,
    device: torch.device,
    plan: list[dict[str, Any]],
    resume: bool,
    progress: bool | None,
    before: Config | None = None,
) -> dict[str, Any]:
    """Write the run directory, train, evaluate and report (see :func:`train`); ``before``:
    the run's config before a resume's changes."""
    main = distributed.is_main()
    with run.locked() if main else contextlib.nullcontext():
        summary = data_summary(cfg, data, plan)
        if main:
            _start_run_dir(run, cfg, data, method, summary, resume)
        distributed.barrier()  # the run directory is ready for every process
        ckpt = _resume_from(run, cfg, method, device, summary, before) if resume else None
        fit(method, data, cfg, run.path, device, ckpt=ckpt, progress=progress)
        res = evaluate_run(run.path, cfg=cfg, method=method, data=data, device=device)
        if cfg.train.report:
            try:
                report_run(
                    run.path, cfg=cfg, method=method, data=data, device=device, evaluation=res
                )
            except LongtailError as e:  # the run itself is saved: say so
                raise LongtailError(
                    f"the run is trained and saved in {shown(run.path)} (checkpoints, "
                    f"eval_test.json), but {e.template}"
                ) from None
        return res


def _start_run_dir(
    run: RunDir, cfg: Config, data: RunData, method: Method, summary: dict, resume: bool
) -> None:
    """Rank 0, under the lock: room for checkpoints, config.yaml and data.json of a new
    run, and what the run will do, said before its first epoch."""
    if resume:
        run.remove_partial_writes()
    else:
        run.check_new()  # again, now that no other process can start it meanwhile
        if run.clear_failed_start():
            print(
                f"{run.path} held a run that stopped before its first checkpoint; "
                "starting it again",
                file=sys.stderr,
            )
    copies = 3 if data.val_source is not None else 2  # last, best, a write in flight
    run.check_writable(copies * checkpoint_bytes(method) + 16 * 2**20)
    if not resume:
        atomic_write_bytes(run.config, dump_config(cfg).encode())
        atomic_write_bytes(run.data_json, jsonio.dumps(summary, indent=1).encode())
    for line in summary_lines(summary):
        print(line)
    warnings = [subsampling_warning(cfg, data), skipped_links_warning(cfg, data)]
    for warning in [*warnings, *schedule_warnings(cfg)]:
        if warning and not resume:
            print(f"warning: {warning}", file=sys.stderr)


def _resume_from(
    run: RunDir,
    cfg: Config,
    method: Method,
    device: torch.device,
    summary: dict,
    before: Config | None,
) -> dict[str, Any]:
    """The run's last checkpoint, checked against the config and loaded into ``method``; a
    resume that changed the config (an extension) rewrites config.yaml and data.json."""
    ckpt = load_checkpoint(run.last, map_location=device)
    extended = before is not None and before.train.epochs != cfg.train.epochs
    if extended:
        assert before is not None
        check_extension(before, cfg, ckpt["epoch"] + 1)
    check_checkpoint(ckpt, cfg, run.last, method, ("train.epochs",) if extended else ())
    if before is not None and distributed.is_main():  # the run's files say what it now is
        atomic_write_bytes(run.config, dump_config(cfg).encode())
        atomic_write_bytes(run.data_json, jsonio.dumps(summary, indent=1).encode())
        if extended:
            print(
                f"extending the run from {before.train.epochs} to {cfg.train.epochs} epochs: "
                f"epochs {ckpt['epoch'] + 2}-{cfg.train.epochs} follow the schedule of a "
                f"{cfg.train.epochs}-epoch run"
            )
    return ckpt
