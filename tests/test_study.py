"""Studies: recipes x seeds x a search in Optuna's storage, worked through by several workers
(SQLite and a real PostgreSQL server), a worker killed mid-trial, a study stopped and resumed,
and the report; the validation split held out of the training set."""

from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from longtail.data.imbalance import hold_out
from longtail.errors import LongtailError, UsageError
from longtail.studies import (
    StudyPlace,
    load_study,
    progress,
    status_lines,
    summarise,
    trial_rows,
)
from longtail.studies.report import markdown

optuna = pytest.importorskip("optuna")

TRAIN = {"epochs": 3, "batch_size": 8, "device": "cpu", "report": False, "threads": 1}


def _recipe(folder: Path, name: str, method: dict) -> Path:
    cfg = {
        "name": name,
        "method": method,
        "data": {"dataset": "folder", "root": None, "ratio": None, "image_size": 12},
        "model": {"backbone": "convnet-tiny", "projection_hidden": 16, "projection_dim": 8},
        "train": TRAIN,
        "optim": {"lr": 0.05, "milestones": [2], "weight_decay": 5e-4},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _study(tmp_path: Path, data: Path, search_trials: int = 4, seeds=(0, 1), **extra) -> Path:
    """2 entries (ce, logit-adjust) x ``seeds``, plus a search over logit-adjust's lr."""
    _recipe(tmp_path, "ce", {"name": "ce"})
    _recipe(tmp_path, "la", {"name": "logit-adjust"})
    entries: list[dict] = [{"name": "ce", "recipe": "ce.yaml"}, {"name": "la", "recipe": "la.yaml"}]
    if search_trials:
        entries[1]["search"] = {
            "trials": search_trials,
            "space": {"optim.lr": {"low": 0.01, "high": 0.2, "log": True}},
        }
    spec = {
        "name": "tiny",
        "seeds": list(seeds),
        "set": {"data.root": str(data), "data.val_per_class": 2},
        "entries": entries,
        "heartbeat_s": 1,
        "grace_s": 4,
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtail", *args], capture_output=True,
                          text=True, timeout=600, **kw)  # fmt: skip


def _place(study: Path, folder: Path, url: str | None = None) -> StudyPlace:
    spec, base = load_study(study)
    return StudyPlace.of(spec, base, folder, url)


def test_hold_out_takes_a_balanced_split_from_outside_the_long_tail_first():
    targets = np.repeat(np.arange(3), 100)
    kept = np.concatenate([np.arange(0, 100), np.arange(100, 130), np.arange(200, 205)])
    train, val = hold_out(targets, kept, 10, seed=0)
    assert not set(train) & set(val) and set(train) | set(val) <= set(range(300))
    assert np.bincount(targets[val]).tolist() == [10, 10, 10]  # class 0 has no image outside
    assert np.bincount(targets[train], minlength=3).tolist() == [90, 30, 5]
    # every image kept (a folder): at most a fifth of each class is held out
    folder = np.repeat(np.arange(3), [100, 30, 4])
    train, val = hold_out(folder, np.arange(134), 10)
    assert np.bincount(folder[val], minlength=3).tolist() == [10, 6, 0]
    assert len(train) + len(val) == 134
    assert np.array_equal(hold_out(targets, kept, 10, seed=3)[1],
                          hold_out(targets, kept, 10, seed=3)[1])  # fmt: skip


def test_a_study_file_is_checked_before_anything_runs(tmp_path, pattern_folder):
    study = _study(tmp_path, pattern_folder)
    spec, _ = load_study(study)
    assert [e.name for e in spec.entries] == ["ce", "la"]
    raw = yaml.safe_load(study.read_text())
    for change, needle in (
        ({"set": {"data.root": str(pattern_folder)}}, "selects and prunes on a validation split"),
        ({"entries": raw["entries"] * 2}, "given twice: ce, la"),
        ({"seeds": [0, 0]}, r"seeds \[0, 0\]: each seed once"),
        ({"entries": [{**raw["entries"][0], "seeds": [1, 2, 1]}]}, "entry 'ce': seeds"),
        ({"entries": [{**raw["entries"][0], "seeds": []}]}, "seeds"),
        ({"entries": [{"name": "x", "recipe": "nope.yaml"}]}, "study entry 'x'"),
        ({"entries": [{**raw["entries"][1], "search": {"trials": 2, "space": {
            "optim.lr": {"low": 0.2, "high": 0.1}}}}]}, "low < high"),
    ):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(UsageError, match=needle):
            load_study(bad)


def test_two_workers_share_a_study_in_sqlite_and_report_it(tmp_path, pattern_folder, monkeypatch):
    """2 entries x 2 seeds + a 4-trial search, two worker processes on one SQLite file; the
    report ranks on validation top-1, says what the split's size allows, and gives the best
    settings found."""
    study = _study(tmp_path, pattern_folder)
    folder = tmp_path / "out"
    done = _cli("study", "run", str(study), "--dir", str(folder), "--workers", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = trial_rows(_place(study, folder))
    fixed = [r for r in rows if r["kind"] == "fixed"]
    assert sorted((r["entry"], r["seed"]) for r in fixed) == [
        ("ce", 0), ("ce", 1), ("la", 0), ("la", 1)]  # fmt: skip
    assert all(r["state"] == "complete" for r in fixed)
    search = [r for r in rows if r["kind"] == "search"]
    assert len(search) == 4 and all(r["state"] in ("complete", "pruned") for r in search)
    assert len({r["params"]["optim.lr"] for r in search}) == 4  # each its own lr
    workers = {r["worker"] for r in rows}
    assert len(workers) == 2, workers  # both workers trained trials
    for r in fixed:  # each trial is a normal run directory
        run = folder / "runs" / r["entry"] / r["run"]
        assert (run / "eval_test.json").is_file()
        assert r["val_top1"] == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])[
            "val/top1"]  # fmt: skip
    status = _cli("study", "status", str(study), "--dir", str(folder))
    assert status.returncode == 0 and "8/8 trials finished" in status.stdout, status.stdout
    said = json.loads(_cli("study", "status", str(study), "--dir", str(folder), "--json").stdout)
    assert (said["finished"], said["total"], said["counts"]["ce"]["complete"]) == (8, 8, 2)
    report = _cli("study", "report", str(study), "--dir", str(folder))
    assert report.returncode == 0, report.stderr
    md = (folder / "report.md").read_text()
    assert "Ranked by validation top-1" in md and "Best on validation: " in md
    rows_md = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()]
    table = {c[0]: c for c in rows_md if c[0] in ("ce", "la (logit-adjust)")}
    assert len(table) == 2, md
    la = table["la (logit-adjust)"]
    assert la[1:3] == ["Menon et al., ICLR 2021", "2"]  # the method's paper, the seeds
    # 22, 14, 8 and 5 training images a class: no many-shot class, and no column of dashes
    assert "No many-shot class in this data" in md and "| many |" not in md
    assert "| test top-1 per seed | medium | few | ECE |" in md
    assert {table["ce"][4].split(":")[0], la[4].split(":")[0]} & {"best"}  # one is the best
    assert la[6] == ", ".join(f"{r['top1']:.4f}" for r in sorted(
        (r for r in fixed if r["entry"] == "la"), key=lambda r: r["seed"]))  # fmt: skip
    assert "optim.lr=" in md and "Trials ran on: " in md and "torch " in md
    assert "Unfinished" not in md
    assert all(r["provenance"]["torch"] for r in rows if r["state"] == "complete")
    page = (folder / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
    best = summarise(_place(study, folder))["table"][0]
    run = folder / "runs" / best["entry"] / f"seed-{best['best_run']['seed']}"
    assert max(best["val_by_seed"].values()) == best["val_by_seed"][best["best_run"]["seed"]]
    assert f"`longtail predict {run} IMAGES`" in md and (run / "checkpoints").is_dir()
    assert f"`{run}`; " in md  # trained here; by a worker on another machine: "on HOST"
    import longtail.studies.report as report

    here = socket.gethostname()
    monkeypatch.setattr(report.socket, "gethostname", lambda: "another-machine")
    elsewhere = report.markdown(_place(study, folder), summarise(_place(study, folder)))
    monkeypatch.undo()
    assert f"`{run}` on {here}; " in elsewhere
    # the search's best as an entry to add to the study file, to run over the seeds
    added = yaml.safe_load(next(x for x in md.splitlines() if x.startswith("    - "))[6:])
    best_lr = summarise(_place(study, folder))["best"][0]["params"]["optim.lr"]
    assert added["name"] == "la-best" and added["set"]["optim.lr"] == float(f"{best_lr:.4g}")
    raw = yaml.safe_load(study.read_text())
    load_study_text = yaml.safe_dump({**raw, "entries": [*raw["entries"], added]})
    (tmp_path / "more.yaml").write_text(load_study_text)
    assert load_study(tmp_path / "more.yaml")[0].entry("la-best").set["optim.lr"] > 0
    png = (folder / "report-per-class.png").read_bytes()
    assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode() in page
    # the numbers for scripts: the same rows, seed by seed
    numbers = json.loads((folder / "report.json").read_text())
    assert numbers["study"] == "tiny" and numbers["epochs"] == yaml.safe_load(
        study.read_text()).get("epochs")  # fmt: skip
    by_entry = {r["entry"]: r for r in numbers["table"]}
    assert [f"{x:.4f}" for x in by_entry["la"]["top1_per_seed"]] == la[6].split(", ")
    assert len(by_entry["la"]["per_class"]) == len(by_entry["la"]["classes"]) > 1
    assert numbers["best"][0]["params"]["optim.lr"] == best_lr
    assert "<td>Menon et al., ICLR 2021</td>" in page  # words to the left, numbers right
    assert "<pre>- {name: la-best, " in page  # a code block, and `code` spans
    assert f"<code>longtail predict {run} IMAGES</code>" in page
    assert f"<td class='n w'>{la[6]}</td>" in page  # numbers: right, on one line
    verdict = (table["ce"] if la[4] == "best" else la)[4]  # "-0.1234 ± ...: not told apart"
    assert f"<td class=n>{html.escape(verdict)}</td>" in page  # may wrap
    speeds = [r["images_per_s"] for r in fixed if r["entry"] == "la"]
    assert la[-1] == f"{sum(speeds) / 2:.0f}" and all(v > 0 for v in speeds)  # training images/s
    summary = summarise(_place(study, folder))
    vals = [r["val_top1"] for r in summary["table"]]
    assert vals == sorted(vals, reverse=True)
    n = json.loads((folder / "runs/ce/seed-0/data.json").read_text())["val"]
    assert n == 7 and all(r["val_images"] == n for r in fixed)  # 2 a class; 1 of the 6-image one
    se = math.sqrt(vals[0] * (1 - vals[0]) / n)
    assert f"Validation: {n} images. " in md and f"standard error of about {se:.4f}" in md
    # the paired test reads the differences at the split's resolution, one image in n
    steps = []
    versus = report.versus
    monkeypatch.setattr(report, "versus", lambda *a: steps.append(a[2:]) or versus(*a))
    summarise(_place(study, folder))
    assert steps == [(1 / n,)] * (len(summary["table"]) - 1)
    # trials stored before the size was kept: read from their run directories
    rows_then = report.trial_rows
    monkeypatch.setattr(report, "trial_rows", lambda place: [
        {k: v for k, v in r.items() if k not in ("val_images", "images_per_s")}
        for r in rows_then(place)])  # fmt: skip
    again = summarise(_place(study, folder))
    assert again["val_images"] == n
    assert [r["images_per_s"] for r in again["table"]] == pytest.approx(
        [r["images_per_s"] for r in summary["table"]])  # fmt: skip


def _wait_for(predicate, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def _training(run: Path) -> bool:
    """Whether a process trains into ``run`` (its command line names it)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if any(
            a == b"--out" and b == str(run).encode() for a, b in zip(args, args[1:], strict=False)
        ):
            return True
    return False


def _epochs(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_a_worker_killed_mid_trial_leaves_it_to_be_retried_and_resumed(tmp_path, pattern_folder):
    """SIGKILL a worker after its trial's first epoch: the next worker fails the stale trial,
    retries it, and the retry continues the run directory from its checkpoint."""
    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0],
                   set={"data.root": str(pattern_folder), "data.val_per_class": 2,
                        "train.epochs": 60})  # fmt: skip
    folder = tmp_path / "out"
    worker = subprocess.Popen(
        [sys.executable, "-m", "longtail", "study", "run", str(study), "--dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    first = folder / "runs" / "ce" / "seed-0"
    _wait_for(lambda: _epochs(first) >= 1)
    os.kill(worker.pid, signal.SIGKILL)  # the worker alone: its training must stop with it
    worker.wait()
    _wait_for(lambda: not _training(first), timeout=60)
    killed_at = _epochs(first)
    assert killed_at < 60  # stopped by its worker's death, not trained to its end
    # The epochs before the death as if each had taken 1,000 s: the retry's wall time counts
    # those its checkpoint kept.
    lines = [json.loads(s) for s in (first / "metrics.jsonl").read_text().splitlines()]
    (first / "metrics.jsonl").write_text(
        "".join(json.dumps({**h, "epoch_time_s": 1000.0}) + "\n" for h in lines)
    )
    t0 = time.time()
    again = _cli("study", "worker", str(study), "--dir", str(folder))
    took = time.time() - t0
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    rows = trial_rows(_place(study, folder))
    ce = [r for r in rows if r["entry"] == "ce"]
    assert sorted(r["state"] for r in ce) == ["complete", "fail"]
    retry = next(r for r in ce if r["state"] == "complete")
    assert retry["retry_of"] is not None
    history = [json.loads(s) for s in (first / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 61))  # resumed: no epoch twice
    kept = retry["resumed_after_epoch"]
    assert 1 <= kept <= killed_at
    assert [h["epoch_time_s"] for h in history[:kept]] == [1000.0] * kept
    assert 1000 * kept < retry["wall_s"] < 1000 * kept + took
    p = progress(_place(study, folder))
    assert p["finished"] == p["total"] == 2 and p["counts"]["ce"]["failed"] == 0


def test_a_stopped_study_puts_its_running_trials_back_at_once(tmp_path, pattern_folder):
    """SIGTERM to `study run --workers 2` alone (what a scheduler or `kill` sends): its workers
    stop, their trainings save and stop, and each running trial is failed and enqueued again
    then, not left running until the grace period tells a later worker that it died."""
    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0], grace_s=3600,
                   set={"data.root": str(pattern_folder), "data.val_per_class": 2,
                        "train.epochs": 60})  # fmt: skip
    folder = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "longtail", "study", "run", str(study), "--dir", str(folder),
         "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    runs = [folder / "runs" / e / "seed-0" for e in ("ce", "la")]
    _wait_for(lambda: all(_epochs(r) >= 1 for r in runs))
    os.kill(run.pid, signal.SIGTERM)  # the parent alone
    out, _ = run.communicate(timeout=120)
    said = out.strip().splitlines()
    assert run.returncode == 143 and len(said) == 2, out  # its first line, then one more
    assert said[-1] == (
        "stopped by SIGTERM: any trial in training was put back, to continue from its "
        "run directory; run `longtail study run` again to go on"
    )
    _wait_for(lambda: not any(_training(r) for r in runs), timeout=60)
    assert all(_epochs(r) < 60 for r in runs)  # stopped, not trained to the end
    rows = sorted(trial_rows(_place(study, folder)), key=lambda r: r["number"])
    assert [(r["state"], r.get("error")) for r in rows[:2]] == [("fail", "stopped by SIGTERM")] * 2
    assert sorted((r["state"], r["retry_of"]) for r in rows[2:]) == [
        ("waiting", 0), ("waiting", 1)]  # fmt: skip
    assert all("stopped by SIGTERM in epoch" in (r.parent / "seed-0.log").read_text()
               for r in runs)  # fmt: skip


def test_a_stopped_study_resumes_without_losing_a_finished_trial(tmp_path, pattern_folder):
    study = _study(tmp_path, pattern_folder, search_trials=0)
    folder = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "longtail", "study", "run", str(study), "--dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: len(list(folder.glob("runs/*/*/eval_test.json"))) >= 1)
    os.killpg(run.pid, signal.SIGTERM)  # stopped as a user stops it
    run.wait()
    finished = {p.parent: p.stat().st_mtime_ns for p in folder.glob("runs/*/*/eval_test.json")}
    assert 1 <= len(finished) < 4
    summary = summarise(_place(study, folder))  # a report of the stopped study says so
    done = sum(r["seeds"] for r in summary["table"])
    said = markdown(_place(study, folder), summary)
    assert f"Unfinished when written: {done} of 4 trials finished (" in said, said
    missing = [e for e in ("ce", "la") if e not in {r["entry"] for r in summary["table"]}]
    assert (f"No trial finished yet, so not in the table: {', '.join(missing)}." in said) == (
        bool(missing)), said  # fmt: skip
    resumed = _cli("study", "run", str(study), "--dir", str(folder))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    for run_dir, mtime in finished.items():  # not trained again
        assert (run_dir / "eval_test.json").stat().st_mtime_ns == mtime
    rows = [r for r in trial_rows(_place(study, folder)) if r["state"] == "complete"]
    assert len(rows) == 4
    assert "Unfinished" not in markdown(_place(study, folder), summarise(_place(study, folder)))
    # Each trial keeps what it trained; the study file changed after: where the data is and how
    # the machine runs may change, what is trained not (the table would mix the two).
    from longtail.studies import check_unchanged, open_studies

    assert all(r["config"]["seed"] == r["seed"] for r in rows)
    raw = yaml.safe_load(study.read_text())
    study.write_text(yaml.safe_dump({**raw, "set": {**raw["set"], "train.threads": 2}}))
    check_unchanged(_place(study, folder), open_studies(_place(study, folder), create=False))
    study.write_text(yaml.safe_dump({**raw, "set": {**raw["set"], "optim.lr": 0.07}}))
    again = _cli("study", "run", str(study), "--dir", str(folder))
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert re.search(r"study entry '(ce|la)' now trains otherwise than its trial \1/seed-",
                     again.stderr), again.stderr  # fmt: skip
    assert "(optim.lr: 0.05 then, 0.07 now)" in again.stderr, again.stderr


def _pg_ctl() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
    return found[-1] if found and found[-1] else None


@pytest.fixture
def postgres(tmp_path_factory):
    """A PostgreSQL server of our own on a free port (Debian's postgresql package)."""
    pg_ctl = _pg_ctl()
    if pg_ctl is None:
        pytest.skip("no PostgreSQL server here (Debian package `postgresql`)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed")
    bin_dir = Path(pg_ctl).parent
    # A folder of its own under /tmp: the server's user cannot enter pytest's (mode 700).
    root = Path(tempfile.mkdtemp(prefix="longtail-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, sock = root / "data", root
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "longtail",
                    "--auth=trust"], check=True, capture_output=True)  # fmt: skip
    subprocess.run([*run_as, str(pg_ctl), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                    f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "longtail", "studies"], check=True, capture_output=True)  # fmt: skip
        yield f"postgresql+psycopg2://longtail@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*run_as, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def test_workers_on_two_machines_share_a_study_through_postgresql(tmp_path, pattern_folder,
                                                                   postgres):  # fmt: skip
    """A study started on one machine and a worker added on another (each with its own
    folder), sharing one PostgreSQL database: both train trials; the report reads them all."""
    study = _study(tmp_path, pattern_folder, search_trials=2, seeds=[0])
    first = subprocess.Popen(
        [sys.executable, "-m", "longtail", "study", "run", str(study), "--dir",
         str(tmp_path / "a"), "--storage", postgres],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    place = _place(study, tmp_path / "a", postgres)

    def created() -> bool:
        try:
            return len(trial_rows(place)) == 4
        except UsageError:  # not created yet
            return False

    _wait_for(created)
    second = _cli("study", "worker", str(study), "--dir", str(tmp_path / "b"), "--storage",
                  postgres)  # fmt: skip
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, out[-2000:] + second.stderr[-2000:]
    rows = trial_rows(place)
    assert len(rows) == 4 and all(r["state"] in ("complete", "pruned") for r in rows)
    assert len({r["worker"] for r in rows}) == 2
    assert list((tmp_path / "b").glob("runs/*/*/metrics.jsonl"))  # trained on the second
    report = _cli("study", "report", str(study), "--dir", str(tmp_path / "a"), "--storage",
                  postgres)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "| ce | the standard baseline" in (tmp_path / "a/report.md").read_text()


def test_the_readme_study_and_the_benchmark_studies_are_valid(tmp_path):
    """The README's example and every study file in benchmarks/studies check out as written."""
    import re

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"```yaml\n(name: my-photos.*?)```", (root / "README.md").read_text(), re.S)
    assert block is not None
    (tmp_path / "readme.yaml").write_text(block.group(1))
    files = [tmp_path / "readme.yaml", *sorted((root / "benchmarks/studies").glob("*.yaml"))]
    assert len(files) > 1
    cwd = os.getcwd()
    os.chdir(root)  # recipe paths are given from the repository's root
    try:
        for path in files:
            spec, _ = load_study(path)
            assert spec.entries, path
    finally:
        os.chdir(cwd)


def test_study_run_enqueues_what_the_file_adds_and_what_failed(tmp_path, pattern_folder):
    """Without training: a failed trial and a seed added to the file are enqueued again by
    the next `study run`; finished and waiting ones are not doubled; the failed one is
    claimed first."""
    from longtail.studies.store import _claim, open_studies

    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0])
    place = _place(study, tmp_path / "out")
    studies = open_studies(place)
    assert len(trial_rows(place)) == 2
    s, trial = _claim(studies)
    trial.set_user_attr("error", "DataError: no such folder")
    s.tell(trial, state=optuna.trial.TrialState.FAIL)
    said = status_lines(place)
    assert f"  failed: {trial.user_attrs['entry']}/seed-0: DataError: no such folder" in said
    assert "enqueues failed trials again" in said[-1]
    open_studies(place)
    assert not any("failed:" in line for line in status_lines(place))  # enqueued again
    rows = trial_rows(place)
    assert sorted(r["state"] for r in rows) == ["fail", "waiting", "waiting"]
    assert progress(place)["counts"]["ce"]["waiting"] == 1  # its latest attempt
    raw = yaml.safe_load(study.read_text())
    study.write_text(yaml.safe_dump({**raw, "seeds": [0, 1]}))
    open_studies(_place(study, tmp_path / "out"))
    assert sorted((r["entry"], r["run"]) for r in trial_rows(place) if r["state"] == "waiting") == [
        ("ce", "seed-0"), ("ce", "seed-1"), ("la", "seed-0"), ("la", "seed-1")]  # fmt: skip
    # The trial tried before is claimed first (Optuna's queue would give la/seed-0 first,
    # and ce/seed-0's kept epochs would wait behind every fresh trial); then the queue's order.
    claims = [_claim(studies)[1].user_attrs for _ in range(3)]
    assert [(a["entry"], a["run"]) for a in claims] == [
        ("ce", "seed-0"), ("la", "seed-0"), ("ce", "seed-1")]  # fmt: skip


