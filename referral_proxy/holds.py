"""Names held only for a moment: waited for, not refused.

A RENAME across whose source does not exist reserves its names, connects, finds nothing and
lets go: a few dozen milliseconds. Another session's RENAME of one of those names met them
held and got ``NO [INUSE]`` (12 of 27 rounds of ``RENAME A Shared/B`` against ``RENAME
Shared/B C``, A absent), where Dovecot alone answers it OK: a client cannot tell that short
hold from a long move. A command that meets names held by operations still at their check
(journal step ``reserved``) or by a RENAME on one backend waits for them, up to WAIT seconds;
a move under way (past its check) is refused at once, as before. It then begins as if it had
come later: every guarantee of the reservations is kept (it holds its names itself before
it reads anything).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import task

from .backoff import pauses
from .journal import InUse, JournalEntry, Reservation, Step, StoreUnavailable
from .proxyappends import APPENDING, others_confirmed
from .routing import MailboxMap

__all__ = ["WAIT", "begin_waiting", "wait_free"]

WAIT = 3.0  # seconds: a check holds its names for milliseconds; past this it is not one
_FIRST, _MOST = 0.005, 0.1


def _brief(entry: JournalEntry) -> bool:
    """A holder that lets go within moments: at its check, or a RENAME on one backend (Dovecot's own)."""
    return entry.step is Step.RESERVED or entry.op == "rename-local"


async def _free(mailbox_map: MailboxMap, user: str, wanted: Sequence[Reservation], clock: Any,
                since: float) -> float | None:
    """The seconds waited in all once no holder of *wanted* is left in this process's view; None
    as soon as one is a move under way, or once WAIT seconds have gone (*since*: already waited)."""
    async for waited in pauses(clock, WAIT, _FIRST, _MOST, since):
        ids = mailbox_map.holders(user, wanted)
        if not ids:
            return waited
        if waited >= WAIT:
            return None
        try:
            entries = {e.id: e for e in await mailbox_map.entries()}
        except StoreUnavailable:
            return None
        if not all(_brief(entries[i]) for i in ids if i in entries):  # (one gone meanwhile: free soon)
            return None
    return None


async def wait_free(mailbox_map: MailboxMap, user: str, names: Sequence[bytes | str], clock: Any) -> bool:
    """True once no operation holds any of *names* (as ``MailboxMap.reserved`` sees them);
    False when a move under way holds one, or after WAIT seconds: ``NO [INUSE]`` then."""
    wanted = [Reservation(n.decode("utf-8", "surrogateescape") if isinstance(n, bytes) else n, subtree=False,
                          shared=True) for n in names]  # shared: only exclusive holders are in its way
    return await _free(mailbox_map, user, wanted, clock, 0.0) is not None


class Appending(InUse):
    """Another proxy's APPEND to a RENAME's names stayed under way (proxyappends.others_confirmed); str():
    the client's answer text."""

    def __str__(self) -> str:
        return APPENDING[3:]


async def begin_waiting(mailbox_map: MailboxMap, user: str, op: str, reservations: Sequence[Reservation],
                        data: dict, clock: Any, *, appends: bool = False, settle: bool = True) -> JournalEntry:
    """``MailboxMap.begin_move``, waiting out holders that let go within moments (InUse after
    WAIT seconds, or at once if a holder is a move under way, or without a clock); *appends* (a RENAME
    across): then until the other proxies' APPENDs under way to those names are answered, else Appending."""
    entry = await _begin_waiting(mailbox_map, user, op, reservations, data, clock, settle)
    if appends and not await others_confirmed(mailbox_map.store):
        await mailbox_map.end_move(entry)
        raise Appending(list(reservations))
    return entry


async def _begin_waiting(mailbox_map: MailboxMap, user: str, op: str, reservations: Sequence[Reservation],
                         data: dict, clock: Any, settle: bool) -> JournalEntry:
    waited = 0.0
    while True:
        try:
            return await mailbox_map.begin_move(user, op, reservations, data, settle=settle)
        except InUse:
            if clock is None or waited >= WAIT:
                raise
            await task.deferLater(clock, _FIRST, lambda: None)  # (a holder this process cannot see yet)
            found = await _free(mailbox_map, user, reservations, clock, waited + _FIRST)
            if found is None:
                raise
            waited = found
