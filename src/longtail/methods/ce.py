"""Plain cross-entropy: one branch, the configured sampler (instance by default)."""

from __future__ import annotations

from longtail.methods.base import Method
from longtail.methods.registry import METHODS


@METHODS.register("ce")
class CrossEntropy(Method):
    """Cross-entropy on ``train.sampler`` batches; the baseline every table starts from."""

    name = "ce"
