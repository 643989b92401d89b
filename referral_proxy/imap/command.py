"""Parse IMAP command heads (tag and name) and the arguments of collected commands.

The proxy reads the head of every command from its first line fragment to decide
how to handle it, and gathers small commands whole (fragments plus literal
contents) to parse their arguments into :class:`Atom`, :class:`String` and
:class:`ParenList` tokens. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Atom",
    "CommandStart",
    "MAX_DEPTH",
    "ParenList",
    "ParseError",
    "String",
    "Token",
    "astring_value",
    "nil_or_list",
    "parse_arguments",
    "parse_command_start",
    "splice_section_literals",
    "tag_of",
]


class ParseError(ValueError):
    """Malformed protocol data; the message is a short reason for ``tag BAD <reason>``."""


# tag = 1*<any ASTRING-CHAR except "+">: printable ASCII but ( ) { % * " \ + (SP, CTL and
# 8-bit excluded); "]" is allowed, as ASTRING-CHAR = ATOM-CHAR / resp-specials.
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
_NAME = re.compile(rb"[A-Za-z0-9-]+")
_SP = 0x20


@dataclass(frozen=True, slots=True)
class CommandStart:
    """The head of a command line, enough to dispatch it."""

    tag: bytes
    """The client's tag, echoed in the tagged response."""
    name: str
    """Upper-cased command name; "UID FETCH", "UID COPY" etc. for UID commands."""
    rest: bytes
    """Fragment bytes after the name and its single following SP (b"" if none)."""


def tag_of(data: bytes) -> bytes | None:
    """The leading tag if data starts with a tag followed by SP or its end, else None.

    Lets the proxy answer ``tag BAD`` to a line it could not otherwise parse.
    """
    m = _TAG.match(data)
    if m is None:
        return None
    end = m.end()
    if end < len(data) and data[end] != _SP:
        return None
    return m.group()


def _command_name(data: bytes, pos: int, missing: str) -> tuple[str, int]:
    """The upper-cased atom at pos and the offset after its following SP."""
    m = _NAME.match(data, pos)
    if m is None:
        if pos >= len(data) or data[pos] == _SP:
            raise ParseError(missing)
        raise ParseError("invalid command name")
    end = m.end()
    if end < len(data):
        if data[end] != _SP:
            raise ParseError("invalid command name")
        return m.group().decode("ascii").upper(), end + 1
    return m.group().decode("ascii").upper(), end


# The common head, in one match: a tag, an upper-case name (UID and its command), SP or the end.
# Whatever it does not take (lower case, digits or "-" in a name, a bare UID) goes the long way.
_PLAIN_START = re.compile(rb"(%s) ((?:UID )?[A-Z]+)(?: |\Z)" % _TAG.pattern)


def parse_command_start(data: bytes) -> CommandStart:
    """Split the first fragment of a command into tag, name and the rest."""
    m = _PLAIN_START.match(data)
    if m is not None and m.group(2) != b"UID":
        return CommandStart(m.group(1), m.group(2).decode("ascii"), data[m.end():])
    return _parse_command_start(data)


def _parse_command_start(data: bytes) -> CommandStart:
    """Every head the one match does not take (and the reference it is tested against)."""
    m = _TAG.match(data)
    if m is None:
        if not data or data[0] == _SP:
            raise ParseError("missing tag")
        raise ParseError("invalid tag")
    pos = m.end()
    if pos == len(data):
        raise ParseError("missing command name")
    if data[pos] != _SP:
        raise ParseError("invalid character in tag")
    name, pos = _command_name(data, pos + 1, "missing command name")
    if name == "UID":
        sub, pos = _command_name(data, pos, "missing command after UID")
        name = "UID " + sub
    return CommandStart(m.group(), name, data[pos:])


# -- arguments -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Atom:
    """A bare token: NIL, numbers, flags, sequence sets, fetch attributes with [...] sections."""

    value: bytes
    """The token bytes as sent (NIL is the atom b"NIL"; case is preserved)."""


