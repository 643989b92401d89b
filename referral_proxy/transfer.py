"""Moving messages between backends without losing or duplicating one.

Cross-server COPY / MOVE, and every batch of a mailbox move (mover.py), come down
to: fix the source UIDs, read FLAGS / INTERNALDATE / size, then stream each
``BODY.PEEK[]`` literal straight into ONE MULTIAPPEND on the destination (atomic
there), on a connection of the transfer's own, hashing each body (sha256) on its
way through. Before a source message may be removed, its copy is read back from
the destination by the UID APPENDUID gave and must hash the same: verification
by content, never by count. (The streaming itself, and messages holding NUL bytes, which
go as literal8 read by ``BINARY.PEEK[]``: copystream.py.)

A cross-server MOVE is journaled (journal.py: MOVE_APPENDING, MOVE_APPENDED) from
before the destination's commit until the source's expunge, and pins its two
mailboxes, so ``recover`` can finish it after a crash.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from .acrossview import EXPUNGE_ISSUED, NOTHING_NAMED, moved_text
from .backend import BackendError, BackendProtocol, BackendUnavailable, Tagged
from .backoff import pauses
from .copystream import CommitUnknown, Copied, Progress, copy_stream, hash_messages, hashes_present
from .copywait import wait_for_moves
from .imap.uidset import expand_uid_set, uid_set
from .journal import TAKEN_OVER, UNAVAILABLE, InUse, JournalEntry, LostEntry, Reservation, Step, StoreUnavailable
from .latecommit import MovedAfterAll, record_committed
from .mailops import (
    TRYCREATE,
    MailboxGone,
    MessageInfo,
    TransferError,
    Vanished,
    exists,
    expunge_uids,
    fetch_infos,
    may_expunge,
    named_uids,
    open_mailbox,
    refused_target,
    run_ok,
    same_mailbox,
    search_uids,
    status,
    still_there,
)
from .marking import MARK_TRIES, fetched_flags, flag_key, mark_deleted
from .routing import MailboxMap, normalize

__all__ = ["TransferError", "MessageInfo", "Copied", "Progress", "copy_stream", "hash_messages", "verify_copies",
           "find_copies", "hashes_present", "copy_across", "CopyOutcome", "CommitUnknown", "flag_key", "flags_of", "carry_flags",
           "flag_changes", "flags_text"]

log = Logger()


async def verify_copies(dst: BackendProtocol, mailbox: str, copied: Copied) -> None:
    """The destination holds, under the UIDs APPENDUID gave, exactly the bodies that were sent."""
    state = await open_mailbox(dst, mailbox, readonly=True)
    if state.uidvalidity != copied.uidvalidity:
        raise TransferError(f"verification failed on {dst.name}: the mailbox changed (UIDVALIDITY)")
    found = await hash_messages(dst, copied.uids)
    bad = [u for u, a, b in zip(copied.uids, found, copied.hashes) if a != b]
    if bad:
        raise TransferError(f"verification failed on {dst.name}: message UID {bad[0]} differs from its source")


async def find_copies(dst: BackendProtocol, mailbox: str, uidvalidity: int, uidnext: int,
                      hashes: Sequence[str], *, clock: Any = None) -> dict[int, int]:
    """After a crash: which messages of a MULTIAPPEND of bodies *hashes*, made when the mailbox's
    UIDNEXT was *uidnext*, the destination holds -- {index in *hashes*: destination UID}.

    The new messages (UID >= uidnext) are matched by content, in order: all of them if the
    MULTIAPPEND committed, none if it did not, a part if the backend itself died while saving.
    Empty if the mailbox is gone or was replaced (another UIDVALIDITY).

    A MULTIAPPEND whose sender died right after its last byte may still be committing on a
    busy backend: with a *clock*, what is not found is looked for again SETTLE seconds later."""
    found = await _find_copies(dst, mailbox, uidvalidity, uidnext, hashes)
    if clock is not None and len(found) < len(hashes):
        await task.deferLater(clock, SETTLE, lambda: None)
        found = await _find_copies(dst, mailbox, uidvalidity, uidnext, hashes)
    return found


async def _find_copies(dst: BackendProtocol, mailbox: str, uidvalidity: int, uidnext: int,
                       hashes: Sequence[str]) -> dict[int, int]:
    if not hashes or not await exists(dst, mailbox):
        return {}
    state = await open_mailbox(dst, mailbox, readonly=True)
    if state.uidvalidity != uidvalidity:
        return {}
    uids, _ = await search_uids(dst, b"UID %d:*" % uidnext)
    uids = [u for u in uids if u >= uidnext]
    waiting: dict[str, list[int]] = {}
    for index, h in enumerate(hashes):
        waiting.setdefault(h, []).append(index)
    found = {}
    for uid, h in zip(uids, await hash_messages(dst, uids)):
        if waiting.get(h):
            found[waiting[h].pop(0)] = uid
    return found


# -- COPY / MOVE of messages to a mailbox on another backend ----------------------------------


@dataclass
class CopyOutcome:
    """What a cross-server COPY / MOVE answers: untagged lines to relay, then the completion."""

    untagged: list[bytes]
    status: str
    text: str
    bytes: int = 0  # message bytes carried to the destination


SETTLE = 5.0  # seconds recovery gives a dead connection's last MULTIAPPEND to commit before it looks again
MOVE_LOCK = "\x00moving-from\x00"  # + a mailbox: a reservation name no mailbox can have (see move_lock)
COPY_LOCK = "\x00copying\x00"  # + a mailbox: the same kind of name (see copy_lock)
COPIES = "copy-messages"  # the journal op of a COPY across while its copy lands (_copying)
UNMARKED = ("[INUSE] Another session kept clearing the messages' \\Deleted flag while they were moved; those "
            "still in the mailbox were not moved (try again)")
COPY_IN_USE = ("[INUSE] Messages of a mailbox involved are being moved across servers (or a move cut off "
               "awaits recovery); try again shortly")


async def copy_across(src: BackendProtocol, message_set: bytes, uid: bool, dst: BackendProtocol,
                      mailbox: bytes, move: bool, *, mailbox_map: MailboxMap, user: str,
                      source_mailbox: bytes, clock: Any = None, move_wait: float,
                      ask: BackendProtocol | None = None) -> CopyOutcome:
    """COPY / MOVE from *source_mailbox*, selected on *src*, to *mailbox* on *dst* (a connection of its own).

    A source message another session expunged, before the command or while the messages were read,
    aborts the MULTIAPPEND (nothing saved) and the answer is Dovecot's own COPY/MOVE's: ``NO
    [EXPUNGEISSUED]``, nothing copied or moved (acrossview.py).

    MOVE pins both mailboxes in the journal and waits its turn after any other cross-server
    MOVE or COPY of either mailbox (move_reservations; two MOVEs from one mailbox would each copy a message both name: up to *move_wait*
    seconds, ``[map] move_wait_seconds``, then ``NO [INUSE]``); then it
    records the destination's UIDNEXT before its MULTIAPPEND, verifies every copy by
    content, records the new UIDs, and only then removes the source UIDs that are still
    there (a copy of one that someone else moved or expunged meanwhile is taken back). A
    crash anywhere in between is finished (or, if the destination never committed,
    released) by recovery.

    COPY first waits (up to *move_wait* seconds, then ``NO [INUSE]``) until no MOVE across, under way or
    cut off and awaiting recovery, holds its source or destination: its copy, the same bytes, would
    be taken by that MOVE's recovery for the MOVE's own (copywait.py). Then, until its copy has landed
    (answered or failed), it holds an entry of its own (_copying) that keeps any MOVE across of its
    source or destination from beginning: such a MOVE, cut off before its commit, would find this
    copy above the UIDNEXT it read (tests/test_copy_across_then_move.py).

    *ask*: the session's own connection to *dst*'s backend, if it has one: a destination refused is
    asked why there (mailops.refused_target).
    """
    if move and "UIDPLUS" not in src.capabilities:
        return CopyOutcome([], "NO", f"[CANNOT] Backend {src.name} has no UIDPLUS: it cannot remove exactly the moved messages")
    seen: list[bytes] = []  # the source's untagged responses: the client sees them whatever the answer
    try:
        return await _copy_once(src, message_set, uid, dst, mailbox, move, mailbox_map, user, source_mailbox, clock,
                                seen=seen, move_wait=move_wait, ask=ask)
    except Vanished as e:  # nothing was saved (see _copy_once)
        return CopyOutcome(seen + list(e.others), "NO", EXPUNGE_ISSUED)  # (the EXPUNGE that made it, say)
    except MovedAfterAll:  # recovery finished it while this proxy was cut off (its COPYUID and EXPUNGEs in *seen*)
        return CopyOutcome(seen, "OK", "Move completed (by recovery, while this proxy was cut off)")
    except LostEntry:  # recovery took it over: the source's untagged responses still reach the client
        return CopyOutcome(seen, "NO", TAKEN_OVER)
    except TransferError as e:  # an EXPUNGE among them, unseen, would shift the client's message numbers
        seen += e.others
        text = str(e)
        status, _, rest = text.partition(" ")
        return CopyOutcome(seen, status, rest) if status in ("NO", "BAD") else CopyOutcome(seen, "NO", text)


async def _copy_once(src: BackendProtocol, message_set: bytes, uid: bool, dst: BackendProtocol, mailbox: bytes,
                     move: bool, mailbox_map: MailboxMap, user: str, source_mailbox: bytes, clock: Any, *,
                     seen: list[bytes], move_wait: float, ask: BackendProtocol | None = None) -> CopyOutcome:
    """copy_across's work; the source's untagged responses are collected in *seen* as they come (the
    client sees them whatever the answer, also when this raises)."""
    dst_name = mailbox.decode("utf-8", "surrogateescape")
    src_name = normalize(source_mailbox.decode("utf-8", "surrogateescape"), mailbox_map.separator)
    copying = None  # a COPY's own entry (_copying), while its copy lands
    try:
        if move:
            entry = await _hold(mailbox_map, user, src_name, dst_name, clock, move_wait)
        else:  # its copy would look like an unfinished MOVE's own to that MOVE's recovery (copywait.py)
            entry = None
            if not await wait_for_moves(mailbox_map, user, [src_name, dst_name], clock, move_wait):
                return CopyOutcome(seen, "NO", COPY_IN_USE)
            try:
                copying = await _copying(mailbox_map, user, src_name, dst_name, clock, move_wait,
                                         {"src": src.name, "dst": dst.name})
            except StoreUnavailable:
                pass  # no MOVE across begins without the store either: on as when COPYs had no entry
            else:
                if copying is None:
                    return CopyOutcome(seen, "NO", COPY_IN_USE)
    except StoreUnavailable:
        return CopyOutcome(seen, "NO", UNAVAILABLE)
    if move and entry is None:
        return CopyOutcome(seen, "NO", "[INUSE] A mailbox involved is being moved; try again shortly")
    try:
        uids, found = await named_uids(src, message_set, uid)  # BAD: a sequence set past the last message
        untagged = seen
        untagged += found
        allowed = True
        if move and uids:  # asked once the client's message numbers are UIDs: its answer may hold an EXPUNGE
            allowed, also = await may_expunge(src, src_name)
            untagged += also
        if not uids:
            outcome = CopyOutcome(untagged, "OK", NOTHING_NAMED)  # sequence sets past the end: BAD in named_uids
        elif not allowed:  # Dovecot's own MOVE: NO, nothing copied
            outcome = CopyOutcome(untagged, "NO", "[NOPERM] Permission denied: the messages cannot be expunged "
                                                  "here (rights t and e needed); nothing was moved")
        elif (refused := await refused_target(dst, dst_name, ask)) is not None:
            outcome = CopyOutcome(untagged, "NO", refused)
        else:
            try:
                infos, others = await fetch_infos(src, uids)
                untagged += others
                if entry is not None:
                    return await _move(entry, mailbox_map, src, src_name, infos, dst, dst_name, untagged)
                if copying is not None and dst.config.master_user is not None:  # (recovery logs in with it)
                    await _copies_land(copying, dst, dst_name)  # where its copies land: taken back if told NO
                copied = await copy_stream(src, infos, dst, mailbox, before_commit=None if copying is None else (
                    lambda hashes: _copy_commits(mailbox_map, copying, hashes)))  # still ours: not released meanwhile
            except Vanished:
                if entry is not None and not entry.ended:
                    await mailbox_map.end_move(entry)  # at reserved, or its MULTIAPPEND aborted: nothing saved
                raise
            except CommitUnknown as e:  # (a MOVE's is said in _move) the destination went as it took them
                if copying is None:
                    raise
                text = await _told_no(copying, mailbox_map, f"{e} as it took the messages", "copied", by=[dst])
                await mailbox_map.disown(copying)  # recovery's now: it takes the copies back (movefinish.undo_copy)
                copying = None
                raise TransferError("NO " + text) from None
            untagged += copied.others
            return CopyOutcome(untagged, "OK", f"[COPYUID {copied.uidvalidity} {uid_set(uids).decode()} "
                                               f"{uid_set(copied.uids).decode()}] Copy completed.",
                               sum(i.size for i in infos))
        if entry is not None:
            await mailbox_map.end_move(entry)
        return outcome
    except BaseException:
        if entry is not None and not entry.ended:
            if entry.step is Step.RESERVED:
                await mailbox_map.end_move(entry)  # nothing was sent to the destination
            else:
                await mailbox_map.disown(entry)  # the copies may be there: recovery finishes or releases it
        raise
    finally:
        await _let_go(mailbox_map, copying)  # answered, or failed: the copy landed or never will from here


def move_lock(mailbox: str, separator: str) -> str:
    """The reservation name only cross-server MOVEs from *mailbox* take (_hold), INBOX in capitals
    whatever the client's case: a relayed COPY/MOVE looks for it under the same spelling."""
    return MOVE_LOCK + normalize(mailbox, separator)


