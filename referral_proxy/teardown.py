"""A session that ended with nothing under way is freed by reference counting, not left
to the garbage collector.

A ClientSession and its collaborators refer to each other (``relay.host``, the reader's
and the flow's bound methods, the pool's ``attach`` ...): without help a closed session is
a cycle of ~40 objects that only a collection frees, and every surviving young object
makes collections come sooner and cost more. :func:`unlink` cuts the session's edges to
them once it is gone, but only when nothing can call into it any more (no command in
flight, no task, login, APPEND, IDLE or connection under way, no read gate held): then
no Deferred, timer or backend answer holds a way back into the session. Otherwise the
collector frees it later, as before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["quiet", "ended", "unlink"]

# The session's collaborators: each refers back to the session (or holds its bound methods).
_LINKS = ("relay", "mailboxes", "auth", "appends", "idle", "reader", "flow", "pool", "connect")


def quiet(session: Any) -> bool:
    """Nothing of *session* under way that could call back into it (before its backends
    are logged out: a busy backend connection counts)."""
    pool = session.pool
    return not (session.flow.blocked or session.reader.mid_command or session.relay.in_flight
                or session.appends.unanswered or session.idle.current is not None
                or pool is not None and (pool.busy or pool._waiters or pool._connecting))


def unlink(session: Any) -> None:
    """Cut the edges of an ended, quiet *session* to its collaborators and the flow's own
    cycles: what nothing else holds is freed at once. Called last in connectionLost."""
    flow = session.flow
    flow.out = flow.client_output = None  # each refers back to the flow
    flow.own = None
    flow._write = flow._pump = _nothing  # the transport may still hold client_output: a late resume reaches nothing
    for name in _LINKS:
        setattr(session, name, None)


def _nothing(*_args: Any) -> None:
    pass


def ended(session: Any, quiet: bool) -> None:
    """The end of connectionLost: *session* unlinked if it was :func:`quiet` when it began."""
    if quiet:
        unlink(session)
