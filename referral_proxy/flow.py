"""Flow control between a client and its backends: who may read, and in what order output goes.

A ReadGate pauses reading from a transport while any reason holds (the session
waiting for a backend; a backend's full socket); ClientOutput, registered on the
client's transport from its first moment, stops reading commands and pauses every
backend (AllBackends) while the client's own output is backed up, so a client that
never reads its answers holds a bounded amount of memory; Output keeps each
response whole on the client's connection when several backends and the proxy
itself write to it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from .lean import SmallSet

__all__ = ["Block", "ReadGate", "PeerPause", "AllBackends", "ClientOutput", "Output", "ClientFlow"]


class Block(Enum):
    """Why a session stops reading commands from its client (several may hold at once)."""

    TASK = "a command waits for a connection or a quiet backend"
    LOGIN = "a login is being checked"
    BACKEND_LITERAL = "a relayed command waits for the backend's + before its next literal"
    DECISION = "a message literal of an APPEND waits for the backend's + (or refusal)"
    STAGING = "an emulated MULTIAPPEND commits through the session's connection: the next command waits"
    OUTPUT = "the client's output is backed up: it must read its answers before it may send more"
    QUEUED = "an answer of the proxy's own waits behind a backend's response"
    IN_FLIGHT = "as many commands as allowed are waiting for their answers"
    IDLE_ENDING = "DONE went before the backend's +: the IDLE's own + and answer come first"
    TURN = "this session had its turn: the other connections ready go first"
    HELD = "a refusal of the proxy's own waits for the APPENDs before it to be answered"
    HOLDS = "a RENAME waits a moment for names another operation's check holds (holds.py)"
    SETTLING = "a command the proxy carries out on the selected mailbox waits for the SELECT/CLOSEs before it"
    STOPPING = "the session ends (the proxy stops, its selected backend went): what others have whole is answered first"

    # Members are singletons: hashed by identity in C, not by Enum's own __hash__ (a Python
    # call, hash(name), ~0.3 us): sets and frozensets of them are tested on every command.
    __hash__ = object.__hash__


@implementer(IPushProducer)
class ReadGate:
    """Pauses reading from a transport while any reason holds.

    The session adds its own reasons (waiting for a backend); each backend
    connection pauses it under a reason of its own (back-pressure).
    """

    __slots__ = ("_transport", "_reasons")  # no per-instance dict

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: SmallSet = SmallSet()

    def pause(self, reason: object) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: object) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            transport = self._transport
            if not self._reasons and not (getattr(transport, "disconnected", False)
                                          or getattr(transport, "disconnecting", False)):
                transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause("peer")

    def resumeProducing(self) -> None:
        self.resume("peer")

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class PeerPause:
    """The client's ReadGate as seen by one backend connection's transport."""

    __slots__ = ("_gate", "_reason")  # no per-instance dict

    def __init__(self, gate: ReadGate, reason: str) -> None:
        self._gate, self._reason = gate, reason

    def pauseProducing(self) -> None:
        self._gate.pause(self._reason)

    def resumeProducing(self) -> None:
        self._gate.resume(self._reason)

    def stopProducing(self) -> None:
        # The backend connection is gone: its back-pressure on the client goes with it, and its hold.
        self._gate.resume(self._reason)
        self._gate.resume((self._reason, "held"))

    def hold(self) -> None:
        """Another session's RENAME holds this connection's next command back (renamehold.py): the client
        waits with it, for a reason of its own that the backend's buffer draining meanwhile does not lift."""
        self._gate.pause((self._reason, "held"))

    def unhold(self) -> None:
        self._gate.resume((self._reason, "held"))


@implementer(IPushProducer)
class AllBackends:
    """Registered on the client's transport: a slow client pauses every backend."""

    __slots__ = ("paused", "transports", "held")  # no per-instance dict

    def __init__(self) -> None:
        self.paused = False
        self.transports: SmallSet = SmallSet()
        self.held: SmallSet = SmallSet()  # paused for another reason (Output's queue): left paused

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
            if t not in self.held and not getattr(t, "disconnected", False):
                t.resumeProducing()

    def hold(self, transport: Any) -> None:
        self.held.add(transport)
        transport.pauseProducing()

    def release(self, transport: Any) -> None:
        self.held.discard(transport)
        if not self.paused and not getattr(transport, "disconnected", False):
            transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IPushProducer)
