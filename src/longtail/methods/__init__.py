"""Methods: each module registers the papers' methods into ``METHODS``."""

from longtail.methods import ce, hybrid, two_stage  # noqa: F401  (registration)
from longtail.methods.registry import METHODS

__all__ = ["METHODS"]
