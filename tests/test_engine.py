import json
import math

import pytest
import torch

from conftest import short_run_options, tiny_config
from longtail import api
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.engine import trainer
from longtail.engine.checkpoint import load_checkpoint
from longtail.errors import UsageError
from longtail.methods import METHODS
from longtail.models import layer_depths


def _read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ce_run_writes_everything(tiny_fmnist, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_fmnist, train={"epochs": 2, "eval_every": 1}))
    run = tmp_path / "run"
    res = api.train(cfg, run, progress=False)
    assert 0 <= res["top1"] <= 1 and len(res["per_class"]) == 10
    for name in (
        "config.yaml",
        "data.json",
        "metrics.jsonl",
        "eval_test.json",
        "checkpoints/last.pt",
    ):
        assert (run / name).is_file(), name
    rows = _read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "test/top1" in rows[0] and rows[0]["train/loss"] > 0
    data = json.loads((run / "data.json").read_text())
    assert (
        data["counts"][0] == 40
        and data["counts"][-1] == 10
        and data["total"] == sum(data["counts"])
    )
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert list((run / "tensorboard").iterdir())


def test_existing_run_dir_is_never_overwritten(tiny_fmnist, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_fmnist))
    run = tmp_path / "run"
    api.train(cfg, run, progress=False)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UsageError, match="already exists") as error:
        api.train(cfg, run, progress=False)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    # the library names its own arguments; the command line its flags
    assert "pass resume=True" in str(error.value) and "another out" in str(error.value)
    assert "pass --resume" in error.value.for_cli() and "another --out" in error.value.for_cli()
    with pytest.raises(UsageError, match="no checkpoint") as error:
        api.train(cfg, tmp_path / "fresh", resume=True, progress=False)
    assert "--" not in str(error.value) and "{" not in str(error.value)


@pytest.mark.parametrize("draws", [False, True], ids=["plain", "step-draws-random-numbers"])
def test_resume_continues_exactly(draws, tiny_fmnist, tmp_path, monkeypatch):
    if draws:  # a step that draws from torch's global generator (dropout, say): the draws
        step = METHODS.get("ce").training_step  # after a resume must be the ones it would

        # have drawn, so the checkpoint must carry the generator's state
        def noisy(self, batches, epoch):
            terms = step(self, batches, epoch)
            return {**terms, "loss": terms["loss"] * (1 + torch.rand(()))}

        monkeypatch.setattr(METHODS.get("ce"), "training_step", noisy)
    raw = tiny_config(tiny_fmnist, train={"epochs": 3})
    full = tmp_path / "full"
    api.train(config_from_dict(raw), full, progress=False)

    original = METHODS.get("ce").on_epoch_start

    def crash_at_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    cut = tmp_path / "cut"
    monkeypatch.setattr(METHODS.get("ce"), "on_epoch_start", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        api.train(config_from_dict(raw), cut, progress=False)
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["epoch"] == 1
    monkeypatch.setattr(METHODS.get("ce"), "on_epoch_start", original)
    api.train(config_from_dict(raw), cut, resume=True, progress=False)

    a = load_checkpoint(full / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(cut / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["epoch"] for r in _read_metrics(cut)] == [1, 2, 3]


def test_logged_epoch_terms_are_the_mean_over_its_steps(tiny_fmnist, tmp_path, monkeypatch):
    # Every step of an epoch has a full batch (the loaders drop the last, short one), so the
    # mean over steps is the mean over the epoch's images too.
    step, seen = METHODS.get("hybrid-sc").training_step, []

    def recording(self, batches, epoch):
        terms = step(self, batches, epoch)
        seen.append((epoch, {k: float(v) for k, v in terms.items()}))
        return terms

    monkeypatch.setattr(METHODS.get("hybrid-sc"), "training_step", recording)
    raw = tiny_config(tiny_fmnist, method={"name": "hybrid-sc"}, train={"epochs": 2})
    api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    for row in _read_metrics(tmp_path / "run"):
        steps = [t for e, t in seen if e == row["epoch"] - 1]
        assert len(steps) == row["steps"] > 1
        assert {f"train/{k}" for k in steps[0]} <= row.keys()
        for k in steps[0]:  # loss, con (not in the last epoch: alpha is 0) and ce
            mean = sum(t[k] for t in steps) / len(steps)
            assert row[f"train/{k}"] == pytest.approx(mean, rel=1e-6), k


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_logs_its_terms(method, tiny_fmnist, tmp_path):
    # That every method learns is tested in tests/methods/test_contract.py; here, what it logs.
    cfg = config_from_dict(
        tiny_config(
            tiny_fmnist,
            method=short_run_options(method, 2),
            train={"epochs": 2, "batch_size": 8},
        )
    )
    res = api.train(cfg, tmp_path / method, progress=False)
    assert len(res["per_class"]) == 10 and res["num_samples"] == 80
    rows = _read_metrics(tmp_path / method)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    if method.startswith(("hybrid", "ce-ce")):
        assert "alpha" in rows[0] and rows[0]["alpha"] > rows[1]["alpha"] == 0.0
        assert "train/con" in rows[0] and "train/ce" in rows[0]
    if method == "two-stage-sc":
        assert [r["stage"] for r in rows] == ["features", "classifier"]
        assert "train/con" in rows[0] and "train/ce" in rows[1]
    if method == "dscl":
        assert [r["stage"] for r in rows] == ["features", "classifier"]
        assert {"train/dscl", "train/pbsd"} <= set(rows[0]) and "train/ce" in rows[1]
        assert rows[0]["queue_filled"] == 216  # one epoch: a key for each of the 216 images
    if method == "bcl":
        assert {"train/ce", "train/bcl", "z_cos"} <= set(rows[0])


@pytest.mark.parametrize("name", ["two-stage-sc", "dscl"])
def test_the_classifier_stage_freezes_everything_else(name, tiny_fmnist, tmp_path, monkeypatch):
    raw = tiny_config(
        tiny_fmnist,
        method={"name": name, "classifier_epochs": 1},
        train={"epochs": 2, "batch_size": 8},
    )
    cfg = validate(config_from_dict(raw))
    method = build_method(cfg, build_data(cfg))
    assert [(s.name, s.epochs) for s in method.stages()] == [
        ("features", 1),
        ("classifier", 1),
    ]
    saved = []
    real_save = trainer.save_checkpoint

    def record(state, path):
        saved.append({k: v.clone() for k, v in state["model"].items()})
        real_save(state, path)

    monkeypatch.setattr(trainer, "save_checkpoint", record)
    api.train(cfg, tmp_path / "r", progress=False)
    after_features, after_classifier = saved
    for k, v in after_features.items():
        if k.startswith("classifier."):
            assert not torch.equal(v, after_classifier[k]), k  # the classifier learns
        else:
            # backbone weights, BN running statistics, heads (and DSCL's key encoder and
            # queue) stay as the first stage left them
            assert torch.equal(v, after_classifier[k]), k


def test_images_per_s_counts_only_forwarded_branches(tiny_fmnist, tmp_path):
    # Parabolic curriculum over 2 epochs: alpha 0.75 (both branches: 2 views + 1 view per
    # sample), then alpha 0 (the classifier branch alone), with equal steps and batch sizes.
    cfg = config_from_dict(
        tiny_config(tiny_fmnist, method={"name": "hybrid-sc"}, train={"epochs": 2, "batch_size": 8})
    )
    api.train(cfg, tmp_path / "run", progress=False)
    first, last = _read_metrics(tmp_path / "run")
    images = [r["images_per_s"] * r["epoch_time_s"] for r in (first, last)]
    assert images[0] == pytest.approx(3 * images[1], rel=1e-6)


# --- optimizer and parameter groups ---------------------------------------------------------------


def _optimizer(tiny_fmnist, method: str = "hybrid-psc", **optim):
    raw = tiny_config(tiny_fmnist, method={"name": method}, optim=optim)
    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    m = build_method(cfg, build_data(cfg))
    return m, trainer.build_optimizer(m, cfg.optim)


def test_the_default_optimizer_is_one_sgd_group_of_every_trainable_parameter(tiny_fmnist):
    method, opt = _optimizer(tiny_fmnist)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(opt.param_groups[0]["params"]) == len(trainable)
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], trainable, strict=True))
    assert opt.param_groups[0]["weight_decay"] == 0.0  # tiny_config's weight decay


