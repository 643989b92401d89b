"""APPEND and MULTIAPPEND (RFC 3502), streamed to the mailbox's backend, all or nothing.

Each message literal goes to the backend chunk by chunk as it arrives; flags and
dates are written again from what the command reader parsed. How the command
reaches the backend depends on what the backend can do (:class:`Mode`):

* ``PASS``: it has MULTIAPPEND. The command is streamed as one; the backend's
  transaction makes it atomic, and a zero-length literal (RFC 3502) cancels it.
* ``EMULATE``: no MULTIAPPEND but UIDPLUS. Each message becomes an APPEND of its
  own; if any fails, the ones already saved are removed by UID (``UID STORE
  +FLAGS.SILENT (\\Deleted)`` + ``UID EXPUNGE`` on a connection of their own), so
  the client still sees all or nothing; the APPENDUIDs are joined.
* ``SINGLE``: neither. One message goes through; a second one cancels the
  command before anything is saved, with a clear NO.

Synchronizing literals: the first message's is announced to the backend before
the client may send it, so TRYCREATE, over-quota or a refusal arrive before the
data (the RFC's own example); later ones up to 4 KiB are accepted at once and
sent non-synchronizing, saving a round trip each. Once the backend has answered,
nothing more of the command is read from the client (never taken for commands).

The command's life is one :class:`AppendState` at a time; the answer (commit, or
roll back then answer) is decided in one place, :meth:`AppendCommand._settle`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import BackendError, BackendProtocol
from .imap.grammar import encode_astring, encode_quoted
from .imap.reader import (
    AppendAbort,
    AppendData,
    AppendEnd,
    AppendMessage,
    AppendMessageEnd,
    AppendStart,
    CommandReader,
)
from .imap.response import ResponseStart, replace_tag
from .imap.uidset import uid_set
from .pool import BackendPool
from .routing import Route

__all__ = ["AppendCommand", "AppendHost", "AppendState", "Appends", "AppendsHost", "Mode", "remove_appended",
           "uid_set"]

log = Logger()

SMALL_SYNC_LITERAL = 4096  # the LITERAL- bound (RFC 7888): small enough to take at once
_APPENDUID = re.compile(rb"^(\d+) (\d+)$")


class Mode(Enum):
    PASS = "the backend has MULTIAPPEND: one command"
    EMULATE = "no MULTIAPPEND but UIDPLUS: one APPEND per message, removed again on failure"
    SINGLE = "neither: one message only"


class AppendState(Enum):
    BETWEEN = "waiting for the client's next message or the end of the command"
    ANNOUNCED = "a message literal was announced to the backend; waiting for its +"
    STREAMING = "a message literal flows from the client to the backend"
    SENT = "the client sent the whole command (or the rest is dropped); waiting for the backend"
    ROLLING_BACK = "removing what an emulated MULTIAPPEND saved"
    ANSWERED = "the client has its answer"


class AppendHost(Protocol):
    """What an APPEND needs of its session."""

    def accept_literal(self) -> None:
        """Let the client's announced message literal in."""

    def drop_command(self) -> None:
        """Read nothing more of this command from the client (never as commands)."""

    def send(self, data: bytes) -> None:
        """A line of the proxy's own (``+ Ready``)."""

    def write_from(self, source: object, data: bytes, end: bool = True) -> None:
        """The answer, in order with what *source* relays."""

    def append_input_over(self, cmd: AppendCommand) -> None:
        """The client has sent all of *cmd*, or the rest will be dropped."""

    def append_answered(self, cmd: AppendCommand) -> None: ...

    def dies_with(self, conn: BackendProtocol) -> bool:
        """True if losing *conn* ends the session (no answer needed then)."""

    async def remove_appended(self, backend: str, mailbox: bytes, uids: list[int]) -> BaseException | None:
        """Remove these UIDs on a connection of its own; None when done."""


@dataclass
class _Part:
    """One message of an emulated MULTIAPPEND: its own APPEND on the backend."""

    ptag: bytes
    status: str | None = None  # OK / NO / BAD once answered; LOST, ABORTED
    raw: bytes = b""
    uid: tuple[int, int] | None = None  # (uidvalidity, uid) from APPENDUID


