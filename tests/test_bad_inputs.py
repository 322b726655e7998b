"""The catalogue of bad inputs: each gives exit code 2 (usage) or 1 (data or environment) and
one line that names the problem and the fix; never a traceback, never a lost or blocked run.

``python tests/test_bad_inputs.py`` rewrites docs/errors.md from this catalogue; a test checks
that the file is current.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_fashion_mnist  # noqa: E402
from longtail import cli  # noqa: E402
from longtail.build import build_data, build_method, validate  # noqa: E402
from longtail.config import config_from_dict  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
TINY = [
    "--set", "model.backbone=convnet-tiny",
    "--set", "train.epochs=1",
    "--set", "optim.milestones=[]",  # the default recipe's lie past a one-epoch run
    "--set", "train.batch_size=4",
    "--set", "train.device=cpu",
    "--no-progress",
]  # fmt: skip


@dataclass
class Case:
    """One bad input: how to make it, the command, the exit code and words the message has."""

    id: str
    what: str
    args: list[str]
    code: int
    needles: list[str]
    setup: Callable[[Path], None] | None = None
    skip: Callable[[], str | None] | None = None
    kind: str = "config"
    extra: dict = field(default_factory=dict)


# --- files the cases are made of -------------------------------------------------------------


def _png(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 12), value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "P") else (value,) * len(mode)).save(path)


def _folder(t: Path, classes=("cat", "dog"), per_class=4, splits=("train", "test")) -> Path:
    root = t / "imgs"
    for split in splits:
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", value=40 + 60 * classes.index(c) + i)
    return root


def _folder_with(t: Path, name: str, data: bytes) -> None:
    root = _folder(t)
    (root / "train" / "dog" / name).write_bytes(data)


def _truncated(fmt: str) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format=fmt)
    raw = buf.getvalue()
    return raw[: len(raw) // 2]


def _list_data(t: Path, lines: str, test_lines: str | None = None) -> None:
    _png(t / "img" / "a.png")
    _png(t / "img" / "b.png", value=200)
    (t / "train.txt").write_text(lines)
    (t / "test.txt").write_text(test_lines if test_lines is not None else "img/a.png 0\n")


def _run(t: Path, config: dict | None = None, started: bool = True) -> Path:
    """A finished one-epoch run of convnet-tiny on a tiny Fashion-MNIST, in t/run."""
    src = _template_run()
    run = t / "run"
    shutil.copytree(src, run)
    if not started:
        shutil.rmtree(run / "checkpoints")
    if config is not None:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        for key, value in config.items():
            node = cfg
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            node[last] = value
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


_TEMPLATE: dict[str, Path] = {}


def _template_run() -> Path:
    if "run" not in _TEMPLATE:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="longtail-template-"))
        root = make_fashion_mnist(base / "fm", train_per_class=8, test_per_class=2)
        args = ["train", "--set", f"data.root={root}", "--set", "data.ratio=2"]
        code, _, err = _invoke([*args, "--out", base / "run", *TINY])
        assert code == 0, err
        _TEMPLATE["run"] = base / "run"
    return _TEMPLATE["run"]


def _foreign_checkpoint(t: Path) -> None:
    """The run's checkpoint replaced by one of another model (resnet20) without its config."""
    run = _run(t)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    other = _run(t / "other")
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["backbone"] = "resnet20"
    c = validate(config_from_dict(cfg))
    state["model"] = build_method(c, build_data(c)).state_dict()
    del state["config"]
    torch.save(state, run / "checkpoints" / "last.pt")


def _cifar_hostile(t: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = t / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil()}))


def _bad_idx(t: Path, truncate: bool) -> None:
    root = make_fashion_mnist(t / "fm", gz=False)
    images = root / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(raw[: len(raw) - 100] if truncate else b"PK\x03\x04 not idx at all")


def _cuda_visible() -> str | None:
    return "a CUDA device is visible" if torch.cuda.is_available() else None


FM = ["--set", "data.root={tmp}/fm"]
FOLDER = ["--set", "data.dataset=folder", "--set", "data.root={tmp}/imgs", "--set",
          "data.ratio=null", "--set", "data.image_size=12"]  # fmt: skip
LIST = ["--set", "data.dataset=list", "--set", "data.root={tmp}", "--set", "data.ratio=null",
        "--set", "data.files={{train: train.txt, test: test.txt}}", "--set",
        "data.image_size=12"]  # fmt: skip


def _fm(t: Path) -> None:
    make_fashion_mnist(t / "fm")


CE_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist" / "ce-r100.yaml"


def _study(t: Path, validation: bool = True) -> None:
    """A one-entry study file of Fashion-MNIST-LT (with a validation split, or without)."""
    _fm(t)
    given = {"data.root": str(t / "fm"), **({"data.val_per_class": 2} if validation else {})}
    (t / "study.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "s",
                "epochs": 1,
                "set": given,
                "entries": [{"name": "ce", "recipe": str(CE_RECIPE)}],
            }
        )
    )


