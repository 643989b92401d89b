"""LIST / LSUB across backends: one mail store out of several partial ones.

Each backend contributes only the mailboxes the map gives to it (a stray copy
elsewhere is hidden, INBOX comes once from home), missing parents are shown as
``\\Noselect`` placeholders, and ``\\HasChildren`` / ``\\HasNoChildren`` are
recomputed over the merged tree. The client's reference and pattern are applied
here, to the merged names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from .imap.command import Atom, ParenList, ParseError, String, parse_arguments
from .imap.quoting import quoted
from .routing import normalize, pattern_matches

__all__ = ["ListEntry", "parse_list_entry", "merge", "select", "format_entry", "add_flag", "is_basic_list"]

_CHILD_FLAGS = {b"\\HASCHILDREN", b"\\HASNOCHILDREN"}


@dataclass(frozen=True)
class ListEntry:
    """One mailbox of a LIST/LSUB answer and the backend it came from."""

    flags: tuple[bytes, ...]
    delimiter: bytes | None
    name: bytes
    backend: str

    @property
    def text(self) -> str:
        return self.name.decode("utf-8", "surrogateescape")


def parse_list_entry(fragments: Sequence[bytes], literals: Sequence[bytes], backend: str) -> ListEntry:
    """The arguments of ``* LIST (flags) "/" name`` (after the name LIST)."""
    args = parse_arguments(fragments, literals)
    if len(args) < 3 or not isinstance(args[0], ParenList):
        raise ParseError("malformed LIST response")
    flags = tuple(t.value for t in args[0].items if isinstance(t, Atom))
    delim_tok, name_tok = args[1], args[2]
    delimiter = None if isinstance(delim_tok, Atom) and delim_tok.value.upper() == b"NIL" else delim_tok.value  # type: ignore[union-attr]
    if not isinstance(name_tok, (Atom, String)):
        raise ParseError("malformed LIST mailbox name")
    return ListEntry(flags, delimiter, name_tok.value, backend)


def merge(
    entries: Iterable[ListEntry],
    owner: Callable[[str], str],
    separator: str,
    *,
    placeholders: bool = True,
) -> list[ListEntry]:
    """Keep each mailbox from its owner only; add missing parents; fix child flags."""
    kept: dict[str, ListEntry] = {}
    for e in entries:
        name = normalize(e.text, separator)
        if owner(name) != e.backend or name in kept:
            continue
        kept[name] = e
    if placeholders:
        sep_b = separator.encode()
        for name in list(kept):
            parts = name.split(separator)
            for i in range(1, len(parts)):
                parent = separator.join(parts[:i])
                if parent and parent not in kept:
                    kept[parent] = ListEntry((b"\\Noselect", b"\\HasChildren"), sep_b, parent.encode("utf-8", "surrogateescape"),
                                             owner(parent))
    names = set(kept)
    merged = []
    for name, e in kept.items():
        if any(f.upper() in _CHILD_FLAGS for f in e.flags):
            has = any(other.startswith(name + separator) for other in names if other != name)
            flags = tuple(f for f in e.flags if f.upper() not in _CHILD_FLAGS)
            e = replace(e, flags=flags + ((b"\\HasChildren",) if has else (b"\\HasNoChildren",)))
        merged.append(e)
    return merged


def select(entries: Iterable[ListEntry], reference: bytes, pattern: bytes, separator: str) -> list[ListEntry]:
    """The entries the client's reference and pattern ask for (RFC 3501 6.3.8)."""
    ref = reference.decode("utf-8", "surrogateescape")
    pat = pattern.decode("utf-8", "surrogateescape")
    out = [e for e in entries if pattern_matches(ref + pat, e.text, separator)]
    return sorted(out, key=lambda e: (normalize(e.text, separator) != "INBOX", e.text))


def format_entry(kind: bytes, entry: ListEntry, extra_flags: tuple[bytes, ...] = ()) -> bytes:
    """``* LIST (flags) "/" name`` with the name quoted, or as a literal when it must be."""
    flags = b" ".join(entry.flags + extra_flags)
    delimiter = quoted(entry.delimiter) if entry.delimiter is not None else b"NIL"
    try:
        name = quoted(entry.name)
    except ValueError:
        name = b"{%d}\r\n" % len(entry.name) + entry.name
    return b"* %s (%s) %s %s\r\n" % (kind, flags, delimiter, name)


def add_flag(raw: bytes, flag: bytes) -> bytes:
    """Insert *flag* into the attribute list of a raw ``* LIST (...)`` response."""
    i = raw.index(b"(") + 1
    return raw[:i] + flag + (b"" if raw[i:i + 1] == b")" else b" ") + raw[i:]


def is_basic_list(args: Sequence[object]) -> bool:
    """``LIST reference pattern`` with two plain strings: what the proxy evaluates itself."""
    return len(args) == 2 and all(isinstance(a, (Atom, String)) for a in args)
