"""The ``longtail`` command line.

Errors caused by input (a ``LongtailError``) print one line on stderr and exit with the
error's code (2 for usage errors); they never show a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from longtail import jsonio
from longtail.build import build_data, scale_epochs
from longtail.config import Config, DataConfig, format_validation_error, load_config
from longtail.data import (
    DATASETS,
    DOWNLOADABLE,
    PROFILES,
    dataset_for_path,
    default_root,
    load_source,
)
from longtail.data import download as download_dataset
from longtail.engine import distributed
from longtail.engine.run_dir import RunDir
from longtail.engine.trainer import Preempted
from longtail.errors import DataError, LongtailError, UsageError, shown
from longtail.evaluation import shot_groups
from longtail.methods import METHODS
from longtail.runs.deploy import (
    EXPORT_FORMATS,
    check_output,
    export_run,
    predict_images,
    write_predictions_csv,
)
from longtail.runs.read import evaluate_run, skipped_links_warning
from longtail.runs.report import compare_row, format_table, report_run
from longtail.runs.train import train as run_training
from longtail.studies import (
    WORKER_OF_RUN,
    Stopped,
    StudyPlace,
    check_unchanged,
    load_study,
    open_studies,
    progress,
    run_workers,
    status_lines,
    work,
    write_report,
)


class Interrupted(LongtailError):
    """Ctrl-C (or SIGINT) during training; what was saved is kept."""

    exit_code = 130


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Long-tailed image classification: hybrid contrastive networks and baselines.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and fetch datasets.")
app.add_typer(data_app, name="data")
study_app = typer.Typer(
    no_args_is_help=True,
    help="Studies: several recipes x seeds x searched options on one data set, in Optuna's "
    "storage, worked through by one or many workers.",
)
app.add_typer(study_app, name="study")


def _print_json(obj: Any) -> None:
    sys.stdout.write(jsonio.dumps(obj, indent=1) + "\n")


def _default_out(name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... so an earlier run is never overwritten."""
    base = Path("runs") / name
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="key=value override, e.g. optim.lr=0.05")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<name>)")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run in --out from its checkpoint")
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="train this many epochs with the recipe's schedule scaled to them (lr "
            "milestones, warm-up, DRW/DRS switches, classifier stage)"
        ),
    ] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="default: on a terminal")
    ] = None,
) -> None:
    """Train a recipe; the last epoch is evaluated on the test split."""
    if resume and out is None:
        raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    if resume and config is not None:
        raise UsageError(
            "--resume continues the run with its own config.yaml; leave out --config (extend "
            "the run with --set train.epochs=N)"
        )
    if resume and epochs is not None:
        raise UsageError("--epochs scales a new run's recipe; extend a run with --resume "
                         "--set train.epochs=N")  # fmt: skip
    cfg = None if resume else load_config(config, overrides or [])
    if cfg is not None and epochs is not None:
        full = cfg.train.epochs
        cfg, changed = scale_epochs(cfg, epochs)
        print(f"schedule scaled from {full} to {epochs} epochs: {'; '.join(changed) or 'as is'}")
    if cfg is not None:
        out = out or _default_out(cfg.name)
    assert out is not None
    try:
        res = run_training(
            cfg, out, resume=resume, changes=overrides if resume else None, progress=progress
        )
    except KeyboardInterrupt:
        if RunDir(out).started():
            raise Interrupted(
                f"interrupted; the last finished epoch is saved in {shown(out)}: continue with "
                f"`longtail train --out {shown(out)} --resume`"
            ) from None
        raise Interrupted(
            "interrupted before the first epoch finished; nothing to resume: run the same "
            "command again"
        ) from None
    if distributed.is_main_from_env():  # under torchrun, rank 0 reports
        groups = "  ".join(
            f"{g} {res[g]:.4f}" for g in ("many", "medium", "few") if res[g] is not None
        )
        print(f"test top-1 {res['top1']:.4f}  {groups}  (epoch {res['epoch']})")
        print(f"run directory: {out}")
        if RunDir(out).report.is_file():
            print(f"report: {RunDir(out).report}")
    distributed.exit_process(0)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a directory written by `longtail train`")],
    as_json: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
    checkpoint: Annotated[str, typer.Option(help="last, or best (validation split only)")] = "last",
    split: Annotated[str, typer.Option(help="test or val")] = "test",
) -> None:
    """Evaluate a run's checkpoint: top-1, many/medium/few, per-class accuracy, ECE."""
    if checkpoint not in ("last", "best"):
        raise UsageError(f"--checkpoint {checkpoint!r}: use last or best")
    if split not in ("test", "val"):
        raise UsageError(f"--split {split!r}: use test or val")
    _check_run_dir(run_dir)
    res = evaluate_run(run_dir, checkpoint=checkpoint, split=split)
    if as_json:
        _print_json({k: v for k, v in res.items() if k != "confusion"})
        return
    print(f"{split} ({checkpoint}, epoch {res['epoch']}): top-1 {res['top1']:.4f}")
    for g in ("many", "medium", "few"):
        if res[g] is not None:
            print(f"  {g:<6} {res[g]:.4f}")
    print(f"  ECE    {res['ece']:.4f}")
    print(_per_class_table(res["classes"], res["train_counts"], res["per_class"], "test accuracy"))


