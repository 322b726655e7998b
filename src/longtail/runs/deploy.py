"""Using a trained run on new images: ``longtail predict`` and ``longtail export``.

Both need only the run directory (config, ``data.json``, checkpoint), not the data set the
run was trained on: class names and the images' preprocessing are in ``data.json``.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from longtail import jsonio
from longtail.data import build_transform
from longtail.data.sources import check_plain_tree, decode_image, walk_images
from longtail.data.transforms import SMALL_MAX
from longtail.engine.run_dir import RunDir
from longtail.errors import LongtailError, UsageError, shown
from longtail.methods import Method
from longtail.runs.read import RunInfo, load_run

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files among ``paths``: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            check_plain_tree(p)
            found += walk_images(p, IMG_EXTENSIONS)[0]  # symlinked folders are not entered
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"{shown(p)} does not exist; give image files or folders of images")
    if not found:
        raise UsageError(
            f"no images found in {', '.join(map(str, paths))} (extensions: "
            f"{', '.join(IMG_EXTENSIONS)})"
        )
    return found


def open_image(path: Path, channels: int) -> Image.Image:
    """The image at ``path`` in the run's mode (grey or RGB), fully decoded."""
    return decode_image(path, "L" if channels == 1 else "RGB")


class Predictor(nn.Module):
    """A trained method's ``predict`` as a plain module: normalised images in, logits out."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return self.method.predict(x)


def predict_images(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    checkpoint: str = "last",
) -> list[dict[str, Any]]:
    """Class predictions of a run's model for image files (or folders of them).

    Images get the run's evaluation preprocessing (``data.json``'s ``preprocess``).

    Returns:
        One dict per image: ``path``, ``class``, ``probability`` and ``top`` (the ``top_k``
        most probable classes as ``[name, probability]`` pairs).
    """
    if top_k < 1:
        raise UsageError(f"{{top_k}} must be >= 1, got {top_k}")
    files = find_images(paths)
    cfg, method, info = load_run(run_dir, checkpoint)
    transform = build_transform(
        info.transform, info.image_size, info.channels, info.mean, info.std, info.resize
    )
    device = next(method.parameters()).device
    k = min(top_k, info.num_classes)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        x = torch.stack([transform(open_image(f, info.channels)) for f in batch]).to(device)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            probs = method.predict(x).float().softmax(dim=1).cpu()
        p, c = probs.topk(k, dim=1)
        for f, pi, ci in zip(batch, p.tolist(), c.tolist(), strict=True):
            top = [[info.classes[j], q] for j, q in zip(ci, pi, strict=True)]
            rows.append({"path": str(f), "class": top[0][0], "probability": top[0][1], "top": top})
    return rows


def check_output(out: Path, run_dir: Path, own: Sequence[Path], force: bool) -> None:
    """Refuse to write ``out`` where it would destroy something.

    Inside the run directory only the command's own outputs (``own``) may be written: a
    checkpoint or config.yaml overwritten would leave the run unusable. Elsewhere an existing
    file is replaced only with ``force``.
    """
    if out.is_dir() or not out.name:
        raise UsageError(f"{{out}} {shown(out)} is a directory; give a file's path")
    target, run = out.resolve(), run_dir.resolve()
    if run == target or run in target.parents:
        if target not in {p.resolve() for p in own}:
            raise UsageError(
                f"{{out}} {shown(out)} lies inside the run directory {shown(run_dir)}, whose "
                "files are not replaced; give a path outside it (or leave {out} out)"
            )
        return
    if out.exists() and not force:
        raise UsageError(f"{{out}} {shown(out)} exists; pass {{force}} to replace it")


def write_output(out: Path, write: Callable[[Path], None]) -> None:
    """Write ``out`` atomically: ``write`` fills a temporary file beside it, which then
    replaces ``out``; a failure leaves ``out`` as it was and names the path."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.open("wb").close()  # fails here, as an OSError, where nothing can be written
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise LongtailError(
            f"cannot write {{out}} {shown(out)}: {e.strerror or e}; choose another path"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_predictions_csv(
    rows: list[dict[str, Any]], out: str | Path, run_dir: str | Path, force: bool = False
) -> None:
    """``rows`` of :func:`predict_images` as CSV (path, class, probability, top_k) at ``out``
    (:func:`check_output`: never over a run's files; an existing file only with ``force``)."""
    out = Path(out)
    check_output(out, Path(run_dir), [RunDir(run_dir).predictions], force)

    def write(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "class", "probability", "top_k"])
            for r in rows:
                top = ";".join(f"{name}:{q:.6f}" for name, q in r["top"])
                w.writerow([r["path"], r["class"], f"{r['probability']:.6f}", top])

    write_output(out, write)


