"""A study's progress and its report: the table over seeds, the best settings of each search,
per-class accuracy head to tail.

Entries are ranked by validation top-1 (the split the study selects on); test metrics are
shown beside it, measured once per trial at its last epoch, and never used to choose.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import socket
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from longtail.engine.run_dir import RunDir, images_per_s
from longtail.errors import UsageError
from longtail.methods import METHODS
from longtail.studies.spec import Entry, trial_config
from longtail.studies.store import StudyPlace, _epochs_seen, trial_rows, val_images

STATES = ("complete", "running", "waiting", "pruned", "failed")
METRICS = ("val_top1", "top1", "many", "medium", "few", "ece")


# Two-sided 95% quantiles of Student's t with 1..30 degrees of freedom (from its tables);
# past 30, the normal's 1.96 is within 0.05 of them.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
       2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
       2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def versus(
    best: dict[int, float], other: dict[int, float], step: float | None = None
) -> dict[str, Any]:
    """``other`` against ``best`` (validation top-1 by seed): the mean and sd of their
    differences on the seeds both ran, and a paired t-test's verdict at 95%: "worse",
    "better", "not told apart", or "untested" (fewer than two shared seeds).

    Args:
        step: the measure's resolution (1 / validation images). The test reads the sd of the
            differences as at least one step: top-1 moves in steps, so two seeds can differ
            by the same amount by chance (sd 0), which would tell any gap apart.
    """
    diffs = [other[s] - best[s] for s in sorted(set(best) & set(other))]
    out: dict[str, Any] = {"seeds": len(diffs), "diff": None, "sd": None, "verdict": "untested"}
    if not diffs:
        return out
    out["diff"], out["sd"] = _mean_sd(diffs)
    if len(diffs) < 2:
        return out
    n, mean, sd = len(diffs), out["diff"], out["sd"]
    critical = T95[n - 2] if n - 1 <= len(T95) else 1.96
    sd = max(sd, step or 0.0)
    told = abs(mean) / (sd / math.sqrt(n)) > critical if sd > 0 else mean != 0
    out["verdict"] = ("better" if mean > 0 else "worse") if told else "not told apart"
    return out


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last attempt at each trial of the study file (a failed try that was retried or
    enqueued again counts once, as its latest attempt)."""
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["number"]):
        last[(r["entry"], r["run"])] = r
    return list(last.values())


def progress(place: StudyPlace) -> dict[str, Any]:
    """Counts of trials by state per entry (the latest attempt of each), and the running
    trials with their last epoch."""
    counts: dict[str, dict[str, int]] = {
        e.name: dict.fromkeys(STATES, 0) for e in place.spec.entries
    }
    running: list[str] = []
    failed: list[str] = []
    rows = latest(trial_rows(place))
    for r in rows:
        state = {"fail": "failed"}.get(r["state"], r["state"])
        counts.setdefault(r["entry"], dict.fromkeys(STATES, 0))
        counts[r["entry"]][state] = counts[r["entry"]].get(state, 0) + 1
        if state == "running":
            epoch = max(r["steps"]) if r["steps"] else 0
            said = f"{r['entry']}/{r['run']} on {r.get('worker', '?')}, epoch {epoch}"
            if r.get("stale"):
                said += (f", but no heartbeat for over {place.spec.grace_s:g} s: its worker "
                         "stopped; the next worker that looks continues it")  # fmt: skip
            running.append(said)
        elif state == "failed":  # its last attempt, with the last line of its log
            why = r.get("error", "its worker died (no heartbeat) and its retries ran out")
            failed.append(f"{r['entry']}/{r['run']}: {why}")
    total = sum(sum(c.values()) for c in counts.values())
    finished = sum(c["complete"] + c["pruned"] + c["failed"] for c in counts.values())
    left = time_left(rows, place.spec.epochs)
    return {"counts": counts, "running": running, "failed": failed, "total": total,
            "finished": finished, "left_s": left}  # fmt: skip


