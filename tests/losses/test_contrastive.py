"""Tests of the SC, PSC and MPSC losses against direct per-anchor loops (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longtail.losses import mpsc_loss, psc_loss, sup_con_loss
from longtail.losses.contrastive import _BlockwiseLogDenominator
from references import mpsc_loop as _mpsc_loop
from references import psc_loop as _psc_loop
from references import sup_con_loop as _sup_con_loop

F64 = torch.float64


def _unit(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=dtype), dim=-1)


def _labels(n: int, n_classes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, n_classes, (n,), generator=gen)


def _value_and_grad(fn, z: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_()
    loss = fn(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


# --------------------------------------------------------------------------------------------
# SC loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "d", "n_classes", "tau", "block_size"),
    [
        (8, 4, 2, 0.1, None),
        (13, 5, 4, 0.5, None),
        (24, 3, 6, 0.07, 5),
        (17, 8, 3, 1.0, 1),
        (30, 6, 30, 0.2, 7),  # many anchors without positives
    ],
)
def test_sup_con_matches_loop(n, d, n_classes, tau, block_size):
    z = _unit(n, d, seed=n)
    labels = _labels(n, n_classes, seed=n)
    loss, grad = _value_and_grad(sup_con_loss, z, labels, tau, block_size)
    ref, ref_grad = _value_and_grad(_sup_con_loop, z, labels.tolist(), tau)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_sup_con_two_views_of_distinct_images():
    # Each image appears twice (two views), so every anchor's only positive is its other view.
    z = _unit(10, 4, seed=3)
    labels = torch.arange(5).repeat(2)
    torch.testing.assert_close(
        sup_con_loss(z, labels, 0.3), _sup_con_loop(z, labels.tolist(), 0.3), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(("n", "block_size"), [(50, 1), (50, 7), (64, 16), (65, 16), (101, 32)])
def test_blockwise_equals_direct(n, block_size):
    z = _unit(n, 16, seed=n)
    labels = _labels(n, 5, seed=n)
    direct, direct_grad = _value_and_grad(sup_con_loss, z, labels, 0.1, None)
    blocked, blocked_grad = _value_and_grad(sup_con_loss, z, labels, 0.1, block_size)
    torch.testing.assert_close(blocked, direct, rtol=0, atol=1e-6)
    torch.testing.assert_close(blocked_grad, direct_grad, rtol=0, atol=1e-6)
    assert (direct - blocked).abs() < 1e-12
    assert (direct_grad - blocked_grad).abs().max() < 1e-12


def test_blockwise_equals_direct_float32():
    z = _unit(300, 32, dtype=torch.float32, seed=7)
    labels = _labels(300, 10, seed=7)
    direct, direct_grad = _value_and_grad(sup_con_loss, z, labels, 0.1, None)
    blocked, blocked_grad = _value_and_grad(sup_con_loss, z, labels, 0.1, 64)
    assert direct.dtype == blocked.dtype == torch.float32
    torch.testing.assert_close(blocked, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked_grad, direct_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [1, 3, 4, 11])
def test_blockwise_function_gradcheck(block_size):
    # Unnormalised z and a subset of anchors: the Function must be right in general.
    z = torch.randn(11, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    anchors = torch.tensor([0, 2, 3, 7, 10])
    torch.autograd.gradcheck(
        lambda x: _BlockwiseLogDenominator.apply(x, anchors, 2.5, block_size),
        (z.requires_grad_(),),
    )


def test_blockwise_loss_gradcheck():
    z = _unit(9, 3, seed=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    torch.autograd.gradcheck(lambda x: sup_con_loss(x, labels, 0.5, block_size=2), (z,))


def test_sup_con_excludes_anchors_without_positives():
    z = _unit(3, 4, seed=5).requires_grad_()
    labels = torch.tensor([0, 0, 1])
    tau = 0.2
    s = z @ z.T / tau
    # Anchors 0 and 1 are each other's only positive; anchor 2 is left out, not counted as 0.
    l0 = -(s[0, 1] - torch.logsumexp(s[0, [1, 2]], 0))
    l1 = -(s[1, 0] - torch.logsumexp(s[1, [0, 2]], 0))
    expected = (l0 + l1) / 2
    for block_size in (None, 1, 2):
        torch.testing.assert_close(sup_con_loss(z, labels, tau, block_size), expected)


def test_sup_con_single_class_batch():
    z = _unit(12, 5, seed=2)
    labels = torch.full((12,), 4)
    for block_size in (None, 5):
        loss, grad = _value_and_grad(sup_con_loss, z, labels, 0.1, block_size)
        ref, ref_grad = _value_and_grad(_sup_con_loop, z, labels.tolist(), 0.1)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("block_size", [None, 2])
def test_sup_con_no_positives_is_connected_zero(block_size):
    z = _unit(6, 4, seed=4).requires_grad_()
    loss = sup_con_loss(z, torch.arange(6), 0.1, block_size)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_sup_con_arbitrary_label_values():
    z = _unit(10, 4, seed=8)
    labels = torch.tensor([7, -3, 7, 100, -3, 100, 7, 5, 5, 2])
    ref = _sup_con_loop(z, labels.tolist(), 0.1)
    for block_size in (None, 3):
        torch.testing.assert_close(sup_con_loss(z, labels, 0.1, block_size), ref)


def test_sup_con_small_temperature_is_stable():
    z = _unit(40, 8, dtype=torch.float32, seed=9)
    labels = _labels(40, 4, seed=9)
    for block_size in (None, 8):
        loss, grad = _value_and_grad(sup_con_loss, z, labels, 0.005, block_size)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref = _sup_con_loop(z.double(), labels.tolist(), 0.005)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 24),
    n_classes=st.integers(1, 6),
    block_size=st.sampled_from([None, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_sup_con_permutation_invariant(n, n_classes, block_size, seed):
    z = _unit(n, 4, seed=seed)
    labels = _labels(n, n_classes, seed=seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    loss, grad = _value_and_grad(sup_con_loss, z, labels, 0.2, block_size)
    loss_p, grad_p = _value_and_grad(sup_con_loss, z[perm], labels[perm], 0.2, block_size)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_p, grad[perm], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# PSC / MPSC losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "n_classes", "tau"), [(5, 3, 2, 0.1), (16, 8, 10, 1.0)])
def test_psc_matches_loop(n, d, n_classes, tau):
    z = _unit(n, d, seed=n)
    labels = _labels(n, n_classes, seed=n)
    protos = _unit(n_classes, d, seed=n + 100).requires_grad_()
    loss, grad = _value_and_grad(psc_loss, z, labels, protos, tau)
    ref, ref_grad = _value_and_grad(_psc_loop, z, labels.tolist(), protos, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    (proto_grad,) = torch.autograd.grad(psc_loss(z, labels, protos, tau), protos)
    (proto_ref,) = torch.autograd.grad(_psc_loop(z, labels.tolist(), protos, tau), protos)
    torch.testing.assert_close(proto_grad, proto_ref, rtol=1e-12, atol=1e-12)


def test_psc_positive_gradient_is_constant():
    # With every row in class 1, p_1 only enters through the positive logits z_i.p_1/tau, so
    # dL/dp_1 = sum_i dL/d(z_i.p_1) * z_i = -(1/tau) * mean_i z_i exactly, whatever the rest.
    tau = 0.3
    z = _unit(6, 5, seed=11)
    labels = torch.ones(6, dtype=torch.long)
    for seed in range(3):
        protos = _unit(4, 5, seed=seed).requires_grad_()
        (grad,) = torch.autograd.grad(psc_loss(z, labels, protos, tau), protos)
        torch.testing.assert_close(grad[1], -z.mean(0) / tau, rtol=1e-14, atol=1e-15)


def test_psc_is_linear_in_positive_affinity():
    # Moving only p_y changes l_i by exactly -(change of z_i.p_y)/tau: slope -1/tau everywhere.
    tau = 0.5
    z = _unit(1, 3, seed=12)
    labels = torch.tensor([2])
    protos = _unit(3, 3, seed=13)
    base = psc_loss(z, labels, protos, tau)
    for seed in range(5):
        moved = protos.clone()
        moved[2] = _unit(3, seed=20 + seed)
        delta = (z[0] @ moved[2] - z[0] @ protos[2]) / tau
        torch.testing.assert_close(psc_loss(z, labels, moved, tau) - base, -delta)


@pytest.mark.parametrize(("n", "n_classes", "per_class"), [(6, 3, 2), (11, 5, 4)])
def test_mpsc_matches_loop(n, n_classes, per_class):
    z = _unit(n, 6, seed=n)
    labels = _labels(n, n_classes, seed=n)
    protos = _unit(n_classes, per_class, 6, seed=n + 50).requires_grad_()
    loss, grad = _value_and_grad(mpsc_loss, z, labels, protos, 0.2)
    ref, ref_grad = _value_and_grad(_mpsc_loop, z, labels.tolist(), protos, 0.2)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    (proto_grad,) = torch.autograd.grad(mpsc_loss(z, labels, protos, 0.2), protos)
    (proto_ref,) = torch.autograd.grad(_mpsc_loop(z, labels.tolist(), protos, 0.2), protos)
    torch.testing.assert_close(proto_grad, proto_ref, rtol=1e-12, atol=1e-12)


def test_mpsc_weights_carry_no_gradient():
    # With detached weights, dl/dz = sum_m w_m d(pos_m)/dz - d(log_den)/dz; check against that.
    z = _unit(1, 4, seed=21).requires_grad_()
    protos = _unit(3, 2, 4, seed=22)
    labels = torch.tensor([0])
    tau = 0.4
    (grad,) = torch.autograd.grad(mpsc_loss(z, labels, protos, tau), z)
    pos = protos[0] @ z[0].detach() / tau
    weights = torch.softmax(pos, 0)
    neg_logits = protos[1:].reshape(-1, 4) @ z[0].detach() / tau
    expected = (
        -(weights @ protos[0]) / tau
        + torch.softmax(neg_logits, 0) @ protos[1:].reshape(-1, 4) / tau
    )
    torch.testing.assert_close(grad[0], expected)


def test_mpsc_single_prototype_equals_psc():
    z = _unit(20, 8, seed=30)
    labels = _labels(20, 7, seed=30)
    protos = _unit(7, 8, seed=31)
    for tau in (0.1, 1.0):
        psc = psc_loss(z, labels, protos, tau)
        assert torch.equal(mpsc_loss(z, labels, protos.unsqueeze(1), tau), psc)
        assert torch.equal(mpsc_loss(z, labels, protos, tau), psc)  # (C, d) means M = 1


def test_prototype_losses_reject_bad_shapes():
    z = _unit(4, 3)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError):
        psc_loss(z, labels, _unit(1, 3))  # a single class leaves an empty denominator
    with pytest.raises(ValueError):
        psc_loss(z, labels, _unit(3, 4))
    with pytest.raises(ValueError):
        mpsc_loss(z, labels, _unit(3, 2, 2, 3))
    with pytest.raises(ValueError):
        sup_con_loss(z, labels[:3])


# --------------------------------------------------------------------------------------------
# Dtypes, autocast and devices
# --------------------------------------------------------------------------------------------


def _all_losses(z: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor) -> dict:
    return {
        "sc_direct": sup_con_loss(z, labels, 0.1, None),
        "sc_blockwise": sup_con_loss(z, labels, 0.1, 8),
        "psc": psc_loss(z, labels, protos[:, 0], 0.1),
        "mpsc": mpsc_loss(z, labels, protos, 0.1),
    }


def test_float32_inputs_match_float64():
    z = _unit(32, 16, seed=40)
    labels = _labels(32, 4, seed=40)
    protos = _unit(4, 3, 16, seed=41)
    ref = _all_losses(z, labels, protos)
    got = _all_losses(z.float(), labels, protos.float())
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), ref[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32(dtype):
    z = _unit(32, 16, dtype=dtype, seed=42).requires_grad_()
    labels = _labels(32, 4, seed=42)
    protos = _unit(4, 3, 16, dtype=dtype, seed=43)
    ref = _all_losses(z.detach().double(), labels, protos.double())
    for name, value in _all_losses(z, labels, protos).items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        # Same (rounded) inputs, computed in float32: only float32 rounding separates them.
        torch.testing.assert_close(value.double(), ref[name], rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(value, z)
        assert grad.dtype == dtype and torch.isfinite(grad).all()


def test_autocast_does_not_lower_precision():
    z = _unit(32, 16, dtype=torch.float32, seed=44)
    labels = _labels(32, 4, seed=44)
    protos = _unit(4, 2, 16, dtype=torch.float32, seed=45)
    ref = _all_losses(z, labels, protos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _all_losses(z, labels, protos)
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, ref[name], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    z = _unit(48, 16, dtype=torch.float32, seed=46)
    labels = _labels(48, 5, seed=46)
    protos = _unit(5, 2, 16, dtype=torch.float32, seed=47)
    ref = _all_losses(z, labels, protos)
    z_cuda = z.cuda().requires_grad_()
    got = _all_losses(z_cuda, labels.cuda(), protos.cuda())
    for name, value in got.items():
        assert value.device.type == "cuda", name
        torch.testing.assert_close(value.cpu(), ref[name], rtol=1e-4, atol=1e-4)
        (grad,) = torch.autograd.grad(value, z_cuda)
        assert grad.device.type == "cuda" and torch.isfinite(grad).all()
    with torch.autocast("cuda", dtype=torch.float16):
        value = sup_con_loss(z_cuda, labels.cuda(), 0.1, 8)
    assert value.dtype == torch.float32
    assert math.isclose(value.item(), ref["sc_blockwise"].item(), rel_tol=1e-4)
