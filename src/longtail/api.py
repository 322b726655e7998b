"""The Python API: the functions behind the command line, under stable names.

>>> from longtail import api
>>> from longtail.config import load_config
>>> cfg = load_config("configs/fashion-mnist/demo.yaml")
>>> metrics = api.train(cfg, "runs/demo")  # doctest: +SKIP

Errors are :class:`longtail.errors.LongtailError` subclasses with the same one-line messages
the command line prints.
"""

from __future__ import annotations

from longtail.runs.deploy import export_run, predict_images
from longtail.runs.read import (
    RunInfo,
    check_checkpoint,
    evaluate_run,
    load_method,
    load_run,
    read_run_config,
    read_run_info,
)
from longtail.runs.report import compare_row, format_table, report_run
from longtail.runs.train import train

__all__ = [
    "RunInfo",
    "check_checkpoint",
    "compare_row",
    "evaluate_run",
    "export_run",
    "format_table",
    "load_method",
    "load_run",
    "predict_images",
    "read_run_config",
    "read_run_info",
    "report_run",
    "train",
]
