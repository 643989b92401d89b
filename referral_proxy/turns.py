"""One relayed MOVE at a time per mailbox in this process: Dovecot 2.3 lets two sessions' MOVEs of one
message, running at once, both succeed (the message then in both destinations: tests/dovecot_move_race.py,
31 of 60 rounds direct); one after the other, the second finds it gone.

A turn is also held *shared*, by many at once: an APPEND holds its mailbox's (appendturns.py) while a
RENAME of that mailbox or a parent, which takes it exclusive, waits for them all; an APPEND arriving
while a RENAME holds or waits for the turn waits for it (first come, first served)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from functools import partial

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
        self.states: dict[Hashable, _Key] = {}  # key present: its turn is held exclusive or waited for (or was)
        self._shared: dict[Hashable, int] = {}  # shared holders of keys not in states

    def _state(self, key: Hashable) -> _Key:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _Key()
            state.shared = self._shared.pop(key, 0)
        return state

    def take(self, key: Hashable) -> defer.Deferred[Release]:
        """The exclusive turn: fires with the function that ends it (once, from any path: it may be
        called again), once nobody holds the turn, shared or not, and those before have had it."""
        d: defer.Deferred[Release] = defer.Deferred()
        state = self._state(key)
        if state.exclusive or state.shared or state.queue:
            state.queue.append((d, True))
        else:
            state.exclusive = True
            d.callback(self._release(key, state, True))
        return d

    def try_share(self, key: Hashable) -> Release | None:
        """The turn held shared at once, or None while an exclusive holder holds or waits for it.
        The hot path of every APPEND (appendturns.py): uncontended, a count in a dict, no object
        but the release (which must be called once: the caller sees to it)."""
        state = self.states.get(key)
        if state is None:
            shared = self._shared
            shared[key] = shared.get(key, 0) + 1
            return partial(self._unshare, key)
        if state.exclusive or state.queue:
            return None
        state.shared += 1
        return self._release(key, state, False)

    def _unshare(self, key: Hashable) -> None:
        """The end of a shared turn taken with nobody else interested (_shared): a RENAME that came
        meanwhile moved the count into its key's state."""
        state = self.states.get(key)
        if state is None:
            shared = self._shared
            left = shared[key] - 1
            if left:
                shared[key] = left
            else:
                del shared[key]
            return
        state.shared -= 1
        self._next(key, state)

    def share(self, key: Hashable) -> defer.Deferred[Release]:
        """The turn held shared, once the exclusive holders before it have had theirs."""
        release = self.try_share(key)
        if release is not None:
            return defer.succeed(release)
        d: defer.Deferred[Release] = defer.Deferred()
        self.states[key].queue.append((d, False))
        return d

    def busy(self, key: Hashable) -> bool:
        return key in self.states or key in self._shared

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
        if not (state.exclusive or state.shared or queue) and self.states.get(key) is state:
            del self.states[key]