def _study_started(t: Path) -> None:
    """_study's file, its storage created (every trial waiting) in {tmp}/s."""
    from longtail.studies.spec import load_study
    from longtail.studies.store import StudyPlace, open_studies

    _study(t)
    spec, base = load_study(t / "study.yaml")
    open_studies(StudyPlace.of(spec, base, t / "s", None))


def _study_changed(t: Path) -> None:
    """_study's storage with its one trial finished with the study file's lr, then the file
    changed to another lr."""
    from longtail.studies.spec import load_study, trial_config
    from longtail.studies.store import StudyPlace, _claim, open_studies

    _study_started(t)
    spec, base = load_study(t / "study.yaml")
    study, trial = _claim(open_studies(StudyPlace.of(spec, base, t / "s", None), create=False))
    cfg = trial_config(spec, spec.entries[0], 0, {}, base)
    trial.set_user_attr("config", cfg.model_dump(mode="json"))  # as a worker stores it
    study.tell(trial, 0.5)
    raw = yaml.safe_load((t / "study.yaml").read_text())
    raw["set"]["optim.lr"] = cfg.optim.lr / 2
    (t / "study.yaml").write_text(yaml.safe_dump(raw))


CASES = [
    # -- config values and names --------------------------------------------------------
    Case("config-type", "a value of the wrong type", ["train", "--set", "train.epochs=abc"], 2,
         ["train.epochs"]),
    Case("config-unknown-key", "a misspelt key", ["train", "--set", "train.epochz=3"], 2,
         ["train.epochz", "spelling"]),
    Case("config-unknown-section", "an unknown section", ["train", "--set", "bogus=1"], 2,
         ["bogus"]),
    Case("method-name", "an unknown method", ["train", "--set", "method.name=magic"], 2,
         ["method.name", "hybrid-sc"]),
    Case("method-option", "an option the method does not have",
         ["train", "--set", "method.name=hybrid-sc", "--set", "method.temprature=0.1"], 2,
         ["method.temprature"]),
    Case("method-option-value", "a value the method's option does not take",
         ["train", "--set", "method.name=hybrid-sc", "--set", "method.loss=xx"], 2,
         ["method.loss", "sc"]),
    Case("method-sampler-name", "an unknown sampler in a method option",
         ["train", "--set", "method.name=hybrid-sc", "--set", "method.con_sampler=nope"], 2,
         ["method.con_sampler", "class-balanced"]),
    Case("stage-too-long", "a classifier stage as long as the whole run",
         ["train", "--set", "method.name=two-stage-sc", "--set", "train.epochs=10"], 2,
         ["classifier_epochs", "train.epochs"]),
    Case("backbone", "an unknown backbone", ["train", "--set", "model.backbone=vgg"], 2,
         ["model.backbone", "resnet32"]),
    Case("timm-model", "a timm model that does not exist",
         ["train", "--set", "model.backbone=timm/convnext_tinny"], 2,
         ["model.backbone", "timm has no model 'convnext_tinny'", "convnext_tiny"]),
    Case("pretrained-none", "published weights asked of a backbone that has none",
         ["train", "--set", "model.pretrained=true"], 2,
         ["model.pretrained", "resnet32 has no published weights"]),
    Case("pretrained-file", "a weights file that does not exist",
         ["train", "--set", "model.pretrained={tmp}/w.pth", *FM], 2,
         ["model.pretrained", "no file", "w.pth"], setup=_fm),
    Case("pretrained-pickle", "a weights file that is a pickled whole model",
         ["train", "--set", "model.pretrained={tmp}/w.pth", *FM], 2,
         ["model.pretrained", "w.pth", "state_dict()"],
         setup=lambda t: (_fm(t), (t / "w.pth").write_bytes(pickle.dumps(Path("x"))))),
    Case("pretrained-misfit", "weights of another network",
         ["train", "--set", "model.pretrained={tmp}/w.pth", "--set", "data.ratio=4", *FM], 2,
         ["model.pretrained", "do not fit the backbone", "missing"],
         setup=lambda t: (_fm(t), torch.save({"conv.weight": torch.zeros(2)}, t / "w.pth"))),
    Case("data-classes", "a class the data set does not have",
         ["train", "--set", "data.classes=[3, 12]", *FM], 2,
         ["data", "no class 12", "0..9"], setup=_fm),
    Case("classifier-options", "an option the classifier does not take",
         ["train", "--set", "model.classifier_options.foo=1"], 2,
         ["model.classifier_options", "foo"]),
    Case("sampler", "an unknown sampler", ["train", "--set", "train.sampler=fancy"], 2,
         ["train.sampler", "class-balanced"]),
    Case("transform", "an unknown transform",
         ["train", "--set", "train.transform=blur"], 2, ["train.transform", "crop-flip"]),
    Case("dataset", "an unknown dataset", ["train", "--set", "data.dataset=mnist"], 2,
         ["data.dataset", "fashion-mnist"]),
    Case("ratio", "an imbalance ratio below 1", ["train", "--set", "data.ratio=0.5"], 2,
         ["data.ratio", ">= 1"]),
    Case("val-split", "an unknown validation split", ["train", "--set", "data.val_split=dev"],
         2, ["data.val_split"]),
    Case("lr", "a negative learning rate", ["train", "--set", "optim.lr=-1"], 2, ["optim.lr"]),
    Case("schedule", "an unknown lr schedule", ["train", "--set", "optim.schedule=step"], 2,
         ["optim.schedule", "cosine"]),
    Case("device-missing", "a CUDA device on a machine without one",
         ["train", "--set", "train.device=cuda"], 2, ["train.device", "no CUDA device"],
         skip=_cuda_visible),
    Case("device-name", "a device that does not exist", ["train", "--set", "train.device=tpu"],
         2, ["train.device", "not a device"]),
    Case("sync-bn-cpu", "SyncBatchNorm on the CPU", ["train", *FM, "--set", "train.device=cpu",
         "--set", "train.sync_bn=true"], 2, ["train.sync_bn", "CUDA"], setup=_fm),
    Case("folder-without-root", "an image folder dataset without its folder",
         ["train", "--set", "data.dataset=folder"], 2, ["data", "needs root"]),
    Case("dataset-options", "list files given to a dataset that takes none",
         ["train", "--set", "data.files.train=x.txt", *FM], 2, ["takes no options"], setup=_fm),
    Case("list-without-files", "a list dataset without its list files",
         ["train", "--set", "data.dataset=list", "--set", "data.root={tmp}"], 2, ["files="]),
    # -- config files and command line ---------------------------------------------------
    Case("set-syntax", "--set without '='", ["train", "--set", "optim.lr"], 2,
         ["--set", "key=value"]),
    Case("config-missing", "a config file that does not exist",
         ["train", "--config", "{tmp}/none.yaml"], 2, ["none.yaml", "does not exist"]),
    Case("config-yaml", "a config file that is not YAML", ["train", "--config", "{tmp}/bad.yaml"],
         2, ["bad.yaml", "not valid YAML"],
         setup=lambda t: (t / "bad.yaml").write_text("train: [1, 2\n")),
    Case("config-not-mapping", "a config file holding a list",
         ["train", "--config", "{tmp}/list.yaml"], 2, ["list.yaml", "mapping"],
         setup=lambda t: (t / "list.yaml").write_text("- 1\n- 2\n")),
    Case("config-base-loop", "_base_ files that include each other",
         ["train", "--config", "{tmp}/a.yaml"], 2, ["_base_ loop"],
         setup=lambda t: ((t / "a.yaml").write_text("_base_: b.yaml\n"),
                          (t / "b.yaml").write_text("_base_: a.yaml\n"))),
    Case("config-base-newline", "a _base_ path with a newline in it",
         ["train", "--config", "{tmp}/a.yaml"], 2, ["_base_ must be", "'x\\ny.yaml'"],
         setup=lambda t: (t / "a.yaml").write_text('_base_: "x\\ny.yaml"\n')),
    Case("config-base-only-newline", "a _base_ that is only a newline",
         ["train", "--config", "{tmp}/a.yaml"], 2, ["_base_ must be", "'\\n'"],
         setup=lambda t: (t / "a.yaml").write_text('_base_: "\\n"\n')),
    Case("config-base-blank", "a _base_ of blanks", ["train", "--config", "{tmp}/a.yaml"], 2,
         ["_base_ must be", "'  '"], setup=lambda t: (t / "a.yaml").write_text('_base_: "  "\n')),
    Case("config-base-list", "a _base_ that is a list", ["train", "--config", "{tmp}/a.yaml"], 2,
         ["_base_ must be", "['b.yaml']"],
         setup=lambda t: (t / "a.yaml").write_text("_base_: [b.yaml]\n")),
    Case("config-path-newline", "a config path with a newline in it",
         ["train", "--config", "{tmp}/a\nb.yaml"], 2, ["does not exist", "\\nb.yaml'"]),
    Case("option", "an unknown option", ["train", "--bogus"], 2, ["--bogus"]),
    Case("command", "an unknown command", ["nosuchcommand"], 2, ["nosuchcommand"]),
    Case("missing-argument", "a missing argument", ["data", "stats"], 2,
         ["Missing argument 'dataset'"]),
    Case("option-type", "a flag value of the wrong type",
         ["data", "stats", "cifar10", "--ratio", "abc"], 2, ["--ratio"]),
    # -- run directories -----------------------------------------------------------------
    Case("resume-without-out", "--resume without the run to continue", ["train", "--resume"],
         2, ["--resume needs --out"], kind="run"),
    Case("out-is-file", "--out naming a file", ["train", "--out", "{tmp}/file.txt"], 2,
         ["file.txt", "not a directory"], setup=lambda t: (t / "file.txt").write_text("x"),
         kind="run"),
    Case("out-under-file", "--out inside a file", ["train", "--out", "{tmp}/file.txt/run"], 2,
         ["file.txt", "is a file"], setup=lambda t: (t / "file.txt").write_text("x"),
         kind="run"),
    Case("out-started", "--out naming a run that has started", ["train", "--out", "{tmp}/run"],
         2, ["already exists", "--resume"], setup=_run, kind="run"),
    Case("out-foreign", "--out naming a folder of other files",
         ["train", "--out", "{tmp}/mine"], 2, ["not a longtail run", "notes.txt"],
         setup=lambda t: ((t / "mine").mkdir(), (t / "mine" / "notes.txt").write_text("x")),
         kind="run"),
    Case("resume-nothing", "--resume on an empty folder",
         ["train", "--resume", "--out", "{tmp}/empty"], 2, ["no checkpoint"],
         setup=lambda t: (t / "empty").mkdir(), kind="run"),
    Case("resume-failed-start", "--resume on a run that stopped before its first checkpoint",
         ["train", "--resume", "--out", "{tmp}/run"], 2,
         ["before the first epoch", "without --resume"],
         setup=lambda t: _run(t, started=False), kind="run"),
    Case("resume-set", "--resume with a change to what is trained",
         ["train", "--resume", "--out", "{tmp}/run", "--set", "optim.lr=0.5"], 2,
         ["optim.lr cannot change", "train.epochs=N"], setup=_run, kind="run"),
    Case("resume-config", "--resume with a config file", ["train", "--resume", "--out",
         "{tmp}/run", "--config", "{tmp}/x.yaml"], 2, ["leave out --config"], setup=_run,
         kind="run"),
    Case("resume-shorter", "--resume with fewer epochs than trained",
         ["train", "--resume", "--out", "{tmp}/run", "--set", "train.epochs=0"], 2,
         ["train.epochs"], setup=_run, kind="run"),
    Case("evaluate-missing", "evaluate a folder that does not exist",
         ["evaluate", "{tmp}/nope"], 2, ["nope", "does not exist"], kind="run"),
    Case("evaluate-not-run", "evaluate a folder that is not a run", ["evaluate", "{tmp}"], 2,
         ["not a run directory"], kind="run"),
    Case("evaluate-checkpoint-name", "evaluate an unknown checkpoint",
         ["evaluate", "{tmp}/run", "--checkpoint", "middle"], 2, ["--checkpoint", "best"],
         setup=_run, kind="run"),
    Case("evaluate-split", "evaluate an unknown split",
         ["evaluate", "{tmp}/run", "--split", "train"], 2, ["--split", "val"], setup=_run,
         kind="run"),
    Case("evaluate-no-best", "evaluate best.pt of a run without a validation split",
         ["evaluate", "{tmp}/run", "--checkpoint", "best"], 2, ["best.pt", "validation split"],
         setup=_run, kind="run"),
    Case("evaluate-no-val", "evaluate the validation split of a run without one",
         ["evaluate", "{tmp}/run", "--split", "val"], 2, ["data.val_split"], setup=_run,
         kind="run"),
    Case("checkpoint-corrupt", "a checkpoint that is not one", ["evaluate", "{tmp}/run"], 1,
         ["last.pt", "cannot be read"],
         setup=lambda t: (_run(t) / "checkpoints" / "last.pt").write_bytes(b"garbage"),
         kind="run"),
    Case("checkpoint-other-config", "config.yaml changed after the checkpoint was written",
         ["evaluate", "{tmp}/run"], 1, ["another config", "model.projection_dim"],
         setup=lambda t: _run(t, {"model.projection_dim": 64}), kind="run"),
    Case("checkpoint-other-model", "a checkpoint of another model", ["evaluate", "{tmp}/run"],
         1, ["does not fit", "another config"], setup=_foreign_checkpoint, kind="run"),
    # -- data stats flags ----------------------------------------------------------------
    Case("stats-ratio", "a ratio below 1 (checked before any file is read)",
         ["data", "stats", "fashion-mnist", "--ratio", "0.5"], 2, ["--ratio", ">= 1"],
         kind="flags"),
    Case("stats-n-max", "a non-positive --n-max",
         ["data", "stats", "fashion-mnist", "--ratio", "10", "--n-max", "0"], 2, ["--n-max"],
         kind="flags"),
    Case("stats-n-max-alone", "--n-max without --ratio",
         ["data", "stats", "fashion-mnist", "--n-max", "30"], 2, ["--n-max needs --ratio"],
         kind="flags"),
    Case("stats-profile", "an unknown imbalance profile",
         ["data", "stats", "fashion-mnist", "--ratio", "10", "--profile", "linear"], 2,
         ["--profile", "exp"], kind="flags"),
    Case("stats-dataset", "an unknown dataset or path", ["data", "stats", "nosuchset"], 2,
         ["nosuchset", "cifar10"], kind="flags"),
    Case("download-name", "a dataset that cannot be downloaded",
         ["data", "download", "imagenet"], 2, ["cannot download", "fashion-mnist"],
         kind="flags"),
    # -- data ----------------------------------------------------------------------------
    Case("fmnist-missing", "Fashion-MNIST not installed",
         ["data", "stats", "fashion-mnist", "--root", "{tmp}/nothing"], 1,
         ["{tmp}/nothing", "dataset-fashion-mnist"], kind="data"),
    Case("idx-truncated", "a truncated idx file",
         ["data", "stats", "fashion-mnist", "--root", "{tmp}/fm"], 1,
         ["train-images-idx3-ubyte", "truncated"], setup=lambda t: _bad_idx(t, True),
         kind="data"),
    Case("idx-garbage", "a file that is not idx",
         ["data", "stats", "fashion-mnist", "--root", "{tmp}/fm"], 1,
         ["not an idx file"], setup=lambda t: _bad_idx(t, False), kind="data"),
    Case("cifar-missing", "CIFAR-10 not downloaded",
         ["data", "stats", "cifar10", "--root", "{tmp}/c10"], 1,
         ["cifar10 not found", "longtail data download cifar10"], kind="data"),
    Case("cifar-hostile", "a CIFAR batch that would run code when unpickled",
         ["data", "stats", "cifar10", "--root", "{tmp}/c10"], 1, ["unexpected object"],
         setup=_cifar_hostile, kind="data"),
    Case("folder-missing", "an image folder that does not exist",
         ["data", "stats", "folder", "--root", "{tmp}/nope"], 1, ["nope", "does not exist"],
         kind="data"),
    Case("folder-no-classes", "an image folder without class folders",
         ["data", "stats", "{tmp}/flat"], 1, ["no class folders"],
         setup=lambda t: _png(t / "flat" / "a.png"), kind="data"),
    Case("folder-no-images", "class folders without images",
         ["data", "stats", "{tmp}/imgs"], 1, ["no images found"],
         setup=lambda t: ((t / "imgs" / "train" / "cat").mkdir(parents=True),
                          (t / "imgs" / "train" / "cat" / "a.txt").write_text("x")),
         kind="data"),
    Case("image-not-image", "a text file named .png", ["train", *FOLDER, *TINY], 1,
         ["broken.png", "cannot read image"],
         setup=lambda t: _folder_with(t, "broken.png", b"this is not a png"), kind="data"),
    Case("image-empty", "a zero-byte image", ["train", *FOLDER, *TINY], 1,
         ["empty.png", "cannot read image"], setup=lambda t: _folder_with(t, "empty.png", b""),
         kind="data"),
    Case("image-truncated-png", "a PNG cut off after its header", ["train", *FOLDER, *TINY], 1,
         ["cut.png", "truncated"],
         setup=lambda t: _folder_with(t, "cut.png", _truncated("PNG")), kind="data"),
    Case("image-truncated-jpeg", "a JPEG cut in half", ["train", *FOLDER, *TINY], 1,
         ["cut.jpg", "runcated"],
         setup=lambda t: _folder_with(t, "cut.jpg", _truncated("JPEG")), kind="data"),
    Case("class-empty", "a class folder with no images", ["train", *FOLDER, *TINY], 1,
         ["'owl'", "no training images"],
         setup=lambda t: (_folder(t), (t / "imgs" / "train" / "owl").mkdir()), kind="data"),
    Case("class-only-in-test", "a test class that train lacks", ["train", *FOLDER, *TINY], 1,
         ["'owl'", "only in other splits"],
         setup=lambda t: (_folder(t), _png(t / "imgs" / "test" / "owl" / "0.png")), kind="data"),
    Case("ratio-empties-class", "a ratio that leaves a class no image",
         ["train", *FM, "--set", "data.ratio=100", *TINY], 1,
         ["class 3 ('Dress')", "data.ratio"],
         setup=lambda t: make_fashion_mnist(t / "fm", train_per_class=3), kind="data"),
    Case("batch-too-large", "a batch larger than the training set",
         ["train", *FM, "--set", "data.ratio=4", *TINY, "--set", "train.batch_size=4096"], 1,
         ["fewer than one batch", "batch size"], setup=_fm, kind="data"),
    Case("diverged", "a learning rate that makes training diverge",
         ["train", *FM, "--set", "data.ratio=4", *TINY, "--set", "optim.lr=1e30"], 1,
         ["epoch 1", "lower optim.lr"], setup=_fm, kind="data"),
    Case("list-missing-image", "a list line naming a missing image",
         ["data", "stats", "{tmp}/train.txt"], 1, ["train.txt:3", "img/c.png", "not found"],
         setup=lambda t: _list_data(t, "img/a.png 0\nimg/b.png 1\nimg/c.png 1\n"), kind="data"),
    Case("list-missing-image-train", "the same, when training", ["train", *LIST, *TINY], 1,
         ["train.txt:2", "img/c.png"],
         setup=lambda t: _list_data(t, "img/a.png 0\nimg/c.png 1\n"), kind="data"),
    Case("list-bad-line", "a list line without a label", ["data", "stats", "{tmp}/train.txt"],
         1, ["train.txt:2", "relative/path label"],
         setup=lambda t: _list_data(t, "img/a.png 0\nimg/b.png\n"), kind="data"),
    Case("list-duplicate", "an image listed twice", ["data", "stats", "{tmp}/train.txt"], 1,
         ["train.txt:3", "listed twice", "train.txt:1"],
         setup=lambda t: _list_data(t, "img/a.png 0\nimg/b.png 1\nimg/a.png 0\n"),
         kind="data"),
    Case("list-unknown-class", "a test label that train does not have",
         ["train", *LIST, *TINY], 1, ["test.txt", "label 5", "num_classes"],
         setup=lambda t: _list_data(t, "img/a.png 0\nimg/b.png 1\n", "img/a.png 5\n"),
         kind="data"),
    Case("list-file-missing", "a list file that does not exist",
         ["train", *LIST, "--set", "data.files={{train: no.txt, test: test.txt}}"], 1,
         ["no.txt", "does not exist"], setup=lambda t: _list_data(t, "img/a.png 0\n"),
         kind="data"),
    Case("json-not-annotations", "a JSON file of something else",
         ["data", "stats", "{tmp}/ann.json"], 1, ["ann.json", "not an annotation file"],
         setup=lambda t: (t / "ann.json").write_text(json.dumps({"images": []})), kind="data"),
    Case("json-invalid", "a JSON file that does not parse", ["data", "stats", "{tmp}/ann.json"],
         1, ["ann.json", "cannot read annotation file"],
         setup=lambda t: (t / "ann.json").write_text("{not json"), kind="data"),
    Case("report-not-run", "report on a folder that is not a run", ["report", "{tmp}"], 2,
         ["config.yaml is missing"], kind="outputs"),
    Case("compare-no-eval", "compare a run without its test evaluation",
         ["compare", "{tmp}/run"], 2, ["eval_test.json", "longtail evaluate"],
         setup=lambda t: (_run(t) / "eval_test.json").unlink(), kind="outputs"),
    Case("predict-missing", "predict on a path that does not exist",
         ["predict", "{tmp}/run", "{tmp}/nope.png"], 2, ["nope.png", "does not exist"],
         setup=_run, kind="outputs"),
    Case("predict-no-images", "predict on a folder without images",
         ["predict", "{tmp}/run", "{tmp}/run/checkpoints"], 2, ["no images found"],
         setup=_run, kind="outputs"),
    Case("predict-truncated", "predict on a truncated image",
         ["predict", "{tmp}/run", "{tmp}/cut.png"], 1, ["cut.png", "cannot read image"],
         setup=lambda t: (_run(t), (t / "cut.png").write_bytes(_truncated("PNG"))),
         kind="outputs"),
    Case("predict-top-k", "predict with --top-k 0", ["predict", "{tmp}/run", "{tmp}/a.png",
         "--top-k", "0"], 2, ["--top-k"], setup=lambda t: (_run(t), _png(t / "a.png")),
         kind="outputs"),
    Case("predict-out-dir", "predict --out naming a folder",
         ["predict", "{tmp}/run", "{tmp}/a.png", "--out", "{tmp}"], 2, ["--out", "directory"],
         setup=lambda t: (_run(t), _png(t / "a.png")), kind="outputs"),
    Case("predict-out-checkpoint", "predict --out naming the run's checkpoint",
         ["predict", "{tmp}/run", "{tmp}/a.png", "--out", "{tmp}/run/checkpoints/last.pt"], 2,
         ["--out", "inside the run directory"], setup=lambda t: (_run(t), _png(t / "a.png")),
         kind="outputs"),
    Case("predict-out-exists", "predict --out naming an existing file",
         ["predict", "{tmp}/run", "{tmp}/a.png", "--out", "{tmp}/old.csv"], 2,
         ["old.csv", "exists", "--force"],
         setup=lambda t: (_run(t), _png(t / "a.png"), (t / "old.csv").write_text("mine")),
         kind="outputs"),
    Case("predict-out-unwritable", "predict --out somewhere that cannot be written",
         ["predict", "{tmp}/run", "{tmp}/a.png", "--out", "/proc/longtail/p.csv"], 1,
         ["cannot write --out", "/proc/longtail/p.csv"],
         setup=lambda t: (_run(t), _png(t / "a.png")), kind="outputs"),
    Case("export-out-config", "export --out naming the run's config.yaml",
         ["export", "{tmp}/run", "--format", "torchscript", "--out", "{tmp}/run/config.yaml"], 2,
         ["--out", "inside the run directory"], setup=_run, kind="outputs"),
    Case("export-out-exists", "export --out naming an existing file",
         ["export", "{tmp}/run", "--format", "torchscript", "--out", "{tmp}/m.pt"], 2,
         ["m.pt", "exists", "--force"],
         setup=lambda t: (_run(t), (t / "m.pt").write_text("mine")), kind="outputs"),
    Case("export-out-unwritable", "export --out somewhere that cannot be written",
         ["export", "{tmp}/run", "--format", "torchscript", "--out", "/proc/longtail/m.pt"], 1,
         ["cannot write --out", "/proc/longtail/m.pt"], setup=_run, kind="outputs"),
    Case("export-format", "export to an unknown format",
         ["export", "{tmp}/run", "--format", "tflite"], 2, ["tflite", "onnx, torchscript"],
         setup=_run, kind="outputs"),
    Case("export-not-trained", "export a run that has no checkpoint",
         ["export", "{tmp}/run"], 2, ["no checkpoint", "train it first"],
         setup=lambda t: _run(t, started=False), kind="outputs"),
    Case("config-empty", "an empty config file", ["train", "--config", "{tmp}/empty.yaml"], 2,
         ["empty.yaml", "is empty", "configs/"],
         setup=lambda t: (t / "empty.yaml").write_text("# nothing yet\n")),
    Case("config-duplicate-key", "a key given twice in a config file",
         ["train", "--config", "{tmp}/twice.yaml"], 2, ["twice.yaml", "'epochs' is given twice",
         "line 3"],
         setup=lambda t: (t / "twice.yaml").write_text("train:\n  epochs: 3\n  epochs: 30\n")),
    Case("config-bool-number", "true where a number belongs",
         ["train", "--set", "train.epochs=true"], 2, ["train.epochs", "must be a number"]),
    Case("config-bool-method-number", "false where a method's number belongs",
         ["train", "--set", "method.name=hybrid-sc", "--set", "method.temperature=false"], 2,
         ["method.temperature", "must be a number"]),
    Case("config-image-size", "an image side too small for any network",
         ["train", "--set", "data.image_size=3"], 2, ["data.image_size", "8"]),
    Case("config-name-path", "a run name that is a path",
         ["train", "--set", "name=../../elsewhere"], 2, ["'name'", "plain name", "--out"]),
    Case("config-lr-inf", "an infinite learning rate", ["train", "--set", "optim.lr=.inf"], 2,
         ["optim.lr", "finite"]),
    Case("device-meta", "a device that holds no data", ["train", "--set", "train.device=meta"],
         2, ["train.device", "meta", "cpu"]),
    Case("json-label-not-integer", "a category_id that is no integer",
         ["data", "stats", "{tmp}/ann.json"], 1, ["ann.json", "category_id", "1.7"],
         setup=lambda t: (t / "ann.json").write_text(json.dumps(
             {"annotations": [{"fpath": "a.png", "category_id": 1.7}]})), kind="data"),
    Case("json-num-classes-text", "num_classes given in words",
         ["data", "stats", "{tmp}/ann.json"], 1, ["ann.json", "num_classes", "'three'"],
         setup=lambda t: (t / "ann.json").write_text(json.dumps(
             {"annotations": [{"fpath": "a.png", "category_id": 1}], "num_classes": "three"})),
         kind="data"),
    Case("test-image-not-image", "a test image that is no image (found before training)",
         ["train", *FOLDER, *TINY], 1, ["bad.png", "cannot read image"],
         setup=lambda t: (_folder(t), (t / "imgs" / "test" / "cat" / "bad.png").write_text("x")),
         kind="data"),
    Case("image-decompression-bomb", "an image over PIL's decompression-bomb limit",
         ["predict", "{tmp}/run", "{tmp}/huge.png"], 1, ["huge.png", "decompression bombs"],
         setup=lambda t: (_run(t), _png(t / "huge.png", "L", (16000, 12000))), kind="outputs"),
    Case("run-config-empty", "a run whose config.yaml is empty", ["evaluate", "{tmp}/run"], 1,
         ["config.yaml", "empty"],
         setup=lambda t: (_run(t) / "config.yaml").write_text(""), kind="run"),
    Case("compare-file", "compare given a file, not a run", ["compare", "{tmp}/notes.txt"], 2,
         ["notes.txt", "is a file"], setup=lambda t: (t / "notes.txt").write_text("x"),
         kind="run"),
    Case("stats-kernel-view", "a kernel view (/proc/self) given as an image folder",
         ["data", "stats", "/proc/self"], 1, ["/proc/self", "not a folder of image files"],
         kind="data"),
    # -- studies -------------------------------------------------------------------------
    Case("study-file-missing", "a study file that does not exist",
         ["study", "run", "{tmp}/nope.yaml"], 2, ["no study file", "nope.yaml"], kind="study"),
    Case("study-no-validation", "a study whose trials have no validation split",
         ["study", "run", "{tmp}/study.yaml"], 2,
         ["study entry 'ce'", "never the test set", "data.val_per_class"],
         setup=lambda t: _study(t, validation=False), kind="study"),
    Case("study-storage", "a study storage URL no database answers",
         ["study", "run", "{tmp}/study.yaml", "--storage", "nosuchdb://host/x"], 2,
         ["cannot open the study storage", "nosuchdb"], setup=_study, kind="study"),
    Case("study-not-started", "the status of a study nobody started",
         ["study", "status", "{tmp}/study.yaml", "--dir", "{tmp}/s"], 2,
         ["holds no study 's'", "longtail study run"], setup=_study, kind="study"),
    Case("study-storage-readonly", "a study storage that refuses writes (an SQLite file "
         "replaced under the workers, as `git stash` does, or opened read-only)",
         ["study", "worker", "{tmp}/study.yaml", "--dir", "{tmp}/s", "--storage",
          "sqlite:///file:{tmp}/s/study.db?mode=ro&uri=true"], 1,
         ["failed: attempt to write a readonly database", "finished trials are kept",
          "run the command again"], setup=_study_started, kind="study"),
    Case("study-changed", "a study file changed after its trials ran (another lr)",
         ["study", "run", "{tmp}/study.yaml", "--dir", "{tmp}/s"], 2,
         ["study entry 'ce' now trains otherwise", "optim.lr", "then", "new name"],
         setup=_study_changed, kind="study"),
    Case("val-split-twice", "two validation splits asked for",
         ["train", *FM, "--set", "data.val_per_class=2", "--set", "data.val_split=test",
          *TINY], 2, ["data.val_split and data.val_per_class", "keep one"], setup=_fm),
    Case("stats-unknown-format", "a path of an unknown format",
         ["data", "stats", "{tmp}/data.csv"], 1, ["data.csv", "cannot tell the format"],
         setup=lambda t: (t / "data.csv").write_text("a,b\n"), kind="data"),
]  # fmt: skip


