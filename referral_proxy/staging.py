"""The private staging mailbox that makes MULTIAPPEND atomic on a backend without it.

RFC 3502 wants all or nothing for everyone. On a backend without MULTIAPPEND the
proxy creates a staging mailbox of its own, APPENDs each message there (streamed),
then puts them all into the target with ONE ``COPY`` (RFC 3501: a failed COPY leaves
the destination unchanged; Dovecot copies in one transaction), so other sessions see
every message at once or none, and removes the staging mailbox. This module holds
what is not the APPEND's streaming itself (append.py): the names, the journal entry
that lets recovery remove a staging mailbox a crash left behind, and the commands.

A staging name is ``STAGING_PREFIX`` + 128 random bits: unguessable (no other
session, of this user or another proxy process, can open it) and never colliding.
The proxy hides such names (and RENAME's set-aside sources, mover.py) from every
LIST/LSUB/RLIST and refuses them as arguments (is_private_name).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import BackendError, BackendProtocol, BackendUnavailable, Tagged, UntaggedResponse
from .imap import mutf7
from .imap.grammar import encode_astring
from .imap.response import ResponseStart, completion_text, replace_tag
from .journal import InUse, JournalEntry, Reservation, Step, StoreUnavailable
from .routing import MailboxMap

__all__ = ["STAGING_PREFIX", "new_staging_name", "is_staging_name", "is_private_name", "ASIDE_PREFIX", "StagingJournal", "MapJournal",
           "drop_staging", "Staging",
           "StagingHost", "mailbox_argument", "run_captured", "send_command", "appenduid_from_copyuid",
           "probe_answer"]

log = Logger()

STAGING_PREFIX = b"referral-proxy-staging-"
ASIDE_PREFIX = b"referral-proxy-aside-"  # mover.ASIDE
_PREFIX_LOWER = STAGING_PREFIX.lower()
_COPYUID = re.compile(rb"^(\d+) \S+ (\S+)\Z")


def new_staging_name() -> bytes:
    """A staging mailbox name nobody can guess and no other session or process will draw."""
    return STAGING_PREFIX + os.urandom(16).hex().encode()


def is_staging_name(name: bytes) -> bool:
    """True for a name in the proxy's staging space (any case: some backends fold it)."""
    return name[: len(STAGING_PREFIX)].lower() == _PREFIX_LOWER


def is_private_name(name: bytes) -> bool:
    """A staging mailbox, or a source a cross-server RENAME set aside (mover.ASIDE) while it is
    emptied: the proxy's own, never listed to a client nor taken from one (any case)."""
    head = name[:len(STAGING_PREFIX)].lower()
    return head == _PREFIX_LOWER or head.startswith(ASIDE_PREFIX)


class StagingJournal(Protocol):
    """Where a staging mailbox is recorded before it is created, so recovery can remove it."""

    async def begin(self, user: str, backend: str, name: bytes, target: bytes) -> object:
        """Record the staging mailbox *name* of *user* on *backend* for an APPEND to *target*,
        before its CREATE; the entry is returned. InUse if a move holds *target*."""

    async def end(self, entry: object) -> None:
        """The staging mailbox is gone (or was never made): forget it."""

    async def give_up(self, entry: object) -> None:
        """This process could not remove it: leave it to recovery."""

    @property
    def open(self) -> int:
        """Staging mailboxes begun and neither ended nor given up (a stopping proxy waits for them)."""


