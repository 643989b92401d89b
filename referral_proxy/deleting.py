"""DELETE of a mailbox with a placement of its own: the placement goes with the mailbox.

A placement says where a mailbox a move (or `map set`) put lives. Kept after the mailbox was deleted, it sent
a later CREATE of the name back to that backend, away from its parent once the parent had moved back: the tree
split, its next RENAME refused [CANNOT] (probe a1 of stop 54). The DELETE holds the name (journal op
"delete") until the placement is gone, so that no CREATE of it, by this session or another, lands on the old
backend in between and then loses its way. A name still there after the DELETE (Dovecot keeps a deleted
parent whose children remain) keeps its placement, as do INBOX and a referral-aware session's names.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from .backend import BackendProtocol
from .holds import begin_waiting
from .imap.reader import Command
from .imap.response import completion_text
from .journal import InUse, JournalEntry, Reservation
from .listing import command_pieces
from .mailops import subtree
from .relocation import seen_within
from .routing import MailboxMap, Route, normalize
from .validity import returns_past_of

log = Logger()

DELETE_OP = "delete"  # the journal's op of a DELETE holding its placed name (recovery.py)
LANDING = 0.25  # seconds a command another proxy relayed before it saw the DELETE's hold is given to land


def placed_itself(mailbox_map: MailboxMap, user: str, mailbox: bytes) -> bool:
    """Whether *mailbox* (not INBOX) has a placement of its own."""
    name = normalize(mailbox.decode("utf-8", "surrogateescape"), mailbox_map.separator)
    return name != "INBOX" and name in mailbox_map.placements(user)


async def delete_placed(host: Any, cmd: Command, mailbox: bytes, route: Route, inuse: str) -> None:
    """The client's DELETE sent to *route* with the name reserved; its placement removed once it is gone
    there. *host* is the session (mailboxes.MailboxHost); *inuse*: the answer while a move holds the name."""
    pool, mailbox_map, user = host.pool, host.mailbox_map, host.user
    assert pool is not None and user is not None
    name = normalize(mailbox.decode("utf-8", "surrogateescape"), mailbox_map.separator)
    try:  # settled: every proxy refuses the name before the DELETE goes (probe b1: a CREATE through another proxy
        # landed between, then unplaced); another DELETE or CREATE of it waited out, as one server runs them one after
        # the other (probe j4 of stop 59: the second of two DELETEs was told "being moved", Dovecot: NONEXISTENT)
        entry = await begin_waiting(mailbox_map, user, DELETE_OP, [Reservation(name, subtree=False)],
                                    {"mailbox": name, "backend": route.primary}, host.ctx.reactor)
    except InUse:
        return host.answer(cmd.tag, "NO " + inuse)
    if (now := mailbox_map.lookup(user, name)).primary != route.primary:  # unplaced meanwhile: where it goes now
        route, entry.data["backend"] = now, now.primary
    try:  # a CREATE another process routed before it saw the hold lands first (probe b1 of stop 54: 1-2 in 25 out of
        ctx, spec = host.ctx, host.ctx.config.map.store or ""  # reach): other workers on SQLite look only now and then
        wait = seen_within(ctx.config.proxy.workers, mailbox_map.store, spec) or (LANDING if spec.startswith("postg") else 0)
        if wait > 0 and placed_itself(mailbox_map, user, mailbox):  # (PostgreSQL: the others have it, a command they
            # sent before may still be on its way); unplaced meanwhile by another DELETE: no placement of ours to land
            # before, and four DELETEs at once waited in a row past holds.WAIT (probe k3 of stop 59: INUSE)
            await task.deferLater(ctx.reactor, wait, lambda: None)
        conn = await pool.ready_for(route)
        # made again where its rules send it once the placement goes: never under its UIDVALIDITY (before the DELETE:
        # a delivery creating it, or recovery after a crash, would not wait for that; probe m7 of stop 61)
        await returns_past_of(conn, name, mailbox_map.rule_route(user, name).primary, pool.fresh)
        text, then = command_pieces("DELETE", cmd.args)  # the client's argument, as it wrote it
        await mailbox_map.fences.proven(entry)  # not if recovery took it over meanwhile (fencing.py)
        result = await conn.command(text, then=then)
    except BaseException:
        await mailbox_map.disown(entry)  # recovery looks
        raise
    for r in result.responses:
        host.write_from(conn, r.raw)
    host.answer(cmd.tag, completion_text(result.start))  # now: Dovecot's BYE after it (the mailbox selected)
    try:  # ... ends this connection: looked at through a new one (its BYE reaches the client, probe b1 of stop 54)
        if result.ok:
            selected = host.selected_mailbox
            was_selected = selected is not None and normalize(selected.decode("utf-8", "surrogateescape"),
                                                              mailbox_map.separator) == name
            there = await pool.fresh(route) if was_selected else conn
            try:
                await _unplace_if_gone(mailbox_map, user, name, there)
            finally:
                if there is not conn:
                    there.logout()
        await mailbox_map.end_move(entry)
    except Exception as e:  # (answered already: nothing more may reach the client)
        log.info("DELETE {name}: its placement left to recovery ({why})", name=name, why=str(e))
        await _let_go(mailbox_map, entry)


async def _let_go(mailbox_map: MailboxMap, entry: JournalEntry) -> None:
    try:
        await mailbox_map.disown(entry)
    except Exception as e:  # the map store gone too: its sweep finds the entry once this process holds it no more
        log.warn("DELETE {name}: entry not released ({why})", name=entry.data.get("mailbox"), why=str(e))


async def _unplace_if_gone(mailbox_map: MailboxMap, user: str, name: str, conn: BackendProtocol) -> bool:
    if mailbox_map.placements(user).get(name, ("",))[0] != conn.name or await subtree(conn, name, mailbox_map.separator):
        return False
    await mailbox_map.unplace(user, name)
    return True


async def reconcile_delete(mailbox_map: MailboxMap, entry: JournalEntry, conn: BackendProtocol) -> str:
    """Recovery of a DELETE cut off before its placement went: removed if the mailbox is gone there."""
    name = entry.data.get("mailbox")
    gone = name is not None and entry.data.get("backend") == conn.name and await _unplace_if_gone(
        mailbox_map, entry.user, name, conn)
    await mailbox_map.end_move(entry)
    return f"unplaced {name}, deleted from {conn.name}" if gone else "released (nothing to unplace)"