def copy_lock(mailbox: str, separator: str, role: str) -> str:
    """A reservation name of *mailbox* (*role* "into" or "from") that COPYs across of it hold shared
    while their copy lands (copy_reservations) and a MOVE across holds exclusively for its
    destination ("into") and its source ("from") (move_reservations): the MOVE waits for the COPY."""
    return f"{COPY_LOCK}{role}\x00{normalize(mailbox, separator)}"


def copy_reservations(src_name: str, dst_name: str, separator: str) -> list[Reservation]:
    """What a COPY across holds while its copy lands: both copy_locks of both mailboxes (a MOVE across
    into or out of either waits; other COPYs do not), and both mailboxes, as a MOVE across does: a
    RENAME of either (or of a parent) waits, or is refused. All shared: other commands go on.

    Without the mailboxes, a RENAME on one backend ran while the COPY's MULTIAPPEND was saving: Dovecot
    answered the COPY "NO Mailbox was deleted under us", its uidlist lock went along to the new name,
    and the next writer there gave one UID to two messages (soak C 85057: a MOVE across into the
    renamed mailbox failed its verification, and its recovery kept the message twice)."""
    names = {copy_lock(m, separator, role) for m in (src_name, dst_name) for role in ("into", "from")}
    return ([Reservation(name, subtree=False, shared=True) for name in sorted(names)]
            + [Reservation(m, subtree=False, shared=True) for m in sorted({src_name, normalize(dst_name, separator)})])


