"""The APPENDs of one session: routed to their mailbox's backend, fed the reader's events.

An :class:`~.append.AppendCommand` is one APPEND from its first message to its answer;
:class:`Appends` starts each (a referral or INUSE refuses it before any message),
passes it the command reader's events, is the host every command reaches its session
through (``AppendHost``), and keeps the proxy's refusals of later commands until the
APPENDs before them are answered.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer

from .append import AppendCommand
from .appendturns import HELD, Held, append_turn, may_begin, nothing, worker_turn
from .backend import BackendProtocol
from .flow import Block
from .imap.reader import (
    AppendAbort,
    AppendData,
    AppendEnd,
    AppendMessage,
    AppendMessageEnd,
    AppendStart,
    CommandReader,
)
from .lean import SmallSet
from .pool import BackendPool
from .routing import Route
from .staging import StagingJournal
from .turns import Release
from .unread import cut_if_unread

__all__ = ["Appends", "AppendsHost", "forget_takers"]


class AppendTargets(Protocol):
    """Where APPENDs go (mailboxes.MailboxCommands)."""

    def append_target(self, tag: bytes, mailbox: bytes) -> bytes | Route | Held:
        """The route of an APPEND to *mailbox*, or the answer refusing it before any message
        (a referral), or HELD (a move or a RENAME holds it)."""

    def append_held(self, tag: bytes, mailbox: bytes) -> defer.Deferred[bytes | None]:
        """None once the holder of *mailbox* let go, if it was brief; else the answer (INUSE)."""


class AppendsHost(Protocol):
    """What the APPENDs of a session need of it."""

    reader: CommandReader
    pool: BackendPool | None
    user: str | None
    selected: str | None
    selected_mailbox: bytes | None

    def send(self, data: bytes) -> None: ...

    def write_from(self, source: object, data: bytes, end: bool = True) -> None: ...

    def run(self, tag: bytes, work: Any) -> None: ...

    def decided(self) -> None:
        """The reader's pending decision was taken: go on reading."""

    def command_done(self) -> None:
        """A command in flight has its answer (the session caps them)."""

    def dies_with(self, conn: BackendProtocol) -> bool: ...

    ctx: Any  # the ProxyContext (its turns: appendturns.py)
    relay: Any  # the session's Relay: its commands in flight, whose answers the proxy's refusals wait for
    flow: Any  # its SessionFlow: whether its client reads (unread.py)

    @property
    def mailboxes(self) -> AppendTargets: ...

    def block(self, reason: Block) -> None: ...

    def unblock(self, reason: Block) -> None: ...


@dataclass(frozen=True)
class Taker:
    """A target that took this session's messages a moment ago (RFC 3501 lets a server
    refuse an APPEND after its literal): the next APPEND there is answered ``+`` by the
    proxy itself when the room its quota left surely takes the message (append.py)."""

    backend: str
    mailbox: bytes
    room: tuple[int | None, int | None]  # (bytes, messages) the quota left after those messages
    until: float  # the clock's time after which it is not trusted any more


TAKER_SECONDS = 10.0  # how long a target that took messages is trusted to take the next


def forget_takers(sessions: Iterable[Any], user: str | None) -> None:
    """A session of *user* DELETEs or RENAMEs a mailbox: no session of the user's here gives its own ``+`` to an
    APPEND there (another's did: ``+``, 200 KB taken, then NO [TRYCREATE]; probe 2 of stop 49)."""
    for session in sessions:
        if session.user == user:
            session.appends.forget_taker()


