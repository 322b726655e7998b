"""The baselines' classification losses against their formulas (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.losses.classification import (
    class_balanced_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
    weighted_cross_entropy,
)

F64 = torch.float64
COUNTS = [500, 120, 30, 8]


def _data(n=12, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=gen, dtype=F64) * 2, torch.randint(0, c, (n,), generator=gen)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, y = _data()
    torch.testing.assert_close(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_matches_the_formula(gamma):
    logits, y = _data(seed=1)
    w = class_balanced_weights(COUNTS, 0.99)
    ref = []
    for i in range(len(y)):
        p = torch.softmax(logits[i], 0)[y[i]]
        ref.append(-w[y[i]] * (1 - p) ** gamma * torch.log(p))
    torch.testing.assert_close(focal_loss(logits, y, gamma, w), torch.stack(ref).mean())


def test_class_balanced_weights():
    w = class_balanced_weights(COUNTS, 0.9999)
    assert math.isclose(float(w.sum()), len(COUNTS), rel_tol=1e-12)  # they sum to C
    raw = [(1 - 0.9999) / (1 - 0.9999**n) for n in COUNTS]
    np.testing.assert_allclose(w.numpy(), np.array(raw) * 4 / sum(raw), rtol=1e-12)
    assert (w[:-1] < w[1:]).all()  # rarer classes weigh more
    np.testing.assert_allclose(class_balanced_weights(COUNTS, 0.0).numpy(), 1.0)


def test_ldam_margins_and_loss():
    m = ldam_margins(COUNTS)
    assert float(m.max()) == pytest.approx(0.5) and int(m.argmax()) == 3  # the rarest: 0.5
    np.testing.assert_allclose((m / m[0]).numpy(), [(n / COUNTS[0]) ** -0.25 for n in COUNTS])
    cos = torch.tanh(_data(seed=2)[0])
    y = _data(seed=2)[1]
    w = class_balanced_weights(COUNTS)
    ref = []
    for i in range(len(y)):
        z = 30 * cos[i].clone()
        z[y[i]] -= 30 * m[y[i]]
        ref.append(-w[y[i]] * torch.log_softmax(z, 0)[y[i]])
    torch.testing.assert_close(ldam_loss(cos, y, m, 30.0, w), torch.stack(ref).mean())
    # without weights and margins it is the scaled cross-entropy
    plain = ldam_loss(cos, y, torch.zeros(4, dtype=F64), 30.0)
    torch.testing.assert_close(plain, F.cross_entropy(30 * cos, y))


def test_logit_adjustment_and_balanced_softmax():
    logits, y = _data(seed=3)
    counts = torch.tensor(COUNTS, dtype=F64)
    log_prior = torch.log(counts / counts.sum())
    for tau in (0.5, 1.0, 2.0):
        ref = torch.stack(
            [-torch.log_softmax(logits[i] + tau * log_prior, 0)[y[i]] for i in range(len(y))]
        ).mean()
        torch.testing.assert_close(logit_adjusted_loss(logits, y, log_prior, tau), ref)
        w = torch.arange(1.0, len(COUNTS) + 1, dtype=F64)  # weights of the re-weighted form
        weighted = torch.stack(
            [-w[y[i]] * torch.log_softmax(logits[i] + tau * log_prior, 0)[y[i]]
             for i in range(len(y))]
        ).mean()  # fmt: skip
        torch.testing.assert_close(logit_adjusted_loss(logits, y, log_prior, tau, w), weighted)
    torch.testing.assert_close(weighted_cross_entropy(logits, y), F.cross_entropy(logits, y))


def test_bad_inputs():
    logits, y = _data()
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, y, -1.0)
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights(COUNTS, 1.0)
    with pytest.raises(ValueError, match="at least one image"):
        ldam_margins([5, 0])
    with pytest.raises(ValueError, match="logits must be"):
        focal_loss(logits[0], y)
