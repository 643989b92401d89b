"""One MULTIAPPEND of messages streamed from another backend, hashed on the way (transfer.py's core).

Each message is read by ``BODY.PEEK[]`` and its literal streamed straight into the
destination's MULTIAPPEND, its sha256 taken on the way: the hash of the message as
``BODY[]`` shows it, on the source and on the destination alike, is what verification,
the journal and recovery compare (transfer.py, mover.py, movefinish.py, drain.py).

A message holding NUL bytes (APPENDed as a literal8, RFC 3516) is not its ``BODY[]``:
Dovecot sends each NUL there as 0x80 (RFC 3501 forbids NUL in a literal), so a copy made
from it would hold 0x80 for good. Its ``BINARY[]`` is the stored bytes, unless a part has a
Content-Transfer-Encoding Dovecot decodes (base64, quoted-printable: then ``BINARY[]``
shows the part decoded and its header rewritten). So, when both backends announce BINARY:
a ``BODY[]`` holding 0x80 makes its message a suspect; once the bodies are sent, before
the commit, each suspect's ``BINARY.PEEK[]`` is read, and one holding a NUL that is its
``BODY[]`` but for NUL in place of 0x80 is the stored bytes. If there is one, this
MULTIAPPEND is cancelled (a syntax error: the server saves none of it) and sent again,
those messages read by ``BINARY.PEEK[]`` and sent as ``~{n+}``; their hash is taken of
the bytes with each NUL as 0x80, which is their ``BODY[]`` on either side. Every other
message (and every message of a backend without BINARY) is sent as before.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .backend import BackendProtocol, wire_tail
from .imap.command import ParseError
from .imap.data import parse_uid_code
from .imap.framing import Line, LiteralData, LiteralEnd
from .imap.quoting import astring
from .imap.response import ResponseStart, completion_text
from .imap.uidset import uid_set
from .mailops import TRYCREATE, MessageInfo, TransferError, Vanished, exists, fetch_infos, still_there

__all__ = ["Progress", "Copied", "CommitUnknown", "atomic_target", "copy_stream", "copy_surviving", "surviving", "hash_messages", "hashes_present", "batches", "BATCH_MESSAGES",
           "BATCH_BYTES"]

BATCH_MESSAGES = 500  # messages per MULTIAPPEND when a whole mailbox moves
BATCH_BYTES = 256 * 1024 * 1024

log = Logger()

BODY, BINARY = b"BODY.PEEK[]", b"BINARY.PEEK[]"
NUL_AS = bytes.maketrans(b"\x00", b"\x80")  # BODY[] of a stored NUL, as Dovecot sends it
CANCEL = b" CANCEL\r\n"  # an atom where a message's flags, date or literal must be: the MULTIAPPEND is refused whole


@implementer(IPushProducer)
class _Pause:
    """The source's transport as the producer of the destination's: a slow destination pauses the source."""

    def __init__(self, transport: object) -> None:
        self._t = transport

    def pauseProducing(self) -> None:
        self._t.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if not getattr(self._t, "disconnected", False):
            self._t.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        # The destination is gone (Twisted calls this on its connectionLost): a pause
        # it held must not outlive it, or the source, and the client behind it, hang.
        self.resumeProducing()


@dataclass
class Progress:
    """Counts for progress reports: called after each message."""

    messages: int = 0
    bytes: int = 0
    on_message: Callable[[Progress], None] | None = None
    carried: int = 0  # of a move: messages that reached a source during it, carried at its end

    def add(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        if self.on_message is not None:
            self.on_message(self)


@dataclass(frozen=True)
class Copied:
    """A committed MULTIAPPEND: where the messages went, and the sha256 of each body sent."""

    uidvalidity: int
    uids: tuple[int, ...]  # destination UIDs, in the order of the source messages
    hashes: tuple[str, ...]
    others: tuple[bytes, ...]  # other untagged responses the source sent meanwhile, raw, to relay


class CommitUnknown(TransferError):
    """The whole MULTIAPPEND was sent but its answer never came: it may have been saved."""


_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)


class _Bodies:
    """Reads the ``BODY[]`` (or ``BINARY[]``) literals of one ``UID FETCH`` as they stream, in the expected UID order.

    *begin(uid, size)*, *chunk(data)* and *end()* see each body; every other untagged
    response (a delivery's EXISTS, a flag update) is kept raw for the client."""

    def __init__(self, conn: BackendProtocol, uids: Sequence[int], begin: Callable[[int, int], None],
                 chunk: Callable[[bytes], None], end: Callable[[], None], item: bytes = BODY) -> None:
        self.conn, self.expected, self.item = conn, list(uids), item
        self.answer = item.replace(b".PEEK", b"")  # BODY[] / BINARY[]: what the FETCH response names
        self.begin, self.chunk, self.end = begin, chunk, end
        self.next = 0
        self.in_body = False
        self.error: str | None = None
        self.other: list[bytes] | None = None
        self.dropping = False  # self.other is a body of ours after an error: read, not kept
        self.others: list[bytes] = []

    def tap(self, start: ResponseStart | None, event: object) -> None:
        if start is not None:
            assert isinstance(event, Line)
            if start.name == "FETCH" and event.literal is not None and event.data.rstrip().upper().endswith(self.answer):
                if self.error is not None:  # a body of ours after the error: not for the client either
                    self.other, self.dropping = [], True
                    return
                m = _UID.search(event.data)
                uid = self.expected[self.next] if self.next < len(self.expected) else None
                if uid is None or m is None or int(m.group(1)) != uid:
                    self.error = f"unexpected message {m.group(1).decode() if m else '?'} from {self.conn.name}"
                    self.other, self.dropping = [], True  # swallowed: it is not for the client either
                    return
                self.next += 1
                self.in_body = True
                self.begin(uid, event.literal.size)
                return
            self.other = [event.data + wire_tail(event)]  # not ours: for the client
            if event.literal is None:
                self._other_done()
            return
        if isinstance(event, LiteralData):
            if self.in_body:
                self.chunk(event.data)
            elif self.other is not None:
                self.other.append(event.data)
        elif isinstance(event, LiteralEnd):
            if self.in_body:
                self.in_body = False
                self.end()
        elif isinstance(event, Line) and self.other is not None:
            self.other.append(event.data + wire_tail(event))
            if event.literal is None:
                self._other_done()

    def _other_done(self) -> None:
        if self.other and not self.dropping:  # (an EXPUNGE after the error too: told, probe 6 of stop 48)
            self.others.append(b"".join(self.other))
        self.other, self.dropping = None, False

    async def run(self) -> list[bytes]:
        self.conn.tap = self.tap
        try:
            result = await self.conn.command(b"UID FETCH " + uid_set(self.expected) + b" (UID " + self.item + b")",
                                             bounded=True)  # a read (stall.py)
        finally:
            self.conn.tap = None
        if self.error is not None:
            raise TransferError(self.error).carrying(self.others)
        if not result.ok or self.next != len(self.expected):
            missing = self.expected[self.next] if self.next < len(self.expected) else "?"
            raise TransferError(f"message UID {missing} could not be read from {self.conn.name}").carrying(self.others)
        return self.others


def batches(infos: Sequence[MessageInfo]) -> list[list[MessageInfo]]:
    """*infos* in MULTIAPPENDs of at most BATCH_MESSAGES messages and BATCH_BYTES bytes (one at least)."""
    out: list[list[MessageInfo]] = [[]]
    size = 0
    for info in infos:
        if out[-1] and (len(out[-1]) >= BATCH_MESSAGES or size + info.size > BATCH_BYTES):
            out.append([])
            size = 0
        out[-1].append(info)
        size += info.size
    return out if out[0] else []


def atomic_target(dst: BackendProtocol, messages: int | None = None) -> None:
    """TransferError unless *dst* takes several messages in one APPEND: a copy's batch is one MULTIAPPEND,
    which its recovery finds whole or not at all (README: such a backend is refused as a target). One
    message (*messages* 1) is one APPEND anywhere: only LITERAL+, to stream it, is needed then."""
    caps = dst.capabilities
    if "LITERAL+" not in caps or messages != 1 and "MULTIAPPEND" not in caps:
        missing = "/".join(c for c in ("MULTIAPPEND", "LITERAL+") if c not in caps)
        raise TransferError(f"[CANNOT] Backend {dst.name} cannot take several messages atomically (no {missing})"
                            if messages != 1 else f"[CANNOT] Backend {dst.name} cannot take a streamed message (no {missing})")


async def copy_stream(src: BackendProtocol, infos: Sequence[MessageInfo], dst: BackendProtocol,
                      mailbox: bytes, progress: Progress | None = None,
                      before_commit: Callable[[tuple[str, ...]], Awaitable[None]] | None = None) -> Copied:
    """Append *infos*' messages (of the mailbox selected on *src*, ascending UIDs) to *mailbox* on *dst*
    in ONE MULTIAPPEND, bodies streamed by one ``UID FETCH`` and hashed on the way. On any failure
    the destination connection is aborted, so its MULTIAPPEND saves nothing.

    *before_commit(hashes)* runs once every body is sent and before the command's last CRLF,
    the byte that lets the backend commit: what it journals, a recovery can rely on. Messages
    holding NUL bytes are sent again as literal8 first (see the module's docstring)."""
    if not infos:
        raise TransferError("nothing to copy")
    atomic_target(dst, len(infos))
    binary = "BINARY" in src.capabilities and "BINARY" in dst.capabilities
    plan: frozenset[int] = frozenset()  # UIDs read by BINARY.PEEK[] and sent as literal8
    while True:
        sent = _Sending(infos, dst, plan, progress)
        ptag = dst.next_tag()
        done: defer.Deferred[tuple[ResponseStart, bytes]] = defer.Deferred()
        dst.expect(ptag, _answer(done))
        dst.transport.registerProducer(_Pause(src.transport), True)
        cancelled = False  # refused whole at a message's end: nothing saved, the connection still good
        try:
            dst.write(ptag + b" APPEND " + astring(mailbox))
            try:
                others = await sent.read(src)
                if binary and not plan and sent.suspects:
                    plan = await _nul_messages(src, sent.suspects, others)
            except TransferError as e:
                if src.closed:
                    raise
                vanished = Vanished(str(e)).carrying(e.others)  # expunged by another session after it was named
                cancelled = await _cancel(dst, done)
                raise vanished from None
            if plan and not sent.plan:
                await _cancel(dst, done)
                log.info("{n} message(s) holding NUL bytes sent again as literal8 to {dst}", n=len(plan), dst=dst.name)
                continue
            if before_commit is not None:
                await before_commit(tuple(sent.hashes))
            dst.write(b"\r\n")
            start, _raw = await done
        except BaseException:
            if not cancelled:
                dst.transport.abortConnection()
            raise
        finally:
            if not dst.closed:
                dst.transport.unregisterProducer()
        break
    if start.tag is None:
        raise CommitUnknown(f"backend {dst.name} closed the connection")
    if start.status != "OK":
        if start.code in _UNSAID and await _deleted_meanwhile(dst, mailbox):
            raise TransferError(TRYCREATE)  # Dovecot's COPY/MOVE into a missing mailbox (probe m1 of stop 61)
        raise TransferError(completion_text(start))
    try:
        code = parse_uid_code(start.code, start.code_args)
    except ParseError:
        raise TransferError(f"backend {dst.name} gave no usable APPENDUID") from None
    if len(code.uids) != len(infos):
        raise TransferError(f"backend {dst.name} reported {len(code.uids)} new messages for {len(infos)}")
    return Copied(code.uidvalidity, code.uids, tuple(sent.hashes), tuple(others))


#: Refusals that do not say why: Dovecot's answer to a MULTIAPPEND whose mailbox another session DELETEd
#: meanwhile is ``NO [SERVERBUG] Internal error occurred...`` (its unlink of a temporary file failed).
_UNSAID = (None, "SERVERBUG", "NONEXISTENT")


async def _deleted_meanwhile(dst: BackendProtocol, mailbox: bytes) -> bool:
    """Whether *mailbox* is gone from *dst* now (asked on the connection still open; unknown: not gone)."""
    try:
        return not dst.closed and not await exists(dst, mailbox.decode("utf-8", "surrogateescape"))
    except Exception:
        return False


async def _cancel(dst: BackendProtocol, done: defer.Deferred[tuple[ResponseStart, bytes]]) -> bool:
    """Refuse the open MULTIAPPEND whole, between two messages (the source's FETCH ended on one: no literal
    is cut): True once the backend said so; TransferError (the connection is then aborted) if it did not."""
    if done.called:  # answered before its end: what it took of the rest is not known
        raise TransferError(f"backend {dst.name} answered a MULTIAPPEND before its end")
    dst.write(CANCEL)
    start, _raw = await done
    if start.tag is None or start.status == "OK":
        raise TransferError(f"backend {dst.name} did not refuse a cancelled MULTIAPPEND")
    return True


async def copy_surviving(src: BackendProtocol, infos: Sequence[MessageInfo], dst: BackendProtocol, mailbox: bytes,
                         progress: Progress | None,
                         before_commit: Callable[[Sequence[MessageInfo], tuple[str, ...]], Awaitable[None]],
                         ) -> tuple[Copied | None, list[MessageInfo]]:
    """copy_stream of *infos*, again without those another session expunged meanwhile (a move's batch: probe t3
    of stop 51 had a RENAME across of 1,200 messages rolled back whole, "unexpected message 703", for three
    expunged before their batch): (the copy, its messages), (None, []) if none is left. Vanished is raised
    only when none vanished (a message that cannot be read); *before_commit(infos, hashes)*: of this try."""
    while True:
        counted = (progress.messages, progress.bytes) if progress is not None else None
        try:
            return await copy_stream(src, infos, dst, mailbox, progress, functools.partial(before_commit, infos)), list(infos)
        except Vanished:
            if progress is not None and counted:
                progress.messages, progress.bytes = counted  # (counted again as this try sends them)
            left = await surviving(src, [i.uid for i in infos])
            if len(left) == len(infos) or dst.closed:
                raise
            if not (infos := left):
                return None, []


async def surviving(src: BackendProtocol, uids: Sequence[int]) -> list[MessageInfo]:
    """fetch_infos of those of *uids* still in the mailbox selected on *src*, another session expunging some
    meanwhile; Vanished if one that a SEARCH finds the FETCH does not (it cannot be read)."""
    left = await still_there(src, uids)
    while True:
        try:
            return (await fetch_infos(src, left))[0]
        except Vanished:
            again = await still_there(src, left)
            if len(again) == len(left):
                raise
            left = again


def _answer(done: defer.Deferred[tuple[ResponseStart, bytes]]) -> Callable[[ResponseStart, bytes], None]:
    return lambda start, raw: done.callback((start, raw))


class _Sending:
    """One attempt's messages into the destination's open APPEND: each its flags, date and literal
    (literal8 for those of *plan*), hashed as ``BODY[]`` shows it; *suspects*: those whose ``BODY[]``
    holds a 0x80, which may stand for a NUL, with their hashes. Progress is counted once, the first time."""

    def __init__(self, infos: Sequence[MessageInfo], dst: BackendProtocol, plan: frozenset[int],
                 progress: Progress | None) -> None:
        self.infos, self.dst, self.plan = infos, dst, plan
        self.progress = None if plan else progress
        self.by_uid = {i.uid: i for i in infos}
        self.hashes: list[str] = []
        self.suspects: dict[int, str] = {}
        self.uid, self.h, self.marked = 0, hashlib.sha256(), False

    async def read(self, src: BackendProtocol) -> list[bytes]:
        """Every message, in runs of one kind (``BODY.PEEK[]`` / ``BINARY.PEEK[]``); the source's other responses."""
        others: list[bytes] = []
        runs: list[tuple[bytes, list[int]]] = []
        for info in self.infos:
            item = BINARY if info.uid in self.plan else BODY
            if runs and runs[-1][0] == item:
                runs[-1][1].append(info.uid)
            else:
                runs.append((item, [info.uid]))
        for item, uids in runs:
            try:
                others += await _Bodies(src, uids, self.begin, self.chunk, self.end, item).run()
            except TransferError as e:
                e.carrying(others)  # (the runs before it brought these)
                raise
        return others

    def begin(self, uid: int, size: int) -> None:
        info = self.by_uid[uid]
        self.uid, self.h, self.marked = uid, hashlib.sha256(), False
        literal = b"~{%d+}" if uid in self.plan else b"{%d+}"
        self.dst.write(b" (%s) \"%s\" " % (b" ".join(info.flags), info.internaldate) + literal % size + b"\r\n")

    def chunk(self, data: bytes) -> None:
        self.dst.write(data)
        if self.uid in self.plan:
            data = data.translate(NUL_AS) if b"\x00" in data else data  # a copy only where there is a NUL
        elif not self.marked and b"\x80" in data:
            self.marked = True
        self.h.update(data)

    def end(self) -> None:
        digest = self.h.hexdigest()
        self.hashes.append(digest)
        if self.marked:
            self.suspects[self.uid] = digest
        if self.progress is not None:
            self.progress.add(self.by_uid[self.uid].size)


async def _nul_messages(conn: BackendProtocol, suspects: dict[int, str], others: list[bytes]) -> frozenset[int]:
    """Those of *suspects* ({UID: hash of its BODY[]}) whose ``BINARY[]`` holds a NUL and is their ``BODY[]``
    but for NUL in place of 0x80: their stored bytes. One FETCH; refused (Dovecot: ``NO [PARSE]`` for a base64
    part it cannot decode), each is asked alone and one refused is not of them. Other responses: into *others*."""
    uids = sorted(suspects)
    found: set[int] = set()
    state: list = [0, hashlib.sha256(), False]  # UID, hash, NUL seen

    def begin(uid: int, _size: int) -> None:
        state[:] = [uid, hashlib.sha256(), False]

    def chunk(data: bytes) -> None:
        if b"\x00" in data:
            state[2] = True
            data = data.translate(NUL_AS)
        state[1].update(data)

    def end() -> None:
        if state[2] and state[1].hexdigest() == suspects[state[0]]:
            found.add(state[0])

    for group in [uids] if len(uids) == 1 else [uids, *([u] for u in uids)]:
        try:
            others += await _Bodies(conn, group, begin, chunk, end, BINARY).run()
        except TransferError as e:
            if conn.closed:
                raise
            others += e.others
            continue
        if group is uids:
            break
    return frozenset(found)


async def hash_messages(conn: BackendProtocol, uids: Sequence[int]) -> list[str]:
    """sha256 of each message of the selected mailbox, in the order of *uids*, streamed (never held)."""
    if not uids:
        return []
    hashes: list[str] = []
    h: list = [None]
    await _Bodies(conn, sorted(uids), lambda _uid, _size: h.__setitem__(0, hashlib.sha256()),
                  lambda data: h[0].update(data), lambda: hashes.append(h[0].hexdigest())).run()
    by_uid = dict(zip(sorted(uids), hashes))
    return [by_uid[u] for u in uids]


async def hashes_present(conn: BackendProtocol, uids: Sequence[int]) -> dict[int, str]:
    """sha256 of those of *uids* still in the selected mailbox (recovery: some may be gone)."""
    if not uids:
        return {}
    present = await still_there(conn, uids)
    return dict(zip(present, await hash_messages(conn, present)))
