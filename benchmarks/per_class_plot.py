"""Per-class test accuracy, head to tail, of the best entries of an accuracy table against CE.

Reads ``accuracy.json`` written by ``benchmarks/accuracy.py`` (one run or ``--merge``d) and
plots the mean per-class accuracy over each entry's seeds (bars: the lowest and highest seed),
classes ordered by training count, largest first. Writes a PNG and the plotted numbers as
JSON beside it.

    python benchmarks/per_class_plot.py benchmarks/results/fmnist-full-e10 --top 3 \\
        --baseline ce --out benchmarks/results/fmnist-full-e10/per_class.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from provenance import imbalance_ratio


def per_class_rows(runs: dict[str, dict]) -> dict[str, dict]:
    """Entry -> its seeds, mean top-1 and per-class mean / min / max over seeds."""
    by_entry: dict[str, list[dict]] = {}
    for run in runs.values():
        by_entry.setdefault(run["entry"], []).append(run)
    rows = {}
    for name, seeds in by_entry.items():
        per_seed = list(zip(*(r["per_class"] for r in seeds), strict=True))
        rows[name] = {
            "seeds": sorted(r["seed"] for r in seeds),
            "top1": statistics.fmean(r["top1"] for r in seeds),
            # a study's runs have a validation split: rank on it, never on the test set
            "val_top1": statistics.fmean(r["val_top1"] for r in seeds)
            if all(r.get("val_top1") is not None for r in seeds)
            else None,
            "mean": [statistics.fmean(c) for c in per_seed],
            "low": [min(c) for c in per_seed],
            "high": [max(c) for c in per_seed],
        }
    return rows


def plot(results: dict, top: int, baseline: str, out: Path) -> dict:
    """Draw the ``top`` entries and ``baseline``; returns the plotted numbers. Entries are
    ranked by mean validation top-1 where every run has one (a study's), else by test top-1
    (tables made before the validation split)."""
    runs = results["runs"]
    rows = per_class_rows(runs)
    if baseline not in rows:
        raise SystemExit(f"--baseline {baseline!r} is not in the table; entries: {sorted(rows)}")
    on = "val_top1" if all(r["val_top1"] is not None for r in rows.values()) else "top1"
    best = sorted((n for n in rows if n != baseline), key=lambda n: -rows[n][on])[:top]
    first = next(iter(runs.values()))
    counts, classes = first["train_counts"], first["classes"]
    order = sorted(range(len(classes)), key=lambda c: (-counts[c], c))

    fig = Figure(figsize=(8.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(order)))
    shown = {}
    for i, name in enumerate([*best, baseline]):
        r = rows[name]
        mean = [r["mean"][c] for c in order]
        err = [
            [r["mean"][c] - r["low"][c] for c in order],
            [r["high"][c] - r["mean"][c] for c in order],
        ]
        n = len(r["seeds"])
        label = f"{name} (top-1 {r['top1']:.3f}, {n} seed{'s' if n > 1 else ''})"
        style = {"color": "black", "linestyle": "--"} if name == baseline else {}
        ax.errorbar(
            [x + (i - 1.5) * 0.08 for x in xs], mean, yerr=err, marker="o", markersize=4,
            capsize=2, label=label, **style,
        )  # fmt: skip
        shown[name] = {**r, "classes_head_to_tail": [classes[c] for c in order]}
    ax.set_xticks(xs, [f"{classes[c]}\n{counts[c]}" for c in order], fontsize=7)
    ax.set_xlabel("class (training images), head to tail")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    b = results["budget"]
    ratio = imbalance_ratio(b)
    ax.set_title(
        f"{b['dataset']}-LT r{ratio}, {b['epochs']} epochs: per-class test accuracy "
        "(mean over seeds; bars: lowest and highest seed)",
        fontsize=9,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return shown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="folder holding accuracy.json")
    p.add_argument("--top", type=int, default=3, help="how many of the best entries")
    p.add_argument("--baseline", default="ce")
    p.add_argument("--out", type=Path, help="PNG path (default: <results>/per_class.png)")
    args = p.parse_args()
    results = json.loads((args.results / "accuracy.json").read_text())
    out = args.out or args.results / "per_class.png"
    shown = plot(results, args.top, args.baseline, out)
    out.with_suffix(".json").write_text(json.dumps(shown, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
