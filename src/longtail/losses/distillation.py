"""Patch-based self-distillation, PBSD (Xuan & Zhang, AAAI 2024).

A pure tensor function: the teacher and student embeddings are made by the method (RoIAlign
on the feature map, crops through the encoder); this scores them and compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longtail.losses.common import EMPTY, check_queue, full_precision, upcast


def pbsd_loss(
    student: Tensor,
    teacher: Tensor,
    keys: Tensor,
    queue: Tensor,
    queue_labels: Tensor,
    temperature: float = 0.07,
) -> Tensor:
    """Cross-entropy of the student patches' similarity distribution to the teacher's.

    Patch j of image i is scored against i's own key and every filled queue slot:
    ``p = softmax([x . k_i, x . Q] / temperature)`` for x the teacher (target, no gradient)
    and the student; the loss is ``-sum p_teacher log p_student``, averaged over patches and
    images.

    Args:
        student: (B, L, d) L2-normalised embeddings of L patches cropped from each image.
        teacher: (B, L, d) L2-normalised embeddings of the same boxes pooled from the
            image's feature map; detached here.
        keys: (B, d) L2-normalised keys of the images.
        queue: (K, d) L2-normalised queued keys.
        queue_labels: (K,) their labels; -1 marks an empty slot (left out).
        temperature: Softmax temperature tau.

    Returns:
        Scalar loss; float64 for float64 inputs, float32 otherwise.
    """
    if student.dim() != 3 or teacher.shape != student.shape:
        raise ValueError(
            f"student and teacher must both be (B, L, d); got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    b, _, d = student.shape
    if keys.shape != (b, d):
        raise ValueError(f"keys must be ({b}, {d}), got {tuple(keys.shape)}")
    check_queue(queue, queue_labels, d)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with full_precision(student.device):
        student = upcast(student)
        teacher, keys = upcast(teacher).to(student.dtype), upcast(keys).to(student.dtype)
        filled = queue[queue_labels != EMPTY].to(student.dtype)

        def logits(x: Tensor) -> Tensor:
            own = (x * keys[:, None, :]).sum(-1, keepdim=True)  # (B, L, 1)
            return torch.cat([own, x @ filled.T], dim=-1) / temperature

        target = F.softmax(logits(teacher.detach()), dim=-1)
        return -(target * F.log_softmax(logits(student), dim=-1)).sum(-1).mean()
