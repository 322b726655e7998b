import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FMNIST_ROOT
from longtail.data import sources
from longtail.data.sources import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    ArraySource,
    FileSource,
    dataset_for_path,
    default_root,
    load_source,
    read_idx,
)
from longtail.errors import DataError

FMNIST = FMNIST_ROOT


def test_registered_names():
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion-mnist", "folder", "json", "list"]
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid: cifar10, cifar100"):
        load_source("mnist", None, "train")


# --- CIFAR ---------------------------------------------------------------------------------


def _cifar_rows(labels, start=0):
    """Images whose R, G, B planes are constant 10*i, 10*i+1, 10*i+2, in CIFAR's row layout."""
    rows = []
    for i in range(start, start + len(labels)):
        planes = [np.full(1024, 10 * i + ch, np.uint8) for ch in range(3)]
        planes[0][:32] = 255  # first image row of the red plane marks orientation
        rows.append(np.concatenate(planes))
    return np.stack(rows)


def _dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(1, 6):
        labels = [b % 10, (b + 1) % 10]
        _dump(
            folder / f"data_batch_{b}", {b"data": _cifar_rows(labels, 2 * b - 2), b"labels": labels}
        )
    _dump(folder / "test_batch", {b"data": _cifar_rows([3, 4, 5]), b"labels": [3, 4, 5]})
    names = b"airplane automobile bird cat deer dog frog horse ship truck".split()
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return tmp_path


def test_cifar10_reads_real_format(cifar10_root):
    train = load_source("cifar10", cifar10_root, "train")
    assert len(train) == 10 and train.channels == 3 and train.load(0).shape[1:] == (32, 32)
    assert train.targets.dtype == np.int64
    assert train.targets.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert train.classes[0] == "airplane" and train.num_classes == 10
    assert train.mean == sources.CIFAR10_MEAN and len(train.std) == 3
    img = train.load(3)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert img[1].unique().tolist() == [31] and img[2].unique().tolist() == [32]
    assert img[0, 0].unique().tolist() == [255] and img[0, 1].unique().tolist() == [30]
    test = load_source("cifar10", cifar10_root / "cifar-10-batches-py", "test")
    assert test.targets.tolist() == [3, 4, 5]


def test_cifar_errors(cifar10_root, tmp_path):
    with pytest.raises(DataError, match="no 'val' split; available: train, test"):
        load_source("cifar10", cifar10_root, "val")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_source("cifar10", cifar10_root, "dev")
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_source("cifar10", missing, "train")
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg
    assert f"longtail data download cifar10 --root {missing}" in msg
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_source("cifar10", cifar10_root, "train")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_refuses_foreign_pickles(cifar10_root):
    _dump(cifar10_root / "cifar-10-batches-py" / "test_batch", {b"data": _Evil()})
    with pytest.raises(DataError, match="unexpected object"):
        load_source("cifar10", cifar10_root, "test")


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"c{i}".encode() for i in range(100)]
    train = {b"data": _cifar_rows([0, 99]), b"fine_labels": [0, 99], b"coarse_labels": [0, 19]}
    _dump(folder / "train", train, protocol=4)
    _dump(folder / "test", {b"data": _cifar_rows([5]), b"fine_labels": [5]})
    _dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []})
    src = load_source("cifar100", tmp_path, "train")
    assert src.targets.tolist() == [0, 99] and src.num_classes == 100 and src.classes[99] == "c99"
    assert len(load_source("cifar100", folder, "test")) == 1


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _idx_bytes(arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def _write_fmnist(folder, compress):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
            f"{prefix}-labels-idx1-ubyte": np.arange(n) % 10,
        }
        for name, arr in files.items():
            data = _idx_bytes(arr)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


