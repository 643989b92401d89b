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

__all__ = ["carry_attributes"]

log = Logger()


async def carry_attributes(src: BackendProtocol, old: str, dst: BackendProtocol, new: str, user: str) -> None:
    """*old*'s ACL entries (but *user*'s own) and METADATA entries on *src*, set on *new* on *dst*."""
    both = src.capabilities & dst.capabilities
    if "ACL" in both:
        for who, rights in await _read(src, b"GETACL " + name_arg(old), "ACL"):
            if who.decode("utf-8", "surrogateescape") != user:
                await _set(dst, b"SETACL " + name_arg(new) + b" " + astring(who) + b" " + astring(rights), new)
    if "METADATA" in both:
        for entry, value in await _read(src, b"GETMETADATA (DEPTH infinity) " + name_arg(old) + b" (/private /shared)",
                                        "METADATA"):
            if b"\0" not in value:  # (one with NUL, which only a literal8 could set, is not carried)
                await _set(dst, b"SETMETADATA " + name_arg(new) + b" (" + astring(entry) + b" " + astring(value) + b")",
                           new)


async def _read(conn: BackendProtocol, command: bytes, kind: str) -> list[tuple[bytes, bytes]]:
    """The (name, value) pairs of the *kind* responses (``* ACL box id rights ...``, ``* METADATA box
    (entry value ...)``) to a read; none if it was refused (no right to read them: nothing to carry)."""
    result = await conn.command(command, bounded=True)
    pairs: list[tuple[bytes, bytes]] = []
    for r in result.responses if result.ok else ():
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
