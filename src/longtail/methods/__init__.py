"""Methods: the one place that knows a paper. Importing this package registers them all."""

from longtail.methods import (  # noqa: F401  (registration)
    bbn,
    bcl,
    ce,
    decoupling,
    dscl,
    hybrid,
    paco,
    proco,
    reweighting,
    two_stage,
)
from longtail.methods.base import METHODS, Method, MethodOptions, Stage, register_method
from longtail.methods.curriculum import CURRICULA, curriculum_alpha

__all__ = [
    "CURRICULA",
    "METHODS",
    "Method",
    "MethodOptions",
    "Stage",
    "curriculum_alpha",
    "register_method",
]
