"""The probabilistic contrastive loss of ProCo (Du et al., TPAMI 2024).

Each class's unit features are modelled as a von Mises-Fisher distribution vMF(mu_j, kappa_j)
on the sphere S^{p-1}, with density C_p(kappa) exp(kappa mu^T x) and normaliser
C_p(kappa) = kappa^nu / ((2 pi)^{p/2} I_nu(kappa)), nu = p/2 - 1. The contrastive loss over
infinitely many samples of every class has a closed form: the logit of class j for a feature
z is the log of the expected similarity under class j's distribution,

    l_j(z) = log E_{x ~ vMF(mu_j, kappa_j)} exp(z^T x / tau)
           = log C_p(kappa_j) - log C_p(|| kappa_j mu_j + z / tau ||),

and the loss is the cross-entropy of l(z) + log pi (pi the training class prior). mu and
kappa are estimated online from the features (:class:`ClassVMF`) and are constants of the
loss; the gradient reaches z through || kappa mu + z / tau ||.

The modified Bessel function's log, log I_nu(x), is the delicate part: for p = 128 and 1024
the order is 63 and 511 and x ranges over 1e-2 .. 1e5, where I_nu under- and overflows every
float. :func:`log_bessel_iv` computes it in float64 from Debye's uniform large-order expansion
(DLMF 10.41.10, five terms) at an order of at least 100, brought down to nu by the stable
backward recurrence of the ratio I_{n+1} / I_n. Against mpmath it keeps about 1e-13 relative
error over that whole range (tests/losses/test_proco.py); the loss computes it in float64
whatever the inputs' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtail.losses.common import check_features, full_precision, upcast

# Debye's polynomials u_1 .. u_4 in t = 1 / sqrt(1 + z^2) (DLMF 10.41.10), as (power, coeff)
# over their common denominators.
_DEBYE = (
    (24.0, ((1, 3.0), (3, -5.0))),
    (1152.0, ((2, 81.0), (4, -462.0), (6, 385.0))),
    (414720.0, ((3, 30375.0), (5, -369603.0), (7, 765765.0), (9, -425425.0))),
    (
        39813120.0,
        ((4, 4465125.0), (6, -94121676.0), (8, 349922430.0), (10, -446185740.0),
         (12, 185910725.0)),
    ),
)  # fmt: skip
_DEBYE_ORDER = 100.0  # the expansion's error is about u_5 / order^5 < 1e-10 from here


def _log_iv_debye(nu: float, x: Tensor) -> Tensor:
    """log I_nu(x) from the uniform expansion in 1 / nu (accurate for large nu, any x > 0)."""
    z = x / nu
    root = torch.sqrt(1 + z * z)
    eta = root + torch.log(z / (1 + root))
    t = 1 / root
    series = torch.ones_like(x)
    for k, (denominator, terms) in enumerate(_DEBYE, start=1):
        u = sum(c * t**power for power, c in terms) / denominator
        series = series + u / nu**k
    return nu * eta - 0.5 * math.log(2 * math.pi * nu) - 0.5 * torch.log(root) + torch.log(series)


def _log_iv_and_ratio(nu: float, x: Tensor) -> tuple[Tensor, Tensor]:
    """log I_nu(x) and I_{nu+1}(x) / I_nu(x), float64, for x > 0."""
    steps = max(0, math.ceil(_DEBYE_ORDER - nu))
    top = nu + steps
    log_top = _log_iv_debye(top, x)
    ratio = torch.exp(_log_iv_debye(top + 1, x) - log_top)  # I_{top+1} / I_top
    log_iv = log_top
    for n in range(steps):  # r_{m-1} = 1 / (2 m / x + r_m), m = top, top - 1, ..., nu + 1
        m = top - n
        ratio = 1 / (2 * m / x + ratio)
        log_iv = log_iv - torch.log(ratio)  # I_{m-1} = I_m / r_{m-1}
    return log_iv, ratio


class _LogBesselIv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, nu: float) -> Tensor:  # type: ignore[override]
        x64 = x.double()
        log_iv, ratio = _log_iv_and_ratio(nu, x64)
        ctx.save_for_backward(x64, ratio)
        ctx.nu = nu
        return log_iv.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x64, ratio = ctx.saved_tensors
        # d/dx log I_nu(x) = I'_nu / I_nu = nu / x + I_{nu+1} / I_nu
        return (grad.double() * (ctx.nu / x64 + ratio)).to(grad.dtype), None


def log_bessel_iv(nu: float, x: Tensor) -> Tensor:
    """log I_nu(x), the modified Bessel function of the first kind, for real nu >= 0 and
    x > 0, differentiable in x; computed in float64, returned in ``x``'s dtype."""
    if nu < 0:
        raise ValueError(f"nu must be >= 0, got {nu}")
    return _LogBesselIv.apply(x, float(nu))


def log_vmf_normaliser(kappa: Tensor, dim: int) -> Tensor:
    """log C_p(kappa) of the vMF density on S^{p-1}, p = ``dim``, without the constant
    -(p/2) log(2 pi) (it cancels in every ratio used here)."""
    nu = dim / 2 - 1
    return nu * torch.log(kappa) - log_bessel_iv(nu, kappa)


