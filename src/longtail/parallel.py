"""What a method needs to know of distributed training: the global batch.

Every function here is the identity in a single process. Under torchrun each process holds
a slice of the global batch; :func:`gather` concatenates the slices in rank order with a
gradient that flows back to every slice, so an in-batch loss (SC, BCL, DSCL) sees the same
global batch, and after DistributedDataParallel averages the gradients, the same gradients
as one process training on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather(x: Tensor) -> Tensor:
    """Every process's ``x`` (same shape on each) concatenated along dim 0, differentiably.

    The backward pass sums the gradients that all processes compute for each slice, so the
    loss of the gathered batch, computed identically on every process, trains each slice as
    one process would (DistributedDataParallel then divides by the world size).
    """
    if not is_distributed():
        return x
    return _Gather.apply(x)


@torch.no_grad()
def gather_detached(x: Tensor) -> Tensor:
    """:func:`gather` without a gradient (keys for a queue, labels)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _Gather(torch.autograd.Function):
    """all_gather forward; backward sums the gradients of all processes and keeps this
    process's slice (an all-reduce: gloo and NCCL both have it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(0, rank() * ctx.rows, ctx.rows)
