"""Does starting from a pretrained backbone help on a long tail? Fashion-MNIST, honestly split.

A ResNet-32 is pretrained with cross-entropy on Fashion-MNIST's classes 0-4 (T-shirt/top,
Trouser, Pullover, Dress, Coat: all 30,000 training images, balanced). Then classes 5-9
(Sandal, Shirt, Sneaker, Bag, Ankle boot), made long-tailed at ratio 100, are learned by each
method twice at the same budget: from that run's backbone (``model.pretrained: <run>``) and
from random weights. No class of the second task is seen in pretraining; the test set is the
full balanced test set of classes 5-9. Recipes: configs/fashion-mnist/<method>-r100.yaml,
schedules scaled to the budget and lr to the batch as in benchmarks/accuracy.py.

    python benchmarks/transfer.py --pretrain-epochs 6 --epochs 6 --seeds 0 1 2

Each run is a run directory under <out>/runs; a finished one is skipped, so several processes
(e.g. ``--seeds 0 2`` and ``--seeds 1`` with ``--set train.threads=1``) can share ``--out``
once the pretraining run exists. Writes <out>/transfer.json and <out>/transfer.md from every
finished run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from accuracy import budget_config
from provenance import commit, hardware

from longtail.config import config_from_dict, deep_merge, load_config, parse_overrides
from longtail.runs.train import train

FIRST, SECOND = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
RECIPES = {"ce": "ce-r100.yaml", "hybrid-sc": "hybrid-sc-r100.yaml"}
STARTS = ("pretrained", "scratch")


def pretrain(out: Path, epochs: int, batch_size: int, extra: dict) -> Path:
    """The run on classes 0-4 (every image) that the pretrained arm starts from."""
    run_dir = out / "runs" / "pretrain-classes-0-4"
    if (run_dir / "eval_test.json").is_file():
        print(f"{run_dir.name}: done already", flush=True)
        return run_dir
    data = {"data": {"classes": FIRST, "ratio": None}}
    raw = budget_config(Path("configs/fashion-mnist/ce-r100.yaml"), {}, epochs, batch_size,
                        deep_merge(data, extra))  # fmt: skip
    raw["name"] = "pretrain-classes-0-4"
    t0 = time.perf_counter()
    res = train(config_from_dict(raw), run_dir, progress=False)
    print(f"{run_dir.name}: top-1 {res['top1']:.4f} in {time.perf_counter() - t0:.0f} s")
    return run_dir


def fine_tune(out: Path, first: Path, method: str, start: str, seed: int, args, extra: dict):
    key = f"{method}-{start}@seed{seed}"
    run_dir = out / "runs" / key
    if (run_dir / "eval_test.json").is_file():
        print(f"{key}: done already", flush=True)
        return
    section = {"data": {"classes": SECOND, "ratio": 100}}
    if start == "pretrained":
        section["model"] = {"pretrained": str(first)}
    raw = budget_config(Path("configs/fashion-mnist") / RECIPES[method], {}, args.epochs,
                        args.batch_size, deep_merge(section, extra))  # fmt: skip
    raw["name"], raw["seed"] = key, seed
    t0 = time.perf_counter()
    res = train(config_from_dict(raw), run_dir, progress=False)
    wall = time.perf_counter() - t0
    (run_dir / "wall_s.json").write_text(json.dumps({"wall_s": wall}))
    print(f"{key}: top-1 {res['top1']:.4f} in {wall:.0f} s", flush=True)


def collect(out: Path) -> dict:
    """Every finished fine-tuning run under ``out``."""
    runs = {}
    for run_dir in sorted((out / "runs").glob("*@seed*")):
        test = run_dir / "eval_test.json"
        if not test.is_file():
            continue
        ev = json.loads(test.read_text())
        name, seed = run_dir.name.split("@seed")
        method, start = name.rsplit("-", 1)
        wall = json.loads((run_dir / "wall_s.json").read_text())["wall_s"]
        runs[run_dir.name] = {
            "method": method,
            "start": start,
            "seed": int(seed),
            **{k: ev[k] for k in ("top1", "many", "medium", "few", "ece")},
            "train_counts": ev["train_counts"],
            "classes": ev["classes"],
            "wall_s": wall,
            "epochs": load_config(run_dir / "config.yaml").train.epochs,
        }
    return runs


def write_table(results: dict, path: Path) -> None:
    hw, b = results["hardware"], results["budget"]
    lines = [
        f"Fashion-MNIST transfer: pretrain CE on classes 0-4 ({results['pretrain_images']:,} "
        f"images, {b['pretrain_epochs']} epochs, test top-1 on classes 0-4 "
        f"{results['pretrain_top1']:.4f}); then classes 5-9 at ratio 100 "
        f"({sum(next(iter(results['runs'].values()))['train_counts']):,} images), "
        f"{b['epochs']} epochs, batch {b['batch_size']}, from that backbone or from random "
        f"weights. {results['backbone']}, {results['image_size']} px; commit "
        f"{results['commit']}; {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}; "
        f"overrides {b['overrides']}. Test: the full balanced test set of classes 5-9, "
        "last epoch; mean and sample sd over training seeds (same long-tailed subset).",
        "",
        "| method | backbone start | seeds | top-1 mean | top-1 sd | top-1 per seed | many "
        "| medium | few | ECE | wall time per run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"].values():
        groups.setdefault((run["method"], run["start"]), []).append(run)
    for (method, start), runs in sorted(groups.items()):
        runs.sort(key=lambda r: r["seed"])
        top1 = [r["top1"] for r in runs]
        sd = f"{statistics.stdev(top1):.4f}" if len(top1) > 1 else "-"

        def mean(k: str, rs: list[dict] = runs) -> str:
            vals = [r[k] for r in rs if r[k] is not None]
            return f"{statistics.mean(vals):.4f}" if vals else "-"

        lines.append(
            f"| {method} | {start} | {len(runs)} | {mean('top1')} | {sd} | "
            f"{', '.join(f'{v:.4f}' for v in top1)} | {mean('many')} | {mean('medium')} | "
            f"{mean('few')} | {mean('ece')} | {statistics.mean(r['wall_s'] for r in runs):.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning and scratch, the same")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="key=value for all")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/transfer"))
    p.add_argument("--table-only", action="store_true", help="write the table of finished runs")
    args = p.parse_args()
    extra = parse_overrides(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    first = args.out / "runs" / "pretrain-classes-0-4"
    if not args.table_only:
        first = pretrain(args.out, args.pretrain_epochs, args.batch_size, extra)
        for seed in args.seeds:
            for method in args.methods:
                for start in STARTS:
                    fine_tune(args.out, first, method, start, seed, args, extra)
    runs = collect(args.out)
    results = {
        "hardware": hardware(),
        "commit": commit(),
        "budget": {  # as the runs on disk were trained
            "pretrain_epochs": load_config(first / "config.yaml").train.epochs,
            "epochs": sorted({r["epochs"] for r in runs.values()}),
            "batch_size": args.batch_size,
            "overrides": args.overrides,
        },
        "pretrain_top1": json.loads((first / "eval_test.json").read_text())["top1"],
        "pretrain_images": json.loads((first / "data.json").read_text())["total"],
        "backbone": load_config(first / "config.yaml").model.backbone,
        "image_size": load_config(first / "config.yaml").data.image_size,
        "runs": runs,
    }
    (args.out / "transfer.json").write_text(json.dumps(results, indent=1))
    if runs:
        write_table(results, args.out / "transfer.md")
        print((args.out / "transfer.md").read_text())


if __name__ == "__main__":
    main()
