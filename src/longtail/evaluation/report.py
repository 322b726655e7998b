"""The run report: plots of one trained run and a self-contained HTML page that embeds them.

Pure presentation: everything arrives in a :class:`ReportInput` (numbers already computed),
nothing here reads a run directory or runs a model. Plots use matplotlib's object API with
the Agg canvas, so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from longtail.evaluation.metrics import SHOT_GROUP_NAMES

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
# Class names are written on an axis up to this many classes; beyond, the axis shows ranks.
MAX_NAMED_CLASSES = 40
# Loss terms, the method's scalars and accuracies come from metrics.jsonl; these are not curves.
NOT_CURVES = frozenset(
    {"epoch", "epochs", "stage", "steps", "skipped_steps", "warnings", "epoch_time_s"}
)


@dataclass
class ReportInput:
    """What a report shows.

    Attributes:
        title: The run's name (its directory).
        summary: Rows of the summary table, label -> value (already formatted or a number).
        classes: Class names, indexed by class.
        train_counts: Training images per class.
        groups: Shot groups, ``{"many": [class, ...], ...}``.
        evaluation: ``evaluate_logits`` output of the test split (per_class, confusion,
            reliability, ece, top1, many/medium/few).
        history: The records of ``metrics.jsonl``, one per epoch.
        embedding: (N, 2) coordinates of test features, or None.
        embedding_labels: (N,) classes of those points.
        embedding_method: How the 2-D coordinates were made (shown in the caption).
        config_text: The run's config.yaml.
    """

    title: str
    summary: dict[str, Any]
    classes: list[str]
    train_counts: list[int]
    groups: dict[str, list[int]]
    evaluation: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    embedding: np.ndarray | None = None
    embedding_labels: np.ndarray | None = None
    embedding_method: str = ""
    config_text: str = ""

    def head_to_tail(self) -> list[int]:
        """Classes by training count, largest first (ties by class index)."""
        return sorted(range(len(self.classes)), key=lambda c: (-self.train_counts[c], c))

    def group_of(self) -> dict[int, str]:
        return {c: g for g, members in self.groups.items() for c in members}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _class_ticks(ax: Any, order: Sequence[int], names: Sequence[str], axis: str = "x") -> None:
    n = len(order)
    if n <= MAX_NAMED_CLASSES:
        ticks, labels = list(range(n)), [names[c] for c in order]
    else:
        ticks = list(range(0, n, max(1, n // 10)))
        labels = [str(t + 1) for t in ticks]
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=60 if n <= MAX_NAMED_CLASSES else 0, ha="right")
    else:
        ax.set_yticks(ticks, labels)


def plot_per_class(r: ReportInput) -> Figure:
    """Test accuracy of each class, head to tail, over its training count (log axis)."""
    order, group = r.head_to_tail(), r.group_of()
    acc = [r.evaluation["per_class"][c] for c in order]
    fig = Figure(figsize=(max(6.0, 0.28 * len(order) + 2), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(order))
    colours = [GROUP_COLOURS.get(group.get(c, ""), "grey") for c in order]
    ax.bar(x, [0 if a is None or math.isnan(a) else a for a in acc], color=colours)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("class, most to fewest training images")
    _class_ticks(ax, order, r.classes)
    twin = ax.twinx()
    twin.plot(x, [r.train_counts[c] for c in order], "k.-", lw=1)
    twin.set_yscale("log")
    twin.set_ylabel("training images (log)")
    handles = [Patch(color=GROUP_COLOURS[g], label=g) for g in SHOT_GROUP_NAMES if r.groups.get(g)]
    ax.legend(handles=handles, loc="upper center", ncol=3, frameon=False)
    ax.set_title("Per-class accuracy against training count")
    return fig


def plot_groups(r: ReportInput) -> Figure:
    """Mean per-class accuracy of the many / medium / few groups and overall."""
    names = [g for g in SHOT_GROUP_NAMES if r.evaluation.get(g) is not None]
    values = [r.evaluation[g] for g in names] + [r.evaluation["top1"]]
    labels = [f"{g}\n({len(r.groups[g])} classes)" for g in names] + ["all"]
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color=[GROUP_COLOURS[g] for g in names] + ["grey"])
    for b, v in zip(bars, values, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.set_title("Many / medium / few-shot classes")
    return fig


def plot_confusion(r: ReportInput) -> Figure:
    """Row-normalised confusion matrix, classes head to tail."""
    order = r.head_to_tail()
    cm = np.asarray(r.evaluation["confusion"], dtype=float)[np.ix_(order, order)]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    n = len(order)
    side = min(12.0, max(4.5, 0.4 * n + 2))
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                colour = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", color=colour,
                        fontsize=7)  # fmt: skip
    _class_ticks(ax, order, r.classes, "x")
    _class_ticks(ax, order, r.classes, "y")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (rows sum to 1)")
    return fig


def _curve_keys(history: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(loss terms and method scalars, accuracies, lr) keys present in the history."""
    keys: list[str] = []
    for rec in history:
        keys += [k for k in rec if k not in keys]
    numeric = [
        k
        for k in keys
        if k not in NOT_CURVES and any(isinstance(rec.get(k), (int, float)) for rec in history)
    ]
    accuracy = [k for k in numeric if k.endswith("top1") or k.split("/")[0] in ("test", "val")]
    terms = [k for k in numeric if k not in accuracy and k not in ("lr", "images_per_s")]
    return terms, accuracy, [k for k in numeric if k == "lr"]