def _per_class_table(
    classes: list[str], counts: list[int], values: list[float] | None, what: str
) -> str:
    """Classes head to tail: name, training images and (optionally) a value per class."""
    order = sorted(range(len(classes)), key=lambda c: (-counts[c], c))
    width = max(len("class"), *(len(c) for c in classes))
    head = f"  {'class':<{width}}  {'train':>7}" + (f"  {what}" if values is not None else "")
    lines = [head]
    for c in order:
        line = f"  {classes[c]:<{width}}  {counts[c]:>7}"
        if values is not None:
            line += f"  {values[c]:.4f}"
        lines.append(line)
    return "\n".join(lines)


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the registered methods."""
    rows = [
        {"name": n, **{k: METHODS.meta(n)[k] for k in ("description", "paper")}}
        for n in METHODS.names()
    ]
    if as_json:
        _print_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['description']}")


def _stats_data_config(
    dataset: str, root: Path | None, ratio: float | None, profile: str, n_max: int | None
) -> DataConfig:
    """The data section that ``data stats`` reads, from its flags (checked before any file)."""
    if ratio is not None and not ratio >= 1:
        raise UsageError(f"--ratio must be >= 1 (n_max / n_min; 1 is balanced); got {ratio}")
    if profile not in PROFILES:
        raise UsageError(f"--profile {profile!r}: use one of {', '.join(PROFILES)}")
    if n_max is not None and n_max < 1:
        raise UsageError(f"--n-max must be a positive number of images, got {n_max}")
    if n_max is not None and ratio is None:
        raise UsageError("--n-max needs --ratio (it sets the head of the long-tail profile)")
    if dataset in DATASETS:
        where: dict[str, Any] = {"dataset": dataset, "root": str(root) if root else None}
    elif Path(dataset).exists():
        where = dataset_for_path(dataset, root)
    else:
        raise UsageError(
            f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS.names())} "
            "or the path of an image folder, list file or JSON annotation file"
        )
    try:
        return DataConfig(**where, ratio=ratio, profile=profile, n_max=n_max)
    except ValidationError as e:
        raise UsageError(format_validation_error(e)) from None


@data_app.command("stats")
def data_stats(
    dataset: Annotated[str, typer.Argument(help="cifar10, cifar100, fashion-mnist, or a path")],
    ratio: Annotated[float | None, typer.Option(help="imbalance ratio n_max/n_min")] = None,
    profile: Annotated[str, typer.Option(help="exp or step")] = "exp",
    n_max: Annotated[
        int | None, typer.Option(help="images of the largest class (default: all it has)")
    ] = None,
    root: Annotated[Path | None, typer.Option(help="dataset folder")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Class counts and many/medium/few groups of the long-tailed training set."""
    data_cfg = _stats_data_config(dataset, root, ratio, profile, n_max)
    cfg = Config(data=data_cfg)
    data = build_data(cfg, need_test=False, check_classes=False)
    counts = data.counts.tolist()
    stats = {
        "num_classes": data.num_classes,
        "classes": data.classes,
        "counts": counts,
        "total": int(sum(counts)),
        "groups": shot_groups(counts),
        "skipped_links": data.train_source.skipped,
    }
    skipped = skipped_links_warning(cfg, data)
    if skipped:
        print(f"warning: {skipped}", file=sys.stderr)
    if as_json:
        _print_json(stats)
        return
    print(f"{dataset}: {stats['num_classes']} classes, {stats['total']} training images")
    print(f"  largest {max(counts)}, smallest {min(counts)}")
    for g, members in stats["groups"].items():
        print(f"  {g:<6} {len(members)} classes")
    print(_per_class_table(data.classes, counts, None, ""))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a directory written by `longtail train`")],
) -> None:
    """Write report.html and plots/ for a run (training writes them too, at the end)."""
    _check_run_dir(run_dir)
    page = report_run(run_dir)
    print(f"report: {page}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories")],
    markdown: Annotated[bool, typer.Option("--markdown", help="a markdown table")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One table of runs: method, data, epochs, top-1, many/medium/few, ECE, wall time."""
    for d in run_dirs:
        _check_run_dir(d)
    rows = [compare_row(d) for d in run_dirs]
    if as_json:
        _print_json(rows)
        return
    print(format_table(rows, markdown=markdown))


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a directory written by `longtail train`")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
    out: Annotated[Path | None, typer.Option(help="write a CSV here instead of printing")] = None,
    top_k: Annotated[int, typer.Option(help="most probable classes to list")] = 5,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out file")] = False,
) -> None:
    """Classify images with a trained run (its evaluation preprocessing)."""
    _check_run_dir(run_dir)
    if out is not None:  # before any work: never over a run's files, nothing else unasked
        check_output(out, run_dir, [RunDir(run_dir).predictions], force)
    rows = predict_images(run_dir, images, top_k=top_k)
    if out is not None:
        write_predictions_csv(rows, out, run_dir, force=force)
        print(f"{len(rows)} predictions written to {out}")
    elif as_json:
        _print_json(rows)
    else:
        for r in rows:
            others = ", ".join(f"{n} {q:.3f}" for n, q in r["top"][1:])
            print(f"{r['path']}\t{r['class']}\t{r['probability']:.4f}\t{others}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a directory written by `longtail train`")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="model file (default RUN_DIR/export/)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out file")] = False,
) -> None:
    """Export a run's model with its class names and preprocessing (a .json beside it)."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    _check_run_dir(run_dir)
    path = export_run(run_dir, fmt, out, force=force)
    print(f"model: {path}\nclasses and preprocessing: {path.with_name(path.name + '.json')}")


def _check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{shown(run_dir)} is a file, not a run directory; give the run's folder")
    if not run_dir.is_dir():
        raise UsageError(f"run directory {shown(run_dir)} does not exist")


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="fashion-mnist, cifar10 or cifar100")],
    root: Annotated[
        Path | None, typer.Option(help="where to put it (default: the dataset's default root)")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="only check that it is present")] = False,
) -> None:
    """Download a dataset with torchvision unless it is already present (needs internet)."""
    if dataset not in DOWNLOADABLE:
        raise UsageError(f"cannot download {dataset!r}; valid: {', '.join(DOWNLOADABLE)}")
    where = root or default_root(dataset)
    try:
        load_source(dataset, where, "train")
        print(f"{dataset} is present in {where}")
        return
    except DataError:
        if check:
            raise
    path = download_dataset(dataset, where)
    print(f"{dataset} is in {path}")


