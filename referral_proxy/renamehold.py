"""A RENAME on one backend runs while the user's other sessions of this process have no command in
flight there, and sends none there until it is answered.

Dovecot 2.3.19 moves a dovecot-uidlist dotlock along with the directory a RENAME moves: a STATUS,
SELECT or COPY into the mailbox that holds that lock when the RENAME comes leaves it under the new
name, naming an imap process that lives on, which Dovecot never overrides: every sync of the renamed
mailbox then waits the lock timeout (~122 s) and fails NO [SERVERBUG] (tests/dovecot_stale_lock_rename.py,
direct: 4 to 7 of 30 racing rounds by command; soak C 68001, 72556, 75512, 77022). So right before
its RENAME command (after its turns, reservation, checks and the other proxies' confirmations: held no
longer than the command needs), a RENAME on one backend or a move's RENAME aside (appendturns.MoverTurn.quiet)
holds back the next command begun on each of those sessions' connections to its backend (BackendProtocol.hold_writes: it and all written after it
wait, its client's reading paused), then waits for the commands they have in flight to be answered
(at most QUIET_WAIT seconds, then it goes on: a slow command elsewhere is no reason to refuse it; an
IDLE is not waited for, nothing else runs beside it), and lets them go once it is answered. One
RENAME of a user on a backend holds at a time: two would hold each other's RENAME back.

Between proxies (or workers) on one PostgreSQL map, each other proxy's listener reads the RENAME's
journal entry (``rename-local``) as it begins and, before it says so (proxyappends.py: the RENAME waits
for every proxy's word), holds its own sessions' connections of that user to that backend the same way
(:func:`hold_for_another`, at most REMOTE_QUIET for their commands in flight) until the entry ends
(at most REMOTE_HOLD). A connection a RENAME of that proxy runs on is passed by (two proxies renaming
at once would hold each other's); a connection two RENAMEs hold goes on when both let go. The workers
of one master are asked through it (workerholds.py), on any map store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from .turns import Release

__all__ = ["QUIET_WAIT", "REMOTE_QUIET", "REMOTE_HOLD", "HOLD_MAX", "POLL", "RenameHold", "hold_others", "hold_for_another"]

log = Logger()

#: Seconds a RENAME waits for the other sessions' commands in flight before it goes on regardless.
QUIET_WAIT = 10.0
POLL = 0.005  # seconds between looks at what is still in flight
#: Seconds a hold for another proxy's RENAME waits for commands in flight before that proxy is told it
#: may go on (below proxyappends.RENAME_WAIT, after which that RENAME is refused).
REMOTE_QUIET = 3.0
#: Seconds at most a hold for another proxy's RENAME lasts (that proxy died mid-RENAME: its entry stays
#: until recovery; the RENAME itself takes milliseconds).
REMOTE_HOLD = 10.0
#: Seconds after which any hold lets go by itself, its RENAME answered or not: the RENAME takes milliseconds
#: on Dovecot, and a hold kept (a release never reached) held every connection of the user to that backend in
#: the process, new ones too, for good (probe l3 F1: a worker answered none of a user's commands any more).
HOLD_MAX = 120.0


@dataclass(eq=False)  # one hold is itself only: two holding the same connections were equal, and letting go of
class RenameHold:  # one removed the other from ctx.remote_holds, leaving a let-go hold there (probe l3 F1, l6)
    """The RENAME holding one (backend, user) (one at a time): the connections it holds back."""

    conns: set[Any] = field(default_factory=set)
    over: bool = False  # let go: holds nothing more, whatever still finds it

    def add(self, conn: Any) -> None:
        """Hold *conn* back too (one connected while the RENAME waits: BackendPool.add)."""
        if conn not in self.conns and not self.over:
            self.conns.add(conn)
            conn.hold_writes()


def _sessions(ctx: Any, user: str) -> list[Any]:
    return [s for s in getattr(ctx, "sessions", ()) if s.user == user and s.pool is not None]


def _idling_on(session: Any, conn: Any) -> bool:
    idling = getattr(getattr(session, "idle", None), "current", None)
    return idling is not None and idling.conn is conn


async def hold_others(ctx: Any, backend: str, user: str, own: Any = None) -> Release:
    """Hold back the connections to *backend* of *user*'s sessions in *ctx* (but *own*, the one the
    RENAME goes on), once the commands they have in flight are answered (or QUIET_WAIT passed);
    then, in a worker, those of the other workers of its master (workerholds.py)."""
    mine = await _hold_here(ctx, backend, user, own)
    workers = getattr(ctx, "worker_holds", None)
    if workers is None:
        return mine
    try:
        theirs = await workers.hold(backend, user)
    except BaseException:
        mine()
        raise

    def release() -> None:
        theirs()
        mine()

    return release


async def _hold_here(ctx: Any, backend: str, user: str, own: Any) -> Release:
    holds: dict[tuple[str, str], RenameHold] | None = getattr(ctx, "rename_holds", None)
    if holds is None or not _sessions(ctx, user):
        return _nothing
    key = (backend, user)
    # One at a time: two holding each other's RENAME back would wait for ever (soak C 80001: 420 s).
    turn = await ctx.move_turns.take(("HOLD", backend, user))
    hold = holds[key] = RenameHold()

    def forget() -> None:
        if holds.get(key) is hold:
            del holds[key]
        turn()

    return await _quiet(ctx, hold, backend, user, lambda conn: conn is own, QUIET_WAIT, forget)


async def hold_for_another(ctx: Any, backend: str, user: str) -> Release:
    """Another proxy's RENAME on *backend* for *user* (its entry read by this one's listener,
    proxyappends.py): hold back this process's sessions' connections there (not one a RENAME of this
    process runs on: two proxies renaming would hold each other's) once their commands in flight are
    answered (or REMOTE_QUIET passed: that RENAME is refused if not confirmed in time)."""
    if not _sessions(ctx, user):
        return _nothing
    key = (backend, user)
    hold = RenameHold()
    ctx.remote_holds.setdefault(key, []).append(hold)

    def forget() -> None:
        held = ctx.remote_holds.get(key, [])
        if hold in held:
            held.remove(hold)
        if not held:
            ctx.remote_holds.pop(key, None)

    return await _quiet(ctx, hold, backend, user, lambda conn: conn.renaming > 0, REMOTE_QUIET, forget)


async def _quiet(ctx: Any, hold: RenameHold, backend: str, user: str, exempt: Callable[[Any], bool],
                 wait: float, forget: Callable[[], None]) -> Release:
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = hold.over = True
        if bound.active():
            bound.cancel()
        forget()
        for conn in hold.conns:
            conn.release_writes()

    def overdue() -> None:
        log.error("a RENAME's hold of {user}'s connections to {backend} not let go after {s:g} s: let go now",
                  user=user, backend=backend, s=HOLD_MAX)
        release()

    bound = ctx.reactor.callLater(HOLD_MAX, overdue)

    waits: list[tuple[Any, frozenset[bytes]]] = []
    for session in _sessions(ctx, user):
        conn = session.pool.conns.get(backend)
        if conn is None or conn.closed or exempt(conn):
            continue
        hold.add(conn)
        if not _idling_on(session, conn):
            waits.append((conn, conn.tags_in_flight()))
    # (a held command's own answer_timeout runs meanwhile: stall.py must not cut it for the wait)
    limit = min([wait] + [c.config.answer_timeout / 2 for c in hold.conns if c.config.answer_timeout])
    try:
        began = ctx.reactor.seconds()
        while any(not conn.closed and conn.still_in_flight(tags) for conn, tags in waits):
            if ctx.reactor.seconds() - began >= limit:
                log.warn("RENAME on {backend} for {user}: another session's command still in flight after "
                         "{secs} s; renaming regardless", backend=backend, user=user, secs=limit)
                break
            await task.deferLater(ctx.reactor, POLL, lambda: None)
    except BaseException:
        release()
        raise
    return release


def _nothing() -> None:
    """Nothing held (no other session of the user in this process)."""
