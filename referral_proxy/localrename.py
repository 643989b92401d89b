"""RENAME on the backend that owns both names, journaled only to hold its names; its recovery.

A RENAME on one backend is Dovecot's own (atomic there); the proxy reserves both subtrees
meanwhile (``rename-local``), refuses one that would strand a child (a name the map sends
elsewhere, or a child on another backend: hierarchy.py), and lets placements follow.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .backend import BackendProtocol
from .hierarchy import TAKEN, kept_where_routed, placed_elsewhere, refusal
from .holds import Appending, begin_waiting
from .imap.response import completion_text
from .journal import UNAVAILABLE, InUse, JournalEntry, Reservation, Step, StoreUnavailable
from .mailops import TransferError, exists, name_arg, subtree
from .mover import Connect
from .proxyappends import APPENDING
from .renamecheck import moved_meanwhile
from .routing import MailboxMap, normalize
from .turns import Release
from .validity import returns_past_of

__all__ = ["rename_here", "LocalRename", "reconcile_local"]


#: A child whose new name is taken: Dovecot would answer OK and leave that child behind (soak C 76056).
CHILD_TARGET_TAKEN = "[ALREADYEXISTS] A mailbox under the new name already exists"


async def _child_target_taken(conn: BackendProtocol, old: str, new: str, children: list[str], sep: str) -> bool:
    """A child of *old* whose name under *new* is a mailbox on *conn* already. Dovecot's RENAME renames
    each child's directory and, one failing ("Directory not empty"), leaves it and still says OK."""
    taken = {normalize(n, sep) for n in await subtree(conn, new, sep)}
    return any(normalize(new + child[len(old):], sep) in taken for child in children if not _same_name(child, old, sep))


def _same_name(a: str, b: str, sep: str) -> bool:
    return normalize(a, sep) == normalize(b, sep)


@dataclass(frozen=True)
class LocalRename:
    """What the backend said to a RENAME (its untagged responses raw, its completion without tag)."""

    untagged: tuple[bytes, ...]
    completion: str


def _placements_to_follow(mailbox_map: MailboxMap, user: str, backend: str, old: str, new: str) -> list[list[Any]]:
    """[old name, new name, backends] of each placement of the mailboxes the RENAME takes (those on *backend*):
    journaled before the RENAME, so that a recovery carries out the same list (a kill amid it leaves some
    old names unplaced, which the map then no longer tells apart)."""
    sep, old, new = mailbox_map.separator, normalize(old, mailbox_map.separator), normalize(new, mailbox_map.separator)
    return [[name, new + name[len(old):], list(backends)] for name, backends in mailbox_map.placements(user).items()
            if backends[0] == backend and (name == old or name.startswith(old + sep))]


async def _follow_placements(mailbox_map: MailboxMap, user: str, follow: list[list[Any]]) -> None:
    """The placements of *follow* now belong to the new names: every new one placed before any old one goes
    (a name may be both, renaming into its own parent), so that doing it again finishes it."""
    for _old, name, backends in follow:
        await mailbox_map.place(user, name, backends)
    new = {name for _old, name, _backends in follow}
    for name, _new, _backends in follow:
        if name not in new:
            await mailbox_map.unplace(user, name)


async def _old_names_past(mailbox_map: MailboxMap, user: str, conn: BackendProtocol, follow: list[list[Any]],
                          others: Connect) -> None:
    """An old name whose placement will follow the mailbox routes elsewhere then: made there, never with the
    UIDVALIDITY it has here (before the RENAME: recovery finishing a RENAME cut off would not see to it)."""
    new = {name for _old, name, _backends in follow}
    for old in (old for old, _name, _backends in follow if old not in new):
        await returns_past_of(conn, old, mailbox_map.rule_route(user, old).primary, others)


async def rename_here(mailbox_map: MailboxMap, user: str, conn: BackendProtocol, old: str, new: str,
                      others: Connect, clock: Any = None,
                      quiet: Callable[[], Awaitable[Release]] | None = None) -> LocalRename:
    """RENAME on the backend that owns both names, holding both subtrees meanwhile.

    Refused before anything changes if a child would get a name the map sends to
    another backend (Dovecot renames children along: it would become unreachable), or if
    a child lives on another backend (found over *others*: it would keep its old name). Names
    held for a moment (another's check) are waited for over *clock* (holds.py). Another proxy's
    RENAME does not hold *conn* back meanwhile (renamehold.hold_for_another): from before this one's
    entry exists, so that of two proxies renaming at once, one always goes on."""
    conn.renaming += 1
    try:
        return await _rename_here(mailbox_map, user, conn, old, new, others, clock, quiet)
    finally:
        conn.renaming -= 1


