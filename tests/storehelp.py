"""Driving the map store's coroutines from a plain test, for every store (PostgreSQL's answer in its threads)."""

from __future__ import annotations

import queue
from collections.abc import Awaitable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


class _Never:
    """A timer that never fires (ThreadedReactor.callLater)."""

    def active(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class ThreadedReactor:
    """Just enough reactor for the stores: calls made from other threads run when the test waits."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Any, tuple, dict]] = queue.Queue()

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        self.calls.put((f, args, kw))

    def addSystemEventTrigger(self, *args: Any, **kw: Any) -> None:
        pass

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> _Never:
        return _Never()  # timeouts: the test's own wait() bounds everything

    def wait(self, aw: Awaitable[T], timeout: float = 60.0) -> T:
        d = defer.ensureDeferred(aw)  # type: ignore[arg-type]
        while not d.called:
            f, args, kw = self.calls.get(timeout=timeout)
            f(*args, **kw)
        result: list[Any] = []
        d.addBoth(result.append)
        if isinstance(result[0], Failure):
            result[0].raiseException()
        return result[0]


REACTOR = ThreadedReactor()


def now(aw: Awaitable[T]) -> T:
    """The result of a store or map coroutine (raising what it raised)."""
    return REACTOR.wait(aw)
