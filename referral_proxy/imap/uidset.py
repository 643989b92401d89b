"""UID sets (RFC 3501 sequence-set, RFC 4315 uid-set): built from UIDs and expanded back.

``APPENDUID`` and ``COPYUID`` list UIDs in the order the messages were saved, so both
directions keep the order they are given. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["uid_set", "expand_uid_set", "sequence_set_size", "MAX_EXPANDED"]

# A backend's APPENDUID could name "1:4294967295"; expanding that would eat memory.
MAX_EXPANDED = 10_000_000
_PART = re.compile(rb"([1-9][0-9]{0,9})(?::([1-9][0-9]{0,9}))?")


def uid_set(uids: Iterable[int]) -> bytes:
    """``[5, 6, 7, 9]`` -> ``b"5:7,9"``; the order is kept (``[3, 2]`` -> ``b"3,2"``)."""
    out: list[bytes] = []
    start: int | None = None
    prev: int | None = None
    for uid in uids:
        if uid < 1:
            raise ValueError(f"not a UID: {uid}")
        if prev is not None and uid == prev + 1:
            prev = uid
            continue
        if start is not None and prev is not None:
            out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = uid
    if start is not None and prev is not None:
        out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(out)


def expand_uid_set(data: bytes | str, limit: int = MAX_EXPANDED) -> list[int]:
    """``b"5:7,9"`` -> ``[5, 6, 7, 9]``, in the order given; ``b"7:5"`` -> ``[7, 6, 5]``.

    ``b""`` is the empty set. ValueError for anything else than numbers, ``:`` and ``,``
    (no ``*``: a saved message's UID is always known), or more than *limit* UIDs."""
    if isinstance(data, str):
        data = data.encode("ascii")
    if not data:
        return []
    out: list[int] = []
    for part in data.split(b","):
        m = _PART.fullmatch(part)
        if m is None:
            raise ValueError(f"malformed uid-set {data[:40]!r}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if len(out) + abs(b - a) + 1 > limit:
            raise ValueError(f"uid-set of more than {limit} UIDs")
        out.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
    return out


def highest_number(data: bytes) -> int | None:
    """The largest number a sequence set writes out beside a ``*``, not inside a range to it
    (``b"9,*"``: 9, ``b"2,7,*"``: 7; ``b"1:*,9"``: None, as Dovecot takes ``1:*`` for every number
    from 1 up); None too if it writes none or is not a sequence set."""
    numbers, open_from = [], None
    for part in data.split(b","):
        ends = part.split(b":")
        if len(ends) > 2 or not all(e.isdigit() or e == b"*" for e in ends):
            return None
        if b"*" in ends and len(ends) == 2:
            low = min((int(e) for e in ends if e != b"*"), default=1)
            open_from = low if open_from is None else min(open_from, low)
        else:
            numbers += [int(e) for e in ends if e != b"*"]
    outside = [n for n in numbers if open_from is None or n < open_from]
    return max(outside, default=None)


def sequence_set_size(data: bytes) -> int | None:
    """How many distinct numbers a sequence set names (``b"1:5,3:7"``: 7, ``b"9:6"``: 4); None
    when it has ``*`` (or is not a set of numbers), whose extent only the server knows."""
    spans = []
    for part in data.split(b","):
        m = _PART.fullmatch(part)
        if m is None:
            return None
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        spans.append((min(a, b), max(a, b)))
    total = end = 0
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end + 1) + 1
            end = b
    return total
