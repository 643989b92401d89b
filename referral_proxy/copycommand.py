"""COPY / MOVE (and their UID forms): relayed when both mailboxes live on one backend, carried across by transfer.py when not.

A relayed COPY or MOVE first waits while a MOVE across holds its mailboxes (copywait.py), a
relayed MOVE also takes its mailbox's turn (crossturns.py); one across is refused in a
referral-aware session whose destination lives elsewhere (an RFC 2193 referral instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from .acrossview import SAVED
from .backendtypes import BackendUnavailable
from .copywait import held_by_any, wait_for_moves
from .crossturns import mailbox_turn
from .imap.grammar import Slot
from .imap.reader import Command
from .mailboxes import INUSE, READ_ONLY, MailboxCommands, Refusing
from .mailops import TransferError, named_uids
from .routing import Route, normalize
from .selection import SelectCommands
from .transfer import COPY_IN_USE, CopyOutcome, copy_across, move_lock
from .unread import cut_if_unread

if TYPE_CHECKING:
    pass

__all__ = ["CopyCommands"]

log = Logger()


#: Dovecot 2.3.19 answers a MOVE into the selected mailbox itself whose set names a message another session
#: expunged NO [EXPUNGEISSUED], having expunged the others without copying them: lost (probe x4, stop 52).
TO_ITSELF = "[CANNOT] Messages are not moved into the mailbox they are in; COPY them there instead"


class CopyCommands:
    """COPY / MOVE of one session; stateless (made when a command needs it: no per-session memory)."""

    __slots__ = ("mailboxes", "host")

    def __init__(self, mailboxes: MailboxCommands) -> None:
        self.mailboxes = mailboxes
        self.host = mailboxes.host

    def copy(self, cmd: Command) -> None:
        """COPY / MOVE: relayed when the destination lives with the selected mailbox, else carried out here."""
        host, m = self.host, self.mailboxes
        assert host.home is not None
        if not SelectCommands(m).settled(cmd, self.copy):  # (its state: what a SELECT/CLOSE in flight leaves)
            return
        if host.selected is None:  # nothing selected: the backend says so, as it would directly
            return host.relay_cmd(cmd, host.home)
        target = m.target(cmd, Slot.DEST, self.copy)
        if target is None:
            return
        if "MOVE" in cmd.name and host.selected_mailbox and m.moving(host.selected_mailbox):
            return m.refuse_no(cmd.tag, INUSE)  # a message moved out of a mailbox being moved: twice
        mailbox, route = target
        source = host.selected
        if route.primary == source or source in route.backends or not m.renamable(mailbox):
            if not (selected := host.selected_mailbox):
                return host.relay_cmd(cmd, source)
            sep, text = host.mailbox_map.separator, (lambda b: b.decode("utf-8", "surrogateescape"))
            if "MOVE" in cmd.name and normalize(text(mailbox), sep) == normalize(text(selected), sep):
                return m.refuse_no(cmd.tag, TO_ITSELF)
            names = [move_lock(selected.decode("utf-8", "surrogateescape"), host.mailbox_map.separator),
                     mailbox.decode("utf-8", "surrogateescape")]  # MOVEs across from its source, into its destination
            if "MOVE" in cmd.name:
                return host.run(cmd.tag, self._move_in_turn(cmd, source, selected, names))
            if (host.pool and host.pool.busy) or held_by_any(host.mailbox_map, host.user or "", names):  # (checked as it goes)
                return host.run(cmd.tag, self._relay_after_moves(cmd, source, names))
            return host.relay_cmd(cmd, source)  # (a name no backend takes: refused there, as directly)
        if m.refers(route, mailbox):
            return host.run(cmd.tag, self._refer_checked(cmd, m.referral(cmd.tag, route, mailbox)))
        if "MOVE" in cmd.name and m.examined:
            # Its \Deleted would be ignored: copies made, taken back as "gone", OK with nothing moved.
            return m.refuse_no(cmd.tag, READ_ONLY)
        message_set = cmd.args.tokens[0].value  # type: ignore[union-attr]
        host.run(cmd.tag, host.ctx.observer.transfer(host, cmd.name, self._copy_across(cmd, message_set, mailbox, route),
                                                     src=source, dst=route.primary, mailbox=mailbox))

    async def _refer_checked(self, cmd: Command, referral: bytes) -> None:
        """A COPY/MOVE's referral (RFC 2193 4.4) once the commands before it are answered (RFC 3501 5.5: a
        pipelined SELECT that fails leaves nothing selected: BAD, as directly) and its sequence set names no
        message past the last (an invalid command, 7.1.5: BAD as the selected backend and a COPY across say)."""
        host = self.host
        assert host.pool is not None
        await host.pool.quiet(None)
        if host.selected is None:
            raise Refusing("BAD No mailbox selected")
        message_set = cmd.args.tokens[0].value  # type: ignore[union-attr]
        if not cmd.name.startswith("UID ") and message_set != SAVED:
            src = await host.pool.ready_for(host.selected)
            try:
                _uids, others = await named_uids(src, message_set, False)
            except TransferError as e:
                raise Refusing(str(e)) from None
            for raw in others:
                host.write_from(src, raw)
        host.refuse(referral)

    async def _move_in_turn(self, cmd: Command, source: str, selected: bytes, names: list[str]) -> None:
        """A MOVE relayed once no other session has one of this mailbox under way, nor a RENAME of it
        (crossturns.py: two at once can both take one message), then as _relay_after_moves. The turn is
        taken once no command of this session is in flight: one ahead of it (a FETCH to a client that
        stopped reading) would hold it, and every other session's MOVE of the mailbox, meanwhile."""
        host = self.host
        assert host.pool is not None and host.user is not None
        await host.pool.quiet(None)
        await host.flow.client_output.drained()  # (a FETCH's last bytes read with its completion)
        release = await mailbox_turn(host.ctx, source, host.user, selected)
        try:
            conn = await host.pool.ready_for(source)
            if not await wait_for_moves(host.mailbox_map, host.user, names, host.ctx.reactor,
                                        host.ctx.config.map.move_wait_seconds):
                raise Refusing("NO " + COPY_IN_USE)
            if self.mailboxes.selected_held():  # a move of it began while this waited (soak C seed 70552)
                raise Refusing("NO " + INUSE)
            answered = [False]

            def settled() -> None:
                answered[0] = True
                release()

            host.relay.send(conn, cmd.tag, cmd.name, cmd.args, settled=settled)
        except BaseException:
            release()
            raise
        cut_if_unread(host, conn, lambda: answered[0], "MOVE")

    async def _relay_after_moves(self, cmd: Command, source: str, names: list[str]) -> None:
        """A COPY within one backend relayed once the commands ahead of it are done and no MOVE across holds
        *names* (its source's move_lock, its destination), then at once; else NO [INUSE] (copywait.py)."""
        host = self.host
        assert host.pool is not None and host.user is not None
        await host.pool.quiet(None)
        conn = await host.pool.ready_for(source)
        if not await wait_for_moves(host.mailbox_map, host.user, names, host.ctx.reactor,
                                    host.ctx.config.map.move_wait_seconds):
            raise Refusing("NO " + COPY_IN_USE)
        host.relay.send(conn, cmd.tag, cmd.name, cmd.args)

    async def _copy_across(self, cmd: Command, message_set: bytes, mailbox: bytes, route: Route) -> CopyOutcome:
        host = self.host
        assert host.pool is not None
        if not host.selected:
            raise Refusing("BAD No mailbox selected")
        if (src := host.pool.ready(host.selected)) is None:  # its backend went since the COPY was read (the session
            raise BackendUnavailable(f"backend {host.selected} connection lost")  # ends with it; probe k4: not BAD)
        await host.pool.quiet(None)
        dst = await host.pool.fresh(route)
        try:
            outcome = await copy_across(src, message_set, cmd.name.startswith("UID "), dst, mailbox,
                                        "MOVE" in cmd.name, mailbox_map=host.mailbox_map, user=host.user or "",
                                        source_mailbox=host.selected_mailbox or b"", clock=host.ctx.reactor,
                                        move_wait=host.ctx.config.map.move_wait_seconds,
                                        ask=host.pool.ready(dst.name))
        except TransferError as e:
            text = str(e)
            raise Refusing(text if text.startswith(("NO ", "BAD ")) else "NO " + text) from None
        finally:
            dst.logout()
        for raw in outcome.untagged:
            host.write_from(src, raw)
        host.tagged(cmd.tag, outcome.status, outcome.text)
        return outcome