def move_reservations(src_name: str, dst_name: str, separator: str) -> list[Reservation]:
    """What a MOVE across holds for its entry's life: both mailboxes (shared: other commands go on),
    the source's move_lock (one MOVE across from a mailbox at a time), the destination's "into"
    copy_lock (one MOVE across into a mailbox at a time) and the source's "from" one: no COPY across
    of either mailbox lands meanwhile. Recovery tells a cut-off MOVE's copies by content above the
    UIDNEXT it read and would take such a COPY's (or the other MOVE's) copy for its own. A MOVE out
    of another's destination does not wait: recovery follows a copy moved on (movefinish.moved_on)."""
    return [Reservation(src_name, False, True), Reservation(dst_name, False, True),
            Reservation(move_lock(src_name, separator), subtree=False),
            Reservation(copy_lock(dst_name, separator, "into"), subtree=False),
            Reservation(copy_lock(src_name, separator, "from"), subtree=False)]


def _lock_names_only(e: InUse) -> bool:
    """Only MOVEs' and COPYs' lock names in the way: they end within a command; wait for them."""
    return all(h.name is not None and h.name.startswith((MOVE_LOCK, COPY_LOCK)) for h in e.held)


async def _begin_waiting(mailbox_map: MailboxMap, user: str, op: str, reservations: list[Reservation], data: dict,
                         clock: Any, seconds: float, *, settle: bool = True) -> JournalEntry | None:
    """Begin an entry of *op*; while only MOVEs' and COPYs' lock names are in the way, wait (up to
    *seconds*, if there is a clock). None: a move or RENAME holds a mailbox, or the wait ran out."""
    async for _ in pauses(clock, seconds, 0.02, 0.5):
        try:
            return await mailbox_map.begin_move(user, op, reservations, data, settle=settle)
        except InUse as e:
            if not _lock_names_only(e):
                return None
    return None


