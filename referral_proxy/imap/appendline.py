"""The APPEND line clients send, read from its bytes (sans-I/O): what the command reader's long way
(framer, command head, general parse, the message's checks) makes of it, for the common form only.

``tag APPEND mailbox [(flags)] ["date-time"] {n}`` CRLF, one message with a synchronizing literal,
the whole of a read: an upper-case APPEND, the mailbox a plain atom or a quoted string without
escapes (no wildcard, 8-bit or control character), flags of plain atoms, ``{n}`` or ``~{n}``.
Each piece's characters are a subset of what the long way takes for it (reader._flags, its
keywords, :data:`DATE_TIME`), so that the result is the long way's; any other line, a system flag
RFC 3501 does not name, a date-time it refuses, a limit broken, goes the long way (None here),
which answers it as it always did. tests/test_fastpath_append.py holds the two ways together.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .command import _TAG
from .framing import LiteralSpec

__all__ = ["DATE_TIME", "SYSTEM_FLAGS", "AppendLine", "append_line"]

#: The system flags a message may be appended with (``\Recent`` is the server's).
SYSTEM_FLAGS = frozenset({b"\\ANSWERED", b"\\FLAGGED", b"\\DELETED", b"\\SEEN", b"\\DRAFT"})
#: RFC 3501's date-time (``date-day-fixed = (SP DIGIT) / 2DIGIT``, ``time = 2DIGIT ":" 2DIGIT ":" 2DIGIT``: 99-Dec
#: and 30:00:00 are syntax Dovecot takes, so not BAD here; probes j3 F1, j5 F1), and as Dovecot's imap_parse_date
#: one digit without its space, or a space before two. Never more than Dovecot takes: its BAD runs a LITERAL+ body.
DATE_TIME = re.compile(rb" ?[0-9]{1,2}-(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-[0-9]{4} "
                       rb"[0-9]{2}:[0-9]{2}:[0-9]{2} [+-][0-9]{4}", re.IGNORECASE)

# Possessive runs: a read of 64 KiB without a space is refused at once, not after 64 Ki steps back.
_PLAIN = rb"[A-Za-z0-9.:,$<>+_\-!#&'/=?@^~|]++"
_LINE = re.compile(
    rb'(%s+) APPEND (?:(%s)|"([ !#$&-)+-\[\]-~]*+)")(?: \(((?:\\?%s(?: \\?%s)*+)?)\))?(?: "([ !#-\[\]-~]*+)")? '
    rb"(~?)\{([0-9]{1,19})\}\r\n" % (_TAG.pattern, _PLAIN, _PLAIN, _PLAIN))


class AppendLine(NamedTuple):
    """An APPEND line as the long way reads it (a tuple: a frozen dataclass's __init__ costs a
    call per field, once a message on this path)."""

    tag: bytes
    mailbox: bytes
    flags: tuple[bytes, ...] | None
    date: bytes | None  # without its quotes, the day space-padded as the backend is sent it
    literal: LiteralSpec
    rest: bytes  # CommandStart.rest: the line after ``APPEND``, its announcement left out


def append_line(data: bytes, max_line: int, max_message: int) -> AppendLine | None:
    """*data* read as the common APPEND line, within the limits; None for anything else."""
    m = _LINE.fullmatch(data)
    if m is None or len(data) - 2 > max_line:
        return None
    tag, atom, quoted, flag_list, date, binary, size = m.groups()
    flags: tuple[bytes, ...] | None = None
    if flag_list is not None:
        flags = tuple(flag_list.split(b" ")) if flag_list else ()
        for flag in flags:
            if flag[:1] == b"\\" and flag.upper() not in SYSTEM_FLAGS:
                return None  # BAD, the long way's
    if date is not None:
        if DATE_TIME.fullmatch(date) is None:
            return None
        if date[1:2] == b"-":  # as the long way relays it
            date = b" " + date
    literal = LiteralSpec(int(size), True, bool(binary))
    if literal.size > max_message:
        return None
    return AppendLine(tag, atom if atom is not None else quoted, flags, date, literal, data[len(tag) + 8:m.start(6)])