def preprocessing_card(info: RunInfo, fmt: str, model_file: str) -> dict[str, Any]:
    """What sits beside an exported model: class names and how to prepare an image."""
    # What the "test" transform does (data.transforms); another transform is named as it is.
    small = info.image_size <= SMALL_MAX
    side = info.image_size if small else int(info.image_size / info.resize.crop_fraction)
    steps = (
        [f"resize the shorter side to {side} px", f"centre-crop {info.image_size} px"]
        if info.transform == "test"
        else [f"longtail's {info.transform!r} transform at {info.image_size} px"]
    )
    # The same steps as numbers, for code that prepares images from the card alone.
    geometry = (
        {
            "resize_shorter_side": side,
            "interpolation": "bilinear" if small else info.resize.interpolation,
            "centre_crop": info.image_size,
        }
        if info.transform == "test"
        else {}
    )
    return {
        "model": model_file,
        "format": fmt,
        "input": {
            "name": "images",
            "shape": ["batch", info.channels, info.image_size, info.image_size],
            "dtype": "float32",
            "colour": "grey (1 channel)" if info.channels == 1 else "RGB",
        },
        "output": {"name": "logits", "shape": ["batch", info.num_classes]},
        "preprocess": [
            *steps,
            "scale pixel values to [0, 1]",
            "subtract mean, divide by std, per channel",
        ],
        **geometry,
        "mean": info.mean,
        "std": info.std,
        "classes": info.classes,
    }


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    checkpoint: str = "last",
    force: bool = False,
) -> Path:
    """Export a run's model (normalised images in, logits out) for use without longtail.

    Writes the model file and ``<name>.json`` beside it (:func:`preprocessing_card`), each
    atomically. Inside the run directory only ``export/`` is written; an existing file
    elsewhere is replaced only with ``force``.

    Args:
        run_dir: A trained run directory.
        fmt: ``onnx`` (opset chosen by PyTorch, batch dimension dynamic) or ``torchscript``.
        out: The model file (default ``<run_dir>/export/model.onnx`` or ``.pt``).
        checkpoint: ``last`` or ``best``.
        force: Replace an existing ``out`` (and its card) outside the run directory.

    Returns:
        The model file's path.
    """
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"{{format}} {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UsageError(
            "ONNX export needs the onnx package: pip install 'longtail[export]' (or onnx)"
        )
    run_dir = Path(run_dir)
    folder = RunDir(run_dir).export_dir
    out = Path(out) if out else folder / f"model{EXPORT_SUFFIX[fmt]}"
    defaults = [folder / f"model{suffix}" for suffix in EXPORT_SUFFIX.values()]
    own = [*defaults, *(p.with_name(p.name + ".json") for p in defaults)]  # re-export replaces
    check_output(out, run_dir, own, force)
    card_path = out.with_name(out.name + ".json")
    check_output(card_path, run_dir, own, force)
    _, method, info = load_run(run_dir, checkpoint, torch.device("cpu"))
    model = Predictor(method.float().to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, info.channels, info.image_size, info.image_size)

    def write_model(path: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporters' deprecation and tracer notices
            if fmt == "torchscript":
                torch.jit.trace(model, example).save(str(path))
            else:
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,  # the TorchScript-based exporter: no onnxscript needed, fast
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                )

    write_output(out, write_model)
    card = jsonio.dumps(preprocessing_card(info, fmt, out.name), indent=1)
    write_output(card_path, lambda path: path.write_text(card, encoding="utf-8"))
    return out
