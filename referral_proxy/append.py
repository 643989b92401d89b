"""APPEND and MULTIAPPEND (RFC 3502): streamed to the mailbox's backend, all or nothing for everyone.

Each message literal goes to the backend chunk by chunk as it arrives; flags and dates are
written again from what the command reader parsed and checked. How the command reaches the
backend depends on what the backend can do (:class:`Mode`):

* ``PASS``: it has MULTIAPPEND. The command is streamed as one; the backend's transaction
  makes it atomic, and a zero-length literal (RFC 3502) cancels it.
* ``STAGE``: it has not. The target is checked (``STATUS``), a private staging mailbox is
  created, each message is APPENDed there, then ONE ``COPY`` puts them all into the target
  (RFC 3501: a failed COPY leaves the destination unchanged) and the staging mailbox is
  deleted (staging.py): other sessions see every message at once or none, and the
  APPENDUID comes from the COPYUID where the backend has UIDPLUS.

No message body ever runs as a command. The reader (imap/reader.py) checks, before any
literal, everything Dovecot answers with BAD (and then reads the rest as commands): the
flag list (atoms, no ``\\Recent``, only RFC 3501's system flags), the date-time, the
syntax, the sizes. The proxy answers ``+`` itself only for such a checked literal whose
target is known to take messages: after the first message, a sync literal of at most 4 KiB
or one the quota's known room surely takes; with STAGE after the check; and (PASS) the first
literal of an APPEND to the target that took this session's last APPEND there less than
``appends.TAKER_SECONDS`` ago, when the room its quota left takes it (one backend command
and one round trip per message for clients that APPEND one by one; the command reaches the
backend with the literal's first bytes, in one send). Any other synchronizing
literal is announced to the backend and its ``+`` awaited, so TRYCREATE or OVERQUOTA come
before the data. What the proxy cannot foresee (the target deleted meanwhile, another
session's mail filling the quota, an I/O error) is refused after the literal, which RFC 3501
allows: the backend, sent the literal as LITERAL+, drains it, and nothing of it runs. If the backend
answers while a literal streams, the rest of that literal still goes to it (the backend,
having failed the command, drains it) and the backend's command is ended with CRLF before
the client is answered; a backend that answered between two messages gets the CRLF at once.
Nothing more of a command the backend answered is read from the client (never as commands).

The command's life is one :class:`AppendState` at a time; the answer (commit, or refuse) is
decided in one place, :meth:`AppendCommand._settle`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .appendturns import nothing
from .backend import BackendError, BackendProtocol, Tagged
from .imap.command import ParseError
from .imap.grammar import encode_quoted
from .imap.quota import quota_resources, room_left
from .imap.reader import AppendMessage
from .imap.response import ResponseStart, replace_tag
from .lean import SmallSet
from .staging import Staging, StagingHost, mailbox_argument, run_captured

__all__ = ["AppendCommand", "AppendHost", "AppendState", "Mode"]

log = Logger()

SMALL_SYNC_LITERAL = 4096  # the LITERAL- bound (RFC 7888): small enough to take at once


class Mode(Enum):
    PASS = "the backend has MULTIAPPEND: one command, atomic in the backend's transaction"
    STAGE = "no MULTIAPPEND: each message into a private staging mailbox, then ONE COPY into the target"
    SINGLE = "no MULTIAPPEND and no staging mailbox could be made: one message, a second cancels the command"

    __hash__ = object.__hash__  # identity, in C (see flow.Block)


class AppendState(Enum):
    PREPARING = "STAGE: the target is checked and the staging mailbox created; the first literal waits"
    BETWEEN = "waiting for the client's next message or the end of the command"
    ANNOUNCED = "a message literal was announced to the backend; waiting for its +"
    STREAMING = "a message literal flows from the client to the backend"
    SENT = "the client sent the whole command (or the rest is dropped); waiting for the backend"
    COMMITTING = "STAGE: the staged messages are copied into the target"
    ANSWERED = "the client has its answer"

    __hash__ = object.__hash__  # identity, in C (see flow.Block)


# Python 3.11's EnumType has a __getattr__, which makes every ``AppendState.X`` a slow
# attribute call (~110 ns, four times a global's): the per-message paths use these.
_PASS, _STAGE, _SINGLE = Mode.PASS, Mode.STAGE, Mode.SINGLE
(_PREPARING, _BETWEEN, _ANNOUNCED, _STREAMING, _SENT, _COMMITTING, _ANSWERED) = (
    AppendState.PREPARING, AppendState.BETWEEN, AppendState.ANNOUNCED, AppendState.STREAMING, AppendState.SENT,
    AppendState.COMMITTING, AppendState.ANSWERED)


class AppendHost(StagingHost, Protocol):
    """What an APPEND needs of its session."""

    def accept_literal(self) -> None:
        """Let the client's announced message literal in."""

    def drop_command(self) -> None:
        """Read nothing more of this command from the client (never as commands)."""

    def send(self, data: bytes) -> None:
        """A line of the proxy's own (``+ Ready``)."""

    def write_from(self, source: object, data: bytes, end: bool = True) -> None:
        """The answer, in order with what *source* relays."""

    def after_answers(self, line: bytes) -> None:
        """An answer of the proxy's own, once the APPENDs before it are answered."""

    def append_input_over(self, cmd: AppendCommand) -> None:
        """The client has sent all of *cmd*, or the rest will be dropped."""

    def append_answered(self, cmd: AppendCommand) -> None: ...

    def dies_with(self, conn: BackendProtocol) -> bool:
        """True if losing *conn* ends the session (no answer needed then)."""

    def hold_input(self, on: bool) -> None:
        """Read no further command from the client while on (a STAGE commit uses the connection)."""

    @property
    def no_staging(self) -> SmallSet:
        """The backends of the session that refused to create a staging mailbox."""

    def room_of(self, backend: str, mailbox: bytes) -> tuple[int | None, int | None] | None:
        """The room (bytes, messages) the quota left a target that took this session's
        messages a moment ago; None if there is none such."""

    def took(self, backend: str, mailbox: bytes, room: tuple[int | None, int | None] | None) -> None:
        """A target took this session's messages and its quota left *room*; None: it refused them."""


