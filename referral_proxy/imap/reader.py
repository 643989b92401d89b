"""Client commands out of a byte stream (sans-I/O): framer events in, whole commands out.

:class:`CommandReader` sits on the :class:`~.framing.Framer` and enforces EVERY limit a client is held to
(:class:`Limits`), in one place. Each command is *admitted* by a callback (the session's state and command table):
collected whole and parsed (:class:`Command`), refused at its first line (:class:`Refused`, its literal never read),
or streamed (APPEND: :class:`AppendStart`, then per message an :class:`AppendMessage` whose literal the consumer
accepts or drops, its :class:`AppendData` chunks, :class:`AppendMessageEnd`; :class:`AppendEnd` or
:class:`AppendAbort` last). A sync literal the reader takes itself yields :class:`Continue` (the consumer writes
``+``). While a message literal waits for a decision, next_event() returns :data:`NEED_DECISION` (reading nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .appendline import DATE_TIME, SYSTEM_FLAGS, append_line
from .command import (
    Atom,
    CommandStart,
    ParenList,
    ParseError,
    String,
    Token,
    parse_arguments,
    parse_command_start,
    splice_section_literals,
    tag_of,
)
from .framing import NEED_DATA, Framer, Line, LineTooLong, LiteralData, LiteralEnd, LiteralSpec, NeedData, Overrun
from .grammar import Arguments, Grammar, is_mailbox, match
from .plain import plain_arguments

__all__ = ["Limits", "CommandReader", "Refusal", "STREAMED", "NEED_DECISION", "Command", "Refused", "Continue", "TextLine",
           "Sentinel", "AppendStart", "AppendMessage", "AppendData", "AppendMessageEnd", "AppendEnd", "AppendAbort", "Ended",
           "ReaderEvent", "BACKEND_ATOM"]

KiB, MiB = 1024, 1024 * 1024


#: Collected commands whose arguments may hold a literal8 (``~{n}``): SETMETADATA's values (RFC 5464).
#: Elsewhere it is refused: RFC 3516 gives literal8 to an APPEND's message (streamed, not collected).
_LITERAL8 = frozenset({"SETMETADATA"})

@dataclass(frozen=True)
class Limits:
    """What one client command may cost the proxy, whatever the client sends."""

    max_line: int = 64 * KiB  # bytes of one line fragment (between literals)
    max_literal: int = 64 * KiB  # bytes of one literal of a collected command (every command but APPEND)
    max_command: int = 1 * MiB  # bytes of a whole collected command: fragments and literals together
    max_literals: int = 1000  # literals in one collected command (each costs an object even when empty)
    max_message: int = 512 * MiB  # bytes of one APPEND message (streamed, never held)
    max_append_messages: int = 10_000  # messages in one (MULTI)APPEND


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the admit callback returns to refuse a command at its first line."""

    status: str
    text: str


class Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


STREAMED = Sentinel("STREAMED")
"""Admit answer: stream the command (APPEND) instead of collecting it."""

NEED_DECISION = Sentinel("NEED_DECISION")
"""next_event(): a message literal waits for accept() or drop()."""

Admit = Callable[[CommandStart], "Grammar | Refusal | Sentinel"]


@dataclass(frozen=True, slots=True)
class Command:
    tag: bytes
    name: str
    args: Arguments


@dataclass(frozen=True, slots=True)
class Refused:
    """The command was refused and its rest (literals included) will never be read as commands."""

    tag: bytes
    status: str
    text: str


@dataclass(frozen=True, slots=True)
class Ended:
    """Nothing more is read: a refused command's rest went on past what any command may hold
    (``{0+}`` after ``{0+}``, or a ``{n+}`` literal over what any command may send, dropped unread
    for ever). The session says ``* BYE text``."""

    text: str


@dataclass(frozen=True, slots=True)
class Continue:
    """A synchronizing literal was accepted: the client waits for ``+``."""


@dataclass(frozen=True, slots=True)
class TextLine:
    """A line read in line mode (a SASL response, the DONE of IDLE)."""

    data: bytes
    clean: bool  # False if it ended in a literal's announcement (taken as text) or was too long


