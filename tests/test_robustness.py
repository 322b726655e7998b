"""Nothing lost, nothing blocked: interruptions, concurrent runs, full disks, bad numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import folder_config, poison_step, tiny_config
from longtail import api
from longtail.build import validate
from longtail.config import config_from_dict, load_config
from longtail.engine import run_dir
from longtail.engine.checkpoint import load_checkpoint
from longtail.errors import LongtailError, UsageError
from longtail.methods import METHODS

SRC = Path(__file__).resolve().parents[1] / "src"
TIMING = {"epoch_time_s", "images_per_s"}

# Runs in a child process: train the config in argv[1] into argv[2], dying by SIGKILL at the
# point argv[3] names: "step:E:S" (step S of epoch E, 1-based), "write:E" (halfway through
# writing the checkpoint of epoch E) or "sleep:SECONDS" (slow steps, to hold the lock).
DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    sys.path.insert(0, sys.argv[4])
    from longtail import api
    from longtail.config import config_from_dict
    from longtail.engine import checkpoint
    from longtail.methods import METHODS

    cfg = config_from_dict(json.loads(open(sys.argv[1]).read()))
    kind, *where = sys.argv[3].split(":")
    cls = METHODS.get(cfg.method_name)
    original_step = cls.training_step
    seen = {"epoch": -1, "step": 0, "saves": 0}

    def step(self, batches, epoch):
        if epoch != seen["epoch"]:
            seen["epoch"], seen["step"] = epoch, 0
        seen["step"] += 1
        if kind == "step" and (epoch + 1, seen["step"]) == (int(where[0]), int(where[1])):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "sleep":
            time.sleep(float(where[0]))
        return original_step(self, batches, epoch)

    cls.training_step = step
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *a):
            return self.f.__exit__(*a)
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else ""
        if kind == "write" and ".last.pt." in name:
            seen["saves"] += 1
            if seen["saves"] == int(where[0]):
                return HalfWriter(f)
        return f

    checkpoint.os.fdopen = fdopen
    api.train(cfg, sys.argv[2], progress=False)
    """
)


