"""A mailbox moved to another server keeps its ACL and METADATA (RFC 4314, RFC 5464), as a RENAME
on one Dovecot does.

A move makes the destination mailbox anew, with that server's defaults: bob's grant on carol's
Proj and Proj's /private/comment were gone after an OK RENAME Proj Shared/Proj across, and after
`move carol Work b3` (probe 2 of stop 47). Each is read from the source and set on the destination
before the messages go. The user's own entry is not carried: the move itself needs the rights of a
new mailbox there (i, to append). An entry the destination refuses is logged and the move goes on:
the mail comes first.
"""

from __future__ import annotations

from typing import TypeGuard

from twisted.logger import Logger

from .backend import BackendProtocol
from .imap.command import Atom, ParenList, ParseError, String, parse_arguments
from .imap.quoting import astring
from .mailops import name_arg
from .routing import normalize

__all__ = ["carry_attributes"]

log = Logger()


async def carry_attributes(src: BackendProtocol, old: str, dst: BackendProtocol, new: str, user: str) -> None:
    """*old*'s ACL entries (but *user*'s own) and METADATA entries on *src*, set on *new* on *dst*; the
    entries *new* has that *old* has not (Dovecot's ACL plugin gives a new mailbox its parent's) taken
    away. INBOX into INBOX (the home moves) carries the server's entries too (``""``: Dovecot keeps
    them with the user's INBOX)."""
    both = src.capabilities & dst.capabilities
    if "ACL" in both and (entries := await _read(src, b"GETACL " + name_arg(old), "ACL")) is not None:
        wanted = {who for who, _rights in entries}
        mine = user.encode("utf-8", "surrogateescape")
        for who, rights in entries:
            if who != mine:
                await _set(dst, b"SETACL " + name_arg(new) + b" " + astring(who) + b" " + astring(rights), new)
        for who, _rights in await _read(dst, b"GETACL " + name_arg(new), "ACL") or ():
            if who != mine and who not in wanted:  # inherited, or a destination INBOX's own: not the moved one's
                await _set(dst, b"DELETEACL " + name_arg(new) + b" " + astring(who), new)
    if "METADATA" in both:
        pairs = [(name_arg(old) + b" (/private /shared)", name_arg(new), new)]
        if normalize(old) == normalize(new) == "INBOX":  # Dovecot 2.3.19 lists no server entry for a DEPTH:
            pairs.append((b'"" (/private /shared ' + SERVER_ENTRIES + b")", b'""', "(the server's entries)"))
        for there, here, what in pairs:  # (RFC 5464's are asked by name; a vendor's cannot be found)
            asked = b"GETMETADATA (DEPTH infinity) " + there
            for entry, value in await _read(src, asked, "METADATA") or ():
                if b"\0" not in value:  # (one with NUL, which only a literal8 could set, is not carried)
                    await _set(dst, b"SETMETADATA " + here + b" (" + astring(entry) + b" " + _value(value) + b")",
                               what)


SERVER_ENTRIES = b"/private/comment /shared/comment"  # RFC 5464 3.2.1's a user may set


def _value(value: bytes) -> bytes:
    """A METADATA value as a string, never an atom: the atom NIL removes the entry (RFC 5464 4.3), and
    a value "NIL" moved so was gone (probe 7, stop 48)."""
    encoded = astring(value)
    return encoded if encoded[:1] in (b'"', b"{") else b'"' + value + b'"'  # (an atom's bytes need no escape)


async def _read(conn: BackendProtocol, command: bytes, kind: str) -> list[tuple[bytes, bytes]] | None:
    """The (name, value) pairs of the *kind* responses (``* ACL box id rights ...``, ``* METADATA box
    (entry value ...)``) to a read; None if it was refused (no right to read them: nothing known)."""
    result = await conn.command(command, bounded=True)
    if not result.ok:
        return None
    pairs: list[tuple[bytes, bytes]] = []
    for r in result.responses:
        if r.start.name != kind:
            continue
        try:
            args = parse_arguments(*r.arguments)
        except ParseError:
            continue
        listed = kind == "METADATA" and len(args) == 2 and isinstance(args[1], ParenList)
        rest = list(args[1].items) if listed else args[1:]  # type: ignore[union-attr]  # (listed: a ParenList)
        pairs += [(k.value, v.value) for k, v in zip(rest[::2], rest[1::2]) if _string(k) and _string(v)]
    return pairs


def _string(token: object) -> TypeGuard[Atom | String]:
    """An atom or a string, but NIL (an entry that is not there)."""
    return isinstance(token, String) or (isinstance(token, Atom) and token.value.upper() != b"NIL")


async def _set(conn: BackendProtocol, command: bytes, box: str) -> None:
    result = await conn.command(command)
    if not result.ok:
        log.warn("backend {b}: {what} of moved mailbox {box} refused ({why}); the move goes on without it",
                 b=conn.name, what=command.split(b" ", 1)[0].decode(), box=box,
                 why=result.start.text.decode("utf-8", "replace"))
