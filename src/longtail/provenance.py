"""Where numbers came from: the machine, the software and the source commit."""

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
    import torch  # here, so that code that only reads results needs no torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def commit(where: str | Path | None = None) -> str:
    """The short commit hash of the checkout at ``where`` (default: the current folder),
    with ``+`` when it has uncommitted changes; "unknown" outside a git checkout."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=where)
        except OSError:  # no git
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def source_commit() -> str:
    """The commit of the longtail source that is running (its package folder's checkout)."""
    return commit(Path(__file__).resolve().parent)
