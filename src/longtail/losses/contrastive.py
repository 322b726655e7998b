"""Contrastive losses of the hybrid networks: SC, PSC and MPSC (Wang et al., CVPR 2021).

All three are pure tensor functions: they follow the inputs' device, never touch globals, and
compute in float32 or wider even under autocast (half inputs are upcast; the result is float32).

``sup_con_loss`` has two implementations with identical values and gradients:

* direct: materialises the N x N similarity matrix; simplest and fastest for small N.
* blockwise: a custom autograd Function that walks over blocks of anchors, keeps only O(N)
  statistics between forward and backward and recomputes each b x N block in backward, so its
  memory is O(N * b + N * d) instead of the O(N^2) the paper complains about.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtail.losses.common import check_features, full_precision, upcast

__all__ = ["mpsc_loss", "psc_loss", "sup_con_loss"]

#: Anchors per block of the blockwise SC path. Timed on a 2-core CPU at 8,192 images x 2 views,
#: d = 128 (fwd + bwd, CPU seconds): 256 -> 13, 512 -> 10, 1024 -> 7.5-8.6, 4096 -> 7.5-8.2,
#: direct -> 24. Smaller blocks pay per-block threading overhead; larger ones barely gain while
#: the working set (2 * b * N floats: 128 MB at N = 16,384) grows linearly.
DEFAULT_BLOCK_SIZE = 1024


# --------------------------------------------------------------------------------------------
# SC loss
# --------------------------------------------------------------------------------------------


def sup_con_loss(
    z: Tensor, labels: Tensor, temperature: float = 0.1, block_size: int | None = DEFAULT_BLOCK_SIZE
) -> Tensor:
    """Supervised contrastive loss ("L_out" of Khosla et al. 2020), as used by Hybrid-SC.

    For anchor i, P(i) are the other rows with the same label (including its other view) and
    A(i) all rows except i::

        l_i = -1/|P(i)| * sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} exp(s_ia) ],
        s_ij = z_i . z_j / temperature.

    Positives stay in the denominator and there is no ``temperature / 0.07`` rescaling.

    Args:
        z: (N, d) L2-normalised embeddings of all views concatenated (e.g. N = 2B).
        labels: (N,) integer class labels, one per row of ``z``.
        temperature: Softmax temperature tau.
        block_size: Anchors per block of the memory-efficient path, used when N > block_size.
            ``None`` forces the direct O(N^2)-memory implementation.

    Returns:
        Scalar mean of l_i over the anchors that have at least one positive; anchors without
        positives are not counted. If no anchor has a positive, a zero that is still connected
        to ``z`` in the graph. float64 for float64 inputs, float32 otherwise.
    """
    check_features(z, labels)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
    with full_precision(z.device):
        z = upcast(z)
        # Relabel to 0..K-1 so class sizes and class sums are plain bincount/index_add.
        _, cls = torch.unique(labels, return_inverse=True)
        n_pos = torch.bincount(cls)[cls] - 1  # |P(i)|
        valid = n_pos > 0
        if not bool(valid.any()):
            return 0.0 * z.sum()
        if block_size is None or z.shape[0] <= block_size:
            return _sup_con_direct(z, cls, n_pos, valid, temperature)
        return _sup_con_blockwise(z, cls, n_pos, valid, temperature, block_size)


def _sup_con_direct(
    z: Tensor, cls: Tensor, n_pos: Tensor, valid: Tensor, temperature: float
) -> Tensor:
    """Reference implementation through the full N x N logit matrix (plain autograd)."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    pos_mask = (cls[:, None] == cls[None, :]) & ~self_mask
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1)
    pos_logit_sum = torch.where(pos_mask, logits, 0.0).sum(dim=1)
    per_anchor = log_denominator - pos_logit_sum / n_pos.clamp(min=1)
    return per_anchor[valid].mean()


