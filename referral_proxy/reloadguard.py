"""SIGHUP: a file that drops a backend the map still names is refused, and says what names it.

Seen: a reload removing b3 while a RENAME across to b3 ran was applied; the move finished onto
b3 (OK to the client), its placement named a backend the proxy no longer had, and the mailbox
answered NO [UNAVAILABLE] from then on (its 20 messages on b3, out of reach). A placement
(an old home's record too) or a journal entry in progress naming the backend keeps it: move
the mail off first (``referral-proxy move``), let the entry finish, then reload.
"""

from __future__ import annotations

from .routing import MailboxMap

__all__ = ["still_named"]

ENTRY_KEYS = ("src", "dst", "backend")  # the journal entries' data naming backends (mover, transfer, localrename, staging)


async def still_named(mailbox_map: MailboxMap, removed: set[str]) -> list[str]:
    """What in the map names a backend of *removed*; StoreUnavailable if the journal cannot be read."""
    found = [f"placement of {u} {m} -> {','.join(b)}" for u, m, b in mailbox_map.placed_on(removed)]
    for entry in await mailbox_map.entries():
        named = sorted({str(entry.data.get(k)) for k in ENTRY_KEYS} & removed)
        if named:
            found.append(f"journal entry {entry.id} ({entry.op} of {entry.user}) on {', '.join(named)}")
    return found