async def _rename_here(mailbox_map: MailboxMap, user: str, conn: BackendProtocol, old: str, new: str,
                       others: Connect, clock: Any, quiet: Callable[[], Awaitable[Release]] | None) -> LocalRename:
    sep = mailbox_map.separator
    inbox = normalize(old, sep) == "INBOX"
    reservations = [Reservation(old, subtree=not inbox), Reservation(new)]
    try:
        entry = await begin_waiting(mailbox_map, user, "rename-local", reservations,
                                    {"backend": conn.name, "old": old, "new": new}, clock, appends=True)
    except Appending:  # another proxy's APPEND to them still under way (proxyappends.py)
        return LocalRename((), APPENDING)
    except InUse:
        return LocalRename((), "NO [INUSE] Mailbox is being moved or renamed by another command; try again shortly")
    except StoreUnavailable:
        return LocalRename((), "NO " + UNAVAILABLE)
    try:
        if conn.name not in (now := await mailbox_map.lookup_now(user, old)).backends:  # a move took it away meanwhile
            await mailbox_map.end_move(entry)  # (RENAME INBOX there would carry an old home's late mail: probe e4)
            return LocalRename((), "NO " + await moved_meanwhile(others, mailbox_map, user, old, now.primary,
                                                                 "[INUSE] Mailbox was moved to another server meanwhile; try again"))
        if not inbox:
            placed = mailbox_map.placements(user)
            try:
                children = await subtree(conn, old, sep)
            except TransferError:
                children = []  # the backend refuses the name itself: its answer to the RENAME says why
            for child in children:
                if mailbox_map.lookup(user, child).primary != conn.name:
                    continue  # a stray copy the map hides: it stays hidden
                target = new + child[len(old):]
                if ((normalize(child, sep) not in placed and mailbox_map.lookup(user, target).primary != conn.name)
                        or placed_elsewhere(mailbox_map, user, target, conn.name)  # (its placement would follow)
                        or await kept_where_routed(mailbox_map, user, target, conn.name, others)):  # (over that one)
                    await mailbox_map.end_move(entry)
                    return LocalRename((), "NO " + TAKEN)
            refused = await refusal(mailbox_map, user, old, conn.name, others)
            if not refused and children and await _child_target_taken(conn, old, new, children, sep):
                refused = "NO " + CHILD_TARGET_TAKEN
            if refused:
                await mailbox_map.end_move(entry)
                return LocalRename((), refused)
        if not inbox:
            entry.data["follow"] = _placements_to_follow(mailbox_map, user, conn.name, old, new)
            await _old_names_past(mailbox_map, user, conn, entry.data["follow"], others)
        await mailbox_map.step(entry, Step.RENAMING)
        release = await quiet() if quiet is not None else None  # the others' commands there (renamehold.py)
        try:
            await mailbox_map.fences.proven(entry)  # not if recovery took it over meanwhile (fencing.py)
            result = await conn.command(b"RENAME " + name_arg(old) + b" " + name_arg(new))
        finally:
            if release is not None:
                release()
        if result.ok and not inbox:
            await _follow_placements(mailbox_map, user, entry.data["follow"])
        await mailbox_map.end_move(entry)
        return LocalRename(tuple(r.raw for r in result.responses), completion_text(result.start))
    except BaseException:
        if not entry.ended:
            if entry.step is Step.RESERVED:
                await mailbox_map.end_move(entry)
            else:
                await mailbox_map.disown(entry)
        raise


async def reconcile_local(mailbox_map: MailboxMap, entry: JournalEntry, conn: BackendProtocol) -> str:
    """Recovery of a RENAME on one backend: placements follow if the backend did rename."""
    data = entry.data
    renamed = not await exists(conn, data["old"]) and await exists(conn, data["new"])
    if renamed and normalize(data["old"], mailbox_map.separator) != "INBOX":
        follow = data.get("follow")  # (none in an entry an older version left: the map is read as it is)
        await _follow_placements(mailbox_map, entry.user, follow if follow is not None else _placements_to_follow(
            mailbox_map, entry.user, data["backend"], data["old"], data["new"]))
    await mailbox_map.end_move(entry)
    return "renamed: placements follow" if renamed else "not renamed: nothing to do"

