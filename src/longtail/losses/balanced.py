"""The balanced contrastive loss of BCL (Zhu et al., CVPR 2022).

A pure tensor function: it follows its inputs' device and computes in float32 or wider even
under autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longtail.losses.common import check_features, full_precision, upcast

#: Anchors per block: above it the loss is computed block by block, each block recomputed in
#: backward, so memory is O(block x (N + C)) instead of O(N x (N + C)).
DEFAULT_BLOCK_SIZE = 1024


def balanced_contrastive_loss(
    z: Tensor,
    labels: Tensor,
    centres: Tensor,
    temperature: float = 0.1,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """BCL: supervised contrast with class-averaging and class-complement.

    The contrast targets are the N anchors ``z`` and the C class ``centres`` (targets only,
    never anchors). For anchor i with label y and ``s_ij = z_i . t_j / temperature``, let
    S_c be the targets of class c other than i itself (its views in the batch and its centre,
    so a class absent from the batch is still there through its centre). Then::

        l_i = -1/|S_y| sum_{p in S_y} [ s_ip - log sum_c (1/|S_c|) sum_{j in S_c} exp(s_ij) ]

    Each class contributes the mean of its exponentials (class-averaging: a head class does
    not dominate the denominator by numbers), and every class is present (class-complement).

    Args:
        z: (N, d) L2-normalised views (e.g. two views of B images, N = 2B).
        labels: (N,) integer labels in [0, C).
        centres: (C, d) L2-normalised class centres.
        temperature: Softmax temperature tau.
        block_size: Anchors per block when N is larger; None computes all anchors at once.

    Returns:
        Scalar mean of l_i over the N anchors; float64 for float64 inputs, float32 otherwise.
    """
    check_features(z, labels)
    if centres.dim() != 2 or centres.shape[1] != z.shape[1]:
        raise ValueError(f"centres must be (C, {z.shape[1]}), got {tuple(centres.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
    num_classes = centres.shape[0]
    with full_precision(z.device):
        z, centres = upcast(z), upcast(centres).to(z.dtype)
        labels = labels.long()
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        targets = torch.cat([z, centres])
        target_labels = torch.cat([labels, torch.arange(num_classes, device=z.device)])
        members = torch.bincount(target_labels, minlength=num_classes).to(z.dtype)
        n = z.shape[0]
        if block_size is None or n <= block_size:
            return _bcl_block(z, labels, torch.arange(n, device=z.device), targets,
                              target_labels, members, temperature).sum() / n  # fmt: skip
        total = z.new_zeros(())
        for start in range(0, n, block_size):
            rows = torch.arange(start, min(start + block_size, n), device=z.device)
            block = checkpoint(
                _bcl_block,
                z[rows],
                labels[rows],
                rows,
                targets,
                target_labels,
                members,
                temperature,
                use_reentrant=False,
            )
            total = total + block.sum()
        return total / n


def _bcl_block(
    anchors: Tensor,
    labels: Tensor,
    rows: Tensor,
    targets: Tensor,
    target_labels: Tensor,
    members: Tensor,
    temperature: float,
) -> Tensor:
    """l_i for the anchors ``rows`` (their positions among the targets)."""
    num_classes = members.shape[0]
    logits = anchors @ targets.T / temperature  # (b, N + C)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(len(rows), device=rows.device), rows] = True
    one_hot = torch.nn.functional.one_hot(target_labels, num_classes).to(logits.dtype)
    # |S_c| for each anchor: the class's members, minus the anchor itself in its own class.
    own = torch.nn.functional.one_hot(labels, num_classes).to(logits.dtype)
    sizes = members[None, :] - own  # (b, C), >= 1 (every class has its centre)
    top = logits.masked_fill(is_self, float("-inf")).amax(dim=1, keepdim=True)
    exp = torch.exp(logits - top).masked_fill(is_self, 0.0)
    log_denominator = torch.log((exp @ one_hot / sizes).sum(dim=1)) + top.squeeze(1)
    positive_sum = (logits.masked_fill(is_self, 0.0) @ one_hot * own).sum(dim=1)
    positives = (sizes * own).sum(dim=1)
    return log_denominator - positive_sum / positives
