"""longtail: long-tailed image classification with hybrid contrastive networks and baselines."""

__version__ = "0.1.0"
