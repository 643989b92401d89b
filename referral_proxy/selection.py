"""SELECT / EXAMINE / CLOSE / UNSELECT: the selected state, on the backend that owns the mailbox.

A SELECT moves the selected state to its mailbox's backend (the mailbox selected elsewhere is left
first, never expunged); a SELECT that fails, whoever refuses it (the backend, or the proxy itself: a
reserved name, a mailbox being moved, a backend that cannot be reached), leaves no mailbox selected,
as RFC 3501 6.3.1 says: a STORE or EXPUNGE pipelined after it must not reach the mailbox before.
Commands the proxy carries out itself on the selected mailbox (a COPY or MOVE across) wait until the
SELECT/CLOSEs before them are answered (settled): their state is the one those leave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.python.failure import Failure

from .backendtypes import BackendError
from .flow import Block
from .imap.grammar import Slot
from .imap.reader import Command
from .imap.response import ResponseStart
from .mailboxes import INUSE

if TYPE_CHECKING:
    from .backend import BackendProtocol
    from .mailboxes import MailboxCommands

__all__ = ["SelectCommands"]


class SelectCommands:
    """SELECT, EXAMINE, CLOSE, UNSELECT of one session; stateless (its state is MailboxCommands')."""

    __slots__ = ("mailboxes", "host")

    def __init__(self, mailboxes: MailboxCommands) -> None:
        self.mailboxes = mailboxes
        self.host = mailboxes.host

    def select(self, cmd: Command) -> None:
        """SELECT / EXAMINE: the selected state moves to the mailbox's backend."""
        host, m = self.host, self.mailboxes
        assert host.pool is not None
        pool = host.pool
        target = m.target(cmd, Slot.MAILBOX, self.select, self._refused)
        if target is None:
            return
        mailbox, route = target
        if m.refers(route, mailbox) and (bad := m.bad_arguments(cmd, route)) is not None:
            return host.refuse(bad)  # nothing unselected: the command is not valid (as Dovecot, which parses first)
        m.examined = cmd.name == "EXAMINE"
        m.selected_since = host.mailbox_map.moves_begun
        m.selects[route.primary] = m.selects.get(route.primary, 0) + 1
        refer = m.refers(route, mailbox)
        conn = pool.fast(route.primary)
        host.selected_mailbox = None if refer else mailbox
        if not refer and conn is not None and host.selected in (None, conn.name):
            host.selected = conn.name
            host.relay.end_updates(conn)
            m.unsettled += 1
            host.relay.send(conn, cmd.tag, cmd.name, cmd.args, after=self._select_done(conn))
            return

        async def switch() -> None:
            try:
                conn = None if refer else await pool.connection(route)
            except BackendError:  # (NO [UNAVAILABLE]): what was selected is left first (probe r6: a FETCH
                await self._leave()  # pipelined after it read the old mailbox; a UID EXPUNGE would have
                raise  # expunged there)
            await pool.quiet(None)
            old = pool.ready(host.selected) if host.selected else None
            if old is not None and old is not conn:
                # A failed or referred SELECT leaves no mailbox selected (RFC 3501 6.3.1).
                host.selected = None
                await self._unselect(old)
            if refer:
                host.selected = None
                return host.refuse(m.referral(cmd.tag, route, mailbox))
            assert conn is not None
            await pool.prepare(conn)
            host.selected = conn.name
            host.relay.end_updates(conn)
            m.unsettled += 1
            host.relay.send(conn, cmd.tag, cmd.name, cmd.args, after=self._select_done(conn))

        host.run(cmd.tag, switch())

    def _refused(self, tag: bytes, text: str) -> None:
        """The proxy's own NO to a SELECT (a reserved name, a mailbox being moved): the mailbox selected
        before is left first, as a SELECT the backend refuses leaves it (probe r6: pipelined after such a
        NO, ``UID STORE 1 +FLAGS (\\Deleted)`` and ``UID EXPUNGE 1`` took INBOX's message 1)."""
        host, m = self.host, self.mailboxes
        m.examined = False
        if host.selected is None and not m.unsettled and not host.relay.in_flight:  # (else after their answers:
            host.selected_mailbox = None  # probe s1, a NOOP; UID EXPUNGE; SELECT reserved: its NO came first)
            return m.refuse_no(tag, text)

        async def leave() -> None:
            await self._leave()
            m.refuse_no(tag, text)

        host.run(tag, leave())

    async def _leave(self) -> None:
        """No mailbox selected, here and on the backend that had one, once the commands before are answered."""
        host, m = self.host, self.mailboxes
        assert host.pool is not None
        await host.pool.quiet(None)
        m.unsettled = 0
        old = host.pool.ready(host.selected) if host.selected else None
        host.selected = host.selected_mailbox = None
        if old is not None:
            await self._unselect(old)

    def _select_done(self, conn: BackendProtocol) -> Callable[[ResponseStart], None]:
        """A SELECT's NO unselects the session, as close() a CLOSE's OK: its backend only if no SELECT
        was sent there since, the mailbox name only if none was sent anywhere since (a SELECT sent
        elsewhere meanwhile set its own name, and sets its backend once this answer is in)."""
        m = self.mailboxes
        selects, everywhere = m.selects.get(conn.name, 0), sum(m.selects.values())

        def done(start: ResponseStart) -> None:
            m.unsettled = max(0, m.unsettled - 1)
            if start.status == "NO" and self.host.selected == conn.name and m.selects.get(conn.name, 0) == selects:
                self.host.selected = None
                if sum(m.selects.values()) == everywhere:
                    self.host.selected_mailbox = None
        return done

    async def _unselect(self, conn: BackendProtocol) -> None:
        """Leave the mailbox selected on *conn* without expunging it (never CLOSE), and say
        ``[CLOSED]`` as Dovecot does on every SELECT/EXAMINE over another mailbox, a failed one too
        (RFC 7162 3.2.11)."""
        host = self.host
        assert host.pool is not None
        host.relay.end_updates(conn)
        result = await conn.deselect()
        for r in result.responses:
            if r.start.code != "CLOSED":
                host.write_from(conn, r.raw)
        host.send(b"* OK [CLOSED] Previous mailbox closed.\r\n")

    def close(self, cmd: Command) -> None:
        """CLOSE / UNSELECT: relayed where the mailbox is selected; the session is unselected after."""
        host, m = self.host, self.mailboxes
        assert host.home is not None
        if cmd.name == "CLOSE" and m.selected_held():  # it expunges (mailboxes.change); UNSELECT does not
            return m.refuse_no(cmd.tag, INUSE)
        target = host.selected or host.home
        selects, everywhere = m.selects.get(target, 0), sum(m.selects.values())

        def done(start: ResponseStart) -> None:
            m.unsettled = max(0, m.unsettled - 1)
            if start.status != "OK" or m.selects.get(target, 0) != selects:
                return  # a SELECT sent to that backend since: its mailbox is selected there
            host.selected = None  # a SELECT elsewhere sent since (waiting for this answer) sets it again
            if sum(m.selects.values()) == everywhere:
                host.selected_mailbox = None  # else that SELECT's
            conn = host.pool.ready(target) if host.pool is not None else None
            if conn is not None:
                host.relay.end_updates(conn)

        m.unsettled += 1
        host.relay_cmd(cmd, target, done)

    def settled(self, cmd: Command, then: Callable[[Command], None]) -> bool:
        """True if no SELECT/EXAMINE/CLOSE/UNSELECT of this session is unanswered; else *then(cmd)* once
        they all are (the commands after it wait): its state is the one they leave (probe r6: ``EXAMINE;
        CLOSE; UID MOVE 1 X`` got NO [READ-ONLY] of the EXAMINE, before its answer, where Dovecot says BAD)."""
        host, m = self.host, self.mailboxes
        if not m.unsettled or host.pool is None:
            return True
        host.flow.block(Block.SETTLING)

        def go(_: object) -> None:
            m.unsettled = 0
            if host.selected is not None and host.pool is not None and host.pool.ready(host.selected) is None:
                # its backend went before they were answered: what they left is not known (probe s1)
                return host.answer(cmd.tag, "NO [UNAVAILABLE] Mail server temporarily unavailable")
            then(cmd)

        def failed(f: Failure) -> None:
            host.answer(cmd.tag, "NO [UNAVAILABLE] Mail server temporarily unavailable")

        d = defer.ensureDeferred(host.pool.quiet(None))
        d.addCallback(go).addErrback(failed).addBoth(lambda _: host.flow.unblock(Block.SETTLING))
        return False
