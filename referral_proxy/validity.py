"""A mailbox moved to another server gets a UIDVALIDITY other than its source's (RFC 3501 2.3.1.1).

A move appends: the messages take the destination's next UIDs, not their own. Dovecot gives a new
mailbox the current second as its UIDVALIDITY, so two made in the same second on two backends share
one: a user's INBOX on every backend, opened by a new user's first merged LIST-STATUS (probe 2 of
stop 47), or a mailbox made and moved at once. Moved there, its messages were renumbered under the
UIDVALIDITY clients had cached, and a client deleting u3 by its cached UID deleted u4. A created
destination whose UIDVALIDITY is not above the source's is created again (Dovecot gives the next one);
an INBOX, which cannot be, refuses the move before anything is copied if the two are the same.

Above, not only other: each move raises it, so a mailbox never comes back to any it had before. Dovecot
numbers a user's new mailboxes from a counter per backend (the current second, or the last + 1), which
a user's CREATEs drive ahead of the clock: b3 -> b1 -> b2 gave the mailbox b3's UIDVALIDITY again with
its messages renumbered (probe 3 of stop 49).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from .backend import BackendProtocol
from .imap.uidset import uid_set
from .mailops import TransferError, _failed, create, exists, highest_modseq, name_arg, open_mailbox, run_ok, status
from .staging import ASIDE_PREFIX, run_captured
from .transfer import flag_key, flags_of

__all__ = ["create_unlike", "drop_made", "kept_uids", "refuse_same_inbox", "counter_past", "returns_past", "returns_past_of"]

log = Logger()

# Dovecot gives a mailbox made again its last UIDVALIDITY + 1: the gap is crossed one at a time (DELETE, CREATE,
# STATUS: ~1.5 ms each locally); a user's folder churn puts a backend's counter that far ahead of the clock
# (probe t1 of stop 51: 350 CREATEs and DELETEs, ~347 s; 300 here refused the move until the clock caught up)
RECREATES = 3600
MADE_AT_ONCE = 200  # private mailboxes made (pipelined) in one go by counter_past


async def create_unlike(src: BackendProtocol, old: str, dst: BackendProtocol, new: str, aside: str) -> None:
    """CREATE *new* on *dst* (found absent, reserved by the move) with a UIDVALIDITY above *old*'s on
    *src*; TransferError if it cannot be (the move's roll-back deletes it if empty).

    Made, and made again, under *aside* (a private name of the move's), then renamed to *new* (Dovecot's
    RENAME keeps the UIDVALIDITY): a delivery agent may write to *new* as soon as it exists, and a DELETE
    of it to make it again took such a message (probe g1 of stop 57: soak seed 9210, one message lost)."""
    below = (await status(src, old)).uidvalidity
    for _ in range(RECREATES):
        await create(dst, aside)
        made = await status(dst, aside)
        if made.uidvalidity > below:
            return await _rename_into_place(dst, aside, new, made.uidvalidity)
        if made.messages:  # (nobody delivers to a private name: were one there, it is not deleted)
            break
        await drop_made(dst, aside)
        if below - made.uidvalidity >= RECREATES:
            break
    ahead = f"; {src.name}'s counter is {below - int(time.time())} s ahead of the clock: try again then" if (
        below > time.time()) else ""
    raise TransferError(f"[CANNOT] {new} on {dst.name} got the UIDVALIDITY {made.uidvalidity}, not above that of "
                        f"{old} on {src.name} ({below}): a client's cached UIDs could name other messages "
                        f"(RFC 3501 2.3.1.1); nothing was moved{ahead}")


async def counter_past(conn: BackendProtocol, floor: int) -> bool:
    """The user's next new mailbox on *conn*'s backend gets a UIDVALIDITY above *floor*: private mailboxes made
    and dropped until the last got *floor* or more (Dovecot numbers the next from the last), many at once
    when the counter is far behind (one at a time took 49 s for a gap of 3,000: probe m7 of stop 61).
    False if it cannot be."""
    base = ASIDE_PREFIX.decode() + secrets.token_hex(8) + "-validity-"
    made, tried = await _made(conn, [base + "0"]), 1
    while 0 < made < floor and tried < RECREATES:
        names = [base + str(i) for i in range(min(MADE_AT_ONCE, floor - made, RECREATES - tried))]
        made, tried = await _made(conn, names), tried + len(names)
    return made >= floor


async def _made(conn: BackendProtocol, names: list[str]) -> int:
    """Make *names* (pipelined), read the last one's UIDVALIDITY, drop them all (0: not made)."""
    await run_captured(conn, [b"CREATE " + name_arg(n) for n in names])
    try:
        return (await status(conn, names[-1])).uidvalidity
    except TransferError:
        return 0
    finally:
        await run_captured(conn, [b"DELETE " + name_arg(n) for n in names])


async def returns_past(name: str, floor: int | None, here: str, there: str,
                       connect: Callable[[str], Awaitable[BackendProtocol]]) -> None:
    """*name*, which had the UIDVALIDITY *floor* on *here*, is routed to *there* once its placement goes (a
    DELETE, a RENAME away; called before either is sent, while the name is held): made there again, it must
    not get *floor* back, or a client's cached UIDs name other messages under it (RFC 3501 2.3.1.1; probe m6 of stop 61: moved to b3 by the admin,
    DELETEd and CREATEd on b1, whose counter gave it b3's value). Logged, not raised, if it cannot be."""
    if floor is None or there == here:
        return  # (on *here* again: its own counter is past *floor*)
    try:
        conn = await connect(there)
        try:
            done = await counter_past(conn, floor)
        finally:
            conn.logout()
    except Exception as e:
        done, why = False, str(e)
    else:
        why = f"its counter is {floor - int(time.time())} s ahead of the clock"
    if not done:
        log.warn("{name} (UIDVALIDITY {v} on {here}) routes to {there} now, whose next new mailbox may get that "
                 "UIDVALIDITY again ({why})", name=name, v=floor, here=here, there=there, why=why)


async def returns_past_of(conn: BackendProtocol, name: str, there: str,
                          connect: Callable[[str], Awaitable[BackendProtocol]]) -> None:
    """returns_past with *name*'s UIDVALIDITY read on *conn* (its backend, before the command that takes it
    away); nothing to do if *name* is not there (the command's own answer says so)."""
    if there == conn.name:
        return
    try:
        floor = (await status(conn, name)).uidvalidity
    except TransferError:
        return
    await returns_past(name, floor, conn.name, there, connect)


async def _rename_into_place(dst: BackendProtocol, aside: str, new: str, uidvalidity: int) -> None:
    """RENAME *aside* to *new*. Refused ``[ALREADYEXISTS]`` and done all the same (*new* there with *aside*'s
    UIDVALIDITY, *aside* gone), as Dovecot 2.3.19 does to some CREATEs (mailops.create), it is taken as done;
    refused, the private *aside* is dropped and the backend's answer is the move's."""
    renamed = await dst.command(b"RENAME " + name_arg(aside) + b" " + name_arg(new))
    if renamed.ok:
        return
    if renamed.start.code == "ALREADYEXISTS" and not await exists(dst, aside) and await exists(dst, new) and (
            await status(dst, new)).uidvalidity == uidvalidity:
        return
    await drop_made(dst, aside)
    raise TransferError(_failed("RENAME", dst, renamed.start) + "; nothing was moved")


async def drop_made(dst: BackendProtocol, aside: str) -> None:
    """DELETE the private *aside* a move made (create_unlike) if it is there and empty: nobody delivers
    to it, but were a message found there, it is kept (the move's roll-back, cut off mid-way, comes here too)."""
    if await exists(dst, aside) and (await status(dst, aside)).messages == 0:
        await run_ok(dst, b"DELETE " + name_arg(aside), "DELETE")


async def refuse_same_inbox(src: BackendProtocol, dst: BackendProtocol, clock: Any) -> bool:
    """INBOX moved into INBOX: TransferError if the two share a UIDVALIDITY, unless every message
    keeps its UID (the destination never used, the source's UIDs 1 to n; True: kept_uids checks each
    copy). A source INBOX made this second is first let age (*clock*: IReactorTime): a destination
    made by this look differs."""
    mine = await status(src, "INBOX")
    if clock is not None and 0 < (wait := mine.uidvalidity + 1 - time.time()) <= 2:
        await task.deferLater(clock, wait)
    theirs = await status(dst, "INBOX")
    same_uids = theirs.messages == 0 and theirs.uidnext == 1 and mine.uidnext == mine.messages + 1
    if theirs.uidvalidity == mine.uidvalidity and not same_uids:
        raise TransferError(
            f"[CANNOT] INBOX on {dst.name} has the UIDVALIDITY of INBOX on {src.name} ({mine.uidvalidity}): moved, its "
            "messages would get new UIDs under it and clients would act on the wrong ones by their cached UIDs "
            f"(RFC 3501 2.3.1.1). Give INBOX on {dst.name} a new one first (doveadm mailbox update "
            "--uid-validity); nothing was moved")
    return theirs.uidvalidity == mine.uidvalidity


async def kept_uids(same: bool, src: BackendProtocol, dst: BackendProtocol, uids: list[int], copied: Sequence[int]) -> None:
    """With *same* (refuse_same_inbox let INBOX into one of its UIDVALIDITY), each copy must have its
    source's UID: a message delivered there meanwhile took one, and the rest would be renumbered under
    it (probe 6 of stop 49). TransferError then: the move rolls back, its copies removed. Nor may
    HIGHESTMODSEQ go back under the UIDVALIDITY kept (RFC 7162 3.1.2.1: a client's CHANGEDSINCE its
    cached one missed every change until then; probe 6): the destination's is raised to the source's,
    and each copy given a MODSEQ above it (_touch)."""
    if not same:
        return
    if list(copied) != uids:
        raise TransferError(f"[CANNOT] a message reached INBOX on {dst.name} during the move: the copies would not "
                            "keep their UIDs under the UIDVALIDITY the two INBOXes share (RFC 3501 2.3.1.1). Give "
                            f"INBOX on {dst.name} a new one first (doveadm mailbox update --uid-validity); nothing "
                            "was moved")
    want, have = await highest_modseq(src, "INBOX"), await highest_modseq(dst, "INBOX")
    if want is None or have is None:
        return
    if want - have > MAX_RAISE:
        raise TransferError(f"[CANNOT] INBOX on {dst.name} shares the UIDVALIDITY of INBOX on {src.name}, whose "
                            f"HIGHESTMODSEQ ({want}) is too far above its own to be reached; give it a new "
                            "UIDVALIDITY first (doveadm mailbox update --uid-validity); nothing was moved")
    await open_mailbox(dst, "INBOX", readonly=False)
    if have < want:
        await _raise_modseq(dst, copied[0], want - have)
    await _touch(dst, list(copied))
    await dst.deselect()


MAX_RAISE = 2_000_000  # flag changes made to raise a HIGHESTMODSEQ (pipelined: about 20 s of one Dovecot)
AT_ONCE = 500  # flag changes written in one go


async def _raise_modseq(dst: BackendProtocol, uid: int, by: int) -> None:
    """INBOX's HIGHESTMODSEQ on *dst* (selected) raised *by* at least: a system flag of message *uid* (a copy
    of the move's, the INBOX used by no client yet) set and cleared, each change one MODSEQ (Dovecot)."""
    has = {flag_key(f) for f in (await flags_of(dst, [uid])).get(uid, ())}
    flag = next((f for f in (b"\\FLAGGED", b"\\DRAFT", b"\\ANSWERED") if f not in has), b"\\FLAGGED")
    pair = [b"UID STORE %d %sFLAGS.SILENT (%s)" % (uid, sign, flag) for sign in ((b"+", b"-") if flag not in has else (b"-", b"+"))]
    for _ in range(0, by + 1, AT_ONCE):
        await run_captured(dst, pair * (AT_ONCE // 2))


async def _touch(dst: BackendProtocol, uids: list[int]) -> None:
    """Each of *uids* (copies in INBOX, selected on *dst*) given a MODSEQ above HIGHESTMODSEQ now: \\Flagged set
    and cleared (cleared and set where it is), flags as they were. A client's CHANGEDSINCE its cached value,
    under the UIDVALIDITY kept, then reports every copy (probe r3, stop 50: the copies kept the MODSEQs of
    their APPEND, below it, and a flag changed at the source before the move was never reported)."""
    flagged = {u for u, flags in (await flags_of(dst, uids)).items() if b"\\FLAGGED" in {flag_key(f) for f in flags}}
    lines = []
    for group, signs in (([u for u in uids if u not in flagged], (b"+", b"-")), (sorted(flagged), (b"-", b"+"))):
        if group:
            lines += [b"UID STORE %s %sFLAGS.SILENT (\\Flagged)" % (uid_set(group), sign) for sign in signs]
    if lines:
        for result in await run_captured(dst, lines):
            if not result.ok:
                raise TransferError(f"[CANNOT] the copies' MODSEQs could not be raised on {dst.name}; nothing was moved")
