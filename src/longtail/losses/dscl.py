"""The decoupled supervised contrastive loss of DSCL (Xuan & Zhang, AAAI 2024).

Pure tensor functions: they follow the inputs' device and compute in float32 or wider even
under autocast. A queue slot labelled -1 is empty and takes no part at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtail.losses.common import EMPTY, check_features, check_queue, full_precision, upcast


def decoupled_contrastive_loss(
    q: Tensor,
    k: Tensor,
    labels: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    alpha: float = 1 / 9,
    temperature: float = 0.07,
) -> Tensor:
    """DSCL: supervised contrast whose two kinds of positives get fixed shares of the target.

    Anchors are the queries. The contrast set of anchor i is ``[q; k; queue]`` without q_i
    (and without empty queue slots); ``log p(a|i) = s_ia - log sum_{b != i} exp(s_ib)`` with
    ``s = q_i . t / temperature``. The anchor's own key k_i gets weight ``alpha``; the other
    entries of its class P'_i (queries, keys, queue) share ``1 - alpha`` equally::

        l_i = -[ alpha log p(k_i|i) + (1 - alpha)/|P'_i| sum_{a in P'_i} log p(a|i) ]

    and when P'_i is empty, ``l_i = -log p(k_i|i)``. At the optimum p(k_i|i) = alpha whatever
    the size of i's class: the two kinds of positives are decoupled.

    Args:
        q: (B, d) L2-normalised queries (the anchors).
        k: (B, d) L2-normalised keys of the same images (momentum encoder).
        labels: (B,) integer labels of the images.
        queue: (K, d) L2-normalised keys of earlier batches (K may be 0).
        queue_labels: (K,) their labels; -1 marks an empty slot.
        alpha: Weight of the own key, ``1 / (1 + beta)`` (beta 8 in the paper).
        temperature: Softmax temperature tau.

    Returns:
        Scalar mean of l_i over the B anchors; float64 for float64 inputs, float32 otherwise.
    """
    check_features(q, labels)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    check_queue(queue, queue_labels, q.shape[1])
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with full_precision(q.device):
        q, k, queue = upcast(q), upcast(k).to(q.dtype), upcast(queue).to(q.dtype)
        labels, queue_labels = labels.long(), queue_labels.long()
        b = q.shape[0]
        targets = torch.cat([q, k, queue])
        target_labels = torch.cat([labels, labels, queue_labels])
        rows = torch.arange(b, device=q.device)
        logits = q @ targets.T / temperature  # (B, 2B + K)
        excluded = (target_labels == EMPTY)[None, :].expand(b, -1).clone()
        excluded[rows, rows] = True  # the anchor itself
        log_p = logits - torch.logsumexp(logits.masked_fill(excluded, float("-inf")), 1, True)
        own_key = torch.zeros_like(excluded)
        own_key[rows, b + rows] = True
        others = (target_labels[None, :] == labels[:, None]) & ~excluded & ~own_key
        n_others = others.sum(dim=1)
        own_weight = torch.where(n_others > 0, torch.full_like(log_p[:, 0], alpha), 1.0)
        other_weight = (1 - own_weight) / n_others.clamp(min=1)
        weights = own_key * own_weight[:, None] + others * other_weight[:, None]
        return -(weights * log_p.masked_fill(excluded, 0.0)).sum(dim=1).mean()
