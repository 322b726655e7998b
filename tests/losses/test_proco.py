"""ProCo's loss: the log Bessel function against mpmath over the orders and arguments ProCo
meets (p = 128 and 1024, kappa up to 1e5), its derivative, the closed form against an exact
case (p = 3), the loss against its loop reference, float32, and the vMF estimator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longtail.losses import proco_loss
from longtail.losses.proco import ClassVMF, concentration, log_bessel_iv, proco_logits
from references import log_iv_mp, proco_loop

XS = [1e-3, 0.1, 1.0, 10.0, 63.0, 100.0, 511.0, 1e3, 3e3, 1e4, 3e4, 1e5]


@pytest.mark.parametrize("p", [3, 4, 32, 128, 129, 1024])
def test_log_bessel_matches_mpmath_to_1e_12(p):
    nu = p / 2 - 1
    got = log_bessel_iv(nu, torch.tensor(XS, dtype=torch.float64)).tolist()
    for x, g in zip(XS, got, strict=True):
        want = log_iv_mp(nu, x)
        assert abs(g - want) <= 1e-12 * max(1.0, abs(want)), (p, x, g, want)


@pytest.mark.parametrize("p", [4, 128, 1024])
def test_log_bessel_derivative_is_the_bessel_ratio(p):
    nu = p / 2 - 1
    x = torch.tensor([0.5, 20.0, 800.0, 5e4], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(nu, x).sum(), x)
    for xi, g in zip(x.tolist(), grad.tolist(), strict=True):
        # d/dx log I_nu = nu / x + I_{nu+1} / I_nu
        want = nu / xi + math.exp(log_iv_mp(nu + 1, xi) - log_iv_mp(nu, xi))
        assert g == pytest.approx(want, rel=1e-11)
    assert torch.autograd.gradcheck(lambda t: log_bessel_iv(nu, t), (x.detach().requires_grad_(),))


def test_the_closed_form_is_exact_on_the_sphere_in_three_dimensions():
    """p = 3: I_{1/2}(x) = sqrt(2 / (pi x)) sinh(x), so E exp(z.x / tau) under vMF(mu, k)
    is (k / sinh k) sinh(k~) / k~ with k~ = |k mu + z / tau|."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    mu = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    kappa = torch.tensor([0.3, 2.0, 15.0, 40.0], dtype=torch.float64)
    tilde = torch.linalg.vector_norm(kappa[None, :, None] * mu[None] + z[:, None] / 0.2, dim=2)
    exact = torch.log(kappa / torch.sinh(kappa))[None] + torch.log(torch.sinh(tilde) / tilde)
    assert torch.allclose(proco_logits(z, mu, kappa, 0.2), exact, atol=1e-12)


def _inputs(p=16, classes=4, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, p, generator=g, dtype=torch.float64), dim=1)
    mu = F.normalize(torch.randn(classes, p, generator=g, dtype=torch.float64), dim=1)
    kappa = torch.tensor([3.0, 40.0, 900.0, 2e4], dtype=torch.float64)[:classes]
    prior = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))[:classes]
    labels = torch.randint(classes, (n,), generator=g)
    return z.requires_grad_(), labels, mu, kappa, prior


@pytest.mark.parametrize("p", [16, 128])
@pytest.mark.parametrize("tau", [0.07, 0.1, 1.0])
def test_proco_matches_its_loop_reference(p, tau):
    z, y, mu, kappa, prior = _inputs(p)
    got = proco_loss(z, y, mu, kappa, prior, tau)
    assert got.item() == pytest.approx(proco_loop(z, y.tolist(), mu, kappa, prior, tau).item(),
                                       rel=1e-11)  # fmt: skip
    assert torch.autograd.gradcheck(lambda t: proco_loss(t, y, mu, kappa, prior, tau), (z,))


def test_float32_keeps_the_loss_to_about_1e_6():
    """The Bessel part is always float64; float32 features cost rounding of z alone."""
    z, y, mu, kappa, prior = _inputs(128)
    exact = proco_loss(z, y, mu, kappa, prior, 0.1)
    single = proco_loss(z.detach().float(), y, mu.float(), kappa.float(), prior.float(), 0.1)
    assert single.dtype == torch.float32
    assert abs(single.item() - exact.item()) <= 1e-6 * max(1.0, abs(exact.item()))


def test_class_vmf_keeps_running_means_of_the_last_and_the_current_epoch():
    g = torch.Generator().manual_seed(1)
    est = ClassVMF(3, 5).double()
    start = est.mean.clone()
    batches = [(F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1),
                torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])) for _ in range(3)]  # fmt: skip
    pending = est.absorbed(*batches[0])
    assert torch.equal(est.mean, start)  # absorbed writes nothing
    est.keep(pending)
    est.keep(est.absorbed(*batches[1]))
    first = torch.cat([b[0] for b in batches[:2]])
    labels = torch.cat([b[1] for b in batches[:2]])
    for c in (0, 1):
        assert torch.allclose(est.mean[c], first[labels == c].mean(0))
    assert torch.equal(est.mean[2], start[2])  # never seen: its start
    est.start_epoch(1)
    assert torch.allclose(est.mean[:2], torch.stack([first[labels == c].mean(0) for c in (0, 1)]))
    assert est.epoch_count.sum() == 0
    est.keep(est.absorbed(*batches[2]))
    kept = est.mean.clone()
    est.start_epoch(1)  # again (a resumed epoch): nothing changes
    assert torch.equal(est.mean, kept)
    both = torch.cat([first, batches[2][0]])
    all_labels = torch.cat([labels, batches[2][1]])
    assert torch.allclose(est.mean[0], both[all_labels == 0].mean(0))  # last epoch + this one
    assert torch.allclose(est.epoch_mean[0], batches[2][0][batches[2][1] == 0].mean(0))
    mu, kappa = est.estimate()
    r = torch.linalg.vector_norm(est.mean, dim=1)
    assert torch.allclose(mu * r[:, None], est.mean)
    assert torch.allclose(kappa, r * (5 - r**2) / (1 - r**2))


def test_concentration_is_banerjees_approximation_and_grows_with_the_mean_length():
    r = torch.tensor([0.0, 0.5, 0.9, 0.999], dtype=torch.float64)
    k = concentration(r, 128)
    assert k[0] == 0 and torch.all(k[1:] > k[:-1])
    assert k[2] == pytest.approx(0.9 * (128 - 0.81) / (1 - 0.81))
