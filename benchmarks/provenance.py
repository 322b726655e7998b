"""Where a benchmark's numbers came from: the machine, the source commit and the data set."""

from __future__ import annotations

from longtail.provenance import commit, cpu_name, hardware

__all__ = ["commit", "cpu_name", "hardware", "imbalance_ratio"]


def imbalance_ratio(budget: dict) -> str:
    """The imbalance ratio an accuracy run trained at: its ``data.ratio=`` override, else the
    recipes' own 100."""
    overrides = budget.get("overrides", [])
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("data.ratio=")), "100")
