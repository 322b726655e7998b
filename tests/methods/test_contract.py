"""Contract tests of the Method protocol, generated from the method registry.

Each test here was checked by re-introducing the bug it names and watching it fail.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import folder_config, poison_step, short_run_options, tiny_config
from longtail import api
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.data import build_sampler, loader_sampler
from longtail.engine.checkpoint import load_checkpoint
from longtail.errors import LongtailError
from longtail.methods import METHODS, Method
from references import mpsc_loop, psc_loop, sup_con_loop

TIMING_KEYS = {"epoch_time_s", "images_per_s"}


def method_section(name: str, val_split: bool = True, **extra) -> dict:
    """The method's config section for the pattern folder: a softer temperature (tau 0.1 PSC
    overwhelms the classifier branch on 56 images), mild augmentation (AutoAugment and Cutout
    wreck 12-pixel stripes) and a classifier stage that starts at the first crash point."""
    fields = METHODS.get(name).Options.model_fields
    section = short_run_options(name, 8, val_split=val_split)
    if "temperature" in fields:
        section["temperature"] = 0.5
    if "classifier_transform" in fields:
        section["classifier_transform"] = "hybrid"
    if "con_transforms" in fields:
        section["con_transforms"] = ["hybrid-jitter", "hybrid"]
    if "classifier_epochs" in fields:
        section["classifier_epochs"] = 5  # of 8: the classifier stage starts with epoch 4
    for switch in ("reweight_epoch", "resample_epoch"):  # DRW / DRS: switch within the run
        if METHODS.meta(name)["defaults"].get(switch):
            section[switch] = 4
    return {**section, **extra}


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _train_with_crash(cfg, out, monkeypatch, crash_epoch: int) -> None:
    """Train, interrupted as epoch ``crash_epoch`` (0-based) starts, then resume."""
    cls = METHODS.get(cfg.method_name)
    original = cls.on_epoch_start

    def crash(self, epoch):
        if epoch == crash_epoch:
            raise KeyboardInterrupt
        return original(self, epoch)

    with monkeypatch.context() as m:
        m.setattr(cls, "on_epoch_start", crash)
        with pytest.raises(KeyboardInterrupt):
            api.train(cfg, out, progress=False)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == crash_epoch - 1
    api.train(cfg, out, resume=True, progress=False)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_learns_resumes_exactly_and_evaluates(
    name, pattern_folder, tmp_path, monkeypatch
):
    cfg = config_from_dict(folder_config(pattern_folder, method=method_section(name)))
    full = tmp_path / "full"
    res = api.train(cfg, full, progress=False)
    rows = _rows(full)
    # It learns: 4 classes (chance 0.25), 24 test images.
    assert res["top1"] >= 0.75, (name, res["top1"], [r["val/top1"] for r in rows])
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("train/"))
    # `evaluate` rebuilds the method from the run directory and reproduces eval_test.json.
    saved = json.loads((full / "eval_test.json").read_text())
    assert api.evaluate_run(full, save=False) == saved

    best = load_checkpoint(full / "checkpoints" / "best.pt")
    assert best["best"]["epoch"] == best["epoch"] + 1
    # Crash as epoch 4 starts (the first classifier epoch of two-stage methods: a stage
    # boundary), and right after the best validation epoch (the last epochs at the latest):
    # a resumed run that forgot its best would overwrite best.pt with a later, no better one.
    late = min(max(best["best"]["epoch"], 4), 7)
    for crash_epoch in (3, late):
        cut = tmp_path / f"cut{crash_epoch}"
        _train_with_crash(cfg, cut, monkeypatch, crash_epoch)
        a = load_checkpoint(full / "checkpoints" / "last.pt")
        b = load_checkpoint(cut / "checkpoints" / "last.pt")
        _assert_same_state(a["model"], b["model"])
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for k, state in a["optimizer"]["state"].items():
            _assert_same_state(state, b["optimizer"]["state"][k])
        assert a["best"] == b["best"] == best["best"]
        _assert_same_state(best["model"], load_checkpoint(cut / "checkpoints" / "best.pt")["model"])
        assert _untimed(_rows(cut)) == _untimed(rows)
        assert json.loads((cut / "eval_test.json").read_text()) == saved


# --- the loss of one step is the paper's formula ---------------------------------------------


def _built(cfg_dict: dict):
    cfg = validate(config_from_dict(cfg_dict))
    torch.manual_seed(0)
    return cfg, build_method(cfg, build_data(cfg))


def _fixed_batches(num_classes: int = 10):
    gen = torch.Generator().manual_seed(3)
    x1, x2, xc = (torch.randn(6, 1, 28, 28, generator=gen) for _ in range(3))
    y_con = torch.tensor([0, 1, 1, 2, 3, 3])  # distinct neighbours: misaligned labels show
    y_cls = torch.tensor([4, 5, 6, 7, 8, 9]) % num_classes
    idx = torch.arange(6)
    return {"con": ([x1, x2], y_con, idx), "cls": (xc, y_cls, idx)}


@pytest.mark.parametrize("name", ["hybrid-sc", "hybrid-psc", "hybrid-mpsc", "ce-ce"])
@pytest.mark.parametrize("epoch", [0, 2])
def test_hybrid_step_is_the_formula(name, epoch, tiny_fmnist):
    tau, epochs = 0.5, 4
    _, method = _built(
        tiny_config(
            tiny_fmnist, method={"name": name, "temperature": tau}, train={"epochs": epochs}
        )
    )
    batches = _fixed_batches()
    method.eval()  # BatchNorm on running statistics: each view can be forwarded alone below
    method.on_epoch_start(epoch)
    terms = method.training_step(batches, epoch)

    alpha = 1 - ((epoch + 1) / epochs) ** 2  # parabolic, T counted from 1
    (x1, x2), y_con, _ = batches["con"]
    xc, y_cls, _ = batches["cls"]
    labels = torch.cat([y_con, y_con]).tolist()  # view 1 of every image, then view 2
    h = torch.cat([method.backbone(x1), method.backbone(x2)])
    branch = method.features
    with torch.no_grad():
        if name == "ce-ce":
            con = F.cross_entropy(branch.aux_classifier(h), torch.tensor(labels))
        else:
            z = F.normalize(branch.projector.net(h), dim=1).double()
            if name == "hybrid-sc":
                con = sup_con_loop(z, labels, tau)
            else:
                protos = F.normalize(branch.prototypes.prototypes.double(), dim=-1)
                con = (
                    psc_loop(z, labels, protos[:, 0], tau)
                    if name == "hybrid-psc"
                    else mpsc_loop(z, labels, protos, tau)
                )
        ce = F.cross_entropy(method.classifier.fc(method.backbone(xc)), y_cls)
    torch.testing.assert_close(terms["con"].double(), con.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["ce"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        terms["loss"], alpha * terms["con"] + (1 - alpha) * terms["ce"], rtol=1e-6, atol=1e-7
    )
    assert method.scalars() == {"alpha": pytest.approx(alpha)}


def test_ce_step_is_cross_entropy(tiny_fmnist):
    _, method = _built(tiny_config(tiny_fmnist))
    xc, y, idx = _fixed_batches()["cls"]
    method.eval()
    terms = method.training_step({"cls": (xc, y, idx)}, 0)
    with torch.no_grad():
        ce = F.cross_entropy(method.classifier.fc(method.backbone(xc)), y)
    torch.testing.assert_close(terms["loss"], ce)
    torch.testing.assert_close(terms["ce"], ce)


def test_two_stage_steps_are_sc_then_frozen_cross_entropy(tiny_fmnist):
    tau = 0.5
    cfg, method = _built(
        tiny_config(
            tiny_fmnist,
            method={"name": "two-stage-sc", "temperature": tau, "classifier_epochs": 1},
            train={"epochs": 3},
        )
    )
    features, classifier = method.stages()
    batches = _fixed_batches()
    method.on_stage_start(features)
    assert not any(p.requires_grad for p in method.classifier.parameters())
    method.eval()
    terms = method.training_step(batches, 0)
    (x1, x2), y, _ = batches["con"]
    with torch.no_grad():
        h = torch.cat([method.backbone(x1), method.backbone(x2)])
        z = F.normalize(method.features.projector.net(h), dim=1).double()
        sc = sup_con_loop(z, torch.cat([y, y]).tolist(), tau)
    torch.testing.assert_close(terms["loss"].double(), sc, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"loss", "con"}

    method.on_stage_start(classifier)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in method.named_parameters() if n.startswith("classifier.")}
    method.train()
    assert not method.backbone.training and method.classifier.training  # BN statistics frozen
    xc, yc, idx = batches["cls"]
    norm, linear = method.classifier  # classifier_bn: affine-free BatchNorm, then the head
    assert not norm.affine and torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    terms = method.training_step({"cls": (xc, yc, idx)}, 2)
    with torch.no_grad():
        h = method.backbone(xc)
        h_std = (h - h.mean(0)) / (h.var(0, unbiased=False) + norm.eps).sqrt()  # batch stats
        ce = F.cross_entropy(linear.fc(h_std), yc)
    torch.testing.assert_close(terms["loss"], ce)
    torch.testing.assert_close(norm.running_mean, norm.momentum * h.mean(0))  # learnt too


@pytest.mark.parametrize("name", METHODS.names())
def test_prediction_is_the_classifier_branch(name, tiny_fmnist):
    if METHODS.get(name).predict is not Method.predict:
        pytest.skip("predicts its own way; tested with the method")
    section = method_section(name, val_split=False)
    _, method = _built(tiny_config(tiny_fmnist, method=section, train={"epochs": 8}))
    x = _fixed_batches()["cls"][0]
    method.eval()
    with torch.no_grad():
        expected = method.classify(method.backbone(x))
        torch.testing.assert_close(method.predict(x), expected, rtol=0, atol=0)
        aux = getattr(getattr(method, "features", None), "aux_classifier", None)
        if aux is not None:  # ce-ce's feature-branch head must not be the one that predicts
            assert not torch.allclose(aux(method.backbone(x)), expected)


@pytest.mark.parametrize("name", METHODS.names())
def test_representation_is_one_vector_per_image(name, tiny_fmnist):
    section = method_section(name, val_split=False)
    _, method = _built(tiny_config(tiny_fmnist, method=section, train={"epochs": 8}))
    x = _fixed_batches()["cls"][0]
    method.eval()
    with torch.no_grad():
        h = method.representation(x)
        assert h.shape[0] == x.shape[0] and h.dim() == 2 and torch.isfinite(h).all()
        if METHODS.get(name).predict is Method.predict:
            torch.testing.assert_close(method.classify(h), method.predict(x), rtol=0, atol=0)


# --- samplers, schedules, seeds --------------------------------------------------------------


def _loader_samplers(method, data) -> list[dict[str, str]]:
    out = []
    for stage in method.stages():
        method.on_stage_start(stage)
        loaders = method.loaders(data, stage)
        out.append({k: loader_sampler(v).name for k, v in loaders.items()})
    return out


def test_branches_use_their_configured_samplers(tiny_fmnist):
    def samplers(method: dict, **train) -> list[dict[str, str]]:
        cfg = validate(config_from_dict(tiny_config(tiny_fmnist, method=method, train=train)))
        data = build_data(cfg)
        return _loader_samplers(build_method(cfg, data), data)

    # The hybrid paper: instance sampling for the feature branch, class-balanced for the
    # classifier branch.
    for name in ("hybrid-sc", "hybrid-psc", "hybrid-mpsc", "ce-ce"):
        assert samplers({"name": name}) == [{"con": "instance", "cls": "class-balanced"}]
    assert samplers({"name": "ce"}) == [{"cls": "instance"}]
    assert samplers({"name": "two-stage-sc", "classifier_epochs": 1}, epochs=2) == [
        {"con": "instance"},
        {"cls": "class-balanced"},
    ]
    # ... and whatever the config says instead.
    hybrid = {"name": "hybrid-sc", "con_sampler": "sqrt", "classifier_sampler": "reversed"}
    assert samplers(hybrid) == [{"con": "sqrt", "cls": "reversed"}]
    assert samplers({"name": "ce"}, sampler="progressive") == [{"cls": "progressive"}]
    two = {
        "name": "two-stage-sc",
        "classifier_epochs": 1,
        "con_sampler": "class-balanced",
        "classifier_sampler": "sqrt",
    }
    assert samplers(two, epochs=2) == [{"con": "class-balanced"}, {"cls": "sqrt"}]
    k = {"name": "hybrid-sc", "con_k_per_class": 2}
    assert samplers(k) == [{"con": "k-per-class", "cls": "class-balanced"}]


def _record_lr(monkeypatch) -> list[float]:
    seen: list[float] = []
    step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    return seen


def test_optimizer_lr_is_the_schedule_at_every_step(tiny_fmnist, tmp_path, monkeypatch):
    seen = _record_lr(monkeypatch)
    lr, warmup = 0.2, 1.5
    optim = {"lr": lr, "warmup_epochs": warmup, "milestones": [2], "gamma": 0.1}
    cfg = config_from_dict(tiny_config(tiny_fmnist, train={"epochs": 3}, optim=optim))
    api.train(cfg, tmp_path / "run", progress=False)
    steps = _rows(tmp_path / "run")[0]["steps"]
    expected = []
    for e in range(3):
        for i in range(steps):
            t = e + i / steps
            if t < warmup:  # linear from 0.1 x lr (warmup_start_factor) to lr
                expected.append(lr * (0.1 + 0.9 * t / warmup))
            else:
                expected.append(lr * (0.1 if e >= 2 else 1.0))
    assert seen == pytest.approx(expected, rel=1e-12)


def test_lr_restarts_with_the_classifier_stage(tiny_fmnist, tmp_path, monkeypatch):
    seen = _record_lr(monkeypatch)
    method = {"name": "two-stage-sc", "classifier_epochs": 1, "classifier_lr": 0.3}
    cfg = config_from_dict(
        tiny_config(tiny_fmnist, method=method, train={"epochs": 2}, optim={"lr": 0.05})
    )
    api.train(cfg, tmp_path / "run", progress=False)
    first, second = _rows(tmp_path / "run")
    feature_lrs, classifier_lrs = seen[: first["steps"]], seen[first["steps"] :]
    assert feature_lrs == [0.05] * first["steps"]
    n = second["steps"]
    cosine = [0.3 * 0.5 * (1 + math.cos(math.pi * i / n)) for i in range(n)]  # no warm-up
    assert classifier_lrs == pytest.approx(cosine, rel=1e-12)


def test_every_loader_is_reseeded_each_epoch(tiny_fmnist, tmp_path, monkeypatch):
    cls = METHODS.get("hybrid-sc")
    seen: dict[tuple[int, str], list[int]] = {}
    original = cls.training_step

    def recording_step(self, batches, epoch):
        for k in ("con", "cls"):
            seen.setdefault((epoch, k), []).extend(batches[k][2].tolist())
        return original(self, batches, epoch)

    monkeypatch.setattr(cls, "training_step", recording_step)
    raw = tiny_config(tiny_fmnist, method={"name": "hybrid-sc"}, train={"epochs": 3})
    cfg = validate(config_from_dict(raw))
    api.train(cfg, tmp_path / "run", progress=False)
    labels = build_data(cfg).train_labels
    for epoch in range(3):
        for key, name in (("con", "instance"), ("cls", "class-balanced")):
            sampler = build_sampler(name, labels, seed=cfg.seed, total_epochs=3)
            sampler.set_epoch(epoch)
            drawn = seen[(epoch, key)]
            assert drawn == sampler.full_indices()[: len(drawn)].tolist(), (epoch, key)
    assert seen[(0, "cls")] != seen[(1, "cls")]


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tiny_fmnist, tmp_path, monkeypatch):
    poison_step(monkeypatch, "hybrid-sc", 1, 4, float("nan"), "con")
    raw = tiny_config(tiny_fmnist, method={"name": "hybrid-sc"}, train={"epochs": 3})
    run = tmp_path / "run"
    with pytest.raises(LongtailError, match=r"loss term 'con' became nan at epoch 2 step 4"):
        api.train(config_from_dict(raw), run, progress=False)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 0  # epoch 1's checkpoint, written before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len(_rows(run)) == 1
