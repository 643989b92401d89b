"""Sessions whose user's home, or whose selected mailbox, a move took to another backend end with a BYE.

A move to another server renames its source mailboxes aside on their backend. Dovecot ends a
session that has one selected at its next command that finds the mailbox gone (``* BYE IMAP
session state is inconsistent``); once another mailbox has that name there, it does not, and
that session's Dovecot process then writes its stale index into it (its log: "Corrupted
transaction log ... indexid changed"; the new mailbox's other users are told "Mailbox was
deleted under us", a move's MULTIAPPEND to it among them). A RENAME across leaves the old name
routed where it was (by the rules), so the placements do not tell: a session whose selected
mailbox a mailbox move's reservations (journal.py) hold ends too, whether or not the move is
still on when the watch looks (MailboxMap.moves_since keeps the entries the process saw begin).

INBOX is never renamed: a session IDLE in the old INBOX saw its messages expunged and then
nothing, ever (new mail goes to the new home), and the session's home -- where LIST, NAMESPACE
and referrals are decided -- stayed the old one. So, as Dovecot's director kicks a user it
moves, every process serving sessions looks at them once a second after the map changed, and
at once when it sees a mailbox move begin: a session whose home or selected mailbox now lives
on another backend, or was taken by such a move, gets ``* BYE`` and is closed, once it is
between commands or IDLE (a command under way is waited for); its client logs in again, to
the new place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from . import peerholds
from .journal import Reservation, covers
from .lastanswers import end_after_answers
from .routing import MailboxMap, normalize
from .staging import ASIDE_PREFIX
from .store import SQLiteStore

__all__ = ["RelocationWatch", "CHECK_SECONDS", "BYE", "seen_within", "seen_by_another_process", "seen_by_then"]

log = Logger()

CHECK_SECONDS = 1.0
# A session to end that is in the middle of a command is looked at again this often (not a tick later: a move's
# drain may EXPUNGE meanwhile, probe m7 of stop 61), for this long; then at each tick
AGAIN_SECONDS, AGAIN_FOR = 0.02, 2.0
BYE = b"Your mail moved to another server, please log in again"


def moved(session: Any, mailbox_map: MailboxMap) -> str | None:
    """What of *session* lives elsewhere now ("home", "selected mailbox", a server a reload gave another
    endpoint: its connection there reaches the old one, probe h3 of stop 58), or None."""
    user, home = session.user, session.home
    if user is None or home is None:
        return None
    if session.pool is not None:
        backends = session.config.backends
        for conn in session.pool.conns.values():
            if (now := backends.get(conn.name)) is not None and now.endpoint != conn.config.endpoint:
                return f"server {conn.name}"
    if home not in mailbox_map.home(user).backends:
        return "home"
    mailbox, where = session.selected_mailbox, session.selected
    if mailbox is not None and where is not None:
        if where not in mailbox_map.lookup(user, mailbox.decode("utf-8", "surrogateescape")).backends:
            return "selected mailbox"
    return None


_ASIDE = ASIDE_PREFIX.decode()


def renames_aside(reservations: tuple[Reservation, ...]) -> bool:
    """A mailbox move's (mover.py), which renames its sources aside: it holds a private aside name."""
    return any(r.name is not None and r.name.startswith(_ASIDE) for r in reservations)


Moves = list[tuple[int, str, tuple[Reservation, ...]]]  # (number, user, reservations): MailboxMap.moves_since


def held_by(session: Any, moves: Moves, mailbox_map: MailboxMap) -> str | None:
    """"selected mailbox" if one of *moves* that began after *session* selected its mailbox holds
    it (one selected since, the new mailbox of a name, or a RENAME's own session's, is not stale)."""
    mailbox, user = session.selected_mailbox, session.user
    if mailbox is None or user is None or not moves:
        return None
    user, sep = mailbox_map.canonical(user), mailbox_map.separator
    name = normalize(mailbox.decode("utf-8", "surrogateescape"), sep)
    since = session.mailboxes.selected_since
    for number, who, reservations in moves:
        if number > since and who == user and any(not r.shared and covers(r, name, sep) and not kept_inbox(r, reservations)
                                                  for r in reservations):
            return "selected mailbox"
    return None


def kept_inbox(r: Reservation, reservations: tuple[Reservation, ...]) -> bool:
    """*r* is INBOX held by a client's ``RENAME INBOX new`` (mover.py: INBOX alone, beside its aside name
    and a new name): RFC 3501 6.3.5 moves INBOX's messages and leaves INBOX where it is, never set aside
    nor given to another backend, so a session with it selected stays, and sees the messages expunged, as
    from Dovecot. An admin ``move user INBOX b`` holds INBOX and its aside name only: the home moves."""
    return r.name == "INBOX" and not r.subtree and any(
        o.name is not None and o.name != "INBOX" and not o.name.startswith(_ASIDE) for o in reservations)


