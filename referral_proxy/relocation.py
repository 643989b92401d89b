"""Sessions whose user's home, or whose selected mailbox, a move took to another backend end with a BYE.

A move to another server ends, at its source, the sessions that had a mailbox it renames
selected (Dovecot: ``* BYE IMAP session state is inconsistent``). INBOX is never renamed: a
session IDLE in the old INBOX saw its messages expunged and then nothing, ever (new mail goes
to the new home), and the session's home -- where LIST, NAMESPACE and referrals are decided --
stayed the old one. So, as Dovecot's director kicks a user it moves, every process serving
sessions looks at them once a second after the map changed: a session whose home or selected
mailbox now lives on another backend gets ``* BYE`` and is closed, once it is between commands
or IDLE (a command under way is waited for); its client logs in again, to the new place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from .routing import MailboxMap

__all__ = ["RelocationWatch", "CHECK_SECONDS", "BYE"]

log = Logger()

CHECK_SECONDS = 1.0
BYE = b"Your mail moved to another server, please log in again"


def moved(session: Any, mailbox_map: MailboxMap) -> str | None:
    """What of *session* lives elsewhere now ("home", "selected mailbox"), or None."""
    user, home = session.user, session.home
    if user is None or home is None:
        return None
    if home not in mailbox_map.home(user).backends:
        return "home"
    mailbox, where = session.selected_mailbox, session.selected
    if mailbox is not None and where is not None:
        if where not in mailbox_map.lookup(user, mailbox.decode("utf-8", "surrogateescape")).backends:
            return "selected mailbox"
    return None


def between_commands(session: Any) -> bool:
    """Nothing of *session*'s under way but an IDLE: a BYE now cuts no answer in two."""
    idle = session.idle.current
    if idle is not None:
        return not idle.done_sent
    return (session.relay.in_flight == 0 and not session.flow.blocked and session.reader.between_commands
            and not session.appends.unanswered)


class RelocationWatch:
    """Once a second: if the map changed, BYE the sessions that :func:`moved` names."""

    def __init__(self, reactor: Any, mailbox_map: MailboxMap, sessions: Iterable[Any]) -> None:
        self.map, self.sessions = mailbox_map, sessions
        self._seen = mailbox_map.changes
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(CHECK_SECONDS, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        changes = self.map.changes
        if changes == self._seen:
            return
        waiting = False
        for session in list(self.sessions):
            what = moved(session, self.map)
            if what is None:
                continue
            if not between_commands(session):
                waiting = True  # looked at again at the next tick
                continue
            log.info("session {id}: {user}'s {what} moved to another server: BYE", id=session.id, user=session.user,
                     what=what)
            session.shutdown(BYE)
        if not waiting:
            self._seen = changes
