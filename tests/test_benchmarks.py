"""The accuracy benchmark's budget scaling (generated from its entries) and the per-class plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402
import per_class_plot  # noqa: E402
import provenance  # noqa: E402

from longtail.build import validate  # noqa: E402
from longtail.config import config_from_dict, load_config  # noqa: E402


@pytest.mark.parametrize("entry", sorted(accuracy.ENTRIES))
def test_every_entry_scales_to_a_valid_budget(entry):
    recipe, method, *sections = accuracy.ENTRIES[entry]
    path = ROOT / "configs" / "fashion-mnist" / recipe
    full = load_config(path)
    raw = accuracy.budget_config(path, method, 10, 128, sections[0] if sections else {})
    cfg = validate(config_from_dict(raw))
    scale = 10 / full.train.epochs
    assert cfg.train.epochs == 10 and cfg.train.batch_size == 128
    assert cfg.method_name == method.get("name", full.method_name)
    optim = (sections[0] if sections else {}).get("optim", {})
    # the recipe's lr, linear in the batch size, unless the entry sets its own
    expect_lr = optim.get("lr", full.optim.lr * 128 / full.train.batch_size)
    assert cfg.optim.lr == pytest.approx(expect_lr)
    assert cfg.optim.warmup_epochs == pytest.approx(full.optim.warmup_epochs * scale)
    assert cfg.optim.milestones == sorted({max(1, round(m * scale)) for m in full.optim.milestones})
    options = cfg.method_options
    if "classifier_epochs" in options:
        assert 1 <= options["classifier_epochs"] < 10
    for key in ("reweight_epoch", "resample_epoch"):
        if options.get(key):
            assert 1 <= options[key] <= 10
    for section, values in (sections[0] if sections else {}).items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, (section, key)


def test_per_class_plot_orders_head_to_tail_and_averages_seeds(tmp_path):
    def run(entry, seed, top1, per_class):
        return {
            "entry": entry, "seed": seed, "top1": top1, "per_class": per_class,
            "classes": ["a", "b", "c"], "train_counts": [5, 50, 20],
        }  # fmt: skip

    runs = {
        "ce@seed0": run("ce", 0, 0.5, [0.2, 0.9, 0.4]),
        "x@seed0": run("x", 0, 0.9, [0.8, 1.0, 0.7]),
        "x@seed1": run("x", 1, 0.8, [0.6, 1.0, 0.9]),
        "y@seed0": run("y", 0, 0.6, [0.5, 0.5, 0.5]),
    }
    results = {"runs": runs, "budget": {"dataset": "toy", "epochs": 2}}
    shown = per_class_plot.plot(results, 1, "ce", tmp_path / "p.png")
    assert list(shown) == ["x", "ce"]  # the best entry by mean top-1, then the baseline
    assert shown["x"]["classes_head_to_tail"] == ["b", "c", "a"]
    assert shown["x"]["mean"] == pytest.approx([0.7, 1.0, 0.8])  # indexed by class
    assert shown["x"]["low"] == [0.6, 1.0, 0.7] and shown["x"]["high"] == [0.8, 1.0, 0.9]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="'bogus' is not in the table"):
        per_class_plot.plot(results, 1, "bogus", tmp_path / "q.png")
    json.dumps(shown)  # the script writes it beside the PNG
    # a study's runs carry validation top-1: the best are chosen on it, not on test
    for key, val in (("x@seed0", 0.6), ("x@seed1", 0.6), ("y@seed0", 0.7), ("ce@seed0", 0.1)):
        runs[key]["val_top1"] = val
    assert list(per_class_plot.plot(results, 1, "ce", tmp_path / "p.png")) == ["y", "ce"]


def test_imbalance_ratio_reads_the_data_ratio_override():
    assert provenance.imbalance_ratio({"overrides": ["train.threads=1", "data.ratio=200"]}) == "200"
    assert provenance.imbalance_ratio({"overrides": ["train.threads=1"]}) == "100"
    assert provenance.imbalance_ratio({}) == "100"


@pytest.mark.parametrize("entry", sorted(accuracy.ENTRIES))
def test_every_entry_as_a_study_trial_is_the_budget_config(entry, monkeypatch):
    """The benchmark trains each entry through the study: the trial's config is the one
    budget_config makes (the validation split aside)."""
    import argparse

    from longtail.studies.spec import trial_config

    monkeypatch.chdir(ROOT)
    recipe, method, *sections = accuracy.ENTRIES[entry]
    args = argparse.Namespace(
        dataset="fashion-mnist",
        entries=[entry],
        seeds=[3],
        epochs=10,
        batch_size=128,
        overrides=["train.threads=1"],
        val_per_class=50,
    )
    spec = accuracy.accuracy_study(args)
    got = trial_config(spec, spec.entries[0], 3, {}, ROOT).model_dump(mode="json")
    extra = {**(sections[0] if sections else {}), "train": {"threads": 1}}
    path = ROOT / "configs" / "fashion-mnist" / recipe
    want = validate(config_from_dict(accuracy.budget_config(path, method, 10, 128, extra)))
    want = want.model_dump(mode="json")
    assert got["data"].pop("val_per_class") == 50 and want["data"].pop("val_per_class") is None
    for key in ("seed", "name"):
        got.pop(key), want.pop(key)
    assert got == want


def test_a_second_run_of_the_benchmark_joins_the_folders_study(tmp_path, monkeypatch):
    """Every entry at seed 0, then two at seeds 1 and 2, into one folder: one study, each
    entry at its own seeds, enqueued seed by seed; another budget or recipe is refused."""
    import argparse

    import yaml

    from longtail.studies import StudyPlace, open_studies, trial_rows

    monkeypatch.chdir(ROOT)

    def args(seeds, entries, epochs=10, overrides=("train.threads=1",)):
        return argparse.Namespace(dataset="fashion-mnist", entries=entries, seeds=seeds,
                                  epochs=epochs, batch_size=128, overrides=list(overrides),
                                  val_per_class=50)  # fmt: skip

    study_file = tmp_path / "study.yaml"
    spec = accuracy.joined(accuracy.accuracy_study(args([0], ["ce", "focal", "bcl"])), study_file)
    study_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    later = args([1, 2], ["bcl", "ce"], overrides=["train.threads=2"])  # another machine: ok
    spec = accuracy.joined(accuracy.accuracy_study(later), study_file)
    assert spec.seeds == [0, 1, 2]
    assert {e.name: spec.seeds_of(e) for e in spec.entries} == {
        "ce": [0, 1, 2], "focal": [0], "bcl": [0, 1, 2]}  # fmt: skip
    assert [e.seeds for e in spec.entries] == [None, [0], None]
    place = StudyPlace.of(spec, ROOT, tmp_path, None)
    open_studies(place)
    order = [(r["entry"], r["seed"]) for r in sorted(trial_rows(place), key=lambda r: r["number"])]
    assert order == [("ce", 0), ("focal", 0), ("bcl", 0), ("ce", 1), ("bcl", 1), ("ce", 2),
                     ("bcl", 2)]  # fmt: skip
    study_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    with pytest.raises(SystemExit, match="another budget"):
        accuracy.joined(accuracy.accuracy_study(args([3], ["ce"], epochs=6)), study_file)
    with pytest.raises(SystemExit, match="another budget"):
        accuracy.joined(accuracy.accuracy_study(args([3], ["ce"], overrides=["optim.lr=1"])),
                        study_file)  # fmt: skip
    changed = accuracy.accuracy_study(args([3], ["ce"]))
    changed.entries[0].recipe = "configs/fashion-mnist/focal-r100.yaml"
    with pytest.raises(SystemExit, match="trains entry ce otherwise"):
        accuracy.joined(changed, study_file)
