"""Argument grammars of commands, checked on parsed tokens, and their canonical encoding.

The proxy never relays a client's raw bytes for an argument: a command is parsed
into tokens (command.parse_arguments), matched against its declared grammar (which
arguments are mailboxes, patterns, sequence sets ...), and written again from the
tokens. So the backend reads exactly the values the proxy routed by, and nothing
after them. A grammar is a line of slots, e.g. ``"seqset dest"`` or
``"mailbox list?"``; ``?`` marks an optional slot, ``*`` zero or more, ``+`` one
or more. Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeGuard

from . import mutf7
from .command import Atom, ParenList, ParseError, String, Token
from .quoting import QUOTED_NAME_MAX

__all__ = ["Slot", "Grammar", "Arguments", "Encoded", "match", "encode", "encode_astring", "encode_quoted", "QUOTED_NAME_MAX",
           "is_sequence_set", "is_astring", "is_mailbox"]


class Slot(Enum):
    """What a top-level argument is."""

    MAILBOX = "mailbox"  # a mailbox the command acts on: routed by it
    DEST = "dest"  # a destination mailbox (COPY, MOVE, RENAME's new name)
    REFERENCE = "reference"  # LIST's reference name
    PATTERN = "pattern"  # a LIST pattern, or a list of them (LIST-EXTENDED)
    SEQSET = "seqset"  # a sequence set, or "$" (SEARCHRES)
    ASTRING = "astring"  # any other string: charset, user, rights, tag ...
    QUOTED = "quoted"  # a quoted string, never a literal nor an atom (CANCELUPDATE's tags, RFC 5267)
    ATOM = "atom"
    LIST = "list"  # a parenthesized list
    ANY = "any"

    __hash__ = object.__hash__  # identity, in C (see flow.Block)


#: Slots whose values the proxy routes by: re-encoded as canonical astrings.
NAMES = frozenset({Slot.MAILBOX, Slot.DEST, Slot.REFERENCE, Slot.PATTERN})


@dataclass(frozen=True)
class Grammar:
    """The arguments of one command, as slots with their repetition."""

    slots: tuple[tuple[Slot, str], ...]
    text: str
    takes_arguments: bool
    names: bool  # some argument is a name (re-encoded as a canonical astring)

    @classmethod
    def parse(cls, text: str) -> Grammar:
        slots = []
        for word in text.split():
            repeat = word[-1] if word[-1] in "?*+" else ""
            slots.append((Slot(word.rstrip("?*+")), repeat))
        return cls(tuple(slots), text, bool(slots), any(s in NAMES for s, _ in slots))

    def has(self, slot: Slot) -> bool:
        return any(s is slot for s, _ in self.slots)


@dataclass(frozen=True, slots=True)
class Arguments:
    """A command's tokens and the slot each top-level token filled."""

    tokens: tuple[Token, ...]
    slots: tuple[Slot, ...]
    text: bytes | None = None  # the client's text, when it is byte for byte the canonical encoding

    def value(self, slot: Slot) -> bytes | None:
        """The value of the first argument in *slot* (an astring), or None."""
        for tok, s in zip(self.tokens, self.slots):
            if s is slot and isinstance(tok, (Atom, String)):
                return tok.value
        return None

    def values(self, slot: Slot) -> list[Token]:
        return [tok for tok, s in zip(self.tokens, self.slots) if s is slot]


# RFC 3501 sequence-set: seq-number = nz-number / "*", a number being 32 bits: "0", "00", "1**" and
# 4294967296 are no sequence set (BAD, as from Dovecot; on main "COPY 0 Shared/X" was referred).
# Leading zeros ("01") are taken, as Dovecot takes them.
_SEQSET = re.compile(rb"\$|(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?(?:,(?:[0-9]+|\*)(?::(?:[0-9]+|\*))?)*")
_NUMBER = re.compile(rb"[0-9]+")
_MAX_NUMBER = 0xFFFFFFFF
_ASTRING_ATOM_BAD = re.compile(rb'[\x00-\x20\x7f-\xff()"]')  # 8-bit: a quoted string or a literal


# Enum members are slow to look up on their class: the slots as module constants.
_ANY, _LIST, _ATOM_SLOT, _SEQSET_SLOT, _PATTERN = Slot.ANY, Slot.LIST, Slot.ATOM, Slot.SEQSET, Slot.PATTERN
_QUOTED, _MAILBOX, _DEST = Slot.QUOTED, Slot.MAILBOX, Slot.DEST


def _fits(tok: Token, slot: Slot) -> bool:
    if slot is _ANY:
        return True
    if slot is _LIST:
        return type(tok) is ParenList
    if slot is _ATOM_SLOT:
        return type(tok) is Atom
    if slot is _SEQSET_SLOT:
        return type(tok) is Atom and is_sequence_set(tok.value)
    if slot is _QUOTED:
        return type(tok) is String and not tok.literal
    if slot is _PATTERN or slot is Slot.REFERENCE:  # (no name Dovecot reads as another: is_mailbox)
        items = tok.items if type(tok) is ParenList else (tok,)
        return all(is_astring(t) and not mutf7.spare_bits_set(t.value) for t in items)
    if slot is _MAILBOX or slot is _DEST:
        return is_mailbox(tok)
    return is_astring(tok)


def is_mailbox(tok: Token) -> TypeGuard[Atom | String]:
    """An astring a backend may be asked about as a mailbox name: none whose modified UTF-7 stands for
    CR or LF (mutf7.shifts_a_line_break: Dovecot would echo it, decoded, in a response), nor one Dovecot
    reads as another spelling of a name (mutf7.spare_bits_set: the map routes by the spelling)."""
    return is_astring(tok) and not mutf7.shifts_a_line_break(tok.value) and not mutf7.spare_bits_set(tok.value)


