"""QUOTA responses (RFC 2087 / RFC 9208), sans-I/O: how much room a mailbox's quota roots leave.

``* QUOTA "root" (STORAGE 10 512 MESSAGE 3 1000)``: STORAGE in units of 1024 octets,
MESSAGE in messages, each as usage then limit. The APPEND path uses the room left to
know, before a backend would say it, that the next messages fit (append.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .command import Atom, ParenList, ParseError, parse_arguments

__all__ = ["quota_resources", "room_left"]


def quota_resources(fragments: Sequence[bytes], literals: Sequence[bytes]) -> dict[str, tuple[int, int]]:
    """The arguments of ``* QUOTA root (NAME usage limit ...)`` -> {NAME: (usage, limit)};
    ParseError if they are not that."""
    args = parse_arguments(fragments, literals)
    if len(args) != 2 or not isinstance(args[1], ParenList):
        raise ParseError("malformed QUOTA response")
    items = args[1].items
    if len(items) % 3:
        raise ParseError("malformed QUOTA resource list")
    out = {}
    for i in range(0, len(items), 3):
        name, usage, limit = items[i:i + 3]
        if not all(isinstance(t, Atom) for t in (name, usage, limit)) or not (
                usage.value.isdigit() and limit.value.isdigit()):  # type: ignore[union-attr]
            raise ParseError("malformed QUOTA resource")
        out[name.value.decode("ascii", "replace").upper()] = (int(usage.value), int(limit.value))  # type: ignore[union-attr]
    return out


def room_left(roots: Iterable[dict[str, tuple[int, int]]]) -> tuple[int | None, int | None]:
    """(bytes, messages) every root still takes for sure; None where no root limits it. A
    STORAGE usage is rounded down by the server: a whole unit is taken off for it."""
    size: int | None = None
    count: int | None = None
    for resources in roots:
        if "STORAGE" in resources:
            used, limit = resources["STORAGE"]
            left = max(0, (limit - used - 1) * 1024)
            size = left if size is None else min(size, left)
        if "MESSAGE" in resources:
            used, limit = resources["MESSAGE"]
            left = max(0, limit - used)
            count = left if count is None else min(count, left)
    return size, count
