"""DSCL and PBSD against loops written from the paper's formulas (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longtail.losses import decoupled_contrastive_loss, pbsd_loss
from references import dscl_loop, pbsd_loop

F64 = torch.float64
ALPHA = 1 / (1 + 8)  # beta = 8


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=F64), dim=-1)


def _case(b=6, d=5, classes=3, slots=7, empty=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (b,), generator=gen)
    queue_labels = torch.randint(0, classes, (slots,), generator=gen)
    queue_labels[:empty] = -1
    return (
        _unit(b, d, seed=seed),
        _unit(b, d, seed=seed + 1),
        labels,
        _unit(slots, d, seed=seed + 2),
        queue_labels,
    )


@pytest.mark.parametrize(("seed", "tau"), [(0, 0.07), (1, 0.2), (2, 1.0)])
def test_dscl_matches_the_loop_in_value_and_gradients(seed, tau):
    q, k, labels, queue, ql = _case(seed=seed)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = decoupled_contrastive_loss(q1, k1, labels, queue, ql, ALPHA, tau)
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref = dscl_loop(q2, k2, labels.tolist(), queue, ql.tolist(), ALPHA, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    g, gr = torch.autograd.grad(loss, (q1, k1)), torch.autograd.grad(ref, (q2, k2))
    for a, r in zip(g, gr, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_empty_queue_slots_change_nothing():
    q, k, labels, queue, ql = _case(empty=3)
    with_empty = decoupled_contrastive_loss(q, k, labels, queue, ql, ALPHA, 0.1)
    filled = ql != -1
    without = decoupled_contrastive_loss(q, k, labels, queue[filled], ql[filled], ALPHA, 0.1)
    torch.testing.assert_close(with_empty, without, rtol=1e-12, atol=1e-12)
    # whatever vectors sit in the empty slots
    garbage = queue.clone()
    garbage[~filled] = _unit(int((~filled).sum()), queue.shape[1], seed=9)
    torch.testing.assert_close(
        decoupled_contrastive_loss(q, k, labels, garbage, ql, ALPHA, 0.1), with_empty
    )
    # an empty queue is allowed
    empty = decoupled_contrastive_loss(q, k, labels, queue[:0], ql[:0], ALPHA, 0.1)
    ref = dscl_loop(q, k, labels.tolist(), queue[:0], [], ALPHA, 0.1)
    torch.testing.assert_close(empty, ref, rtol=1e-10, atol=1e-10)


def test_an_anchor_without_other_positives_puts_all_weight_on_its_key():
    q, k = _unit(3, 4, seed=4), _unit(3, 4, seed=5)
    labels = torch.tensor([0, 1, 2])  # every image alone in its class, queue of other classes
    queue, ql = _unit(4, 4, seed=6), torch.tensor([3, 3, -1, 4])
    tau = 0.5
    loss = decoupled_contrastive_loss(q, k, labels, queue, ql, ALPHA, tau)
    s0 = q[0] @ torch.cat([q[1:], k, queue[[0, 1, 3]]]).T / tau
    by_hand = -(s0[2] - torch.logsumexp(s0, 0))  # k_0 is entry 2 of anchor 0's contrast set
    per_anchor = [dscl_loop(q, k, labels.tolist(), queue, ql.tolist(), ALPHA, tau)]
    torch.testing.assert_close(loss, per_anchor[0], rtol=1e-10, atol=1e-10)
    s = q @ torch.cat([q, k, queue[[0, 1, 3]]]).T / tau
    s.fill_diagonal_(float("-inf"))
    own = torch.stack([s[i, 3 + i] - torch.logsumexp(s[i], 0) for i in range(3)])
    torch.testing.assert_close(loss, -own.mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(-own[0], by_hand, rtol=1e-10, atol=1e-10)


def test_dscl_bad_inputs_and_precision():
    q, k, labels, queue, ql = _case()
    with pytest.raises(ValueError, match="alpha"):
        decoupled_contrastive_loss(q, k, labels, queue, ql, 1.5)
    with pytest.raises(ValueError, match="queue_labels"):
        decoupled_contrastive_loss(q, k, labels, queue, ql[:-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoupled_contrastive_loss(q.bfloat16(), k.bfloat16(), labels, queue.bfloat16(), ql)
    assert out.dtype == torch.float32


def test_pbsd_matches_the_loop_and_only_the_student_gets_gradients():
    b, patches, d = 3, 4, 5
    student = _unit(b, patches, d, seed=1).requires_grad_()
    teacher = _unit(b, patches, d, seed=2).requires_grad_()
    keys, queue = _unit(b, d, seed=3), _unit(6, d, seed=4)
    ql = torch.tensor([0, -1, 2, 1, -1, 0])
    loss = pbsd_loss(student, teacher, keys, queue, ql, 0.2)
    ref = pbsd_loop(student, teacher, keys, queue, ql.tolist(), 0.2)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    gs, gt = torch.autograd.grad(loss, (student, teacher), allow_unused=True)
    assert gs.abs().sum() > 0 and gt is None
    # the loss is smallest when the student equals the teacher (for this teacher)
    same = pbsd_loss(teacher.detach(), teacher.detach(), keys, queue, ql, 0.2)
    assert same < loss