class MapJournal:
    """Staging mailboxes in the map store's journal (op ``"staging"``, journal.Step.STAGING),
    beside the moves: start-up recovery, the sweep and ``recover`` delete what a crash left."""

    def __init__(self, mailbox_map: MailboxMap) -> None:
        self.map = mailbox_map
        self._open: set[int] = set()  # ids of the entries begun here and not settled yet

    @property
    def open(self) -> int:
        return len(self._open)

    async def begin(self, user: str, backend: str, name: bytes, target: bytes) -> JournalEntry:
        box = target.decode("utf-8", "surrogateescape")
        entry = await self.map.begin_move(user, "staging", [Reservation(box, subtree=False, shared=True)],
                                          {"backend": backend, "mailbox": name.decode("ascii"), "target": box})
        try:
            await self.map.step(entry, Step.STAGING)  # from here on it may exist
        except BaseException:
            await self.map.end_move(entry)
            raise
        self._open.add(id(entry))
        return entry

    async def end(self, entry: object) -> None:
        self._open.discard(id(entry))
        if isinstance(entry, JournalEntry) and not entry.ended:
            await self.map.end_move(entry)

    async def give_up(self, entry: object) -> None:
        self._open.discard(id(entry))
        if isinstance(entry, JournalEntry) and not entry.ended:
            await self.map.disown(entry)


async def drop_staging(mailbox_map: MailboxMap, entry: JournalEntry, conn: BackendProtocol) -> str:
    """Recovery of a ``staging`` entry: DELETE its staging mailbox on *conn* (its backend, the
    user's), then end the entry. Only a name in the staging space is ever deleted."""
    name = str(entry.data.get("mailbox", "")).encode("ascii", "replace")
    if not is_staging_name(name) or encode_astring(name) != name:
        raise BackendError(f"journal entry {entry.id} names no staging mailbox: {name!r}")
    deleted = await conn.command(b"DELETE " + name)
    if deleted.ok:
        outcome = "staging mailbox deleted (nothing was appended to the target by it)"
    elif deleted.start.code == "NONEXISTENT":
        outcome = "no staging mailbox was left"
    else:
        raise BackendError(f"DELETE {name.decode()} failed on {conn.name}: {completion_text(deleted.start)}")
    await mailbox_map.end_move(entry)
    return outcome


def mailbox_argument(conn: BackendProtocol, name: bytes) -> bytes | None:
    """*name* as a command argument the backend reads in one line (a literal only with LITERAL+)."""
    encoded = encode_astring(name)
    if encoded is not None:  # (a long quoted form is none: grammar.QUOTED_NAME_MAX)
        return encoded
    if "LITERAL+" not in conn.capabilities:
        return None
    return b"{%d+}\r\n" % len(name) + name


def run_captured(conn: BackendProtocol, commands: Sequence[bytes]) -> defer.Deferred[list[Tagged]]:
    """Write *commands* pipelined; fire with their completions once the last is in. Every
    untagged response meanwhile is captured (on the last Tagged): none reaches the client
    unless the caller relays it. The connection must be quiet, and stay so, while they run."""
    d: defer.Deferred[list[Tagged]] = defer.Deferred()
    captured: list[UntaggedResponse] = []
    done: list[tuple[ResponseStart, bytes]] = []
    conn.capture = captured

    def one(start: ResponseStart, raw: bytes) -> None:
        done.append((start, raw))
        if len(done) == len(commands):
            conn.capture = None
            last = len(done) - 1
            d.callback([Tagged(s, r, tuple(captured) if i == last else ()) for i, (s, r) in enumerate(done)])

    def lost(_reason: Failure) -> None:
        conn.capture = None
        if not d.called:
            d.errback(BackendUnavailable(f"backend {conn.name} closed the connection"))

    try:
        for text in commands:
            tag = conn.next_tag()
            conn.expect(tag, one, lost)
            conn.write(tag + b" " + text + b"\r\n")
    except BackendUnavailable:
        conn.capture = None
        if not d.called:
            raise
    return d


def send_command(conn: BackendProtocol, text: bytes) -> defer.Deferred[ResponseStart]:
    """One command among the session's own (nothing captured: it must bring no untagged
    response of its own, as DELETE); fires with its completion."""
    d: defer.Deferred[ResponseStart] = defer.Deferred()
    tag = conn.next_tag()
    conn.expect(tag, lambda start, _raw: d.callback(start),
                lambda _reason: d.errback(BackendUnavailable(f"backend {conn.name} closed the connection")))
    conn.write(tag + b" " + text + b"\r\n")
    return d


