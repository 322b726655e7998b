"""Does the SC branch of a hybrid network collapse on a small grey folder, and what stops it?

Exports Fashion-MNIST-LT (ratio 50, n_max 600: 1,676 training images, 2,000 test images) as
a PNG ImageFolder tree, the shape of data the report came from, then trains hybrid-sc with
the Fashion-MNIST demo recipe for 12 epochs (lr 0.125, batch 128, x0.1 at epochs 7 and 10)
for each seed and each projection-head variant. Per epoch it records the SC term, its chance
value log(2B - 1), the mean pairwise cosine of the embeddings (z_cos) and any warning.
Writes <out>/collapse.json and <out>/collapse.md.

    python benchmarks/collapse.py --seeds 0 1 --out benchmarks/results/collapse
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image
from provenance import commit, hardware

from longtail.config import load_config
from longtail.data import load_source, long_tail_indices
from longtail.runs.train import train

VARIANTS = {
    "paper head (Linear-ReLU-Linear)": [],
    "+ BatchNorm in the head": ["model.projection_bn=true"],
    "+ 2 warm-up epochs": ["optim.warmup_epochs=2"],
}


def export_folder(root: Path) -> Path:
    """Fashion-MNIST-LT ratio 50, n_max 600 as train/<class>/<i>.png, every 5th test image."""
    if (root / "done").exists():
        return root
    train_src, test_src = (
        load_source("fashion-mnist", None, "train"),
        load_source("fashion-mnist", None, "test"),
    )
    for split, src, ids in (
        ("train", train_src, long_tail_indices(train_src.targets, 50, n_max=600)),
        ("test", test_src, np.arange(0, len(test_src), 5)),
    ):
        for i in ids:
            folder = root / split / src.classes[src.targets[i]].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(src.images[i]).save(folder / f"{i}.png")
    (root / "done").write_text("")
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/collapse"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = export_folder(args.out / "fmnist-lt50-folder")
    path = args.out / "collapse.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["hardware"] = hardware()
    results["commit"] = commit()
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}@seed{seed}"
            if key in results["runs"]:
                continue
            sets = [
                "data.dataset=folder",
                f"data.root={folder}",
                "data.ratio=null",
                "data.n_max=null",
                "train.epochs=12",
                "optim.milestones=[7,10]",
                f"seed={seed}",
                *VARIANTS[variant],
            ]
            cfg = load_config("configs/fashion-mnist/demo.yaml", sets)
            run = (
                args.out
                / "runs"
                / key.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
            )
            t0 = time.perf_counter()
            res = train(cfg, run, progress=False)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            results["runs"][key] = {
                "variant": variant,
                "seed": seed,
                "top1": res["top1"],
                "few": res["few"],
                "wall_s": time.perf_counter() - t0,
                "con": [r.get("train/con") for r in rows],
                "z_cos": [r.get("z_cos") for r in rows],
                "warned_epochs": [r["epoch"] for r in rows if r.get("warnings")],
                "chance": math.log(2 * cfg.train.batch_size - 1),
            }
            path.write_text(json.dumps(results, indent=1))
            print(f"{key}: top-1 {res['top1']:.4f}", flush=True)
    write_table(results, args.out / "collapse.md")


def write_table(results: dict, path: Path) -> None:
    lines = [
        f"hybrid-sc, Fashion-MNIST-LT ratio 50 / n_max 600 exported as PNG folders (1,676 images), "
        f"demo recipe, 12 epochs; commit {results.get('commit')}, {results['hardware']}. SC chance "
        "value log(255) = 5.541; epochs with a warning = the SC term within 1% of it all epoch.",
        "",
        "| head | seed | top-1 | few | SC term, epochs 1-4 | z_cos, epochs 1-4 | warned epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"].values():
        con = ", ".join(f"{v:.2f}" for v in r["con"][:4] if v is not None)
        cos = ", ".join(f"{v:.3f}" for v in r["z_cos"][:4] if v is not None)
        lines.append(f"| {r['variant']} | {r['seed']} | {r['top1']:.4f} | {r['few']:.4f} | {con} | "
                     f"{cos} | {r['warned_epochs'] or '-'} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
