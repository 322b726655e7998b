"""What a finished run gives a person: report, comparison, predictions, exported models,
class names in the CLI's output."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PATTERNS, folder_config
from longtail import api
from longtail.config import config_from_dict
from longtail.errors import DataError, UsageError
from longtail.evaluation.report import PLOTS
from longtail.runs.deploy import export_run, predict_images
from longtail.runs.report import compare_row, format_table, pca_2d, stratified_sample

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _longtail(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longtail", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.fixture(scope="module")
def trained(pattern_folder, tmp_path_factory) -> Path:
    """A short ce run on the pattern folder (4 named classes), report on."""
    out = tmp_path_factory.mktemp("runs") / "ce"
    cfg = folder_config(pattern_folder, train={"epochs": 4, "report": True})
    api.train(config_from_dict(cfg), out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained_bbn(pattern_folder, tmp_path_factory) -> Path:
    """bbn: a method that predicts and represents images its own way (two branches)."""
    out = tmp_path_factory.mktemp("runs") / "bbn"
    cfg = folder_config(
        pattern_folder, method={"name": "bbn"}, train={"epochs": 2, "report": False}
    )
    api.train(config_from_dict(cfg), out, progress=False)
    return out


# --- report -------------------------------------------------------------------------------------


def test_training_writes_a_report_with_every_plot(trained):
    page = (trained / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(PLOTS)  # self-contained: every plot inside the page
    for name in PLOTS:
        png = (trained / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC)
        pixels = np.asarray(Image.open(trained / "plots" / f"{name}.png").convert("L"))
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels.std() > 10, f"{name}.png looks blank"
    for c in PATTERNS:  # class names, in the per-class table
        assert f"<td>{c}</td>" in page
    evaluation = json.loads((trained / "eval_test.json").read_text())
    assert f"{evaluation['top1']:.4f}" in page


def test_report_rows_are_head_to_tail(trained):
    page = (trained / "report.html").read_text(encoding="utf-8")
    names = re.findall(r"<tr><td>\d+</td><td>([a-z]+)</td><td>(\d+)</td>", page)
    counts = [int(n) for _, n in names]
    assert [c for c, _ in names] == list(PATTERNS)  # the folder's counts fall 24, 16, 10, 6
    assert counts == sorted(counts, reverse=True)


def test_evaluation_reliability_gives_its_ece(trained):
    ev = json.loads((trained / "eval_test.json").read_text())
    bins = ev["reliability"]
    assert sum(bins["count"]) == ev["num_samples"]
    gap = sum(
        c * abs(a - f)
        for c, a, f in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True)
        if c
    )
    assert gap / ev["num_samples"] == pytest.approx(ev["ece"])


def test_report_command_rewrites_the_report(trained, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "report.html").unlink()
    shutil.rmtree(run / "plots")
    done = _longtail("report", str(run))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {run / 'report.html'}"
    assert sorted(p.stem for p in (run / "plots").glob("*.png")) == sorted(PLOTS)


def test_report_of_a_directory_that_is_no_run_is_one_line(tmp_path):
    done = _longtail("report", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "config.yaml is missing" in done.stderr


def test_pca_is_the_top_two_principal_components():
    gen = torch.Generator().manual_seed(0)
    # Variance 9 along one direction, 4 along another, little elsewhere.
    basis = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0]
    scales = torch.tensor([3.0, 2.0, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    x = (torch.randn(500, 6, generator=gen, dtype=torch.float64) * scales) @ basis.T
    x = x / x.std(0)  # pca_2d standardises; give it standardised data to compare with numpy
    coords = pca_2d(x)
    centred = (x - x.mean(0)).numpy()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    for k in range(2):  # equal up to each component's sign
        np.testing.assert_allclose(np.abs(coords[:, k]), np.abs(expected[:, k]), atol=1e-8)
    assert coords[:, 0].var() >= coords[:, 1].var()
    np.testing.assert_array_equal(coords, pca_2d(x))  # deterministic, signs fixed


def test_stratified_sample_takes_the_same_number_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    picked = stratified_sample(labels, total=30)
    assert np.all(np.diff(picked) > 0)
    assert np.bincount(labels[picked]).tolist() == [10, 10, 3]


# --- compare ------------------------------------------------------------------------------------


def test_compare_has_a_row_per_run_with_its_numbers(trained, trained_bbn):
    rows = [compare_row(trained), compare_row(trained_bbn)]
    for row, run in zip(rows, (trained, trained_bbn), strict=True):
        ev = json.loads((run / "eval_test.json").read_text())
        assert row["top1"] == ev["top1"] and row["ece"] == ev["ece"]
        assert row["epochs"] == ev["epoch"]
        times = [json.loads(x)["epoch_time_s"] for x in (run / "metrics.jsonl").open()]
        assert row["wall_time_s"] == pytest.approx(sum(times), abs=0.06)
    assert [r["method"] for r in rows] == ["ce", "bbn"]
    table = format_table(rows, markdown=True).splitlines()
    assert len(table) == 4 and table[1].startswith("|---")
    assert f"{rows[1]['top1']:.4f}" in table[3]
    done = _longtail("compare", str(trained), str(trained_bbn), "--markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == table


def test_compare_names_a_run_without_evaluation(trained, tmp_path):
    run = tmp_path / "no-eval"
    shutil.copytree(trained, run)
    (run / "eval_test.json").unlink()
    with pytest.raises(UsageError, match="longtail evaluate"):
        compare_row(run)


# --- predict ------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["trained", "trained_bbn"])
def test_predict_on_the_test_folder_reproduces_evaluation(run, request, pattern_folder, tmp_path):
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "p.csv"
    done = _longtail("predict", str(run_dir), str(pattern_folder / "test"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    with out.open() as f:
        rows = list(csv.DictReader(f))
    files = sorted((pattern_folder / "test").rglob("*.png"))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    # The same preprocessing as evaluation: the same predictions, so the same accuracy.
    correct = [Path(r["path"]).parent.name == r["class"] for r in rows]
    ev = json.loads((run_dir / "eval_test.json").read_text())
    assert np.mean(correct) == pytest.approx(ev["top1"])
    for r in rows:
        top = [t.split(":") for t in r["top_k"].split(";")]
        assert len(top) == 4  # top-5 of 4 classes
        assert top[0][0] == r["class"] and float(top[0][1]) == pytest.approx(
            float(r["probability"])
        )
        probs = [float(p) for _, p in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)


def test_predict_takes_any_size_and_mode(trained, tmp_path):
    Image.new("L", (40, 25), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (7, 9), (10, 200, 30, 255)).save(tmp_path / "small.png")
    rows = predict_images(trained, [tmp_path], top_k=2)
    assert [Path(r["path"]).name for r in rows] == ["grey.png", "small.png"]
    assert all(r["class"] in PATTERNS and len(r["top"]) == 2 for r in rows)


def test_predict_bad_inputs_are_named(trained, tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (12, 12)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:40])  # a valid header, the rest cut off
    with pytest.raises(DataError, match="cut.png"):
        predict_images(trained, [cut])
    with pytest.raises(UsageError, match="does not exist"):
        predict_images(trained, [tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        predict_images(trained, [tmp_path / "empty"])
    done = _longtail("predict", str(trained), str(cut))
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "cut.png" in done.stderr


# --- export -------------------------------------------------------------------------------------


def _normalised_batch(run_dir: Path, n: int = 3) -> torch.Tensor:
    info = api.read_run_info(run_dir)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, info.channels, info.image_size, info.image_size, generator=gen)


def _reference_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    _, method, _ = api.load_run(run_dir, device=torch.device("cpu"))
    with torch.no_grad():
        return method.predict(x)


@pytest.mark.parametrize("run", ["trained", "trained_bbn"])
def test_onnx_export_matches_pytorch(run, request, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency")
    run_dir = request.getfixturevalue(run)
    path = export_run(run_dir, "onnx", tmp_path / "m.onnx")
    x = _normalised_batch(run_dir, 5)  # another batch size than the export's example
    session = ort.InferenceSession(str(path))
    (logits,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(logits, _reference_logits(run_dir, x).numpy(), atol=1e-4)
    card = json.loads(path.with_name("m.onnx.json").read_text())
    assert card["classes"] == sorted(PATTERNS)  # a folder's classes in name order
    assert card["input"]["shape"] == ["batch", 3, 12, 12]
    assert card["mean"] == api.read_run_info(run_dir).mean


def test_torchscript_export_matches_pytorch(trained, tmp_path):
    done = _longtail(
        "export", str(trained), "--format", "torchscript", "--out", str(tmp_path / "m.pt")
    )
    assert done.returncode == 0, done.stderr
    model = torch.jit.load(str(tmp_path / "m.pt"))
    x = _normalised_batch(trained)
    torch.testing.assert_close(model(x), _reference_logits(trained, x), atol=1e-5, rtol=1e-5)


def _prepare_from_card(card: dict, path: Path) -> np.ndarray:
    """An image made ready for the exported model with nothing but its card (and PIL)."""
    channels = card["input"]["shape"][1]
    img = Image.open(path).convert("L" if channels == 1 else "RGB")
    side, crop = card["resize_shorter_side"], card["centre_crop"]
    w, h = img.size
    if min(w, h) != side:
        img = img.resize((round(w * side / min(w, h)), round(h * side / min(w, h))), Image.BILINEAR)
    left, top = (img.size[0] - crop) // 2, (img.size[1] - crop) // 2
    x = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    x = x.reshape(crop, crop, channels).transpose(2, 0, 1)
    mean = np.asarray(card["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(card["std"], dtype=np.float32)[:, None, None]
    return (x - mean) / std


def test_the_exported_model_and_its_card_alone_reproduce_evaluation(
    trained, pattern_folder, tmp_path
):
    path = export_run(trained, "torchscript", tmp_path / "m.pt")
    card = json.loads(path.with_name("m.pt.json").read_text())
    pre = json.loads((trained / "data.json").read_text())["preprocess"]
    assert (card["mean"], card["std"]) == (pre["mean"], pre["std"])
    assert card["centre_crop"] == pre["image_size"] and card["input"]["shape"][1] == pre["channels"]
    files = sorted((pattern_folder / "test").rglob("*.png"))
    x = torch.from_numpy(np.stack([_prepare_from_card(card, f) for f in files]))
    with torch.no_grad():
        probs = torch.jit.load(str(path))(x).softmax(dim=1)
    rows = predict_images(trained, files)
    assert [card["classes"][i] for i in probs.argmax(1)] == [r["class"] for r in rows]
    np.testing.assert_allclose(probs.max(1).values, [r["probability"] for r in rows], atol=1e-5)
    correct = [
        f.parent.name == card["classes"][i] for f, i in zip(files, probs.argmax(1), strict=True)
    ]
    ev = json.loads((trained / "eval_test.json").read_text())
    assert np.mean(correct) == pytest.approx(ev["top1"])


def test_export_bad_format_is_a_usage_error(trained):
    done = _longtail("export", str(trained), "--format", "tflite")
    assert done.returncode == 2 and "onnx, torchscript" in done.stderr


# --- class names in the CLI ---------------------------------------------------------------------


def test_evaluate_names_classes(trained):
    done = _longtail("evaluate", str(trained), "--json")
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert list(res["per_class_by_name"]) == sorted(PATTERNS)
    assert list(res["per_class_by_name"].values()) == res["per_class"]
    text = _longtail("evaluate", str(trained)).stdout
    lines = [ln.split() for ln in text.splitlines() if ln.split()[:1] and ln.split()[0] in PATTERNS]
    assert [ln[0] for ln in lines] == list(PATTERNS)  # head to tail
    assert [int(ln[1]) for ln in lines] == [24, 16, 10, 6]


def test_data_stats_lists_classes_head_to_tail(pattern_folder):
    done = _longtail("data", "stats", str(pattern_folder / "train"), "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["classes"] == sorted(PATTERNS)  # a folder's classes in name order
    by_name = dict(zip(stats["classes"], stats["counts"], strict=True))
    text = _longtail("data", "stats", str(pattern_folder / "train")).stdout.splitlines()
    rows = [ln.split() for ln in text if ln.split()[:1] and ln.split()[0] in PATTERNS]
    assert [int(n) for _, n in rows] == sorted(by_name.values(), reverse=True)
    assert all(by_name[c] == int(n) for c, n in rows)


# --- the report in a real browser ---------------------------------------------------------------


def _chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )


@pytest.mark.skipif(_chromium() is None, reason="no chromium (Debian package `chromium`) here")
def test_report_renders_in_a_browser_with_every_image(trained, tmp_path):
    browser = _chromium()
    assert browser is not None
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = (trained / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None, dom.stderr[-500:]
    images = re.search(r'data-images="(\d+)"', body.group(0))
    loaded = re.search(r'data-loaded="(\d+)"', body.group(0))
    assert images and loaded, body.group(0)
    assert int(images.group(1)) == int(loaded.group(1)) == len(PLOTS)
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,1600", f"--screenshot={shot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01, "the page rendered blank"


# --- evaluate: which file, and not while training -------------------------------------------


def test_evaluating_best_keeps_the_last_epochs_result(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = (run / "eval_test.json").read_text()
    done = _longtail("evaluate", str(run), "--checkpoint", "best", "--json")
    assert done.returncode == 0, done.stderr
    best = json.loads((run / "eval_test_best.json").read_text())
    assert best["checkpoint"] == "best" and best == json.loads(done.stdout) | {
        "confusion": best["confusion"]
    }
    assert (run / "eval_test.json").read_text() == last  # still the last epoch's
    assert compare_row(run)["top1"] == json.loads(last)["top1"]


def test_evaluate_refuses_a_run_that_is_training(trained, tmp_path):
    import shutil

    from longtail.engine.run_dir import RunDir

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "eval_test.json").read_text()
    refused = pytest.raises(UsageError, match="being trained by another longtail process")
    with RunDir(run).locked(), refused:  # the lock, as `longtail train` holds it
        api.evaluate_run(run)
    assert (run / "eval_test.json").read_text() == before
    assert api.evaluate_run(run, save=False)["top1"] == json.loads(before)["top1"]


def test_evaluate_in_a_read_only_run_still_gives_its_result(trained, monkeypatch, capsys):
    import errno

    from longtail import cli
    from longtail.runs import read as runs

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runs, "atomic_write_bytes", read_only)
    monkeypatch.setattr(sys, "argv", ["longtail", "evaluate", str(trained)])
    cli.main()  # no SystemExit: exit code 0
    out, err = capsys.readouterr()
    assert "top-1" in out
    assert err.startswith("warning: could not write") and "Read-only file system" in err
    assert err.count("\n") == 1


def test_report_and_export_in_a_read_only_run_are_one_line(trained, monkeypatch, capsys):
    import errno

    from longtail import cli
    from longtail.runs import deploy
    from longtail.runs import report as reporting

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(reporting, "write_report", read_only)
    monkeypatch.setattr(deploy.os, "replace", read_only)
    for args in (["report", str(trained)], ["export", str(trained), "--format", "torchscript"]):
        monkeypatch.setattr(sys, "argv", ["longtail", *args])
        with pytest.raises(SystemExit) as done:
            cli.main()
        err = capsys.readouterr().err
        assert done.value.code == 1 and err.count("\n") == 1, err
        assert "Read-only file system" in err and "Traceback" not in err
    assert not list((trained / "export").glob(".*.tmp")) if (trained / "export").exists() else True
