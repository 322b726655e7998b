"""A study's trials in Optuna's storage, and the workers that train them.

The study lives in Optuna's storage: an SQLite file in the study folder by default, or any
database URL (PostgreSQL) that several machines share. It holds one Optuna study for the
fixed trials (every entry at every seed) and one per searched entry (so that its sampler and
pruner see only that entry's trials). Every trial is enqueued when the study is created; a
worker claims the next waiting one through the storage (one tried before first), trains it as a
``longtail train`` process in its run directory, reports the validation top-1 of each epoch
(a search trial whose value falls under the pruner's bar is stopped), and stores the results
in the trial. A worker records a heartbeat while it trains; a trial whose worker died is
failed by the next worker that looks (after the grace period) and enqueued again, and its
retry continues the run directory from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtail.config import Config, dump_config
from longtail.engine.run_dir import RunDir, images_per_s
from longtail.errors import LongtailError, UsageError, shown
from longtail.provenance import hardware, source_commit
from longtail.runs.read import config_differences
from longtail.studies.spec import Entry, StudySpec, trial_config

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one worker per SQLite study there
    fcntl = None

try:
    import optuna
    from optuna.trial import TrialState
except ImportError:  # pragma: no cover - exercised where optuna is absent
    optuna = None

MAX_RETRY = 3  # times a trial whose worker died is tried again
FIXED = "runs"  # the Optuna study of the fixed trials; searched entries: "search-<entry>"


def _optuna() -> Any:
    if optuna is None:
        raise UsageError("longtail study needs optuna: pip install 'longtail[study]'")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class StudyPlace:
    """Where a study's runs and storage are.

    Attributes:
        spec: The study file.
        base: The folder the study file's recipe paths are relative to.
        folder: The study folder (run directories, logs, the default storage, reports).
        url: The storage's database URL.
    """

    spec: StudySpec
    base: Path
    folder: Path
    url: str

    @classmethod
    def of(cls, spec: StudySpec, base: Path, folder: Path | None, url: str | None) -> StudyPlace:
        folder = Path(folder) if folder is not None else Path("studies") / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        return cls(spec, base, folder, url or f"sqlite:///{(folder / 'study.db').resolve()}")

    def storage(self) -> Any:
        """The RDB storage, with heartbeats and retries of trials whose worker died."""
        opt = _optuna()
        engine = {"connect_args": {"timeout": 60}} if self.url.startswith("sqlite") else {}
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
                warnings.simplefilter("ignore", opt.exceptions.ExperimentalWarning)
                return opt.storages.RDBStorage(
                    self.url,
                    engine_kwargs=engine,
                    heartbeat_interval=max(1, round(self.spec.heartbeat_s)),
                    grace_period=max(1, round(self.spec.grace_s)),
                    heartbeat_stale_trial_callback=_retry(opt),
                )
        except Exception as e:  # sqlalchemy's errors: a bad URL, no server, no driver
            reason = " ".join(str(e).split())[:200]
            raise UsageError(f"cannot open the study storage {self.url}: {reason}") from None

    @contextmanager
    def failures(self) -> Iterator[None]:
        """The storage failing while the block works with it, said in one line.

        Raises:
            LongtailError: For a database error (the server or the file gone, a disk full).
        """
        from sqlalchemy.exc import SQLAlchemyError

        opt = _optuna()
        try:
            yield
        except (opt.exceptions.StorageInternalError, SQLAlchemyError) as e:
            root: BaseException = e
            while root.__cause__ is not None:
                root = root.__cause__
            reason = " ".join(str(getattr(root, "orig", None) or root).split())[:200]
            hint = ""
            if self.url.startswith("sqlite") and "readonly" in reason:
                hint = (" (the SQLite file was replaced or moved under running workers, e.g. by"
                        " `git stash` or `git checkout` of a committed study.db, or is not"
                        " writable)")  # fmt: skip
            raise LongtailError(
                f"the study storage {self.url} failed: {reason}{hint}. Its finished trials are "
                "kept; a trial that was running is retried from its run directory: run the "
                "command again"
            ) from None

    @contextmanager
    def serial(self) -> Iterator[None]:
        """One worker at a time through the block where the storage cannot do it itself.

        Claiming a trial and failing a dead worker's trial are compare-and-sets on the
        trial's state that Optuna makes with SELECT ... FOR UPDATE. SQLite ignores it (and
        pysqlite reads outside the write transaction), so two workers could both fail one
        stale trial, each enqueueing a retry, or both claim one waiting trial. On SQLite the
        block holds an exclusive lock on a file beside the database; a server (PostgreSQL)
        locks the rows.
        """
        from sqlalchemy.engine import make_url

        url = make_url(self.url)
        database = url.database or ""
        if url.query.get("uri") == "true":  # sqlite:///file:PATH?mode=ro&uri=true
            database = database.removeprefix("file:")
        if fcntl is None or url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
            yield
            return
        try:
            lock = open(f"{database}.lock", "a")  # noqa: SIM115 - held across the yield
        except OSError:  # a folder SQLite cannot write in either: the storage says so
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def names(self) -> list[str]:
        """The Optuna studies: the fixed trials first, then one per searched entry."""
        return [f"{self.spec.name}:{FIXED}"] + [
            f"{self.spec.name}:search-{e.name}" for e in self.spec.entries if e.search
        ]

    def run_dir(self, attrs: dict[str, Any]) -> Path:
        return self.folder / "runs" / attrs["entry"] / attrs["run"]


def _retry(opt: Any) -> Any:
    """Optuna's callback that enqueues a copy of a trial whose worker died (its params and
    attributes, so that it continues the same run directory)."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8; its interface is stable
        warnings.simplefilter("ignore")
        return opt.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def _sampler(spec: StudySpec, entry: Entry | None, trial_number: int = 0) -> Any:
    """The entry's sampler, seeded by the study's seed and the trial's number: workers in
    other processes draw other values, and a study draws the same ones on a re-run."""
    opt = _optuna()
    seed = spec.sampler_seed * 100_003 + trial_number
    if spec.sampler == "random" or entry is None:
        return opt.samplers.RandomSampler(seed=seed)
    assert entry.search is not None
    startup = max(2, min(10, entry.search.trials // 3))  # random draws before TPE models
    return opt.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _pruner(spec: StudySpec) -> Any:
    opt = _optuna()
    if spec.pruner == "none":
        return opt.pruners.NopPruner()
    return opt.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.prune_after)


def open_studies(place: StudyPlace, create: bool = True) -> list[Any]:
    """The study's Optuna studies; ``create``: made where missing, every trial the file asks
    for and the storage lacks enqueued.

    Raises:
        UsageError: When ``create`` is False and the storage holds no such study.
    """
    opt = _optuna()
    storage = place.storage()
    studies = []
    entries = [None] + [e for e in place.spec.entries if e.search]
    for name, entry in zip(place.names(), entries, strict=True):
        kw = {
            "storage": storage,
            "study_name": name,
            "sampler": _sampler(place.spec, entry),
            "pruner": _pruner(place.spec),
        }
        if create:
            study = opt.create_study(direction="maximize", load_if_exists=True, **kw)
        else:
            try:
                study = opt.load_study(**kw)
            except KeyError:
                raise UsageError(
                    f"the storage {place.url} holds no study {place.spec.name!r}; start it with "
                    "`longtail study run STUDY.yaml`"
                ) from None
        if create:
            with place.serial():  # two `study run`s at once enqueue each trial once
                _enqueue(place.spec, study, entry)
        studies.append(study)
    return studies


def _enqueue(spec: StudySpec, study: Any, entry: Entry | None) -> None:
    """Enqueue each trial the study file asks for that the storage does not hold, done or on
    its way (so an entry or seed added to the file joins on the next `study run`, and a trial
    that failed is tried again)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    held = {(t.user_attrs.get("entry"), t.user_attrs.get("run"))
            for t in study.get_trials(deepcopy=False, states=states)}  # fmt: skip
    wanted: list[dict[str, Any]] = []
    if entry is None:  # seed by seed: every entry's first seed before any entry's second
        for k in range(max(len(spec.seeds_of(e)) for e in spec.entries)):
            wanted += [{"entry": e.name, "seed": spec.seeds_of(e)[k], "run":
                        f"seed-{spec.seeds_of(e)[k]}", "kind": "fixed"}
                       for e in spec.entries if k < len(spec.seeds_of(e))]  # fmt: skip
    else:
        assert entry.search is not None
        wanted += [{"entry": entry.name, "seed": spec.seeds_of(entry)[0], "run": f"search-{k}",
                    "kind": "search"} for k in range(entry.search.trials)]  # fmt: skip
    for attrs in wanted:
        if (attrs["entry"], attrs["run"]) not in held:
            study.enqueue_trial({}, user_attrs=attrs)


def _suggest(trial: Any, entry: Entry) -> dict[str, Any]:
    """The searched options of a search trial (a retry gets its first try's values back)."""
    if entry.search is None:
        return {}
    params: dict[str, Any] = {}
    for key, p in entry.search.space.items():
        if p.choices is not None:
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.int:
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return params


@contextmanager
def heartbeat(storage: Any, trial: Any, every_s: float) -> Iterator[None]:
    """Record the trial's heartbeat every ``every_s`` seconds while the block runs."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            with contextlib.suppress(Exception):  # a storage hiccup: the next beat tries again
                storage.record_heartbeat(trial._trial_id)

    storage.record_heartbeat(trial._trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _claim(
    studies: list[Any],
    serial: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    known: set[str] | None = None,
) -> tuple[Any, Any] | None:
    """The next waiting trial of the first study that has one, claimed; None if none waits.

    A trial tried before (its worker died, or the study was stopped) comes first: its run
    directory holds the epochs it trained, so it finishes soonest and is not left waiting
    behind every fresh trial (Optuna's queue would take it last, as it enqueues the retry).
    A waiting trial that repeats one running, finished or waiting before it (two retries of
    one stale trial, made by an older version's workers) is closed, not trained twice.

    Args:
        studies: The study's Optuna studies, in the order their trials are claimed.
        serial: The storage's lock (``StudyPlace.serial``), held while a trial is claimed.
        known: The entries this worker's study file has (None: any). A trial of another
            entry, added to the file on another machine or after this worker started, is
            left for a worker that can train it.
    """
    opt = _optuna()
    for study in studies:
        with serial(), warnings.catch_warnings():  # Optuna calls these experimental, and
            warnings.simplefilter("ignore")  # heartbeats meant for Study.optimize: we need both
            opt.storages.fail_stale_trials(study)  # a dead worker's trial: failed, enqueued again
            trials = study.get_trials(deepcopy=False)
            waiting = _close_repeats(study, trials)
            if not waiting:
                continue
            tried = {_key(t) for t in trials if t.state == TrialState.FAIL}
            for t in sorted(waiting, key=lambda t: (_key(t) not in tried, t.number)):
                if known is not None and _key(t)[0] not in known:
                    continue
                try:  # the storage's compare-and-set: False if another worker took it first
                    if not study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                        continue
                except opt.exceptions.UpdateFinishedTrialError:
                    continue
                # A fresh Study object: its samplers' cache of the trials starts empty, as
                # Study.ask would clear it.
                fresh = opt.load_study(study_name=study.study_name, storage=study._storage,
                                       sampler=study.sampler, pruner=study.pruner)  # fmt: skip
                return fresh, opt.Trial(fresh, t._trial_id)
    return None


def _close_repeats(study: Any, trials: list[Any]) -> list[Any]:
    """The waiting trials, less those that repeat an attempt running, finished or waiting
    before them: those are failed with ``duplicate_of`` (the attempt kept), which the
    study's rows leave out."""
    kept: dict[tuple[Any, Any], int] = {}
    waiting = []
    live = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)
    for t in sorted(trials, key=lambda t: t.number):
        if t.state not in live or _key(t)[0] is None:
            continue
        if _key(t) not in kept:
            kept[_key(t)] = t.number
            if t.state == TrialState.WAITING:
                waiting.append(t)
            continue
        if t.state == TrialState.WAITING:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                study._storage.set_trial_user_attr(t._trial_id, "duplicate_of", kept[_key(t)])
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return waiting


def check_unchanged(place: StudyPlace, studies: list[Any]) -> None:
    """Refuse to train on when the study file or a recipe now trains an entry otherwise than
    its trials that ran (a study's table would mix the two): each trial keeps its config,
    compared with the one the files give it now, but for where the data is and how the
    machine runs (``MACHINE_KEYS``).

    Raises:
        UsageError: Naming the entry, the trial and the first setting that changed.
    """
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    names = {e.name for e in place.spec.entries}
    for study in studies:
        for t in study.get_trials(deepcopy=False, states=done):
            attrs = t.user_attrs
            if "config" not in attrs or attrs.get("entry") not in names:
                continue  # an older version's trial, or an entry no longer in the file
            entry = place.spec.entry(attrs["entry"])
            now = trial_config(place.spec, entry, attrs["seed"], attrs.get("params") or {},
                               place.base)  # fmt: skip
            differ = config_differences(attrs["config"], now)
            if differ:
                key, then, given = differ[0]
                raise UsageError(
                    f"study entry {entry.name!r} now trains otherwise than its trial "
                    f"{entry.name}/{attrs['run']} did ({key}: {then!r} then, {given!r} now), "
                    "and its table would mix the two: restore the study file or recipe, or "
                    "give the changed entry a new name (or the study another --dir)"
                )


def _key(trial: Any) -> tuple[Any, Any]:
    return trial.user_attrs.get("entry"), trial.user_attrs.get("run")


def _say_unknown(studies: list[Any], known: set[str], say: Any) -> None:
    """One line on the waiting trials this worker left: entries its study file lacks."""
    names = sorted({str(_key(t)[0]) for s in studies
                    for t in s.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                    if _key(t)[0] is not None and _key(t)[0] not in known})  # fmt: skip
    if names:
        say(f"left waiting: the trials of {', '.join(names)}, which this worker's study file "
            "has no entry for (added since it started, or on another machine): run a "
            "worker with the file that has them")  # fmt: skip


def _running(studies: list[Any]) -> bool:
    return any(s.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) for s in studies)


WORKER_OF_RUN = "LONGTAIL_STUDY_WORKER_OF_RUN"  # set in the workers `study run` starts


class Stopped(KeyboardInterrupt):
    """SIGTERM in a study process: it unwinds as Ctrl-C does (a trial's training is stopped
    and saves where it stands; the trial is put back)."""

    exit_code = 143  # 128 + SIGTERM


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises ``Stopped``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _put_back(place: StudyPlace, study: Any, trial: Any, why: str) -> None:
    """A trial whose worker was stopped (Ctrl-C, SIGTERM): failed and enqueued again now, so
    that the next worker continues it first rather than after the grace period (it would be
    left running until then); its run directory keeps what it trained."""
    opt = _optuna()
    storage = study._storage
    # a storage that fails here (or a trial told just before): the heartbeat's way still holds
    with contextlib.suppress(Exception), place.serial():
        storage.set_trial_user_attr(trial._trial_id, "error", f"stopped by {why}")
        if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            with warnings.catch_warnings():  # "experimental" since Optuna 2.8
                warnings.simplefilter("ignore")
                again = opt.storages.RetryFailedTrialCallback(max_retry=None)
            again(study, storage.get_trial(trial._trial_id))  # a stop is not a crash: no cap


def work(
    place: StudyPlace, nproc: int = 1, poll_s: float = 2.0, say: Any = print, create: bool = True
) -> int:
    """Claim and train trials until none waits and none runs; the number trained.

    Args:
        place: The study.
        nproc: Processes per trial (>1: the trial is a torchrun job on this machine).
        poll_s: Seconds between reads of a running trial's metrics.
        say: Where to write one line per trial.
        create: Create the study and enqueue what its file asks for (``study run``); False for
            a worker that joins a study started elsewhere.
    """
    studies = open_studies(place, create=create)
    check_unchanged(place, studies)
    storage = studies[0]._storage
    known = {e.name for e in place.spec.entries}
    done = 0
    with sigterm_stops():
        while True:
            claimed = _claim(studies, place.serial, known)
            if claimed is None:
                if not _running(studies):
                    _say_unknown(studies, known, say)
                    return done
                time.sleep(place.spec.heartbeat_s)  # another worker's trial: back if it died
                continue
            study, trial = claimed
            try:
                with heartbeat(storage, trial, place.spec.heartbeat_s):
                    state, line = run_trial(place, study, trial, nproc, poll_s)
            except KeyboardInterrupt as e:
                _put_back(place, study, trial, "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C")
                raise
            say(f"trial {trial.user_attrs['entry']}/{trial.user_attrs['run']}: {line}")
            done += state == TrialState.COMPLETE


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by the names CUDA_VISIBLE_DEVICES gives them."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:  # CUDA stops at the first invalid entry ("-1": none)
        names = []
        for name in (g.strip() for g in given.split(",")):
            if not name or name.startswith("-"):
                break
            names.append(name)
        return names
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA build or driver: the CPU
        return []


def gpu_shares(gpus: list[str], workers: int, nproc: int = 1) -> list[list[str] | None]:
    """The GPUs of each of ``workers`` worker processes whose trials run ``nproc`` processes:
    slices of ``nproc`` GPUs, disjoint where there are enough, else taken in turn (several
    small trials share a GPU); None (all of them) where a trial needs more than there are."""
    if not gpus or nproc > len(gpus):
        return [None] * workers
    return [[gpus[(k * nproc + i) % len(gpus)] for i in range(nproc)] for k in range(workers)]


def run_workers(place: StudyPlace, study_file: Path, workers: int, nproc: int = 1) -> None:
    """Work through the study: in this process for one worker, else in ``workers`` processes
    of ``longtail study worker`` on ``study_file`` (this study's file) sharing its storage,
    each given its share of this machine's GPUs (``gpu_shares``) and CPU cores.

    Raises:
        LongtailError: When a worker process fails.
    """
    if workers == 1:
        work(place, nproc)
        return
    cmd = [sys.executable, "-m", "longtail", "study", "worker", str(study_file), "--dir",
           str(place.folder), "--storage", place.url, "--nproc-per-trial", str(nproc)]  # fmt: skip
    procs = []
    # The CPU's cores shared too (torch would give every process all of them): each trial
    # process its share, unless OMP_NUM_THREADS is set already; a trial's train.threads wins.
    threads = str(max(1, len(os.sched_getaffinity(0)) // (workers * nproc)))
    for k, share in enumerate(gpu_shares(visible_gpus(), workers, nproc)):
        env = {"OMP_NUM_THREADS": threads, **os.environ, WORKER_OF_RUN: "1"}
        if share is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(share)
            print(f"worker {k}: GPU {env['CUDA_VISIBLE_DEVICES']}", flush=True)
        # a worker stops with this process, even killed (SIGTERM from the kernel)
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_stop_with_parent))
    try:
        with sigterm_stops():
            codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too; SIGTERM only this process
        for p in procs:
            if p.poll() is None:
                p.terminate()  # each puts its trial back
        for p in procs:
            p.wait()
        raise
    if any(codes):
        raise LongtailError(f"a study worker exited with code {max(codes)}; see its output above")


def _train_command(run_dir: Path, config: Path | None, nproc: int) -> list[str]:
    if nproc > 1:
        start = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={nproc}"]  # fmt: skip
    else:
        start = [sys.executable]
    cmd = [*start, "-m", "longtail", "train", "--out", str(run_dir), "--no-progress"]
    return [*cmd, "--resume"] if config is None else [*cmd, "--config", str(config)]


def _libc_prctl() -> Any:
    with contextlib.suppress(Exception):  # Linux only
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _libc_prctl()  # looked up here: the forked child only calls it


def _stop_with_parent() -> None:
    """In the trial's process, before it runs: SIGTERM when its worker dies (Linux's
    PR_SET_PDEATHSIG), so that a killed worker leaves no training behind; the trainer (or
    torchrun, which passes it on) saves where it stands and exits."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


def _epochs_seen(metrics: Path) -> list[dict[str, Any]]:
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def run_trial(
    place: StudyPlace, study: Any, trial: Any, nproc: int = 1, poll_s: float = 2.0
) -> tuple[Any, str]:
    """Train one claimed trial to its end (or its pruning) and tell the storage."""
    attrs = trial.user_attrs
    entry = place.spec.entry(attrs["entry"])
    study.sampler = _sampler(place.spec, entry if attrs["kind"] == "search" else None,
                             trial.number)  # fmt: skip
    params = _suggest(trial, entry)
    cfg = trial_config(place.spec, entry, attrs["seed"], params, place.base)
    run_dir = place.run_dir(attrs)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    trial.set_user_attr("params", params)
    trial.set_user_attr("config", cfg.model_dump(mode="json"))  # what check_unchanged reads
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    run = RunDir(run_dir)
    t0 = time.time()
    trained = not run.evaluation().is_file()  # else a retry after its training ended
    # A retry continues from the last checkpoint: the epochs before it count in its wall time
    # (metrics.jsonl agrees with that checkpoint once training resumes).
    before = _epochs_seen(run.metrics) if trained and run.started() else []
    if trained:
        prunable = attrs["kind"] == "search"  # the fixed trials are the table
        pruned, code, log = _train(run, cfg, nproc, (study, trial, prunable, poll_s))
        if pruned is not None:
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED, f"pruned after epoch {pruned}"
        if code != 0:
            last = [s for s in log.read_text(encoding="utf-8").splitlines() if s.strip()]
            reason = last[-1] if last else f"exit code {code}"
            trial.set_user_attr("error", reason)
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL, f"failed: {reason} (log: {shown(log)})"
    results = trial_results(run_dir)
    if trained:  # the whole process (start, training, evaluation); else its epochs' time
        # the epochs trained before the retry: their lines are still there as they were (a
        # line the checkpoint restored, after a kill between the two writes, is not counted)
        kept = [r for r in _epochs_seen(run.metrics) if "epoch_time_s" in r and r in before]
        results["wall_s"] = time.time() - t0 + sum(float(r["epoch_time_s"]) for r in kept)
        if kept:
            results["resumed_after_epoch"] = int(kept[-1]["epoch"])
    results["provenance"] = {**hardware(), "commit": source_commit()}
    for key, value in results.items():
        trial.set_user_attr(key, value)
    study.tell(trial, results["val_top1"])
    return TrialState.COMPLETE, (
        f"validation top-1 {results['val_top1']:.4f}, test top-1 {results['top1']:.4f}"
    )


def _train(run: RunDir, cfg: Config, nproc: int, follow: tuple) -> tuple[int | None, int, Path]:
    """Train ``run`` (from ``cfg``, or resumed from its checkpoint) in a `longtail train`
    process that writes its log beside it, following its epochs (``follow``: the arguments of
    ``_follow`` after the process and metrics); the epoch it was pruned at or None, its exit
    code, and the log."""
    config = None
    if not run.started():
        config = run.path.parent / f"{run.path.name}.yaml"
        config.write_text(dump_config(cfg), encoding="utf-8")
    log = run.path.parent / f"{run.path.name}.log"
    with open(log, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(
            _train_command(run.path, config, nproc),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_stop_with_parent,
        )
        try:
            pruned = _follow(proc, run.metrics, *follow)
        finally:  # the worker stopped (Ctrl-C, an error): its training stops with it
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return pruned, proc.returncode, log


def _follow(
    proc: subprocess.Popen, metrics: Path, study: Any, trial: Any, prunable: bool, poll_s: float
) -> int | None:
    """Report each new epoch's validation top-1 until ``proc`` ends; the epoch at which a
    search trial was pruned (its process stopped), or None."""
    reported = 0
    while True:
        ended = proc.poll() is not None
        for record in _epochs_seen(metrics)[reported:]:
            reported += 1
            if "val/top1" in record:
                trial.report(float(record["val/top1"]), int(record["epoch"]))
                if prunable and not ended and trial.should_prune():
                    proc.terminate()  # the trainer saves where it stands and exits
                    proc.wait()
                    return int(record["epoch"])
        if ended:
            return None
        time.sleep(poll_s)


def trial_results(run_dir: Path) -> dict[str, Any]:
    """What a finished trial keeps in the storage: the last epoch's validation top-1 (what
    the study selects on), the test metrics of the last epoch, per class, and the time its
    epochs took (``wall_s`` until the worker sets the whole process's)."""
    run = RunDir(run_dir)
    test = json.loads(run.evaluation().read_text(encoding="utf-8"))
    epochs = [r for r in _epochs_seen(run.metrics) if "val/top1" in r]
    if not epochs:
        raise UsageError(f"{shown(run_dir)} has no validation top-1 in metrics.jsonl")
    wall = sum(float(r.get("epoch_time_s") or 0) for r in _epochs_seen(run.metrics))
    return {
        "images_per_s": images_per_s(_epochs_seen(run.metrics)),
        "val_images": val_images(run_dir),
        "val_top1": float(epochs[-1]["val/top1"]),
        **{k: test.get(k) for k in ("top1", "many", "medium", "few", "ece")},
        "per_class": test.get("per_class"),
        "classes": test.get("classes"),
        "train_counts": test.get("train_counts"),
        "wall_s": wall,
        "epochs": int(epochs[-1]["epoch"]),
    }


def val_images(run_dir: Path) -> int | None:
    """The size of the run's validation split, as its ``data.json`` says; None without it."""
    try:
        return int(json.loads(RunDir(run_dir).data_json.read_text(encoding="utf-8"))["val"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trial_rows(place: StudyPlace) -> list[dict[str, Any]]:
    """Every trial of the study: its state and stored attributes (less a spare without an
    entry, which Study.ask made when workers of an older version raced for the last one, and
    a repeat closed by ``_close_repeats``). ``stale``: running without a heartbeat for the
    grace period (its worker stopped; the next worker that looks retries it)."""
    rows = []
    for study in open_studies(place, create=False):
        stale = set(study._storage._get_stale_trial_ids(study._study_id))
        for t in study.get_trials(deepcopy=False):
            if "entry" not in t.user_attrs or "duplicate_of" in t.user_attrs:
                continue
            rows.append(
                {
                    "state": t.state.name.lower(),
                    "number": t.number,
                    "retry_of": t.system_attrs.get("failed_trial"),
                    "steps": dict(t.intermediate_values),
                    "stale": t._trial_id in stale,
                    **t.user_attrs,
                }
            )
    return rows