async def _hold(mailbox_map: MailboxMap, user: str, src_name: str, dst_name: str, clock: Any,
                seconds: float) -> JournalEntry | None:
    """Begin a MOVE's entry (move_reservations), waiting for the MOVEs and COPYs across in its way."""
    return await _begin_waiting(mailbox_map, user, "move-messages",
                                move_reservations(src_name, dst_name, mailbox_map.separator), {}, clock, seconds)


async def _copying(mailbox_map: MailboxMap, user: str, src_name: str, dst_name: str, clock: Any,
                   seconds: float, backends: dict[str, str]) -> JournalEntry | None:
    """Begin a COPY across's entry (op ``copy-messages``, at ``reserved`` for its whole life: recovery
    releases it): copy_reservations held until its copy has landed, once no MOVE across is in their
    way. *backends*: {"src": .., "dst": ..}, in its data (a reload keeps a backend an entry names).
    No settle: only the store's own begin_move reads these names, no cache answers from them."""
    return await _begin_waiting(mailbox_map, user, COPIES, copy_reservations(src_name, dst_name, mailbox_map.separator),
                                {"src_mailbox": src_name, "dst_mailbox": dst_name, **backends}, clock, seconds,
                                settle=False)


async def _copies_land(entry: JournalEntry, dst: BackendProtocol, mailbox: str) -> None:
    """Into a COPY's entry: the destination's UIDVALIDITY and UIDNEXT before its MULTIAPPEND."""
    try:
        state = await status(dst, mailbox)
    except MailboxGone:  # deleted since refused_target found it: TRYCREATE, as Dovecot's COPY says
        raise TransferError("NO " + TRYCREATE) from None
    except TransferError:  # (UIDVALIDITY 0: being opened for the first time, or locked) not undone then: said so
        return
    entry.data.update({"dst_validity": state.uidvalidity, "dst_uidnext": state.uidnext})