@pytest.mark.parametrize(
    ("layout", "compress"), [("", True), ("", False), ("FashionMNIST/raw", True)]
)
def test_fashion_mnist_layouts(tmp_path, layout, compress):
    _write_fmnist(tmp_path / layout, compress)
    src = load_source("fashion-mnist", tmp_path, "train")
    assert len(src) == 6 and src.channels == 1 and src.classes == FASHION_MNIST_CLASSES
    assert src.targets.tolist() == [0, 1, 2, 3, 4, 5]
    assert src.load(2).shape == (1, 28, 28) and src.load(2).dtype == torch.uint8
    assert src.mean == (0.2860,) and src.std == (0.3530,)
    assert len(load_source("fashion-mnist", tmp_path, "test")) == 3


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_source("fashion-mnist", tmp_path, "train")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "longtail data download fashion-mnist --root" in msg
    with pytest.raises(DataError, match="available: train, test"):
        load_source("fashion-mnist", tmp_path, "val")
    _write_fmnist(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_source("fashion-mnist", tmp_path, "train")
    path.write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="bad header"):
        read_idx(path)


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_and_its_stats():
    src = load_source("fashion-mnist", FMNIST, "train")
    assert len(src) == 60000 and np.bincount(src.targets).tolist() == [6000] * 10
    pixels = src.images.astype(np.float32) / 255
    assert abs(pixels.mean() - src.mean[0]) < 1e-4
    assert abs(pixels.std() - src.std[0]) < 1e-4
    assert len(load_source("fashion-mnist", FMNIST, "test")) == 10000


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGTAIL_DATA", str(tmp_path))
    assert default_root("cifar10") == tmp_path / "cifar10"
    monkeypatch.delenv("LONGTAIL_DATA")
    assert default_root("cifar100") == Path.home() / ".cache" / "longtail" / "cifar100"
    (tmp_path / "system" / "fashion-mnist").mkdir(parents=True)
    monkeypatch.setenv("LONGTAIL_SYSTEM_DATA", str(tmp_path / "system"))
    monkeypatch.setenv("LONGTAIL_DATA", str(tmp_path / "empty"))
    assert default_root("fashion-mnist") == tmp_path / "system" / "fashion-mnist"
    assert default_root("cifar10") == tmp_path / "empty" / "cifar10"  # no system copy
    with pytest.raises(ValueError):
        default_root("nope")


# --- image files -----------------------------------------------------------------------------


def _png(path, color=(200, 10, 10), mode="RGB", size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


@pytest.fixture
def folder_root(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "train" / "zebra" / "a.png")
    _png(root / "train" / "zebra" / "sub" / "b.PNG")
    _png(root / "train" / "ant" / "c.png", mode="L")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    _png(root / "val" / "bee" / "d.png")
    return root


def test_folder_dataset(folder_root):
    src = load_source("folder", folder_root, "train")
    assert isinstance(src, FileSource)
    assert src.classes == ["ant", "bee", "zebra"]  # union over splits, sorted
    assert src.targets.tolist() == [0, 2, 2]
    assert src.paths[0] == "train/ant/c.png"
    img = src.load(0)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 6)
    assert src.mean == sources.IMAGENET_MEAN and src.channels == 3
    val = load_source("folder", folder_root, "val")
    assert val.targets.tolist() == [1]
    with pytest.raises(DataError, match="available: train, val"):
        load_source("folder", folder_root, "test")
    with pytest.raises(ValueError, match="needs root"):
        load_source("folder", None, "train")


def test_unreadable_image_names_full_path(folder_root):
    src = load_source("folder", folder_root, "train")
    bad = folder_root / "train" / "zebra" / "a.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"cannot read image {bad.resolve()}"):
        src.load(1)
    bad.unlink()
    with pytest.raises(DataError, match=str(bad.resolve())):
        src.load(1)


def test_list_dataset(tmp_path):
    _png(tmp_path / "train" / "x 1.png")
    _png(tmp_path / "train" / "y.png")
    (tmp_path / "train.txt").write_text("train/x 1.png 0\n\ntrain/y.png 4\n")
    (tmp_path / "bad.txt").write_text("train/y.png 1\ntrain/y.png\n")
    files = {"train": "train.txt", "val": "bad.txt"}
    src = load_source("list", tmp_path, "train", files=files)
    assert src.paths == ["train/x 1.png", "train/y.png"] and src.targets.tolist() == [0, 4]
    assert src.num_classes == 5 and src.load(0).size == (8, 6)
    assert load_source("list", tmp_path, "train", files=files, num_classes=10).num_classes == 10
    with pytest.raises(DataError, match="label 4 but num_classes is 3"):
        load_source("list", tmp_path, "train", files=files, num_classes=3)
    with pytest.raises(DataError, match="bad.txt:2"):
        load_source("list", tmp_path, "val", files=files)
    with pytest.raises(DataError, match="no 'test' split; available: train, val"):
        load_source("list", tmp_path, "test", files=files)
    with pytest.raises(ValueError, match="files="):
        load_source("list", tmp_path, "train")
    # Without a root, paths are relative to the list file's folder.
    assert (
        load_source("list", None, "train", files={"train": str(tmp_path / "train.txt")}).root
        == tmp_path
    )


