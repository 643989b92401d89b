"""Containers for per-session state that cost little while empty: an idle session holds
a dozen of them, and a proxy holds thousands of idle sessions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["SmallSet"]


class SmallSet(dict):
    """A set of a few members, kept as a dict's keys: empty it is 64 bytes where a set is
    216 (CPython 3.11 preallocates a set's first 8 slots), and emptied again it is 64
    again. The set operations per-session state uses: ``add``, ``discard``, ``update``,
    ``in``, ``len``, iteration."""

    __slots__ = ()

    def add(self, item: Any) -> None:
        self[item] = None

    def discard(self, item: Any) -> None:
        self.pop(item, None)
        if not self:
            self.clear()  # an emptied dict keeps its table (160 bytes); clear() lets it go

    def update(self, items: Iterable[Any]) -> None:  # type: ignore[override]
        for item in items:
            self[item] = None

    def __repr__(self) -> str:
        return f"SmallSet({list(self)!r})"