async def _copy_commits(mailbox_map: MailboxMap, entry: JournalEntry, hashes: tuple[str, ...]) -> None:
    """A COPY's last byte is next: its bodies' hashes written first (record_before_commit)."""
    entry.data["hashes"] = list(hashes)
    await mailbox_map.record_before_commit(entry)


async def _let_go(mailbox_map: MailboxMap, entry: JournalEntry | None) -> None:
    """End a COPY's entry; a store failure is logged, not raised (the COPY's answer stands): recovery releases it."""
    if entry is None or entry.ended:
        return
    try:
        await mailbox_map.end_move(entry, settle=False)
    except Exception as e:
        log.warn("COPY across: could not end journal entry {id} ({why}); recovery releases it", id=entry.id, why=str(e))


async def _move(entry: JournalEntry, mailbox_map: MailboxMap, src: BackendProtocol, src_mailbox: str,
                infos: list[MessageInfo], dst: BackendProtocol, dst_mailbox: str, untagged: list[bytes]) -> CopyOutcome:
    src_state = await status(src, src_mailbox, untagged)  # selected here: the view's UIDVALIDITY, its UIDs' one
    try:
        dst_state = await status(dst, dst_mailbox)
    except MailboxGone:  # deleted since refused_target found it: TRYCREATE, as Dovecot's MOVE says
        raise TransferError("NO " + TRYCREATE) from None
    uids = [i.uid for i in infos]
    entry.data.update({"src": src.name, "src_mailbox": src_mailbox, "src_validity": src_state.uidvalidity,
                       "src_uids": uid_set(uids).decode(), "dst": dst.name, "dst_mailbox": dst_mailbox,
                       "dst_validity": dst_state.uidvalidity, "dst_uidnext": dst_state.uidnext,
                       "src_flags": [flags_text(i.flags) for i in infos]})
    await mailbox_map.step(entry, Step.MOVE_APPENDING)
    async def record(hashes: tuple[str, ...]) -> None:
        entry.data["hashes"] = list(hashes)  # before the last byte: a recovery finds the copies by them
        await mailbox_map.record_before_commit(entry)

    try:
        copied = await copy_stream(src, infos, dst, dst_mailbox.encode("utf-8", "surrogateescape"),
                                   before_commit=record)
    except CommitUnknown as e:  # the destination went as it took them: saved or not, unknown
        text = await _told_no(entry, mailbox_map, f"{e} as it took the messages", by=[src, dst])
        raise TransferError("NO " + text) from None
    except LostEntry:  # the entry is recovery's now, not ours to end
        raise
    except BaseException:
        await mailbox_map.end_move(entry)  # the MULTIAPPEND was refused or never completed: nothing saved
        raise
    untagged += copied.others
    entry.data["dst_uids"] = uid_set(copied.uids).decode()
    entry.data["dst_validity"] = copied.uidvalidity  # the copies' (a destination made anew meanwhile has another)
    # Committed (APPENDUID): journaled before anything can fail, or a copy another client moves on
    # before our verification reads it would be "never committed" to recovery, its source kept (twice)
    await record_committed(mailbox_map, entry, src, dst, dst_mailbox, uids, copied, untagged)  # (taken over: latecommit)
    try:
        await verify_copies(dst, dst_mailbox, copied)
    except BackendUnavailable as e:  # committed, not checked (the destination stopped or went)
        text = await _told_no(entry, mailbox_map, f"the connection to {dst.name} ended before the copies were checked",
                              by=[src, dst])
        await mailbox_map.disown(entry)  # recovery takes the copies back (or finishes the move: _told_no)
        log.error("MOVE: copied to {dst}, which failed before the copies were checked ({why}); left to recovery",
                  dst=dst.name, why=str(e))
        return CopyOutcome(untagged, "NO", text, 0)
    except TransferError as e:  # a copy gone or changed there (another session's expunge) before it was read
        await mailbox_map.disown(entry)  # recovery finishes the move or keeps the source (movefinish.py)
        log.warn("MOVE: copied to {dst}, but the copies could not be checked ({why}); recovery will finish it",
                 dst=dst.name, why=str(e))
        return CopyOutcome(untagged, "NO", "The messages were copied, but a copy was changed or removed by another "
                                           "session before it was checked; nothing was removed from the source yet, "
                                           "and the move will be completed or the source kept", 0)
    await mailbox_map.step(entry, Step.MOVE_APPENDED)
    copy_of = dict(zip(uids, copied.uids))
    present, said = None, None  # those flagged \Deleted by this move; where the COPYUID line went in *untagged*
    try:
        expunged: Tagged | None = None  # our UID EXPUNGE's answer: its HIGHESTMODSEQ code is the MOVE's
        flags_now, others, unmarked = await mark_deleted(src, uids)
        untagged += others
        if unmarked:  # (probe r3: taken as "no right", copies taken back, OK with those never moved)
            return await _unmoved(entry, mailbox_map, src, infos, dst, dst_mailbox, copy_of, set(flags_now), untagged)
        present = sorted(flags_now)
        # as the messages leave the source: a STORE, or a FETCH's \Seen, of another session meanwhile
        changed = flag_changes({i.uid: i.flags for i in infos}, flags_now, copy_of, deleted=True)
        await _carry(dst, dst_mailbox, copied.uidvalidity, changed, src)
        entry.data["present"] = uid_set(present).decode()
        marked = {u: flags_text(sorted(f)) for u, f in flags_now.items() if f is not None}
        entry.data["src_flags"] = [marked.get(u, was) for u, was in zip(uids, entry.data["src_flags"])]  # as carried
        kept = set(present)  # a set: `in` the sorted list made this quadratic (20,000 UIDs: ~4 s of the loop)
        entry.data["vanished_dst"] = uid_set(copy_of[u] for u in uids if u not in kept).decode()
        await mailbox_map.step(entry, Step.MOVE_EXPUNGING)
        if present:
            said = len(untagged)
            untagged.append(_said_moved(copied.uidvalidity, present, copy_of))  # RFC 6851: before the EXPUNGEs
            last: dict[int, frozenset[bytes] | None] = {}  # their flags as they went: a later change carried too
            expunged = await expunge_uids(src, present, untagged, last)  # one kept raises: its copy is a second
            await _carry(dst, dst_mailbox, copied.uidvalidity, flag_changes(flags_now, last, copy_of), src)
    except BackendError as e:
        if isinstance(e, TransferError) and present is not None and not (src.closed or dst.closed):
            # Sources kept: another session cleared \Deleted again and again (EXPUNGE_TRIES). Said here, not
            # left to recovery (which needs master users): those kept stay, their copies taken back.
            try:
                return await _unmoved(entry, mailbox_map, src, infos, dst, dst_mailbox, copy_of, set(present), untagged,
                                      None if said is None else (said, copied.uidvalidity),
                                      f"{e}; those still in the source were not moved")
            except BackendError as again:
                e = again
        not_deleted = _flagged_by_move(infos)
        if not_deleted and not src.closed:
            restored = await src.command(_UNFLAG % uid_set(not_deleted))
            untagged += [r.raw for r in restored.responses]  # an EXPUNGE of another session's among them
        await mailbox_map.disown(entry)
        log.error("MOVE: copied to {dst} but not yet removed from {src} ({why}); recovery will finish it",
                  dst=dst.name, src=src.name, why=str(e))
        copyuid = f"[COPYUID {copied.uidvalidity} {uid_set(uids).decode()} {uid_set(copied.uids).decode()}]"
        return CopyOutcome(untagged, "NO", f"{copyuid} The messages were copied; removing them from the source "
                                           "failed and will be retried", sum(i.size for i in infos))
    gone = expand_uid_set(entry.data["vanished_dst"])
    if gone:  # moved or expunged by someone else while we copied: our copies would be extra ones
        await open_mailbox(dst, dst_mailbox, readonly=False)
        await expunge_uids(dst, gone)
    await mailbox_map.end_move(entry)
    there = set(present)
    moved = sum(i.size for i in infos if i.uid in there)
    return CopyOutcome(untagged, "OK", moved_text(expunged.start if expunged is not None else None), moved)


