"""One relayed MOVE at a time per mailbox in this process: Dovecot 2.3 lets two sessions' MOVEs of one
message, running at once, both succeed (the message then in both destinations: tests/dovecot_move_race.py,
31 of 60 rounds direct); one after the other, the second finds it gone."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet import defer

__all__ = ["Release", "Turns"]

Release = Callable[[], None]


class Turns:
    """First come, first served per key; a waiter cancelled (its session gone) is passed over."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, list[defer.Deferred[Release]]] = {}  # key present: its turn is taken

    def take(self, key: Hashable) -> defer.Deferred[Release]:
        """Fires with the function that ends this turn (once, from any path: it may be called again)."""
        d: defer.Deferred[Release] = defer.Deferred()
        queue = self._waiting.get(key)
        if queue is None:
            self._waiting[key] = []
            d.callback(self._release(key))
        else:
            queue.append(d)
        return d

    def busy(self, key: Hashable) -> bool:
        return key in self._waiting

    def _release(self, key: Hashable) -> Release:
        ended = False

        def release() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            queue = self._waiting[key]
            while queue:
                nxt = queue.pop(0)
                if not nxt.called:  # (a cancelled one has been called, with CancelledError)
                    nxt.callback(self._release(key))
                    return
            del self._waiting[key]

        return release
