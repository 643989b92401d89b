"""One relayed MOVE at a time per mailbox in this process: Dovecot 2.3 lets two sessions' MOVEs of one
message, running at once, both succeed (the message then in both destinations: tests/dovecot_move_race.py,
31 of 60 rounds direct); one after the other, the second finds it gone."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet import defer

__all__ = ["Release", "Turns"]

Release = Callable[[], None]


class Turns:
    """First come, first served per key (a Twisted DeferredLock each); a waiter cancelled (its session
    gone) leaves the queue; a key's lock is dropped once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, defer.DeferredLock] = {}

    def take(self, key: Hashable) -> defer.Deferred[Release]:
        """Fires with the function that ends this turn (once, from any path: it may be called again)."""
        lock = self._locks.setdefault(key, defer.DeferredLock())
        return lock.acquire().addCallback(lambda _: self._release(key, lock))

    def busy(self, key: Hashable) -> bool:
        lock = self._locks.get(key)
        return lock is not None and lock.locked

    def _release(self, key: Hashable, lock: defer.DeferredLock) -> Release:
        ended = False

        def release() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            lock.release()
            if not lock.locked:
                del self._locks[key]

        return release