def _spawn(raw: dict, out: Path, point: str, tmp: Path) -> subprocess.Popen:
    cfg_file = tmp / f"cfg-{out.name}.json"
    cfg_file.write_text(json.dumps(raw))
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(cfg_file), str(out), point, str(SRC)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same_weights(a: Path, b: Path) -> None:
    sa = load_checkpoint(a / "checkpoints" / "last.pt")
    sb = load_checkpoint(b / "checkpoints" / "last.pt")
    assert sa["epoch"] == sb["epoch"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch hybrid-sc run (one thread, so runs agree bit for bit)."""
    from conftest import make_fashion_mnist

    tmp = tmp_path_factory.mktemp("reference")
    root = make_fashion_mnist(tmp / "fm")
    raw = tiny_config(
        root,
        method={"name": "hybrid-sc"},
        train={"epochs": 3, "batch_size": 8, "threads": 1},
    )
    api.train(config_from_dict(raw), tmp / "run", progress=False)
    return raw, tmp / "run"


@pytest.mark.parametrize(
    ("point", "saved_epoch"),
    [("step:2:5", 0), ("step:3:1", 1), ("write:2", 0)],
    ids=["mid-epoch", "between-epochs", "during-checkpoint-write"],
)
def test_sigkill_then_resume_is_bit_exact(point, saved_epoch, reference, tmp_path):
    raw, full = reference
    cut = tmp_path / "cut"
    proc = _spawn(raw, cut, point, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    # The last complete checkpoint loads; a write cut short left only a temporary file.
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["epoch"] == saved_epoch
    leftovers = list((cut / "checkpoints").glob(".*.tmp"))
    assert bool(leftovers) == point.startswith("write")
    api.train(config_from_dict(raw), cut, resume=True, progress=False)
    assert not list((cut / "checkpoints").glob(".*.tmp"))
    _same_weights(full, cut)
    assert _rows(cut) == _rows(full)
    assert json.loads((cut / "eval_test.json").read_text()) == json.loads(
        (full / "eval_test.json").read_text()
    )


def test_a_second_process_on_the_same_run_is_refused(reference, tmp_path):
    raw, full = reference
    out = tmp_path / "run"
    proc = _spawn(raw, out, "sleep:0.05", tmp_path)
    try:
        deadline = time.time() + 120
        while not (out / "config.yaml").exists():  # written under the lock
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        with pytest.raises(
            UsageError, match=rf"in use by another longtail process \(pid {proc.pid}\)"
        ):
            api.train(config_from_dict(raw), out, progress=False)
        with pytest.raises(UsageError, match="in use by another longtail process"):
            api.train(config_from_dict(raw), out, resume=True, progress=False)
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _same_weights(full, out)  # the first run finished untouched by the refused ones
    assert _rows(out) == _rows(full)


def test_a_failed_start_leaves_nothing_and_the_same_command_runs_again(
    tmp_path, monkeypatch, capsys
):
    from test_bad_inputs import _folder, _invoke

    root = _folder(tmp_path)
    bad = root / "train" / "dog" / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "runs" / "small"  # runs/ does not exist yet either
    args = [
        "train", "--set", "data.dataset=folder", "--set", f"data.root={root}", "--set",
        "data.ratio=null", "--set", "data.image_size=12", "--set", "model.backbone=convnet-tiny",
        "--set", "train.batch_size=4", "--set", "train.epochs=1", "--out", out, "--no-progress",
    ]  # fmt: skip
    code, _, err = _invoke(args)
    assert code == 1 and "bad.png" in err
    assert not (tmp_path / "runs").exists()  # nothing was created
    bad.unlink()  # the user fixes the data and runs the same command again
    code, out_text, err = _invoke(args)
    assert code == 0, err
    assert "test top-1" in out_text and (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("where", ["corrupt-test-image", "first-epoch"])
def test_a_start_that_fails_before_its_first_checkpoint_leaves_nothing(
    where, tiny_fmnist, pattern_folder, tmp_path, monkeypatch
):
    import shutil

    if where == "corrupt-test-image":  # found before training, not after it
        root = tmp_path / "photos"
        shutil.copytree(pattern_folder, root)
        next((root / "test" / "rows").iterdir()).write_bytes(b"\x89PNG garbage")
        raw = folder_config(root, train={"epochs": 1})
        calls = []
        monkeypatch.setattr(METHODS.get("ce"), "on_epoch_start", lambda s, e: calls.append(e))
    else:  # the loss becomes NaN in the first epoch
        poison_step(monkeypatch, "hybrid-sc", 0, 2, float("nan"), "con")
        raw = tiny_config(tiny_fmnist, method={"name": "hybrid-sc"}, train={"epochs": 2})
    out = tmp_path / "runs" / "a" / "run"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("the user's")
    with pytest.raises(LongtailError):
        api.train(config_from_dict(raw), out, progress=False)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["keep.txt"]
    if where == "corrupt-test-image":
        assert calls == []


def test_a_bad_device_creates_nothing(tiny_fmnist, tmp_path):
    raw = tiny_config(tiny_fmnist, train={"device": "cuda:7"})
    with pytest.raises(UsageError, match="train.device"):
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_no_space_stops_before_training(tiny_fmnist, tmp_path, monkeypatch):
    class Usage:
        free = 1024

    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda p: Usage())
    calls = []
    monkeypatch.setattr(METHODS.get("ce"), "on_epoch_start", lambda self, e: calls.append(e))
    with pytest.raises(LongtailError, match="not enough free space for checkpoints"):
        api.train(config_from_dict(tiny_config(tiny_fmnist)), tmp_path / "run", progress=False)
    assert calls == []  # not one epoch started
    assert not (tmp_path / "run").exists()  # and nothing left behind
    monkeypatch.undo()
    api.train(config_from_dict(tiny_config(tiny_fmnist)), tmp_path / "run", progress=False)


def test_unwritable_run_directory_stops_before_training(tiny_fmnist, tmp_path, monkeypatch):
    real_open = open

    def read_only(path, mode="r", *a, **k):
        if "w" in mode and ".write-test" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(LongtailError, match="cannot write checkpoints in .*Permission denied"):
        api.train(config_from_dict(tiny_config(tiny_fmnist)), tmp_path / "run", progress=False)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_run_directory_that_cannot_be_created(tiny_fmnist):
    with pytest.raises(LongtailError, match="cannot create run directory /proc/longtail-run"):
        api.train(config_from_dict(tiny_config(tiny_fmnist)), "/proc/longtail-run", progress=False)


def test_failing_checkpoint_write_keeps_the_previous_one(tiny_fmnist, tmp_path, monkeypatch):
    from longtail.engine import checkpoint

    raw = tiny_config(tiny_fmnist, train={"epochs": 2})
    real = checkpoint.atomic_write_bytes
    writes = []

    def full_disk(path, data):
        writes.append(path.name)
        if path.name == "last.pt" and writes.count("last.pt") == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    with pytest.raises(LongtailError, match="No space left on device.*resume=True"):
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 0


def test_nonfinite_steps_can_be_skipped(tiny_fmnist, tmp_path, monkeypatch):
    poison_step(monkeypatch, "ce", 0, 4, float("inf"), "ce")
    raw = tiny_config(tiny_fmnist, train={"epochs": 2, "nonfinite": "skip"})
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_mixed_modes_and_sizes_train(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, mode in enumerate(("L", "RGB", "RGBA", "P")):
            for i in range(4):
                size = (int(rng.integers(9, 40)), int(rng.integers(9, 40)))
                img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
                d = tmp_path / "imgs" / split / f"c{c}"
                d.mkdir(parents=True, exist_ok=True)
                img.convert(mode).save(d / f"{i}.png")
    raw = {
        "data": {"dataset": "folder", "root": str(tmp_path / "imgs"), "ratio": None,
                 "image_size": 16},
        "model": {"backbone": "convnet-tiny"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
    }  # fmt: skip
    res = api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert res["num_samples"] == 16


# --- configs from a fuzzer --------------------------------------------------------------------

KEYS = ["name", "seed", "method", "data", "model", "optim", "train", "_base_", "bogus"]
SECTION_KEYS = [
    "name", "loss", "temperature", "dataset", "ratio", "root", "files", "n_max", "backbone",
    "classifier", "classifier_options", "lr", "milestones", "schedule", "epochs", "batch_size",
    "sampler", "transform", "device", "con_transforms", "curriculum", "alpha", "nonfinite",
]  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["hybrid-sc", "two-stage-sc", "cosine", "nan", "-1"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(SECTION_KEYS), inner, max_size=4),
    ),
    max_leaves=8,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=6)))
@example(doc={"_base_": "\n"})  # once drawn at random: a newline in the path split the message
@example(doc={"_base_": "x\ny.yaml"})
@example(doc={"_base_": "  "})
@example(doc={"_base_": ["a.yaml"]})
@example(doc={"_base_": {"a": 1}})
@example(doc={"_base_": ""})
def test_random_yaml_configs_never_raise_a_traceback(doc, tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        validate(load_config(path))
    except LongtailError as e:
        assert "\n" not in str(e)


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.lists(st.sampled_from(KEYS + SECTION_KEYS), min_size=1, max_size=3),
            st.text(max_size=15),
        ),
        max_size=4,
    )
)
def test_random_set_overrides_never_raise_a_traceback(pairs):
    overrides = [".".join(k) + "=" + v for k, v in pairs]
    try:
        validate(load_config(None, overrides))
    except LongtailError as e:
        assert "\n" not in str(e)


# --- divergence and strict JSON ---------------------------------------------------------------


def test_weights_that_stop_being_numbers_stop_the_run_before_their_checkpoint(
    tiny_fmnist, tmp_path, monkeypatch
):
    cls = METHODS.get("ce")
    original = cls.after_optimizer_step

    def poison(self):  # the loss stays finite, a BatchNorm statistic does not
        original(self)
        if self._epoch_seen == 1:
            next(b for n, b in self.named_buffers() if n.endswith("running_var")).fill_(
                float("inf")
            )

    monkeypatch.setattr(cls, "after_optimizer_step", poison)
    monkeypatch.setattr(
        cls, "on_epoch_start", lambda self, e: setattr(self, "_epoch_seen", e), raising=False
    )
    raw = tiny_config(tiny_fmnist, train={"epochs": 3})
    with pytest.raises(LongtailError, match=r"epoch 2: the model's .*running_var is not finite"):
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 0


def test_predictions_that_are_not_numbers_stop_the_run_as_diverged(
    pattern_folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        METHODS.get("ce"), "predict", lambda self, x: torch.full((len(x), 4), float("nan"))
    )
    raw = folder_config(pattern_folder, train={"epochs": 2})  # a validation split
    with pytest.raises(LongtailError, match=r"epoch 1: the model's predictions are not finite"):
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # it never reached a checkpoint


def test_every_json_written_is_strict():
    from longtail import jsonio

    text = jsonio.dumps({"ece": float("nan"), "top": [float("inf"), 0.5], "n": 3}, indent=1)
    assert json.loads(text) == {"ece": None, "top": [None, 0.5], "n": 3}
    assert "NaN" not in text and "Infinity" not in text


# --- the CLI's file arguments from a fuzzer -----------------------------------------------------

RUN_FILES = ["config.yaml", "data.json", "metrics.jsonl", "checkpoints/last.pt", "eval_test.json"]
PLACES = [
    *(f"run/{f}" for f in RUN_FILES),
    "run", "run/new.csv", "run/export/model.pt", "run/predictions.csv", "mine.txt", "new.csv",
    "deep/er/new.pt", "/proc/longtail/x.pt", "/proc/self/status", "", "run/../mine.txt",
]  # fmt: skip
# Files a command may write in the run directory: its own outputs.
OWN = ("eval_", "report.html", "plots/", "export/", "predictions.csv", "run.lock")


def _digests(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    command=st.sampled_from(["predict", "export", "evaluate", "report", "compare"]),
    out=st.sampled_from(PLACES),
    image=st.sampled_from(["a.png", "mine.txt", "run/config.yaml", "run", "nope.png"]),
    force=st.booleans(),
    fmt=st.sampled_from(["torchscript", "onnx"]),
)
def test_cli_file_arguments_never_destroy_a_run_or_trace_back(
    command, out, image, force, fmt, tmp_path_factory
):
    from test_bad_inputs import _invoke, _png, _run

    t = tmp_path_factory.mktemp("fuzz")
    run = _run(t)
    _png(t / "a.png")
    (t / "mine.txt").write_text("the user's")
    before, mine = _digests(run), (t / "mine.txt").read_bytes()

    def at(place: str) -> str:
        return place if place.startswith("/") or not place else str(t / place)

    args = {
        "predict": ["predict", run, at(image), "--out", at(out)],
        "export": ["export", run, "--format", fmt, "--out", at(out)],
        "evaluate": ["evaluate", at(out) or run],
        "report": ["report", at(out) or run],
        "compare": ["compare", at(out) or run],
    }[command]
    code, _, err = _invoke([*args, *(["--force"] if force and command in ("predict", "export")
                                      else [])])  # fmt: skip
    assert code in (0, 1, 2) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 1, err
    after = _digests(run)
    for name, digest in before.items():
        if not name.startswith(OWN):
            assert after.get(name) == digest, f"{command} {out}: {name} changed"
    if not force:
        assert (t / "mine.txt").read_bytes() == mine


# --- the checkpoint and its metrics line are one record ------------------------------------------


@pytest.mark.parametrize("cut", ["line-lost", "line-cut-off"])
def test_a_kill_between_checkpoint_and_metrics_loses_no_line(
    cut, tiny_fmnist, tmp_path, monkeypatch
):
    from longtail.engine.logging import MetricsLog

    raw = tiny_config(tiny_fmnist, train={"epochs": 3})
    api.train(config_from_dict(raw), tmp_path / "full", progress=False)
    write = MetricsLog.write

    def killed_at_epoch_2(self, record):
        if record["epoch"] == 2:
            if cut == "line-cut-off":  # half of the line reached the disk
                with self.path.open("a") as f:
                    f.write(json.dumps(record)[:25])
            raise KeyboardInterrupt
        write(self, record)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(MetricsLog, "write", killed_at_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            api.train(config_from_dict(raw), run, progress=False)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1  # epoch 2 saved
    api.train(config_from_dict(raw), run, resume=True, progress=False)
    timed = ("epoch_time_s", "images_per_s")

    def rows(path):
        return [{k: v for k, v in json.loads(x).items() if k not in timed}
                for x in (path / "metrics.jsonl").read_text().splitlines()]  # fmt: skip

    assert rows(run) == rows(tmp_path / "full")  # every line, each once, all whole


# --- what --resume may change ---------------------------------------------------------------------


def test_resume_extends_a_finished_run_as_if_it_had_been_that_long(
    tiny_fmnist, tmp_path, monkeypatch, capsys
):
    from test_bad_inputs import _invoke

    raw = tiny_config(tiny_fmnist, train={"epochs": 4})  # constant lr: nothing depends on length
    api.train(config_from_dict(raw), tmp_path / "four", progress=False)
    short = {**raw, "train": {**raw["train"], "epochs": 2}}
    api.train(config_from_dict(short), tmp_path / "run", progress=False)
    code, out, err = _invoke(
        ["train", "--out", tmp_path / "run", "--resume", "--set", "train.epochs=4", "--no-progress"]
    )
    assert code == 0, err
    assert "extending the run from 2 to 4 epochs: epochs 3-4 follow the schedule" in out
    a = load_checkpoint(tmp_path / "four" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["epochs"] == 4
    assert json.loads((tmp_path / "run" / "eval_test.json").read_text())["epoch"] == 4
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--set", "optim.lr=0.5"], "optim.lr cannot change"),
        (["--config", "configs/fashion-mnist/demo.yaml"], "leave out --config"),
        (["--set", "train.epochs=1"], "fewer than the 2 epochs this run has trained"),
    ],
)
def test_resume_refuses_other_changes(extra, needle, tiny_fmnist, tmp_path):
    from test_bad_inputs import _invoke

    raw = tiny_config(tiny_fmnist, train={"epochs": 2})
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "config.yaml").read_text()
    code, _, err = _invoke(["train", "--out", tmp_path / "run", "--resume", *extra])
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_resume_refuses_an_extension_that_moves_finished_stages(tiny_fmnist, tmp_path):
    raw = tiny_config(
        tiny_fmnist, method={"name": "two-stage-sc", "classifier_epochs": 1}, train={"epochs": 2}
    )
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    with pytest.raises(UsageError, match="would move the stages of two-stage-sc"):
        api.train(None, tmp_path / "run", resume=True, changes=["train.epochs=4"], progress=False)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_full_disk_while_the_report_is_written_keeps_the_run_and_says_so(
    tiny_fmnist, tmp_path, monkeypatch
):
    import errno

    from longtail.runs import report as reporting

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reporting, "write_report", full)
    raw = tiny_config(tiny_fmnist, train={"report": True})
    with pytest.raises(LongtailError) as error:
        api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    message = str(error.value)
    assert "the run is trained and saved in" in message and "No space left" in message
    assert "longtail report" in message and "\n" not in message
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "eval_test.json").is_file()


def test_ctrl_c_while_the_command_starts_is_one_line():
    """SIGINT while `longtail` is still importing torch: no traceback."""
    cmd = [sys.executable, "-c", "import sys; sys.argv = ['longtail', 'methods']; "
           "from longtail.entry import main; main()"]  # fmt: skip
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.4)  # the interpreter is up; torch takes seconds more to import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and err == "interrupted\n", (proc.returncode, err)


_SWALLOWING_IMPORT = textwrap.dedent("""
    import sys, time
    class Swallow:  # a library whose import catches the KeyboardInterrupt and goes on
        def find_spec(self, name, path=None, target=None):
            if name == "numpy":
                sys.stderr.write("importing numpy\\n"); sys.stderr.flush()
                try:
                    time.sleep(30)
                except KeyboardInterrupt:
                    pass
            return None
    sys.meta_path.insert(0, Swallow())
    sys.argv = ["longtail", "methods"]
    from longtail.entry import main
    main()
""")


def test_ctrl_c_during_an_import_that_swallows_it_still_ends_the_command():
    """The CI failure this guards: a Ctrl-C inside numpy's import was swallowed, the command
    went on with a half-imported numpy and died in matplotlib with a traceback."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SWALLOWING_IMPORT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stderr.readline() == "importing numpy\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n" and out == "", (proc.returncode, err)


# --- SIGTERM: what a cluster's scheduler sends before it kills a job ---------------------------


def _sigterm_at(monkeypatch, name: str, epoch: int, step: int) -> None:
    """The process receives SIGTERM as step ``step`` (1-based) of epoch ``epoch`` (1-based)
    starts computing."""
    import os

    cls = METHODS.get(name)
    original, seen = cls.training_step, {}

    def step_fn(self, batches, e):
        seen[e] = seen.get(e, 0) + 1
        if (e + 1, seen[e]) == (epoch, step):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batches, e)

    monkeypatch.setattr(cls, "training_step", step_fn)


