"""``* OK Hang in there..`` every 15 s of a command the proxy carries out itself, as Dovecot sends.

A COPY, MOVE or RENAME across servers, a staged MULTIAPPEND, a wait for a backend: the client
hears nothing until the answer, which may be minutes away. Clients give up on a silent
connection (Thunderbird after 100 s) and may send the COPY again: the mail twice. Dovecot
sends this line during a long COPY or SEARCH once its client heard nothing for 15 s
(MAIL_STORAGE_STAYALIVE_SECS); the proxy does the same, to authenticated sessions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer

__all__ = ["LINE", "SECONDS", "during"]

LINE = b"* OK Hang in there..\r\n"
SECONDS = 15.0

T = TypeVar("T")


def during(clock: Any, send: Callable[[bytes], None], due: Callable[[], bool], work: defer.Deferred[T]) -> defer.Deferred[T]:
    """*work*, with :data:`LINE` sent every :data:`SECONDS` until it ends (while *due* says so)."""
    call: list[Any] = []

    def tick() -> None:
        if due():
            send(LINE)
        call[0] = clock.callLater(SECONDS, tick)

    def ended(result: T) -> T:
        if call[0].active():
            call[0].cancel()
        return result

    call.append(clock.callLater(SECONDS, tick))
    return work.addBoth(ended)