def time_left(rows: list[dict[str, Any]], epochs: int | None) -> float | None:
    """Seconds the study has left at the pace of the workers running trials now: a trial not
    finished costs the mean wall time of its entry's finished trials (else of all finished
    trials), a running one the share of it its epochs have not done (of ``epochs``, where the
    study sets them); the sum is shared by those workers (at least one; a stale trial's
    worker stopped). None before any trial has finished."""
    walls: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["state"] == "complete" and r.get("wall_s"):
            walls[r["entry"]].append(float(r["wall_s"]))
    if not walls:
        return None
    overall = statistics.fmean(w for ws in walls.values() for w in ws)
    left, workers = 0.0, set()
    for r in rows:
        if r["state"] not in ("waiting", "running"):
            continue
        cost = statistics.fmean(walls[r["entry"]]) if walls.get(r["entry"]) else overall
        if r["state"] == "running" and not r.get("stale"):  # a worker trains it now
            workers.add(r.get("worker"))
            if epochs:
                cost *= max(0.0, 1 - max(r["steps"], default=0) / epochs)
        left += cost
    return left / max(1, len(workers))


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def status_lines(place: StudyPlace, p: dict[str, Any] | None = None, width: int = 30) -> list[str]:
    """What ``longtail study status`` prints: a bar, then one line per entry (of ``p``, the
    study's ``progress``, read now where not given)."""
    p = p if p is not None else progress(place)
    share = p["finished"] / p["total"] if p["total"] else 1.0
    bar = "#" * round(width * share) + "-" * (width - round(width * share))
    lines = [
        f"{place.spec.name}: [{bar}] {p['finished']}/{p['total']} trials finished ({place.url})"
    ]
    if p["left_s"] and p["finished"] < p["total"]:
        lines.append(
            f"  about {_duration(p['left_s'])} left at the pace of the workers running now "
            "(each trial: its entry's finished ones' mean wall time; for an entry with none, "
            "all finished trials')"
        )
    for entry, c in p["counts"].items():
        said = ", ".join(f"{c[s]} {s}" for s in STATES if c[s])
        lines.append(f"  {entry}: {said}")
    lines += [f"  running: {r}" for r in p["running"]]
    lines += [f"  failed: {r}" for r in p["failed"]]
    if p["failed"]:
        lines.append("  (`longtail study run` enqueues failed trials again)")
    return lines


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(place: StudyPlace) -> dict[str, Any]:
    """The report's numbers: per entry the fixed trials' metrics over seeds (mean, sd), and
    per searched entry its best trial by validation top-1."""
    every = latest(trial_rows(place))
    pruned: dict[str, int] = defaultdict(int)
    for r in every:
        if r["state"] == "pruned":
            pruned[r["entry"]] += 1
    rows = [r for r in every if r["state"] == "complete"]
    fixed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    search: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        (fixed if r["kind"] == "fixed" else search)[r["entry"]].append(r)
    table = []
    for entry in place.spec.entries:
        runs = sorted(fixed.get(entry.name, []), key=lambda r: r["seed"])
        if not runs:
            continue
        method = trial_config(place.spec, entry, runs[0]["seed"], {}, place.base).method_name
        row: dict[str, Any] = {"entry": entry.name, "seeds": len(runs), "method": method}
        row["top1_per_seed"] = [r["top1"] for r in runs]
        row["val_by_seed"] = {r["seed"]: float(r["val_top1"]) for r in runs}
        for m in METRICS:
            values = [float(r[m]) for r in runs if r.get(m) is not None]
            row[m], row[f"{m}_sd"] = _mean_sd(values)
        row["wall_s"] = statistics.fmean(float(r["wall_s"]) for r in runs)
        # trials stored before images_per_s was kept: their run directory's metrics, if here
        speeds = [r.get("images_per_s") or _speed(place.run_dir(r)) for r in runs]
        row["images_per_s"] = statistics.fmean(speeds) if None not in speeds else None
        row["per_class"] = [
            statistics.fmean(v) for v in zip(*(r["per_class"] for r in runs), strict=True)
        ]
        row["classes"], row["train_counts"] = runs[0]["classes"], runs[0]["train_counts"]
        top = max(runs, key=lambda r: float(r["val_top1"]))  # its model to use: a run directory
        row["best_run"] = {"seed": top["seed"], "val_top1": float(top["val_top1"]),
                           "path": str(place.run_dir(top)),
                           "host": str(top.get("worker", "")).rpartition(":")[0]}  # fmt: skip
        table.append(row)
    table.sort(key=lambda r: -(r["val_top1"] or 0))
    # trials stored before val_images was kept: their run directory's data.json, if here
    sizes = {r.get("val_images") or val_images(place.run_dir(r)) for r in rows}
    n_val = sizes.pop() if len(sizes) == 1 else None
    for r in table[1:]:
        r["versus_best"] = versus(
            table[0]["val_by_seed"], r["val_by_seed"], 1 / n_val if n_val else None
        )
    best = []
    for entry in place.spec.entries:
        tried = search.get(entry.name, [])
        if tried:
            top = max(tried, key=lambda r: r["val_top1"])
            best.append(
                {
                    "entry": entry.name,
                    "trials": len(tried) + pruned[entry.name],
                    "pruned": pruned[entry.name],
                    "params": top["params"],
                    "val_top1": top["val_top1"],
                    "top1": top["top1"],
                    "run": top["run"],
                }
            )
    machines = _machines([r["provenance"] for r in rows if r.get("provenance")])
    states = Counter(r["state"] for r in every)
    return {"table": table, "best": best, "machines": machines, "states": dict(states),
            "val_images": n_val}  # fmt: skip