async def _told_no(entry: JournalEntry, mailbox_map: MailboxMap, why: str, done: str = "moved", *,
                   by: Sequence[BackendProtocol]) -> str:
    """The text of a NO about to be said of a MOVE (COPY: *done* "copied") whose copies may be at the destination,
    recorded first: recovery then takes the copies back, as NO says (probe h1 of stop 58). Not to be undone (*by*
    without a master user; no UIDNEXT to find them above) or unrecorded, the text says what may be."""
    entry.data["told"] = "NO"
    why = why[:1].upper() + why[1:]
    if any(conn.config.master_user is None for conn in by) or "dst_uidnext" not in entry.data:
        # recovery cannot log in (README) or find the copies: nothing will remove the source or the copies
        return f"[UNAVAILABLE] {why}: they may have been copied all the same" + (
            "; the source is kept" if done == "moved" else "")
    try:
        await mailbox_map.record(entry)
    except Exception:  # the store failing too: recovery finishes the move (or releases the COPY) as before
        return f"[UNAVAILABLE] {why}: they may have been copied" + (
            "; the move will be completed, or the source kept" if done == "moved" else "")
    return f"[UNAVAILABLE] {why}: nothing was {done} (any copies saved there are taken back)"


async def _carry(dst: BackendProtocol, mailbox: str, validity: int, changes: dict[int, tuple[set[bytes], set[bytes]]],
                 src: BackendProtocol) -> None:
    try:
        await carry_flags(dst, mailbox, validity, changes)
    except BackendError as e:
        log.warn("MOVE: flags changed on {src} during the move not carried to {dst} ({why})", src=src.name, dst=dst.name,
                 why=str(e))


