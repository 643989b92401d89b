"""IDLE (RFC 2177) relayed: until it ends only DONE is read from the client, and sent on.

Anything else than DONE ends the IDLE as well (the backend gets DONE, the client
``BAD Expected DONE.`` instead of the OK) and never reaches the backend; what follows
DONE is the next command. A DONE pipelined before the backend's ``+`` is sent at once,
but nothing more is read until the IDLE's own ``+`` and answer are in: a backend's
continuation request belongs to the IDLE, never to a command read after it (which
would then send a literal the backend did not ask for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .backend import BackendProtocol
from .flow import Block
from .imap.reader import Command, CommandReader, TextLine
from .imap.response import ResponseStart
from .pool import BackendPool
from .relay import Relay

__all__ = ["Idle", "IdleHost"]


class IdleHost(Protocol):
    """What IDLE needs of its session."""

    reader: CommandReader
    relay: Relay
    pool: BackendPool | None
    home: str | None
    selected: str | None

    def send(self, data: bytes) -> None: ...

    def block(self, reason: Block) -> None: ...

    def unblock(self, reason: Block) -> None: ...

    def run(self, tag: bytes, work: Any) -> None: ...


@dataclass
class _Idling:
    tag: bytes
    conn: BackendProtocol
    continued: bool = False  # the backend said "+"
    done_sent: bool = False
    bad: bool = False  # the client sent something else than DONE
    holding: bool = False  # DONE went before the "+": reading waits for the IDLE's answer


class Idle:
    """The IDLE of one session, if one runs."""

    __slots__ = ("host", "current")  # no per-instance dict

    def __init__(self, host: IdleHost) -> None:
        self.host = host
        self.current: _Idling | None = None

    def start(self, cmd: Command) -> None:
        """Relay IDLE where the selected mailbox is (home if none)."""
        host = self.host
        assert host.pool is not None and host.home is not None
        pool, target = host.pool, host.selected or host.home
        conn = pool.fast(target)
        if conn is not None:
            return self._begin(conn, cmd)

        async def later() -> None:
            self._begin(await pool.ready_for(target), cmd)

        host.run(cmd.tag, later())

    def _begin(self, conn: BackendProtocol, cmd: Command) -> None:
        host = self.host
        idle = self.current = _Idling(cmd.tag, conn)
        host.reader.expect_line()

        def continued(text: bytes) -> None:
            idle.continued = True
            host.send(b"+ " + text + b"\r\n")

        def done(start: ResponseStart) -> None:
            if self.current is idle:
                self._over(idle)
                if not idle.continued and not idle.done_sent:
                    host.reader.expect_line(False)  # refused at once: the client sends no DONE

        def answer(start: ResponseStart, data: bytes) -> bytes:
            return b"%s BAD Expected DONE.\r\n" % idle.tag if idle.bad and start.status == "OK" else data

        host.relay.send(conn, cmd.tag, cmd.name, cmd.args, after=done, on_continuation=continued, answer=answer)

    def line(self, line: TextLine) -> bool:
        """The line that ends the IDLE (DONE, or anything else); False if none runs."""
        idle = self.current
        if idle is None or idle.done_sent:
            return False
        idle.done_sent = True
        upto_nul = line.data.split(b"\0", 1)  # Dovecot reads up to a NUL ("DONE\0{5+}" is DONE, "DONE{5+}" is not)
        idle.bad = not (upto_nul[0].upper() == b"DONE" and (line.clean or len(upto_nul) > 1))
        idle.conn.write(b"DONE\r\n")
        if not idle.continued:
            idle.holding = True
            self.host.block(Block.IDLE_ENDING)
        return True

    def lost(self, conn: BackendProtocol) -> None:
        """*conn* is gone: an IDLE there is over."""
        if self.current is not None and self.current.conn is conn:
            self._over(self.current)

    def _over(self, idle: _Idling) -> None:
        self.current = None
        if idle.holding:
            idle.holding = False
            self.host.unblock(Block.IDLE_ENDING)
