"""Name -> object tables. Every name a user can type comes from one of these."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders, each with optional metadata (description, paper, defaults).

    Args:
        kind: What the entries are ("method", "backbone", ...); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Add ``obj`` under ``name``; without ``obj``, a decorator that adds what it wraps.

        A name can be taken only once. ``meta`` is kept beside the entry (see :meth:`meta`).
        """

        def add(o: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            self._meta[name] = dict(meta)
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Look ``name`` up; an unknown name raises a ValueError listing the valid ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            valid = ", ".join(sorted(self._entries))
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata registered with ``name`` (a copy)."""
        self.get(name)
        return dict(self._meta[name])

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise as :meth:`get` does (a pydantic validator)."""
        self.get(name)
        return name

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
