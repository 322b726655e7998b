"""A run directory's life: refuse to clobber, allow a rerun after a failed start, one writer.

Layout: ``config.yaml``, ``data.json``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/{last,best}.pt``, ``eval_<split>.json`` and ``.lock``. A run counts as started
once ``checkpoints/last.pt`` exists; a directory that holds only these files and no
checkpoint is what a run that failed before finishing its first epoch leaves behind, and a
new run may take it over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from longtail.errors import LongtailError, UsageError, shown

try:  # POSIX; elsewhere runs go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def images_per_s(records: Iterable[dict[str, Any]]) -> float | None:
    """Training speed over a run's epoch records (``metrics.jsonl``): all the images its
    epochs trained on over all their time, so that a long epoch weighs as long; None
    without a timed epoch."""
    timed = [r for r in records if r.get("images_per_s") and r.get("epoch_time_s")]
    seconds = sum(float(r["epoch_time_s"]) for r in timed)
    if not seconds:
        return None
    return sum(float(r["images_per_s"]) * float(r["epoch_time_s"]) for r in timed) / seconds


CHECKPOINT_DIR = "checkpoints"
LOCK = ".lock"
# What a run writes at its top level; anything else makes the directory someone else's.
RUN_ENTRIES = frozenset(
    {"config.yaml", "data.json", "metrics.jsonl", "tensorboard", CHECKPOINT_DIR, LOCK}
)


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith("eval_") and name.endswith(".json"))


class RunDir:
    """The run directory at ``path`` (which need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # -- the layout: every file a run directory holds is named here, and only here --------
    @property
    def config(self) -> Path:
        """The resolved config the run trains with."""
        return self.path / "config.yaml"

    @property
    def data_json(self) -> Path:
        """Classes, counts, shot groups, the images' preprocessing and the run's plan."""
        return self.path / "data.json"

    @property
    def metrics(self) -> Path:
        """One JSON line per finished epoch."""
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def checkpoint(self, name: str) -> Path:
        """``last`` (the last epoch) or ``best`` (the best validation epoch)."""
        return self.checkpoints / f"{name}.pt"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    def evaluation(self, split: str = "test", checkpoint: str = "last") -> Path:
        """The metrics of a checkpoint on a split: ``eval_test.json`` is the last epoch's."""
        suffix = "" if checkpoint == "last" else f"_{checkpoint}"
        return self.path / f"eval_{split}{suffix}.json"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def predictions(self) -> Path:
        """Where ``predict --out`` may write inside the run."""
        return self.path / "predictions.csv"

    def started(self) -> bool:
        """Whether a run has finished at least one epoch here."""
        return self.last.is_file()

    def check_path(self) -> None:
        """The path must be a directory or nothing; no parent may be a file."""
        for p in (self.path, *self.path.parents):
            if p.exists() and not p.is_dir():
                where = "" if p == self.path else f" (its parent {p} is a file)"
                raise UsageError(
                    f"{{out}} {shown(self.path)} is not a directory{where}; give a folder"
                )
            if p.exists():
                break

    def check_new(self) -> None:
        """A new run may use a missing or empty directory, or one left by a failed start."""
        self.check_path()
        if not self.path.exists():
            return
        if self.started():
            raise UsageError(
                f"run directory {shown(self.path)} already exists; pass {{resume}} to continue "
                "it or "
                "choose another {out}"
            )
        foreign = sorted(p.name for p in self.path.iterdir() if not _is_run_entry(p.name))
        if foreign:
            raise UsageError(
                f"{{out}} {shown(self.path)} is not empty and is not a longtail run (it holds "
                f"{foreign[0]!r}); choose another {{out}}"
            )

    def check_resumable(self) -> None:
        self.check_path()
        if not self.started():
            if self.config.is_file():
                raise UsageError(
                    f"{{resume}}: {shown(self.path)} has no checkpoint (its run stopped before "
                    "the first "
                    "epoch finished); run the same command without {resume}"
                )
            raise UsageError(
                f"{{resume}}: no checkpoint at {shown(self.last)}; start the run without {{resume}}"
            )

    def clear_failed_start(self) -> bool:
        """Remove what a run that never checkpointed left (only our own files); True if any."""
        if not self.path.is_dir() or self.started():
            return False
        removed = False
        for p in self.path.iterdir():
            if not _is_run_entry(p.name) or p.name == LOCK:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed = True
        return removed

    def missing_ancestor(self) -> Path | None:
        """The outermost folder of the path that does not exist yet (None: the run's folder
        exists): what a failed start must remove to leave nothing behind."""
        if self.path.exists():
            return None
        top = self.path
        while not top.parent.exists():
            top = top.parent
        return top

    def undo_failed_start(self, created: Path | None) -> None:
        """After a start that failed before its first checkpoint: remove the run's own files
        (and ``created``, the folders this start made, when nothing else is in them)."""
        if self.started() or not self.path.is_dir():
            return
        self.clear_failed_start()
        (self.path / LOCK).unlink(missing_ok=True)
        if created is None:
            return
        folder = self.path
        while True:
            with contextlib.suppress(OSError):  # not empty: someone else's files, keep them
                folder.rmdir()
            if folder == created or folder.exists():
                break
            folder = folder.parent

    def remove_partial_writes(self) -> None:
        """Delete temporary files of checkpoint writes that a killed process left."""
        folder = self.checkpoints
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)

    def check_not_in_use(self, doing: str | None = None) -> None:
        """Refuse at once if another process holds the lock (see :meth:`locked`).

        Args:
            doing: What the caller would do (``evaluate``, say): the message then says to
                wait for the training to end instead of choosing another run directory.
        """
        lock = self.path / LOCK
        if fcntl is None or not lock.is_file():
            return
        try:
            fd = os.open(lock, os.O_RDWR if doing is None else os.O_RDONLY)
        except OSError:  # a read-only run directory: nobody trains in it
            return
        try:
            if doing is None:
                self._try_lock(fd)
            else:
                try:
                    self._try_lock(fd)
                except UsageError:
                    owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise UsageError(
                        f"run directory {shown(self.path)} is being trained by another longtail "
                        f"process (pid {owner}); {doing} it when its training has ended"
                    ) from None
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _try_lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UsageError(
                f"run directory {shown(self.path)} is in use by another longtail process "
                f"(pid {owner}); wait for it to finish or choose another {{out}}"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Create the directory and hold its lock: a second process on it is refused."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LongtailError(
                f"cannot create run directory {shown(self.path)}: {e.strerror}"
            ) from None
        try:
            if fcntl is not None:
                self._try_lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._lock_fd = fd
            yield
        finally:
            self._lock_fd = None
            os.close(fd)  # releases the lock

    def check_writable(self, need_bytes: int) -> None:
        """Fail now, before any compute, if checkpoints could not be written.

        Writes, syncs and deletes a small file in ``checkpoints/`` (an unwritable or
        read-only directory fails here) and compares ``need_bytes`` with the free space.
        """
        folder = self.checkpoints
        probe = folder / ".write-test.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise LongtailError(
                f"cannot write checkpoints in {shown(folder)}: {e.strerror}; choose another "
                f"{{out}} or "
                "fix its permissions"
            ) from None
        finally:
            probe.unlink(missing_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise LongtailError(
                f"not enough free space for checkpoints in {shown(folder)}: about "
                f"{need_bytes / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free; free some "
                "space or choose another {out}"
            )