def _invoke(args: list) -> tuple[int, str, str]:
    """Run ``longtail ARGS`` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv, sys.stdout, sys.stderr
    sys.argv, sys.stdout, sys.stderr = ["longtail", *map(str, args)], out, err
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv, sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def run_case(case: Case, tmp: Path) -> tuple[int, str]:
    if case.setup is not None:
        case.setup(tmp)
    args = [str(a).replace("{tmp}", str(tmp)).replace("{{", "{").replace("}}", "}")
            for a in case.args]  # fmt: skip
    code, _, err = _invoke(args)
    return code, err


def test_catalogue_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_fix(case, tmp_path, monkeypatch):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    code, err = run_case(case, tmp_path)
    assert code == case.code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in case.needles:
        assert needle.replace("{tmp}", str(tmp_path)) in err, (needle, err)
    # a failed start leaves nothing that blocks the same command
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("last.pt"))


def _doc_message(case: Case, tmp: Path) -> str:
    _, err = run_case(case, tmp)
    text = err.strip().replace(str(tmp), "<tmp>")
    return re.sub(r"pid \d+", "pid N", text)


def render_docs(tmp_root: Path) -> str:
    lines = [
        "# Error messages",
        "",
        "What longtail says for each bad input of the catalogue in `tests/test_bad_inputs.py`",
        "(regenerate this file with `python tests/test_bad_inputs.py`). Exit code 2: the",
        "command line or the config; 1: data, files or environment. `<tmp>` stands for the",
        "folder the case ran in.",
        "",
    ]
    kinds = {
        "config": "Config",
        "run": "Run directories",
        "flags": "Flags",
        "data": "Data",
        "outputs": "Reports, predictions, exports",
        "study": "Studies",
    }
    missing = {c.kind for c in CASES} - set(kinds)
    assert not missing, f"cases of kinds {missing} would be left out of docs/errors.md"
    for kind, title in kinds.items():
        lines += [f"## {title}", "", "| case | exit | message |", "|---|---|---|"]
        for i, case in enumerate(c for c in CASES if c.kind == kind):
            if case.skip and case.skip():
                msg = f"(not run here: {case.skip()})"
            else:
                tmp = tmp_root / f"{kind}-{i}"
                tmp.mkdir(parents=True)
                msg = _doc_message(case, tmp).replace("|", "\\|")
            lines.append(f"| {case.what} | {case.code} | `{msg}` |")
        lines.append("")
    return "\n".join(lines)


def test_docs_errors_md_is_current(tmp_path, monkeypatch):
    skipped = [c.id for c in CASES if c.skip and c.skip()]
    if skipped:
        pytest.skip(
            f"cases {skipped} do not run on this machine; the docs come from one where all do"
        )
    monkeypatch.chdir(tmp_path)
    assert DOCS.read_text() == render_docs(tmp_path / "cases"), (
        "docs/errors.md is out of date: run `python tests/test_bad_inputs.py`"
    )


if __name__ == "__main__":
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        DOCS.write_text(render_docs(Path(d) / "cases"))
    print(f"wrote {DOCS}")
