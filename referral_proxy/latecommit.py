"""A MOVE across whose copies committed after recovery had taken its entry over (probe k1 of stop 59).

Fencing (fencing.py) keeps a stale owner from SENDING; bytes it sent before are beyond it. Cut off from the
destination and the map store after its MULTIAPPEND's last byte (a partition, a stalled imap process holding
it), the owner lost its lease; recovery looked for the copies by content, found none (not committed yet), and
released the entry, the sources kept; then the destination committed: every message in both mailboxes (4 of 4).

The owner learns it from the APPENDUID and the LostEntry of its next journal write. Once the entry has ended
(recovery is done with it), a source still there means recovery kept the sources: the copy of each is taken back.
A source gone means recovery found the copies and finished the move (or a client took it): its copy stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from .backend import BackendProtocol
from .backoff import pauses
from .copystream import Copied
from .journal import JournalEntry, LostEntry
from .mailops import expunge_uids, open_mailbox, still_there
from .routing import MailboxMap

__all__ = ["record_committed", "ENDED_WAIT"]

log = Logger()

ENDED_WAIT = 120.0  # seconds the taker is given to end the entry (its search waits transfer.SETTLE, and more)


async def record_committed(mailbox_map: MailboxMap, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol,
                           dst_mailbox: str, uids: Sequence[int], copied: Copied, untagged: list[bytes]) -> None:
    """``mailbox_map.record(entry)`` right after the copies committed; LostEntry (raised on) once the copies of
    the sources recovery kept are taken back (none if it never ends the entry within ENDED_WAIT). *untagged*: the
    source's untagged responses meanwhile (for the client)."""
    try:
        await mailbox_map.record(entry)
    except LostEntry:
        try:
            await _take_back_late(mailbox_map, entry, src, dst, dst_mailbox, uids, copied, untagged)
        except Exception as e:  # (the LostEntry is the answer's reason either way)
            log.error("MOVE {id}: committed after recovery took it over; taking back the copies of the sources it "
                      "kept failed ({why}): they may be in both mailboxes", id=entry.id, why=str(e))
        raise


async def _take_back_late(mailbox_map: MailboxMap, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol,
                          dst_mailbox: str, uids: Sequence[int], copied: Copied, untagged: list[bytes]) -> None:
    if not await _ended(mailbox_map, entry.id, dst.clock):
        return log.error("MOVE {id}: committed after recovery took it over, which has not ended it in {s:g} s: its "
                         "copies are left to it", id=entry.id, s=ENDED_WAIT)
    # src: the session's connection, the source selected. Its view may still hold what recovery expunged (a UID
    # SEARCH found all 40 "there": taken back, lost): a NOOP brings it up to date (its EXPUNGEs are the client's)
    synced = await src.command(b"NOOP")
    untagged += [r.raw for r in synced.responses]
    if not synced.ok:
        return log.error("MOVE {id}: committed after recovery took it over; the source could not be looked at ({why}): "
                         "its copies are left", id=entry.id, why=synced.raw.decode("utf-8", "replace").strip())
    kept = await still_there(src, list(uids), untagged)
    if not kept:
        return
    copy_of = dict(zip(uids, copied.uids))
    state = await open_mailbox(dst, dst_mailbox, readonly=False)
    if state.uidvalidity != copied.uidvalidity:
        return log.error("MOVE {id}: committed after recovery took it over; {box} was made anew since: {n} copies "
                         "left", id=entry.id, box=dst_mailbox, n=len(kept))
    await expunge_uids(dst, [copy_of[u] for u in kept])
    log.warn("MOVE {id}: committed after recovery took it over and kept the sources: {n} copies taken back",
             id=entry.id, n=len(kept))


async def _ended(mailbox_map: MailboxMap, entry_id: int, clock: Any) -> bool:
    async for _ in pauses(clock, ENDED_WAIT, 0.2, 2.0):
        if all(e.id != entry_id for e in await mailbox_map.entries()):
            return True
    return False
