"""Lease fencing (PostgreSQL map): a move's backend commands go out only while this process surely owns its entry.

Another process takes an entry over once its lease ran out on the database (``lease_until < now()``): its owner
may be stalled for good (SIGSTOP, a paused VM, the database out of its reach). The owner, back, must not act on
the backends beside the new one: two drains of one move lost mail from sight (CI of 69b8dd2, within one process).
Every write that renews a lease (begin, claim, a journal step, the renewal loop) notes when it was SENT; a command
on a connection fenced for an entry goes out at once while the newest such write was sent less than half a lease
ago, else it waits for a renewal of its own; one that finds the entry no longer this process's cuts the connection,
its commands failing with LostEntry. The database grants a lease from when it runs the write, after it was sent:
this process acts only within half a lease of a moment it owned the entry, another claims a whole lease after it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from twisted.internet import defer

from .journal import JournalEntry, LostEntry

__all__ = ["Fences", "MARGIN"]

MARGIN = 0.5  # the share of a lease past its renewal's sending within which a fenced command goes out unasked


class Fences:
    """When each of this process's entries was last renewed (monotonic time the renewing write was sent)."""

    def __init__(self, store: Any, owner: Callable[[], str], clock: Callable[[], float] = time.monotonic) -> None:
        self._store, self._owner, self._clock = store, owner, clock
        self._renewed: dict[int, float] = {}

    @property
    def active(self) -> bool:
        return bool(getattr(self._store, "leases", False))  # SQLite, memory: an owner is taken over dead only

    def sending(self) -> float:
        """The time to note before a write that renews leases is sent (see renewed)."""
        return self._clock()

    def renewed(self, ids: Iterable[int], sent: float) -> None:
        for i in ids:
            self._renewed[i] = max(sent, self._renewed.get(i, sent))

    def forget(self, entry_id: int) -> None:
        """Ended, or given up: whatever is sent for it next asks the store first (and finds it not ours)."""
        self._renewed.pop(entry_id, None)

    def check(self, entry: JournalEntry) -> defer.Deferred[None] | None:
        """None: send now. Else a Deferred that fires once a renewal proved *entry* ours (LostEntry if not)."""
        if not self.active or entry.ended:
            return None
        lease = float(self._store.lease_seconds)
        if self._clock() - self._renewed.get(entry.id, float("-inf")) < lease * MARGIN:
            return None
        return defer.ensureDeferred(self._renew(entry))

    async def proven(self, entry: JournalEntry) -> None:
        """Return once *entry* is surely this process's (at once while its lease is fresh); LostEntry if not."""
        if (proving := self.check(entry)) is not None:
            await proving

    async def _renew(self, entry: JournalEntry) -> None:
        sent = self._clock()
        if entry.id not in await self._store.renew(self._owner(), [entry.id]):
            raise LostEntry(f"journal entry {entry.id} is no longer ours (taken over by recovery past its lease)")
        self.renewed([entry.id], sent)

    def guard(self, conn: Any, entry: JournalEntry) -> Any:
        """Fence *conn*'s commands for *entry* (backend.BackendProtocol.fence); *conn* returned."""
        if self.active:
            conn.fence = lambda: self.check(entry)
        return conn

    def guarding(self, connect: Callable[[str], Awaitable[Any]],
                 entry: JournalEntry) -> Callable[[str], Awaitable[Any]]:
        """*connect*, its connections fenced for *entry*."""
        async def fenced_connect(name: str) -> Any:
            return self.guard(await connect(name), entry)
        return fenced_connect
