"""What a run reports while it trains: metrics.jsonl, TensorBoard, and a progress line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter

from longtail import jsonio
from longtail.engine.checkpoint import atomic_write_bytes
from longtail.engine.run_dir import RunDir

#: Keys of an epoch record that the engine writes itself; a method's scalars must not use them.
RESERVED_KEYS = frozenset(
    {
        "epoch",
        "epochs",
        "stage",
        "lr",
        "epoch_time_s",
        "images_per_s",
        "steps",
        "skipped_steps",
        "warnings",
    }
)


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run = RunDir(run_dir)
        self.path = run.metrics
        self.tb = SummaryWriter(str(run.tensorboard)) if tensorboard else None

    def repair(self, last: dict[str, Any] | None, epoch: int) -> None:
        """Make metrics.jsonl agree with a checkpoint of ``epoch`` (1-based) before a resume.

        The checkpoint is written before the epoch's line, and each carries its line
        (``last``): a kill in between, or during the line's write, left the line missing or
        cut off. Keeps the whole lines of epochs 1..epoch, restores the checkpoint's own line
        where it is missing, and rewrites the file atomically.
        """
        lines: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut off by the kill: it and anything after it go
                if not isinstance(rec, dict) or not 1 <= rec.get("epoch", 0) <= epoch:
                    break
                lines.append(line)
        if last is not None and (not lines or json.loads(lines[-1])["epoch"] < epoch):
            lines.append(jsonio.dumps(last))
        atomic_write_bytes(self.path, "".join(f"{x}\n" for x in lines).encode())

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(jsonio.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self.tb.add_scalar(k, v, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_record(record: dict[str, Any]) -> str:
    """One line per epoch: epoch, lr, the method's scalars, loss terms, accuracies, speed."""
    parts = [f"epoch {record['epoch']}/{record['epochs']}", f"lr {record['lr']:.4g}"]
    for k, v in record.items():
        if k in RESERVED_KEYS or "/" in k or not isinstance(v, (int, float)):
            continue
        parts.append(f"{k} {v:.4g}")
    for k, v in record.items():
        if k.startswith("train/"):
            parts.append(f"{k.removeprefix('train/')} {v:.4f}")
    for k in ("val/top1", "test/top1"):
        if k in record:
            parts.append(f"{k} {record[k]:.4f}")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class ProgressBar:
    """A rich progress bar on a terminal; one plain line per epoch otherwise."""

    def __init__(self, enabled: bool | None, quiet: bool = False) -> None:
        self.quiet = quiet  # print nothing at all (the other processes of a distributed run)
        self.enabled = not quiet and (sys.stderr.isatty() if enabled is None else enabled)
        self.bar: Progress | None = None
        if self.enabled:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self.bar.start()
        self.task: Any = None

    def start_epoch(self, epoch: int, total_epochs: int, steps: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {epoch}/{total_epochs}", total=steps, info="")

    def advance(self, info: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, info=info)

    def end_epoch(self, line: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
