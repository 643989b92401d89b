"""Encode values as IMAP atoms, quoted strings, literals or response text, and read capability lists."""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["QUOTED_NAME_MAX", "astring", "capability_sets", "capability_tokens", "quoted", "safe_text"]

# ATOM-CHAR: printable ASCII except atom-specials ( ) { SP % * " \ ].
_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
# What a quoted string cannot carry: CR, LF, NUL and 8-bit bytes.
_UNQUOTABLE = re.compile(rb"[\r\n\x00\x80-\xff]")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def safe_text(text: str) -> str:
    """A text the proxy writes itself: no CR, LF or other control character can forge a line."""
    return _UNSAFE.sub("?", text)


def quoted(value: bytes) -> bytes:
    """``value`` as a quoted string; ValueError if it holds CR, LF, NUL or non-ASCII bytes."""
    if _UNQUOTABLE.search(value) is not None:
        raise ValueError("value cannot be sent as a quoted string")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


#: The longest quoted string a name is written as; a longer one goes as a literal. Quoting doubles
#: every " and \\ of a name the client sent as a literal: over a backend's line limit (Dovecot: 64 KiB,
#: "BAD ... Too long argument"), after which Dovecot read the rest, a later literal's bytes too, as
#: commands (a RENAME's second name, an APPEND's message: tests/test_long_quoted_names.py).
QUOTED_NAME_MAX = 4096


def astring(value: bytes) -> bytes:
    """The shortest safe astring: an atom, else a quoted string (up to QUOTED_NAME_MAX), else a {n+} literal."""
    if _ATOM.fullmatch(value) is not None:
        return value
    if _UNQUOTABLE.search(value) is None:
        text = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        if len(text) <= QUOTED_NAME_MAX:
            return text
    return b"{%d+}\r\n" % len(value) + value


def capability_tokens(data: bytes) -> list[str]:
    """Upper-cased capability names: b"IMAP4rev1 AUTH=PLAIN" -> ["IMAP4REV1", "AUTH=PLAIN"]."""
    return data.decode("ascii", "replace").upper().split()


@lru_cache(maxsize=64)
def capability_sets(data: bytes) -> tuple[frozenset[str], tuple[str, ...]]:
    """(upper-cased names for membership tests, names as announced): one shared pair per
    distinct list, not ~7 KB of strings per backend connection (a fleet announces few lists)."""
    return frozenset(capability_tokens(data)), tuple(data.decode("ascii", "replace").split())
