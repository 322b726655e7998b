"""A trained run used as a user would: predict on an image folder, export, run the exports.

For an ImageFolder tree ``<folder>/<class name>/<image>`` (e.g. the PNG test split that
``benchmarks/collapse.py`` writes), this script
1. runs ``longtail predict`` on the folder and scores it against the folder names;
2. exports ONNX and TorchScript, then runs both on the same images preprocessed with only
   what the exported ``.json`` card says (mean, std), and scores them;
3. compares the three: equal predictions, the largest logit difference between the exports.
Writes <out>/deploy.json and <out>/deploy.md. A missing ``<root>/test`` folder is first
written as ``benchmarks/collapse.py`` writes it (Fashion-MNIST-LT as PNG files under
``<root>/train`` and ``<root>/test``).

    python benchmarks/deploy.py runs/demo benchmarks/results/collapse/fmnist-lt50-folder/test \
        --out benchmarks/results/deploy
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from longtail.runs.deploy import export_run, predict_images


def _card_inputs(card: dict, paths: list[Path]) -> np.ndarray:
    """Images as the card says: [0, 1], minus mean, over std (the test images are already at
    the model's size, so the resize and centre crop are no-ops)."""
    mean = np.array(card["mean"], dtype=np.float32)[:, None, None]
    std = np.array(card["std"], dtype=np.float32)[:, None, None]
    mode = "L" if card["input"]["shape"][1] == 1 else "RGB"
    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert(mode), dtype=np.float32) / 255
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        out.append((a - mean) / std)
    return np.stack(out).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("folder", type=Path, help="<folder>/<class name>/<image>")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy"))
    args = p.parse_args()
    import onnxruntime as ort  # the export extra; imported here so --help works without it

    if not args.folder.exists():
        from collapse import export_folder  # the sibling script; needs Fashion-MNIST

        export_folder(args.folder.parent)
    paths = sorted(f for f in args.folder.glob("*/*") if f.is_file())

    # folder names cannot hold "/", so "T-shirt/top" is written "T-shirt-top" on disk
    def truth_of(path: Path, classes: list[str]) -> str:
        by_disk = {c.replace("/", "-"): c for c in classes}
        return by_disk[path.parent.name]

    t0 = time.perf_counter()
    rows = predict_images(args.run, paths)
    predict_s = time.perf_counter() - t0
    onnx_file, ts_file = export_run(args.run, "onnx"), export_run(args.run, "torchscript")
    card = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    classes = card["classes"]
    truth = [truth_of(f, classes) for f in paths]
    x = _card_inputs(card, paths)
    session = ort.InferenceSession(str(onnx_file))
    name = session.get_inputs()[0].name
    onnx_logits = np.concatenate(
        [session.run(None, {name: x[i : i + 500]})[0] for i in range(0, len(x), 500)]
    )
    script = torch.jit.load(str(ts_file))
    with torch.no_grad():
        ts_logits = script(torch.from_numpy(x)).numpy()

    predicted = [r["class"] for r in rows]
    onnx_pred = [classes[i] for i in onnx_logits.argmax(1)]
    ts_pred = [classes[i] for i in ts_logits.argmax(1)]
    result = {
        "run": str(args.run),
        "folder": str(args.folder),
        "images": len(paths),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "accuracy": {
            "predict": float(np.mean([a == b for a, b in zip(predicted, truth, strict=True)])),
            "onnx": float(np.mean([a == b for a, b in zip(onnx_pred, truth, strict=True)])),
            "torchscript": float(np.mean([a == b for a, b in zip(ts_pred, truth, strict=True)])),
        },
        "onnx_equals_predict": sum(a == b for a, b in zip(onnx_pred, predicted, strict=True)),
        "max_abs_logit_diff_onnx_torchscript": float(np.abs(onnx_logits - ts_logits).max()),
        "predict_s": predict_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy.json").write_text(json.dumps(result, indent=1))
    acc = result["accuracy"]
    (args.out / "deploy.md").write_text(
        f"Run `{args.run}` on `{args.folder}` ({len(paths)} images), commit "
        f"{result['commit']}.\n\n"
        "| path | accuracy against the folder names |\n|---|---|\n"
        f"| `longtail predict` | {acc['predict']:.4f} |\n"
        f"| ONNX Runtime on the exported model.onnx | {acc['onnx']:.4f} |\n"
        f"| TorchScript model.pt | {acc['torchscript']:.4f} |\n\n"
        f"ONNX predictions equal `predict`'s on {result['onnx_equals_predict']} of {len(paths)} "
        f"images; largest |logit| difference ONNX vs TorchScript "
        f"{result['max_abs_logit_diff_onnx_torchscript']:.2e}; predict took "
        f"{predict_s:.1f} s.\n"
    )
    print((args.out / "deploy.md").read_text())


if __name__ == "__main__":
    main()