class Appends:
    """The APPENDs of one session: the one the client is sending, and those not answered
    yet. It is the host of each AppendCommand (AppendHost)."""

    __slots__ = ("host", "_journal", "_clock", "_taker", "current", "unanswered", "_after", "no_staging")  # no dict

    def __init__(self, host: AppendsHost, journal: StagingJournal, clock: Any) -> None:  # an IReactorTime
        self.host = host
        self._journal = journal  # the staging mailboxes' (ProxyContext.staging_journal)
        self._clock = clock
        self._taker: Taker | None = None  # the last target that took this session's messages
        self.current: AppendCommand | None = None
        self.unanswered: SmallSet = SmallSet()
        # the proxy's own refusals of later commands, and (a Deferred) its own command waiting its turn (in_turn),
        # held until those before are answered
        self._after: list[bytes | defer.Deferred[None]] = []
        self.no_staging: SmallSet = SmallSet()  # backends that refused a staging mailbox: one message per APPEND there

    def after_answers(self, line: bytes) -> None:
        """Send *line* (the proxy's refusal of a command) once every APPEND and relayed command before it
        is answered, as a server that runs commands one after the other would (``a SELECT INBOX``, ``b IDLE
        foo``: b's BAD came before a's answer; probe t2 of stop 51)."""
        if self.unanswered or self.host.relay.in_flight or self._after:
            self._after.append(line)
            self.host.block(Block.HELD)  # no more commands read meanwhile: what is held stays this small
        else:
            self.host.send(line)

    async def in_turn(self, work: Coroutine[Any, Any, None]) -> None:
        """*work*, a command the proxy carries out itself, once every APPEND and relayed command before it is
        answered: what it says comes after their answers, as from a server running commands one after the other
        (a STATUS answered from a move's view came before the answer of a relayed STATUS sent before it: probe h3
        of stop 58). Nothing is read meanwhile (session.run)."""
        if self.unanswered or self.host.relay.in_flight or self._after:
            turn: defer.Deferred[None] = defer.Deferred()
            self._after.append(turn)
            try:
                await turn
            except BaseException:  # (the session gone first: never run)
                work.close()
                raise
        await work

    def answered_one(self) -> None:
        """A command before the held refusals (or a command waiting its turn) has its answer: they go once none is
        unanswered."""
        if self._after and not self.unanswered and not self.host.relay.in_flight:
            held, self._after = self._after, []
            if lines := [h for h in held if isinstance(h, bytes)]:
                self.host.send(b"".join(lines))
            self.host.unblock(Block.HELD)
            for h in held:
                if not isinstance(h, bytes):
                    h.callback(None)

    def start(self, event: AppendStart) -> None:
        """Route an APPEND to its mailbox's backend and start streaming it there, unless a RENAME of
        it (or a parent) there holds its turn (appendturns.py: then after that RENAME)."""
        host = self.host
        assert host.pool is not None
        route = host.mailboxes.append_target(event.tag, event.mailbox)
        if type(route) is bytes:
            host.reader.drop()  # refused before the client sends any message
            return self.after_answers(route)  # in order: after the APPENDs before it
        if route is HELD:
            return host.run(event.tag, self._in_turn(event))
        assert isinstance(route, Route)
        ctx = host.ctx
        turn: Release = nothing  # (nearly always: one process, no RENAME in it)
        if ctx.move_turns.states or ctx.worker_turns is not None:
            user = host.user or ""
            got = worker_turn(ctx, route.primary, user, event.mailbox) if may_begin(
                ctx, route.primary, user, event.mailbox) else None
            if got is None:  # a RENAME holds it, or waits for it
                return host.run(event.tag, self._in_turn(event))
            turn = got
        conn = host.pool.fast(route.primary)
        if conn is not None:
            return self._begin(event, conn, turn)
        host.run(event.tag, self._connected(event, route, turn))

    async def _connection(self, route: Route, turn: Release) -> BackendProtocol:
        """The route's connection; if none comes, the turn ends and the command is not read on."""
        assert self.host.pool is not None
        try:
            return await self.host.pool.ready_for(route)
        except BaseException:
            turn()
            self.host.reader.drop()
            raise

    async def _connected(self, event: AppendStart, route: Route, turn: Release) -> None:
        host = self.host
        conn = await self._connection(route, turn)
        if not may_begin(host.ctx, route.primary, host.user or "", event.mailbox) or host.mailboxes.append_target(
                event.tag, event.mailbox) is HELD:  # a RENAME came meanwhile (here; or at another proxy: proxyappends.py)
            turn()
            return await self._in_turn(event)
        self._begin(event, conn, turn)

    async def _in_turn(self, event: AppendStart) -> None:
        """The APPEND once the RENAME (or the check) holding its mailbox let go, routed again (the
        RENAME may have moved it: Dovecot's own TRYCREATE then); INUSE if a move holds it."""
        host = self.host
        while True:
            route = host.mailboxes.append_target(event.tag, event.mailbox)
            if type(route) is bytes:
                host.reader.drop()
                return self.after_answers(route)
            if route is HELD:
                refused = await host.mailboxes.append_held(event.tag, event.mailbox)
                if refused is not None:
                    host.reader.drop()
                    return self.after_answers(refused)
                continue
            assert isinstance(route, Route)
            mine, theirs = await append_turn(host.ctx, route.primary, host.user or "", event.mailbox)
            try:  # no RENAME of it here begins while this process's turn is held: until the APPEND has begun
                again = host.mailboxes.append_target(event.tag, event.mailbox)
                if isinstance(again, Route) and again.primary == route.primary:
                    return self._begin(event, await self._connection(again, theirs), theirs)
                theirs()  # it moved meanwhile: from the start
            finally:
                mine()

    def _begin(self, event: AppendStart, conn: BackendProtocol, turn: Release) -> None:
        cmd = self.current = AppendCommand(self, event.tag, conn, event.mailbox, turn=turn)
        self.unanswered.add(cmd)
        cut_if_unread(self.host, conn, lambda: cmd.turn is nothing, "APPEND")  # (a turn held behind an unread answer)

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
        """The client left: the connections that APPENDs now own (they close them themselves). The
        others' connections close, and their turns end."""
        owned = []
        for cmd in list(self.unanswered):
            if cmd.client_gone():
                owned.append(cmd.conn)
            else:
                cmd.end_turn()
        return owned

    # -- AppendHost ---------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self.host.user or ""

    @property
    def journal(self) -> StagingJournal:
        return self._journal

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
        if cmd.turn is not nothing:
            cmd.end_turn()
        self.unanswered.discard(cmd)
        self.answered_one()
        self.backend_idle()
        self.host.command_done()

    def dies_with(self, conn: BackendProtocol) -> bool:
        return self.host.dies_with(conn)

    def room_of(self, backend: str, mailbox: bytes) -> tuple[int | None, int | None] | None:
        t = self._taker
        if t is None or t.backend != backend or t.mailbox != mailbox or self._clock.seconds() > t.until:
            return None
        return t.room

    def forget_taker(self) -> None:
        """A session of the user DELETEs or RENAMEs a mailbox: the next APPEND asks the backend before any data."""
        self._taker = None

    def took(self, backend: str, mailbox: bytes, room: tuple[int | None, int | None] | None) -> None:
        if room is not None:
            self._taker = Taker(backend, mailbox, room, self._clock.seconds() + TAKER_SECONDS)
        elif self._taker is not None and (self._taker.backend, self._taker.mailbox) == (backend, mailbox):
            self._taker = None

    def hold_input(self, on: bool) -> None:
        """An emulated MULTIAPPEND commits: no further command is read until it is answered."""
        (self.host.block if on else self.host.unblock)(Block.STAGING)

    def quiet(self) -> defer.Deferred[None]:
        assert self.host.pool is not None
        return self.host.pool.quiet(None)

    def backend_idle(self) -> None:
        if self.host.pool is not None:
            self.host.pool.check_quiet()

    def selected_on(self, conn: BackendProtocol) -> bytes | None:
        if self.host.selected != conn.name:
            return None
        return self.host.selected_mailbox or b""

    async def open_backend(self, name: str) -> BackendProtocol:
        assert self.host.pool is not None
        return await self.host.pool.open(name)

