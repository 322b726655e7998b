import sys
from pathlib import Path

import pytest
import yaml

from longtail.build import validate
from longtail.config import Config, load_config, parse_overrides
from longtail.errors import UsageError
from longtail.methods import METHODS

CONFIGS = sorted(
    p
    for p in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml")
    if not p.name.startswith("_")
)


def test_there_are_recipes():
    assert len(CONFIGS) >= 40


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_validates(path):
    cfg = validate(load_config(path))
    assert cfg.name and cfg.method_name
    assert cfg.train.epochs >= 1


def test_paper_hybrid_recipe_values():
    cfg = load_config(Path("configs/cifar100/hybrid-psc-r100.yaml"))
    assert cfg.method == {"name": "hybrid-psc", "temperature": 0.1, "curriculum": "parabolic"}
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.train.batch_size) == (0.5, [120, 160], 512)
    assert load_config(Path("configs/cifar10/hybrid-psc-r100.yaml")).method["temperature"] == 1.0


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["optim.lr=0.05", "optim.milestones=[3, 4]", "data.ratio=null"]) == {
        "optim": {"lr": 0.05, "milestones": [3, 4]},
        "data": {"ratio": None},
    }
    cfg = load_config(None, ["train.epochs=3", "method.name=hybrid-sc", "method.temperature=0.2"])
    assert cfg.train.epochs == 3 and cfg.method["temperature"] == 0.2
    # validation completes the method section with the method's defaults
    full = validate(cfg).method
    assert (
        full["temperature"] == 0.2
        and full["loss"] == "sc"
        and full["classifier_sampler"] == "class-balanced"
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.epochz=3"], "train.epochz"),
        (["train.epochs=abc"], "train.epochs"),
        (["data.ratio=0.5"], "data.ratio"),
        (["method.name=nope"], "hybrid-sc"),  # lists the valid names
        (["method.temprature=0.1"], "method.temprature"),
        (["method.name=hybrid-sc", "method.con_sampler=nope"], "class-balanced"),
        (["bogus=1"], "bogus"),
        (["optim.schedule=step"], "optim.schedule"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_field(overrides, needle):
    with pytest.raises(UsageError) as e:
        validate(load_config(None, overrides))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_override_needs_equals_sign():
    with pytest.raises(UsageError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_base_files_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 32\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 32)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_defaults_are_valid():
    assert Config().method_name == "ce"
    assert validate(Config()).method == {"name": "ce"}


# --- a recipe's schedule scaled to a shorter run (--epochs) ----------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_scale_epochs_moves_the_whole_schedule_with_the_run():
    from longtail.build import scale_epochs, schedule_warnings
    from longtail.config import load_config

    cfg = load_config(REPO / "configs/fashion-mnist/ce-drw-r100.yaml")
    assert (cfg.train.epochs, cfg.optim.milestones) == (200, [160, 180])
    short, changed = scale_epochs(cfg, 10)
    assert short.train.epochs == 10 and short.optim.milestones == [8, 9]
    assert short.optim.warmup_epochs == cfg.optim.warmup_epochs * 10 / 200
    assert short.method["reweight_epoch"] == 8  # DRW switches at 160 of 200: at 8 of 10
    assert "optim.milestones: [160, 180] -> [8, 9]" in changed
    assert "method.reweight_epoch: 160 -> 8" in changed
    assert schedule_warnings(short) == []
    # Shortened with train.epochs alone, the lr never decays and DRW never switches: said.
    cut = load_config(REPO / "configs/fashion-mnist/ce-drw-r100.yaml", ["train.epochs=10"])
    warnings = schedule_warnings(cut)
    assert "optim.milestones [160, 180] lie past the last epoch (10)" in warnings[0]
    assert "method.reweight_epoch=160 lies past the last epoch (10)" in warnings[1]
    assert warnings[1].endswith("give --epochs 10 instead of train.epochs to scale the "
                                "recipe's schedule")  # fmt: skip
    two = load_config(REPO / "configs/fashion-mnist/crt-r100.yaml")
    scaled, _ = scale_epochs(two, two.train.epochs // 10)
    assert scaled.method["classifier_epochs"] == max(1, round(two.method["classifier_epochs"] / 10))


def test_epochs_flag_trains_the_scaled_recipe(tiny_fmnist, tmp_path, monkeypatch, capsys):
    from longtail import cli

    args = ["longtail", "train", "--config", str(REPO / "configs/fashion-mnist/ce-drw-r100.yaml"),
            "--epochs", "2", "--set", f"data.root={tiny_fmnist}", "--set", "data.ratio=4",
            "--set", "model.backbone=convnet-tiny", "--set", "train.batch_size=16",
            "--set", "train.device=cpu", "--set", "train.report=false", "--no-progress",
            "--out", str(tmp_path / "run")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    cli.main()
    out, err = capsys.readouterr()
    assert out.startswith("schedule scaled from 200 to 2 epochs: ")
    # Inside the run, so that they happen: the lr decays, DRW switches, at the second epoch.
    assert "method.reweight_epoch: 160 -> 1" in out and "warning" not in err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["optim"]["milestones"] == [1]


def test_the_classifier_options_old_names_are_still_read(tiny_fmnist):
    """cls_sampler / cls_batch_size / cls_transform became classifier_* (one word for the
    classifier's data in every method); configs, runs and checkpoints with the old names load."""
    import torch

    from conftest import tiny_config
    from longtail.build import build_data, build_method
    from longtail.config import config_from_dict
    from longtail.runs.read import check_checkpoint

    old = {"name": "hybrid-sc", "cls_sampler": "sqrt", "cls_batch_size": 8,
           "cls_transform": "crop-flip"}  # fmt: skip
    cfg = validate(config_from_dict(tiny_config(tiny_fmnist, method=old)))
    assert {k: cfg.method[k] for k in ("classifier_sampler", "classifier_batch_size",
                                       "classifier_transform")} == {  # fmt: skip
        "classifier_sampler": "sqrt", "classifier_batch_size": 8,
        "classifier_transform": "crop-flip"}  # fmt: skip
    assert not any(k.startswith("cls_") for k in cfg.method)  # saved with the new names
    method = build_method(cfg, build_data(cfg))
    saved = cfg.model_dump(mode="json")
    saved["method"] = {**{k: v for k, v in saved["method"].items()
                          if not k.startswith("classifier_")}, **old}  # fmt: skip
    ckpt = {"model": method.state_dict(), "epoch": 0, "config": saved}
    check_checkpoint(ckpt, cfg, Path("last.pt"), method)  # an earlier version's checkpoint
    assert torch.equal(next(iter(method.state_dict().values())), next(iter(ckpt["model"].values())))


MOVED = [
    (name, option, key)
    for name in METHODS.names()
    for option, key in METHODS.get(name).Options.moved.items()
]


def test_some_method_option_has_moved():
    assert MOVED  # the parametrised test below is not empty


@pytest.mark.parametrize(("name", "option", "key"), MOVED)
def test_a_moved_method_option_is_read_into_its_config_key(tiny_fmnist, name, option, key):
    """A method option that became a config key (bcl's ``sampler`` is ``train.sampler``, one
    place for a single-branch method's sampler) still loads from earlier configs and runs."""
    from conftest import tiny_config
    from longtail.config import config_from_dict

    section, field = key.split(".")
    raw = tiny_config(tiny_fmnist, method={"name": name, option: "sqrt"})
    raw["train"]["epochs"] = 20  # room for a classifier stage
    cfg = validate(config_from_dict(raw))
    assert getattr(getattr(cfg, section), field) == "sqrt" and option not in cfg.method
    raw[section][field] = "class-balanced"  # both set, and they differ: say which to keep
    with pytest.raises(UsageError, match=f"method.{option}' is now '{key}'"):
        validate(config_from_dict(raw))
