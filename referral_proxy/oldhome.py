"""Mail delivered to a user's old INBOX after a move took INBOX (the user's home) elsewhere.

Delivery agents (LMTP, LDA, Sieve) are not the proxy's: until the administrator points them
at the new home -- and for any delivery racing the move's last round -- mail keeps reaching the
old backend's INBOX, where no client of the proxy would ever see it. So a move that takes INBOX
to another backend leaves a record in the map (a private placement, routing.OLD_HOME_PREFIX),
as does one that takes a mailbox from a backend that is not the home (a delivery still sent to
the moved name there goes to that backend's INBOX: dovecot-lda's "Mailbox doesn't exist"; probe
e4 of stop 56),
and every running proxy's recovery sweep (and ``referral-proxy recover``) carries whatever that
INBOX holds to the user's INBOX, as a journaled move: exactly once, crash-safe, for
routing.OLD_HOME_WATCH seconds (MailboxMap.watch_old_home writes the record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .appendturns import mover_turn
from .journal import Reservation, StoreUnavailable
from .mailops import TransferError, status
from .mover import ASIDE, Connect, Mover
from .routing import OLD_HOME_PREFIX, MailboxMap

__all__ = ["carry_old_homes"]


@dataclass
class _Carry(Mover):
    """A move of an old home's INBOX to the user's INBOX that keeps no client out of INBOX.

    Clients never reach the old INBOX (the map routes INBOX to the home), and the home's INBOX
    always exists: so it is pinned as a cross-server MOVE pins its mailboxes (shared: SELECT,
    APPEND, STORE go on; a RENAME of INBOX or a whole-user move waits), and carries of one old
    home take turns by a private name of their own."""

    old_home: str = ""  # the backend carried from
    # No client saw its messages there: taken as deliveries by an INBOX of its UIDVALIDITY too (the home's, when the
    # move let INBOX onto one; refused, they stayed where no client sees them: soak seed 7001, stop 49)
    inbox_seen: bool = False
    routed: bool = False  # the map sends INBOX to the home, not here

    def _reservations(self, data: dict) -> list[Reservation]:
        return [Reservation("INBOX", shared=True), Reservation(OLD_HOME_PREFIX + self.old_home),
                Reservation(ASIDE + data["token"])]


async def carry_old_homes(mailbox_map: MailboxMap, connector: Callable[[str], Connect], clock: Any,
                          turns: Any = None) -> list[str]:
    """Carry what each watched old INBOX holds to the user's INBOX; drop records whose backend is the home
    again, and those expired once their INBOX is empty (probe r5: dropped with mail waiting, an over-quota home
    refusing it, and no word of it; now said at each sweep until carried) (*turns*: as recovery.recover_entry's).
    One line per carry or failure (a record's failure does not keep the others from being looked at)."""
    lines = []
    now = clock.seconds()
    for old in mailbox_map.old_homes():
        home = mailbox_map.home(old.user).primary
        if home == old.backend:
            await mailbox_map.unplace(old.user, old.record)
            continue
        expired = old.until <= now
        if mailbox_map.reserved(old.user, "INBOX"):
            continue  # a move holds it (perhaps the one that wrote the record): the next sweep
        connect = connector(old.user)
        try:
            conn = await connect(old.backend)
            try:
                waiting = (await status(conn, "INBOX")).messages
            finally:
                conn.logout()
            if not waiting:
                if expired:  # (nothing waits: the watch ends)
                    await mailbox_map.unplace(old.user, old.record)
                continue
            if expired:
                lines.append(f"{old.user}: the watch of the old INBOX on {old.backend} is over, yet {waiting} "
                             f"message(s) wait there: still carried to {home}, until none is left")
            carry = _Carry(mailbox_map, connect, old.user, clock=clock, old_home=old.backend,
                           turn=None if turns is None else mover_turn(turns, old.user))
            result = await carry.rename("INBOX", "INBOX", old.backend, home)
        except StoreUnavailable:
            raise
        except Exception as e:  # a backend away, a move left to recovery: said, and tried at the next sweep
            if not (isinstance(e, TransferError) and "[INUSE]" in str(e)):  # INUSE: another sweep or a move was first
                lines.append(f"{old.user}: mail delivered to the old INBOX on {old.backend} not carried to {home} "
                             f"now: {e}")
            continue
        lines.append(f"{old.user}: carried {result.messages} message(s) delivered to the old INBOX on {old.backend} "
                     f"to {home}")
    return lines