def test_an_entry_with_its_own_seeds_and_the_order_seed_by_seed(tmp_path, pattern_folder):
    """An entry's own seeds replace the study's; trials are enqueued (and so claimed) seed by
    seed, every entry's first seed first; the report says the seeds are per entry."""
    from longtail.studies.report import markdown, summarise
    from longtail.studies.store import open_studies

    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0, 1])
    raw = yaml.safe_load(study.read_text())
    raw["entries"][0]["seeds"] = [5, 6, 7]
    study.write_text(yaml.safe_dump(raw))
    place = _place(study, tmp_path / "out")
    open_studies(place)
    order = [(r["entry"], r["seed"]) for r in sorted(trial_rows(place), key=lambda r: r["number"])]
    assert order == [("ce", 5), ("la", 0), ("ce", 6), ("la", 1), ("ce", 7)]
    assert "seeds [0, 1] (or the entry's own)" in markdown(place, summarise(place))


def test_a_trial_can_be_a_torchrun_job(tmp_path, pattern_folder):
    """--nproc-per-trial 2: the worker starts the trial under torchrun (gloo on the CPU)."""
    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0],
                   entries=[{"name": "ce", "recipe": "ce.yaml"}])  # fmt: skip
    folder = tmp_path / "out"
    done = _cli("study", "run", str(study), "--dir", str(folder), "--nproc-per-trial", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = trial_rows(_place(study, folder))
    assert [r["state"] for r in rows] == ["complete"]
    log = (folder / "runs/ce/seed-0.log").read_text()
    assert "[rank1]" in log, log[-1500:]  # the second process of the job
    assert "held out for validation (data.val_per_class)" in log and "data.n_max" not in log


def test_workers_on_one_machine_each_get_their_share_of_its_gpus(tmp_path, monkeypatch):
    """`study run --workers N` on a machine with GPUs: each worker process sees its own GPUs
    (slices of --nproc-per-trial, in turn where there are fewer than the workers need), and
    each trial process its share of the CPU cores."""
    from longtail.studies import store

    assert store.gpu_shares([], 3) == [None, None, None]  # the CPU
    assert store.gpu_shares(["0", "1", "2", "3"], 4) == [["0"], ["1"], ["2"], ["3"]]
    assert store.gpu_shares(["0", "1"], 3) == [["0"], ["1"], ["0"]]  # small trials share
    assert store.gpu_shares(["0", "1", "2", "3"], 2, 2) == [["0", "1"], ["2", "3"]]
    assert store.gpu_shares(["0", "1", "2"], 2, 2) == [["0", "1"], ["2", "0"]]
    assert store.gpu_shares(["0"], 2, 2) == [None, None]  # a trial needs more than there are
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-5f2a,-1,7")
    assert store.visible_gpus() == ["3", "GPU-5f2a"]  # CUDA stops at an invalid entry
    seen, threads = [], []

    class Popen:  # the worker processes, recorded instead of started
        def __init__(self, cmd, env, **kw):
            seen.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))
            threads.append(env["OMP_NUM_THREADS"])

        def wait(self):
            return 0

    monkeypatch.setattr(store.subprocess, "Popen", Popen)
    spec = StudyPlace(None, tmp_path, tmp_path, "sqlite:///x.db")  # type: ignore[arg-type]
    store.run_workers(spec, tmp_path / "s.yaml", 3)
    assert [gpus for _, gpus in seen] == ["3", "GPU-5f2a", "3"]
    assert all(cmd[3:5] == ["study", "worker"] for cmd, _ in seen)
    seen.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    store.run_workers(spec, tmp_path / "s.yaml", 2)
    assert [gpus for _, gpus in seen] == ["", ""]  # none visible: left as it is
    # and the cores: 8 of them, 3 workers x 1 process, then 2 x 2; a value set is kept
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(store.os, "sched_getaffinity", lambda pid: set(range(8)))
    threads.clear()
    store.run_workers(spec, tmp_path / "s.yaml", 3)
    store.run_workers(spec, tmp_path / "s.yaml", 2, 2)
    assert threads == ["2", "2", "2", "2", "2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    threads.clear()
    store.run_workers(spec, tmp_path / "s.yaml", 2)
    assert threads == ["3", "3"]


def test_the_report_tells_entries_apart_from_the_best_by_a_paired_t_test():
    """versus(): the paired differences over shared seeds, and a t-test at 95% whose
    quantiles are checked against Student's t integrated in float64."""
    import torch

    from longtail.studies.report import T95, _verdicts, _versus_cell, versus

    for df, q in enumerate(T95, start=1):
        x = torch.linspace(-q, q, 200_001, dtype=torch.float64)
        mass = torch.trapezoid(torch.distributions.StudentT(df).log_prob(x).exp(), x)
        assert abs(mass.item() - 0.95) < 2e-4, (df, mass.item())
    best = {0: 0.80, 1: 0.82, 2: 0.81}
    worse = versus(best, {0: 0.790, 1: 0.809, 2: 0.798})  # 0.010, 0.011, 0.012 lower
    assert worse["verdict"] == "worse" and worse["seeds"] == 3
    assert worse["diff"] == pytest.approx(-0.011) and worse["sd"] == pytest.approx(0.001)
    assert (
        versus(best, {0: 0.81, 1: 0.81, 2: 0.815})["verdict"] == "not told apart"
    )  # +0.01, -0.01, +0.005
    assert versus(best, {k: v - 0.02 for k, v in best.items()})["verdict"] == "worse"  # sd 0
    assert versus(best, {k: v + 0.02 for k, v in best.items()})["verdict"] == "better"
    # Top-1 moves in steps of 1 / validation images: identical differences (sd 0) are read
    # with one step of spread, so a gap must pass t at that sd, not merely be nonzero.
    two = {0: 0.80, 1: 0.82}
    for gap, step, verdict in ((0.005, 0.001, "not told apart"), (0.02, 0.001, "worse"),
                               (0.005, None, "worse")):  # fmt: skip
        v = versus(two, {k: x - gap for k, x in two.items()}, step)
        assert v["verdict"] == verdict and v["sd"] == pytest.approx(0), (gap, step)
    for gap, verdict in ((0.002, "not told apart"), (0.003, "worse")):  # t 3.46, 5.20 vs 4.303
        assert versus(best, {k: x - gap for k, x in best.items()}, 0.001)["verdict"] == verdict
    # differences -0.01 -+ a over 3 seeds: t = 0.01 * sqrt(3) / a, against 4.303
    for t, verdict in ((4.0, "not told apart"), (4.6, "worse")):
        a = 0.01 * 3**0.5 / t
        d = {0: -0.01 - a, 1: -0.01, 2: -0.01 + a}
        assert versus(best, {k: best[k] + d[k] for k in best})["verdict"] == verdict, t
    one = versus(best, {1: 0.70, 7: 0.9})
    assert one == {
        "seeds": 1,
        "diff": pytest.approx(-0.12),
        "sd": None,
        "verdict": "untested",
    }
    assert (
        versus(best, {5: 0.9})["diff"] is None and versus(best, {5: 0.9})["verdict"] == "untested"
    )
    # In words, under the report's table: each verdict names its entries.
    table = [{"entry": "a", "versus_best": None}] + [
        {"entry": name, "versus_best": versus(best, other)}
        for name, other in (
            ("b", {0: 0.790, 1: 0.809, 2: 0.798}),
            ("c", {0: 0.81, 1: 0.81, 2: 0.815}),
            ("d", {1: 0.70}),
            ("e", {k: v + 0.02 for k, v in best.items()}),
            ("f", {k: v - 0.02 for k, v in best.items()}),
        )
    ]
    words = _verdicts(table)
    assert words == (
        "Best on validation: a. By a paired t-test of validation top-1 over the seeds both ran "
        "(95%), worse than it: b, f; better than it: e; not told apart from it: c. Three "
        "seeds tell only large differences apart; more seeds narrow it. Untested, sharing "
        "fewer than two seeds with it: d."
    )
    two = [*table[:2], {"entry": "g", "versus_best": versus(best, {0: 0.81, 1: 0.81})}]
    assert "not told apart from it: g. Two seeds tell only" in _verdicts(two)  # the fewest
    assert [_versus_cell(r["versus_best"]).split(": ")[1] for r in table[1:3]] == [
        "worse (3 seeds)", "not told apart (3 seeds)"]  # fmt: skip
    assert _versus_cell(table[3]["versus_best"]) == "-0.1200: untested (one seed)"


def test_images_per_s_weighs_each_epoch_by_its_time():
    from longtail.engine.run_dir import images_per_s

    records = [{"images_per_s": 100.0, "epoch_time_s": 30.0},
               {"images_per_s": 400.0, "epoch_time_s": 10.0}, {"epoch": 3}]  # fmt: skip
    assert images_per_s(records) == pytest.approx((3000 + 4000) / 40)  # not (100 + 400) / 2
    assert images_per_s([{"epoch": 1}]) is None


def test_status_says_how_long_the_study_has_left():
    """time_left(): each trial left at its entry's mean wall time (else all finished trials'),
    a running one by the epochs it has not done, shared by the workers running trials."""
    from longtail.studies.report import _duration, time_left

    def row(entry, state, wall=None, steps=(), worker=None):
        return {"entry": entry, "state": state, "wall_s": wall,
                "steps": dict.fromkeys(steps, 0.5), "worker": worker}  # fmt: skip

    assert time_left([row("a", "waiting")], 10) is None  # nothing finished yet
    rows = [row("a", "complete", 100), row("a", "complete", 300), row("b", "complete", 1000),
            row("a", "waiting"), row("c", "waiting"),  # 200 s, then the mean of all: 1400/3 s
            row("b", "running", steps=[1, 2, 3], worker="w1"),  # 70% of 1,000 s
            row("a", "running", steps=[], worker="w2"),  # 200 s
            row("a", "pruned"), row("a", "fail")]  # fmt: skip
    assert time_left(rows, 10) == pytest.approx((200 + 1400 / 3 + 700 + 200) / 2)
    assert time_left(rows, None) == pytest.approx((200 + 1400 / 3 + 1000 + 200) / 2)
    assert time_left(rows[:5], 10) == pytest.approx(200 + 1400 / 3)  # none running: one
    stale = {**row("a", "running", steps=[], worker="w3"), "stale": True}  # its worker stopped
    assert time_left([*rows, stale], 10) == pytest.approx((200 + 1400 / 3 + 700 + 400) / 2)
    assert (_duration(3 * 3600 + 125), _duration(89)) == ("3 h 2 min", "1 min")


def test_a_storage_file_replaced_under_a_worker_is_one_line_not_a_traceback(
    tmp_path, pattern_folder
):
    """What `git stash` of a committed study.db does to running workers (seen on the full
    table's study): SQLite refuses their next write; the worker says so in one line."""
    import shutil

    from longtail.studies.store import _claim, open_studies

    place = _place(_study(tmp_path, pattern_folder, search_trials=0, seeds=[0]), tmp_path / "s")
    studies = open_studies(place)
    db = place.folder / "study.db"
    shutil.copy(db, tmp_path / "copy.db")
    os.replace(tmp_path / "copy.db", db)  # a new file at the path, as git writes one
    with pytest.raises(LongtailError) as error, place.failures():
        _claim(studies)
    said = str(error.value)
    assert "attempt to write a readonly database" in said and "git stash" in said, said
    assert "\n" not in said and "run the command again" in said
    assert [r["state"] for r in trial_rows(place)] == ["waiting", "waiting"]  # nothing lost


_RACER = """
import sys, time
from pathlib import Path
from longtail.studies import StudyPlace, load_study
from longtail.studies.store import _claim, open_studies

start, folders = float(sys.argv[1]), sys.argv[2:]
for k, folder in enumerate(folders):
    spec, base = load_study(Path(folder) / "study.yaml")
    place = StudyPlace.of(spec, base, Path(folder), None)
    studies = open_studies(place, create=False)
    time.sleep(max(0.0, start + 0.4 * k - time.time()))
    claimed = _claim(studies, place.serial)
    print(folder, claimed[1]._trial_id if claimed else None, flush=True)
"""


def test_two_workers_racing_on_a_dead_workers_trial_retry_it_once(tmp_path, pattern_folder):
    """Two workers that look at once at a trial whose worker died (as both do when a stopped
    study is run again): SQLite ignores Optuna's row locks, so both could fail it and each
    enqueue a retry, or both claim the one retry (seen on the full table's study). With the
    lock beside the database: one retry, claimed by one of them, in every round."""
    from longtail.studies.store import _claim, open_studies

    rounds = 12
    folders = []
    for k in range(rounds):
        folder = tmp_path / f"s{k}"
        folder.mkdir()
        study = _study(folder, pattern_folder, search_trials=0, seeds=[0], grace_s=1)
        raw = yaml.safe_load(study.read_text())
        study.write_text(yaml.safe_dump({**raw, "entries": raw["entries"][:1]}))
        place = _place(study, folder)
        studies = open_studies(place)
        _, trial = _claim(studies)  # its worker beats once, then dies
        studies[0]._storage.record_heartbeat(trial._trial_id)
        folders.append(str(folder))
    time.sleep(2)  # past the grace period: every first trial is stale
    said = status_lines(_place(Path(folders[0]) / "study.yaml", Path(folders[0])))
    assert any(x.startswith("  running: ce/seed-0 on ") and x.endswith(
        "no heartbeat for over 1 s: its worker stopped; the next worker that looks continues it")
        for x in said), said  # fmt: skip
    start = time.time() + 6  # both have imported by then, and look at each folder at once
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(start), *folders],
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    said = [p.communicate(timeout=300)[0].split("\n") for p in racers]
    assert all(p.returncode == 0 for p in racers)
    for k, folder in enumerate(folders):
        place = _place(Path(folder) / "study.yaml", Path(folder))
        trials = open_studies(place, create=False)[0].get_trials(deepcopy=False)
        states = [(t.state.name, t.system_attrs.get("failed_trial")) for t in trials]
        claims = [lines[k].split()[1] for lines in said]
        assert states == [("FAIL", None), ("RUNNING", 0)], (k, states)  # no second retry
        assert claims.count("None") == 1, (k, claims)  # the other found nothing to claim


