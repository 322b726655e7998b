"""What every loss of longtail shares: full precision under autocast, and input checks.

Losses are pure functions of tensors: they follow the inputs' device and compute in float32
(or float64) even when called under bfloat16/float16 autocast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

EMPTY = -1  #: label of a queue slot that holds no key yet (as models.LabelledQueue writes)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disables autocast on ``device`` so matmuls and exps are not done in half precision."""
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device.type):
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def upcast(x: Tensor) -> Tensor:
    """Returns ``x`` in float32 if it is a half type, else unchanged (float32/float64 kept)."""
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_features(z: Tensor, labels: Tensor) -> None:
    """``z`` is (N, d) and ``labels`` (N,) integers; else ValueError/TypeError saying which."""
    if z.dim() != 2:
        raise ValueError(f"z must be (N, d), got shape {tuple(z.shape)}")
    if labels.shape != (z.shape[0],):
        raise ValueError(f"labels must be ({z.shape[0]},), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integers, got {labels.dtype}")


def check_queue(queue: Tensor, queue_labels: Tensor, dim: int) -> None:
    """A queue of keys is (K, ``dim``) with (K,) labels; else ValueError saying which."""
    if queue.dim() != 2 or queue.shape[1] != dim:
        raise ValueError(f"queue must be (K, {dim}), got {tuple(queue.shape)}")
    if queue_labels.shape != (queue.shape[0],):
        raise ValueError(
            f"queue_labels must be ({queue.shape[0]},), got {tuple(queue_labels.shape)}"
        )
