"""One relayed MOVE at a time per mailbox in this process: Dovecot 2.3 lets two sessions' MOVEs of one
message, running at once, both succeed (the message then in both destinations: tests/dovecot_move_race.py,
31 of 60 rounds direct); one after the other, the second finds it gone.

A turn is also held *shared*, by many at once: an APPEND holds its mailbox's (appendturns.py) while a
RENAME of that mailbox or a parent, which takes it exclusive, waits for them all; an APPEND arriving
while a RENAME holds or waits for the turn waits for it (first come, first served)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

from twisted.internet import defer

__all__ = ["Release", "Turns"]

Release = Callable[[], None]


class _Key:
    """One key's turn: held exclusive, or by *shared* holders; the waiters in order (deferred, exclusive)."""

    __slots__ = ("exclusive", "shared", "queue")

    def __init__(self) -> None:
        self.exclusive = False
        self.shared = 0
        self.queue: deque[tuple[defer.Deferred[Release], bool]] = deque()


class Turns:
    """First come, first served per key; a waiter cancelled (its session gone) is passed over."""

    def __init__(self) -> None:
        self._keys: dict[Hashable, _Key] = {}  # key present: its turn is held (or waited for)

    def take(self, key: Hashable) -> defer.Deferred[Release]:
        """The exclusive turn: fires with the function that ends it (once, from any path: it may be
        called again), once nobody holds the turn, shared or not, and those before have had it."""
        d: defer.Deferred[Release] = defer.Deferred()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        if state.exclusive or state.shared or state.queue:
            state.queue.append((d, True))
        else:
            state.exclusive = True
            d.callback(self._release(key, state, True))
        return d

    def try_share(self, key: Hashable) -> Release | None:
        """The turn held shared at once, or None while an exclusive holder holds or waits for it."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        elif state.exclusive or state.queue:
            return None
        state.shared += 1
        return self._release(key, state, False)

    def share(self, key: Hashable) -> defer.Deferred[Release]:
        """The turn held shared, once the exclusive holders before it have had theirs."""
        release = self.try_share(key)
        if release is not None:
            return defer.succeed(release)
        d: defer.Deferred[Release] = defer.Deferred()
        self._keys[key].queue.append((d, False))
        return d

    def busy(self, key: Hashable) -> bool:
        return key in self._keys

    def _release(self, key: Hashable, state: _Key, exclusive: bool) -> Release:
        ended = False

        def release() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            if exclusive:
                state.exclusive = False
            else:
                state.shared -= 1
            self._next(key, state)

        return release

    def _next(self, key: Hashable, state: _Key) -> None:
        """Give the turn to the waiters next in line (several shared ones together)."""
        queue = state.queue
        while queue and not state.exclusive:
            d, exclusive = queue[0]
            if d.called:  # cancelled (called with CancelledError)
                queue.popleft()
                continue
            if exclusive and state.shared:
                break
            queue.popleft()
            if exclusive:
                state.exclusive = True
            else:
                state.shared += 1
            d.callback(self._release(key, state, exclusive))  # (it may end its turn at once: state is re-read)
        if not (state.exclusive or state.shared or queue) and self._keys.get(key) is state:
            del self._keys[key]
