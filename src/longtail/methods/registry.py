"""The method table; importing ``longtail.methods`` fills it."""

from __future__ import annotations

from longtail.registry import Registry

METHODS: Registry = Registry("method")