def proco_logits(z: Tensor, mu: Tensor, kappa: Tensor, temperature: float) -> Tensor:
    """(N, C) expected-similarity logits of unit features ``z`` (N, p) under each class's
    vMF (``mu`` (C, p) unit mean directions, ``kappa`` (C,) concentrations), in float64."""
    z64, mu64 = z.double(), mu.double()
    kappa64 = kappa.double().clamp_min(1e-8)
    centre = kappa64[None, :, None] * mu64[None]
    tilde = torch.linalg.vector_norm(centre + z64[:, None] / temperature, dim=2)
    p = z.shape[1]
    return log_vmf_normaliser(kappa64, p)[None, :] - log_vmf_normaliser(tilde.clamp_min(1e-8), p)


def proco_loss(
    z: Tensor,
    labels: Tensor,
    mu: Tensor,
    kappa: Tensor,
    log_prior: Tensor,
    temperature: float,
) -> Tensor:
    """Mean ProCo loss: cross-entropy of :func:`proco_logits` plus ``log_prior``.

    Args:
        z: (N, p) unit features.
        labels: (N,) integer classes.
        mu: (C, p) unit mean directions of the classes' vMFs (constants of the loss).
        kappa: (C,) their concentrations (constants).
        log_prior: (C,) log class prior, added to the logits (0 for none).
        temperature: tau.

    Returns:
        The scalar loss in ``z``'s dtype (float32 under autocast).
    """
    check_features(z, labels)
    c = mu.shape[0]
    if mu.dim() != 2 or mu.shape[1] != z.shape[1] or kappa.shape != (c,):
        raise ValueError(
            f"mu must be (C, {z.shape[1]}) and kappa (C,); got {tuple(mu.shape)} and "
            f"{tuple(kappa.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with full_precision(z.device):
        z = upcast(z)
        logits = proco_logits(z, mu.detach(), kappa.detach(), temperature)
        logits = logits + log_prior.double()[None, :]
        return F.cross_entropy(logits, labels.long()).to(z.dtype)


def concentration(mean_length: Tensor, dim: int) -> Tensor:
    """kappa of a vMF on S^{p-1} whose unit samples average to a vector of length R: the
    approximation R (p - R^2) / (1 - R^2) of Banerjee et al. (JMLR 2005)."""
    r = mean_length.clamp(0, 1 - 1e-6)
    return r * (dim - r * r) / (1 - r * r)


class ClassVMF(nn.Module):
    """Per-class vMF estimates from running means of unit features (ProCo's estimator).

    Two running means: the current epoch's, and one that starts each epoch from the last
    finished epoch's and goes on absorbing (its counts carrying on); the loss reads the
    second, so the estimate covers the previous epoch and the current one so far. A class
    never seen keeps a random direction of mean length 0.9 (an arbitrary, peaked start).
    :meth:`absorbed` computes the means with a batch in, without writing them (the step's
    loss reads them; :meth:`keep` writes them after the optimizer step).

    Args:
        num_classes: C.
        dim: p, the features' dimension.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        start = F.normalize(torch.randn(num_classes, dim), dim=1) * 0.9
        self.register_buffer("mean", start)
        self.register_buffer("count", torch.zeros(num_classes))
        self.register_buffer("epoch_mean", torch.zeros(num_classes, dim))
        self.register_buffer("epoch_count", torch.zeros(num_classes))
        self.register_buffer("epoch", torch.tensor(0))  # the epoch the means are of

    @torch.no_grad()
    def absorbed(self, z: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The four running statistics with unit features ``z`` (N, p) of classes
        ``labels`` absorbed (a running mean: each class's mean of every feature it saw)."""
        z = z.detach().to(self.mean.dtype)
        onehot = F.one_hot(labels.long(), self.mean.shape[0]).to(z.dtype)
        n = onehot.sum(0)
        batch_sum = onehot.T @ z
        out = {}
        for name in ("mean", "epoch_mean"):
            mean, count = getattr(self, name), getattr(self, name.replace("mean", "count"))
            total = count + n
            fresh = (mean * count[:, None] + batch_sum) / total.clamp_min(1)[:, None]
            out[name] = torch.where((n > 0)[:, None], fresh, mean)
            out[name.replace("mean", "count")] = total
        return out

    @torch.no_grad()
    def keep(self, values: dict[str, Tensor]) -> None:
        """Write statistics from :meth:`absorbed`."""
        for name, value in values.items():
            getattr(self, name).copy_(value)

    @torch.no_grad()
    def start_epoch(self, epoch: int) -> None:
        """At a new epoch: the estimate restarts from the finished epoch's means (classes it
        did not see keep theirs), the epoch's from zero. Idempotent within an epoch (a run
        resumed mid-epoch starts it again)."""
        if epoch <= int(self.epoch):
            return
        seen = self.epoch_count > 0
        self.mean[seen] = self.epoch_mean[seen]
        self.count[seen] = self.epoch_count[seen]
        self.epoch_mean.zero_()
        self.epoch_count.zero_()
        self.epoch.fill_(epoch)

    def estimate(self, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu (C, p), kappa (C,)) of running means ``mean`` (default: the kept ones)."""
        mean = self.mean if mean is None else mean
        length = torch.linalg.vector_norm(mean, dim=1)
        mu = mean / length.clamp_min(1e-12)[:, None]
        return mu, concentration(length, mean.shape[1])