def plot_curves(r: ReportInput) -> Figure:
    """Loss terms and the method's scalars, learning rate, accuracies, per epoch."""
    terms, accuracy, lr = _curve_keys(r.history)
    panels = [("loss terms and scalars", terms), ("learning rate", lr), ("accuracy", accuracy)]
    panels = [(t, k) for t, k in panels if k or t == "accuracy"]
    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.6))
    epochs = [rec["epoch"] for rec in r.history]
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            points = [
                (e, rec[k])
                for e, rec in zip(epochs, r.history, strict=True)
                if rec.get(k) is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), ".-", label=k)
        if title == "accuracy" and r.history:
            ax.plot([epochs[-1]], [r.evaluation["top1"]], "k*", ms=10, label="test top-1 (last)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7, frameon=False)
    stages = [(rec["epoch"], rec.get("stage")) for rec in r.history]
    for (_, a), (e, b) in zip(stages, stages[1:], strict=False):
        if a != b:  # a method with stages: mark where the next one starts
            for ax in fig.axes:
                ax.axvline(e - 0.5, color="grey", ls=":", lw=1)
    fig.tight_layout()
    return fig


def plot_embedding(r: ReportInput) -> Figure:
    """Test features in 2-D, coloured by class; few-shot classes as crosses."""
    assert r.embedding is not None and r.embedding_labels is not None
    fig = Figure(figsize=(6.5, 5.2))
    ax = fig.add_subplot()
    group = r.group_of()
    n = len(r.classes)
    colours = _class_colours(n)
    for c in r.head_to_tail():
        pts = r.embedding[r.embedding_labels == c]
        if not len(pts):
            continue
        few = group.get(c) == "few"
        ax.scatter(pts[:, 0], pts[:, 1], s=14 if few else 6, marker="x" if few else "o",
                   color=colours[c], alpha=0.8, linewidths=1,
                   label=r.classes[c] if n <= 20 else None)  # fmt: skip
    if n <= 20:
        ax.legend(fontsize=7, markerscale=2, frameon=False, loc="center left",
                  bbox_to_anchor=(1, 0.5))  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Test features, {r.embedding_method} (x: few-shot classes)")
    return fig


def _class_colours(n: int) -> list[Any]:
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(1, n - 1)) for i in range(n)]


def plot_reliability(r: ReportInput) -> Figure:
    """Accuracy against confidence per bin, with the ECE."""
    bins = r.evaluation["reliability"]
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    acc = [a if a is not None else 0.0 for a in bins["accuracy"]]
    conf = [c if c is not None else (lo + hi) / 2 for c, lo, hi in
            zip(bins["confidence"], edges[:-1], edges[1:], strict=True)]  # fmt: skip
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], acc, width=width, align="edge", color="#1f77b4", edgecolor="white",
           label="accuracy")  # fmt: skip
    ax.bar(edges[:-1], np.asarray(conf) - np.asarray(acc), bottom=acc, width=width,
           align="edge", color="#d62728", alpha=0.3, label="gap to confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", frameon=False)
    ax.set_title(f"Reliability, ECE {r.evaluation['ece']:.4f}")
    return fig


PLOTS = {
    "per_class": (plot_per_class, "Per-class test accuracy, head to tail"),
    "groups": (plot_groups, "Many / medium / few"),
    "curves": (plot_curves, "Training curves"),
    "confusion": (plot_confusion, "Confusion matrix"),
    "embedding": (plot_embedding, "Embedding of test features"),
    "reliability": (plot_reliability, "Calibration"),
}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if not math.isnan(v) else "–"
    return html.escape("–" if v is None else str(v))


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
figure { display: inline-block; margin: 1em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 90%; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""
# For a headless check: how many images the browser decoded.
COUNT_IMAGES = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def render_html(r: ReportInput, images: dict[str, bytes]) -> str:
    """The report page, every image embedded as a data URI."""
    e = html.escape
    summary = "".join(f"<tr><th>{e(k)}</th><td>{_cell(v)}</td></tr>" for k, v in r.summary.items())
    group = r.group_of()
    per_class = "".join(
        f"<tr><td>{rank + 1}</td><td>{e(r.classes[c])}</td><td>{r.train_counts[c]}</td>"
        f"<td>{group.get(c, '')}</td><td>{_cell(r.evaluation['per_class'][c])}</td></tr>"
        for rank, c in enumerate(r.head_to_tail())
    )
    figures = "".join(
        f'<figure><img alt="{e(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(images[name]).decode()}"><figcaption>{e(caption)}</figcaption>'
        "</figure>"
        for name, (_, caption) in PLOTS.items()
        if name in images
    )
    warnings = [f"epoch {rec['epoch']}: {w}" for rec in r.history for w in rec.get("warnings", [])]
    warn_html = (
        "<h2>Warnings during training</h2><ul>"
        + "".join(f"<li>{e(w)}</li>" for w in warnings)
        + "</ul>"
        if warnings
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>longtail report: {e(r.title)}</title>
<style>{STYLE}</style></head>
<body>
<h1>{e(r.title)}</h1>
<table>{summary}</table>
{warn_html}
{figures}
<h2>Per-class accuracy</h2>
<table><tr><th>rank</th><th>class</th><th>training images</th><th>group</th>
<th>test accuracy</th></tr>{per_class}</table>
<details><summary>config.yaml</summary><pre>{e(r.config_text)}</pre></details>
<script>{COUNT_IMAGES}</script>
</body></html>
"""


def write_report(r: ReportInput, page: str | Path, plots: str | Path) -> Path:
    """Write the page at ``page`` and each plot as ``plots/<name>.png``; returns the page."""
    page, plots = Path(page), Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for name, (plot, _) in PLOTS.items():
        if name == "embedding" and r.embedding is None:
            continue
        if name == "curves" and not r.history:
            continue
        images[name] = _png(plot(r))
        (plots / f"{name}.png").write_bytes(images[name])
    page.write_text(render_html(r, images), encoding="utf-8")
    return page
