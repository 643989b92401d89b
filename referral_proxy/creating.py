"""CREATE directly inside a mailbox a move placed: the new mailbox goes with its parent.

Placements are per name: after ``RENAME Projects Work`` across servers or ``move alice Projects b2``,
``Work`` and its children are placed on b2, and a ``CREATE Work/new`` went where the rules (or the default)
send ``Work/new``: the tree split over two servers, its next RENAME refused [CANNOT] (probe v2 of stop 52).
Here such a name is created on its parent's backend, then placed there. Only the direct parent counts (a
grandchild follows its own parent, wherever that lives: probe z1 of stop 53), never INBOX (a move of INBOX
leaves its children where they are, RFC 3501 6.3.5), and not for a referral-aware client (referred where the
rules send it, as before: a placement made for a referral the client may never follow pulled later CREATEs
of the name away from a parent moved back, probe z1). A name already where the rules send it stays there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .backend import BackendProtocol
from .holds import begin_waiting
from .imap.reader import Command
from .imap.response import completion_text
from .journal import InUse, JournalEntry, Reservation
from .listing import command_pieces
from .mailops import exists
from .routing import MailboxMap, Route, normalize

CREATE_OP = "create"  # the journal's op of a CREATE holding its parent (recovery.py)


def kin_route(mailbox_map: MailboxMap, user: str, mailbox: bytes, route: Route) -> Route | None:
    """The route of *mailbox*'s parent when that parent has a placement (not INBOX) and lives elsewhere than
    *route* (the rules' choice for it), and *mailbox* has no placement of its own; else None (as before)."""
    sep = mailbox_map.separator
    name = normalize(mailbox.decode("utf-8", "surrogateescape"), sep)
    parent, found, _ = name.rpartition(sep)
    if not found or not parent or parent == "INBOX":
        return None
    placed = mailbox_map.placements(user)
    backends = placed.get(parent)
    if backends is None or name in placed or backends[0] == route.primary:
        return None
    return Route(backends)


def rename_kin(mailbox_map: MailboxMap, user: str, old: bytes, new: bytes, old_route: Route, new_route: Route
               ) -> Route | None:
    """kin_route of a RENAME's new name, when the RENAME can take it there: across, or on that backend already
    with a placement of its own, which follows it (localrename.py); else None (probes a1, b1 of stop 54: the
    new name went where the rules send it, the tree split, its next RENAME refused [CANNOT])."""
    kin = kin_route(mailbox_map, user, new, new_route)
    if kin is None or kin.primary != old_route.primary:
        return kin
    placed = normalize(old.decode("utf-8", "surrogateescape"), mailbox_map.separator) in mailbox_map.placements(user)
    return kin if placed else None


async def create_with_kin(host: Any, cmd: Command, mailbox: bytes, route: Route,
                          moving: Callable[[bytes], bool], inuse: str) -> None:
    """Created on the parent's backend, then placed there (before the client hears OK); where the rules send it
    when one is there already (that backend answers ALREADYEXISTS, as directly). *host* is the session
    (mailboxes.MailboxHost); *moving*: a name a move holds (answered *inuse*).

    The parent's subtree is reserved, shared, meanwhile (journal op "create", as `map set` reserves its name): a
    move of it cannot begin while the CREATE is on its way (one that did carried the new child aside and back,
    and mail delivered to it then went to that backend's INBOX: probe z2 of stop 53), and one under way refuses
    it (NO [INUSE]). A crash between the CREATE and its placement is recovered: the mailbox there is placed."""
    pool, mailbox_map, user = host.pool, host.mailbox_map, host.user
    assert pool is not None and user is not None
    text = mailbox.decode("utf-8", "surrogateescape")
    conn = await pool.ready_for(route)
    if await exists(conn, text):
        return host.relay.send(conn, cmd.tag, cmd.name, cmd.args)
    parent = text.rpartition(mailbox_map.separator)[0]
    kin = kin_route(mailbox_map, user, mailbox, route)
    if moving(mailbox):
        return host.answer(cmd.tag, "NO " + inuse)
    if kin is None:  # the parent moved meanwhile: where the map sends it now
        return host.relay.send(await pool.ready_for(mailbox_map.lookup(user, text)), cmd.tag, cmd.name, cmd.args)
    try:  # a DELETE (or CREATE) of the parent under way waited out, then routed again below (probe j4 of stop 59)
        entry = await begin_waiting(mailbox_map, user, CREATE_OP, [Reservation(parent, subtree=True, shared=True)],
                                    {"mailbox": text, "backend": kin.primary}, host.ctx.reactor, settle=False)
    except InUse:
        return host.answer(cmd.tag, "NO " + inuse)
    try:
        if kin_route(mailbox_map, user, mailbox, route) != kin:  # a move of the parent ended meanwhile
            await mailbox_map.end_move(entry)
            return host.relay.send(await pool.ready_for(mailbox_map.lookup(user, text)), cmd.tag, cmd.name, cmd.args)
        there = await pool.ready_for(kin)
        text_part, then = command_pieces("CREATE", cmd.args)  # the client's argument (Dovecot refuses some forms)
        result = await there.command(text_part, then=then)
        if result.ok or (result.start.code == "ALREADYEXISTS" and await exists(there, text)):
            await mailbox_map.place(user, text, kin.backends)
    except BaseException:
        if not entry.ended:
            await mailbox_map.disown(entry)  # recovery places what was made
        raise
    await mailbox_map.end_move(entry)
    for r in result.responses:
        host.write_from(there, r.raw)
    host.answer(cmd.tag, completion_text(result.start))


async def reconcile_create(mailbox_map: MailboxMap, entry: JournalEntry, conn: BackendProtocol) -> str:
    """Recovery of a CREATE cut off before its placement: the mailbox made on the parent's backend is placed."""
    name = entry.data.get("mailbox")
    if name is not None and entry.data.get("backend") == conn.name and mailbox_map.lookup(entry.user, name).primary != conn.name \
            and await exists(conn, name):
        await mailbox_map.place(entry.user, name, [conn.name])
        await mailbox_map.end_move(entry)
        return f"placed {name} on {conn.name}, where it was created"
    await mailbox_map.end_move(entry)
    return "released (nothing to place)"