@pytest.mark.parametrize(
    ("name", "epoch", "step"),
    [("hybrid-sc", 2, 3), ("dscl", 1, 2), ("crt", 3, 2)],  # crt: in its classifier stage
)
def test_sigterm_saves_the_epoch_in_progress_and_resumes_exactly(
    name, epoch, step, tiny_fmnist, tmp_path, monkeypatch
):
    method = {"name": name, **({"classifier_epochs": 1} if name in ("dscl", "crt") else {})}
    if name == "dscl":
        method["queue_size"] = 32
    raw = tiny_config(tiny_fmnist, method=method, train={"epochs": 3, "batch_size": 8})
    cls = METHODS.get(name)
    step_fn = cls.training_step

    def noisy(self, batches, e):  # a step that draws from torch's generator, as dropout does
        terms = step_fn(self, batches, e)
        return {**terms, "loss": terms["loss"] * (1 + 0.1 * torch.rand(()))}

    monkeypatch.setattr(cls, "training_step", noisy)
    api.train(config_from_dict(raw), tmp_path / "full", progress=False)
    with monkeypatch.context() as m:
        _sigterm_at(m, name, epoch, step)
        with pytest.raises(LongtailError, match=rf"SIGTERM in epoch {epoch} after step {step} "):
            api.train(config_from_dict(raw), tmp_path / "cut", progress=False)
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert ckpt["partial"]["epoch"] == epoch - 1 and ckpt["partial"]["step"] == step
    logged = tmp_path / "cut" / "metrics.jsonl"
    lines = len(_rows(tmp_path / "cut")) if logged.exists() else 0
    assert lines == epoch - 1  # the epoch in progress is not logged yet
    api.train(config_from_dict(raw), tmp_path / "cut", resume=True, progress=False)
    _same_weights(tmp_path / "full", tmp_path / "cut")
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    assert json.loads((tmp_path / "cut" / "eval_test.json").read_text()) == json.loads(
        (tmp_path / "full" / "eval_test.json").read_text()
    )


