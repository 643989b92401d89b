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

import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.logger import Logger

from .backend import BackendProtocol
from .backoff import pauses
from .copystream import Copied, hashes_present
from .imap.uidset import uid_set
from .journal import JournalEntry, LostEntry
from .mailops import exists, expunge_uids, open_mailbox, search_uids, still_there
from .routing import MailboxMap

__all__ = ["record_committed", "take_back_doubled", "MovedAfterAll", "ENDED_WAIT"]

log = Logger()

ENDED_WAIT = 120.0  # seconds the taker is given to end the entry (its search waits transfer.SETTLE, and more)


class MovedAfterAll(LostEntry):
    """Recovery finished the MOVE (its sources gone, the copies kept): the client hears it moved (probe k1 F2: it was
    told NO, then recovery moved it), its COPYUID said before the EXPUNGEs."""


async def record_committed(mailbox_map: MailboxMap, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol,
                           dst_mailbox: str, uids: Sequence[int], copied: Copied, untagged: list[bytes]) -> None:
    """``mailbox_map.record(entry)`` right after the copies committed; LostEntry (raised on) once the copies of
    the sources recovery kept are taken back (none if it never ends the entry within ENDED_WAIT); MovedAfterAll if
    none was kept. *untagged*: the source's untagged responses meanwhile (for the client)."""
    try:
        await mailbox_map.record(entry)
    except LostEntry:
        moved = False
        try:
            moved = await _take_back_late(mailbox_map, entry, src, dst, dst_mailbox, uids, copied, untagged)
        except Exception as e:  # (the LostEntry is the answer's reason either way)
            log.error("MOVE {id}: committed after recovery took it over; taking back the copies of the sources it "
                      "kept failed ({why}): they may be in both mailboxes", id=entry.id, why=str(e))
        if moved:
            raise MovedAfterAll(f"journal entry {entry.id}: finished by recovery") from None
        raise


async def _take_back_late(mailbox_map: MailboxMap, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol,
                          dst_mailbox: str, uids: Sequence[int], copied: Copied, untagged: list[bytes]) -> bool:
    """True: every source was gone (recovery moved them, or a client took them): the copies stay."""
    if not await _ended(mailbox_map, entry.id, dst.clock):
        log.error("MOVE {id}: committed after recovery took it over, which has not ended it in {s:g} s: its "
                  "copies are left to it", id=entry.id, s=ENDED_WAIT)
        return False
    # src: the session's connection, the source selected. Its view may still hold what recovery expunged (a UID
    # SEARCH found all 40 "there": taken back, lost): a NOOP brings it up to date (its EXPUNGEs are the client's)
    said, synced = len(untagged), await src.command(b"NOOP")
    untagged += [r.raw for r in synced.responses]
    if not synced.ok:
        log.error("MOVE {id}: committed after recovery took it over; the source could not be looked at ({why}): its "
                  "copies are left", id=entry.id, why=synced.raw.decode("utf-8", "replace").strip())
        return False
    kept = await still_there(src, list(uids), untagged)
    if not kept:  # RFC 6851: the COPYUID before the EXPUNGEs (the NOOP's)
        untagged.insert(said, b"* OK [COPYUID %d %s %s] Moved\r\n" % (copied.uidvalidity, uid_set(uids), uid_set(copied.uids)))
        return True
    copy_of = dict(zip(uids, copied.uids))
    state = await open_mailbox(dst, dst_mailbox, readonly=False)
    if state.uidvalidity != copied.uidvalidity:
        log.error("MOVE {id}: committed after recovery took it over; {box} was made anew since: {n} copies left",
                  id=entry.id, box=dst_mailbox, n=len(kept))
        return False
    await expunge_uids(dst, [copy_of[u] for u in kept])
    log.warn("MOVE {id}: committed after recovery took it over and kept the sources: {n} copies taken back",
             id=entry.id, n=len(kept))
    return False


