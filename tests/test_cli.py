import json
import sys

import pytest

from conftest import make_fashion_mnist
from longtail import cli


def run_cli(monkeypatch, capsys, *args):
    """Run ``longtail ARGS`` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["longtail", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_json(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "methods", "--json")
    names = {m["name"] for m in json.loads(out)}
    assert (
        code == 0
        and {"ce", "hybrid-sc", "hybrid-psc", "hybrid-mpsc", "ce-ce", "two-stage-sc"} <= names
    )


@pytest.mark.parametrize(("extra", "head", "tail"), [([], 60, 6), (["--n-max", 30], 30, 3)])
def test_data_stats_json(extra, head, tail, tmp_path, monkeypatch, capsys):
    root = make_fashion_mnist(tmp_path / "f", train_per_class=60)
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        *("data", "stats", "fashion-mnist", "--ratio", 10, *extra, "--root", root, "--json"),
    )
    stats = json.loads(out)
    assert code == 0
    assert set(stats) == {"num_classes", "classes", "counts", "total", "groups"}
    assert (
        stats["counts"][0] == head
        and stats["counts"][-1] == tail
        and stats["total"] == sum(stats["counts"])
    )
    assert set(stats["groups"]) == {"many", "medium", "few"}
    assert sorted(sum(stats["groups"].values(), [])) == list(range(10))


def test_data_stats_n_max_needs_ratio(tmp_path, monkeypatch, capsys):
    root = make_fashion_mnist(tmp_path / "f", train_per_class=60)
    code, _, err = run_cli(
        monkeypatch, capsys, "data", "stats", "fashion-mnist", "--n-max", 30, "--root", root
    )
    assert code == 2 and "--ratio" in err


def test_train_then_evaluate(tiny_fmnist, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--set",
        f"data.root={tiny_fmnist}",
        "--set",
        "data.ratio=4",
        "--set",
        "model.backbone=convnet-tiny",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=16",
        "--out",
        out_dir,
        "--no-progress",
    )
    assert code == 0, err
    assert "test top-1" in out and str(out_dir) in out
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", out_dir, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert {"top1", "many", "medium", "few", "per_class", "ece"} <= set(res)
    assert 0 <= res["top1"] <= 1 and len(res["per_class"]) == 10
    # the same run directory again: refused, not overwritten
    code, _, err = run_cli(
        monkeypatch, capsys, "train", "--set", f"data.root={tiny_fmnist}", "--out", out_dir
    )
    assert code == 2 and "already exists" in err and "Traceback" not in err


def _image_tree(root, splits=("train", "val", "test"), per_class=(6, 2)):
    from PIL import Image

    for split in splits:
        for c, n in zip(("cat", "dog"), per_class, strict=True):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 3):
                Image.new("RGB", (12, 12), (i * 30, 80 * (c == "dog"), 0)).save(d / f"{i}.png")
    return root


def test_data_stats_on_a_folder_path(tmp_path, monkeypatch, capsys):
    root = _image_tree(tmp_path / "imgs")
    code, out, err = run_cli(monkeypatch, capsys, "data", "stats", root, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["counts"] == [6, 2] and stats["total"] == 8 and stats["groups"]["few"] == [0, 1]


def test_best_checkpoint_comes_from_the_validation_split(tmp_path, monkeypatch, capsys):
    root = _image_tree(tmp_path / "imgs")
    run = tmp_path / "run"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--set",
        "data.dataset=folder",
        "--set",
        f"data.root={root}",
        "--set",
        "data.ratio=null",
        "--set",
        "data.val_split=val",
        "--set",
        "data.image_size=8",
        "--set",
        "model.backbone=convnet-tiny",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.epochs=3",
        "--out",
        run,
        "--no-progress",
    )
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val/top1" in r for r in rows)
    best_epoch = max(rows, key=lambda r: r["val/top1"])["epoch"]  # first epoch reaching the max
    code, out, err = run_cli(
        monkeypatch, capsys, "evaluate", run, "--checkpoint", "best", "--split", "val", "--json"
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["epoch"] == best_epoch and res["checkpoint"] == "best"
    assert res["top1"] == max(r["val/top1"] for r in rows)