_UNFLAG = b"UID STORE %s -FLAGS.SILENT (\\Deleted)"  # a source that stays: the flag the MOVE set, taken back


def _said_moved(validity: int, uids: Sequence[int], copy_of: dict[int, int]) -> bytes:
    """RFC 6851's untagged ``* OK [COPYUID ...] Moved`` of *uids*, said before their EXPUNGEs."""
    return b"* OK [COPYUID %d %s %s] Moved\r\n" % (validity, uid_set(uids), uid_set(copy_of[u] for u in uids))


def _flagged_by_move(infos: list[MessageInfo]) -> list[int]:
    """The sources this MOVE flags \\Deleted (they were not before it): the ones whose flag goes back if they stay."""
    return [i.uid for i in infos if b"\\DELETED" not in {flag_key(f) for f in i.flags}]


async def _unmoved(entry: JournalEntry, mailbox_map: MailboxMap, src: BackendProtocol, infos: list[MessageInfo],
                   dst: BackendProtocol, dst_mailbox: str, copy_of: dict[int, int], flagged: set[int],
                   untagged: list[bytes], copyuid: tuple[int, int] | None = None, why: str = "") -> CopyOutcome:
    """A MOVE across whose sources could not all be flagged \\Deleted: those still in the source are not moved.
    The flag this move set is cleared first; a source gone since this move flagged it (*flagged*: another
    session's EXPUNGE took it on that flag) is moved, its copy kept (probe s2: taken back too, in neither
    mailbox). Then the decision is journaled (nothing to expunge, the other copies back) and those copies taken
    back: a recovery after any step leaves each message once (before the journal write it finishes the move).
    *copyuid*, *why*: an expunge kept some (*why*, said to the client); where the COPYUID said before it is
    in *untagged*, and the copies' UIDVALIDITY: it then names those moved after all, or goes."""
    if not_deleted := _flagged_by_move(infos):
        restored = await run_ok(src, _UNFLAG % uid_set(not_deleted), "STORE")
        untagged += [r.raw for r in restored.responses]
    there = set(await still_there(src, sorted(copy_of), untagged))
    back = [copy_of[u] for u in sorted(copy_of) if u in there or u not in flagged]
    moved = [u for u in sorted(copy_of) if u not in there and u in flagged]
    if copyuid is not None:  # (the COPYUID said before the expunge: of those moved after all, or gone)
        untagged[copyuid[0]:copyuid[0] + 1] = [_said_moved(copyuid[1], moved, copy_of)] if moved else []
    entry.data["present"], entry.data["vanished_dst"] = "", uid_set(back).decode()
    if entry.step is Step.MOVE_EXPUNGING:  # (an expunge kept some: the decision is written again)
        await mailbox_map.record(entry)
    else:
        await mailbox_map.step(entry, Step.MOVE_EXPUNGING)
    if back:
        await open_mailbox(dst, dst_mailbox, readonly=False)
        await expunge_uids(dst, back)
    await mailbox_map.end_move(entry)
    log.warn("MOVE: {why}: those still on {src} not moved, their copies on {dst} taken back", src=src.name,
             dst=dst.name, why=why or f"not all flagged \\Deleted after {MARK_TRIES} tries (another session clearing it)")
    went = set(moved)
    size = sum(i.size for i in infos if i.uid in went)
    return CopyOutcome(untagged, "NO", UNMARKED if not why else why if why.startswith("[") else f"[INUSE] {why}", size)