@dataclass(frozen=True, slots=True)
class AppendStart:
    tag: bytes
    name: str
    mailbox: bytes


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One message: accept() its literal, or drop() the rest of the command."""

    flags: tuple[bytes, ...] | None
    date: bytes | None  # the date-time without its quotes
    literal: LiteralSpec
    utf8: bool = False  # RFC 6855 ``UTF8 (~{n}...)``: the literal8 is wrapped so, and relayed so


@dataclass(frozen=True, slots=True)
class AppendData:
    data: bytes


@dataclass(frozen=True, slots=True)
class AppendMessageEnd:
    pass


@dataclass(frozen=True, slots=True)
class AppendEnd:
    """The client has sent the whole command."""


@dataclass(frozen=True, slots=True)
class AppendAbort:
    """The client broke a limit or the syntax mid-command; the rest is dropped unread.
    The streamed command must be cancelled and answered ``tag status text``."""

    status: str
    text: str


ReaderEvent = (Command | Refused | Continue | TextLine | AppendStart | AppendMessage | AppendData
               | AppendMessageEnd | AppendEnd | AppendAbort | Ended)

_CONTINUE = Continue()
_MESSAGE_END = AppendMessageEnd()
_END = AppendEnd()

# Reader states.
_IDLE, _COLLECT, _APPEND_MAILBOX, _APPEND_DATA, _APPEND_NEXT = range(5)

_KEYWORD = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
BACKEND_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){"]+')  # what Dovecot's parser reads as an atom
_UTF8_OPEN = re.compile(rb"(?:\A| )UTF8 \(\Z", re.IGNORECASE)  # RFC 6855: append-data =/ "UTF8" SP "(" literal8 ")"


class CommandReader:
    """Turns a client's bytes into commands, within :class:`Limits`."""

    def __init__(self, limits: Limits, admit: Admit, plain: frozenset[str] = frozenset()) -> None:
        self.limits = limits
        self._admit = admit
        # Commands whose arguments nothing reads but the relay: a plain line (imap.plain)
        # is passed on as it is, unparsed (Arguments with its text and no tokens).
        self._plain = plain
        # A refused command's rest is dropped unread, but no further than an accepted one may go (framing.Overrun).
        self._framer = Framer(limits.max_line, max_dropped=max(limits.max_literals, limits.max_append_messages) + 1,
                             max_skipped=max(limits.max_message, limits.max_command))
        self._queue: list[ReaderEvent] = []  # at most an APPEND's first message (a deque is 760 bytes)
        self._state = _IDLE
        self._line_mode = False
        self._deciding = False  # an AppendMessage awaits accept() / drop()
        self._start: CommandStart | None = None
        self._grammar: Grammar | None = None
        self._fragments: list[bytes] = []
        self._literals: list[bytes] = []
        self._binary: list[bool] = []
        self._current: bytearray | None = None
        self._size = 0
        self._messages = 0
        self._utf8 = False  # the message literal just read was a UTF8 one: its ")" comes next
        # An APPEND message may be a literal8 ``~{n}`` (RFC 3516): the session says False when BINARY is
        # not advertised (RFC 3502's grammar has none), and such a message is BAD, as an unknown syntax.
        self.literal8 = True

    # -- input -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._framer.receive_data(data)

    def next_event(self) -> ReaderEvent | NeedData | Sentinel:
        if self._queue:
            return self._queue.pop(0)
        if self._deciding:
            return NEED_DECISION
        framer = self._framer
        while True:
            event = framer.next_event()
            if event is NEED_DATA:
                return NEED_DATA
            out = self._event(event)  # type: ignore[arg-type]
            if out is not None:
                return out
            if self._queue:
                return self._queue.pop(0)

    def append_line(self, data: bytes) -> AppendStart | None:
        """*data*, the whole of a read while :attr:`idle`, taken as an APPEND line of the form
        clients send (imap.appendline) without the framer or the general parse: the AppendStart
        next_event would return for it, its AppendMessage queued and the literal awaiting the
        decision, as the long way leaves them. The caller admitted APPEND (STREAMED) itself.
        None, and nothing read, for any other bytes."""
        if not self.idle:  # (a literal's bytes are never matched)
            return None
        line = append_line(data, self.limits.max_line, self.limits.max_message)
        if line is None or self.limits.max_append_messages < 1 or (line.literal.binary and not self.literal8):
            return None
        self._framer.announced(line.literal)
        self._start = CommandStart(line.tag, "APPEND", line.rest)
        self._messages = 1
        self._queue.append(AppendMessage(line.flags, line.date, line.literal))
        self._deciding = True
        self._state = _APPEND_NEXT
        return AppendStart(line.tag, "APPEND", line.mailbox)

    def message_rest(self, data: bytes) -> bool:
        """*data*, the whole of a read, taken if it is exactly the rest (1 byte to a chunk) of the APPEND
        message literal being read and the command's final CRLF (one message a command, its literal
        and CRLF in one write): the events next_event gives for it (AppendData, AppendMessageEnd,
        AppendEnd) queued, without the framer. False, and nothing read, otherwise."""
        if self._state != _APPEND_DATA or self._queue or self._utf8 or len(data) < 3:  # (UTF8: a ")" is due)
            return False
        if not self._framer.literal_end(data):
            return False
        self._reset_command()
        self._queue += (AppendData(data[:-2]), _MESSAGE_END, _END)
        return True

    # -- the consumer's decisions -------------------------------------------------------

    def accept(self) -> None:
        """Take the literal of the AppendMessage just returned."""
        if not self._deciding:
            raise RuntimeError("no message literal awaits a decision")
        self._deciding = False
        self._state = _APPEND_DATA
        self._framer.accept_literal()

    def drop(self) -> None:
        """Refuse the command being read: what is left of it (an announced literal, the
        rest of its line, further literals) is dropped unread, never taken for commands."""
        self._queue.clear()
        self._deciding = False
        if self._state != _IDLE:
            self._framer.discard_line()
        self._reset_command()

    def expect_line(self, on: bool = True) -> None:
        """Read the next logical line as a TextLine (SASL response, IDLE's DONE), or stop expecting it."""
        self._line_mode = on

    @property
    def expecting_line(self) -> bool:
        return self._line_mode

    @property
    def between_commands(self) -> bool:
        """True when the next thing read starts a new command (no line mode, nothing half read)."""
        return self._state == _IDLE and not self._line_mode and not self._queue and not self._deciding

    @property
    def idle(self) -> bool:
        """True when the next bytes received start a new command and nothing is held:
        what a whole command line received now would be read as (see fastpath.py)."""
        return self.between_commands and self._framer.idle

    @property
    def streaming(self) -> bool:
        """True between AppendStart and the end of that command."""
        return self._state in (_APPEND_DATA, _APPEND_NEXT) or self._deciding

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    @property
    def starved(self) -> bool:  # (read once the events are drained) it needs bytes the client has not sent yet
        return not self._queue and not self._deciding and (self._state != _IDLE or self._line_mode or self._framer.mid_line)

    @property
    def mid_command(self) -> bool:
        """True while the client is in the middle of a command (or more is buffered)."""
        return self._state != _IDLE or bool(self._queue) or self._framer.mid_line

    # -- framer events -----------------------------------------------------------------

    def _event(self, event: Line | LiteralData | LiteralEnd | LineTooLong | Overrun) -> ReaderEvent | None:
        state = self._state
        if isinstance(event, Line):
            if event.first:
                return self._first_line(event)
            if state == _COLLECT:
                return self._collect_fragment(event.data, event.literal)
            if state == _APPEND_MAILBOX:
                return self._append_after_mailbox(event)
            if state == _APPEND_NEXT:
                return self._append_next(event)
            return None
        if isinstance(event, LiteralData):
            if state == _APPEND_DATA:
                return AppendData(event.data)
            if self._current is not None:
                self._current += event.data
            return None
        if isinstance(event, LiteralEnd):
            if state == _APPEND_DATA:
                self._state = _APPEND_NEXT
                return _MESSAGE_END
            if self._current is not None:
                self._literals.append(bytes(self._current))
                self._current = None
            return None
        if isinstance(event, Overrun):
            return Ended(f"Literal too large to skip (limit {event.limit} bytes)" if event.literal
                         else f"Too long command (more than {event.limit} parts)")
        return self._too_long(event)

    def _too_long(self, event: LineTooLong) -> ReaderEvent:
        text = f"Command line too long (limit {event.limit} bytes)"
        if self._line_mode and event.first:
            self._line_mode = False
            self._framer.text_too_long()  # (ending in "{20+}": probe u1 of stop 51, as not_a_literal)
            return TextLine(b"", clean=False)
        state, start = self._state, self._start
        self._reset_command()
        if event.first or start is None:
            tag = tag_of(event.prefix)  # one that fills the prefix may be cut: not the client's tag
            return Refused(tag if tag is not None and len(tag) < len(event.prefix) else b"*", "BAD", text)
        if state in (_APPEND_DATA, _APPEND_NEXT):
            return AppendAbort("BAD", text)
        return Refused(start.tag, "BAD", text)

    def _first_line(self, line: Line) -> ReaderEvent | None:
        if self._line_mode:
            self._line_mode = False
            if line.literal is not None:  # text, as a server reads it ("DONE {16+}": BAD, what follows read)
                self._framer.not_a_literal()
            return TextLine(line.data, clean=line.literal is None)
        try:
            start = parse_command_start(line.data)
        except ParseError as e:
            return self._refuse(line.literal, tag_of(line.data) or b"*", "BAD", f"Invalid command: {e}")
        admission = self._admit(start)
        if isinstance(admission, Refusal):
            return self._refuse(line.literal, start.tag, admission.status, admission.text)
        self._start = start
        if admission is STREAMED:
            return self._append_first(start, line)
        assert isinstance(admission, Grammar)
        if not admission.takes_arguments:
            if line.literal is not None or start.rest.strip():
                return self._refuse(line.literal, start.tag, "BAD", f"{start.name} takes no arguments")
            self._start = None
            return Command(start.tag, start.name, _NO_ARGUMENTS)
        if line.literal is None:  # the whole command in one line: the common case
            self._start = None
            if start.name in self._plain and plain_arguments(admission.text, start.rest):
                return Command(start.tag, start.name, Arguments((), (), start.rest))
            try:
                args = match(admission, parse_arguments([start.rest], []), start.rest)
            except ParseError as e:
                return Refused(start.tag, "BAD", f"Invalid arguments: {e}")
            return Command(start.tag, start.name, args)
        self._grammar = admission
        self._state = _COLLECT
        self._size = len(line.data)
        self._fragments = [start.rest]
        return self._literal_or_finish(line.literal)

    def _refuse(self, literal: LiteralSpec | None, tag: bytes, status: str, text: str) -> Refused:
        if literal is not None:
            self._framer.reject_literal()
        elif self._state != _IDLE:
            self._framer.discard_line()
        self._reset_command()
        return Refused(tag, status, text)

    # -- collected commands -------------------------------------------------------------

    def _collect_fragment(self, data: bytes, literal: LiteralSpec | None) -> ReaderEvent | None:
        self._fragments.append(data)
        self._size += len(data)
        return self._literal_or_finish(literal)

    def _literal_or_finish(self, literal: LiteralSpec | None) -> ReaderEvent | None:
        start = self._start
        assert start is not None
        if literal is None:
            return self._finish(start)
        if literal.binary and start.name not in _LITERAL8:  # Dovecot: BAD too, and the literal not read
            return self._refuse(literal, start.tag, "BAD", "Invalid arguments: literal8 not allowed here")
        limits = self.limits
        self._size += literal.size
        if literal.size > limits.max_literal:
            return self._refuse(literal, start.tag, "NO", f"[TOOBIG] Literal too large (limit {limits.max_literal} bytes)")
        if self._size > limits.max_command:
            return self._refuse(literal, start.tag, "NO", f"[TOOBIG] Command too large (limit {limits.max_command} bytes)")
        if len(self._literals) >= limits.max_literals:
            return self._refuse(literal, start.tag, "NO",
                                f"[LIMIT] Too many literals in one command (limit {limits.max_literals})")
        self._current = bytearray()
        self._binary.append(literal.binary)
        self._framer.accept_literal()
        return _CONTINUE if literal.sync else None

    def _finish(self, start: CommandStart) -> ReaderEvent:
        grammar = self._grammar
        fragments, literals, binary = self._fragments, self._literals, self._binary
        self._reset_command()
        assert grammar is not None
        if literals and start.name in ("FETCH", "UID FETCH"):  # a header name sent as a literal
            fragments, literals, binary = splice_section_literals(fragments, literals, binary)
        try:
            args = match(grammar, parse_arguments(fragments, literals, binary=binary),
                         None if literals else fragments[0])
        except ParseError as e:
            return Refused(start.tag, "BAD", f"Invalid arguments: {e}")
        return Command(start.tag, start.name, args)

    def _reset_command(self) -> None:
        self._state = _IDLE
        self._start = None
        self._grammar = None
        self._fragments, self._literals, self._binary = [], [], []
        self._current = None
        self._size = 0
        self._messages = 0
        self._utf8 = False

    # -- streamed APPEND -----------------------------------------------------------------

    def _append_first(self, start: CommandStart, line: Line) -> ReaderEvent | None:
        if not start.rest.strip() and line.literal is not None:
            # The mailbox name is a literal: collect it first.
            if line.literal.binary:
                return self._refuse(line.literal, start.tag, "BAD", "Invalid arguments: literal8 not allowed here")
            if line.literal.size > self.limits.max_literal:
                return self._refuse(line.literal, start.tag, "NO",
                                    f"[TOOBIG] Literal too large (limit {self.limits.max_literal} bytes)")
            self._state = _APPEND_MAILBOX
            self._current = bytearray()
            self._framer.accept_literal()
            return _CONTINUE if line.literal.sync else None
        try:
            rest, utf8 = _utf8_open(start.rest, line.literal)
            tokens = parse_arguments([rest], [])
            if not tokens or not is_mailbox(tokens[0]):  # (an 8-bit atom too: BAD, as Dovecot answers it)
                raise ParseError("invalid mailbox argument" if tokens else "missing mailbox")
            message = self._message(tokens[1:], line.literal, first=True, utf8=utf8)
        except ParseError as e:
            return self._refuse(line.literal, start.tag, "BAD", f"Invalid arguments: {e}")
        return self._started(start, tokens[0].value, message, line.literal)

    def _append_after_mailbox(self, line: Line) -> ReaderEvent | None:
        start = self._start
        assert start is not None
        mailbox = self._literals[0] if self._literals else b""
        self._literals = []
        try:
            data, utf8 = _utf8_open(line.data, line.literal)
            message = self._message(parse_arguments([data], []), line.literal, first=True, utf8=utf8)
        except ParseError as e:
            return self._refuse(line.literal, start.tag, "BAD", f"Invalid arguments: {e}")
        return self._started(start, mailbox, message, line.literal)

    def _started(self, start: CommandStart, mailbox: bytes, message: ReaderEvent,
                 literal: LiteralSpec | None) -> ReaderEvent:
        if isinstance(message, AppendAbort):  # a limit broken by the first message: refused whole
            return self._refuse(literal, start.tag, message.status, message.text)
        if b"\x00" in mailbox:  # Dovecot would append to the name up to the NUL: not the one routed
            return self._refuse(literal, start.tag, "BAD", "Invalid arguments: invalid mailbox argument")
        self._queue.append(message)
        self._deciding = True
        self._state = _APPEND_NEXT
        return AppendStart(start.tag, start.name, mailbox)

    def _append_next(self, line: Line) -> ReaderEvent:
        data = line.data
        if self._utf8:  # RFC 6855: the ")" closing the UTF8 message's literal8
            self._utf8 = False
            if data[:1] != b")":
                message: ReaderEvent = AppendAbort("BAD", "Invalid arguments: UTF8 message data not closed")
                if line.literal is not None:
                    self._framer.reject_literal()
                self._reset_command()
                return message
            data = data[1:]
        if line.literal is None and not data.strip(b" "):
            # The command's end. Dovecot takes spaces before the final CRLF (``{3}abc \r\n``:
            # OK, the message appended) as it skips them between any two arguments.
            self._reset_command()
            return _END
        try:
            data, utf8 = _utf8_open(data, line.literal)
            message = self._message(parse_arguments([data], []), line.literal, first=False, utf8=utf8)
        except ParseError as e:
            message = AppendAbort("BAD", f"Invalid arguments: {e}")
        if isinstance(message, AppendAbort):
            if line.literal is not None:
                self._framer.reject_literal()
            self._reset_command()
        else:
            self._deciding = True
        return message

    def _message(self, tokens: list[Token], literal: LiteralSpec | None, *, first: bool, utf8: bool = False) -> ReaderEvent:
        """``[flag-list] [date-time] literal``: an AppendMessage, or an AppendAbort for a limit."""
        flags: tuple[bytes, ...] | None = None
        date: bytes | None = None
        if tokens and isinstance(tokens[0], ParenList):
            flags = _flags(tokens.pop(0))
        unstorable = flags is not None and any(_KEYWORD.fullmatch(f) is None for f in flags if f[:1] != b"\\")
        first_token = tokens[0] if tokens else None
        if isinstance(first_token, String) and not first_token.literal:
            date = first_token.value
            tokens.pop(0)
            if DATE_TIME.fullmatch(date) is None:
                raise ParseError("invalid date-time")
            if date[1:2] == b"-":  # "1-Jan-2020 ...": Dovecot takes it; relayed as RFC 3501's " 1-Jan-2020 ..."
                date = b" " + date
        if tokens:
            raise ParseError("unexpected message argument")
        if literal is None:
            raise ParseError("missing message literal")
        if literal.binary and not utf8 and not self.literal8:  # (RFC 6855's UTF8 data is a literal8 by grammar)
            raise ParseError("literal8 without BINARY")
        if unstorable:  # an atom to Dovecot's parser, not a keyword: it says NO once the syntax is checked
            return AppendAbort("NO", "[CANNOT] Invalid characters in keyword.")
        limits = self.limits
        self._messages += 1
        if self._messages > limits.max_append_messages:
            return AppendAbort("NO", f"[LIMIT] Too many messages in one APPEND (limit {limits.max_append_messages}); "
                                     "nothing was appended")
        if literal.size > limits.max_message:
            return AppendAbort("NO", f"[TOOBIG] Message too large (limit {limits.max_message} bytes); "
                                     "nothing was appended")
        self._utf8 = utf8
        return AppendMessage(flags, date, literal, utf8)


_NO_ARGUMENTS = Arguments((), ())


def _utf8_open(data: bytes, literal: LiteralSpec | None) -> tuple[bytes, bool]:
    """A message's arguments without RFC 6855's ``UTF8 (`` before its literal8, and whether it was there."""
    found = _UTF8_OPEN.search(data) if literal is not None else None
    if found is None:
        return data, False
    if not literal or not literal.binary:
        raise ParseError("UTF8 message data must be a literal8")
    return data[:found.start()], True


def _flags(tok: Token) -> tuple[bytes, ...]:
    """An APPEND flag list: system flags a message may carry, and keywords."""
    assert isinstance(tok, ParenList)
    out = []
    for item in tok.items:
        if not isinstance(item, Atom):
            raise ParseError("invalid flag")
        value = item.value
        if value[:1] == b"\\":
            if value.upper() not in SYSTEM_FLAGS:
                raise ParseError("invalid system flag")
        elif BACKEND_ATOM.fullmatch(value) is None:  # "a{b": Dovecot's parser refuses it (BAD)
            raise ParseError("invalid keyword")
        out.append(value)
    return tuple(out)