StudyFile = Annotated[Path, typer.Argument(help="the study file (YAML)")]
StudyDir = Annotated[
    Path | None, typer.Option("--dir", help="the study folder (default studies/<name>)")
]
Storage = Annotated[
    str | None,
    typer.Option(
        help="database URL of the study (default: sqlite in the study folder), e.g. "
        "postgresql://user@host/db to share it between machines"
    ),
]


NprocPerTrial = Annotated[
    int, typer.Option("--nproc-per-trial", min=1, help="processes per trial (torchrun)")
]


def _place(study: Path, folder: Path | None, storage: str | None) -> StudyPlace:
    spec, base = load_study(study)
    return StudyPlace.of(spec, base, folder, storage)


@contextlib.contextmanager
def _stopping(what: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM in a study command said in one line (with its exit code): each
    running trial was put back by its worker."""
    try:
        yield
    except KeyboardInterrupt as e:
        code = Stopped.exit_code if isinstance(e, Stopped) else 130
        if os.environ.get(WORKER_OF_RUN):  # a worker of `study run`: that command says it
            sys.exit(code)
        how = "stopped by SIGTERM" if isinstance(e, Stopped) else "interrupted"
        stop = Interrupted(
            f"{how}: any trial in training was put back, to continue from its run "
            f"directory; run `longtail study {what}` again to go on"
        )
        stop.exit_code = code
        raise stop from None


@study_app.command("run")
def study_run(
    study: StudyFile,
    folder: StudyDir = None,
    storage: Storage = None,
    workers: Annotated[
        int,
        typer.Option(min=1, help="worker processes on this machine (each its share of the GPUs)"),
    ] = 1,
    nproc: NprocPerTrial = 1,
) -> None:
    """Create the study (every trial enqueued) and work through it; run it again to resume."""
    place = _place(study, folder, storage)
    with _stopping("run"), place.failures():
        check_unchanged(place, open_studies(place))  # created and enqueued once, before
        # the workers start; a file that now trains an entry otherwise refused once, here
        print(f"study {place.spec.name}: {place.folder} ({place.url})")
        run_workers(place, study, workers, nproc)
        for line in status_lines(place):
            print(line)
    print(f"report: longtail study report {study}" + (f" --dir {folder}" if folder else ""))


@study_app.command("worker")
def study_worker(
    study: StudyFile,
    folder: StudyDir = None,
    storage: Storage = None,
    nproc: NprocPerTrial = 1,
) -> None:
    """Claim and train the study's trials until none is left (one per GPU or machine)."""
    place = _place(study, folder, storage)
    with _stopping("worker"), place.failures():
        trained = work(place, nproc, create=False)
    print(f"worker done: {trained} trial(s) trained here")


@study_app.command("status")
def study_status(
    study: StudyFile,
    folder: StudyDir = None,
    storage: Storage = None,
    watch: Annotated[
        float, typer.Option(help="print again every this many seconds until all finish")
    ] = 0.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="one JSON object each time: trials by entry and state, running, failed, "
            "total, finished, left_s",
        ),
    ] = False,
) -> None:
    """Trials done, running, waiting, pruned and failed, with a progress bar."""
    place = _place(study, folder, storage)
    while True:
        with place.failures():
            p = progress(place)
            lines = [] if as_json else status_lines(place, p)
        if as_json:
            print(jsonio.dumps(p), flush=True)
        for line in lines:
            print(line, flush=True)
        if not watch or p["finished"] >= p["total"]:
            return
        time.sleep(watch)


