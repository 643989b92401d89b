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

from .command import Atom, ParenList, ParseError, String, Token

__all__ = ["Slot", "Grammar", "Arguments", "Encoded", "match", "encode", "encode_astring", "encode_quoted"]


class Slot(Enum):
    """What a top-level argument is."""

    MAILBOX = "mailbox"  # a mailbox the command acts on: routed by it
    DEST = "dest"  # a destination mailbox (COPY, MOVE, RENAME's new name)
    REFERENCE = "reference"  # LIST's reference name
    PATTERN = "pattern"  # a LIST pattern, or a list of them (LIST-EXTENDED)
    SEQSET = "seqset"  # a sequence set, or "$" (SEARCHRES)
    ASTRING = "astring"  # any other string: charset, user, rights, tag ...
    ATOM = "atom"
    LIST = "list"  # a parenthesized list
    ANY = "any"


#: Slots whose values the proxy routes by: re-encoded as canonical astrings.
NAMES = frozenset({Slot.MAILBOX, Slot.DEST, Slot.REFERENCE, Slot.PATTERN})


@dataclass(frozen=True)
class Grammar:
    """The arguments of one command, as slots with their repetition."""

    slots: tuple[tuple[Slot, str], ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Grammar:
        slots = []
        for word in text.split():
            repeat = word[-1] if word[-1] in "?*+" else ""
            slots.append((Slot(word.rstrip("?*+")), repeat))
        return cls(tuple(slots), text)

    @property
    def takes_arguments(self) -> bool:
        return bool(self.slots)

    def has(self, slot: Slot) -> bool:
        return any(s is slot for s, _ in self.slots)


@dataclass(frozen=True, slots=True)
class Arguments:
    """A command's tokens and the slot each top-level token filled."""

    tokens: tuple[Token, ...]
    slots: tuple[Slot, ...]

    def value(self, slot: Slot) -> bytes | None:
        """The value of the first argument in *slot* (an astring), or None."""
        for tok, s in zip(self.tokens, self.slots):
            if s is slot and isinstance(tok, (Atom, String)):
                return tok.value
        return None

    def values(self, slot: Slot) -> list[Token]:
        return [tok for tok, s in zip(self.tokens, self.slots) if s is slot]


_SEQSET = re.compile(rb"\$|[0-9*]+(?::[0-9*]+)?(?:,[0-9*]+(?::[0-9*]+)?)*")
_CTL = re.compile(rb"[\x00-\x1f\x7f]")
_ASTRING_ATOM_BAD = re.compile(rb'[\x00-\x20\x7f()"]')


def _fits(tok: Token, slot: Slot) -> bool:
    if slot is Slot.ANY:
        return True
    if slot is Slot.LIST:
        return isinstance(tok, ParenList)
    if slot is Slot.ATOM:
        return isinstance(tok, Atom)
    if slot is Slot.SEQSET:
        return isinstance(tok, Atom) and _SEQSET.fullmatch(tok.value) is not None
    if slot is Slot.PATTERN and isinstance(tok, ParenList):
        return bool(tok.items) and all(_is_astring(t) for t in tok.items)
    return _is_astring(tok)


def _is_astring(tok: Token) -> bool:
    if isinstance(tok, String):
        return True
    # An atom may not carry what a section "[...]" lets through (spaces, parentheses, quotes).
    return isinstance(tok, Atom) and _ASTRING_ATOM_BAD.search(tok.value) is None


def match(grammar: Grammar, tokens: Sequence[Token]) -> Arguments:
    """The tokens bound to the grammar's slots; ParseError (for ``tag BAD``) if they do not fit."""
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
            while i < n and _fits(tokens[i], slot):
                kinds.append(slot)
                i += 1
        elif repeat == "?" and i < n and _fits(tokens[i], slot):
            kinds.append(slot)  # greedy: every optional slot is a list, the slot after it is not
            i += 1
    if i != n:
        raise ParseError("too many arguments" if grammar.slots else "no arguments expected")
    _check_atoms(tokens)
    return Arguments(tuple(tokens), tuple(kinds))


def _check_atoms(tokens: Sequence[Token]) -> None:
    """Atoms carry no control characters and never start like a literal."""
    stack = [iter(tokens)]
    while stack:
        tok = next(stack[-1], None)
        if tok is None:
            stack.pop()
        elif isinstance(tok, ParenList):
            stack.append(iter(tok.items))
        elif isinstance(tok, Atom) and (tok.value[:1] == b"{" or _CTL.search(tok.value) is not None):
            raise ParseError("invalid atom")


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
    """The canonical astring: an atom, else a quoted string; None if it needs a literal."""
    if _ATOM.fullmatch(value) is not None:
        return value
    if _UNQUOTABLE.search(value) is None and value.isascii():
        return encode_quoted(value)
    return None


def encode(args: Arguments) -> Encoded:
    """Write the arguments again from their tokens, canonically: names as astrings,
    atoms as they are, strings quoted or as literals (as the client sent them)."""
    fragments: list[bytes] = []
    literals: list[String] = []
    out = bytearray()

    def emit(tok: Token, name: bool) -> None:
        if isinstance(tok, Atom) and not name:
            out.extend(tok.value)
        elif isinstance(tok, ParenList):
            out.extend(b"(")
            for k, item in enumerate(tok.items):
                if k:
                    out.extend(b" ")
                emit(item, name)
            out.extend(b")")
        else:
            value = tok.value
            text = encode_astring(value) if name else (
                encode_quoted(value) if isinstance(tok, String) and not tok.literal else None)
            if text is not None:
                out.extend(text)
            else:
                fragments.append(bytes(out))
                out.clear()
                literals.append(tok if isinstance(tok, String) and tok.literal else String(value, literal=True))

    for k, (tok, slot) in enumerate(zip(args.tokens, args.slots)):
        if k:
            out.extend(b" ")
        emit(tok, slot in NAMES)
    fragments.append(bytes(out))
    return Encoded(tuple(fragments), tuple(literals))
