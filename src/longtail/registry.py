"""Name -> builder tables. Every name a user can type comes from one of these."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from longtail.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders.

    Args:
        kind: What the entries are ("method", "backbone", ...); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds ``obj`` under ``name``; a name can be taken only once."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Look ``name`` up; an unknown name raises a UsageError listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            raise UsageError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
