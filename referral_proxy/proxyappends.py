"""Between proxies on one PostgreSQL map: a RENAME waits for the APPENDs already under way to its
mailboxes at the other proxies.

Dovecot 2.3.19 answers an APPEND whose mailbox (or a parent) another session RENAMEs meanwhile
"NO Mailbox was deleted under us" and keeps the message (appendturns.py): the client APPENDs again,
the message is there twice. Within one process, and between a master's workers, appendturns.py
orders them; between proxies an APPEND arriving during a RENAME waits for its reservation
(holds.py), but one already under way when the RENAME began was not waited for (1 run in 7 of
tests/test_append_rename_race.py::test_two_proxies_on_postgresql failed).

No database round trip per APPEND: the RENAME's reservation is the turn. Every proxy's listener,
on reading a journal entry new to it, holds back the change it tells ``listeners`` it has read
(pgstore.py) until this process says so (:func:`confirmer`, in the reactor): at once when no
APPEND of this process to one of the entry's names is under way (new ones meet the reservation
and wait), else once they are answered, the entry is over, or CONFIRM_WAIT has gone (an APPEND
whose client stopped mid-literal: the RENAME gave up before, NO [INUSE] holding nothing). The
RENAME on one backend (localrename.py) waits, after its reservation, until every live proxy has
confirmed, at most RENAME_WAIT seconds, then is refused NO [INUSE]. A proxy cut from the
database stops beating and is not waited for (pgstore.LIVE_SECONDS): nobody hangs on it.

Before confirming a RENAME on one backend of another process, a proxy also holds its own sessions'
connections of that user to that backend (renamehold.hold_for_another) until that entry ends:
Dovecot's RENAME would carry along a uidlist lock one of their commands holds (renamehold.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from .appendturns import APPEND_WAIT
from .journal import Reservation, covers
from .renamehold import REMOTE_HOLD, hold_for_another
from .routing import normalize
from .turns import Release

__all__ = ["APPENDING", "CONFIRM_WAIT", "RENAME_WAIT", "POLL", "confirmer", "others_confirmed"]

log = Logger()

POLL = 0.005  # seconds between looks at the APPENDs under way
SETTLE_SECONDS = 2.0  # pgstore.SETTLE_SECONDS (not imported: psycopg only where it is used)
RENAME_WAIT = APPEND_WAIT - SETTLE_SECONDS  # after begin_move's own settle: ~APPEND_WAIT in all
CONFIRM_WAIT = APPEND_WAIT + 2.0  # later than any RENAME waits: it has given up (and let go) by then
BYE_WAIT, BYE_POLL = 1.0, 0.01  # how long, how often a session in a moving mailbox is looked at before confirming

#: A RENAME refused while an APPEND to its mailboxes stays under way (here or at another proxy).
APPENDING = "NO [INUSE] A message is being appended to this mailbox; try again shortly"

Entries = Sequence[tuple[int, str, Reservation]]


def _under_way(ctx: Any, entries: Entries) -> bool:
    """An APPEND of this process not answered yet to a mailbox one of *entries* holds exclusive."""
    sep = ctx.mailbox_map.separator
    held = [(user, r) for _i, user, r in entries if not r.shared]
    if not held:
        return False
    users = {user for user, _r in held}
    for session in ctx.sessions:
        appends = getattr(session, "appends", None)
        if appends is None or not appends.unanswered or session.user not in users:
            continue
        for cmd in list(appends.unanswered):
            if cmd.held_back:  # held by this process's RENAME, which waits for this confirmation
                continue
            name = normalize(cmd.mailbox.decode("utf-8", "surrogateescape"), sep)
            if any(user == session.user and covers(r, name, sep) for user, r in held):
                return True
    return False


def _still_held(ctx: Any, entries: Entries) -> bool:
    ids = {i for i, _u, _r in entries}
    users = {u for _i, u, _r in entries}
    return any(ids & ctx.mailbox_map.holders(u, [Reservation(None)]) for u in users)


async def _confirm(ctx: Any, store: Any, change: int, entries: Entries, renames: Mapping[int, str]) -> None:
    waited = 0.0
    holds: list[tuple[Entries, Release]] = []
    try:
        # Sessions selected in (or homed on) what the new entries move are told BYE now, before this proxy says it
        # has read them: the move's drain waits for that (settle), and a session IDLE there heard every message
        # drained EXPUNGEd, then BYE at the watch's next tick (probe m6 of stop 61); one in the middle of a command
        # is looked at again until it is between two, for up to BYE_WAIT (probe m7: a client polling NOOPs)
        looked = 0.0
        while ctx.look_at_sessions() and looked < BYE_WAIT:
            await task.deferLater(ctx.reactor, BYE_POLL, lambda: None)
            looked += BYE_POLL
        for entry_id, backend in renames.items():  # another proxy's RENAME on one backend (renamehold.py)
            mine = [e for e in entries if e[0] == entry_id]
            if mine:
                holds.append((mine, await hold_for_another(ctx, backend, mine[0][1])))
        while waited < CONFIRM_WAIT and _under_way(ctx, entries) and _still_held(ctx, entries):
            await task.deferLater(ctx.reactor, POLL, lambda: None)
            waited += POLL
    finally:
        if waited:
            log.info("map change {c} confirmed after {w:.3f} s of APPENDs under way to its new entries' names",
                     c=change, w=waited)
        store.confirm(change)
        for held, release in holds:  # (also those taken before a failure: never held for ever)
            d = defer.ensureDeferred(_release_once_ended(ctx, held, release))
            d.addErrback(lambda f: log.failure("letting go of a hold for another proxy's RENAME", f))


async def _release_once_ended(ctx: Any, entries: Entries, release: Release) -> None:
    """Hold until the other proxy's RENAME entry ends (at most REMOTE_HOLD), then let go."""
    try:
        began = ctx.reactor.seconds()
        while _still_held(ctx, entries):
            if ctx.reactor.seconds() - began >= REMOTE_HOLD:
                log.warn("another proxy's RENAME (journal entry {e}) not over after {s} s; its user's sessions "
                         "here go on", e=entries[0][0], s=REMOTE_HOLD)
                break
            await task.deferLater(ctx.reactor, POLL, lambda: None)
    finally:
        release()


def confirmer(ctx: Any, store: Any) -> Callable[[int, Entries, Mapping[int, str]], None]:
    """The hook pgstore's listener calls (in the reactor) with a change that brought new entries, and
    which of them are RENAMEs on one backend (entry id: that backend)."""

    def new_entries(change: int, entries: Entries, renames: Mapping[int, str]) -> None:
        d = defer.ensureDeferred(_confirm(ctx, store, change, entries, renames))
        d.addErrback(lambda f: log.failure("confirming change {c}", f, c=change))

    return new_entries


async def others_confirmed(store: Any) -> bool:
    """Every live proxy has confirmed this process's last write (its RENAME's reservation), within
    RENAME_WAIT seconds (True at once with a store that has no other proxies)."""
    confirmed = getattr(store, "confirmed", None)
    if confirmed is None:
        return True
    return bool(await confirmed(RENAME_WAIT))
