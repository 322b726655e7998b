"""Where a benchmark's numbers came from: the machine, the source commit and the data set."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict:
    """CPU, cores, GPU (or None), torch and Python versions."""
    import torch  # here, so that scripts that only read results need no torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def commit() -> str:
    """The checkout's short commit hash, with ``+`` when it has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("+" if dirty else "")


def imbalance_ratio(budget: dict) -> str:
    """The imbalance ratio an accuracy run trained at: its ``data.ratio=`` override, else the
    recipes' own 100."""
    overrides = budget.get("overrides", [])
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("data.ratio=")), "100")
