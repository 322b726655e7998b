"""The balanced contrastive loss against a loop written from the BCL paper's formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longtail.losses import balanced_contrastive_loss
from references import bcl_loop

F64 = torch.float64


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen, dtype=F64), dim=-1)


def _grads(fn, z, centres, *args):
    z = z.detach().clone().requires_grad_()
    centres = centres.detach().clone().requires_grad_()
    loss = fn(z, *args[:1], centres, *args[1:])
    gz, gc = torch.autograd.grad(loss, (z, centres))
    return loss.detach(), gz, gc


@pytest.mark.parametrize(
    ("b", "d", "classes", "tau", "block"),
    [(4, 3, 3, 0.1, None), (6, 5, 4, 0.5, None), (9, 4, 7, 0.07, 4), (5, 6, 2, 1.0, 1)],
)
def test_matches_the_loop_in_value_and_gradients(b, d, classes, tau, block):
    y = torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(b))
    labels = torch.cat([y, y])  # two views per image
    z, centres = _unit(2 * b, d, seed=b), _unit(classes, d, seed=100 + b)
    got = _grads(balanced_contrastive_loss, z, centres, labels, tau, block)
    ref = _grads(lambda z_, lab, c, t: bcl_loop(z_, lab.tolist(), c, t), z, centres, labels, tau)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_a_class_absent_from_the_batch_still_counts_through_its_centre():
    labels = torch.tensor([0, 1, 0, 1])
    z, centres = _unit(4, 3, seed=1), _unit(3, 3, seed=2)
    loss = balanced_contrastive_loss(z, labels, centres, 0.5)
    torch.testing.assert_close(loss, bcl_loop(z, labels.tolist(), centres, 0.5))
    # moving class 2's centre (no image of class 2 here) changes the loss and gets a gradient
    centres = centres.clone().requires_grad_()
    balanced_contrastive_loss(z, labels, centres, 0.5).backward()
    assert centres.grad[2].abs().sum() > 0


def test_a_single_image_class_has_its_other_view_and_its_centre_as_positives():
    # image 0 is the only one of class 2; its anchors' positives are 2 targets
    labels = torch.tensor([2, 0, 0, 2, 0, 0])
    z, centres = _unit(6, 4, seed=3), _unit(3, 4, seed=4)
    tau = 0.2
    s = z @ torch.cat([z, centres]).T / tau
    den = torch.stack(
        [
            torch.exp(s[0, [1, 2, 4, 5, 6]]).mean(),  # class 0: four views and its centre
            torch.exp(s[0, [7]]).mean(),  # class 1: its centre only
            torch.exp(s[0, [3, 8]]).mean(),  # class 2: the other view and the centre
        ]
    ).sum()
    anchor0 = -((s[0, 3] - torch.log(den)) + (s[0, 8] - torch.log(den))) / 2
    per_anchor = bcl_loop(z, labels.tolist(), centres, tau, mean=False)
    torch.testing.assert_close(per_anchor[0], anchor0)
    torch.testing.assert_close(
        balanced_contrastive_loss(z, labels, centres, tau), per_anchor.mean()
    )


def test_float32_under_autocast_and_blocks_equal_direct():
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(0))
    z, centres = _unit(40, 8, seed=5).float(), _unit(5, 8, seed=6).float()
    direct = balanced_contrastive_loss(z, labels, centres, 0.1, block_size=None)
    blocked = balanced_contrastive_loss(z, labels, centres, 0.1, block_size=7)
    torch.testing.assert_close(direct, blocked)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = balanced_contrastive_loss(z.bfloat16(), labels, centres.bfloat16(), 0.1)
    assert auto.dtype == torch.float32


def test_bad_inputs():
    z, c = _unit(4, 3), _unit(2, 3)
    with pytest.raises(ValueError, match="centres"):
        balanced_contrastive_loss(z, torch.tensor([0, 1, 0, 1]), _unit(2, 4))
    with pytest.raises(ValueError, match="labels must lie"):
        balanced_contrastive_loss(z, torch.tensor([0, 1, 0, 2]), c)
    with pytest.raises(ValueError, match="temperature"):
        balanced_contrastive_loss(z, torch.tensor([0, 1, 0, 1]), c, 0.0)
