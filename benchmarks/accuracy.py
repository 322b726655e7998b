"""Accuracy of the hybrid-network family and its baselines at an equal epoch budget.

Each entry trains one recipe with the same data, epochs and batch size; the recipe's
lr milestones and warm-up are scaled from its 200-epoch schedule to the budget, and its
lr scaled linearly with the batch size (base batch: the recipe's own). The last epoch is
evaluated on the full test set. Writes <out>/accuracy.json and <out>/accuracy.md.

    python benchmarks/accuracy.py --epochs 6 --batch-size 128 --seeds 0 1 --out benchmarks/results/x

It is a study (``longtail study``, the library's): the entries below become a study file's
entries, trained by its workers (``--workers N`` processes) into <out>/runs/<entry>/seed-<s>
with the study's storage in <out>/study.db; each trial holds out ``--val-per-class`` images
of each class for validation (a study's rule; nothing here is chosen on them) and records
its machine and commit. A finished (entry, seed) is kept on a re-run, an interrupted one
resumed from its checkpoint. Runs into a folder that holds the benchmark's study already
join it at the same budget: e.g. every entry at seed 0, then a few at seeds 1 and 2

    A="python benchmarks/accuracy.py --epochs 10 --out benchmarks/results/x"
    $A --seeds 0 && $A --seeds 1 2 --entries hybrid-sc ce

make one study (``<out>/study.yaml``: each entry at its own seeds) and one table. Tables
made before the benchmark became a study (no validation split,
``<out>/runs/<entry>@seed<s>``) keep their rows.
Results of several runs of the benchmark (e.g. two processes of one thread each, writing to
two folders) go into one table with

    python benchmarks/accuracy.py --merge benchmarks/results/a benchmarks/results/b --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml
from provenance import commit, hardware, imbalance_ratio

from longtail.build import carried_options, scale_epochs
from longtail.config import config_from_dict, deep_merge, flat, load_config, parse_overrides
from longtail.engine.run_dir import images_per_s
from longtail.errors import LongtailError
from longtail.runs.read import read_run_config
from longtail.studies import (
    Stopped,
    StudyPlace,
    check_unchanged,
    open_studies,
    run_workers,
    trial_rows,
)
from longtail.studies.report import latest, paper_of
from longtail.studies.spec import Entry, StudySpec

# the papers' views for bcl: AutoAugment(CIFAR10) + Cutout for the classifier, SimCLR's crops
BCL_PAPER_VIEWS = {"classifier_transform": "strong", "con_transforms": ["simclr", "simclr"]}

# name in the table -> (recipe file under configs/<dataset>/, method overrides[, overrides of
# other sections, applied after the schedule is scaled])
ENTRIES: dict[str, tuple] = {
    "ce": ("ce-r100.yaml", {}),
    "ce-ce": ("hybrid-sc-r100.yaml", {"name": "ce-ce"}),
    "two-stage-sc": ("hybrid-sc-r100.yaml", {"name": "two-stage-sc"}),
    "hybrid-sc": ("hybrid-sc-r100.yaml", {}),
    "hybrid-psc": ("hybrid-psc-r100.yaml", {}),
    "hybrid-mpsc": ("hybrid-psc-r100.yaml", {"name": "hybrid-mpsc"}),  # M = 2, the default
    "hybrid-mpsc-m1": ("hybrid-psc-r100.yaml", {"name": "hybrid-mpsc", "num_prototypes": 1}),
    "hybrid-mpsc-m4": ("hybrid-psc-r100.yaml", {"name": "hybrid-mpsc", "num_prototypes": 4}),
    # The Fashion-MNIST recipes of bcl and dscl use the hybrid entries' views (ours); the
    # *-paper-views entries put back the papers' views.
    "bcl": ("bcl-r100.yaml", {}),
    "bcl-paper-views": ("bcl-r100.yaml", BCL_PAPER_VIEWS),
    # Ablations that tell why bcl with the paper's views trails at short budgets: no
    # contrastive term (its logit-adjusted cosine classifier on the strong view alone), the
    # weak view for the classifier, and both.
    "bcl-no-con": ("bcl-r100.yaml", {**BCL_PAPER_VIEWS, "bcl_weight": 0.0}),
    "bcl-weak-cls": ("bcl-r100.yaml", {**BCL_PAPER_VIEWS, "classifier_transform": "crop-flip"}),
    "bcl-no-con-weak-cls": (
        "bcl-r100.yaml",
        {**BCL_PAPER_VIEWS, "bcl_weight": 0.0, "classifier_transform": "crop-flip"},
    ),
    # At 10 epochs (about 1,200 steps) an EMA of 0.999 leaves the key encoder 31% at its
    # initialisation: 0.99 (a time constant of 100 steps). The queue is the recipe's 4,096
    # keys, 28% of the full training set. (The n_max 1500 tables of commit 64ccffd used
    # 1,024 keys, the same share of their 3,720 images.)
    "dscl": ("dscl-r100.yaml", {"momentum": 0.99}),
    "dscl-paper-views": (
        "dscl-r100.yaml",
        {"momentum": 0.99, "con_transforms": ["simclr", "simclr"]},
    ),
    "dscl-no-pbsd": ("dscl-r100.yaml", {"momentum": 0.99, "pbsd_weight": 0.0}),
    # PaCo's key encoder at 0.99 for the same reason as dscl's (about 1,200 steps).
    "paco": ("paco-r100.yaml", {"momentum": 0.99}),
    "gpaco": ("gpaco-r100.yaml", {}),
    "proco": ("proco-r100.yaml", {}),
    # Why the successors sit where they do at 10 epochs: GPaCo's head without BatchNorm (its
    # recipe's) against the BN head that keeps SC on small grey images from collapsing, and
    # PaCo / ProCo without the log-prior in their losses.
    "gpaco-bn-head": ("gpaco-r100.yaml", {}, {"model": {"projection_bn": True}}),
    "paco-no-la": ("paco-r100.yaml", {"momentum": 0.99, "logit_adjust_tau": 0.0}),
    "proco-no-la": ("proco-r100.yaml", {"logit_adjust_tau": 0.0}),
    # PaCo's recipe lr (0.02, for 400 epochs) against GPaCo's 0.1 at the 10-epoch budget.
    "paco-lr0.1": ("paco-r100.yaml", {"momentum": 0.99}, {"optim": {"lr": 0.1}}),
    # Why dscl trails two-stage-sc at 10 epochs: the hybrid entries' projection head (hidden
    # 512 with BatchNorm, which keeps SC on small grey images from collapsing), then also
    # two-stage-sc's optimisation (lr 0.5 at batch 512, multistep, weight decay 1e-4, tau 0.1).
    "dscl-bn-head": (
        "dscl-r100.yaml",
        {"momentum": 0.99},
        {"model": {"projection_bn": True, "projection_hidden": 512}},
    ),
    "dscl-bn-head-sc-optim": (
        "dscl-r100.yaml",
        {"momentum": 0.99, "temperature": 0.1},
        {
            "model": {"projection_bn": True, "projection_hidden": 512},
            "optim": {"lr": 0.125, "schedule": "multistep", "weight_decay": 1.0e-4},
        },
    ),
    **{
        name: (f"{name}-r100.yaml", {})
        for name in (
            "focal",
            "cb-focal",
            "ce-drw",
            "ce-drs",
            "ldam-drw",
            "bbn",
            "crt",
            "lws",
            "tau-norm",
            "logit-adjust",
            "logit-adjust-posthoc",
            "balanced-softmax",
        )
    },
}


def budget_config(
    recipe: Path, method: dict, epochs: int, batch_size: int | None, extra: dict
) -> dict:
    """The recipe with another method's options, shortened to ``epochs`` with its schedule
    scaled proportionally (the library's ``scale_epochs``, what ``--epochs`` does), lr scaled
    linearly to ``batch_size``."""
    cfg = load_config(recipe).model_dump(mode="json")
    if batch_size is not None:
        cfg["optim"]["lr"] = cfg["optim"]["lr"] * batch_size / cfg["train"]["batch_size"]
        cfg["train"]["batch_size"] = batch_size
    # Another method on the same recipe keeps only the recipe's options it has.
    name = method.get("name", cfg["method"]["name"])
    cfg["method"] = {**carried_options(cfg["method"], name), **method, "name": name}
    scaled, _ = scale_epochs(config_from_dict(cfg), epochs)
    return deep_merge(scaled.model_dump(mode="json"), extra)


def study_entry(name: str, dataset: str, batch_size: int | None) -> Entry:
    """Entry ``name`` of ENTRIES as a study entry: its recipe with its method options and its
    other sections as overrides. An lr an entry sets is meant at the benchmark's batch: the
    entry then sets that batch too, so that the study's linear scaling leaves it as given."""
    recipe, method, *sections = ENTRIES[name]
    given = {f"method.{k}": v for k, v in method.items()}
    if sections:
        given.update(flat(sections[0]))
        if "optim.lr" in given and batch_size is not None:
            given["train.batch_size"] = batch_size
    return Entry(name=name, recipe=str(Path("configs") / dataset / recipe), set=given)


def accuracy_study(args: argparse.Namespace) -> StudySpec:
    """The benchmark as a study: the chosen entries x seeds at the budget, no search, each
    trial evaluated on the test set at its last epoch (the validation split it holds out is
    what a study requires; nothing here is selected on it)."""
    given = flat(parse_overrides(args.overrides))
    given.setdefault("data.val_per_class", args.val_per_class)
    return StudySpec(
        name="accuracy",
        entries=[study_entry(e, args.dataset, args.batch_size) for e in args.entries],
        seeds=args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        set=given,
        pruner="none",
    )


# Settings of how a trial runs, not what it trains: a later run of the benchmark into the
# same folder may change them (another machine).
HOW = ("train.threads", "train.report", "data.num_workers")


def joined(spec: StudySpec, study_file: Path) -> StudySpec:
    """``spec`` with the study already in ``study_file`` (if any): the entries of both, each
    at the seeds of both (the entry's own seeds where they are not the study's).

    Raises:
        SystemExit: When the folder's study has another budget, or an entry another recipe.
    """
    if not study_file.exists():
        return spec
    old = StudySpec.model_validate(yaml.safe_load(study_file.read_text()))

    def budget(s: StudySpec) -> dict:
        out = s.model_dump(mode="json", exclude={"entries", "seeds"})
        out["set"] = {k: v for k, v in out["set"].items() if k not in HOW}
        return out

    if budget(old) != budget(spec):
        raise SystemExit(
            f"{study_file} is a study at another budget ({budget(old)}); give another --out"
        )
    entries = {e.name: e for e in old.entries}
    seeds = {e.name: list(old.seeds_of(e)) for e in old.entries}
    for e in spec.entries:
        if e.name in entries and entries[e.name].model_dump(exclude={"seeds"}) != e.model_dump(
            exclude={"seeds"}
        ):
            raise SystemExit(f"{study_file} trains entry {e.name} otherwise; give another --out")
        entries.setdefault(e.name, e)
        seeds[e.name] = seeds.get(e.name, []) + [
            s for s in spec.seeds if s not in seeds.get(e.name, [])
        ]
    every = sorted({s for v in seeds.values() for s in v})
    return spec.model_copy(
        update={
            "seeds": every,
            "entries": [
                e.model_copy(update={"seeds": None if seeds[n] == every else seeds[n]})
                for n, e in entries.items()
            ],
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="folder under configs/")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128, help="both branches; lr scaled")
    p.add_argument("--entries", nargs="*", default=list(ENTRIES), choices=list(ENTRIES))
    p.add_argument(
        "--seeds", nargs="*", type=int, default=[0], help="training seeds; the data subset is fixed"
    )
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="key=value for all")
    p.add_argument("--val-per-class", type=int, default=100, help="held out for validation")
    p.add_argument("--workers", type=int, default=1, help="worker processes of the study")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"))
    p.add_argument(
        "--merge", nargs="+", type=Path, help="write one table of these result folders to --out"
    )
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    study_file = args.out / "study.yaml"
    spec = joined(accuracy_study(args), study_file)
    place = StudyPlace.of(spec, Path("."), args.out, None)
    try:
        # every (entry, seed) not yet finished in the folder is enqueued; a recipe changed
        # since its entry's trials ran is refused
        check_unchanged(place, open_studies(place))
        # The study file beside its storage: `longtail study status|report <out>/study.yaml
        # --dir <out>` read it, and worker processes run it.
        study_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        run_workers(place, study_file, args.workers)
    except LongtailError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:  # the workers put their trials back
        print("stopped: run the same command again to continue", file=sys.stderr)
        sys.exit(Stopped.exit_code if isinstance(e, Stopped) else 130)
    results_path = args.out / "accuracy.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.setdefault("runs", {})
    results["hardware"] = hardware()
    results["commit"] = commit()
    results["budget"] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "dataset": args.dataset,
        "overrides": args.overrides,
        "val_per_class": spec.set["data.val_per_class"],
    }
    for row in latest(trial_rows(place)):
        if row["state"] == "complete" and row["entry"] in args.entries:
            key = f"{row['entry']}@seed{row['seed']}"
            results["runs"][key] = run_result(row, place.run_dir(row), args.epochs)
            print(f"{key}: top-1 {row['top1']:.4f} in {row['wall_s']:.0f} s", flush=True)
    results_path.write_text(json.dumps(results, indent=1))
    write_table(results, args.out / "accuracy.md")