def appenduid_from_copyuid(start: ResponseStart) -> bytes | None:
    """``COPYUID v 1:3 7:9`` -> ``APPENDUID v 7:9`` (RFC 4315: the order of the copies is the
    order of the sources, i.e. the order the messages were appended to the staging mailbox)."""
    if start.code != "COPYUID":
        return None
    m = _COPYUID.match(start.code_args)
    if m is None:
        return None
    return b"APPENDUID " + start.code_args.split(b" ", 1)[0] + b" " + m.group(2)


def probe_answer(tag: bytes, status: Tagged, name: bytes, utf8: bool = False) -> bytes:
    """The answer to an APPEND whose target the ``STATUS`` probe did not find, as the backend
    would give it for the APPEND itself: RFC 3502 asks for TRYCREATE unless the mailbox
    certainly cannot be created. Dovecot says NONEXISTENT for a missing one; a NO without a
    code is taken for one too, unless *name* is not a valid name (then creation would fail;
    an 8-bit name is valid only once *utf8*: UTF8=ACCEPT enabled on that connection)."""
    start = status.start
    missing = start.code in ("NONEXISTENT", "TRYCREATE") or (start.code is None and mutf7.valid_name(name, utf8=utf8))
    if start.status == "NO" and missing:
        return b"%s NO [TRYCREATE] %s\r\n" % (tag, start.text or b"Mailbox does not exist")
    return b"%s %s\r\n" % (tag, completion_text(start).encode("utf-8", "replace"))


class StagingHost(Protocol):
    """What a staging mailbox needs of the session whose APPEND it serves."""

    @property
    def user(self) -> str:
        """The session's (canonical) user."""

    @property
    def journal(self) -> StagingJournal:
        """Where staging mailboxes are recorded."""

    def write_from(self, source: object, data: bytes, end: bool = True) -> None:
        """Relay an untagged response that is not the staging's own."""

    def quiet(self) -> defer.Deferred[None]:
        """Fires once no backend connection of the session has a command in flight."""

    def backend_idle(self) -> None:
        """An internal command completed: whoever waits for quiet may go on."""

    def selected_on(self, conn: BackendProtocol) -> bytes | None:
        """The mailbox the session has selected on *conn* (b"" if unknown), None if none."""

    async def open_backend(self, name: str) -> BackendProtocol:
        """A new connection of the user to backend *name*, not the session's."""