def test_a_repeated_waiting_trial_is_closed_not_trained_twice(tmp_path, pattern_folder):
    """Two retries of one trial (left in a study by workers of an older version): the first
    is claimed, the repeat failed as a duplicate and left out of the study's rows."""
    from longtail.studies.store import _claim, open_studies

    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0])
    place = _place(study, tmp_path / "out")
    studies = open_studies(place)
    first = studies[0].get_trials(deepcopy=False)[0]
    studies[0].enqueue_trial({}, user_attrs=first.user_attrs)
    claims = [_claim(studies, place.serial) for _ in range(3)]
    assert [c[1].user_attrs["entry"] for c in claims[:2]] == ["ce", "la"] and claims[2] is None
    assert sorted((r["entry"], r["state"]) for r in trial_rows(place)) == [
        ("ce", "running"), ("la", "running")]  # fmt: skip
    repeat = studies[0].get_trials(deepcopy=False)[-1]
    assert repeat.state.name == "FAIL" and repeat.user_attrs["duplicate_of"] == first.number


def test_the_report_names_each_machine_once_with_the_commits_it_ran():
    from longtail.studies.report import _machines

    cpu = {"cpu": "AMD EPYC", "cores": 2, "cuda": None, "torch": "2.14.1"}
    gpu = {"cpu": "Xeon", "cores": 16, "cuda": "NVIDIA H200", "torch": "2.14.1"}
    said = _machines([{**cpu, "commit": "b"}, {**gpu, "commit": "b"}, {**cpu, "commit": "a"},
                      {**cpu, "commit": "b"}])  # fmt: skip
    assert said == ["AMD EPYC, 2 cores, torch 2.14.1, longtail commits b, a",
                    "NVIDIA H200, torch 2.14.1, longtail commit b"]  # fmt: skip


