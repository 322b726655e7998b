"""Loss functions: pure functions of tensors."""

from longtail.losses.balanced import balanced_contrastive_loss
from longtail.losses.contrastive import mpsc_loss, psc_loss, sup_con_loss

__all__ = ["balanced_contrastive_loss", "mpsc_loss", "psc_loss", "sup_con_loss"]