def test_json_dataset(tmp_path):
    _png(tmp_path / "img" / "a.jpg")
    ann = {
        "annotations": [{"fpath": "img/a.jpg", "category_id": 2, "image_id": 7}],
        "num_classes": 4,
        "categories": [{"id": 2, "name": "heron"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(ann))
    (tmp_path / "broken.json").write_text(json.dumps({"images": []}))
    src = load_source("json", tmp_path, "train", files={"train": "train.json"})
    assert src.num_classes == 4 and src.targets.tolist() == [2] and src.classes[2] == "heron"
    assert src.load(0).mode == "RGB"
    with pytest.raises(DataError, match="not an annotation file"):
        load_source("json", tmp_path, "val", files={"val": "broken.json"})


def _open_path(path, split="train", root=None):
    where = dataset_for_path(path, root=root)
    return load_source(
        where["dataset"], where["root"], split, **where["files"] and {"files": where["files"]}
    )


def test_dataset_for_path(folder_root, tmp_path):
    assert _open_path(folder_root).classes == ["ant", "bee", "zebra"]
    assert len(_open_path(folder_root, "val")) == 1
    flat = _open_path(folder_root / "train")  # a class-per-folder tree without splits
    assert flat.classes == ["ant", "zebra"] and len(flat) == 3
    with pytest.raises(DataError, match="no 'test' split; available: train"):
        _open_path(folder_root / "train", "test")
    (folder_root / "list.txt").write_text("train/zebra/a.png 1\n")
    assert _open_path(folder_root / "list.txt").load(0).size == (8, 6)
    ann = {"annotations": [{"fpath": "zebra/a.png", "category_id": 0}]}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    src = _open_path(tmp_path / "a.json", root=folder_root / "train")
    assert src.num_classes == 1 and src.load(0).size == (8, 6)
    with pytest.raises(DataError, match="does not exist"):
        _open_path(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(DataError, match="cannot tell the format"):
        _open_path(tmp_path / "x.csv")


def test_array_source_validation():
    with pytest.raises(DataError, match="uint8"):
        ArraySource(np.zeros((2, 4, 4), np.float32), [0, 1], ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(DataError, match="labels must lie in 0..1"):
        ArraySource(np.zeros((2, 4, 4), np.uint8), [0, 2], ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(ValueError, match="one per channel"):
        ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], ["a", "b"], (0.5,), (0.5,))
    rgb = ArraySource(np.zeros((2, 4, 5, 3), np.uint8), [0, 1], ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    assert rgb.load(1).shape == (3, 4, 5) and rgb.load(1).is_contiguous()


def test_cifar_accepts_numpy1_module_names(cifar10_root):
    # The published archives reference numpy.core.multiarray (numpy 1 / Python 2 names).
    blob = pickle.dumps({b"data": _cifar_rows([7]), b"labels": [7]}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    (cifar10_root / "cifar-10-batches-py" / "test_batch").write_bytes(blob)
    assert load_source("cifar10", cifar10_root, "test").targets.tolist() == [7]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) keeps its tones in 8 bits; PIL's own conversion
    would clip everything above 255 to white."""
    import numpy as np
    from PIL import Image

    from longtail.data.sources import decode_image

    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = np.asarray(decode_image(tmp_path / "deep.png", "L"))
    assert grey[0].tolist() == [0, 64, 128, 255]
    rgb = np.asarray(decode_image(tmp_path / "deep.png", "RGB"))
    assert rgb.shape == (4, 4, 3) and rgb[0, :, 1].tolist() == [0, 64, 128, 255]


def test_symlinked_folders_are_not_entered_and_are_named(tmp_path, capsys, monkeypatch):
    """A loop (c0/up -> ..) once repeated the images, relabelled, with no warning."""
    import os
    import sys

    from PIL import Image

    from longtail import cli
    from longtail.data.sources import load_source

    root = tmp_path / "photos"
    for c, n in (("c0", 20), ("c1", 10)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i}.png")
    os.symlink("..", root / "c0" / "up")  # back into the tree: a loop
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "x.png")
    os.symlink(elsewhere, root / "c1" / "more")  # out of the tree
    os.symlink(elsewhere, root / "c2")  # a class folder that is a link
    source = load_source("folder", root, "train")
    assert np.bincount(source.targets).tolist() == [20, 10]
    assert source.classes == ["c0", "c1"]
    assert sorted(source.skipped) == sorted(
        ["c0/up -> ..", f"c1/more -> {elsewhere}", f"c2 -> {elsewhere}"]
    )
    monkeypatch.setattr(sys, "argv", ["longtail", "data", "stats", str(root), "--json"])
    cli.main()
    out, err = capsys.readouterr()
    assert "3 symlinked folders" in err and "c0/up -> .." in err and err.count("\n") == 1
    assert '"total": 30' in out


def test_kernel_views_are_refused_not_walked(capsys, monkeypatch):
    import sys

    from longtail import cli

    monkeypatch.setattr(sys, "argv", ["longtail", "data", "stats", "/proc/self"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 1
    assert "is not a folder of image files" in capsys.readouterr().err