def test_a_worker_leaves_the_trials_of_entries_its_study_file_lacks(tmp_path, pattern_folder):
    """An entry added to the study file (here, or on another machine) while an older file's
    worker runs: that worker leaves its trials waiting, says so and stops when nothing else
    is left, rather than claiming one it cannot train (it would fail on the unknown entry)."""
    from longtail.studies.store import _claim, open_studies, work

    study = _study(tmp_path, pattern_folder, search_trials=0, seeds=[0])
    folder = tmp_path / "out"
    open_studies(_place(study, folder))  # ce and la waiting
    raw = yaml.safe_load(study.read_text())
    older = tmp_path / "older.yaml"
    older.write_text(yaml.safe_dump({**raw, "entries": raw["entries"][:1]}))  # ce alone
    place = _place(older, folder)
    studies = open_studies(place, create=False)
    s, trial = _claim(studies, known={"ce"})
    assert trial.user_attrs["entry"] == "ce"
    assert _claim(studies, known={"ce"}) is None  # la waits
    s.tell(trial, state=optuna.trial.TrialState.COMPLETE, values=[0.5])
    said: list[str] = []
    assert work(place, say=said.append, create=False) == 0
    assert said == [
        "left waiting: the trials of la, which this worker's study file has no entry for "
        "(added since it started, or on another machine): run a worker with the file that "
        "has them"
    ]
    assert [r["state"] for r in trial_rows(place) if r["entry"] == "la"] == ["waiting"]
