"""Evaluation metrics for long-tailed classification."""

from longtail.evaluation.metrics import (
    SHOT_GROUP_NAMES,
    confusion_matrix,
    evaluate_logits,
    expected_calibration_error,
    per_class_accuracy,
    reliability_bins,
    shot_groups,
    topk_accuracy,
)

__all__ = [
    "SHOT_GROUP_NAMES",
    "confusion_matrix",
    "evaluate_logits",
    "expected_calibration_error",
    "per_class_accuracy",
    "reliability_bins",
    "shot_groups",
    "topk_accuracy",
]
