import json
import sys
from pathlib import Path

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
    assert set(stats) == {"num_classes", "classes", "counts", "total", "groups", "skipped_links"}
    assert stats["skipped_links"] == []
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


# --- what a run says before its first epoch ---------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
FAST = ["--set", "model.backbone=convnet-tiny", "--set", "train.device=cpu",
        "--set", "train.report=false", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def long_tailed_photos(tmp_path_factory):
    """A user's own long-tailed folder: classes checker, columns, rows and solid (labels 0-3)
    with 120, 60, 24 and 12 training images."""
    from conftest import make_pattern_folder

    return make_pattern_folder(tmp_path_factory.mktemp("photos"), train_counts=(12, 24, 60, 120))


def test_a_benchmark_recipe_on_a_users_folder_says_what_it_keeps(
    long_tailed_photos, tmp_path, monkeypatch, capsys
):
    # The command a newcomer reaches for: a CIFAR recipe (data.ratio 100) on their own folder.
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "--config", REPO / "configs/cifar10/hybrid-sc-r100.yaml",
        "--set", "data.dataset=folder", "--set", f"data.root={long_tailed_photos}",
        "--set", "train.epochs=2", "--set", "train.batch_size=8", *FAST,
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    used, counts = data["total"], data["counts"]
    assert data["found"] == 216 and used < 216 and counts[0] == 120 and 0 < counts[3] < 12
    warnings = [x for x in err.splitlines() if x.startswith("warning: ")]
    assert warnings == [
        f"warning: data.ratio=100.0 keeps {used} of the 216 training images in "
        f"{long_tailed_photos} (rarest class solid: 12 -> {counts[3]}); set data.ratio=null "
        "to train on the data as it is",
        "warning: optim.milestones [120, 160] lie past the last epoch (2): that lr decay never "
        "happens; give --epochs 2 instead of train.epochs to scale the recipe's schedule",
    ]
    # The summary comes before the first epoch's line, and data.json keeps the same facts.
    lines = out.splitlines()
    assert lines[0] == (
        f"data: folder from {long_tailed_photos}, 4 classes, {used} of 216 training images "
        "(data.ratio 100.0), test 24; 32 px, 3 channels"
    )
    steps = used // 8  # the feature branch's instance sampler sets the epoch
    schedule = "lr 0.5 constant (milestone 120, 160 past the last epoch, 2)"
    assert (
        lines[1]
        == f"train: hybrid-sc, convnet-tiny from random init, 2 epochs x {steps} steps, {schedule}"
    )
    assert any(x.startswith("test top-1") for x in lines[2:])  # ... and training after it
    assert data["plan"] == [
        {"stage": "train", "epochs": 2, "steps_per_epoch": steps,
         "schedule": schedule}
    ]  # fmt: skip
    assert (data["read_from"], data["test"], data["method"]) == (
        str(long_tailed_photos),
        24,
        "hybrid-sc",
    )


def test_a_users_folder_as_it_is_trains_without_a_warning(
    long_tailed_photos, tmp_path, monkeypatch, capsys
):
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "--config", REPO / "configs/fashion-mnist/demo.yaml",
        "--set", "data.dataset=folder", "--set", f"data.root={long_tailed_photos}",
        "--set", "data.ratio=null", "--set", "data.n_max=null", "--set", "data.image_size=12",
        "--set", "train.epochs=1", "--set", "train.batch_size=16", *FAST, "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    assert "training images in" not in err  # no subsampling warning (the folder as it is)
    assert out.splitlines()[0].startswith("data: folder from ") and " 216 of 216 " in out


def test_the_readmes_own_images_commands_run_as_written(long_tailed_photos, tmp_path):
    """The README's "Your own images" commands, in a folder where my-photos is a user's."""
    import re
    import shutil
    import subprocess

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- your-own-images:")[1].split("<!-- end -->")[0]
    commands = [
        line.strip() for line in block.replace("\\\n", " ").splitlines()[1:] if line.strip()
    ]
    assert [c.split()[:2] for c in commands] == [
        ["longtail", "data"], ["longtail", "train"], ["longtail", "evaluate"]
    ]  # fmt: skip
    shutil.copytree(long_tailed_photos, tmp_path / "my-photos")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    outs = []
    for command in commands:
        done = subprocess.run(
            [str(bin_dir / "longtail"), *re.split(r"\s+", command)[1:]],
            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, (command, done.stderr)
        assert "warning" not in done.stderr, done.stderr
        outs.append(done.stdout)
    assert "solid" in outs[0] and "216 of 216 training images" in outs[1]
    assert "top-1" in outs[2] and (tmp_path / "runs" / "my-photos" / "eval_test.json").is_file()