def test_parameter_groups_lower_the_backbone_lr_and_exempt_norms_biases_and_prototypes(
    tiny_fmnist,
):
    method, opt = _optimizer(
        tiny_fmnist, weight_decay=5e-4, backbone_lr_scale=0.1, decay_exempt=True, lr=0.2
    )
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in method.named_parameters():
        g = by_param[id(p)]
        assert g["lr_scale"] == (0.1 if name.startswith("backbone.") else 1.0), name
        assert g["lr"] == pytest.approx(0.2 * g["lr_scale"])
        free = p.ndim <= 1 or name.startswith("features.prototypes.")
        assert g["weight_decay"] == (0.0 if free else 5e-4), name
    assert any(n.startswith("features.prototypes.") for n, _ in method.named_parameters())


def test_layer_decay_scales_each_backbone_depth_below_the_last(tiny_fmnist):
    """With layer_decay d, backbone depth i of L trains at backbone_lr_scale * d^(L-1-i) of
    the lr; the heads at the lr."""
    method, opt = _optimizer(tiny_fmnist, backbone_lr_scale=0.5, layer_decay=0.25, lr=0.2)
    depths, count = layer_depths(method.backbone)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in method.named_parameters():
        want = 1.0
        if name.startswith("backbone."):
            want = 0.5 * 0.25 ** (count - 1 - depths[name.removeprefix("backbone.")])
        seen.add(want)
        assert by_param[id(p)]["lr_scale"] == pytest.approx(want), name
        assert by_param[id(p)]["lr"] == pytest.approx(0.2 * want), name
    assert len(seen) == count + 1  # every depth its own lr, and the heads


def test_each_group_follows_the_schedule_times_its_scale(tiny_fmnist, tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append(sorted({(g["lr_scale"], g["lr"]) for g in self.param_groups}))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    optim = {"name": "adamw", "lr": 1e-3, "backbone_lr_scale": 0.1, "schedule": "cosine"}
    raw = tiny_config(tiny_fmnist, train={"epochs": 2}, optim=optim)
    res = api.train(config_from_dict(raw), tmp_path / "run", progress=False)
    assert 0 <= res["top1"] <= 1 and seen  # AdamW trained the run to its end
    steps = len(seen) // 2
    for i, groups in enumerate(seen):
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * (i / steps) / 2))  # cosine over 2 epochs
        assert groups == [(0.1, pytest.approx(0.1 * lr)), (1.0, pytest.approx(lr))], i