@dataclass(frozen=True, slots=True)
class String:
    """A quoted string or a literal."""

    value: bytes
    """The string contents, unescaped."""
    literal: bool = False
    """True if it was sent as a literal (so may hold any bytes)."""
    binary: bool = False
    """True if it was sent as a literal8 ``~{n}`` (RFC 3516), which may hold NUL."""


@dataclass(frozen=True, slots=True)
class ParenList:
    """A parenthesized list, e.g. flags or fetch attributes."""

    items: tuple[Token, ...]
    """The tokens inside the parentheses, in order."""


Token = Atom | String | ParenList

# An atom-like run stops at SP ( ) DQUOTE and control characters, and at "[" to take a
# section whole; a control character is in no atom (CR, LF, NUL could end a line).
_ATOM_RUN = re.compile(rb'[^ ()"\x00-\x1f\x7f\[]*')
_BRACKETS = re.compile(rb"[\[\]\x00-\x1f\x7f]")
_QUOTED_RUN = re.compile(rb'[^"\\\r\n\x00]*')
_LPAREN, _RPAREN, _DQUOTE, _BACKSLASH, _LBRACKET, _LBRACE = b'()"\\[{'


def _atom_end(frag: bytes, pos: int) -> int:
    """End of the atom-like token at pos; a "[" extends it to the matching "]".

    An unmatched "[" is an ordinary ATOM-CHAR (a mailbox may be named "a[b").
    """
    n = len(frag)
    while True:
        pos = _ATOM_RUN.match(frag, pos).end()  # type: ignore[union-attr]
        if pos >= n or frag[pos] != _LBRACKET:
            return pos
        depth = 0
        for m in _BRACKETS.finditer(frag, pos):
            c = m.group()
            if c == b"[":
                depth += 1
            elif c == b"]":
                depth -= 1
                if not depth:
                    pos = m.end()
                    break
            else:
                pos += 1  # a control character before the "]": the "[" matches nothing
                break
        else:
            pos += 1


def _quoted(frag: bytes, pos: int) -> tuple[bytes, int]:
    """The unescaped quoted string whose opening quote is at pos, and the offset after it."""
    n = len(frag)
    pos += 1
    out = bytearray()
    while True:
        m = _QUOTED_RUN.match(frag, pos)
        out += m.group()  # type: ignore[union-attr]
        pos = m.end()  # type: ignore[union-attr]
        if pos >= n:
            raise ParseError("unterminated quoted string")
        c = frag[pos]
        if c == _DQUOTE:
            return bytes(out), pos + 1
        if c != _BACKSLASH:
            raise ParseError("invalid character in quoted string")
        if pos + 1 >= n or frag[pos + 1] not in b'"\\':
            raise ParseError("invalid escape in quoted string")
        out.append(frag[pos + 1])
        pos += 2


#: Parenthesized lists nested deeper than this are refused (a line of "(((((" must not
#: cost a stack frame per byte in whoever walks the tokens).
MAX_DEPTH = 32