@dataclass(eq=False)  # compared (and hashed) by identity: a session keeps the unanswered ones
class AppendCommand:
    """One APPEND from the client, from its first message to the client's answer."""

    host: AppendHost
    tag: bytes
    conn: BackendProtocol
    mailbox: bytes
    mode: Mode = Mode.PASS
    state: AppendState = AppendState.BETWEEN
    input_over: bool = False  # nothing more of the command will come from the client
    refusal: bytes | None = None  # the proxy's own answer once it cancelled (b"": nobody to tell)
    ptag: bytes = b""  # PASS / SINGLE: the one backend command, once begun
    result: tuple[ResponseStart, bytes] | None = None  # PASS / SINGLE: its completion
    lost: bool = False
    messages: int = 0
    parts: list[_Part] = field(default_factory=list)
    waiting: AppendMessage | None = None  # ANNOUNCED: the message whose + is awaited

    def __post_init__(self) -> None:
        caps = self.conn.capabilities
        self.mode = Mode.PASS if "MULTIAPPEND" in caps else Mode.EMULATE if "UIDPLUS" in caps else Mode.SINGLE

    # -- what the client sends ------------------------------------------------------------

    def message(self, msg: AppendMessage) -> None:
        """A message whose literal the client announced: the reader awaits our decision."""
        if self.refusal is not None:
            return self.host.drop_command()
        self.messages += 1
        if self.conn.closed:  # lost between two messages: what was saved is rolled back
            return self._cancel(b"%s NO [UNAVAILABLE] Mail server connection lost; nothing was appended\r\n" % self.tag)
        if msg.literal.size == 0:
            return self._cancel(b"%s NO Zero-length message: nothing was appended (RFC 3502)\r\n" % self.tag)
        if self.messages > 1 and self.mode is Mode.SINGLE:
            return self._cancel(b"%s NO [CANNOT] This mail server cannot append several messages in one command; "
                                b"nothing was appended\r\n" % self.tag)
        head = self._head()
        if head is None:
            return self._cancel(b"%s NO [CANNOT] This mail server cannot take that mailbox name here\r\n" % self.tag)
        if self.mode is Mode.EMULATE:
            part = _Part(self.conn.next_tag())
            self.parts.append(part)
            self.conn.expect(part.ptag, partial(self._part_done, part), partial(self._part_lost, part))
            prefix = part.ptag + b" APPEND " + head
        elif not self.ptag:
            self.ptag = self.conn.next_tag()
            self.conn.expect(self.ptag, self._done, self._lost)
            prefix = self.ptag + b" APPEND " + head
        else:
            prefix = b""
        prefix += _message_prefix(msg)
        literal = msg.literal
        caps = self.conn.capabilities
        literal_plus = "LITERAL+" in caps or ("LITERAL-" in caps and literal.size <= SMALL_SYNC_LITERAL)
        take_now = not literal.sync or (self.messages > 1 and literal.size <= SMALL_SYNC_LITERAL)
        if literal_plus and take_now:
            self.conn.write(prefix + literal.announce(sync=False) + b"\r\n")
            self._stream(msg)
            return
        # Let the backend decide before the client sends the data.
        self.state, self.waiting = AppendState.ANNOUNCED, msg
        self.conn.on_continuation = self._continue
        self.conn.write(prefix + literal.announce(sync=True) + b"\r\n")

    def _head(self) -> bytes | None:
        """The mailbox as the backend must read it (a literal only where LITERAL+ allows)."""
        name = encode_astring(self.mailbox)
        if name is not None:
            return name
        if "LITERAL+" not in self.conn.capabilities:
            return None
        return b"{%d+}\r\n" % len(self.mailbox) + self.mailbox

    def _stream(self, msg: AppendMessage) -> None:
        self.state = AppendState.STREAMING
        self.host.accept_literal()
        if msg.literal.sync:
            self.host.send(b"+ Ready for literal data\r\n")

    def _continue(self, _text: bytes) -> None:
        msg, self.waiting = self.waiting, None
        assert msg is not None
        self._stream(msg)

    def data(self, chunk: bytes) -> None:
        if self.state is AppendState.STREAMING:
            self.conn.write(chunk)

    def message_end(self) -> None:
        if self.state is AppendState.STREAMING:
            self.state = AppendState.BETWEEN
            if self.mode is Mode.EMULATE:
                self.conn.write(b"\r\n")  # each message is a command of its own

    def end(self) -> None:
        """The client's final CRLF."""
        if self.refusal is not None:
            return
        self._input_over()
        if self.mode is not Mode.EMULATE:
            self.conn.write(b"\r\n")
        self._settle()

    def abort(self, status: str, text: str) -> None:
        """The client broke a limit or the syntax mid-command (the reader dropped the rest)."""
        self._input_over()
        self._cancel(b"%s %s %s\r\n" % (self.tag, status.encode(), text.encode()))

    def client_gone(self) -> bool:
        """The client left mid-command. True if this command now owns the connection
        (EMULATE: earlier messages must be answered, then removed, before it closes)."""
        if self.mode is not Mode.EMULATE or self.state is AppendState.ANSWERED or not self.parts:
            return False
        self.refusal = self.refusal if self.refusal is not None else b""  # nobody is listening
        if self.state is AppendState.STREAMING and self.parts[-1].status is None:
            self.parts[-1].status = "ABORTED"  # its literal never completes: closing aborts it
        self._input_over()
        self._settle()
        return True

    # -- the proxy stops the command ---------------------------------------------------------

    def _input_over(self) -> None:
        if not self.input_over:
            self.input_over = True
            if self.state in (AppendState.BETWEEN, AppendState.STREAMING, AppendState.ANNOUNCED):
                self.state = AppendState.SENT
            self.host.append_input_over(self)

    def _cancel(self, answer: bytes) -> None:
        """Nothing of the command may be saved; the client gets *answer*."""
        if self.refusal is not None:
            return
        self.refusal = answer
        if not self.input_over:
            self.host.drop_command()
            self._input_over()
        if self.mode is not Mode.EMULATE and self.ptag and not self.conn.closed and self.result is None:
            # RFC 3502: a zero-length literal makes the server fail the whole command. A
            # server without MULTIAPPEND fails it too: anything but CRLF is a syntax error.
            conn = self.conn
            if "LITERAL+" in conn.capabilities:
                conn.write(b" {0+}\r\n\r\n")
            else:
                conn.on_continuation = lambda _text: conn.write(b"\r\n")
                conn.write(b" {0}\r\n")
        self._settle()

    # -- what the backend answers ----------------------------------------------------------------

    def _backend_answered_early(self) -> None:
        """The backend answered while the client still sends: the rest is never relayed."""
        if self.state is AppendState.ANNOUNCED:
            self.conn.on_continuation = None
            self.waiting = None
        if not self.input_over:
            self.host.drop_command()
            self._input_over()

    def _done(self, start: ResponseStart, raw: bytes) -> None:
        """PASS / SINGLE: the backend's completion of the whole command."""
        self.result = (start, raw)
        self._backend_answered_early()
        self._settle()

    def _lost(self, _reason: Failure) -> None:
        self.lost = True
        self._backend_answered_early()
        self._settle()

    def _part_lost(self, part: _Part, _reason: Failure) -> None:
        self._part_done(part, None, b"")

    def _part_done(self, part: _Part, start: ResponseStart | None, raw: bytes) -> None:
        if start is None:
            part.status = "LOST"
        else:
            part.status, part.raw = start.status, raw
            if start.code == "APPENDUID":
                m = _APPENDUID.match(start.code_args)
                if m:
                    part.uid = (int(m.group(1)), int(m.group(2)))
        if self.state is AppendState.ANNOUNCED and part is self.parts[-1]:
            self._backend_answered_early()  # refused before its literal
        self._settle()

    # -- the answer: commit, or roll back first -----------------------------------------------------

    def _settle(self) -> None:
        """Once the client is done and every backend answer is in: answer, removing first
        whatever an emulated MULTIAPPEND saved if the whole did not succeed."""
        if self.state in (AppendState.ROLLING_BACK, AppendState.ANSWERED) or not self.input_over:
            return
        if self.mode is not Mode.EMULATE:
            if self.lost:
                return self._answer(None if self.host.dies_with(self.conn) else
                                    b"%s NO [UNAVAILABLE] Mail server connection lost; nothing was appended\r\n"
                                    % self.tag)
            if self.ptag and self.result is None:
                return  # the backend has yet to answer
            if self.refusal is not None:
                return self._answer(self.refusal)
            assert self.result is not None
            return self._answer(replace_tag(self.result[1], self.tag))
        if any(p.status is None for p in self.parts):
            return
        saved = [p.uid for p in self.parts if p.status == "OK" and p.uid is not None]
        validities = {uid[0] for uid in saved}
        if not self.parts:
            return self._answer(self.refusal)
        if self.refusal is None and len(saved) == len(self.parts) and len(validities) == 1:
            return self._answer(b"%s OK [APPENDUID %d %s] Append completed.\r\n"
                                % (self.tag, validities.pop(), uid_set([u for _v, u in saved])))
        answer = self.refusal if self.refusal is not None else self._first_failure()
        if self.refusal == b"":
            self.conn.logout()  # the client left: abort a message still being received
        if not saved:
            return self._answer(answer)
        self.state = AppendState.ROLLING_BACK
        d = defer.ensureDeferred(self.host.remove_appended(self.conn.name, self.mailbox, [u for _v, u in saved]))
        d.addBoth(lambda result: self._rolled_back(result, answer, len(saved)))

    def _first_failure(self) -> bytes:
        first = next((p for p in self.parts if p.status != "OK"), None)
        if first is None:  # every part OK but without a usable APPENDUID
            return b"%s NO [SERVERBUG] The mail server gave no usable APPENDUID\r\n" % self.tag
        if first.status == "LOST":
            return b"%s NO [UNAVAILABLE] Mail server connection lost\r\n" % self.tag
        return replace_tag(first.raw, self.tag)

    def _rolled_back(self, result: Any, answer: bytes, count: int) -> None:
        if result is None:
            log.info("APPEND failed: removed the {n} message(s) already saved", n=count)
        else:
            log.error("APPEND rollback of {n} messages in {box} on {b} failed: {why}", n=count,
                      box=self.mailbox, b=self.conn.name, why=str(result))
            answer = (b"%s NO [SERVERBUG] The append failed and %d message(s) already saved could "
                      b"not be removed\r\n" % (self.tag, count))
        self._answer(answer)

    def _answer(self, data: bytes | None) -> None:
        if self.state is AppendState.ANSWERED:
            return
        self.state = AppendState.ANSWERED
        if data:
            self.host.write_from(self.conn, data)
        self.host.append_answered(self)