class ClientOutput:
    """Registered on the client's transport when it connects: while the transport's
    buffer is over its size, no command is read (Block.OUTPUT) and every backend is paused."""

    __slots__ = ("backends", "_flow", "paused", "resumes", "_drained")  # no per-instance dict

    def __init__(self, backends: AllBackends, flow: ClientFlow) -> None:
        self.backends = backends
        self._flow = flow  # not two bound methods of it: less kept per session
        self.paused = False
        self.resumes = 0  # times the client read enough to unblock: a slow reader's progress (copycommand.py)
        self._drained: tuple[Deferred[None], ...] = ()

    def drained(self) -> Deferred[None]:
        """Fires once the client's output is not backed up (at once if it is not): a relayed MOVE
        takes its turn then, its answer not left unread behind paused backends (copycommand.py)."""
        if not self.paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained += (d,)
        return d

    def pauseProducing(self) -> None:
        self.paused = True
        self._flow.block(Block.OUTPUT)
        self.backends.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1
        self.backends.resumeProducing()
        self._flow.unblock(Block.OUTPUT)
        waiters, self._drained = self._drained, ()
        for d in waiters:
            if not d.called:  # (a cancelled one: its session ended)
                d.callback(None)

    def stopProducing(self) -> None:
        pass


def _pause_transport(source: object) -> None:
    transport = getattr(source, "transport", None)
    if transport is not None:
        transport.pauseProducing()


def _resume_transport(source: object) -> None:
    if not getattr(source, "closed", False):
        source.transport.resumeProducing()  # type: ignore[attr-defined]


_CUT = object()  # the owner of a response its source never finished: nothing is written after it


def _after_the_end(_data: bytes) -> None:
    """Written once the session closes (its BYE or LOGOUT answer said): dropped, as Dovecot writes nothing after
    its BYE (the answer of a COPY across cut off by the proxy's stop came after it: probe h3 of stop 58)."""


class Output:
    """Serializes what several sources write to the client, a whole response at a time.

    A source whose response must wait is held meanwhile (*hold*: a backend's transport
    is paused, the session stops reading commands), so the queue holds at most what
    it had already produced; *release* lets it go on once its queue is written.
    """

    __slots__ = ("_write", "_hold", "_release", "_owner", "_queue", "_paused")  # no per-instance dict

    def __init__(self, write: Callable[[bytes], None], hold: Callable[[object], None] = _pause_transport,
                 release: Callable[[object], None] = _resume_transport) -> None:
        self._write = write
        self._hold, self._release = hold, release
        self._owner: object = None  # the source in the middle of a response
        self._queue: list[tuple[object, bytes, bool]] = []  # a deque is 760 bytes empty
        self._paused: SmallSet = SmallSet()

    def write(self, source: object, data: bytes, end: bool = True) -> None:
        if self._owner is None or self._owner is source:
            self._write(data)
            self._owner = None if end else source
            if self._owner is None and self._queue:
                self._flush()
        else:
            self._queue.append((source, data, end))
            # Held again each time: another producer (the client's drained output) may
            # have resumed it meanwhile, and its queue must not grow past one read.
            self._paused.add(source)
            self._hold(source)

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
                self._release(source)

    @property
    def between_responses(self) -> bool:
        """Nothing is in the middle of a response or waits: a line of the proxy's own goes out whole now."""
        return self._owner is None and not self._queue

    @property
    def queued(self) -> int:
        """Writes waiting for another source's response to end."""
        return len(self._queue)

    def holds(self, source: object) -> bool:
        """Whether *source* is held because its output waits in the queue."""
        return source in self._paused

    def abandon(self, source: object) -> bool:
        """*source* is gone: let the others through. True if it was mid-response (a FETCH literal): the client
        would read whatever came next as the rest of it, so nothing ever is (session.py closes the connection)."""
        if self._owner is source:
            self._owner = _CUT
            return True
        self._queue = [item for item in self._queue if item[0] is not source]
        self._paused.discard(source)
        self._flush()
        return False


