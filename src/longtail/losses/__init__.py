"""Loss functions."""

from longtail.losses.contrastive import mpsc_loss, psc_loss, sup_con_loss

__all__ = ["mpsc_loss", "psc_loss", "sup_con_loss"]
