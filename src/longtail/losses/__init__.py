"""Loss functions: pure functions of tensors."""

from longtail.losses.balanced import balanced_contrastive_loss
from longtail.losses.contrastive import mpsc_loss, psc_loss, sup_con_loss
from longtail.losses.distillation import pbsd_loss
from longtail.losses.dscl import decoupled_contrastive_loss
from longtail.losses.paco import paco_loss
from longtail.losses.proco import proco_loss

__all__ = [
    "balanced_contrastive_loss",
    "decoupled_contrastive_loss",
    "paco_loss",
    "mpsc_loss",
    "pbsd_loss",
    "proco_loss",
    "psc_loss",
    "sup_con_loss",
]
