"""Errors that reach a user.

Library code raises ``ValueError``/``TypeError`` for bad arguments and :class:`DataError` for
files that are missing or unusable, each stating the fact. The boundaries that know where a
value came from (``build`` for the config, ``cli`` for flags) turn them into a
:class:`LongtailError` that also names the key or flag to change. The CLI prints a
``LongtailError`` as one line and exits with its ``exit_code``; anything else is a bug and
keeps its traceback.

Messages of the library name the option to change as a token (``{out}``, ``{resume}``, ...):
``str(error)`` spells them as :func:`longtail.api.train`'s arguments, and
:meth:`LongtailError.for_cli` as the command line's flags.
"""

from __future__ import annotations

# How each option token of a message is spelt: by the Python API, and by the command line.
API_SPELLING = {
    "{out}": "out",
    "{resume}": "resume=True",
    "{format}": "fmt",
    "{top_k}": "top_k",
    "{force}": "force=True",
}
CLI_SPELLING = {
    "{out}": "--out",
    "{resume}": "--resume",
    "{format}": "--format",
    "{top_k}": "--top-k",
    "{force}": "--force",
}


def spell(template: str, spelling: dict[str, str]) -> str:
    """``template`` with each option token replaced by its spelling."""
    for token, text in spelling.items():
        template = template.replace(token, text)
    return template


def shown(value: object) -> str:
    """A value the user wrote (a path, a name, a key) as a message quotes it: as it is when it
    is plain printable text, else escaped like a Python string literal, so that control
    characters, blanks and empty text show and the message stays on one line."""
    text = str(value)
    if text and text.strip() == text and text.isprintable():
        return text
    return repr(text)


class LongtailError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 1

    def __init__(self, message: str = "") -> None:
        self.template = message
        super().__init__(spell(message, API_SPELLING))

    def for_cli(self) -> str:
        """The message with the command line's flags."""
        return spell(self.template, CLI_SPELLING)


class UsageError(LongtailError):
    """Bad command line or configuration (unknown name, wrong type, bad value)."""

    exit_code = 2


class DataError(LongtailError):
    """Missing, unreadable or unusable data on disk."""

    exit_code = 1
