"""What LIST, LSUB and STATUS show of the names a mailbox move holds: the old ones before its commit point, the new ones after.

Dovecot's RENAME is atomic: another session sees the old name or the new one, never both,
never neither. A move across backends (mover.py) makes the new mailboxes first, fills them,
commits (Step.COMMITTED), writes the placements one name at a time, and empties and deletes
the old ones last: a LIST by owner alone showed the half-made destination before the commit
point, and the old name (routed by the rules to its old backend, where it is still being
drained) after it. So while a move holds a user's names, the journal says which backend shows
each name the move carries (its ``pairs``): the source's before the commit point, the
destination's after it, and nobody's for a RENAME's new name before it and its old name after.

Subscriptions (LSUB) follow Dovecot, whose RENAME leaves them where they were (RFC 3501 6.3.6:
a subscription is a name, not a mailbox): a RENAME changes nothing there. An admin move (same
name) shows the name from the source until its subscription is carried too (Step.SUBSCRIBED,
right after the commit point; the source is untouched until the placements are written).

Cheap: with no move holding a name of the user (nearly always) nothing is read; while one
does, one read of the journal per command.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from .imap.grammar import Slot
from .imap.reader import Command
from .journal import JournalEntry, Step, StoreUnavailable
from .routing import MailboxMap, Route, normalize

__all__ = ["MoveView", "HIDDEN", "move_view", "status_during_move"]

log = Logger()

HIDDEN = ""  # the backend of a name no backend shows now (no backend is named "")

# Steps before the commit point: what is on the destination may still be rolled back.
_BEFORE = frozenset({Step.RESERVED, Step.PLANNED, Step.CREATING, Step.CREATED, Step.COPYING, Step.COPIED})
_UNSUBSCRIBED = _BEFORE | {Step.COMMITTED}  # the subscriptions of an admin move not yet carried


@dataclass(frozen=True)
class MoveView:
    """Normalized name -> the backend that shows it (HIDDEN: none), for the names moves carry now."""

    shown: dict[str, str] = field(default_factory=dict)

    def owner(self, routed: Callable[[str], str], separator: str) -> Callable[[str], str]:
        """*routed* (a name's owner by the map), but as the moves show their names."""
        if not self.shown:
            return routed
        shown = self.shown

        def owner(name: str) -> str:
            key = normalize(name, separator)
            return shown[key] if key in shown else routed(name)

        return owner

    @property
    def backends(self) -> list[str]:
        """The backends that show a name now (a LIST must ask them, whatever the map routes)."""
        return list(dict.fromkeys(b for b in self.shown.values() if b))


NOTHING = MoveView()


async def move_view(mailbox_map: MailboxMap, user: str, *, subscriptions: bool = False,
                    entries: list[JournalEntry] | None = None) -> MoveView:
    """The view of *user*'s names that mailbox moves carry now (LSUB's with *subscriptions*); *entries*:
    the journal just read by the caller (not read again)."""
    held = mailbox_map.mailbox_moves(user)
    if not held:
        return NOTHING  # no store read: the map's snapshot says no move holds anything of the user's
    if entries is None:
        try:
            entries = await mailbox_map.entries()
        except StoreUnavailable as e:
            log.warn("LIST during a move: the journal is unreachable ({why}); names shown as routed", why=str(e))
            return NOTHING
    shown: dict[str, str] = {}
    for entry in entries:
        if entry.id in held and entry.op == "move" and entry.step is not None:
            _carry(entry, shown, mailbox_map.separator, subscriptions)
    return MoveView(shown)


def _carry(entry: JournalEntry, shown: dict[str, str], sep: str, subscriptions: bool) -> None:
    data = entry.data
    done, subscribed = entry.step not in _BEFORE, entry.step not in _UNSUBSCRIBED
    for o, n in data.get("pairs") or ():
        o, n = normalize(o, sep), normalize(n, sep)
        if o == n:  # an admin move: one name, from the source until its subscription is carried too
            shown[o] = data["dst"] if subscribed else data["src"]
        elif not subscriptions:  # a RENAME: the old name or the new one (INBOX stays: RFC 3501 6.3.5)
            shown[o] = HIDDEN if done and o != "INBOX" else data["src"]
            shown[n] = data["dst"] if done else HIDDEN


_NONEXISTENT = "Mailbox doesn't exist"  # Dovecot's STATUS of a missing name, and the name (no response code)


PLAN_WAIT = 3.0  # seconds a STATUS waits for a move holding its name to know what it carries (holds.WAIT)
_PLAN_POLL = 0.02


async def _planned_view(host: Any, name: str) -> MoveView:
    """move_view, once no move holding *name* is still at its check (step ``reserved``: which names it
    carries not journaled yet). Routed by the map meanwhile, a STATUS of a RENAME's new name reached its
    destination just made, empty: ``MESSAGES 0``, neither before (no such mailbox) nor after (CI, the
    looping client of test_list_during_moves through a second proxy). Past PLAN_WAIT: as routed."""
    mailbox_map, waited = host.mailbox_map, 0.0
    entries = None  # the journal as last read here: move_view need not read it again
    while waited < PLAN_WAIT:
        held = mailbox_map.mailbox_moves(host.user, name)
        if not held:
            break
        try:
            entries = await mailbox_map.entries()
        except StoreUnavailable:
            entries = None
            break
        if not any(e.id in held and e.step is Step.RESERVED for e in entries):
            break
        await task.deferLater(host.ctx.reactor, _PLAN_POLL, lambda: None)
        waited += _PLAN_POLL
        entries = None
    return await move_view(mailbox_map, host.user, entries=entries)


def status_during_move(host: Any, cmd: Command) -> bool:
    """STATUS of a name a mailbox move holds (True: taken), answered as the view shows it, not
    ``NO [INUSE]``: read-only, it changes nothing the move relies on. While the move is at its check
    (its plan not known) it waits for the plan (_planned_view); a name the move holds but does not carry
    is asked where the map routes it."""
    mailbox = cmd.args.value(Slot.MAILBOX)
    if cmd.name != "STATUS" or mailbox is None or host.pool is None or not host.mailbox_map.mailbox_moves(
            host.user, mailbox.decode("utf-8", "surrogateescape")):
        return False  # held by another operation (a RENAME on one backend, a staged APPEND): NO [INUSE]

    async def answer() -> None:
        sep = host.mailbox_map.separator
        name = mailbox.decode("utf-8", "surrogateescape")
        view = await _planned_view(host, name)
        backend = view.shown.get(normalize(name, sep))
        if backend is None:
            backend = host.mailbox_map.lookup(host.user, name).primary
        if backend == HIDDEN:
            host.tagged(cmd.tag, "NO", f"{_NONEXISTENT}: {name}" if name.isprintable() else _NONEXISTENT)
        elif host.mailboxes.refers(route := Route((backend,)), mailbox):  # referral-aware: as STATUS of it is
            host.send(host.mailboxes.refer(cmd, route, mailbox))
        else:
            conn = await host.pool.ready_for(route)
            host.relay.send(conn, cmd.tag, cmd.name, cmd.args)

    host.run(cmd.tag, answer())
    return True
