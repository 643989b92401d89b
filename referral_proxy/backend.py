"""Client connections from the proxy to one IMAP backend.

A BackendProtocol speaks IMAP with the proxy's own tags: it reads the greeting,
runs internal commands (CAPABILITY, STARTTLS, login) and relays commands for a
session, handing every untagged response to the session's sink as raw bytes so
that big FETCH literals stream through without being parsed or held whole.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backendtypes import AuthenticationFailed, BackendError, BackendUnavailable, Credentials, Tagged, UntaggedResponse
from .config import BackendConfig
from .fastpath import completed_plain
from .imap.command import ParseError
from .imap.framing import NEED_DATA, Framer, Line, LineTooLong, LiteralData, LiteralEnd
from .imap.quoting import capability_sets
from .imap.response import ResponseStart, parse_response_start, plain_untagged
from .lean import SmallSet
from .netio import quick_ack, tune_socket
from .stall import Watch

__all__ = [
    "BackendError", "BackendUnavailable", "NotConnected", "AuthenticationFailed", "BackendProtocol",
    "Credentials", "ResponseSink", "Tagged",
]

log = Logger()

# Responses from a backend are trusted more than client input, but a line still
# has to fit in memory: a SEARCH answer of a mailbox with millions of messages
# is the longest thing a backend sends without a literal.
BACKEND_MAX_LINE = 64 * 1024 * 1024


class ResponseSink(TypingProtocol):
    """Receives the untagged responses of a backend a session relays."""

    def untagged(self, backend: BackendProtocol, start: ResponseStart | None, data: bytes, end: bool) -> None:
        """Raw bytes of an untagged response; *start* is given with its first chunk."""

    def backend_lost(self, backend: BackendProtocol, reason: Failure) -> None:
        """The connection is gone."""


@dataclass(slots=True)
class _Pending:
    on_done: Callable[[ResponseStart, bytes], None]
    on_lost: Callable[[Failure], None] | None  # None: told by on_done(LOST) (the old convention)


@dataclass
class _Capturing:
    """An untagged response being captured whole."""

    start: ResponseStart
    fragments: list[bytes]
    literals: list[bytes]
    raw: list[bytes]
    literal: bytearray | None = None


class BackendProtocol(Protocol):
    """One IMAP connection to a backend, with the proxy's own command tags."""

    # Connected: a TCP (or TLS) transport. Twisted declares it with zope interfaces,
    # which mypy cannot follow without a plugin; what is used of it is plain.
    transport: Any
    # A move's own connection (fencing.Fences.guard): asked before each command; a Deferred holds it (and all
    # after it) until this process proved the move's entry its own; failed, the connection is cut (fenced_out).
    fence: Callable[[], defer.Deferred[None] | None] | None = None
    fenced_out: BaseException | None = None  # (class defaults: no room taken in a session's connections)

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.capabilities: frozenset[str] = frozenset()  # upper-cased, for membership tests
        self.capability_names: tuple[str, ...] = ()
        self.greeting: defer.Deferred[ResponseStart] = defer.Deferred()
        self.sink: ResponseSink | None = None
        self.on_continuation: Callable[[bytes], None] | None = None
        self.closed = self.bye_received = False
        self.bye = b""  # the BYE line it sent, if any
        self.enabled: SmallSet = SmallSet()  # extensions ENABLEd on this connection
        self.lost_reason: Failure | None = None
        self._socket: socket.socket | None = None
        self._framer = Framer(BACKEND_MAX_LINE, auto_accept=True)
        self._tags = itertools.count(1)  # not a generator: 56 bytes, not 416
        self._pending: dict[bytes, _Pending] = {}
        self._greeted = False
        # Untagged responses go to `tap` (event by event: streaming), else `capture` (internal commands), else the sink.
        self.tap: Callable[[ResponseStart | None, object], None] | None = None
        self.capture: list[UntaggedResponse] | None = None
        self._capturing: _Capturing | None = None
        # The response being received: "untagged" (relayed), "captured", "tagged", or None.
        self._current: str | None = None
        self._current_tagged: list[bytes] = []
        self._current_start: ResponseStart | None = None
        self.bytes_in = self.bytes_out = 0  # IMAP bytes each way (metrics)
        self.reused_at: tuple[int, int] | None = None  # (bytes_in, bytes_out) when keepalive handed it over
        self.reuse_key: Any = None  # keepalive.ReuseKey: how it logged in, for a session's connection
        self.logged_in_at = 0.0  # when (the reactor's clock): keepalive reuses it that long only
        self.clock: Any = None  # the reactor (open_connection): bounded internal commands (stall.py)
        self.stalled = False  # cut by stall.py: owed an answer, sent nothing for answer_timeout
        self._holding = 0  # RENAMEs (here or at another proxy) holding it back (renamehold.py) from the next command:
        self._held: list[bytes] | None = None  # ... what was written since, and the tags of those commands
        self._held_tags: list[bytes] = []
        self.renaming = 0  # a RENAME of this process runs here: another proxy's RENAME does not hold it

    # -- Twisted ------------------------------------------------------------

    def connectionMade(self) -> None:
        self._socket = tune_socket(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._current is None and completed_plain(self, data):
            return
        framer = self._framer
        # Untagged data nobody here looks at ("* 12 FETCH ...", literals): to the sink as read, else one write.
        if (self._current is None or self._current == "untagged") and self._relays:
            data = framer.take_partial(data)  # a line the last read ended in: whole again
            k = framer.pass_through(data, plain_untagged, self._current == "untagged")
            if k:
                self._current = "untagged" if framer.mid_line else None
                self._relay(data[:k], self._current is None)  # (the whole read: data itself)
                data = data[k:]
                if self._current is None and data and completed_plain(self, data):
                    return  # the completion after them (a FETCH's literals), from its bytes too
        framer.receive_data(data)
        batch: list[bytes] = []
        end = True
        while not self.closed and (event := framer.next_event()) is not NEED_DATA:
            current = self._current
            if current == "untagged" and isinstance(event, (LiteralData, LiteralEnd)):
                if isinstance(event, LiteralData):
                    batch.append(event.data)
                continue
            if isinstance(event, Line) and (not event.first if current == "untagged"
                                            else event.first and plain_untagged(event.data) and self._relays):
                batch.append(event.data + wire_tail(event))
                end = event.literal is None
                self._current = None if end else "untagged"
                continue
            if batch:
                self._relay(b"".join(batch), end)
                batch = []
            self._event(event)
        if batch:
            self._relay(b"".join(batch), end)
        if framer.mid_line and not self.closed:  # the rest may wait for our ACK (Nagle): send it now
            quick_ack(self._socket)

    @property
    def _relays(self) -> bool:  # untagged responses go to the session as they are (nothing captures them)
        return self._greeted and self.tap is None and self.capture is None and self.sink is not None

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.lost_reason = reason
        if not self._greeted:
            self._greeted = True
            self.greeting.errback(BackendUnavailable(f"connection closed before greeting: {reason.getErrorMessage()}"))
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.on_lost is not None:
                p.on_lost(reason)
            else:
                p.on_done(LOST, b"")
        if self.sink is not None:
            self.sink.backend_lost(self, reason)

    # -- reading responses ----------------------------------------------------

    def _event(self, event: object) -> None:
        if isinstance(event, Line):
            if event.first:
                self._begin(event)
            elif self._current == "tapped" and self.tap is not None:
                self.tap(None, event)
                if event.literal is None:
                    self._current = None
            elif self._current == "captured":
                self._capture_fragment(event)
            elif self._current == "untagged":
                self._relay(event.data + wire_tail(event), event.literal is None)
            elif self._current == "tagged":
                self._current_tagged.append(event.data + wire_tail(event))
                if event.literal is None:
                    self._finish_tagged()
        elif isinstance(event, (LiteralData, LiteralEnd)) and self._current == "tapped" and self.tap is not None:
            self.tap(None, event)
        elif isinstance(event, LiteralData):
            if self._current == "captured":
                assert self._capturing is not None and self._capturing.literal is not None
                self._capturing.literal += event.data
                self._capturing.raw.append(event.data)
            elif self._current == "untagged":
                self._relay(event.data, False)
            elif self._current == "tagged":
                self._current_tagged.append(event.data)
        elif isinstance(event, LiteralEnd):
            if self._current == "captured":
                assert self._capturing is not None and self._capturing.literal is not None
                self._capturing.literals.append(bytes(self._capturing.literal))
                self._capturing.literal = None
        elif isinstance(event, LineTooLong):
            log.error("backend {name} sent a line over {limit} bytes; closing", name=self.name, limit=event.limit)
            self.transport.abortConnection()

    def _begin(self, line: Line) -> None:
        try:
            start = parse_response_start(line.data)
        except ParseError as e:
            log.warn("backend {name} sent an unparsable response ({why}): {data!r}", name=self.name, why=str(e), data=line.data[:80])
            self._current = None
            return
        if not self._greeted:
            self._greeted = True
            if start.code == "CAPABILITY":
                self._set_capabilities(start.code_args)
            self.greeting.callback(start)
            return
        if start.kind == "continuation":
            handler, self.on_continuation = self.on_continuation, None
            if handler is None:
                log.warn("backend {name} sent an unexpected continuation", name=self.name)
            else:
                handler(start.text)
            return
        if start.kind == "tagged":
            self._current = "tagged"
            self._current_start = start
            self._current_tagged = [line.data + wire_tail(line)]
            if line.literal is None:
                self._finish_tagged()
            return
        # untagged
        if start.status == "BYE":
            self.bye_received = True
            if line.literal is None:  # its reason, for a session ending with this connection (session.backend_lost)
                self.bye = line.data + wire_tail(line)
        if start.name == "CAPABILITY":
            self._set_capabilities(start.rest)
        elif start.code == "CAPABILITY":
            self._set_capabilities(start.code_args)
        if self.tap is not None:
            self._current = "tapped" if line.literal is not None else None
            self.tap(start, line)
        elif self.capture is not None:
            self._current = "captured"
            self._capturing = _Capturing(start, [], [], [])
            self._capture_fragment(line)
        elif self.sink is not None:
            self._current = "untagged"
            self.sink.untagged(self, start, line.data + wire_tail(line), line.literal is None)
        else:
            self._current = None
            log.debug("backend {name}: dropped an untagged {what}", name=self.name, what=start.name or start.status)

    def _capture_fragment(self, line: Line) -> None:
        c = self._capturing
        assert c is not None
        c.fragments.append(line.data)
        c.raw.append(line.data + wire_tail(line))
        if line.literal is not None:
            c.literal = bytearray()
            return
        self._current, self._capturing = None, None
        response = UntaggedResponse(c.start, tuple(c.fragments), tuple(c.literals), b"".join(c.raw))
        if self.capture is not None:
            self.capture.append(response)
        elif self.sink is not None:  # the internal command ended meanwhile
            self.sink.untagged(self, c.start, response.raw, True)

    def _relay(self, data: bytes, end: bool) -> None:
        if self.sink is not None:
            self.sink.untagged(self, None, data, end)

    def _finish_tagged(self) -> None:
        start = self._current_start
        raw = b"".join(self._current_tagged)
        self._current, self._current_tagged, self._current_start = None, [], None
        assert start is not None and start.tag is not None
        pending = self._pending.pop(start.tag, None)
        if not self._pending:  # an emptied dict keeps its table (160 B a connection): let it go
            self._pending.clear()
        if pending is None:
            log.warn("backend {name} completed an unknown tag {tag!r}", name=self.name, tag=start.tag)
            return
        if start.code == "CAPABILITY":
            self._set_capabilities(start.code_args)
        pending.on_done(start, raw)

    # -- writing commands -------------------------------------------------------

    def _set_capabilities(self, data: bytes) -> None:
        self.capabilities, self.capability_names = capability_sets(bytes(data))  # names as announced: RIGHTS=texk

    def next_tag(self) -> bytes:
        return b"rp%d" % next(self._tags)

    def expect(self, tag: bytes, on_done: Callable[[ResponseStart, bytes], None],
               on_lost: Callable[[Failure], None] | None = None) -> None:
        """Register the callbacks of a command the caller writes itself: its tagged
        completion (start, raw line with the proxy's tag), or the connection's loss.
        Without *on_lost*, a loss calls on_done(LOST, b"") (the older convention). Refused
        on a connection already closed (nothing would ever call back)."""
        if self.closed:
            raise BackendUnavailable(f"backend {self.name} closed the connection")
        if self._holding:
            self._hold(tag)
        self._pending[tag] = _Pending(on_done, on_lost)

    @property
    def busy(self) -> bool:
        """True while any command is awaiting its tagged response."""
        return bool(self._pending)

    def write(self, data: bytes) -> None:
        if not self.closed:
            if self._held is not None:
                self._held.append(data)
                return
            self.bytes_out += len(data)
            self.transport.write(data)

    # -- held back while another session's RENAME runs (renamehold.py) ----------------------

    def hold_writes(self) -> None:
        """Hold back the next command begun here, and all written after it, until release_writes
        (what is written for the commands in flight, a literal's rest, a DONE, goes on). Counted: two
        RENAMEs may hold one connection; it goes on once both let go."""
        self._holding += 1

    def _hold(self, tag: bytes) -> None:
        if self._held is None:
            self._held = []
            producer = getattr(self.transport, "producer", None)
            if producer is not None:  # the client's reading: what it sends waits with the command
                getattr(producer, "hold", producer.pauseProducing)()  # (flow.PeerPause: a reason of its own)
        self._held_tags.append(tag)

    def release_writes(self) -> None:
        """What was held back goes out, in order (once every hold has let go)."""
        self._holding = max(0, self._holding - 1)
        if self._holding:
            return
        held, self._held, self._held_tags = self._held, None, []
        if held is None or self.closed:
            return
        producer = getattr(self.transport, "producer", None)
        if producer is not None:
            getattr(producer, "unhold", producer.resumeProducing)()
        for data in held:
            self.write(data)

    def tags_in_flight(self) -> frozenset[bytes]:
        """The commands sent and not answered yet (not those held back)."""
        return frozenset(self._pending).difference(self._held_tags)

    def still_in_flight(self, tags: frozenset[bytes]) -> bool:
        return any(tag in self._pending for tag in tags)

    def held_back(self, tag: bytes | None) -> bool:
        """The command *tag* is held back (None: one not begun yet would be)."""
        return bool(self._holding) and (tag is None or tag in self._held_tags)

    def command(self, text: bytes, *, on_continuation: Callable[[bytes], None] | None = None,
                bounded: bool = False, then: Sequence[bytes] = ()) -> defer.Deferred[Tagged]:
        """Send an internal command; fire with its Tagged completion (any status).

        Untagged responses received until then are captured whole in
        ``Tagged.responses`` (the caller relays what is not its own).
        Only one internal command runs on a connection at a time. *bounded*: a command that
        only READS, cut after ``answer_timeout`` s of silence (stall.py says which may be).
        *then*: a command with synchronizing literals: *text* ends with the first one's ``{n}``,
        each of *then* (a literal, what follows it, CRLF included) is written after a ``+`` only,
        as a careful client does (a backend that refused the line early reads no literal as commands).
        """
        if self.closed:
            return defer.fail(BackendUnavailable(f"backend {self.name} connection is closed"))
        tag = self.next_tag()
        d: defer.Deferred[Tagged] = defer.Deferred()
        captured: list[UntaggedResponse] = []
        self.capture = captured

        pieces = list(then)

        def next_piece(_text: bytes) -> None:
            piece = pieces.pop(0)
            if pieces:
                self.on_continuation = next_piece
            self.write(piece)

        def done(start: ResponseStart, raw: bytes) -> None:
            if self.capture is captured:  # else a command pipelined after this one captures (expunge_uids)
                self.capture = None
            if pieces and self.on_continuation is next_piece:  # refused before every literal went
                self.on_continuation = None
            d.callback(Tagged(start, raw, tuple(captured)))

        def lost(_reason: Failure) -> None:
            if self.capture is captured:
                self.capture = None
            d.errback(self.fenced_out or BackendUnavailable(
                f"backend {self.name} " + (Watch.why(self) if self.stalled else "closed the connection")))

        if bounded and (watch := Watch.bounding(self, text)) is not None:
            d.addBoth(watch.ended)
        if self.fence is not None:
            self._fenced(self.fence())
        if self._holding:
            self._hold(tag)
        self._pending[tag] = _Pending(done, lost)
        if on_continuation is not None:
            self.on_continuation = on_continuation
        elif pieces:
            self.on_continuation = next_piece
        self.write(tag + b" " + text + b"\r\n")
        return d

    def _fenced(self, proving: defer.Deferred[None] | None) -> None:
        """Hold this command and the rest back until *proving* fires; if it fails, none of them goes out."""
        if proving is None:
            return
        self.hold_writes()

        def cut(failure: Failure) -> None:
            self.fenced_out = failure.value
            self.transport.abortConnection()

        proving.addCallbacks(lambda _: self.release_writes(), cut)

    def not_connected(self, why: str) -> None:
        """The connection could not be made: the greeting awaited fails."""
        if not self._greeted:
            self._greeted = True
            self.greeting.errback(NotConnected(why))

    def send_unanswered(self, text: bytes) -> None:
        """An internal command whose answer nobody waits for, pipelined before the next one
        (the ID before a login: one round trip fewer per backend connection)."""
        if self.closed:
            return
        tag = self.next_tag()
        if self._holding:
            self._hold(tag)
        self._pending[tag] = _Pending(_ignore, _ignore)
        self.write(tag + b" " + text + b"\r\n")

    def deselect(self) -> defer.Deferred[Tagged]:
        """Leave the selected mailbox WITHOUT expunging it: UNSELECT, or else a failed
        EXAMINE (RFC 3501 6.3.1), never CLOSE, which would expunge every \\Deleted message."""
        if "UNSELECT" in self.capabilities:
            return self.command(b"UNSELECT")
        return self.command(b'EXAMINE "referral-proxy/no such mailbox"')

    def logout(self) -> None:
        """Say LOGOUT if the connection is between commands, then close it either way."""
        if self.closed:
            return
        self.sink = None
        if not self._pending and self._current is None and self._framer.literal_remaining == 0:
            self.write(b"%s LOGOUT\r\n" % self.next_tag())
        self.transport.loseConnection()


def _ignore(*_args: object) -> None:
    """The answer (or the loss) of a command nobody waits for."""


# What on_done receives, for callers that registered no on_lost, when the connection is lost.
LOST = ResponseStart(kind="tagged", tag=None, status=None, code=None, code_args=b"", text=b"connection lost",
                     name=None, number=None, rest=b"")


def wire_tail(line: Line) -> bytes:
    """The bytes a fragment ended with on the wire: its literal announcement, or CRLF."""
    return line.literal.announce() + b"\r\n" if line.literal is not None else b"\r\n"


class NotConnected(BackendUnavailable):
    """The connection to the backend could not be made (str: why)."""