@dataclass
class _Part:
    """One APPEND command on the backend: the whole MULTIAPPEND (PASS), or one message (STAGE)."""

    ptag: bytes
    status: str | None = None  # OK / NO / BAD once answered; LOST
    raw: bytes = b""
    start: ResponseStart | None = None


def _lost_answer(tag: bytes) -> bytes:
    return b"%s NO [UNAVAILABLE] Mail server connection lost; nothing was appended\r\n" % tag


def _unknown_answer(tag: bytes) -> bytes:
    """Lost after the command's last byte: the backend may have committed it before its answer was cut."""
    return (b"%s NO [UNAVAILABLE] Mail server connection lost after the whole command was sent; "
            b"the messages may or may not be there\r\n" % tag)


@dataclass(eq=False)  # compared (and hashed) by identity: a session keeps the unanswered ones
class AppendCommand:
    """One APPEND from the client, from its first message to the client's answer."""

    host: AppendHost
    tag: bytes
    conn: BackendProtocol
    mailbox: bytes
    mode: Mode = _PASS
    state: AppendState = _BETWEEN
    input_over: bool = False  # nothing more of the command will come from the client
    refusal: bytes | None = None  # the proxy's own answer once it cancelled (b"": nobody to tell)
    messages: int = 0
    parts: list[_Part] = field(default_factory=list)
    waiting: AppendMessage | None = None  # ANNOUNCED / PREPARING: the message whose literal waits
    finishing: bool = False  # failed while a literal streams: that literal goes on, then the rest is dropped
    holding: bool = False  # the session's input is held (STAGE, from the client's last byte to the cleanup)
    staging: Staging | None = None  # STAGE: the staging mailbox, once the first message came
    owns_conn: bool = False  # the client left: this command closes the connection when it is done
    room: tuple[int | None, int | None] | None = None  # PASS: (bytes, messages) the quota leaves, if known
    taken: tuple[int, int] = (0, 0)  # bytes and messages of this command sent on so far
    held: bytes = b""  # the message's arguments, sent to the backend with its literal's first bytes
    sent_whole: bool = False  # PASS/SINGLE: the final CRLF went to the backend (it may commit from then on)
    closing: bytes = b""  # after the streaming literal: b")" of an RFC 6855 ``UTF8 (~{n}...)``
    turn: Callable[[], None] = nothing  # ends the mailbox's turn this APPEND holds (appendturns.py)

    @property
    def held_back(self) -> bool:
        """Not sent, nor to be until a RENAME there is answered (renamehold.py): no race with it."""
        return self.conn.held_back(self.parts[0].ptag if self.parts else None)

    def end_turn(self) -> None:
        """The mailbox's turn ends (once, whichever path comes first: the answer, the client gone)."""
        turn, self.turn = self.turn, nothing
        turn()

    def __post_init__(self) -> None:
        if "MULTIAPPEND" in self.conn.capabilities:
            self.mode = _PASS
        else:
            self.mode = _SINGLE if self.conn.name in self.host.no_staging else _STAGE

    # -- what the client sends ------------------------------------------------------------

    def message(self, msg: AppendMessage) -> None:
        """A message whose literal the client announced: the reader awaits our decision."""
        if self.refusal is not None or self.input_over:
            return self.host.drop_command()
        self.messages += 1
        if self.conn.closed:
            return self._cancel(_lost_answer(self.tag))
        if msg.literal.size == 0:
            return self._cancel(b"%s NO Zero-length message: nothing was appended (RFC 3502)\r\n" % self.tag)
        if msg.utf8 and "UTF8=ACCEPT" not in self.conn.capabilities:  # as such a server answers it
            return self._cancel(b"%s BAD Invalid arguments: UTF8 message data (RFC 6855) is not taken by "
                                b"this mail server\r\n" % self.tag)
        if mailbox_argument(self.conn, self.mailbox) is None:
            return self._cancel(b"%s NO [CANNOT] This mail server cannot take that mailbox name here\r\n" % self.tag)
        if self.messages > 1 and self.mode is _SINGLE:
            return self._cancel(b"%s NO [CANNOT] This mail server cannot append several messages in one command; "
                                b"nothing was appended\r\n" % self.tag)
        if self.mode is _STAGE and self.staging is None:
            self.state, self.waiting = _PREPARING, msg
            defer.ensureDeferred(self._prepare()).addErrback(self._crashed)
            return
        self._send(msg)

    def _send(self, msg: AppendMessage) -> None:
        """The message's arguments to the backend; its literal taken now or once the backend says +."""
        conn, literal = self.conn, msg.literal
        taker = False  # the target took this session's messages a moment ago, and has room for this one
        if self.mode is not _STAGE and not self.parts and literal.sync:
            self.room = self.host.room_of(conn.name, self.mailbox) if self.mode is _PASS else None
            taker = self.room is not None and self._fits(literal.size)
            if not taker:
                self.room = None
                if "QUOTA" in conn.capabilities and not conn.busy:
                    self._probe_quota()
        if self.mode is _STAGE or not self.parts:
            part = _Part(conn.next_tag())
            self.parts.append(part)
            conn.expect(part.ptag, partial(self._part_done, part), partial(self._part_lost, part))
            target = self.staging.name if self.mode is _STAGE and self.staging is not None else self.mailbox
            head = mailbox_argument(conn, target)
            assert head is not None
            prefix = part.ptag + b" APPEND " + head
        else:
            prefix = b""
        prefix += _message_prefix(msg)
        if msg.utf8:
            prefix += b"UTF8 ("
        self.closing = b")" if msg.utf8 else b""
        caps = conn.capabilities
        plus = "LITERAL+" in caps or ("LITERAL-" in caps and literal.size <= SMALL_SYNC_LITERAL)
        known = self.mode is _STAGE or self.messages > 1 or taker  # the target was found to take messages
        fits = literal.size <= SMALL_SYNC_LITERAL or self._fits(literal.size)
        self.taken = (self.taken[0] + literal.size, self.taken[1] + 1)
        if plus and (not literal.sync or (known and fits)):
            # Sent with the literal's first bytes, in one send() (one wake-up of the backend,
            # and nothing at all there if the client leaves before its data).
            self.held = prefix + literal.announce(sync=False) + b"\r\n"
            return self._stream(msg)
        # Let the backend decide before the client sends the data.
        self.state, self.waiting = _ANNOUNCED, msg
        conn.on_continuation = self._continue
        conn.write(prefix + literal.announce(sync=True) + b"\r\n")

    def _probe_quota(self) -> None:
        """GETQUOTAROOT ahead of the APPEND, on a quiet connection: with the room the quota leaves
        known, a later synchronizing literal that fits is taken at once (no round trip to the
        backend per message), one that may not is still announced (OVERQUOTA before the data)."""
        conn, head = self.conn, mailbox_argument(self.conn, self.mailbox)
        assert head is not None

        def known(results: list[Tagged]) -> None:
            self.host.backend_idle()
            (done,) = results
            try:
                roots = [quota_resources(*r.arguments) for r in done.responses if r.start.name == "QUOTA"]
            except ParseError:
                roots = []
            if done.ok and roots:
                self.room = room_left(roots)
            for r in done.responses:
                if r.start.name not in ("QUOTA", "QUOTAROOT"):
                    self.host.write_from(conn, r.raw)

        run_captured(conn, [b"GETQUOTAROOT " + head]).addCallbacks(known, lambda _f: None)

    def _fits(self, size: int) -> bool:
        """The quota surely takes this message too (the room known, this command's messages counted)."""
        if self.room is None:
            return False
        room_bytes, room_messages = self.room
        return ((room_bytes is None or self.taken[0] + size <= room_bytes)
                and (room_messages is None or self.taken[1] + 1 <= room_messages))

    def _stream(self, msg: AppendMessage) -> None:
        self.state = _STREAMING
        if msg.literal.sync:  # before the literal is let in: reading it may run the rest of the command
            self.host.send(b"+ Ready for literal data\r\n")
        self.host.accept_literal()

    def _continue(self, _text: bytes) -> None:
        msg, self.waiting = self.waiting, None
        if msg is not None and self.state is _ANNOUNCED:
            self._stream(msg)

    def data(self, chunk: bytes) -> None:
        if self.state is _STREAMING:
            if self.held:
                self._send_held()
            self.conn.write(chunk)

    def _send_held(self) -> None:
        """The message's arguments held back for its literal's first bytes: on their way now."""
        held, self.held = self.held, b""
        self.conn.write(held)

    def message_end(self) -> None:
        if self.state is not _STREAMING:
            return
        if self.held:  # (a literal has bytes: they came first)
            self._send_held()
        if self.closing:
            self.conn.write(self.closing)
        self.state = _BETWEEN
        if self.mode is _STAGE:
            self.conn.write(b"\r\n")  # each message is an APPEND of its own
        if self.finishing:  # the backend failed the command meanwhile: the literal is through, stop here
            self.finishing = False
            if self.mode is not _STAGE:
                self.conn.write(b"\r\n")  # ends the command the backend already answered
            self._stop_reading()
            self._settle()

    def end(self) -> None:
        """The client's final CRLF."""
        if self.refusal is not None or self.input_over:
            return
        self._input_over()  # STAGE: the client's next command waits (the commit uses the connection)
        if self.mode is not _STAGE:
            self.sent_whole = True
            self.conn.write(b"\r\n")
        self._settle()

    def abort(self, status: str, text: str) -> None:
        """The client broke a limit or the syntax mid-command (the reader dropped the rest)."""
        self._input_over()
        self._cancel(b"%s %s %s\r\n" % (self.tag, status.encode(), text.encode()))

    def client_gone(self) -> bool:
        """The client left mid-command. True if this command now owns the connection (it
        closes it when done): a STAGE command whose staging mailbox must go, with no literal
        of it cut off at the backend. Otherwise closing the connection aborts what is open."""
        if self.mode is not _STAGE or self.state is _ANSWERED and (
                self.staging is None or self.staging.cleaned):
            return False
        cut = self.state in (_ANNOUNCED, _STREAMING)
        if not self.input_over:
            self.refusal = b""  # incomplete: nothing may be appended, and nobody is listening
            self._input_over()
        if cut:
            self._settle()
            return False  # that APPEND is cut off by closing; the staging mailbox goes over a new connection
        self.owns_conn = True
        self._settle()
        return True

    # -- the proxy stops the command ---------------------------------------------------------

    def _input_over(self) -> None:
        if not self.input_over:
            self.input_over = True
            if self.mode is _STAGE and not self.holding and self.refusal != b"":  # (b"": the client left)
                # The client's next command waits for the answer and the cleanup: until the staging
                # mailbox is gone its journal entry holds the target (a RENAME of it: INUSE).
                self.holding = True
                self.host.hold_input(True)
            if self.state in (_BETWEEN, _STREAMING, _ANNOUNCED):
                self.state = _SENT
            self.host.append_input_over(self)

    def _stop_reading(self) -> None:
        if not self.input_over:  # input held first (STAGE): the drop reads on at once, and must not run the next
            self._input_over()  # command before this one's answer is queued (probe j2 of stop 59: NOOP's came first)
            self.host.drop_command()

    def _cancel(self, answer: bytes) -> None:
        """Nothing of the command may be saved; the client gets *answer*."""
        if self.refusal is not None:
            return
        state, self.refusal = self.state, answer
        if self.held:
            self._send_held()  # the zero-length literal below ends what the backend was sent
        self._stop_reading()
        part = self.parts[0] if self.parts else None
        if (self.mode is not _STAGE and part is not None and part.status is None and not self.conn.closed
                and state is not _ANNOUNCED):
            # RFC 3502: a zero-length literal makes the server fail the whole command.
            conn = self.conn
            if "LITERAL+" in conn.capabilities:
                conn.write(b" {0+}\r\n\r\n")
            else:
                conn.on_continuation = lambda _text: conn.write(b"\r\n")
                conn.write(b" {0}\r\n")
        self._settle()

    # -- what the backend answers ----------------------------------------------------------------

    def _part_lost(self, part: _Part, _reason: Failure) -> None:
        part.status = "LOST"
        if not self.input_over:
            self._fail_fast(part)
        self._settle()

    def _part_done(self, part: _Part, start: ResponseStart, raw: bytes) -> None:
        part.status, part.raw, part.start = start.status, raw, start
        if not self.input_over and (self.mode is not _STAGE or part.status != "OK"):
            self._fail_fast(part)
        self._settle()

    def _fail_fast(self, part: _Part) -> None:
        """The backend answered (PASS) or refused a message (STAGE) while the client still sends:
        leave the backend with no command half sent, and read nothing more of this one."""
        state = self.state
        if state in (_ANNOUNCED, _STREAMING) and part.status != "LOST" and not (
                state is _ANNOUNCED and part is self.parts[-1]):
            self.finishing = True  # the backend drains the literal (or still says +): it ends at message_end
            return
        self.finishing = False
        if state is _ANNOUNCED:
            self.conn.on_continuation = None  # refused instead of "+": the backend ended that command
            self.waiting = None
        elif state is _BETWEEN and self.mode is not _STAGE and part.status != "LOST":
            self.conn.write(b"\r\n")  # ends the command the backend already answered
        self._stop_reading()

    # -- the answer: commit, or refuse -----------------------------------------------------------------

    def _settle(self) -> None:
        """Once the client is done and every backend answer is in: answer (STAGE: commit first)."""
        if self.state in (_PREPARING, _COMMITTING, _ANSWERED) or not self.input_over or self.finishing:
            return
        for part in self.parts:  # (a loop: no generator per call, twice a message)
            if part.status is None:
                return
        if self.mode is not _STAGE:
            self._learn()
            return self._answer(self._pass_answer())
        failure = self._stage_failure()
        if failure is not None:
            self._answer(failure[0], keep_held=True)  # input held since _input_over, until the cleanup
            d = defer.ensureDeferred(self._cleanup())
            d.addBoth(self._released)
            d.addErrback(self._crashed)
            return
        self.state = _COMMITTING
        defer.ensureDeferred(self._commit()).addErrback(self._crashed)

    def _learn(self) -> None:
        """PASS: tell the session whether the target took the messages, and the room left."""
        part = self.parts[0] if self.parts else None
        if self.mode is not _PASS or part is None or part.status == "LOST":
            return
        if part.status != "OK" or self.refusal is not None:
            return self.host.took(self.conn.name, self.mailbox, None)
        if self.room is not None:  # else nothing was learned of the quota (a LITERAL+ client's APPEND)
            (size, count), (sent, messages) = self.room, self.taken
            room = (None if size is None else size - sent, None if count is None else count - messages)
            self.host.took(self.conn.name, self.mailbox, room)

    def _pass_answer(self) -> bytes | None:
        part = self.parts[0] if self.parts else None
        if part is not None and part.status == "LOST":
            if self.host.dies_with(self.conn):
                return None
            return _unknown_answer(self.tag) if self.sent_whole else _lost_answer(self.tag)
        if self.refusal is not None:
            return self.refusal
        assert part is not None
        return replace_tag(part.raw, self.tag)

    def _stage_failure(self) -> tuple[bytes | None] | None:
        """STAGE: the answer if the command failed (a 1-tuple, its answer None when nobody is to
        be told), None if every message is staged and the commit may go."""
        if self.refusal is not None:
            return (self.refusal,)
        for part in self.parts:
            if part.status == "LOST":
                return (None if self.host.dies_with(self.conn) else _lost_answer(self.tag),)
            if part.status != "OK":
                return (replace_tag(part.raw, self.tag),)
        return None if self.parts else (b"",)

    def _answer(self, data: bytes | None, *, keep_held: bool = False) -> None:
        if self.state is _ANSWERED:
            return
        self.state = _ANSWERED
        if data and not self.parts:  # the proxy's own, nothing sent: after the APPENDs before it (probe 2, stop 49)
            self.host.after_answers(data)
        elif data:
            self.host.write_from(self.conn, data)
        if not keep_held:
            self._release_input()
        self.host.append_answered(self)

    def _release_input(self) -> None:
        if self.holding:
            self.holding = False
            self.host.hold_input(False)

    def _released(self, result: object) -> object:
        self._release_input()
        return result

    def _crashed(self, failure: Failure) -> None:
        log.failure("APPEND to {box} on {b} failed", failure, box=self.mailbox, b=self.conn.name)
        self.finishing = False
        self._stop_reading()
        self._answer(b"%s NO [SERVERBUG] Internal proxy error; nothing was appended\r\n" % self.tag)
        if self.staging is not None and not self.staging.cleaned:
            self.staging.cleaned = True  # once: a second failure is only logged
            d = defer.ensureDeferred(self._cleanup())
            d.addErrback(lambda f: log.failure("staging mailbox cleanup failed", f))
        elif self.owns_conn:
            self.conn.logout()

    # -- STAGE: the staging mailbox (staging.py) ---------------------------------------------------

    async def _prepare(self) -> None:
        """The journal entry, the target's check and the staging mailbox; then the first message."""
        staging = self.staging = Staging(self.host, self.conn, self.mailbox)
        try:
            refused = await staging.prepare(self.tag)
        except BackendError:
            refused = b"" if self.refusal == b"" else _lost_answer(self.tag)
        msg, self.waiting, self.state = self.waiting, None, _BETWEEN
        if self.refusal is not None:  # the client left meanwhile
            return self._settle()
        if refused is not None:
            return self._cancel(refused)
        if not staging.staged:  # no staging mailbox here (a namespace that refuses it): one message at most
            self.mode = _SINGLE
            self.host.no_staging.add(self.conn.name)  # for the session's later APPENDs there too
            await staging.cleanup()
        assert msg is not None
        self._send(msg)

    async def _commit(self) -> None:
        assert self.staging is not None
        answer: bytes | None
        try:
            answer = await self.staging.commit(self.tag)
        except BackendError as e:
            log.warn("APPEND to {box} on {b}: the commit was cut off: {why}", box=self.mailbox, b=self.conn.name,
                     why=str(e))
            gone = self.conn.closed and self.host.dies_with(self.conn)
            answer = None if gone else (b"%s NO [UNAVAILABLE] Mail server connection lost while appending; the "
                                        b"messages may or may not be there\r\n" % self.tag)
        self._answer(b"" if self.refusal == b"" else answer, keep_held=True)  # held until the cleanup
        try:
            await self._cleanup()
        finally:
            self._release_input()

    async def _cleanup(self) -> None:
        if self.staging is not None:
            await self.staging.cleanup()
        if self.owns_conn:
            self.conn.logout()


def _message_prefix(msg: AppendMessage) -> bytes:
    """`` (flags) "date" `` as the backend must read them (each checked by the reader)."""
    out = b""
    if msg.flags is not None:
        out += b" (" + b" ".join(msg.flags) + b")"
    if msg.date is not None:
        out += b" " + encode_quoted(msg.date)
    return out + b" "
