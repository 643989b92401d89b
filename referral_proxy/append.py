"""APPEND and MULTIAPPEND (RFC 3502), streamed to the mailbox's backend, all or nothing.

Each message literal goes to the backend chunk by chunk as it arrives. How the
command reaches the backend depends on what the backend can do:

* ``pass``: it has MULTIAPPEND. The command is streamed as one; the backend's
  transaction makes it atomic, and a zero-length literal (RFC 3502) cancels it.
* ``emulate``: no MULTIAPPEND but UIDPLUS. Each message becomes an APPEND of its
  own; if any fails, the ones already saved are removed by UID (``UID STORE
  +FLAGS.SILENT (\\Deleted)`` + ``UID EXPUNGE`` on a connection of their own), so
  the client still sees all or nothing; the APPENDUIDs are joined.
* ``single``: neither. One message goes through; a second one cancels the
  command before anything is saved, with a clear NO.

Synchronizing literals: the first message's is announced to the backend before
the client may send it, so TRYCREATE, over-quota or a refusal arrive before the
data (the RFC's own example); later ones up to 4 KiB are accepted at once and
sent non-synchronizing, saving a round trip each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from .backend import BackendError, BackendProtocol
from .imap.framing import LiteralSpec
from .imap.response import ResponseStart
from .imap.uidset import uid_set

if TYPE_CHECKING:
    from .session import ClientSession

__all__ = ["AppendCommand", "split_mailbox", "uid_set"]

log = Logger()

SMALL_SYNC_LITERAL = 4096  # the LITERAL- bound (RFC 7888): small enough to take at once
_APPENDUID = re.compile(rb"^(\d+) (\d+)$")


def split_mailbox(rest: bytes) -> tuple[bytes, bytes]:
    """``b'"My box" (\\Seen) '`` -> ``(b'"My box"', b'(\\Seen) ')``: the raw mailbox token and the rest."""
    rest = rest.lstrip(b" ")
    if rest.startswith(b'"'):
        i = 1
        while i < len(rest):
            if rest[i:i + 1] == b"\\":
                i += 2
                continue
            if rest[i:i + 1] == b'"':
                return rest[:i + 1], rest[i + 1:].lstrip(b" ")
            i += 1
        return rest, b""
    token, _, after = rest.partition(b" ")
    return token, after


@dataclass
class _Part:
    """One message of an emulated MULTIAPPEND: its own APPEND on the backend."""

    ptag: bytes
    status: str | None = None  # OK / NO / BAD once answered; "LOST" if the connection went
    raw: bytes = b""
    uid: tuple[int, int] | None = None  # (uidvalidity, uid) from APPENDUID


@dataclass
class AppendCommand:
    """One APPEND from the client, from its first fragment to the client's answer."""

    session: ClientSession
    tag: bytes
    conn: BackendProtocol
    mailbox_token: bytes  # as the client sent it (atom, quoted or re-quoted literal)
    mode: str = "pass"
    ptag: bytes = b""  # pass / single: the one backend command
    messages: int = 0
    started: bool = False
    waiting: LiteralSpec | None = None  # announced to the backend, awaiting its "+"
    refusal: bytes | None = None  # our own answer when the proxy cancelled
    ended: bool = False  # the client has sent the whole command
    answered: bool = False
    parts: list[_Part] = field(default_factory=list)
    current: _Part | None = None
    in_literal: bool = False  # a message literal is being streamed
    client_left: bool = False

    def __post_init__(self) -> None:
        caps = self.conn.capabilities
        self.mode = "pass" if "MULTIAPPEND" in caps else "emulate" if "UIDPLUS" in caps else "single"
        self.limits = self.session.limits

    # -- what the client sends ----------------------------------------------------

    def begin(self, rest: bytes, literal: LiteralSpec | None) -> None:
        """The first fragment: *rest* is what follows the mailbox (flags, date)."""
        if self.mode != "emulate":
            self.ptag = self.conn.next_tag()
            self._message(self.ptag + b" APPEND " + self.mailbox_token + b" " + rest, literal)
        else:
            self._message(rest, literal)

    def _start(self) -> None:
        """pass / single: the backend command begins with the bytes about to be written."""
        if not self.started:
            self.started = True
            self.conn.expect(self.ptag, self._done)

    def fragment(self, data: bytes, literal: LiteralSpec | None) -> None:
        """A fragment after a message literal: the next message's flags and date, or the end."""
        if self.refusal is not None:
            return
        if literal is None:
            self.ended = True
            self.session._append_ended(self)
            if self.mode != "emulate":
                self.conn.write(data + b"\r\n")
            else:
                self._maybe_finish()
            return
        if self.mode == "single":
            self.session._framer.reject_literal()
            self._cancel(b"%s NO [CANNOT] This mail server cannot append several messages in one command; "
                         b"nothing was appended\r\n" % self.tag)
            return
        self._message(data, literal)

    def data(self, chunk: bytes) -> None:
        if self.refusal is None:
            self.conn.write(chunk)

    def literal_end(self) -> None:
        self.in_literal = False
        if self.mode == "emulate" and self.refusal is None:
            self.conn.write(b"\r\n")  # each message is a command of its own

    def line_too_long(self, why: bytes) -> None:
        self._cancel(b"%s BAD %s\r\n" % (self.tag, why))

    # -- each message --------------------------------------------------------------

    def _message(self, prefix: bytes, literal: LiteralSpec | None) -> None:
        framer = self.session._framer
        if literal is None:  # "APPEND mailbox" with no message: let the backend say BAD
            self.ended = True
            self.session._append_ended(self)
            if self.mode == "emulate":
                self.ptag = self.conn.next_tag()
                prefix = self.ptag + b" APPEND " + self.mailbox_token + b" " + prefix
            self._start()
            self.conn.write(prefix + b"\r\n")
            return
        self.messages += 1
        if self.conn.closed:  # lost between two messages: what was saved is rolled back
            framer.reject_literal()
            return self._cancel(b"%s NO [UNAVAILABLE] Mail server connection lost; nothing was appended\r\n"
                                % self.tag)
        if self.messages > self.limits.max_append_messages:
            framer.reject_literal()
            return self._cancel(b"%s NO [LIMIT] Too many messages in one APPEND (limit %d); nothing was appended\r\n"
                                % (self.tag, self.limits.max_append_messages))
        if literal.size > self.limits.max_message:
            framer.reject_literal()
            return self._cancel(b"%s NO [TOOBIG] Message too large (limit %d bytes); nothing was appended\r\n"
                                % (self.tag, self.limits.max_message))
        if literal.size == 0:
            framer.reject_literal()
            return self._cancel(b"%s NO Zero-length message: nothing was appended (RFC 3502)\r\n" % self.tag)
        if self.mode == "emulate":
            part = _Part(self.conn.next_tag())
            self.parts.append(part)
            self.current = part
            self.conn.expect(part.ptag, lambda start, raw, part=part: self._part_done(part, start, raw))
            self.started = True
            prefix = part.ptag + b" APPEND " + self.mailbox_token + b" " + prefix.lstrip(b" ")
        else:
            self._start()
        caps = self.conn.capabilities
        literal_plus = "LITERAL+" in caps or ("LITERAL-" in caps and literal.size <= 4096)
        take_now = not literal.sync or (self.messages > 1 and literal.size <= SMALL_SYNC_LITERAL)
        if literal_plus and take_now:
            self.conn.write(prefix + literal.announce(sync=False) + b"\r\n")
            framer.accept_literal()
            self.in_literal = True
            if literal.sync:
                self.session._send(b"+ Ready for literal data\r\n")
            return
        # Let the backend decide before the client sends the data.
        self.waiting = literal
        self.session._block("literal")
        self.conn.on_continuation = self._continue
        self.conn.write(prefix + literal.announce(sync=True) + b"\r\n")

    def _continue(self, _text: bytes) -> None:
        literal, self.waiting = self.waiting, None
        assert literal is not None
        self.session._framer.accept_literal()
        self.in_literal = True
        if literal.sync:
            self.session._send(b"+ Ready for literal data\r\n")
        self.session._unblock()

    def _refused_before_literal(self) -> None:
        """The backend answered instead of "+": the client's literal never comes (or is drained)."""
        self.waiting = None
        self.conn.on_continuation = None
        self.session._framer.reject_literal()
        self.ended = True
        self.session._append_ended(self)
        self.session._unblock()

    def _cancel(self, answer: bytes) -> None:
        """Stop the command: nothing of it may be saved; the client gets *answer*."""
        if self.refusal is not None:
            return
        self.refusal = answer
        if not self.ended:
            self.ended = True
            self.session._append_ended(self)
        if self.mode == "emulate":
            self._maybe_finish()
            return
        if not self.started or self.conn.closed:
            self._answer(answer)
            return
        # RFC 3502: a zero-length literal makes the server fail the whole command. A
        # server without MULTIAPPEND fails it too: anything but CRLF is a syntax error.
        conn = self.conn
        if "LITERAL+" in conn.capabilities:
            conn.write(b" {0+}\r\n\r\n")
        else:
            conn.on_continuation = lambda _text: conn.write(b"\r\n")
            conn.write(b" {0}\r\n")

    # -- what the backend answers ------------------------------------------------------

    def _done(self, start: ResponseStart, raw: bytes) -> None:
        """pass / single: the backend's completion of the whole command."""
        if start.tag is None:
            return self._lost()
        if self.waiting is not None:
            self._refused_before_literal()
        self._answer(self.refusal if self.refusal is not None else self.tag + raw[len(self.ptag):])

    def _part_done(self, part: _Part, start: ResponseStart, raw: bytes) -> None:
        if start.tag is None:
            part.status = "LOST"
        else:
            part.status, part.raw = start.status, raw
            if start.code == "APPENDUID":
                m = _APPENDUID.match(start.code_args)
                if m:
                    part.uid = (int(m.group(1)), int(m.group(2)))
        if self.waiting is not None and part is self.current:
            self._refused_before_literal()
        self._maybe_finish()

    def _lost(self) -> None:
        if self.waiting is not None:
            self._refused_before_literal()
        elif not self.ended:
            self.ended = True
            self.session._framer.discard_line()
            self.session._append_ended(self)
        if not self.session._session_dies_with(self.conn):
            self._answer(b"%s NO [UNAVAILABLE] Mail server connection lost; nothing was appended\r\n" % self.tag)
        else:
            self.answered = True
            self.session._append_answered(self)

    def _maybe_finish(self) -> None:
        """emulate: once the client is done and every part is answered, commit or roll back."""
        if self.answered or not self.ended or any(p.status is None for p in self.parts):
            return
        if not self.parts:
            if self.refusal is not None:
                self._answer(self.refusal)
            return  # "APPEND mailbox" without a message: _done relays the backend's answer
        saved = [p for p in self.parts if p.status == "OK" and p.uid is not None]
        uidvalidity = {p.uid[0] for p in saved if p.uid}
        if self.refusal is None and len(saved) == len(self.parts) and len(uidvalidity) == 1:
            uids = uid_set([p.uid[1] for p in saved if p.uid])
            return self._answer(b"%s OK [APPENDUID %d %s] Append completed.\r\n" % (self.tag, uidvalidity.pop(), uids))
        answer = self.refusal
        if answer is None:
            first = next((p for p in self.parts if p.status != "OK"), None)
            if first is None:  # every part OK but without a usable APPENDUID
                answer = b"%s NO [SERVERBUG] The mail server gave no usable APPENDUID\r\n" % self.tag
            elif first.status == "LOST":
                answer = b"%s NO [UNAVAILABLE] Mail server connection lost\r\n" % self.tag
            else:
                answer = self.tag + first.raw[len(first.ptag):]
        if self.client_left:
            self.conn.logout()  # aborts a message still being received
        if not saved:
            return self._answer(answer)
        self.answered = True  # the answer waits for the rollback
        d = defer.ensureDeferred(self.session._remove_appended(self.conn.name, self.mailbox_token, [p.uid[1] for p in saved if p.uid]))

        def after(result: Any) -> None:
            if result is None:
                log.info("APPEND failed: removed the {n} message(s) already saved", n=len(saved))
                self.session._send(answer)
            else:
                log.error("APPEND rollback of {n} messages in {box} on {b} failed: {why}", n=len(saved),
                          box=self.mailbox_token, b=self.conn.name, why=str(result))
                self.session._send(b"%s NO [SERVERBUG] The append failed and %d message(s) already saved could "
                                   b"not be removed\r\n" % (self.tag, len(saved)))
            self.session._append_answered(self)

        d.addBoth(after)

    def _answer(self, data: bytes) -> None:
        if self.answered:
            return
        self.answered = True
        self.session._out.write(self.conn, data)
        self.session._append_answered(self)

    def client_gone(self) -> bool:
        """The client left mid-command. True if this command now owns the connection
        (emulate: earlier messages must be answered, then removed, before it closes)."""
        if self.mode != "emulate" or self.answered or not self.parts:
            return False
        self.client_left = True
        self.refusal = self.refusal or b""  # nothing to answer: nobody is listening
        self.ended = True
        if self.in_literal and self.current is not None and self.current.status is None:
            self.current.status = "ABORTED"  # its literal never completes: closing aborts it
        self._maybe_finish()
        return True


async def remove_appended(conn: BackendProtocol, mailbox_token: bytes, uids: list[int]) -> None:
    """Remove exactly these UIDs (never a plain EXPUNGE, which would take other \\Deleted mail)."""
    selected = await conn.command(b"SELECT " + mailbox_token)
    if not selected.ok:
        raise BackendError(f"SELECT for rollback failed: {selected.start.text!r}")
    uids_b = uid_set(uids)
    stored = await conn.command(b"UID STORE " + uids_b + b" +FLAGS.SILENT (\\Deleted)")
    if not stored.ok:
        raise BackendError(f"UID STORE for rollback failed: {stored.start.text!r}")
    expunged = await conn.command(b"UID EXPUNGE " + uids_b)
    if not expunged.ok:
        raise BackendError(f"UID EXPUNGE for rollback failed: {expunged.start.text!r}")
