"""Parse the heads of IMAP server responses, and rewrite their tags.

The proxy relays responses as raw bytes; it only needs to know what kind of
response a line starts (tagged completion, untagged data, continuation), its
status and response code, and to swap the backend's tag for the client's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .command import _TAG, ParseError

__all__ = ["ResponseStart", "parse_response_start", "plain_completion", "plain_untagged", "plain_untagged_lines",
           "replace_tag", "completion_text",
           "tag_references", "replace_tag_references"]


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """What the first fragment of a server response says."""

    kind: str
    """"tagged", "untagged" or "continuation"."""
    tag: bytes | None
    """The tag of a tagged response, else None."""
    status: str | None
    """"OK", "NO", "BAD", "BYE" or "PREAUTH" for status responses, else None."""
    code: str | None
    """Upper-cased response code name, e.g. "TRYCREATE", "REFERRAL"; None without a code."""
    code_args: bytes
    """Bytes after the code name inside [...], stripped (b"" if none)."""
    text: bytes
    """Human text after the code (status responses), or the continuation text."""
    name: str | None
    """Upper-cased name of untagged data: "CAPABILITY", "LIST", "EXISTS", "FETCH"..."""
    number: int | None
    """The leading number of untagged data like "* 5 EXISTS" or "* 3 FETCH ..."."""
    rest: bytes
    """Untagged data bytes after the name and its SP (b"" otherwise)."""


_STATUSES = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})
_TAGGED_STATUSES = frozenset({"OK", "NO", "BAD"})
_WORD = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
_CODE_NAME = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\[\]]+')
_CODE_SPECIALS = re.compile(rb'[\[\]"]')
_QUOTED_TAIL = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)
_SP = 0x20


def _code_end(data: bytes, pos: int) -> int | None:
    """Offset of the "]" closing the response code that starts at pos (after "["), or None."""
    depth = 0
    n = len(data)
    while pos < n:
        m = _CODE_SPECIALS.search(data, pos)
        if m is None:
            return None
        c = m.group()
        pos = m.end()
        if c == b'"':
            q = _QUOTED_TAIL.match(data, pos)
            if q is None:
                return None
            pos = q.end()
        elif c == b"[":
            depth += 1
        elif depth:
            depth -= 1
        else:
            return m.start()
    return None


def _status(kind: str, tag: bytes | None, status: str, data: bytes, pos: int) -> ResponseStart:
    """A status response whose resp-text starts at pos (just after the status word)."""
    if pos < len(data):
        if data[pos] != _SP:
            raise ParseError("missing space after status")
        pos += 1
    code: str | None = None
    args = b""
    if data[pos : pos + 1] == b"[":
        close = _code_end(data, pos + 1)
        name = _CODE_NAME.match(data, pos + 1)
        # An unterminated or odd "[...": tolerated as plain text, as a relay must be.
        if close is not None and name is not None and name.end() <= close:
            after = name.end()
            if after == close or data[after] == _SP:
                code = name.group().decode("ascii").upper()
                args = data[after:close].strip()
                pos = close + 1
                if data[pos : pos + 1] == b" ":
                    pos += 1
    return ResponseStart(kind, tag, status, code, args, data[pos:], None, None, b"")


# A tagged completion without a response code (``rp7 OK NOOP completed.``), in one match.
_PLAIN_TAGGED = re.compile(rb'([^\x00-\x20\x7f-\xff(){%*"\\+]+) (OK|NO|BAD)(?:\Z| (?!\[))')
_STATUS_NAMES = {b"OK": "OK", b"NO": "NO", b"BAD": "BAD"}


def parse_response_start(data: bytes) -> ResponseStart:
    """Classify the first Line.data of a server response; ParseError on garbage."""
    m = _PLAIN_TAGGED.match(data)
    if m is not None:
        return ResponseStart("tagged", m.group(1), _STATUS_NAMES[m.group(2)], None, b"", data[m.end():], None, None, b"")
    return _parse_response_start(data)


# One whole read that is one tagged completion, CRLF included: a code without "[", "]" or '"' inside,
# or a text that does not begin with "[".
_PLAIN_COMPLETION = re.compile(
    rb'(%s) (OK|NO|BAD)(?: \[(%s)(?: ([^\[\]"\r\n]*))?\](?: ?([^\r\n]*))?| ([^\[\r\n][^\r\n]*))?\r\n'
    % (_TAG.pattern, _CODE_NAME.pattern))


def plain_completion(data: bytes) -> ResponseStart | None:
    """What parse_response_start says of *data* without its CRLF, if *data* is exactly one
    tagged completion line, its response code (if any) without brackets or quotes inside
    (``[APPENDUID 7 12]``); else None (nothing said). A line ending in ``}`` is left to the
    framer, which reads ``{n}`` there as a literal announced."""
    m = _PLAIN_COMPLETION.fullmatch(data)
    if m is None or data.endswith(b"}\r\n"):
        return None
    code = m.group(3)
    if code is None:
        return ResponseStart("tagged", m.group(1), _STATUS_NAMES[m.group(2)], None, b"", m.group(6) or b"", None, None,
                             b"")
    return ResponseStart("tagged", m.group(1), _STATUS_NAMES[m.group(2)], code.decode("ascii").upper(),
                         (m.group(4) or b"").strip(), m.group(5) or b"", None, None, b"")


def _parse_response_start(data: bytes) -> ResponseStart:
    """Every response the one match does not take (and the reference it is tested against)."""
    first = data[:1]
    if first == b"+":
        text = data[2:] if data[1:2] == b" " else data[1:]
        return ResponseStart("continuation", None, None, None, b"", text, None, None, b"")
    if first == b"*":
        if data[1:2] != b" ":
            raise ParseError("missing space after *")
        word = _WORD.match(data, 2)
        if word is None:
            raise ParseError("missing response data")
        value = word.group()
        pos = word.end()
        number: int | None = None
        if value.isdigit():
            number = int(value)
            if data[pos : pos + 1] != b" ":
                raise ParseError("missing name after number")
            word = _WORD.match(data, pos + 1)
            if word is None:
                raise ParseError("missing name after number")
            value = word.group()
            pos = word.end()
        name = value.decode("ascii").upper()
        if number is None and name in _STATUSES:
            return _status("untagged", None, name, data, pos)
        if pos < len(data):
            if data[pos] != _SP:
                raise ParseError("invalid untagged response name")
            pos += 1
        return ResponseStart("untagged", None, None, None, b"", b"", name, number, data[pos:])
    m = _TAG.match(data)
    if m is None:
        raise ParseError("missing tag" if not data else "invalid tag")
    pos = m.end()
    if data[pos : pos + 1] != b" ":
        raise ParseError("missing status")
    word = _WORD.match(data, pos + 1)
    status = word.group().decode("ascii").upper() if word is not None else ""
    if word is None or status not in _TAGGED_STATUSES:
        raise ParseError("invalid status in tagged response")
    return _status("tagged", m.group(), status, data, word.end())


def _plain_untagged_start(end: bytes) -> bytes:
    """The pattern of a plain untagged line's start; *end*: what matches where the line ends."""
    run = rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+(?: |' + end + rb")"
    return (rb"\* (?:[0-9]+ " + run + rb"|(?![0-9]|BYE|CAPABILITY|ESEARCH|OK|NO|BAD|PREAUTH)" + run
            + rb"|(?:OK|NO|BAD)(?:" + end + rb"| (?!\[(?:CAPABILITY|NOUPDATE)[] ])))")


_PLAIN_UNTAGGED = re.compile(_plain_untagged_start(rb"\Z"), re.IGNORECASE)
# Whole lines, each one plain_untagged accepts and ending in CRLF (a bare LF fails), a CR alone inside allowed.
_PLAIN_UNTAGGED_LINES = re.compile(
    rb"(?:" + _plain_untagged_start(rb"(?=\r\n)") + rb"[^\n]*(?<=\r)\n)*", re.IGNORECASE)


def plain_untagged(data: bytes) -> bool:
    """True if the first Line.data of a response is untagged data a relay need not parse:
    it parses, and it is not BYE, PREAUTH, CAPABILITY, ESEARCH (its tag is translated) nor
    a status with a CAPABILITY or NOUPDATE code. (False may still be plain: it is parsed.)"""
    return _PLAIN_UNTAGGED.match(data) is not None


def plain_untagged_lines(data: bytes) -> bool:
    """True if *data* is whole lines, each ending in CRLF (no other LF), each of which
    plain_untagged accepts without its CRLF: one regex match, not one call per line."""
    return _PLAIN_UNTAGGED_LINES.fullmatch(data) is not None


def replace_tag(data: bytes, new_tag: bytes) -> bytes:
    """The tagged line ``data`` with its tag replaced: b"p7 OK done" -> b"A1 OK done"."""
    end = data.find(b" ")
    if end < 0:
        end = len(data)
    if not end or _TAG.fullmatch(data, 0, end) is None:
        raise ParseError("not a tagged line")
    if _TAG.fullmatch(new_tag) is None:
        raise ValueError("invalid tag %r" % (new_tag,))
    return new_tag + data[end:]


def completion_text(start: ResponseStart) -> str:
    """``NO [OVERQUOTA] Quota exceeded``: a status response without its tag, code included."""
    code = ""
    if start.code:
        args = start.code_args.decode("utf-8", "replace")
        code = f"[{start.code}{' ' + args if args else ''}] "
    return f"{start.status} {code}{start.text.decode('utf-8', 'replace')}"


# Where a response names a command's tag inside its data: ESEARCH's correlator (RFC 4731,
# also ESORT, CONTEXT=SEARCH updates, PARTIAL) and the NOUPDATE response code (RFC 5267).
_ESEARCH_TAG = re.compile(rb'\* ESEARCH \(TAG "([^"\\\r\n]*)"', re.IGNORECASE)
_NOUPDATE = re.compile(rb'\[NOUPDATE "([^"\\\r\n]*)"\]', re.IGNORECASE)


def tag_references(data: bytes) -> list[bytes]:
    """The tags a response line names: ``* ESEARCH (TAG "a1") ...`` -> [b"a1"]."""
    m = _ESEARCH_TAG.match(data)
    out = [m.group(1)] if m is not None else []
    out.extend(n.group(1) for n in _NOUPDATE.finditer(data))
    return out


def replace_tag_references(data: bytes, mapping: dict[bytes, bytes]) -> bytes:
    """*data* with every tag it names that *mapping* knows replaced (tags need no escaping)."""
    def swap(m: re.Match[bytes]) -> bytes:
        new = mapping.get(m.group(1))
        if new is None:
            return m.group(0)
        return m.group(0)[:m.start(1) - m.start(0)] + new + m.group(0)[m.end(1) - m.start(0):]

    m = _ESEARCH_TAG.match(data)
    if m is not None:
        data = swap(m) + data[m.end():]
    return _NOUPDATE.sub(swap, data)