def is_sequence_set(value: bytes) -> bool:
    """RFC 3501 ``sequence-set`` (every number from 1 to 2^32-1), or ``$`` (RFC 5182 SEARCHRES)."""
    return (_SEQSET.fullmatch(value) is not None
            and all(0 < int(n) <= _MAX_NUMBER for n in _NUMBER.findall(value)))


def is_astring(tok: Token) -> TypeGuard[Atom | String]:
    """An astring argument as the proxy takes one (a name it routes by: APPEND's too)."""
    if isinstance(tok, String):
        # No NUL: RFC 3501 allows none in a literal, and Dovecot acts on a name only up to its first
        # NUL ("Proj<NUL>x" is "Proj"), which the proxy would have routed as another name.
        # Nor a literal8: RFC 3516 gives it to messages (and RFC 5464 to SETMETADATA's values), never to a
        # name (Dovecot: BAD; the proxy ran a SETMETADATA ~{4}Work ...: probe c2 of stop 55).
        return not tok.binary and (not tok.literal or b"\x00" not in tok.value)  # (a quoted string holds none)
    # An atom may not carry what a section "[...]" lets through (spaces, parentheses, quotes).
    return isinstance(tok, Atom) and _ASTRING_ATOM_BAD.search(tok.value) is None


def match(grammar: Grammar, tokens: Sequence[Token], text: bytes | None = None) -> Arguments:
    """The tokens bound to the grammar's slots; ParseError (for ``tag BAD``) if they do not fit.

    *text*: what the tokens were parsed from (no literals). When no argument is a name
    and it is spaced canonically, it IS the canonical encoding (atoms are written as
    they are, a quoted string has one form): encode() then reuses it."""
    kinds: list[Slot] = []
    i, n = 0, len(tokens)
    for slot, repeat in grammar.slots:
        if repeat in ("", "+"):
            if i >= n:
                raise ParseError(f"missing {slot.value} argument")
            if not _fits(tokens[i], slot):
                raise ParseError(f"invalid {slot.value} argument")
            kinds.append(slot)
            i += 1
        if repeat in ("*", "+"):
            if slot is _ANY:  # takes the rest, whatever it is (SEARCH keys, FETCH items)
                kinds.extend([slot] * (n - i))
                i = n
            while i < n and _fits(tokens[i], slot):
                kinds.append(slot)
                i += 1
        elif repeat == "?" and i < n and _fits(tokens[i], slot):
            kinds.append(slot)  # greedy: every optional slot is a list, the slot after it is not
            i += 1
    if i != n:
        raise ParseError("too many arguments" if grammar.slots else "no arguments expected")
    if text is not None and (grammar.names or not _canonical_spacing(text)):
        text = None
    return Arguments(tuple(tokens), tuple(kinds), text)


def _canonical_spacing(text: bytes) -> bool:
    """One space between tokens, none inside parentheses' edges (quoted text may fail it: no harm)."""
    return (b"  " not in text and b"( " not in text and b" )" not in text
            and text[:1] != b" " and text[-1:] != b" ")


@dataclass(frozen=True, slots=True)
class Encoded:
    """A command's arguments as bytes: fragments[i] is followed by literals[i] (each
    announced by the writer, ``{n+}`` or ``{n}``); one more fragment than literals."""

    fragments: tuple[bytes, ...]
    literals: tuple[String, ...]

    @property
    def text(self) -> bytes | None:
        """The whole argument text when there is no literal."""
        return self.fragments[0] if not self.literals else None


_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
_UNQUOTABLE = re.compile(rb"[\r\n\x00]")


def encode_quoted(value: bytes) -> bytes:
    """A quoted string (8-bit bytes kept, as UTF8=ACCEPT allows); value has no CR, LF, NUL."""
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def encode_astring(value: bytes) -> bytes | None:
    """The canonical astring: an atom, else a quoted string of at most QUOTED_NAME_MAX bytes; None
    if it needs a literal."""
    if _ATOM.fullmatch(value) is not None:
        return value
    if _UNQUOTABLE.search(value) is None and value.isascii():
        quoted = encode_quoted(value)
        return quoted if len(quoted) <= QUOTED_NAME_MAX else None
    return None


def encode(args: Arguments) -> Encoded:
    """Write the arguments again from their tokens, canonically: names as astrings,
    atoms as they are (the parser lets no control character or "{" start into one),
    strings quoted or as literals (as the client sent them)."""
    if args.text is not None:  # already canonical (see match)
        return Encoded((args.text,), ())
    tokens = args.tokens
    fragments: list[bytes] = []
    literals: list[String] = []
    out = bytearray()
    for k, (tok, slot) in enumerate(zip(tokens, args.slots)):
        if k:
            out += b" "
        _emit(tok, slot in NAMES, out, fragments, literals)
    fragments.append(bytes(out))
    return Encoded(tuple(fragments), tuple(literals))


def _emit(tok: Token, name: bool, out: bytearray, fragments: list[bytes], literals: list[String]) -> None:
    if type(tok) is Atom and not name:
        out += tok.value
    elif type(tok) is ParenList:
        out += b"("
        for k, item in enumerate(tok.items):
            if k:
                out += b" "
            _emit(item, name, out, fragments, literals)
        out += b")"
    else:
        value = tok.value  # type: ignore[union-attr]
        if name:
            text = encode_astring(value)
        else:
            text = encode_quoted(value) if not tok.literal else None  # type: ignore[union-attr]
        if text is not None:
            out += text
        else:
            fragments.append(bytes(out))
            out.clear()
            literals.append(tok if isinstance(tok, String) and tok.literal else String(value, literal=True))