@study_app.command("report")
def study_report(study: StudyFile, folder: StudyDir = None, storage: Storage = None) -> None:
    """Write report.html, report.md, report.json and report-per-class.png from the finished
    trials."""
    place = _place(study, folder, storage)
    with place.failures():
        html_path, md_path = write_report(place)
    print(f"report: {html_path}\nmarkdown: {md_path}\nnumbers: {md_path.with_suffix('.json')}")


def main() -> None:
    """Entry point of the ``longtail`` console script."""
    try:
        code = app(standalone_mode=False, prog_name="longtail")
        if isinstance(code, int) and code:  # Typer turns a Ctrl-C in a command into code 130
            print("interrupted", file=sys.stderr)
            sys.exit(code)
    except LongtailError as e:
        if distributed.is_main_from_env():  # under torchrun, one line: rank 0's
            stop = isinstance(e, (Preempted, Interrupted))  # asked for: not an error
            said = e.for_cli() if stop else f"error: {e.for_cli()}"
            print(said, file=sys.stderr)
        else:  # the others fail alike: let rank 0 say it before torchrun stops everyone
            time.sleep(2)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        if not isinstance(e, _click_exceptions()):
            raise
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "longtail"
        if e.format_message():  # else no arguments: the help was printed, that is all to say
            print(f"error: {e.format_message()} (see {where} --help)", file=sys.stderr)
        sys.exit(e.exit_code)


def _click_exceptions() -> tuple[type[Exception], ...]:
    """ClickException from click, or from the copy that typer >= 0.29 vendors."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).ClickException)
    return tuple(found)


if __name__ == "__main__":
    main()
