"""A mailbox moved to another server gets a UIDVALIDITY other than its source's (RFC 3501 2.3.1.1).

A move appends: the messages take the destination's next UIDs, not their own. Dovecot gives a new
mailbox the current second as its UIDVALIDITY, so two made in the same second on two backends share
one: a user's INBOX on every backend, opened by a new user's first merged LIST-STATUS (probe 2 of
stop 47), or a mailbox made and moved at once. Moved there, its messages were renumbered under the
UIDVALIDITY clients had cached, and a client deleting u3 by its cached UID deleted u4. A created
destination sharing the source's UIDVALIDITY is created again (Dovecot gives the next one); an
INBOX, which cannot be, refuses the move before anything is copied.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import task

from .backend import BackendProtocol
from .mailops import TransferError, create, name_arg, run_ok, status

__all__ = ["create_unlike", "refuse_same_inbox"]

RECREATES = 3  # Dovecot gives a mailbox made again the last UIDVALIDITY + 1: once is enough


async def create_unlike(src: BackendProtocol, old: str, dst: BackendProtocol, new: str) -> None:
    """CREATE *new* on *dst* (found absent, reserved by the move) with a UIDVALIDITY other than
    *old*'s on *src*; TransferError if it cannot be (the move's roll-back deletes it if empty)."""
    unlike = (await status(src, old)).uidvalidity
    await create(dst, new)
    for _ in range(RECREATES):
        made = await status(dst, new)
        if made.uidvalidity != unlike:
            return
        if made.messages:  # not only the move's any more: left to the roll-back, which keeps it
            break
        await run_ok(dst, b"DELETE " + name_arg(new), "DELETE")
        await create(dst, new)
    raise TransferError(f"[CANNOT] {new} on {dst.name} kept the UIDVALIDITY of {old} on {src.name} ({unlike}); "
                        "nothing was moved")


async def refuse_same_inbox(src: BackendProtocol, dst: BackendProtocol, clock: Any) -> None:
    """INBOX moved into INBOX: TransferError if the two share a UIDVALIDITY, unless every message
    keeps its UID (the destination never used, the source's UIDs 1 to n). A source INBOX made this
    second is first let age (*clock*: IReactorTime): a destination made by this look differs."""
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