def parse_arguments(fragments: Sequence[bytes], literals: Sequence[bytes], *,
                    binary: Sequence[bool] = ()) -> list[Token]:
    """Tokens of a collected command: fragments[i] is followed by literals[i].

    fragments[0] is CommandStart.rest, then each continuation Line.data;
    len(fragments) must be len(literals) + 1. ``binary[i]`` marks literals[i] as a
    literal8. Lists may nest MAX_DEPTH deep.
    """
    if len(fragments) != len(literals) + 1:
        raise ValueError("need exactly one more fragment than literals")
    stack: list[list[Token]] = [[]]
    # True just after a token: the next one needs a separating SP (or a ")").
    adjacent = False
    last = len(literals)
    for index, frag in enumerate(fragments):
        pos = 0
        n = len(frag)
        while pos < n:
            c = frag[pos]
            if c == _SP:
                pos += 1
                adjacent = False
            elif c == _RPAREN:
                if len(stack) == 1:
                    raise ParseError("unbalanced parentheses")
                items = stack.pop()
                stack[-1].append(ParenList(tuple(items)))
                pos += 1
                adjacent = True
            elif c == _LPAREN:
                if adjacent:
                    raise ParseError("missing space between arguments")
                if len(stack) > MAX_DEPTH:
                    raise ParseError("lists nested too deeply")
                stack.append([])
                pos += 1
            elif c == _DQUOTE:
                if adjacent:
                    raise ParseError("missing space between arguments")
                value, pos = _quoted(frag, pos)
                stack[-1].append(String(value))
                adjacent = True
            else:
                end = _atom_end(frag, pos)
                if end == pos:
                    raise ParseError("invalid character in arguments")
                if c == _LBRACE:  # "{5}" mid-line: never an atom, never a literal
                    raise ParseError("invalid atom")
                if adjacent:
                    raise ParseError("missing space between arguments")
                stack[-1].append(Atom(frag[pos:end]))
                pos = end
                adjacent = True
        if index < last:
            if adjacent:
                raise ParseError("missing space before literal")
            stack[-1].append(String(literals[index], literal=True,
                                    binary=index < len(binary) and binary[index]))
            adjacent = True
    if len(stack) != 1:
        raise ParseError("unbalanced parentheses")
    return stack[0]


# The open end of a FETCH section whose header list a literal continues: ``BODY[HEADER.FIELDS (``
# then header names (atoms or quoted, each followed by SP). A header name (RFC 5322 field-name)
# spliced in must be printable ASCII without ``:``, and without what would end a quoted string,
# a section or a list: ``" \ ( ) [ ] { }``.
_FIELD = rb"[!#-'*-9;-Z^-z|~]+"
_OPEN_SECTION = re.compile(rb'(?i)\[(?:[0-9]+\.)*HEADER\.FIELDS(?:\.NOT)? \((?:(?:%s|"%s") )*' % (_FIELD, _FIELD))
_FIELD_NAME = re.compile(_FIELD)
_SECTION_HEAD = re.compile(rb"(?i)(?:\A|[ (])BODY(?:\.PEEK)?\Z")


def splice_section_literals(fragments: Sequence[bytes], literals: Sequence[bytes],
                            binary: Sequence[bool] = ()) -> tuple[list[bytes], list[bytes], list[bool]]:
    """FETCH arguments with each literal that is a header name inside ``BODY[HEADER.FIELDS (...)]``
    written into the section as a quoted string, so that the section is one atom again.

    Only a plain header name is spliced (no CR, LF or quote can reach the line); any other
    literal is left where it is, for the parser to refuse."""
    out_f: list[bytes] = []
    out_l: list[bytes] = []
    out_b: list[bool] = []
    acc = fragments[0]
    for i, lit in enumerate(literals):
        is_binary = i < len(binary) and binary[i]
        start = acc.rfind(b"[")
        if (not is_binary and start >= 0 and _OPEN_SECTION.fullmatch(acc, start) is not None
                and _SECTION_HEAD.search(acc, 0, start) is not None and _FIELD_NAME.fullmatch(lit) is not None):
            acc += b'"' + lit + b'"' + fragments[i + 1]
            continue
        out_f.append(acc)
        out_l.append(lit)
        out_b.append(is_binary)
        acc = fragments[i + 1]
    out_f.append(acc)
    return out_f, out_l, out_b


def astring_value(tok: Token) -> bytes:
    """The bytes of an astring argument (atom, quoted string or literal)."""
    if isinstance(tok, (Atom, String)):
        return tok.value
    raise ParseError("expected a string")


def nil_or_list(tok: Token) -> bool:
    """A parenthesized list or NIL: what ID's parameters are (RFC 2971)."""
    return isinstance(tok, ParenList) or (isinstance(tok, Atom) and tok.value.upper() == b"NIL")
