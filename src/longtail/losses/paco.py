"""The parametric contrastive loss of PaCo (Cui et al., ICCV 2021) and GPaCo (TPAMI 2023).

Each anchor is scored against the class centres (a linear classifier's logits, with the log
class prior added: Balanced Softmax) and against sample targets (the other anchors, then a
bank of keys: MoCo keys and a labelled queue). Its positives are its own centre, weighted 1,
and every same-class sample target, weighted ``alpha``; the weights are normalised by their
sum, so at the optimum each sample positive takes alpha / (1 + alpha K) of the probability
and the centre 1 / (1 + alpha K), K the anchor's number of sample positives. As alpha goes
to 0 the loss becomes Balanced-Softmax cross-entropy on the classifier.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtail.losses.common import EMPTY, check_features, check_queue, full_precision, upcast


def paco_loss(
    z: Tensor,
    centre_logits: Tensor,
    labels: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    alpha: float,
    temperature: float,
) -> Tensor:
    """Mean PaCo loss of the anchors ``z``.

    Args:
        z: (N, d) unit-norm anchor embeddings; they are also the first N sample targets (an
            anchor is never its own target).
        centre_logits: (N, C) the class centres' logits of each anchor, prior included
            (PaCo: ``w_c . h + b_c + log pi_c``, no temperature).
        labels: (N,) integer classes of the anchors.
        bank: (K, d) further unit-norm sample targets (the momentum keys, the queue); slots
            labelled :data:`~longtail.losses.common.EMPTY` are left out.
        bank_labels: (K,) their classes.
        alpha: Weight of each same-class sample positive against the centre's 1.
        temperature: tau of the sample logits ``z_i . t / tau``.

    Returns:
        The scalar loss, in float32 (float64 for float64 inputs) whatever the autocast.
    """
    check_features(z, labels)
    check_queue(bank, bank_labels, z.shape[1])
    n = z.shape[0]
    if centre_logits.dim() != 2 or centre_logits.shape[0] != n:
        raise ValueError(f"centre_logits must be ({n}, C), got {tuple(centre_logits.shape)}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with full_precision(z.device):
        z = upcast(z)
        bank, centres = upcast(bank).to(z.dtype), upcast(centre_logits).to(z.dtype)
        labels, bank_labels = labels.long(), bank_labels.long()
        targets = torch.cat([z, bank])
        target_labels = torch.cat([labels, bank_labels])
        logits = z @ targets.T / temperature
        rows = torch.arange(n, device=z.device)
        excluded = (target_labels == EMPTY)[None, :].expand(n, -1).clone()
        excluded[rows, rows] = True  # the anchor itself
        everything = torch.cat([centres, logits.masked_fill(excluded, float("-inf"))], dim=1)
        log_d = torch.logsumexp(everything, dim=1)
        positive = (target_labels[None, :] == labels[:, None]) & ~excluded
        centre = centres[rows, labels] - log_d
        samples = ((logits - log_d[:, None]) * positive).sum(dim=1)
        loss = -(centre + alpha * samples) / (1 + alpha * positive.sum(dim=1))
        return loss.mean()