def run_result(row: dict, run_dir: Path, epochs: int) -> dict:
    """One row of accuracy.json from a finished study trial and its run directory, with the
    trial's own provenance (its machine and commit)."""
    test = json.loads((run_dir / "eval_test.json").read_text())
    cfg = read_run_config(run_dir)
    where = row.get("provenance", {})
    return {
        "entry": row["entry"],
        "seed": row["seed"],
        **{k: row[k] for k in ("top1", "many", "medium", "few", "ece", "val_top1")},
        "wall_s": row["wall_s"],
        "images_per_s": images_per_s(
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ),
        "per_class": test["per_class"],
        "confusion": test["confusion"],  # rows: true class, columns: predicted
        "classes": test["classes"],
        "train_counts": test["train_counts"],
        "epochs": epochs,
        "method": cfg.model_dump(mode="json")["method"],
        "lr": cfg.optim.lr,
        "milestones": cfg.optim.milestones,
        "commit": where.get("commit"),
        "cpu": where.get("cuda") or where.get("cpu"),
        "torch": where.get("torch"),
    }


def merge(folders: list[Path], out: Path) -> None:
    """One accuracy.md (and accuracy.json) of the runs in ``folders``; each row says its
    commit and settings where they differ."""
    merged: dict = {"runs": {}, "parts": []}
    for folder in folders:
        part = json.loads((folder / "accuracy.json").read_text())
        merged["parts"].append(
            {"folder": str(folder), "commit": part.get("commit"), "budget": part["budget"]}
        )
        for key, run in part["runs"].items():
            if key in merged["runs"]:
                raise SystemExit(f"{key} is in two of the folders; merge one of them")
            merged["runs"][key] = {"commit": part.get("commit"), **run}
        merged.setdefault("hardware", part["hardware"])
        merged.setdefault("budget", part["budget"])
    merged["commit"] = ", ".join(sorted({str(p["commit"]) for p in merged["parts"]}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(merged, indent=1))
    write_table(merged, out / "accuracy.md")
    settings = "; ".join(
        f"{p['folder']}: commit {p['commit']}, overrides {p['budget']['overrides']}"
        for p in merged["parts"]
    )
    with (out / "accuracy.md").open("a") as f:
        f.write(f"\nMerged from {settings}.\n")


def write_table(results: dict, path: Path) -> None:
    """One row per entry, best mean top-1 first: mean (and sample sd) over the seeds run,
    per-seed top-1 beside, and the arguments that ran it. Wall time and images/s are those of
    the entry's lowest seed, so that rows made under the same conditions compare (runs of one
    entry can come from different sessions and machines)."""
    b, hw = results["budget"], results["hardware"]
    ratio = imbalance_ratio(b)
    lines = [
        f"Budget run: dataset `{b['dataset']}` (ratio {ratio}, overrides {b['overrides']}), "
        f"{b['epochs']} epochs, batch {b['batch_size']} per branch; commit "
        f"{results.get('commit', '?')}; {hw['cpu']}, "
        f"{hw['cores']} cores, CUDA: {hw['cuda']}, torch {hw['torch']}. Accuracies: last epoch, "
        "full balanced test set; means over training seeds (same long-tailed subset). Wall "
        "time and images/s: the lowest seed's run.",
        "",
        "| method | paper | seeds | top-1 mean | top-1 sd | top-1 per seed | many | medium | few "
        "| ECE | wall time per run (s) | images/s | run with |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_entry: dict[str, list[dict]] = {}
    for r in results["runs"].values():
        by_entry.setdefault(r["entry"], []).append(r)

    def mean(rows: list[dict], k: str) -> str:
        vals = [r[k] for r in rows if r[k] is not None]
        return f"{statistics.fmean(vals):.4f}" if vals else "-"

    for name, rows in sorted(
        by_entry.items(), key=lambda item: -statistics.fmean(r["top1"] for r in item[1])
    ):
        rows = sorted(rows, key=lambda r: r["seed"])
        top1 = [r["top1"] for r in rows]
        sd = f"{statistics.stdev(top1):.4f}" if len(top1) > 1 else "-"
        per_seed = ", ".join(f"{v:.4f}" for v in top1)
        first = rows[0]
        ips = f"{first['images_per_s']:.0f}" if "images_per_s" in first else "-"  # older runs
        seeds = " ".join(str(r["seed"]) for r in rows)
        paper = paper_of(first["method"]["name"])
        lines.append(
            f"| {name} | {paper} | {len(rows)} | {mean(rows, 'top1')} | {sd} | "
            f"{per_seed} | {mean(rows, 'many')} | {mean(rows, 'medium')} | {mean(rows, 'few')} | "
            f"{mean(rows, 'ece')} | {first['wall_s']:.0f} | {ips} | "
            f"`--entries {name} --seeds {seeds}` |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
