"""Where a benchmark's numbers came from: the machine and the source commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


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