def _sup_con_blockwise(
    z: Tensor, cls: Tensor, n_pos: Tensor, valid: Tensor, temperature: float, block_size: int
) -> Tensor:
    """O(N * b + N * d)-memory SC loss with the same value and gradient as the direct one."""
    anchors = valid.nonzero().squeeze(1)
    # sum_{p in P(i)} z_i.z_p = z_i . (sum of z over i's class - z_i): O(N d), no pair matrix,
    # so plain autograd handles the positive term; only the log-denominator needs blocking.
    class_sum = z.new_zeros(int(cls.max()) + 1, z.shape[1]).index_add(0, cls, z)
    pos_logit_sum = ((class_sum[cls] - z) * z).sum(dim=1) / temperature
    log_denominator = _BlockwiseLogDenominator.apply(z, anchors, 1.0 / temperature, block_size)
    return (log_denominator - pos_logit_sum[anchors] / n_pos[anchors]).mean()


def _block_logits(z: Tensor, rows: Tensor, inv_tau: float, out: Tensor) -> Tensor:
    """Writes z_rows . z_j / tau into ``out[:len(rows)]``, each row's own column set to -inf.

    Reusing one preallocated buffer matters on CPU: a fresh b x N allocation per block is
    page-faulted in every time and costs about as much as an elementwise pass.
    """
    logits = out[: rows.numel()]
    torch.mm(z[rows] * inv_tau, z.T, out=logits)
    logits[torch.arange(rows.numel(), device=z.device), rows] = float("-inf")
    return logits


class _BlockwiseLogDenominator(torch.autograd.Function):
    """lse_i = log sum_{j != i} exp(z_i . z_j / tau) for the anchor rows i, computed in blocks.

    Forward keeps only the (M,) lse values. With upstream gradient g_i and the softmax
    q_ij = exp(s_ij - lse_i) (q_ii = 0), dL/ds_ij = g_i q_ij, and since s_ij = s_ji:

        dL/dz_k = 1/tau * sum_j (g_k q_kj + g_j q_jk) z_j,   q_jk = exp(s_kj - lse_j),

    so one b x N block of logits for rows k gives both the anchor-side and the column-side
    terms of those rows; no N x N matrix is ever formed.
    """

    @staticmethod
    def forward(ctx, z: Tensor, anchors: Tensor, inv_tau: float, block_size: int) -> Tensor:
        n, n_anchors = z.shape[0], anchors.numel()
        with full_precision(z.device):
            lse = z.new_empty(n_anchors)
            buffer = z.new_empty(min(block_size, n_anchors), n)
            for start in range(0, n_anchors, block_size):
                rows = anchors[start : start + block_size]
                logits = _block_logits(z, rows, inv_tau, buffer)
                # Stable log-sum-exp in place; the max is finite because N >= 2.
                row_max = logits.amax(dim=1, keepdim=True)
                row_sum = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
                lse[start : start + rows.numel()] = (row_sum.log_() + row_max).squeeze(1)
        ctx.save_for_backward(z, anchors, lse)
        ctx.inv_tau = inv_tau
        ctx.block_size = block_size
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse: Tensor) -> tuple[Tensor, None, None, None]:
        z, anchors, lse = ctx.saved_tensors
        inv_tau, block_size = ctx.inv_tau, ctx.block_size
        n = z.shape[0]
        with full_precision(z.device):
            # Per-row statistics over all N rows; non-anchors get g = 0 and lse = +inf so their
            # exp terms vanish instead of overflowing (0 * inf would be NaN).
            g_all = z.new_zeros(n).index_copy_(0, anchors, grad_lse.to(z.dtype))
            lse_all = z.new_full((n,), float("inf")).index_copy_(0, anchors, lse)
            grad_z = torch.empty_like(z)
            logits_buffer = z.new_empty(min(block_size, n), n)
            coeff_buffer = torch.empty_like(logits_buffer)
            for start in range(0, n, block_size):
                rows = torch.arange(start, min(start + block_size, n), device=z.device)
                logits = _block_logits(z, rows, inv_tau, logits_buffer)
                # Anchor side g_k q_kj, then the column side g_j q_jk from the same logits.
                coeff = torch.sub(logits, lse_all[rows, None], out=coeff_buffer[: rows.numel()])
                coeff.exp_().mul_(g_all[rows, None])
                coeff.addcmul_(logits.sub_(lse_all[None, :]).exp_(), g_all[None, :])
                torch.mm(coeff, z, out=grad_z[start : start + rows.numel()])
            grad_z.mul_(inv_tau)
        return grad_z, None, None, None