async def _ended(mailbox_map: MailboxMap, entry_id: int, clock: Any) -> bool:
    async for _ in pauses(clock, ENDED_WAIT, 0.2, 2.0):
        if all(i != entry_id for i, _owner, _lapsed in await mailbox_map.store.journal_owners()):  # (one small read)
            return True
    return False


async def take_back_doubled(mailbox_map: MailboxMap, entry: JournalEntry, connect: Callable[[str], Awaitable[BackendProtocol]],
                            box: str, validity: int | None, src_uids: Sequence[int], new: str, copied: Copied,
                            lower: int, clock: Any) -> None:
    """A batch of a mailbox move (mover.py: *src_uids* of *box* on the source, UIDVALIDITY *validity*) that committed
    in *new* at the destination (UIDs from *lower*) after recovery took the move over. Recovery found nothing of it:
    it copied those messages again (past the commit point) or rolled back, keeping the sources. Once it has ended
    the entry, each of our copies whose content is in *new* again (a copy of recovery's: from *lower* on, below our
    UIDs) or still in its source is taken back; one with neither stays (recovery found the batch after all, or a client took its
    source). Fresh connections: the move's own are fenced off (fencing.py); their views may be stale besides."""
    try:
        await _take_back_doubled(mailbox_map, entry, connect, box, validity, src_uids, new, copied, lower, clock)
    except Exception as e:  # (the LostEntry is the move's outcome either way)
        log.error("move {id}: a batch committed after recovery took it over; looking for second copies failed "
                  "({why}): some may be in {box} twice", id=entry.id, why=str(e), box=new)


async def _take_back_doubled(mailbox_map: MailboxMap, entry: JournalEntry,
                             connect: Callable[[str], Awaitable[BackendProtocol]], box: str, validity: int | None,
                             src_uids: Sequence[int], new: str, copied: Copied, lower: int, clock: Any) -> None:
    if not await _ended(mailbox_map, entry.id, clock):
        return log.error("move {id}: a batch committed after recovery took it over, which has not ended it in {s:g} s: "
                         "left to it", id=entry.id, s=ENDED_WAIT)
    spare = await _kept_sources(connect, entry.data["src"], box, validity, src_uids)
    dst = await connect(entry.data["dst"])
    try:
        if not await exists(dst, new):
            return  # rolled back, the mailbox deleted: nothing of ours left in it
        if (await open_mailbox(dst, new, readonly=False)).uidvalidity != copied.uidvalidity:
            return log.error("move {id}: {box} was made anew since a batch committed there late: left", id=entry.id, box=new)
        ours = dict(zip(copied.uids, copied.hashes))
        found = {u for u in (await search_uids(dst, b"UID %d:*" % lower))[0] if u >= lower}
        # Recovery's own copies committed before ours (it found none of ours: it copied again), so their UIDs are
        # below ours. One above came after ours: a client's, or one recovery carried after adopting our batch (then
        # ours are the only moved copies: probe k6 of stop 59 took back such a copy, 9 of 9: lost)
        before = {u for u in found.difference(ours) if u < min(ours, default=0)}
        spare.update((await hashes_present(dst, sorted(before))).values())
        doubled = []
        for uid in sorted(found.intersection(ours)):
            if spare[ours[uid]] > 0:
                spare[ours[uid]] -= 1
                doubled.append(uid)
        if doubled:
            await expunge_uids(dst, doubled)
            log.warn("move {id}: a batch committed after recovery took it over: {n} second copies in {box} taken back",
                     id=entry.id, n=len(doubled), box=new)
    finally:
        dst.logout()


async def _kept_sources(connect: Callable[[str], Awaitable[BackendProtocol]], backend: str, box: str,
                        validity: int | None, uids: Sequence[int]) -> collections.Counter[str]:
    """The contents of those of *uids* still in *box* (the same mailbox: *validity*): a roll-back kept them."""
    src = await connect(backend)
    try:
        if not await exists(src, box):
            return collections.Counter()
        if (await open_mailbox(src, box, readonly=True)).uidvalidity != validity:
            return collections.Counter()
        return collections.Counter((await hashes_present(src, list(uids))).values())
    finally:
        src.logout()