@dataclass(eq=False)
class Staging:
    """One staging mailbox on *conn*'s backend for an APPEND to *target*: journaled, created,
    committed into the target with one COPY, deleted."""

    host: StagingHost
    conn: BackendProtocol
    target: bytes
    name: bytes = field(default_factory=lambda: new_staging_name())  # looked up at each call (tests)
    staged: bool | None = False  # it exists (None: unknown, its CREATE was cut off)
    entry: object = None
    cleaned: bool = False  # deleted, or left to recovery
    _via: BackendProtocol | None = field(default=None, init=False, repr=False)  # the commit's own connection

    async def prepare(self, tag: bytes) -> bytes | None:
        """Record it, check the target (``STATUS``: TRYCREATE before any data, as the backend
        gives it for an APPEND), create it. None when messages may come (``staged`` says
        whether into it: False if the backend refused to create it); else the answer."""
        host, conn = self.host, self.conn
        await host.quiet()  # what is captured meanwhile must be ours
        target = mailbox_argument(conn, self.target)
        assert target is not None
        try:
            self.entry = await host.journal.begin(host.user, conn.name, self.name, self.target)
        except InUse:
            return b"%s NO [INUSE] Mailbox is being moved to another server; try again shortly\r\n" % tag
        except StoreUnavailable:  # no staging mailbox without its journal entry
            return (b"%s NO [UNAVAILABLE] The mailbox map is unreachable; appending several messages here "
                    b"waits until it is back\r\n" % tag)
        self.staged = None
        try:
            status, created = await run_captured(conn, [b"STATUS " + target + b" (UIDVALIDITY)", b"CREATE " + self.name])
        finally:
            host.backend_idle()
        # Dovecot (maildir) answers concurrent CREATEs of different names now and then with
        # ALREADYEXISTS, having made the mailbox: a name of 128 random bits is nobody else's,
        # so it is taken as made (and deleted at the end, its entry kept until then).
        self.staged = created.ok or created.start.code == "ALREADYEXISTS"
        for r in created.responses:
            if r.start.name != "STATUS":
                host.write_from(conn, r.raw)
        if not status.ok:
            return probe_answer(tag, status, self.target, b"UTF8=ACCEPT" in conn.enabled)
        if not self.staged:
            log.warn("no staging mailbox on {b}: {why}; one message per APPEND there", b=conn.name,
                     why=created.start.text)
        return None

    async def commit(self, tag: bytes) -> bytes:
        """ONE COPY (or MOVE) into the target, on a connection with nothing of the session's
        selected (a new one otherwise); EXISTS for a target the session has selected come first.
        The client's answer; BackendError if the connection was lost (the outcome is unknown)."""
        host, conn = self.host, self.conn
        await host.quiet()
        selected = host.selected_on(conn)
        try:
            c = self._via = conn if selected is None else await host.open_backend(conn.name)
        except BackendError as e:
            log.warn("no connection to commit an APPEND on {b}: {why}", b=conn.name, why=str(e))
            return b"%s NO [UNAVAILABLE] Mail server temporarily unavailable; nothing was appended\r\n" % tag
        target = mailbox_argument(c, self.target)
        assert target is not None
        close = b"UNSELECT" if "UNSELECT" in c.capabilities else b"CLOSE"
        # MOVE (RFC 6851) where the backend has it: the copies are not counted twice against the quota.
        move = "MOVE" in c.capabilities
        commands = [b"SELECT " + self.name, b"MOVE 1:* " + target, close] if move else [
            b"EXAMINE " + self.name, b"COPY 1:* " + target, close]
        try:
            opened, copy, closed = await run_captured(c, commands)
        finally:
            host.backend_idle()
        if not opened.ok:
            return b"%s NO [SERVERBUG] The staged messages could not be opened; nothing was appended\r\n" % tag
        if not copy.ok:
            return replace_tag(copy.raw, tag)  # RFC 3501/6851: the destination is unchanged
        copyuid = copy.start if not move else next(
            (r.start for r in closed.responses if r.start.code == "COPYUID"), copy.start)
        code = appenduid_from_copyuid(copyuid) if "UIDPLUS" in c.capabilities else None
        if c is not conn and selected == self.target and not conn.closed:
            try:  # the copies as a direct APPEND shows them to the session: EXISTS first
                (noop,) = await run_captured(conn, [b"NOOP"])
                for r in noop.responses:
                    host.write_from(conn, r.raw)
            except BackendError:
                pass
            finally:
                host.backend_idle()
        return b"%s OK %sAppend completed.\r\n" % (tag, b"[" + code + b"] " if code else b"")

    async def cleanup(self) -> None:
        """Delete it and forget its journal entry; left to recovery if that cannot be done."""
        host = self.host
        via = self._via if self._via is not self.conn else None
        fresh: BackendProtocol | None = None
        try:
            if self.staged is False:
                await host.journal.end(self.entry)
                return
            conn = next((c for c in (via, self.conn) if c is not None and not c.closed), None)
            if conn is None:
                conn = fresh = await host.open_backend(self.conn.name)
            try:
                deleted = await send_command(conn, b"DELETE " + self.name)
            finally:
                host.backend_idle()
            if deleted.status == "OK":
                await host.journal.end(self.entry)
            else:
                log.warn("staging mailbox {box} on {b} not deleted: {why}", box=self.name, b=conn.name,
                         why=deleted.text)
                await host.journal.give_up(self.entry)
        except BackendError as e:
            log.warn("staging mailbox {box} on {b} left to recovery: {why}", box=self.name, b=self.conn.name, why=str(e))
            await host.journal.give_up(self.entry)
        finally:
            self.cleaned = True
            for c in (fresh, via):
                if c is not None:
                    c.logout()