# --------------------------------------------------------------------------------------------
# PSC / MPSC losses
# --------------------------------------------------------------------------------------------


def _check_prototypes(z: Tensor, labels: Tensor, prototypes: Tensor) -> None:
    check_features(z, labels)
    if prototypes.shape[-1] != z.shape[1]:
        raise ValueError(
            f"prototype dim {prototypes.shape[-1]} does not match feature dim {z.shape[1]}"
        )
    if prototypes.shape[0] < 2:
        raise ValueError("need at least 2 classes: the denominator only has other classes")


def psc_loss(z: Tensor, labels: Tensor, prototypes: Tensor, temperature: float = 0.1) -> Tensor:
    """Prototypical supervised contrastive (PSC) loss.

    Each row is pulled to its class prototype and pushed from all the other prototypes::

        l_i = -( z_i.p_{y_i}/tau - log sum_{j != y_i} exp(z_i.p_j/tau) ).

    The positive prototype is excluded from the denominator, so d l_i / d(z_i.p_{y_i}) is
    exactly -1/tau. Memory is O(N * C).

    Args:
        z: (N, d) L2-normalised embeddings.
        labels: (N,) integer labels in [0, C).
        prototypes: (C, d) L2-normalised class prototypes (normalised by the caller).
        temperature: Softmax temperature tau.

    Returns:
        Scalar mean of l_i over all rows; float64 for float64 inputs, float32 otherwise.
    """
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be (C, d), got shape {tuple(prototypes.shape)}")
    _check_prototypes(z, labels, prototypes)
    with full_precision(z.device):
        z, prototypes = upcast(z), upcast(prototypes)
        labels = labels.long()
        logits = z @ prototypes.T / temperature  # (N, C)
        own_class = torch.arange(logits.shape[1], device=z.device) == labels[:, None]
        pos_logit = logits.gather(1, labels[:, None]).squeeze(1)
        log_denominator = torch.logsumexp(logits.masked_fill(own_class, float("-inf")), dim=1)
        return (log_denominator - pos_logit).mean()


def mpsc_loss(z: Tensor, labels: Tensor, prototypes: Tensor, temperature: float = 0.1) -> Tensor:
    """PSC loss with M prototypes per class (MPSC).

    With s_{i,c,m} = z_i.p_{c,m}/tau and affinities w_{i,m} = softmax_m(s_{i,y_i,m}) (treated
    as constants, no gradient flows through them)::

        l_i = -sum_m w_{i,m} [ s_{i,y_i,m} - log sum_{j != y_i} sum_{m'} exp(s_{i,j,m'}) ].

    With M = 1 it equals :func:`psc_loss`. Memory is O(N * C * M).

    Args:
        z: (N, d) L2-normalised embeddings.
        labels: (N,) integer labels in [0, C).
        prototypes: (C, M, d) L2-normalised prototypes, or (C, d) for M = 1.
        temperature: Softmax temperature tau.

    Returns:
        Scalar mean of l_i over all rows; float64 for float64 inputs, float32 otherwise.
    """
    if prototypes.dim() == 2:
        prototypes = prototypes.unsqueeze(1)
    if prototypes.dim() != 3:
        raise ValueError(f"prototypes must be (C, M, d) or (C, d), got {tuple(prototypes.shape)}")
    _check_prototypes(z, labels, prototypes)
    with full_precision(z.device):
        z, prototypes = upcast(z), upcast(prototypes)
        labels = labels.long()
        n_classes, per_class, dim = prototypes.shape
        logits = (z @ prototypes.reshape(-1, dim).T / temperature).view(-1, n_classes, per_class)
        own_class = torch.arange(n_classes, device=z.device) == labels[:, None]  # (N, C)
        pos_logits = logits[torch.arange(z.shape[0], device=z.device), labels]  # (N, M)
        affinity = torch.softmax(pos_logits.detach(), dim=1)
        log_denominator = torch.logsumexp(
            logits.masked_fill(own_class[:, :, None], float("-inf")).flatten(1), dim=1
        )
        # sum_m w_m = 1, so the log-denominator term needs no weighting.
        return (log_denominator - (affinity * pos_logits).sum(dim=1)).mean()
