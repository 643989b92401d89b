"""``* OK Hang in there..`` every 15 s of a command the proxy carries out itself, as Dovecot sends.

A COPY, MOVE or RENAME across servers, a staged MULTIAPPEND, a wait for a backend: the client
hears nothing until the answer, which may be minutes away. Clients give up on a silent
connection (Thunderbird after 100 s) and may send the COPY again: the mail twice. Dovecot
sends this line during a long COPY or SEARCH once its client heard nothing for 15 s
(MAIL_STORAGE_STAYALIVE_SECS); the proxy does the same, to authenticated sessions only.

:class:`Waiting` sends it too to a session whose relayed commands (IDLE apart) got no answer for
15 s: a backend that stalls. Else a client gone meanwhile was never seen to go (the proxy reads
no more of it, or takes its end of input for a half-close and waits for the answers), and its
session held its place under max_connections_per_user as long as the stall (probe 8, stop 48).
Writing to a closed connection fails, and the session ends.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, TypeVar

from twisted.internet import defer, task
from twisted.logger import Logger

from .phase import Phase

log = Logger()

__all__ = ["LINE", "SECONDS", "Waiting", "during"]

LINE = b"* OK Hang in there..\r\n"
SECONDS = 15.0

T = TypeVar("T")


def during(clock: Any, session: Any, work: defer.Deferred[T]) -> defer.Deferred[T]:
    """*work*, with :data:`LINE` sent to *session* every :data:`SECONDS` until it ends, while the
    session is authenticated. The timer holds the session weakly: a session that ended while a
    command of its own waited is still freed at once (teardown.py), and its timer stops."""
    owner = weakref.ref(session)
    call: list[Any] = []

    def tick() -> None:
        session = owner()
        if not call or session is None or session.phase is Phase.LOGOUT:
            return
        if session.phase is Phase.AUTHENTICATED:
            session.send(LINE)
        call[0] = clock.callLater(SECONDS, tick)

    def ended(result: T) -> T:
        if call[0].active():
            call[0].cancel()
        call.clear()
        return result

    call.append(clock.callLater(SECONDS, tick))
    return work.addBoth(ended)


def _waiting_on(session: Any) -> tuple[int, int, int] | None:
    """What a session waits on, if it waits for a relayed answer: changes when one comes, or anything
    is written to its client (a long FETCH streaming: no line needed)."""
    if session.phase is not Phase.AUTHENTICATED or session.idle.current is not None:
        return None
    relay, unanswered = session.relay, session.appends.unanswered
    if not (relay.in_flight or unanswered):
        return None
    written = session.ctx.observer.written_to(session)
    return relay.answered, sum(map(id, unanswered)), written  # (an APPEND answered, another begun: another sum)


class Waiting:
    """Every :data:`SECONDS`, :data:`LINE` to each session that waited the whole time for a relayed
    answer and heard nothing, between two responses (one of a backend is never cut) and if it reads."""

    def __init__(self, reactor: Any, sessions: Iterable[Any]) -> None:
        self.sessions = sessions
        self._seen: weakref.WeakKeyDictionary[Any, tuple[int, int, int]] = weakref.WeakKeyDictionary()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(SECONDS, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        seen, self._seen = self._seen, weakref.WeakKeyDictionary()
        for session in list(self.sessions):
            try:
                mark = _waiting_on(session)
                if mark is None:
                    continue
                self._seen[session] = mark
                flow = session.flow
                if seen.get(session) == mark and flow.out.between_responses and not flow.output_backed_up:
                    session.send(LINE)
                    a, b, written = mark
                    self._seen[session] = (a, b, written + len(LINE))  # (its own line is not news from the backend)
            except Exception:  # one session's trouble stops neither the others' nor the next look
                log.failure("stayalive: session {id}", id=getattr(session, "id", None))
