"""No RENAME on one backend while an APPEND to one of its mailboxes runs, nor such an APPEND begun
while the RENAME runs.

Dovecot 2.3.19 answers an APPEND whose mailbox (or a parent) another session RENAMEs meanwhile
"NO Mailbox was deleted under us" and yet keeps the message, under the new name (direct, 3 of 400
rounds: tests/dovecot_append_rename_race.py): the client, told NO, APPENDs again, and the message is
there twice. So the proxy's RENAME on one backend (mailboxes.py) takes the turns of its mailboxes (the
one named and its children: turns.py in this process, crossturns.py between a master's workers, under
keys of their own: a MOVE and an APPEND of one mailbox do not wait for each other), then waits for the
APPENDs to them this process has under way (found in the sessions' unanswered APPENDs); an APPEND
that meets such a turn taken waits for it, then is routed again (the RENAME moved its mailbox:
Dovecot's own NO [TRYCREATE] at the old name).

The hot path of every APPEND with no RENAME in the process: one look at the turns (empty); with
workers, also a shared flock held until its answer (another worker's RENAME cannot see its sessions).
Between proxies on one PostgreSQL map (an advisory lock would cost every APPEND a round trip to the
database) an APPEND arriving during another proxy's RENAME waits for it by the RENAME's reservation
(holds.py), and the RENAME waits for those already under way by the other proxies' confirmations
of its reservation (proxyappends.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task

from .crossturns import POLL, _in_order, mailbox_turn, mailbox_turns
from .renamehold import hold_others
from .turns import Release

#: Seconds a RENAME waits for the APPENDs under way to its mailboxes before it is refused NO [INUSE].
APPEND_WAIT = 10.0

__all__ = ["HELD", "Held", "may_begin", "worker_turn", "append_turn", "rename_turns", "nothing", "MoverTurn", "mover_turn"]


class Held:
    """What routing answers for an APPEND to a mailbox a move or a RENAME holds: wait, or NO [INUSE]."""

    __slots__ = ()


HELD = Held()


def nothing() -> None:
    """The release of a turn not taken (a single process: its sessions are looked at instead)."""


def _name(mailbox: bytes, sep: bytes) -> bytes:
    """INBOX in any case is INBOX (routing.normalize, in bytes)."""
    if mailbox[:5].upper() == b"INBOX" and (len(mailbox) == 5 or mailbox[5:6] == sep):
        return b"INBOX" + mailbox[5:]
    return mailbox


def _key(ctx: Any, backend: str, user: str, mailbox: bytes) -> tuple[str, str, str, bytes]:
    """The turn's key: *user* is a session's (canonical already: auth.py)."""
    return ("APPEND", backend, user, _name(mailbox, ctx.mailbox_map.separator.encode()))


def may_begin(ctx: Any, backend: str, user: str, mailbox: bytes) -> bool:
    """No RENAME in this process holds or waits for *mailbox*'s turn: the APPEND may begin (called
    right before it does, in the same pass: a RENAME after that finds it among the unanswered)."""
    states = ctx.move_turns.states
    return not states or _key(ctx, backend, user, mailbox) not in states


def worker_turn(ctx: Any, backend: str, user: str, mailbox: bytes) -> Release | None:
    """With workers, the APPEND's turn between them held (shared) until its answer, or None while
    another worker's RENAME holds it; without workers, nothing to hold."""
    if ctx.worker_turns is None:
        return nothing
    return ctx.worker_turns.try_share(_key(ctx, backend, user, mailbox))  # type: ignore[no-any-return]


async def append_turn(ctx: Any, backend: str, user: str, mailbox: bytes) -> tuple[Release, Release]:
    """Once the RENAMEs before it have had theirs: the turn in this process (to end once the APPEND
    has begun) and the one between workers (to end at its answer)."""
    key = _key(ctx, backend, user, mailbox)
    mine = await ctx.move_turns.share(key)
    if ctx.worker_turns is None:
        return mine, nothing
    try:
        theirs = await ctx.worker_turns.share(key)
    except BaseException:
        mine()
        raise
    return mine, theirs


