"""Studies: many runs of several recipes over seeds and searched options, on one data set and
one budget, kept in Optuna's storage and worked through by one or many workers."""

from longtail.studies.report import progress, status_lines, summarise, write_report
from longtail.studies.spec import StudySpec, load_study, trial_config
from longtail.studies.store import (
    WORKER_OF_RUN,
    Stopped,
    StudyPlace,
    check_unchanged,
    open_studies,
    run_workers,
    trial_rows,
    work,
)

__all__ = [
    "Stopped",
    "WORKER_OF_RUN",
    "StudyPlace",
    "StudySpec",
    "check_unchanged",
    "load_study",
    "open_studies",
    "progress",
    "run_workers",
    "status_lines",
    "summarise",
    "trial_config",
    "trial_rows",
    "work",
    "write_report",
]