def test_sigterm_on_the_command_line_exits_143_with_the_resume_command(tiny_fmnist, tmp_path):
    raw = tiny_config(tiny_fmnist, train={"epochs": 2, "batch_size": 8})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        from longtail.methods import METHODS
        cls = METHODS.get("ce")
        step, seen = cls.training_step, []
        def term(self, b, e):
            seen.append(e)
            if len(seen) == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(self, b, e)
        cls.training_step = term
        sys.argv = ["longtail", "train", "--config", {str(tmp_path / "c.yaml")!r}, "--out",
                    {str(out)!r}, "--no-progress"]
        from longtail.entry import main
        main()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 143, done.stderr
    steps = load_checkpoint(out / "checkpoints" / "last.pt")["partial"]["steps"]
    assert done.stderr == (
        f"stopped by SIGTERM in epoch 1 after step 4 of {steps}; saved in {out}: continue with "
        f"`longtail train --out {out} --resume`\n"
    )


def test_ctrl_c_inside_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    """Typer turns a KeyboardInterrupt in a command into an exit code that it returns, not
    raises, where the command line runs it as we do: a Ctrl-C of `study status --watch`
    exited 0, silently. Any command: one line, exit 130."""
    from longtail import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.METHODS, "names", interrupted)
    monkeypatch.setattr(sys, "argv", ["longtail", "methods"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 130 and capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("args", [[], ["study"], ["data"]])
def test_a_command_without_arguments_shows_its_help_and_no_empty_error(args, monkeypatch, capsys):
    """Click's "no arguments, here is the help" is a usage error with no message: it printed
    "error:  (see longtail --help)" under the help."""
    from longtail import cli

    monkeypatch.setattr(sys, "argv", ["longtail", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "Usage: longtail" in out and err == "", err
