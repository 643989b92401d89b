"""A COPY across waits for the MOVEs across of its mailboxes: their recovery cannot tell its copy from theirs.

A COPY across servers is an APPEND of the source's bytes (and INTERNALDATE) on the destination.
A MOVE across cut off before its outcome is known (journal step ``move-appending``, hashes
journaled) is finished by recovery by content: a message of the same bytes in its destination
above the journaled UIDNEXT is taken for the MOVE's copy (transfer.find_copies); once a copy of
it has left the destination, one in another mailbox for that copy moved on, one newer in its
source for that copy moved back (movefinish.moved_on, came_back); and the source is expunged. A COPY of that message made through the
proxy while that MOVE's entry is open (its owner at work, dead, or recovery at its SETTLE wait)
is such a message: soak A, seed 53212 lost one that way (the user's COPY Shared/A -> "50% off"
landed in the second look of the recovery of a MOVE Shared/A -> "50% off" cut off before its
commit, and the source went: once where the clients made two).

So a COPY across first waits until no ``move-messages`` entry holds its source or its destination
mailbox (both MOVE mailboxes are held, shared, for the entry's whole life), up to ``[map]
move_wait_seconds`` (10 by default; the caller passes it), then ``NO [INUSE]``. The check reads this process's cached view of
the reservations (no I/O when nothing is held, i.e. nearly always) and the journal only when an
entry holds one of the names, to see whether it is a MOVE's. Then, until its copy has landed, the
COPY holds an entry of its own (transfer._copying: op ``copy-messages``, both mailboxes' copy_lock
names, shared; a begin and an end in the store) that a MOVE across of either mailbox waits for
(transfer.move_reservations takes them exclusively). Without it a MOVE across of the same message
begun after this check, before the COPY's APPEND committed (Dovecot holding it on the mailbox's
lock: tests/test_copy_across_then_move.py), and cut off before its own commit, took the COPY's copy,
above the UIDNEXT it had read, for its own and expunged the source: once where the clients made two.
Two MOVEs across into one mailbox (or from one: move_lock) wait for each other the
same way: one's copy of a message both carry (a COPY made them two) would be the other's to recover.

A COPY or MOVE relayed to the backend of both its mailboxes (Dovecot's own) waits the same way
while a MOVE across is from its source (holds transfer.MOVE_LOCK + that name: only MOVEs across
take it) or holds its destination (copycommand.CopyCommands.copy; :func:`held_by_any` first, no
I/O while nothing is held). Out of a MOVE's destination it need not wait: recovery follows a copy
moved on from there (movefinish.moved_on), as for a MOVE across out of it, which never waited. Soak A,
seed 53171 duplicated a message a MOVE across cut off at ``move-expunging`` had copied and flagged
\\Deleted in its source, not yet expunged. Another session's COPY of that source message (then
STORE \\Deleted and EXPUNGE), or its MOVE, made a second instance, and recovery found nothing left
in the source to remove: twice where two moves of one message make one. The soak's COPY went
across (waits here since copywait); one relayed to the source's backend did the same. A relayed
COPY is checked once no command of its session is in flight and then sent at once (a relayed MOVE
once it has its turn): queued behind them at Dovecot it could run after a MOVE across begun
meanwhile had copied and flagged its message (tests/test_copy_queued_behind.py). Left: Dovecot
itself may hold a COPY sent at once (a mailbox lock), up to its mail_max_lock_timeout; and a COPY or
MOVE relayed within a MOVE across's destination's backend (or a client's APPEND of the same bytes)
that lands there after that MOVE read its UIDNEXT is not kept from it (an entry per relayed COPY
would cost a store write on every COPY to Trash).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .backoff import pauses
from .journal import Reservation
from .routing import MailboxMap

__all__ = ["MOVES", "held_by_any", "moves_holding", "wait_for_moves"]

MOVES = "move-messages"  # the journal op of a cross-server MOVE / UID MOVE (transfer._hold)
_FIRST, _MOST = 0.02, 0.5


def _holders(mailbox_map: MailboxMap, user: str, mailboxes: Sequence[str]) -> set[int]:
    """The entries holding one of *mailboxes*, in this process's cached view (no I/O)."""
    return mailbox_map.holders(user, [Reservation(m, subtree=False, shared=False) for m in mailboxes])  # any holder


def held_by_any(mailbox_map: MailboxMap, user: str, mailboxes: Sequence[str]) -> bool:
    """Some journal entry, of any op, holds one of *mailboxes* in this process's cached view of the
    reservations (no I/O): only then may a MOVE across (:func:`moves_holding`) be in the way."""
    return bool(_holders(mailbox_map, user, mailboxes))


async def moves_holding(mailbox_map: MailboxMap, user: str, mailboxes: Sequence[str]) -> set[int]:
    """The open ``move-messages`` entries (live, dead-owned or being recovered) holding one of
    *mailboxes*; the journal is read only if some entry holds one (StoreUnavailable then)."""
    ids = _holders(mailbox_map, user, mailboxes)
    if not ids:
        return set()
    return {e.id for e in await mailbox_map.entries() if e.id in ids and e.op == MOVES}


async def wait_for_moves(mailbox_map: MailboxMap, user: str, mailboxes: Sequence[str], clock: Any,
                         seconds: float) -> bool:
    """True once no MOVE across holds any of *mailboxes* (moves_holding); False if one still does
    after *seconds* (at once without a clock)."""
    async for _ in pauses(clock, seconds, _FIRST, _MOST):
        if not await moves_holding(mailbox_map, user, mailboxes):
            return True
    return False
