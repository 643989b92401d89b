"""A RENAME's whole hierarchy across backends: its inferior names that live elsewhere, and names under themselves.

RFC 3501 6.3.5: renaming a mailbox renames its inferior hierarchical names. A backend
renames only the children it holds (Dovecot), and a cross-server move carries only the
source backend's; a child the map sends to another backend would keep its old name there,
a silent partial rename. Such a RENAME is refused before anything changes (``ELSEWHERE``);
the client renames or moves that child first. Children are found by LIST of the subtree
on each backend that may own one (names are names, never patterns), keeping only the
names the map routes to that backend (a stray copy the map hides stays hidden).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.logger import Logger

from .backend import BackendProtocol
from .mailops import TransferError, exists, subtree
from .routing import MailboxMap, normalize

__all__ = ["UNDER_ITSELF", "ELSEWHERE", "TAKEN", "under_itself", "placed_elsewhere", "kept_where_routed", "exists_on",
           "members_elsewhere", "refusal"]

UNDER_ITSELF = "Can't rename mailbox under its own child."  # Dovecot's words, to the period (no response code)
ELSEWHERE = "[CANNOT] A mailbox inside lives on another server; rename or move it first"
UNREACHABLE = "[UNAVAILABLE] Server {} could not be asked which mailboxes inside live there; nothing was renamed"
TAKEN = "[CANNOT] A mailbox inside would get a name that lives on another server; rename or move it first"

log = Logger()


def under_itself(old: str, new: str, separator: str) -> bool:
    """Would *new* be inside *old*'s own subtree? (Dovecot refuses it, INBOX included.)"""
    old, new = normalize(old, separator), normalize(new, separator)
    return new.startswith(old + separator)


def placed_elsewhere(mailbox_map: MailboxMap, user: str, name: str, backend: str) -> bool:
    """Is *name* placed (a move put it there) on a backend other than *backend*? A RENAME giving that
    name to a mailbox on *backend* would write its placement over that one: the mailbox there,
    with its mail, then reachable by nobody."""
    placed = mailbox_map.placements(user).get(normalize(name, mailbox_map.separator))
    return placed is not None and placed[0] != backend


async def kept_where_routed(mailbox_map: MailboxMap, user: str, name: str, here: str,
                            connect: Callable[[str], Awaitable[BackendProtocol]]) -> bool:
    """Is *name* a mailbox on the backend the map sends it to now, not *here*? A RENAME giving that name to a
    child on *here* places it there, over that mailbox: hidden, its mail reachable by nobody (probe l7 of stop 60:
    `R/c/f` made on the default backend, `R` placed elsewhere, then a RENAME of a parent with a child `f` to `R/c`)."""
    backend = mailbox_map.lookup(user, name).primary
    return backend != here and await exists_on(connect, backend, name)


async def exists_on(connect: Callable[[str], Awaitable[BackendProtocol]], backend: str, name: str) -> bool:
    """mailops.exists over a connection of its own to *backend*, logged out after."""
    conn = await connect(backend)
    try:
        return await exists(conn, name)
    finally:
        conn.logout()


async def members_elsewhere(mailbox_map: MailboxMap, user: str, old: str, here: str,
                            connect: Callable[[str], Awaitable[BackendProtocol]]) -> list[tuple[str, str]]:
    """(backend, name) of the mailboxes inside *old* that live on a backend other than *here*:
    listed on every backend that may own one (a new connection each), kept only where the map
    routes them to that backend."""
    found = []
    for backend in mailbox_map.backends_under(user, old):
        if backend == here:
            continue
        try:
            conn = await connect(backend)
        except Exception as e:
            log.warn("RENAME of {user}'s {old}: backend {b} unreachable ({why}): refused", user=user, old=old,
                     b=backend, why=str(e))
            raise TransferError(UNREACHABLE.format(backend)) from None
        try:
            names = await subtree(conn, old, mailbox_map.separator)
        except TransferError as e:  # the backend's own words may echo the name: not shown to the client
            log.warn("RENAME of {user}'s {old}: {why}: refused", user=user, old=old, why=str(e))
            raise TransferError(UNREACHABLE.format(backend)) from None
        finally:
            conn.logout()
        found += [(backend, n) for n in names if normalize(n, mailbox_map.separator) != normalize(old, mailbox_map.separator)
                  and mailbox_map.lookup(user, n).primary == backend]
    return found


async def refusal(mailbox_map: MailboxMap, user: str, old: str, here: str,
                  connect: Callable[[str], Awaitable[BackendProtocol]]) -> str | None:
    """The answer (``NO ...``) refusing a RENAME of *old* (on *here*) whose hierarchy is not all
    there, or that cannot be checked (a backend unreachable); None: it may go on. INBOX's
    children never move with it (RFC 3501 6.3.5): it is never refused for them."""
    if normalize(old, mailbox_map.separator) == "INBOX":
        return None
    try:
        elsewhere = await members_elsewhere(mailbox_map, user, old, here, connect)
    except TransferError as e:
        return "NO " + str(e)
    if elsewhere:
        log.info("RENAME of {user}'s {old} refused: {n} mailbox(es) inside live elsewhere, e.g. {name} on {b}",
                 user=user, old=old, n=len(elsewhere), name=elsewhere[0][1], b=elsewhere[0][0])
        return "NO " + ELSEWHERE
    return None