def _under_way(ctx: Any, backend: str, user: str, names: set[bytes]) -> bool:
    """An APPEND of this process to one of *names* on *backend* not answered yet."""
    sep = ctx.mailbox_map.separator.encode()
    for session in ctx.sessions:
        appends = getattr(session, "appends", None)
        if session.user != user or appends is None:
            continue
        for cmd in list(appends.unanswered):
            if cmd.conn.name == backend and _name(cmd.mailbox, sep) in names:
                return True
    return False


def rename_turns(ctx: Any, backend: str, user: str, mailboxes: Iterable[bytes]) -> defer.Deferred[Release]:
    """A RENAME's: every mailbox's turn exclusive, in one order, then the APPENDs to them under way in
    this process ended (those of other workers hold their turns). At most APPEND_WAIT seconds: an
    APPEND whose client stopped in its literal would hold the RENAME, and every APPEND queued behind
    it, for ever (defer.TimeoutError, nothing held)."""
    turns = defer.Deferred.fromCoroutine(_rename_turns(ctx, backend, user, mailboxes))
    return turns.addTimeout(APPEND_WAIT, ctx.reactor)


async def _rename_turns(ctx: Any, backend: str, user: str, mailboxes: Iterable[bytes]) -> Release:
    sep = ctx.mailbox_map.separator.encode()
    names = {_name(m, sep) for m in mailboxes}
    keys = sorted(("APPEND", backend, user, n) for n in names)
    takes: list[Any] = []
    for key in keys:
        takes.append(lambda key=key: ctx.move_turns.take(key))
        if ctx.worker_turns is not None:
            takes.append(lambda key=key: ctx.worker_turns.take(key))
    release = await _in_order(takes)
    try:
        while _under_way(ctx, backend, user, names):
            await task.deferLater(ctx.reactor, POLL, lambda: None)
    except BaseException:
        release()
        raise
    return release


@dataclass(frozen=True)
class MoverTurn:
    """What a mailbox move (mover.Mover.turn) takes of a source: before its drain's MOVE, a relayed
    MOVE's turn (crossturns.mailbox_turn: one still at Dovecot ends first); before its RENAME aside,
    that of the source and its children and the APPENDs' to them, as a client's RENAME on one backend
    (an APPEND under way was answered "NO Mailbox was deleted under us", soak C seed 75536)."""

    ctx: Any
    user: str

    def __call__(self, backend: str, mailbox: str) -> Awaitable[Release]:
        return mailbox_turn(self.ctx, backend, self.user, mailbox.encode("utf-8", "surrogateescape"))

    async def renaming(self, backend: str, mailboxes: list[str]) -> Release:
        """The turns of *mailboxes* (a source and its children), once the APPENDs under way to them in
        this process are answered: defer.TimeoutError after APPEND_WAIT seconds, nothing held."""
        names = [m.encode("utf-8", "surrogateescape") for m in mailboxes]
        moves = await mailbox_turns(self.ctx, backend, self.user, names)
        try:
            appends = await rename_turns(self.ctx, backend, self.ctx.mailbox_map.canonical(self.user), names)
        except BaseException:
            moves()
            raise

        def release() -> None:
            appends()
            moves()
        return release

    def quiet(self, backend: str, own: Any = None) -> Awaitable[Release]:
        """Right before the RENAME itself: the user's other sessions' connections to *backend* (but
        *own*, the RENAME's) quiet and held back until it is answered (renamehold.py)."""
        return hold_others(self.ctx, backend, self.ctx.mailbox_map.canonical(self.user), own)


def mover_turn(ctx: Any, user: str) -> MoverTurn:
    """A mailbox move's turns in *ctx* (a ProxyContext, or crossturns.Standalone), for *user*."""
    return MoverTurn(ctx, user)
