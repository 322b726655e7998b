"""Stateful parts that the momentum-contrast family shares (MoCo, DSCL, PaCo).

* :func:`momentum_copy` / :func:`momentum_update`: a key (teacher) encoder that follows the
  query encoder by an exponential moving average of its parameters, never by gradients;
* :class:`LabelledQueue`: a FIFO memory of past keys with their labels, as buffers, so that
  it is saved and moved with the method.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

#: Label of a queue slot that holds no key yet (takes no part in a loss).
EMPTY = -1


def momentum_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that gradients never reach (the key encoder's start)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- m * target + (1 - m) * source`` for every parameter, matched by name.

    Buffers (BatchNorm statistics) are not averaged: the key encoder keeps those of its own
    forward passes, as MoCo's does.

    Raises:
        ValueError: If the two modules do not have the same parameters.
    """
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    mine, theirs = dict(target.named_parameters()), dict(source.named_parameters())
    if mine.keys() != theirs.keys():
        missing = sorted(mine.keys() ^ theirs.keys())
        raise ValueError(f"the key encoder and its source differ in parameters {missing[:3]}")
    for name, p in mine.items():
        p.mul_(momentum).add_(theirs[name].detach(), alpha=1 - momentum)


class LabelledQueue(nn.Module):
    """A FIFO queue of ``size`` keys of dimension ``dim`` with their labels.

    Empty slots have label :data:`EMPTY`; :meth:`push` writes over the oldest slots,
    wrapping around. Buffers: ``keys`` (size, dim), ``labels`` (size,), ``next`` (the slot
    the next key goes to).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0 or dim < 1:
            raise ValueError(f"a queue needs size >= 0 and dim >= 1, got {size} and {dim}")
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), EMPTY, dtype=torch.long))
        self.register_buffer("next", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return self.keys.shape[0]

    def filled(self) -> int:
        """How many slots hold a key."""
        return int((self.labels != EMPTY).sum())

    @torch.no_grad()
    def push(self, keys: Tensor, labels: Tensor) -> None:
        """Write ``keys`` (N, dim) and their labels over the oldest slots; with more keys than
        slots, the newest ``size`` stay."""
        size = len(self)
        if size == 0:
            return
        keys, labels = keys[-size:], labels[-size:]
        slots = (self.next + torch.arange(len(keys), device=keys.device)) % size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.labels[slots] = labels.long()
        self.next.copy_((self.next + len(keys)) % size)
