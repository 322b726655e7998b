"""PaCo's loss against its float64 loop reference: values, gradients, empty queue slots, and
its limit at alpha = 0 (Balanced-Softmax cross-entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longtail.losses import paco_loss
from references import paco_loop


def _inputs(n=6, k=5, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    centres = torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.randint(classes, (n,), generator=g)
    bank_labels = torch.randint(classes, (k,), generator=g)
    bank_labels[-1] = -1  # an empty slot
    return z.requires_grad_(), centres.requires_grad_(), labels, bank, bank_labels


@pytest.mark.parametrize("alpha", [0.0, 0.02, 1.0])
@pytest.mark.parametrize("tau", [0.05, 0.2])
@pytest.mark.parametrize("seed", [0, 1])
def test_paco_matches_its_loop_reference_with_gradients(alpha, tau, seed):
    z, c, y, bank, bank_y = _inputs(seed=seed)
    got = paco_loss(z, c, y, bank, bank_y, alpha, tau)
    want = paco_loop(z, c, y.tolist(), bank, bank_y.tolist(), alpha, tau)
    assert torch.allclose(got, want, atol=1e-12)
    g_got = torch.autograd.grad(got, (z, c))
    g_want = torch.autograd.grad(want, (z, c))
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_empty_slots_change_nothing():
    z, c, y, bank, bank_y = _inputs()
    filled = bank_y != -1
    with_empty = paco_loss(z, c, y, bank, bank_y, 0.1, 0.1)
    garbage = bank.clone()
    garbage[~filled] = 5.0
    assert torch.allclose(paco_loss(z, c, y, garbage, bank_y, 0.1, 0.1), with_empty)
    assert torch.allclose(paco_loss(z, c, y, bank[filled], bank_y[filled], 0.1, 0.1), with_empty)


def test_at_alpha_zero_with_no_samples_it_is_cross_entropy_on_the_centres():
    z, c, y, bank, bank_y = _inputs()
    only_centres = paco_loss(z[:1], c[:1], y[:1], bank[:0], bank_y[:0], 0.0, 0.1)
    assert torch.allclose(only_centres, F.cross_entropy(c[:1], y[:1]))


def test_float32_under_autocast_and_bad_shapes():
    z, c, y, bank, bank_y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = paco_loss(z.detach().float(), c.detach().float(), y, bank.float(), bank_y, 0.1, 0.1)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="centre_logits must be"):
        paco_loss(z, c[:2], y, bank, bank_y, 0.1, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        paco_loss(z, c, y, bank, bank_y, 0.1, 0.0)