def _machines(provenances: list[dict[str, Any]]) -> list[str]:
    """Each kind of machine the trials ran on, once, with the longtail commits it ran (in the
    order the trials were stored): a study resumed over weeks lists its commits, not one
    line per commit."""
    commits: dict[str, list[str]] = {}
    for p in provenances:
        device = p.get("cuda") or f"{p.get('cpu')}, {p.get('cores')} cores"
        seen = commits.setdefault(f"{device}, torch {p.get('torch')}", [])
        if str(p.get("commit")) not in seen:
            seen.append(str(p.get("commit")))
    return [
        f"{machine}, longtail commit{'s' if len(c) > 1 else ''} {', '.join(c)}"
        for machine, c in commits.items()
    ]


def _cell(mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def markdown(place: StudyPlace, summary: dict[str, Any]) -> str:
    """The report as markdown: the table over seeds, then the searches' best settings."""
    spec = place.spec
    budget = f"{spec.epochs} epochs" if spec.epochs else "each recipe's own epochs"
    own = any(e.seeds is not None for e in spec.entries)
    seeds = f"seeds {spec.seeds}" + (" (or the entry's own)" if own else "")
    lines = [
        f"Study {spec.name}: {len(spec.entries)} entries x {seeds}, {budget}. "
        "Ranked by validation top-1 (held out of the training set; the study selects and "
        "prunes on it alone); test metrics at the last epoch, mean ± sd over seeds; wall "
        "time (the whole trial) and training images/s as measured, beside whatever else ran "
        "on its machine.",
        "",
        *_noise(summary),
        *_unfinished(summary.get("states", {})),
    ]
    shown = {r["entry"] for r in summary["table"]} | {b["entry"] for b in summary["best"]}
    missing = [e.name for e in spec.entries if e.name not in shown]
    if missing:
        lines += [f"No trial finished yet, so not in the table: {', '.join(missing)}.", ""]
    # a shot group with no class in this data (Fashion-MNIST-LT at ratio 100 has no class
    # under 20 images): its column is left out and said so
    groups = ("many", "medium", "few")
    absent = [g for g in groups if summary["table"] and all(r[g] is None for r in summary["table"])]
    if absent:
        lines += [f"No {' or '.join(absent)}-shot class in this data (many: over 100 training "
                  "images, medium: 20 to 100, few: under 20).", ""]  # fmt: skip
    metrics = [m for m in METRICS if m not in absent]
    head = ["entry", "paper", "seeds", "val top-1", "val vs best, paired", "test top-1",
            "test top-1 per seed", *[m for m in metrics[2:] if m != "ece"], "ECE", "wall s",
            "images/s"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["table"]:
        cells = [_cell(r[m], r[f"{m}_sd"]) for m in metrics]
        cells.insert(1, _versus_cell(r.get("versus_best")))
        cells.insert(3, ", ".join(f"{v:.4f}" for v in r["top1_per_seed"]))
        name = r["entry"] if r["method"] == r["entry"] else f"{r['entry']} ({r['method']})"
        lines.append(
            f"| {name} | {paper_of(r['method'])} | {r['seeds']} | "
            + " | ".join(cells)
            + f" | {r['wall_s']:.0f} | "
            + (f"{r['images_per_s']:.0f} |" if r.get("images_per_s") else "- |")
        )
    if len(summary["table"]) > 1:
        lines += ["", _verdicts(summary["table"])]
    if summary["table"]:
        run = summary["table"][0]["best_run"]
        path = run["path"]
        # a worker on another machine trained into that machine's study folder
        where = f" on {run['host']}" if run["host"] not in ("", socket.gethostname()) else ""
        lines += [
            "",
            f"The best entry's model: its run at seed {run['seed']} (validation top-1 "
            f"{run['val_top1']:.4f}), `{path}`{where}; `longtail predict {path} IMAGES` "
            f"classifies with it, `longtail export {path}` exports it.",
        ]
    if summary.get("machines"):
        lines += ["", "Trials ran on: " + "; ".join(summary["machines"]) + "."]
    if summary["best"]:
        lines += [
            "",
            "Best settings found (by validation top-1, first seed):",
            "",
            "| entry | trials | settings | val top-1 | test top-1 |",
            "|---|---|---|---|---|",
        ]
        for b in summary["best"]:
            settings = ", ".join(f"{k}={_short(v)}" for k, v in b["params"].items())
            tried = f"{b['trials']} ({b['pruned']} pruned)" if b["pruned"] else str(b["trials"])
            lines.append(
                f"| {b['entry']} | {tried} | {settings} | {b['val_top1']:.4f} | {b['top1']:.4f} |"
            )
        lines += ["", "A search chose on its first seed alone: to run its best settings over the "
                  "seeds, add this entry to the study file and run it again:", ""]  # fmt: skip
        lines += [f"    - {_best_entry(place.spec.entry(b['entry']), b['params'])}"
                  for b in summary["best"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def _speed(run_dir: Path) -> float | None:
    """The training images/s of a run directory's metrics.jsonl; None without it."""
    return images_per_s(_epochs_seen(RunDir(run_dir).metrics))


def _noise(summary: dict[str, Any]) -> list[str]:
    """A line on what the validation split's size alone allows: the binomial standard error
    of one run's validation top-1 at the best entry's. Every seed sees the same split, so
    the paired test over seeds does not include this noise."""
    n, table = summary.get("val_images"), summary["table"]
    if not n or not table:
        return []
    p = float(table[0]["val_top1"])
    se = math.sqrt(p * (1 - p) / n)
    return [
        f"Validation: {n:,} images. From its size alone one run's validation top-1 (near "
        f"{p:.4f}) has a standard error of about {se:.4f}: entries closer than about "
        f"{2 * se:.4f} may owe their order to which images the split holds (every seed "
        "has the same split, so the paired test over seeds does not see this). Top-1 "
        f"moves in steps of 1/{n:,}: the paired test reads the spread of an entry's "
        "differences to the best as at least one step.",
        "",
    ]


def _best_entry(entry: Entry, params: dict[str, Any]) -> str:
    """A study file's entry (YAML, one line) of ``entry`` with the searched ``params`` set (to
    the 4 digits the report shows)."""
    given = {**entry.set, **{k: float(f"{v:.4g}") if isinstance(v, float) else v
                             for k, v in params.items()}}  # fmt: skip
    best = {"name": f"{entry.name}-best", "recipe": entry.recipe, "set": given}
    return yaml.safe_dump(best, default_flow_style=True, sort_keys=False, width=10**6).strip()


def _unfinished(states: dict[str, int]) -> list[str]:
    """A line (and a blank one) saying that the study had trials left when the report was
    written, so that a table of its finished trials is not read as the whole study."""
    left = {s: states.get(s, 0) for s in ("running", "waiting", "fail")}
    if not any(left.values()):
        return []
    done = states.get("complete", 0) + states.get("pruned", 0)
    said = ", ".join(f"{n} {'failed' if s == 'fail' else s}" for s, n in left.items() if n)
    return [
        f"Unfinished when written: {done} of {done + sum(left.values())} trials finished "
        f"({said}); the table holds the finished ones, each entry over the seeds it has.",
        "",
    ]


def _versus_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "best"
    if v["diff"] is None:
        return "no shared seed"
    sd = f" ± {v['sd']:.4f}" if v["sd"] is not None else ""
    seeds = " (one seed)" if v["verdict"] == "untested" else f" ({v['seeds']} seeds)"
    return f"{v['diff']:+.4f}{sd}: {v['verdict']}{seeds}"


NUMBERS = ("None", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")


def _verdicts(table: list[dict[str, Any]]) -> str:
    """The paired tests against the best entry, in words."""
    by: dict[str, list[str]] = defaultdict(list)
    apart_seeds = []  # the seeds of each pair the test could not tell apart
    for r in table[1:]:
        by[r["versus_best"]["verdict"]].append(r["entry"])
        if r["versus_best"]["verdict"] == "not told apart":
            apart_seeds.append(r["versus_best"]["seeds"])
    said = [f"Best on validation: {table[0]['entry']}."]
    # "better": entries are ranked by their means over all their seeds, so on the seeds
    # shared with the best the order may turn
    tested = [f"{words}: {', '.join(by[verdict])}" for verdict, words in (
        ("worse", "worse than it"), ("better", "better than it"),
        ("not told apart", "not told apart from it")) if by[verdict]]  # fmt: skip
    if tested:
        said.append("By a paired t-test of validation top-1 over the seeds both ran (95%), "
                    + "; ".join(tested) + ".")  # fmt: skip
    if apart_seeds:
        n = min(apart_seeds)
        count = NUMBERS[n] if n < len(NUMBERS) else str(n)
        said.append(f"{count} seeds tell only large differences apart; more seeds narrow it.")
    if by["untested"]:
        said.append(f"Untested, sharing fewer than two seeds with it: {', '.join(by['untested'])}.")
    return " ".join(said)


def paper_of(method: str) -> str:
    """The method's paper, short (first author and venue), from the method registry."""
    parts = [s.strip() for s in METHODS.meta(method)["paper"].split(",")]
    return f"{parts[0]}, {parts[-1]}" if len(parts) > 2 else ", ".join(parts)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _per_class_png(table: list[dict[str, Any]], best: int = 4) -> str:
    """Per-class test accuracy of the ``best`` entries, classes ordered head to tail; a
    base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for r in table[:best]:
        order = sorted(range(len(r["train_counts"])), key=lambda i: -r["train_counts"][i])
        ax.plot(
            range(len(order)),
            [r["per_class"][i] for i in order],
            marker="o",
            ms=3,
            label=r["entry"],
        )
    ax.set_xlabel("class, most training images first")
    r = table[0]
    if r.get("classes") and len(r["classes"]) <= 30:  # names fit: with their training images
        order = sorted(range(len(r["train_counts"])), key=lambda i: -r["train_counts"][i])
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([f"{r['classes'][i]} ({r['train_counts'][i]})" for i in order],
                           rotation=35, ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(place: StudyPlace) -> tuple[Path, Path]:
    """``report.html`` and ``report.md`` in the study folder, the page's per-class plot as
    ``report-per-class.png`` and its numbers as ``report.json`` (``summarise``'s: per entry
    the metrics by seed, their means and sds, the per-class accuracies and the paired test;
    each search's best trial; the machines), for scripts.

    Raises:
        UsageError: When no trial has finished yet.
    """
    summary = summarise(place)
    if not summary["table"] and not summary["best"]:
        raise UsageError(
            f"no trial of study {place.spec.name!r} has finished yet; see `longtail study status`"
        )
    md = markdown(place, summary)
    md_path, html_path = place.folder / "report.md", place.folder / "report.html"
    md_path.write_text(md, encoding="utf-8")
    plot = _per_class_png(summary["table"]) if summary["table"] else None
    html_path.write_text(_html(place, md, plot), encoding="utf-8")
    if plot:  # the page's plot as a file too, for a README beside report.md
        (place.folder / "report-per-class.png").write_bytes(base64.b64decode(plot))
    numbers = {"study": place.spec.name, "epochs": place.spec.epochs, **summary}
    (place.folder / "report.json").write_text(json.dumps(numbers, indent=1) + "\n")
    return html_path, md_path


def _td(cell: str) -> str:
    """A table cell; numbers (and a number's dash) right-aligned."""
    number = cell == "-" or re.match(r"[-+]?\d", cell) is not None
    # a number, a mean ± sd or a list of them does not break across lines
    whole = cell == "-" or re.fullmatch(r"[-+]?[\d.]+( ± [\d.]+)?(, [\d.]+)*", cell) is not None
    kind = " class=n" if number and not whole else " class='n w'" if whole else ""
    return f"<td{kind}>{html.escape(cell)}</td>"


def _html(place: StudyPlace, md: str, plot: str | None) -> str:
    """The markdown's tables as HTML, with the per-class plot."""
    body, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, rows = table[0], [r for r in table[2:]]
            body.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
            table = []
        if line.startswith("    "):  # a code block's line
            body.append(f"<pre>{html.escape(line[4:])}</pre>")
        elif line:  # `code` spans as code
            parts = html.escape(line).split("`")
            body.append("<p>" + "".join(f"<code>{t}</code>" if k % 2 else t
                                        for k, t in enumerate(parts)) + "</p>")  # fmt: skip
    if plot:
        body.append("<h2>Per-class test accuracy, head to tail (best entries)</h2>")
        body.append(f'<img alt="per-class accuracy" src="data:image/png;base64,{plot}">')
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
        "td.n{text-align:right;min-width:11em}td.w{white-space:nowrap;min-width:0}"
        "td:first-child{white-space:nowrap}td:nth-child(2){min-width:10em}table{font-size:90%}"
        "p,h2{max-width:70em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>study "
        f"{html.escape(place.spec.name)}</title><style>{style}</style></head><body>"
        f"<h1>Study {html.escape(place.spec.name)}</h1>{''.join(body)}</body></html>\n"
    )
