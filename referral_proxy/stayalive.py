"""``* OK Hang in there..`` every 15 s of a command the proxy carries out itself, as Dovecot sends.

A COPY, MOVE or RENAME across servers, a staged MULTIAPPEND, a wait for a backend: the client
hears nothing until the answer, which may be minutes away. Clients give up on a silent
connection (Thunderbird after 100 s) and may send the COPY again: the mail twice. Dovecot
sends this line during a long COPY or SEARCH once its client heard nothing for 15 s
(MAIL_STORAGE_STAYALIVE_SECS); the proxy does the same, to authenticated sessions only.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

from twisted.internet import defer

from .phase import Phase

__all__ = ["LINE", "SECONDS", "during"]

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
