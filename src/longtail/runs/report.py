"""Reports and comparisons of run directories: ``longtail report`` and ``longtail compare``.

Gathers what a run directory holds (config, data summary, per-epoch log, test evaluation)
and, for the embedding plot, runs the trained model on a class-stratified sample of the test
split; the drawing is :mod:`longtail.evaluation.report`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longtail.build import build_data
from longtail.config import Config
from longtail.data import RunData
from longtail.engine import distributed
from longtail.engine.run_dir import RunDir, images_per_s
from longtail.engine.trainer import predict_loader
from longtail.errors import DataError, LongtailError, UsageError, shown
from longtail.evaluation import shot_groups
from longtail.evaluation.report import ReportInput, write_report
from longtail.methods import Method
from longtail.runs.read import config_device, evaluate_run, load_method, read_run_config

# Test images whose features the embedding plot shows (stratified over classes).
EMBEDDING_POINTS = 2000


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut off by a crash is skipped."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "epoch" in rec:
            records.append(rec)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def stratified_sample(labels: np.ndarray, total: int, seed: int = 0) -> np.ndarray:
    """About ``total`` indices of ``labels`` with the same number per class (all of a class
    that has fewer), sorted."""
    classes = np.unique(labels)
    per_class = max(1, math.ceil(total / max(1, len(classes))))
    rng = np.random.default_rng(seed)
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes
    ]  # fmt: skip
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def pca_2d(features: torch.Tensor) -> np.ndarray:
    """The first two principal components of ``features`` (N, D), standardised per dimension.

    Deterministic: each component's sign is fixed so that its largest coordinate is positive.
    """
    x = features.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    coords = x @ vh[:2].T
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    return (coords * signs).numpy()


def embed_test_features(
    method: Method, data: RunData, cfg: Config, device: torch.device, points: int
) -> tuple[np.ndarray, np.ndarray]:
    """2-D PCA coordinates and classes of a stratified sample of the test split."""
    labels = np.asarray(data.test_source.targets)
    indices = stratified_sample(labels, points)
    loader = data.eval_loader("test", 256, cfg.train.test_transform, indices=indices)
    channels_last = cfg.train.channels_last
    feats, ys = predict_loader(method, loader, device, channels_last, method.representation)
    return pca_2d(feats), ys.numpy()


def _summary(
    run_dir: Path, cfg: Config, evaluation: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    wall = sum(float(r.get("epoch_time_s") or 0) for r in history)
    speed = images_per_s(history)
    return {
        "run directory": str(run_dir),
        "method": cfg.method_name,
        "dataset": cfg.data.dataset,
        "imbalance ratio": "-" if cfg.data.ratio is None else f"{cfg.data.ratio:g}",
        "epochs": evaluation.get("epoch"),
        "test top-1": evaluation["top1"],
        "many": evaluation.get("many"),
        "medium": evaluation.get("medium"),
        "few": evaluation.get("few"),
        "ECE": evaluation["ece"],
        "training time (s)": f"{wall:.1f}",
        "images/s (over all epochs)": round(speed) if speed is not None else None,
    }


def report_run(
    run_dir: str | Path,
    *,
    cfg: Config | None = None,
    method: Method | None = None,
    data: RunData | None = None,
    device: torch.device | None = None,
    evaluation: dict[str, Any] | None = None,
    points: int = EMBEDDING_POINTS,
) -> Path | None:
    """Write ``report.html`` and ``plots/*.png`` for run directory ``run_dir``.

    ``cfg``, ``method`` (with the weights to report), ``data``, ``device`` and the test
    ``evaluation`` skip rebuilding what the caller holds. Every process of a distributed run
    calls this (the embedding's forward passes are split over them); rank 0 writes.

    Returns:
        The page's path (None on the other processes).
    """
    run_dir = Path(run_dir)
    cfg = cfg or read_run_config(run_dir)
    device = device or config_device(cfg)
    if data is None:
        try:
            data = build_data(cfg)
        except DataError as e:
            raise DataError(f"the report needs the run's data set: {e.template}") from None
    if method is None:
        method, _ = load_method(run_dir, "last", cfg, data, device)
    if evaluation is None or "reliability" not in evaluation:
        saved = _read_json(RunDir(run_dir).evaluation())
        evaluation = saved if saved and "reliability" in saved else None
    if evaluation is None:
        evaluation = evaluate_run(run_dir, cfg=cfg, method=method, data=data, device=device)
    coords, ys = embed_test_features(method, data, cfg, device, points)
    if not distributed.is_main():
        return None
    history = read_history(run_dir)
    config_path = RunDir(run_dir).config
    counts = data.counts.tolist()
    report = ReportInput(
        title=run_dir.name,
        summary=_summary(run_dir, cfg, evaluation, history),
        classes=data.classes,
        train_counts=counts,
        groups=shot_groups(counts),
        evaluation=evaluation,
        history=history,
        embedding=coords,
        embedding_labels=ys,
        embedding_method=f"PCA, {len(ys)} images",
        config_text=config_path.read_text(encoding="utf-8") if config_path.is_file() else "",
    )
    try:
        return write_report(report, RunDir(run_dir).report, RunDir(run_dir).plots)
    except OSError as e:  # a read-only run directory, a full disk
        raise LongtailError(
            f"cannot write the report in {shown(run_dir)}: {e.strerror or e}; free some space (or "
            f"make the folder writable), then run `longtail report {shown(run_dir)}`"
        ) from None


# -- compare ---------------------------------------------------------------------------------
COMPARE_COLUMNS = (
    "run", "method", "dataset", "ratio", "epochs", "top1", "many", "medium", "few", "ece",
    "wall_time_s",
)  # fmt: skip


def compare_row(run_dir: str | Path) -> dict[str, Any]:
    """One row of ``longtail compare``: the run's settings and its test metrics."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    evaluation = _read_json(RunDir(run_dir).evaluation())
    if evaluation is None or "top1" not in evaluation:
        raise UsageError(
            f"{shown(run_dir)} has no test evaluation (eval_test.json); run `longtail evaluate "
            f"{shown(run_dir)}`"
        )
    history = read_history(run_dir)
    return {
        "run": str(run_dir),
        "method": cfg.method_name,
        "dataset": cfg.data.dataset,
        "ratio": cfg.data.ratio,
        "epochs": evaluation.get("epoch"),
        **{k: evaluation.get(k) for k in ("top1", "many", "medium", "few", "ece")},
        "wall_time_s": round(sum(float(r.get("epoch_time_s") or 0) for r in history), 1),
    }


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """``rows`` as an aligned text table, or a GitHub markdown table."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else str(v)

    table = [list(COMPARE_COLUMNS)] + [[cell(r.get(c)) for c in COMPARE_COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COMPARE_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(COMPARE_COLUMNS))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table
    )
