"""The baselines of the hybrid paper's tables: each step is its formula on a fixed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.data import SwitchingSampler, build_sampler, loader_sampler
from longtail.errors import UsageError
from longtail.losses.classification import class_balanced_weights, ldam_margins


def _method(tiny_fmnist, name, epochs=4, **options):
    raw = tiny_config(tiny_fmnist, method={"name": name, **options}, train={"epochs": epochs})
    cfg = validate(config_from_dict(raw))
    torch.manual_seed(0)
    data = build_data(cfg)
    return data, build_method(cfg, data).eval()  # BatchNorm on running statistics


def _batch(b=6):
    gen = torch.Generator().manual_seed(4)
    return torch.randn(b, 1, 28, 28, generator=gen), torch.tensor([0, 9, 9, 5, 3, 0])[:b]


def _step(method, x, y, epoch):
    method.eval()
    method.on_epoch_start(epoch)
    return method.training_step({"cls": (x, y, torch.arange(len(y)))}, epoch)


def test_drw_weights_switch_on_at_their_epoch(tiny_fmnist):
    data, method = _method(tiny_fmnist, "ce-drw", reweight_epoch=2)
    x, y = _batch()
    with torch.no_grad():
        logits = method.classifier(method.backbone(x)).double()
    w = class_balanced_weights(data.counts, 0.9999)
    before, after = _step(method, x, y, 1), _step(method, x, y, 2)
    torch.testing.assert_close(
        before["loss"].double(), F.cross_entropy(logits, y), rtol=1e-5, atol=1e-6
    )
    weighted = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    torch.testing.assert_close(after["loss"].double(), weighted, rtol=1e-5, atol=1e-6)


def test_focal_and_cb_focal(tiny_fmnist):
    x, y = _batch()
    for name, weighted in (("focal", False), ("cb-focal", True)):
        data, method = _method(tiny_fmnist, name, gamma=2.0)
        with torch.no_grad():
            p = torch.softmax(method.classifier(method.backbone(x)).double(), 1)[range(6), y]
        w = class_balanced_weights(data.counts, 0.9999)[y] if weighted else 1.0
        ref = (-w * (1 - p) ** 2 * torch.log(p)).mean()
        torch.testing.assert_close(
            _step(method, x, y, 0)["loss"].double(), ref, rtol=1e-5, atol=1e-6
        )


def test_ldam_drw_uses_a_cosine_classifier_and_its_margins(tiny_fmnist):
    data, method = _method(tiny_fmnist, "ldam-drw", reweight_epoch=3)
    assert method.cfg.model.classifier == "cosine" and float(method.classifier.scale) == 1.0
    x, y = _batch()
    with torch.no_grad():
        cos = method.classifier(method.backbone(x)).double()
        assert cos.abs().max() <= 1 + 1e-6
    m = ldam_margins(data.counts, 0.5)
    shifted = 30 * (cos - F.one_hot(y, 10) * m[y, None])
    torch.testing.assert_close(
        _step(method, x, y, 0)["loss"].double(), F.cross_entropy(shifted, y), rtol=1e-5, atol=1e-6
    )
    with torch.no_grad():
        torch.testing.assert_close(method.predict(x).double(), 30 * cos, rtol=1e-5, atol=1e-5)


def test_logit_adjustment_balanced_softmax_and_posthoc(tiny_fmnist):
    x, y = _batch()
    for name, tau in (("logit-adjust", 0.7), ("balanced-softmax", 1.0)):
        data, method = _method(tiny_fmnist, name, tau=tau)
        counts = torch.as_tensor(data.counts, dtype=torch.float64)
        with torch.no_grad():
            logits = method.classifier(method.backbone(x)).double()
        ref = F.cross_entropy(logits + tau * torch.log(counts / counts.sum()), y)
        torch.testing.assert_close(
            _step(method, x, y, 0)["loss"].double(), ref, rtol=1e-5, atol=1e-6
        )
        with torch.no_grad():  # the training-time adjustment is not applied when predicting
            torch.testing.assert_close(method.predict(x).double(), logits, rtol=1e-5, atol=1e-5)
    data, method = _method(tiny_fmnist, "logit-adjust-posthoc", posthoc_tau=0.5)
    counts = torch.as_tensor(data.counts, dtype=torch.float64)
    with torch.no_grad():
        logits = method.classifier(method.backbone(x)).double()
        plain = F.cross_entropy(logits, y)
        torch.testing.assert_close(
            _step(method, x, y, 0)["loss"].double(), plain, rtol=1e-5, atol=1e-6
        )
        expected = logits - 0.5 * torch.log(counts / counts.sum())
        torch.testing.assert_close(method.predict(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_drs_switches_the_sampler_at_its_epoch(tiny_fmnist):
    data, method = _method(tiny_fmnist, "ce-drs", resample_epoch=2)
    sampler = loader_sampler(method.loaders(data, method.stages()[0])["cls"])
    assert isinstance(sampler, SwitchingSampler)
    labels = data.train_labels
    for epoch, name in ((1, "instance"), (2, "class-balanced"), (3, "class-balanced")):
        sampler.set_epoch(epoch)
        reference = build_sampler(name, labels, seed=0, total_epochs=4)
        reference.set_epoch(epoch)
        assert list(sampler) == reference.full_indices().tolist()


def test_max_norm_keeps_every_class_weight_in_the_ball(tiny_fmnist):
    _, method = _method(tiny_fmnist, "ce-drw", classifier_max_norm=0.1)
    with torch.no_grad():
        method.classifier.weight.mul_(100)
    method.after_optimizer_step()
    norms = method.classifier.weight.norm(dim=1)
    assert float(norms.detach().max()) <= 0.1 + 1e-6


def test_bbn_mixes_two_branches(tiny_fmnist):
    _, method = _method(tiny_fmnist, "bbn")
    pairs = zip(
        method.backbone.last_stage.parameters(), method.rebalancing.parameters(), strict=True
    )
    assert not any(torch.equal(a, b) for a, b in pairs if a.dim() > 1)  # convs initialised apart
    (x_c, y_c), (x_r, y_r) = (
        _batch(),
        (torch.flip(_batch()[0], [0]), torch.tensor([1, 1, 2, 3, 4, 7])),
    )
    method.eval()
    method.on_epoch_start(1)
    alpha = 1 - (2 / 4) ** 2
    assert method.scalars()["alpha"] == pytest.approx(alpha)
    method.requires_grad_(False)
    terms = method.training_step(
        {"conventional": (x_c, y_c, None), "rebalancing": (x_r, y_r, None)}, 1
    )
    b = method.backbone
    with torch.no_grad():
        f_c = b.forward_head(b.last_stage(b.forward_trunk(x_c)))
        f_r = b.forward_head(method.rebalancing(b.forward_trunk(x_r)))
        w, bias = method.classifier.fc.weight, method.classifier.fc.bias
        d = f_c.shape[1]
        z = alpha * f_c @ w[:, :d].T + (1 - alpha) * f_r @ w[:, d:].T + bias
        ref = alpha * F.cross_entropy(z, y_c) + (1 - alpha) * F.cross_entropy(z, y_r)
        torch.testing.assert_close(terms["loss"], ref, rtol=1e-5, atol=1e-6)
        g_c = b.forward_head(b.last_stage(b.forward_trunk(x_c)))
        g_r = b.forward_head(method.rebalancing(b.forward_trunk(x_c)))
        expected = 0.5 * g_c @ w[:, :d].T + 0.5 * g_r @ w[:, d:].T + bias
        torch.testing.assert_close(method.predict(x_c), expected, rtol=1e-5, atol=1e-6)


def test_bbn_samplers(tiny_fmnist):
    data, method = _method(tiny_fmnist, "bbn")
    loaders = method.loaders(data, method.stages()[0])
    assert {k: loader_sampler(v).name for k, v in loaders.items()} == {
        "conventional": "instance",
        "rebalancing": "reversed",
    }
    counts = np.bincount(data.train_labels)
    p = loader_sampler(loaders["rebalancing"]).class_probabilities()
    np.testing.assert_allclose(p, (counts.max() / counts) / (counts.max() / counts).sum())


def test_crt_reinitialises_and_lws_scales(tiny_fmnist):
    _, crt = _method(tiny_fmnist, "crt", classifier_epochs=2)
    joint, second = crt.stages()
    crt.on_stage_start(joint)
    before = crt.classifier.fc.weight.detach().clone()
    crt.on_stage_start(second)
    assert not torch.equal(before, crt.classifier.fc.weight)  # a fresh classifier
    assert {n for n, p in crt.named_parameters() if p.requires_grad} == {
        "classifier.fc.weight", "classifier.fc.bias"
    }  # fmt: skip
    assert not crt.backbone.training or not crt.training

    _, lws = _method(tiny_fmnist, "lws", classifier_epochs=2)
    joint, second = lws.stages()
    lws.on_stage_start(joint)
    assert not lws.scales.scales.requires_grad
    lws.on_stage_start(second)
    assert {n for n, p in lws.named_parameters() if p.requires_grad} == {"scales.scales"}
    x, _ = _batch()
    lws.eval()
    with torch.no_grad():
        lws.scales.scales.copy_(torch.arange(1.0, 11.0))
        h = lws.backbone(x)
        fc = lws.classifier.fc
        expected = torch.arange(1.0, 11.0) * (h @ fc.weight.T) + fc.bias
        torch.testing.assert_close(lws.predict(x), expected)


def test_tau_norm_chooses_tau_on_the_validation_split_only(tiny_fmnist):
    with pytest.raises(UsageError, match="validation split"):
        _method(tiny_fmnist, "tau-norm")
    _, method = _method(tiny_fmnist, "tau-norm", tau=0.0)
    method.opts = method.opts.model_copy(update={"tau": None})  # as if a val split were set
    asked = []
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, method.backbone.feature_dim, generator=gen)

    def collect(split, fn):
        asked.append(split)
        w = method.classifier.weight.detach()
        labels = (feats @ (w / w.norm(dim=1, keepdim=True)).T).argmax(1)  # tau = 1 is perfect
        return feats, labels

    out = method.calibrate(collect)
    assert asked == ["val"] and out["val_top1_at_tau"] == 1.0
    assert out["tau"] == pytest.approx(float(method.tau)) and 0 < out["tau"] <= 1.0
    x, _ = _batch()
    method.eval()
    with torch.no_grad():
        w = method.classifier.weight
        expected = method.backbone(x) @ (w / w.norm(dim=1, keepdim=True) ** float(method.tau)).T
        torch.testing.assert_close(method.predict(x), expected)
