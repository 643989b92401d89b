"""SIGHUP: a file that drops a backend the map still names is refused, and says what names it; so is one
that changes the endpoint of a backend a journal entry in progress names.

Seen: a reload removing b3 while a RENAME across to b3 ran was applied; the move finished onto
b3 (OK to the client), its placement named a backend the proxy no longer had, and the mailbox
answered NO [UNAVAILABLE] from then on (its 20 messages on b3, out of reach). A placement
(an old home's record too) or a journal entry in progress naming the backend keeps it: move
the mail off first (``referral-proxy move``), let the entry finish, then reload.

Seen too: b3's endpoint pointed at another server while `move` to b3 ran, the move killed: the
recovery rolled back on the new server (the copies on the real b3 left: mail twice; a mailbox there
of the same UIDVALIDITY lost the journaled UIDs). A placement survives a new endpoint (the same
mail at a new address); an entry in progress is refused until it has finished or been recovered.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from .routing import MailboxMap

__all__ = ["still_named"]

ENTRY_KEYS = ("src", "dst", "backend")  # the journal entries' data naming backends (mover, transfer, localrename, staging)


async def still_named(mailbox_map: MailboxMap, removed: set[str], repointed: AbstractSet[str] = frozenset()) -> list[str]:
    """What in the map names a backend of *removed*, or a journal entry one of *repointed* (its endpoint
    changed: a recovery would roll back or finish on another server); StoreUnavailable if the journal
    cannot be read."""
    found = [f"placement of {u} {m} -> {','.join(b)}" for u, m, b in mailbox_map.placed_on(removed)] if removed else []
    for entry in await mailbox_map.entries():
        named = sorted({str(entry.data.get(k)) for k in ENTRY_KEYS} & (removed | repointed))
        if named:
            found.append(f"journal entry {entry.id} ({entry.op} of {entry.user}) on {', '.join(named)}")
    return found
