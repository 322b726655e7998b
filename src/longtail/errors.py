"""User-facing errors.

The CLI turns every :class:`LongtailError` into one line on stderr and exits with
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LongtailError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 1


class UsageError(LongtailError):
    """Bad command line or configuration (unknown name, wrong type, bad value)."""

    exit_code = 2


class DataError(LongtailError):
    """Missing, unreadable or unusable data on disk."""

    exit_code = 1
