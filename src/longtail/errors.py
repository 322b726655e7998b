"""Errors that reach a user.

Library code raises ``ValueError``/``TypeError`` for bad arguments and :class:`DataError` for
files that are missing or unusable, each stating the fact. The boundaries that know where a
value came from (``build`` for the config, ``cli`` for flags) turn them into a
:class:`LongtailError` that also names the key or flag to change. The CLI prints a
``LongtailError`` as one line and exits with its ``exit_code``; anything else is a bug and
keeps its traceback.
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