def seen_within(workers: int, store: object, spec: str | None = None) -> float:
    """Seconds a client's RENAME across waits, from its begin, before it sets a source aside (mover.py): the
    other workers on an SQLite map, and the other proxies on the same map file *spec* (peerholds.listening),
    read it only when they look (a lookup, or this watch once a second), so a short move could begin and end
    unseen, and their sessions stay selected in a mailbox set aside, then made anew under its name (Dovecot:
    NO [SERVERBUG], or the connection dropped). PostgreSQL's begin waits for the others to have read it
    (settle); one process alone sees its own moves begin."""
    where = peerholds.map_file(spec) if workers <= 1 else None
    others = workers > 1 or (where is not None and bool(peerholds.listening(where.key, os.getpid())))
    return seen_by_another_process(store) if others else 0.0


def seen_by_another_process(store: object) -> float:
    """Seconds a move run by a process that serves no sessions (the admin ``move``) waits, from its begin,
    before its drain changes a source: on an SQLite map the proxies see it begin only when they look (a
    lookup, or this watch once a second), and a session IDLE in the source, not yet told BYE, heard every
    message drained from it EXPUNGEd (while each is still in the mailbox, on its new backend). PostgreSQL's
    begin waits for the others to have read it (settle)."""
    return CHECK_SECONDS + 0.25 if isinstance(store, SQLiteStore) else 0.0


async def seen_by_then(clock: Any, began_at: float | None, seconds: float) -> None:
    """Wait until *seconds* (seen_within) have passed since a move began at *began_at* (clock's time)."""
    if began_at is None or clock is None:
        return
    left = began_at + seconds - clock.seconds()
    if left > 0:
        await task.deferLater(clock, left, lambda: None)


def between_commands(session: Any) -> bool:
    """Nothing of *session*'s under way but an IDLE: a BYE now cuts no answer in two."""
    idle = session.idle.current
    if idle is not None:
        return not idle.done_sent
    return (session.relay.in_flight == 0 and not session.flow.blocked and session.reader.between_commands
            and not session.appends.unanswered)


class RelocationWatch:
    """Once a second: if the map changed, a mailbox move began or a reload gave a backend another endpoint,
    BYE the sessions that :func:`moved` or :func:`held_by` names."""

    def __init__(self, reactor: Any, mailbox_map: MailboxMap, sessions: Iterable[Any]) -> None:
        self.map, self.sessions = mailbox_map, sessions
        self._seen = mailbox_map.changes
        self._moves_seen, _ = mailbox_map.moves_since(0)
        self._moves: Moves = []  # mailbox moves begun since the last look that waited for nobody
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._reactor, self._soon = reactor, None  # _soon: a look at the reactor's next turn (a move began)
        self._waiting_since: float | None = None  # since when a session to end has been mid-command
        if reactor is not None:
            mailbox_map.on_move_begun = self._look_soon

    def _look_soon(self) -> None:
        """A move began (this process's, or seen in the store): look at the sessions at the reactor's
        next turn, not inside the routing call that saw it, nor up to a second later (the move may
        rename a selected mailbox aside in a fraction of one, and another be made under its name)."""
        if self._loop.running and (self._soon is None or not self._soon.active()):
            self._soon = self._reactor.callLater(0, self.check)

    def start(self) -> None:
        self._loop.start(CHECK_SECONDS, now=False)

    def reloaded(self) -> None:
        """A reload gave a backend another endpoint: a session connected to the old one reads no further command
        and ends (BYE) once what it owes is answered, now, not at the next tick (probe i1 of stop 58: APPENDs
        in the second before it were saved on the old server)."""
        for session in list(self.sessions):
            if (what := moved(session, self.map)) is not None and what.startswith("server "):
                log.info("session {id}: {user}'s {what} has another endpoint: BYE", id=session.id, user=session.user,
                         what=what)
                end_after_answers(session, self._reactor, b"* BYE " + BYE + b"\r\n")

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()

    def check(self) -> bool:
        """Look now; True while a session it must end is in the middle of a command (BYE'd after it)."""
        changes = self.map.changes
        self._moves_seen, began = self.map.moves_since(self._moves_seen)
        self._moves += [m for m in began if renames_aside(m[2])]
        if changes == self._seen and not self._moves:
            return False
        waiting = False
        for session in list(self.sessions):
            what = moved(session, self.map) or held_by(session, self._moves, self.map)
            if what is None:
                continue
            if not between_commands(session):
                waiting = True  # looked at again at the next tick
                continue
            log.info("session {id}: {user}'s {what} moved to another server: BYE", id=session.id, user=session.user,
                     what=what)
            session.shutdown(BYE)
        if not waiting:
            self._seen, self._moves, self._waiting_since = changes, [], None
        elif self._reactor is not None and self._loop.running:
            now = self._reactor.seconds()
            self._waiting_since = now if self._waiting_since is None else self._waiting_since
            if now - self._waiting_since < AGAIN_FOR and (self._soon is None or not self._soon.active()):
                self._soon = self._reactor.callLater(AGAIN_SECONDS, self.check)
        return waiting
