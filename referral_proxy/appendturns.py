"""An APPEND holds its mailbox's turn shared while it runs; a RENAME on one backend holds exclusive the
turns of the mailboxes it renames (the one named and its children).

Dovecot 2.3.19 answers an APPEND whose mailbox (or a parent) another session RENAMEs meanwhile
"NO Mailbox was deleted under us" and yet keeps the message, under the new name (direct, 3 of 400
rounds: tests/dovecot_append_rename_race.py): the client, told NO, APPENDs again, and the message is
there twice. So the proxy's RENAME on one backend waits for the APPENDs in flight to its mailboxes, and
an APPEND arriving while such a RENAME runs or waits waits for it, then is routed again (the RENAME
moved its mailbox: Dovecot's own NO [TRYCREATE] at the old name).

The turns are those of MOVEs (turns.py in this process, crossturns.py between a master's workers),
under keys of their own (an APPEND and a MOVE out of the same mailbox do not wait for each other).
Not between proxies on one PostgreSQL map: an advisory lock would cost every APPEND a round trip to the
database; there an APPEND arriving during another proxy's RENAME waits for it by the RENAME's
reservation (holds.py), one already under way when the RENAME starts is not waited for.
"""

from __future__ import annotations

from typing import Any

from .crossturns import _in_order
from .routing import normalize
from .turns import Release

__all__ = ["HELD", "Held", "try_append_turn", "append_turn", "rename_turns"]


class Held:
    """What routing answers for an APPEND to a mailbox a move or a RENAME holds: wait, or NO [INUSE]."""

    __slots__ = ()


HELD = Held()


def _key(ctx: Any, backend: str, user: str, mailbox: bytes | str) -> tuple[str, str, str, str]:
    mailbox_map = ctx.mailbox_map
    name = mailbox.decode("utf-8", "surrogateescape") if isinstance(mailbox, bytes) else mailbox
    return ("APPEND", backend, mailbox_map.canonical(user), normalize(name, mailbox_map.separator))


def try_append_turn(ctx: Any, backend: str, user: str, mailbox: bytes) -> Release | None:
    """The APPEND's turn held (shared) at once, or None while a RENAME holds or waits for it (then
    :func:`append_turn`). The hot path: a dict lookup in this process, a flock with workers."""
    key = _key(ctx, backend, user, mailbox)
    mine = ctx.move_turns.try_share(key)
    if mine is None or ctx.worker_turns is None:
        return mine
    theirs = ctx.worker_turns.try_share(key)
    if theirs is None:
        mine()
        return None

    def release() -> None:
        theirs()
        mine()

    return release


async def append_turn(ctx: Any, backend: str, user: str, mailbox: bytes) -> Release:
    """The APPEND's turn, once the RENAMEs before it have had theirs."""
    key = _key(ctx, backend, user, mailbox)
    takes = [lambda: ctx.move_turns.share(key)]
    if ctx.worker_turns is not None:
        takes.append(lambda: ctx.worker_turns.share(key))
    return await _in_order(takes)


async def rename_turns(ctx: Any, backend: str, user: str, mailboxes: list[bytes]) -> Release:
    """A RENAME's: every mailbox's turn exclusive (once the APPENDs to it have ended), in one order."""
    keys = sorted({_key(ctx, backend, user, m) for m in mailboxes})
    takes: list[Any] = []
    for key in keys:
        takes.append(lambda key=key: ctx.move_turns.take(key))
        if ctx.worker_turns is not None:
            takes.append(lambda key=key: ctx.worker_turns.take(key))
    return await _in_order(takes)
