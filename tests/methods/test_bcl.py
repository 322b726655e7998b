"""BCL: the step is the paper's formula, centres come from the classifier's weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from longtail.build import build_data, build_method, validate
from longtail.config import config_from_dict
from longtail.errors import UsageError
from references import bcl_loop


def _bcl(tiny_fmnist, **method):
    cfg = validate(config_from_dict(tiny_config(tiny_fmnist, method={"name": "bcl", **method})))
    torch.manual_seed(0)
    data = build_data(cfg)
    return cfg, data, build_method(cfg, data)


def _views(b: int = 6):
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(b, 1, 28, 28, generator=gen) for _ in range(3)]
    y = torch.tensor([0, 3, 3, 9, 5, 0])[:b]
    return {"views": (views, y, torch.arange(b))}


def test_defaults_are_the_papers_cifar_recipe(tiny_fmnist):
    cfg, _, method = _bcl(tiny_fmnist)
    assert cfg.model.classifier == "cosine" and cfg.model.classifier_options == {"scale": 30.0}
    assert float(method.classifier.scale) == 30.0
    o = method.opts
    assert (o.ce_weight, o.bcl_weight, o.temperature, o.logit_adjust_tau) == (2.0, 0.6, 0.1, 1.0)
    assert [o.classifier_transform, *o.con_transforms] == ["strong", "simclr", "simclr"]
    with pytest.raises(UsageError, match="cosine classifier"):
        validate(config_from_dict(tiny_config(tiny_fmnist, method={"name": "bcl"},
                                              model={"classifier": "linear"})))  # fmt: skip


def test_step_is_the_formula(tiny_fmnist):
    tau, lam, mu = 0.3, 1.5, 0.7
    _, data, method = _bcl(tiny_fmnist, temperature=tau, ce_weight=lam, bcl_weight=mu)
    batches = _views()
    method.eval()  # BatchNorm on running statistics: each view may be forwarded alone below
    terms = method.training_step(batches, 0)
    (v1, v2, v3), y, _ = batches["views"]
    with torch.no_grad():
        counts = torch.as_tensor(data.counts, dtype=torch.float64)
        logits = method.classifier(method.backbone(v1)).double()
        ce = F.cross_entropy(logits + torch.log(counts / counts.sum()), y)  # tau_LA = 1
        z = F.normalize(
            method.projector.net(torch.cat([method.backbone(v2), method.backbone(v3)])), dim=1
        )
        centres = F.normalize(method.centre_head.net(method.classifier.weight), dim=1)
        bcl = bcl_loop(z.double(), torch.cat([y, y]).tolist(), centres.double(), tau)
    torch.testing.assert_close(terms["ce"].double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["bcl"].double(), bcl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], lam * terms["ce"] + mu * terms["bcl"])


def test_centre_gradient_reaches_the_classifier_weights(tiny_fmnist):
    _, _, method = _bcl(tiny_fmnist, ce_weight=0.0)  # the BCL term alone
    method.train()
    method.training_step(_views(), 0)["loss"].backward()
    assert method.classifier.weight.grad.abs().sum() > 0  # only through the centres
    for name, p in method.centre_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_three_view_forward_equals_three_forwards_in_eval_mode(tiny_fmnist):
    _, _, method = _bcl(tiny_fmnist)
    method.eval()
    views = _views()["views"][0]
    with torch.no_grad():
        joint = method.forward_views(views)
        for view, h in zip(views, joint, strict=True):
            torch.testing.assert_close(h, method.backbone(view))


def test_prediction_is_the_raw_classifier(tiny_fmnist):
    _, _, method = _bcl(tiny_fmnist)
    method.eval()
    x = _views()["views"][0][0]
    with torch.no_grad():
        raw = method.classifier(method.backbone(x))
        torch.testing.assert_close(method.predict(x), raw, rtol=0, atol=0)
    assert math.isfinite(float(method.log_prior.sum())) and method.log_prior.shape == (10,)
