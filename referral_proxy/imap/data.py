"""Untagged server data as values: FETCH, LIST/LSUB, STATUS and SEARCH, and the UIDPLUS codes.

The proxy relays most responses as raw bytes; these parsers are for the responses
its own commands read (moves, verification, recovery). Each takes what follows the
response name -- ``(fragments, literals)`` as the framer delivered them -- and
raises ParseError on anything malformed. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .command import Atom, ParenList, ParseError, String, Token, parse_arguments
from .uidset import expand_uid_set

__all__ = [
    "FetchData",
    "ListData",
    "StatusData",
    "UidCode",
    "parse_fetch",
    "parse_list",
    "parse_status",
    "parse_search",
    "parse_uid_code",
]


def _number(tok: Token | None, what: str) -> int:
    if isinstance(tok, Atom) and tok.value.isdigit():
        return int(tok.value)
    raise ParseError(f"{what}: expected a number")


@dataclass(frozen=True)
class FetchData:
    """The items of one ``* n FETCH (...)``, keyed by upper-cased item name."""

    items: dict[bytes, Token]

    @property
    def uid(self) -> int | None:
        tok = self.items.get(b"UID")
        return None if tok is None else _number(tok, "UID")

    @property
    def flags(self) -> tuple[bytes, ...] | None:
        """FLAGS as sent, without ``\\Recent`` (which no client can set)."""
        tok = self.items.get(b"FLAGS")
        if tok is None:
            return None
        if not isinstance(tok, ParenList):
            raise ParseError("FLAGS: expected a list")
        return tuple(t.value for t in tok.items if isinstance(t, Atom) and t.value.upper() != b"\\RECENT")

    @property
    def internaldate(self) -> bytes | None:
        tok = self.items.get(b"INTERNALDATE")
        if tok is None:
            return None
        if not isinstance(tok, String):
            raise ParseError("INTERNALDATE: expected a string")
        return tok.value

    @property
    def size(self) -> int | None:
        tok = self.items.get(b"RFC822.SIZE")
        return None if tok is None else _number(tok, "RFC822.SIZE")


def parse_fetch(fragments: Sequence[bytes], literals: Sequence[bytes]) -> FetchData:
    """``(UID 7 FLAGS (\\Seen) RFC822.SIZE 3)`` -> FetchData."""
    args = parse_arguments(fragments, literals)
    if len(args) != 1 or not isinstance(args[0], ParenList):
        raise ParseError("malformed FETCH response")
    items = args[0].items
    if len(items) % 2:
        raise ParseError("FETCH items must come in pairs")
    out: dict[bytes, Token] = {}
    for key, value in zip(items[::2], items[1::2]):
        if not isinstance(key, Atom):
            raise ParseError("FETCH item name expected")
        out[key.value.upper()] = value
    return FetchData(out)


@dataclass(frozen=True)
class ListData:
    """One ``* LIST (flags) "/" name`` (or LSUB): the name as the server sent it (modified UTF-7)."""

    flags: tuple[bytes, ...]
    delimiter: bytes | None
    name: bytes

    def has(self, flag: bytes) -> bool:
        """Case-insensitive flag test: ``has(b"\\\\Noselect")``."""
        return flag.upper() in (f.upper() for f in self.flags)

    @property
    def selectable(self) -> bool:
        """A mailbox that exists and can hold messages (not a placeholder parent)."""
        return not (self.has(b"\\Noselect") or self.has(b"\\NonExistent"))


def parse_list(fragments: Sequence[bytes], literals: Sequence[bytes]) -> ListData:
    """The arguments of a LIST/LSUB response (after the name LIST)."""
    args = parse_arguments(fragments, literals)
    if len(args) < 3 or not isinstance(args[0], ParenList):
        raise ParseError("malformed LIST response")
    delim_tok, name_tok = args[1], args[2]
    if isinstance(delim_tok, Atom) and delim_tok.value.upper() == b"NIL":
        delimiter = None
    elif isinstance(delim_tok, String):
        delimiter = delim_tok.value
    else:
        raise ParseError("malformed LIST delimiter")
    if not isinstance(name_tok, (Atom, String)):
        raise ParseError("malformed LIST mailbox name")
    return ListData(tuple(t.value for t in args[0].items if isinstance(t, Atom)), delimiter, name_tok.value)


@dataclass(frozen=True)
class StatusData:
    """``* STATUS name (MESSAGES 3 UIDNEXT 9)``: the values keyed by upper-cased item name."""

    mailbox: bytes
    values: dict[bytes, int]


def parse_status(fragments: Sequence[bytes], literals: Sequence[bytes]) -> StatusData:
    args = parse_arguments(fragments, literals)
    if len(args) != 2 or not isinstance(args[0], (Atom, String)) or not isinstance(args[1], ParenList):
        raise ParseError("malformed STATUS response")
    items = args[1].items
    if len(items) % 2:
        raise ParseError("STATUS items must come in pairs")
    values = {}
    for key, value in zip(items[::2], items[1::2]):
        if not isinstance(key, Atom):
            raise ParseError("STATUS item name expected")
        values[key.value.upper()] = _number(value, key.value.decode("ascii", "replace"))
    return StatusData(args[0].value, values)


def parse_search(rest: bytes) -> list[int]:
    """``2 5 9`` (and CONDSTORE's trailing ``(MODSEQ n)``) -> ``[2, 5, 9]``."""
    head = rest.split(b"(", 1)[0]
    words = head.split()
    if not all(w.isdigit() for w in words):
        raise ParseError("malformed SEARCH response")
    return [int(w) for w in words]


@dataclass(frozen=True)
class UidCode:
    """``[APPENDUID v uids]`` or ``[COPYUID v source-uids dest-uids]`` (RFC 4315)."""

    uidvalidity: int
    source: tuple[int, ...]  # empty for APPENDUID
    uids: tuple[int, ...]  # the new messages' UIDs, in order


def parse_uid_code(code: str | None, args: bytes) -> UidCode:
    words = args.split()
    try:
        if code == "APPENDUID" and len(words) == 2:
            return UidCode(int(words[0]), (), tuple(expand_uid_set(words[1])))
        if code == "COPYUID" and len(words) == 3:
            return UidCode(int(words[0]), tuple(expand_uid_set(words[1])), tuple(expand_uid_set(words[2])))
    except ValueError as e:
        raise ParseError(f"malformed {code}: {e}") from None
    raise ParseError(f"not an APPENDUID or COPYUID code: {code}")
