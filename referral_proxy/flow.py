"""Flow control between a client and its backends: who may read, and in what order output goes.

A ReadGate pauses reading from a transport while any reason holds (the session
waiting for a backend; a backend's full socket); _AllBackends lets a slow client
pause every backend; Output keeps each response whole on the client's connection
when several backends and the proxy itself write to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["Block", "ReadGate", "PeerPause", "AllBackends", "Output"]


class Block(Enum):
    """Why a session stops reading commands from its client (several may hold at once)."""

    TASK = "a command waits for a connection or a quiet backend"
    LOGIN = "a login is being checked"
    BACKEND_LITERAL = "a relayed command waits for the backend's + before its next literal"
    DECISION = "a message literal of an APPEND waits for the backend's + (or refusal)"
    STAGING = "an emulated MULTIAPPEND commits through the session's connection: the next command waits"


@implementer(IPushProducer)
class ReadGate:
    """Pauses reading from a transport while any reason holds.

    The session adds its own reasons (waiting for a backend); each backend
    connection pauses it under a reason of its own (back-pressure).
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[object] = set()

    def pause(self, reason: object) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: object) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and not getattr(self._transport, "disconnected", False):
                self._transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause("peer")

    def resumeProducing(self) -> None:
        self.resume("peer")

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class PeerPause:
    """The client's ReadGate as seen by one backend connection's transport."""

    def __init__(self, gate: ReadGate, reason: str) -> None:
        self._gate, self._reason = gate, reason

    def pauseProducing(self) -> None:
        self._gate.pause(self._reason)

    def resumeProducing(self) -> None:
        self._gate.resume(self._reason)

    def stopProducing(self) -> None:
        # The backend connection is gone: its back-pressure on the client goes with it.
        self._gate.resume(self._reason)


@implementer(IPushProducer)
class AllBackends:
    """Registered on the client's transport: a slow client pauses every backend."""

    def __init__(self) -> None:
        self.paused = False
        self.transports: set[Any] = set()

    def add(self, transport: Any) -> None:
        self.transports.add(transport)
        if self.paused:
            transport.pauseProducing()

    def pauseProducing(self) -> None:
        self.paused = True
        for t in self.transports:
            t.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        for t in list(self.transports):
            if not getattr(t, "disconnected", False):
                t.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Output:
    """Serializes what several sources write to the client, a whole response at a time.

    A backend whose response must wait is paused meanwhile, so the queue holds
    at most what it had already read.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._owner: object = None  # the source in the middle of a response
        self._queue: deque[tuple[object, bytes, bool]] = deque()
        self._paused: set[Any] = set()

    def write(self, source: object, data: bytes, end: bool = True) -> None:
        if self._owner is None or self._owner is source:
            self._write(data)
            self._owner = None if end else source
            if self._owner is None and self._queue:
                self._flush()
        else:
            self._queue.append((source, data, end))
            transport = getattr(source, "transport", None)
            if transport is not None and source not in self._paused:
                self._paused.add(source)
                transport.pauseProducing()

    def _flush(self) -> None:
        while self._queue:
            index = 0
            if self._owner is not None:
                index = next((i for i, (s, _d, _e) in enumerate(self._queue) if s is self._owner), -1)
                if index < 0:
                    return
            source, data, end = self._queue[index]
            del self._queue[index]
            self._write(data)
            self._owner = None if end else source
        for source in list(self._paused):
            if not any(s is source for s, _d, _e in self._queue):
                self._paused.discard(source)
                if not getattr(source, "closed", False):
                    source.transport.resumeProducing()  # type: ignore[attr-defined]

    def abandon(self, source: object) -> None:
        """*source* is gone mid-response: let the others through."""
        if self._owner is source:
            self._owner = None
        self._queue = deque(item for item in self._queue if item[0] is not source)
        self._paused.discard(source)
        self._flush()
