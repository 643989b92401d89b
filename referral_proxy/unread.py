"""A session that holds a mailbox's turn others wait for while its client reads nothing: cut off.

A relayed MOVE holds its mailbox's turn until its answer is read from the backend, an APPEND its
mailbox's until it is answered. A client that pipelines such a command behind a big answer and then
stops reading has the proxy stop reading its backend (flow.py), and the backend stop working through
the commands behind: the answer never comes, the turn is held for as long as that client stays
connected, and a RENAME across or the admin move of the mailbox waits, its names NO [INUSE] (round
h41 for the MOVE; probe w3 of stop 52 for the APPEND: 320 s, until Dovecot dropped the connection,
unseen behind the paused transport). A client whose output stays backed up and never once drained
(a slow reader's is, now and then) for STALLED_TURN seconds is cut off, with that backend connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from .backend import BackendProtocol
from .netio import queued_input

__all__ = ["STALLED_TURN", "cut_if_unread"]

log = Logger()

STALLED_TURN = 10.0  # seconds
_LOOK = 1.0  # seconds between looks at the client's output meanwhile


def cut_if_unread(host: Any, conn: BackendProtocol, answered: Callable[[], bool], what: str,
                  stalled: float = 0.0, seen: tuple[int, int] | None = None) -> None:
    """Watch *host*'s client while *answered()* is False (a command on *conn* holding a turn): its output backed
    up, never drained, and nothing more arriving from it either, read or waiting in the kernel (one still
    sending an APPEND's literal, to read after it: probe x2 of stop 52, cut mid-upload) for STALLED_TURN s."""
    if answered() or host.closed:
        return
    output = host.flow.client_output
    now = (output.resumes, host.ctx.observer.read_from(host) + queued_input(getattr(host, "_socket", None)))
    stalled = stalled + _LOOK if seen is not None and output.paused and now == seen else 0.0
    if stalled >= STALLED_TURN:
        log.warn("user {user}: a relayed {what}'s client read nothing for {s:g} s: session ended, its turn freed",
                 user=host.user, what=what, s=stalled)
        conn.transport.abortConnection()
        host.transport.abortConnection()
        return
    host.ctx.reactor.callLater(_LOOK, cut_if_unread, host, conn, answered, what, stalled, now)