async def flags_of(conn: BackendProtocol, uids: Sequence[int]) -> dict[int, frozenset[bytes]]:
    """UID -> FLAGS (\\Recent apart) of those of *uids* still in the mailbox selected on *conn*."""
    if not uids:
        return {}
    present: dict[int, frozenset[bytes] | None] = {}
    fetched_flags((await conn.command(b"UID FETCH " + uid_set(sorted(uids)) + b" (UID FLAGS)")).responses, set(uids), present)
    return {u: f for u, f in present.items() if f is not None}


async def carry_flags(dst: BackendProtocol, mailbox: str, validity: int, changes: dict[int, tuple[set[bytes], set[bytes]]]) -> None:
    """Flags set or cleared on the source while the MOVE ran, onto the copies: {copy UID: (added,
    removed)}, added and cleared, never replaced (a client may be flagging the copy already)."""
    if not changes:
        return
    if not await same_mailbox(dst, mailbox, validity):
        return
    by_change: dict[tuple[str, bytes], list[int]] = collections.defaultdict(list)
    for uid, (added, removed) in changes.items():
        if added:
            by_change[("+", b" ".join(sorted(added)))].append(uid)
        if removed:
            by_change[("-", b" ".join(sorted(removed)))].append(uid)
    for (sign, flags), uids in sorted(by_change.items()):
        await run_ok(dst, b"UID STORE " + uid_set(uids) + b" " + sign.encode() + b"FLAGS.SILENT (" + flags + b")", "STORE")


def flag_changes(was: dict[int, Iterable[bytes]], now: dict[int, frozenset[bytes] | None], copy_of: dict[int, int],
                 *, deleted: bool = False) -> dict[int, tuple[set[bytes], set[bytes]]]:
    """{copy UID: (flags added, flags cleared)} of each source message whose flags changed since *was* (as copied,
    or as last carried). \\Deleted may be this MOVE's own mark: cleared (a client's un-delete), added only when
    *deleted* says *now* holds the flags as before the MOVE marked them (a client's, then: probe b2 of stop 54);
    \\Recent is no flag to set."""
    out = {}
    for uid, flags in now.items():
        if flags is None or (before := was.get(uid)) is None:
            continue
        had = {flag_key(f): f for f in before if flag_key(f) != b"\\RECENT"}
        has = {flag_key(f): f for f in flags if flag_key(f) != b"\\RECENT"}
        added = {has[k] for k in has.keys() - had.keys() if deleted or k != b"\\DELETED"}
        removed = {had[k] for k in had.keys() - has.keys()}
        if added or removed:
            out[copy_of[uid]] = (added, removed)
    return out


def flags_text(flags: Iterable[bytes]) -> str:
    """Flags as a journal entry keeps them (one string, as IMAP writes them)."""
    return b" ".join(flags).decode("utf-8", "surrogateescape")