class ClientFlow:
    """One client connection's flow: the reasons it is not read (each released by its owner
    only), its serialized output, and back-pressure both ways (a backend's full socket
    pauses the client; the client's full output pauses every backend and the commands)."""

    __slots__ = (  # no per-instance dict: a proxy holds thousands of idle sessions
        "own", "blocked", "gate", "backends", "client_output", "out", "_write", "_pump", "_abort_timer",
        "_registered", "handshaking",
    )

    def __init__(self, own: object, write: Callable[[bytes], None], pump: Callable[[], None]) -> None:
        self.own = own  # the source of the proxy's own answers (the session)
        self.blocked: SmallSet = SmallSet()
        self.gate: ReadGate | None = None
        self.backends = AllBackends()
        self.client_output = ClientOutput(self.backends, self)
        self.out = Output(write, self._hold, self._release)
        self._write = write
        self._pump = pump
        self._abort_timer: Any = None
        self._registered = False  # client_output is the transport's producer
        # A TLS handshake is under way (a TLS listener's, or after STARTTLS): nothing written
        # reaches the client before it ends, so a BYE cannot be waited for (session.py aborts).
        self.handshaking = False

    def connect(self, transport: Any, *, produce: bool = True) -> None:
        """The client connected: from now on its full output stops the commands (with
        *produce* false, only once ``produce`` is called: see ``produce``)."""
        self.gate = ReadGate(transport)
        if produce:
            self.produce(transport)
        else:
            self.handshaking = True

    def produce(self, transport: Any) -> None:
        """Register the client's output as the transport's producer, once. A TLS transport
        pauses its producer while it buffers what is written before the handshake: the
        greeting would stop the reading, and with it the handshake (a TLS listener's
        session registers once the handshake is done)."""
        self.handshaking = False
        if not self._registered:
            transport.registerProducer(self.client_output, True)
            self._registered = True

    @property
    def output_backed_up(self) -> bool:
        """The client has not read what it was sent (its transport's buffer is full)."""
        return self.client_output.paused

    def block(self, reason: Block) -> None:
        self.blocked.add(reason)
        if self.gate is not None:
            self.gate.pause(reason)

    def block_commands(self, reason: Block) -> None:
        """Like block, but the socket is paused only by ``pause_if_blocked``: a hold that usually
        ends within the call that began it (a login taking a parked backend connection) costs no
        stopReading and startReading (two epoll_ctl calls)."""
        self.blocked.add(reason)

    def pause_if_blocked(self, reason: Block) -> None:
        """The socket too, if *reason* still holds (the call that began it returns to the reactor)."""
        if reason in self.blocked and self.gate is not None:
            self.gate.pause(reason)

    def unblock(self, reason: Block) -> None:
        """*reason* is over: read on (the session's pump) if no other holds."""
        self.blocked.discard(reason)
        if self.gate is not None:
            self.gate.resume(reason)
        self._pump()

    def next_turn(self, reactor: Any) -> None:
        """Read on once the reactor has served every other connection ready now."""
        if Block.TURN not in self.blocked:
            self.block(Block.TURN)
            reactor.callLater(0, self.unblock, Block.TURN)

    def pause_reading(self, reason: Block) -> None:
        """Stop reading the socket only (the reader itself said why: a pending decision)."""
        if self.gate is not None:
            self.gate.pause(reason)

    def resume_reading(self, reason: Block) -> None:
        if self.gate is not None:
            self.gate.resume(reason)

    def attach(self, proto: Any) -> None:
        """A new backend connection: each side becomes the other's producer."""
        self.backends.add(proto.transport)
        assert self.gate is not None
        proto.transport.registerProducer(PeerPause(self.gate, f"backend:{proto.name}"), True)

    def detach(self, proto: Any) -> bool:
        """A backend connection is gone: the others' output goes on, unless it was mid-response (True)."""
        self.backends.transports.discard(proto.transport)
        self.backends.held.discard(proto.transport)
        return self.out.abandon(proto)

    def close(self, transport: Any, reactor: Any, grace: float) -> None:
        """Close once what was written is out; abort if that takes over *grace* seconds
        (a client that does not read holds its memory no longer)."""
        if self._registered:
            # Twisted closes only once no producer is registered: a paused one, resumed when
            # the output drains, would keep the connection open.
            self._registered = False
            transport.unregisterProducer()
        transport.loseConnection()
        self.out = Output(_after_the_end)
        if self._abort_timer is None:
            self._abort_timer = reactor.callLater(grace, self.abort, transport)

    def abort(self, transport: Any) -> None:
        """Drop the connection now, unsent output and all."""
        self.closed()
        if transport is not None and not getattr(transport, "disconnected", False):
            transport.abortConnection()

    def closed(self) -> None:
        """The connection is gone: nothing left to abort."""
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None

    def unqueued(self) -> None:
        """From now on the proxy's own output goes out at once (shutdown: a BYE must not wait)."""
        self.out = Output(self._write)

    def _hold(self, source: object) -> None:
        """*source*'s output must wait behind another's response: it produces no more meanwhile
        (a backend is paused; the session itself reads no command)."""
        if source is self.own:
            self.block(Block.QUEUED)
        else:
            self.backends.hold(source.transport)  # type: ignore[attr-defined]

    def _release(self, source: object) -> None:
        if source is self.own:
            self.unblock(Block.QUEUED)
        elif not getattr(source, "closed", False):
            self.backends.release(source.transport)  # type: ignore[attr-defined]