def _message_prefix(msg: AppendMessage) -> bytes:
    """`` (flags) "date" `` as the backend must read them (each checked by the reader)."""
    out = b""
    if msg.flags is not None:
        out += b" (" + b" ".join(msg.flags) + b")"
    if msg.date is not None:
        out += b" " + encode_quoted(msg.date)
    return out + b" "


# -- the session's APPENDs ------------------------------------------------------------------


class AppendsHost(Protocol):
    """What the APPENDs of a session need of it."""

    reader: CommandReader
    pool: BackendPool | None

    def send(self, data: bytes) -> None: ...

    def write_from(self, source: object, data: bytes, end: bool = True) -> None: ...

    def run(self, tag: bytes, work: Any) -> None: ...

    def decided(self) -> None:
        """The reader's pending decision was taken: go on reading."""

    def command_done(self) -> None:
        """A command in flight has its answer (the session caps them)."""

    def dies_with(self, conn: BackendProtocol) -> bool: ...

    def append_refusal(self, tag: bytes, mailbox: bytes) -> bytes | None:
        """The answer refusing an APPEND to *mailbox* before any message (INUSE, a referral), if any."""

    def route_of(self, mailbox: bytes) -> Route: ...


class Appends:
    """The APPENDs of one session: the one the client is sending, and those not answered
    yet. It is the host of each AppendCommand (AppendHost)."""

    def __init__(self, host: AppendsHost) -> None:
        self.host = host
        self.current: AppendCommand | None = None
        self.unanswered: set[AppendCommand] = set()

    def start(self, event: AppendStart) -> None:
        """Route an APPEND to its mailbox's backend and start streaming it there."""
        host = self.host
        assert host.pool is not None
        refusal = host.append_refusal(event.tag, event.mailbox)
        if refusal is not None:
            host.reader.drop()  # refused before the client sends any message
            return host.send(refusal)
        pool, route = host.pool, host.route_of(event.mailbox)
        conn = pool.fast(route.primary)
        if conn is not None:
            return self._begin(event, conn)

        async def later() -> None:
            try:
                conn = await pool.ready_for(route)
            except BaseException:
                host.reader.drop()
                raise
            self._begin(event, conn)

        host.run(event.tag, later())

    def _begin(self, event: AppendStart, conn: BackendProtocol) -> None:
        self.current = AppendCommand(self, event.tag, conn, event.mailbox)
        self.unanswered.add(self.current)

    def event(self, event: object) -> None:
        """A reader event of the APPEND being read."""
        cmd = self.current
        if cmd is None:
            if isinstance(event, AppendMessage):
                self.host.reader.drop()
        elif isinstance(event, AppendData):
            cmd.data(event.data)
        elif isinstance(event, AppendMessage):
            cmd.message(event)
        elif isinstance(event, AppendMessageEnd):
            cmd.message_end()
        elif isinstance(event, AppendEnd):
            cmd.end()
        elif isinstance(event, AppendAbort):
            cmd.abort(event.status, event.text)

    def client_gone(self) -> list[BackendProtocol]:
        """The client left: the connections that APPENDs now own (they close them themselves)."""
        return [cmd.conn for cmd in list(self.unanswered) if cmd.client_gone()]

    # -- AppendHost ---------------------------------------------------------------------------

    def accept_literal(self) -> None:
        self.host.reader.accept()
        self.host.decided()

    def drop_command(self) -> None:
        self.host.reader.drop()
        self.host.decided()

    def send(self, data: bytes) -> None:
        self.host.send(data)

    def write_from(self, source: object, data: bytes, end: bool = True) -> None:
        self.host.write_from(source, data, end)

    def append_input_over(self, cmd: AppendCommand) -> None:
        if self.current is cmd:
            self.current = None

    def append_answered(self, cmd: AppendCommand) -> None:
        self.unanswered.discard(cmd)
        if self.host.pool is not None:
            self.host.pool.check_quiet()
        self.host.command_done()

    def dies_with(self, conn: BackendProtocol) -> bool:
        return self.host.dies_with(conn)

    async def remove_appended(self, backend: str, mailbox: bytes, uids: list[int]) -> BaseException | None:
        """Remove messages an emulated MULTIAPPEND saved, on a connection of its own
        (the session's may have another mailbox selected). None when done."""
        assert self.host.pool is not None
        try:
            conn = await self.host.pool.open(backend)
        except BackendError as e:
            return e
        try:
            await remove_appended(conn, mailbox, uids)
            return None
        except Exception as e:
            return e
        finally:
            conn.logout()


async def remove_appended(conn: BackendProtocol, mailbox: bytes, uids: Sequence[int]) -> None:
    """Remove exactly these UIDs (never a plain EXPUNGE, which would take other \\Deleted mail)."""
    name = encode_astring(mailbox) or b"{%d+}\r\n" % len(mailbox) + mailbox
    selected = await conn.command(b"SELECT " + name)
    if not selected.ok:
        raise BackendError(f"SELECT for rollback failed: {selected.start.text!r}")
    uids_b = uid_set(list(uids))
    stored = await conn.command(b"UID STORE " + uids_b + b" +FLAGS.SILENT (\\Deleted)")
    if not stored.ok:
        raise BackendError(f"UID STORE for rollback failed: {stored.start.text!r}")
    expunged = await conn.command(b"UID EXPUNGE " + uids_b)
    if not expunged.ok:
        raise BackendError(f"UID EXPUNGE for rollback failed: {expunged.start.text!r}")
