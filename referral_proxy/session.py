"""One client's IMAP session: the state machine and the dispatch of every command.

Bytes from the client go through the codec's CommandReader, which applies every client limit and admits each
command by the declared table (commands.py): allowed in this state, parsed against its grammar, or refused with
BAD before any backend sees it. Before login the proxy answers everything itself (authentication is in auth.py).
After login each command goes to the handler its table row names: relayed to the backend that owns its mailbox
(connections in pool.py, the relay itself in relay.py), answered with an RFC 2193 referral in a referral-aware
session (mailboxes.py; COPY/MOVE: copycommand.py), merged across backends (listing.py), streamed (APPEND,
append.py), or answered here.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import __version__, capabilities, fastnames, lastanswers, listing, referrals, stayalive, teardown  # noqa: F401 (fastnames: fastpath.NAMED)
from .appends import Appends, forget_takers
from .auth import Authenticator
from .backend import BackendError, BackendProtocol, Credentials, UntaggedResponse
from .commands import COMMANDS, PRE, CommandSpec, Routing, State, enabling
from .context import ProxyContext
from .copycommand import CopyCommands
from .fastpath import PLAIN_COMMANDS, append_line, relay_plain
from .flow import Block, ClientFlow
from .halfclose import HalfClose
from .idle import Idle
from .imap.command import Atom, CommandStart, nil_or_list
from .imap.framing import NEED_DATA
from .imap.grammar import Arguments, Grammar
from .imap.quoting import quoted, safe_text
from .imap.reader import (
    BACKEND_ATOM,
    NEED_DECISION,
    STREAMED,
    AppendStart,
    Command,
    CommandReader,
    Continue,
    Ended,
    Refusal,
    Refused,
    Sentinel,
    TextLine,
)
from .imap.response import ResponseStart, completion_text
from .journal import TAKEN_OVER, UNAVAILABLE, LostEntry, StoreUnavailable
from .mailboxes import MailboxCommands, Refusing
from .netio import quick_ack, sending, tune_socket
from .origin import peer_ip
from .phase import Phase
from .pool import BackendPool
from .relay import Relay
from .routing import MailboxMap, Route
from .selection import SelectCommands

__all__ = ["ProxyContext", "ClientSession", "Phase"]

log = Logger()

# Seconds a closing connection may take to drain what it was last sent (a BYE, the end of a
# response) before it is aborted: a client that does not read holds nothing longer.
CLOSE_GRACE = 30.0
# Commands one session reads in one go; then every other ready connection gets its turn first:
# thousands pipelined cannot keep others waiting past their share (50 such: a NOOP waits ~0.1 s).
TURN = 16
_COMMAND_STARTS = (Command, Refused, AppendStart)
# Commands read before login (a client logs in within a handful; a flood costs CPU): then * BYE, as imap-login does.
PRE_LOGIN_COMMANDS = 32


# Python 3.11's EnumType has a __getattr__ (each ``Phase.X`` ~110 ns): the hot paths use these.
_NOT_AUTHENTICATED, _AUTHENTICATED, _LOGOUT = Phase.NOT_AUTHENTICATED, Phase.AUTHENTICATED, Phase.LOGOUT
_IN_FLIGHT, _DECISION = Block.IN_FLIGHT, Block.DECISION


@implementer(IHandshakeListener)
class ClientSession(HalfClose, Protocol):
    """The server side of one client connection."""

    # Connected: a TCP (or TLS) transport. Twisted declares it with zope interfaces,
    # which mypy cannot follow without a plugin; what is used of it is plain.
    transport: Any

    def __init__(self, context: ProxyContext) -> None:
        self.ctx = context
        self.id = context.next_id()
        self.connect = context.connector(self)  # how this session reaches its backends
        self.phase = Phase.NOT_AUTHENTICATED
        self.user: str | None = None
        self.home: str | None = None  # the backend of the user's INBOX
        self.selected: str | None = None  # backend where a mailbox is selected (or being selected)
        self.selected_mailbox: bytes | None = None
        self.referral_aware = False
        self.pool: BackendPool | None = None
        self.relay = Relay(self)
        self.mailboxes = MailboxCommands(self)
        self.auth = Authenticator(self)
        assert context.staging_journal is not None  # set by ProxyContext
        self.appends = Appends(self, context.staging_journal, context.reactor)
        self.idle = Idle(self)
        self.reader = CommandReader(context.config.proxy.limits, self._admit, PLAIN_COMMANDS)
        self.flow = ClientFlow(self, self._transport_write, self._pump)
        self._pumping, self._login_timer, self._socket = False, cast(Any, None), cast(Any, None)  # a timer, a socket
        self._closed_waiters: tuple[defer.Deferred[None], ...] = ()  # rare: no list kept per session
        self._byes: tuple[BackendProtocol, ...] = ()  # backends whose own BYE the client was sent (few)
        self._before_login = 0  # commands read before the login

    @property
    def config(self) -> Any:
        return self.ctx.config  # read afresh: a reload swaps it

    @property
    def mailbox_map(self) -> MailboxMap:
        return self.ctx.mailbox_map

    @property
    def referrals_mode(self) -> str:
        return str(self.ctx.config.proxy.referrals)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.LOGOUT

    # -- connection --------------------------------------------------------------

    def connectionMade(self) -> None:
        self._socket = tune_socket(self.transport)
        refusal = self.ctx.admission.connect(self, peer_ip(self.transport), self.config.proxy.connections)
        if refusal is not None:
            self.ctx.observer.refused(self.transport, refusal.reason)
            self.transport.write(b"* BYE [UNAVAILABLE] %s\r\n" % safe_text(refusal.text).encode())
            return self._close()
        # A TLS listener's client output is its producer once the handshake is done.
        self.flow.connect(self.transport, produce=not ISSLTransport.providedBy(self.transport))
        self.ctx.sessions.add(self)
        self._login_timer = self.ctx.reactor.callLater(self.config.proxy.login_timeout, self._login_timed_out)
        self.ctx.observer.session_started(self)
        self.send(capabilities.greeting(self.config, self.ctx.server_tls is not None, self._tls_active()))

    def handshakeCompleted(self) -> None:
        if not self.closed:
            self.flow.produce(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.ctx.observer.client_in(self, data)
        if self.phase is _AUTHENTICATED and relay_plain(self, data):
            return
        if self.phase is not _AUTHENTICATED or not append_line(self, data):
            self.reader.receive_data(data)
        self._pump()
        if self.reader.mid_command and not sending(self.transport):  # the rest may wait for our ACK (Nagle)
            quick_ack(self._socket)  # unless our "+" or answer, sent at the pass's end, carries it

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.flow is None:  # unlinked (teardown.py): it ended already
            return
        quiet, self.phase = teardown.quiet(self), Phase.LOGOUT  # quiet: freed at once (teardown.py)
        self._cancel_login_timer()
        self.flow.closed()
        self.ctx.admission.gone(self)
        self.ctx.sessions.discard(self)
        waiters, self._closed_waiters = self._closed_waiters, ()
        for d in waiters:
            d.callback(None)
        for conn in self.appends.client_gone():
            if self.pool is not None:  # an emulated MULTIAPPEND removes what it saved, then closes its connection
                self.pool.conns.pop(conn.name, None)
        self._logout_backends(park="lost")
        self.ctx.observer.session_ended(self)
        teardown.ended(self, quiet)

    def when_closed(self) -> defer.Deferred[None]:
        """Fires once the client's connection is gone (what was written is flushed)."""
        if self.transport is None or getattr(self.transport, "disconnected", False):
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters += (d,)
        return d

    def shutdown(self, why: bytes = b"Server shutting down") -> None:
        """The proxy is stopping (or the user's mail moved: relocation.py): tell the client, log its backends out."""
        if self.phase is not Phase.LOGOUT:
            self.flow.unqueued()
            self.end(b"* BYE " + why + b"\r\n")

    def end(self, bye: bytes | None) -> None:
        """*bye* (if any) to the client, the backends logged out, the client's connection closed once that is out."""
        if bye is not None:
            self.send(bye)
        self._logout_backends()
        self._close()

    def _logout_backends(self, park: str = "") -> None:
        if self.pool is not None:
            if park:  # the clean ones wait for the user's next login (keepalive.py)
                self.ctx.keepalive.release(self, by_logout=park == "logout")
            self.pool.logout_all()

    def _close(self) -> None:
        """Close once what was written is out (aborted after CLOSE_GRACE seconds if it is not)."""
        self.phase = Phase.LOGOUT
        self.flow.close(self.transport, self.ctx.reactor, CLOSE_GRACE)

    # -- output --------------------------------------------------------------------

    def _transport_write(self, data: bytes) -> None:
        self.ctx.observer.client_out(self, data)
        self.transport.write(data)

    def send(self, data: bytes) -> None:
        """A response of the proxy's own: never written inside a relayed one."""
        self.flow.out.write(self, data)

    def write_from(self, source: object, data: bytes, end: bool = True) -> None:
        """A relayed response (or part of one), kept whole on the client's connection (relay.captured)."""
        self.flow.out.write(source, self.relay.captured(source, data) if end else data, end)

    def tagged(self, tag: bytes, status: str, text: str) -> None:
        self.send(b"%s %s %s\r\n" % (tag, status.encode(), safe_text(text).encode("utf-8")))

    def answer(self, tag: bytes, response: str) -> None:
        """``tag`` followed by a whole status response text such as ``NO [INUSE] ...``."""
        self.send(b"%s %s\r\n" % (tag, safe_text(response).encode("utf-8")))

    def refuse(self, line: bytes) -> None:
        """The proxy's own refusal of a command: after the APPENDs before it are answered."""
        self.appends.after_answers(line)

    # -- input ------------------------------------------------------------------------

    def block(self, reason: Block) -> None:
        self.flow.block(reason)

    def unblock(self, reason: Block) -> None:
        self.flow.unblock(reason)

    def block_commands(self, reason: Block) -> None:
        self.flow.block_commands(reason)

    def pause_if_blocked(self, reason: Block) -> None:
        self.flow.pause_if_blocked(reason)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            most = self.config.proxy.connections.max_commands_in_flight
            blocked, turn = self.flow.blocked, TURN
            while not blocked and self.phase is not _LOGOUT:
                # Commands relayed or appended and not answered yet: at most `most`.
                if self.relay.in_flight + len(self.appends.unanswered) >= most and self.reader.between_commands:
                    self.block(_IN_FLIGHT)  # released when one is answered (command_done)
                    break
                event = self.reader.next_event()
                if event is NEED_DATA:
                    break
                if event is NEED_DECISION:  # a message literal waits for the backend
                    self.flow.pause_reading(_DECISION)
                    break
                self._event(event)
                if isinstance(event, _COMMAND_STARTS):
                    turn -= 1
                if not turn:  # the other connections' turn: the rest after them
                    self.flow.next_turn(self.ctx.reactor)
                    break
        finally:
            self._pumping = False

    def command_done(self) -> None:
        """A relayed command or an APPEND has its answer: read on if the cap held reading."""
        if _IN_FLIGHT in self.flow.blocked:
            self.unblock(_IN_FLIGHT)

    def decided(self) -> None:
        """A message literal's decision was taken: read on."""
        self.flow.resume_reading(_DECISION)
        self._pump()

    def _event(self, event: object) -> None:
        if self.phase is _NOT_AUTHENTICATED and isinstance(event, (Command, Refused)):
            self._before_login += 1
            if self._before_login > PRE_LOGIN_COMMANDS:  # (no backend yet)
                return self.end(b"* BYE Too many commands before login\r\n")
        if isinstance(event, Command):
            if self.pool is not None:  # what it leaves on its connection: no reuse, CONDSTORE everywhere
                self.pool.note(event.name, event.args)
            if event.name in ("DELETE", "RENAME"):  # the mailbox that took a session's last APPEND may be gone
                forget_takers(self.ctx.sessions, self.user)
            _DISPATCH[event.name](self, event, COMMANDS[event.name])
        elif isinstance(event, Refused):
            line = b"%s %s %s\r\n" % (event.tag, event.status.encode(), safe_text(event.text).encode("utf-8"))
            self.appends.after_answers(line)  # in order: after an APPEND still awaiting its answer
        elif isinstance(event, Continue):
            self.send(b"+ Ready for literal data\r\n")
        elif isinstance(event, AppendStart):
            self.appends.start(event)
        elif isinstance(event, TextLine):
            self._text_line(event)
        elif isinstance(event, Ended):  # (a MULTIAPPEND cancelled by its last message first has its answer)
            lastanswers.end_after_answers(self, self.ctx.reactor, b"* BYE " + event.text.encode("ascii") + b"\r\n")
        else:
            self.appends.event(event)

    def _admit(self, start: CommandStart) -> Grammar | Refusal | Sentinel:
        """Whether the command is read, and how: by the table and the session's state."""
        self.ctx.observer.command(self, start)
        spec = COMMANDS.get(start.name)
        if spec is None:
            return Refusal("BAD", f"Unknown command {start.name}")
        if self.phase is not _NOT_AUTHENTICATED:
            if spec.states is PRE:
                return Refusal("BAD", f"{start.name} is not allowed after login")
            return STREAMED if spec.routing is Routing.STREAMED else spec.grammar
        if State.NOT_AUTHENTICATED in spec.states:
            return spec.grammar
        return Refusal("BAD", f"{start.name} is not allowed before login")

    def run(self, tag: bytes, work: Coroutine[Any, Any, None]) -> None:
        """Handle a command that must wait (a connection, a quiet backend): input pauses meanwhile."""
        self.block(Block.TASK)

        def failed(f: Failure) -> None:
            if f.check(Refusing):
                self.answer(tag, f.value.response)
            elif f.check(BackendError, StoreUnavailable, LostEntry):  # (the map store gone mid-command: recovery finishes)
                log.warn("session {id}: {why}", id=self.id, why=f.getErrorMessage())
                self.tagged(tag, "NO", "[UNAVAILABLE] Mail server temporarily unavailable" if f.check(BackendError)
                            else TAKEN_OVER if f.check(LostEntry) else UNAVAILABLE)
            else:
                log.failure("session {id}: command failed", f, id=self.id)
                self.tagged(tag, "NO", "[SERVERBUG] Internal proxy error")

        stayalive.during(self.ctx.reactor, self, defer.ensureDeferred(self.appends.in_turn(work))).addErrback(
            failed).addBoth(lambda _: self.unblock(Block.TASK))

    def _text_line(self, line: TextLine) -> None:
        if not self.auth.sasl_response(line):
            self.idle.line(line)

    # -- not authenticated ----------------------------------------------------------------

    def _pre_login_caps(self) -> list[str]:
        return capabilities.before_login(self.config, self.ctx.server_tls is not None, self._tls_active())

    def _post_login_caps(self) -> tuple[str, ...]:
        conn = self.pool.ready(self.home or "") if self.pool is not None else None
        return capabilities.after_login(conn.capability_names if conn is not None else (),
                                        self.config.proxy.referrals != "never",
                                        all("UIDPLUS" in c for c in self.ctx.backend_caps.values()))

    def _tls_active(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def plaintext_ok(self) -> bool:
        return bool(self.config.proxy.allow_plaintext_login) or self._tls_active()

    def cmd_capability(self, cmd: Command, spec: CommandSpec) -> None:
        if self.phase is Phase.NOT_AUTHENTICATED:
            self.send(b"* CAPABILITY %s\r\n" % " ".join(self._pre_login_caps()).encode())
            return self.tagged(cmd.tag, "OK", "Capability completed.")

        async def answer() -> None:
            assert self.pool is not None
            await self.pool.quiet(None)  # in order, after the relayed commands before it
            self.send(b"* CAPABILITY %s\r\n" % " ".join(self._post_login_caps()).encode())
            self.tagged(cmd.tag, "OK", "Capability completed.")

        if self.pool is not None and self.pool.busy:
            return self.run(cmd.tag, answer())
        self.send(b"* CAPABILITY %s\r\n" % " ".join(self._post_login_caps()).encode())
        self.tagged(cmd.tag, "OK", "Capability completed.")

    def cmd_noop(self, cmd: Command, spec: CommandSpec) -> None:
        if self.phase is Phase.NOT_AUTHENTICATED:
            return self.tagged(cmd.tag, "OK", "NOOP completed.")
        self.cmd_to_selected(cmd, spec)

    def cmd_logout(self, cmd: Command, spec: CommandSpec) -> None:
        if self.pool is None or not self.pool.busy:
            return self._logout(cmd.tag)

        async def answer() -> None:
            assert self.pool is not None
            await self.pool.quiet(None)
            self._logout(cmd.tag)

        self.run(cmd.tag, answer())

    def _logout(self, tag: bytes) -> None:
        self.send(b"* BYE Logging out\r\n")
        self.tagged(tag, "OK", "Logout completed.")
        self._logout_backends(park="logout")
        self._close()

    def cmd_id(self, cmd: Command, spec: CommandSpec) -> None:
        if self.phase is not Phase.NOT_AUTHENTICATED:
            return self.cmd_to_home(cmd, spec)
        if not nil_or_list(cmd.args.tokens[0]):  # RFC 2971; Dovecot refuses `ID x` too
            return self.tagged(cmd.tag, "BAD", "Invalid ID parameters")
        self.ctx.observer.client_id(self, list(cmd.args.tokens))
        self.send(b'* ID ("name" "referral-proxy" "version" %s)\r\n' % quoted(__version__.encode()))
        self.tagged(cmd.tag, "OK", "ID completed.")

    def cmd_starttls(self, cmd: Command, spec: CommandSpec) -> None:
        if self.ctx.server_tls is None or self._tls_active():
            return self.tagged(cmd.tag, "BAD", "STARTTLS is not available")
        # Anything the client pipelined after STARTTLS was sent in clear text and
        # could be an injection: drop it (the same defence as Dovecot's and Postfix's).
        self.tagged(cmd.tag, "OK", "Begin TLS negotiation now.")
        self.reader = CommandReader(self.config.proxy.limits, self._admit, PLAIN_COMMANDS)
        self.flow.handshaking = True  # until handshakeCompleted
        self.transport.startTLS(self.ctx.server_tls)

    def logged_in(self, tag: bytes, user: str, credentials: Credentials, conn: BackendProtocol,
                  answer: str = "", **details: str) -> None:
        self.user, self.home = user, conn.name
        self.pool = BackendPool(self.ctx, self.connect, user, credentials, self.id, self._attach, self.write_from)
        self.pool.add(conn)
        self.phase = Phase.AUTHENTICATED
        self.referral_aware = self.config.proxy.referrals == "always"
        self._cancel_login_timer()
        caps, binary, logged_in = capabilities.login_answer(self._post_login_caps())
        self.reader.literal8 = binary  # a literal8 APPEND message only if it is offered
        if answer:  # RFC 2221 OK [REFERRAL ...]: one response code only, so CAPABILITY goes untagged
            self.ctx.observer.login(self, user, conn.name, "referred", **details)
            self.send(b"* CAPABILITY %s\r\n" % caps.encode())
            return self.answer(tag, answer)
        self.ctx.observer.login(self, user, conn.name, "ok")
        self.send(b"%s OK %s\r\n" % (tag, logged_in))  # tagged(tag, "OK", "[CAPABILITY ...] Logged in")

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.phase is Phase.NOT_AUTHENTICATED:
            self.ctx.observer.timed_out(self)
            if self.flow.output_backed_up or self.flow.handshaking:  # a BYE would never leave
                self.phase = Phase.LOGOUT
                return self.flow.abort(self.transport)
            self.send(b"* BYE Autologout; no login in time\r\n")
            self._close()

    def _cancel_login_timer(self) -> None:
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- relaying --------------------------------------------------------------------------

    def relay_cmd(self, cmd: Command, route: Route | str, after: Callable[[ResponseStart], None] | None = None,
                  name: str | None = None) -> None:
        """Relay to the route's backend: at once if it is ready, else once it is."""
        assert self.pool is not None
        pool = self.pool
        conn = pool.fast(route if isinstance(route, str) else route.primary)
        if conn is not None:
            return self.relay.send(conn, cmd.tag, name or cmd.name, cmd.args, after=after)

        async def later() -> None:
            conn = await pool.ready_for(route)
            self.relay.send(conn, cmd.tag, name or cmd.name, cmd.args, after=after)

        self.run(cmd.tag, later())

    def relay_to(self, tag: bytes, name: str, args: Arguments, backend: str) -> None:
        self.relay_cmd(Command(tag, name, args), backend)

    def cmd_to_selected(self, cmd: Command, spec: CommandSpec) -> None:
        """Commands of the selected mailbox: where the mailbox is selected (home if none)."""
        assert self.home is not None
        self.relay_cmd(cmd, self.selected or self.home)

    def cmd_to_home(self, cmd: Command, spec: CommandSpec) -> None:
        assert self.home is not None
        self.relay_cmd(cmd, self.home)

    async def gather(self, backends: Sequence[str], command: bytes,
                     then: Sequence[bytes] = ()) -> list[tuple[BackendProtocol, UntaggedResponse]]:
        """Run *command* on every backend (*then*: its literals); their untagged answers (a refusal ends it)."""
        assert self.pool is not None
        conns = [await self.pool.connection(b) for b in backends]
        await self.pool.quiet(None)
        results: list[tuple[BackendProtocol, UntaggedResponse]] = []
        for conn in conns:
            result = await conn.command(command, bounded=True, then=then)  # a read: cut if it stalls (stall.py)
            if not result.ok:  # the backend's own answer, BAD or NO, as a direct client would get it
                raise Refusing(completion_text(result.start))
            results.extend((conn, r) for r in result.responses)
        return results

    # -- commands with their own handling ------------------------------------------------------

    def cmd_list(self, cmd: Command, spec: CommandSpec) -> None:
        listing.list_command(self, cmd.tag, cmd.name, cmd.args)  # type: ignore[arg-type]

    def cmd_enable(self, cmd: Command, spec: CommandSpec) -> None:
        """ENABLE: relayed, and remembered for connections opened later."""
        assert self.pool is not None and self.home is not None
        if any(isinstance(t, Atom) and BACKEND_ATOM.fullmatch(t.value) is None for t in cmd.args.tokens):
            # as Dovecot refuses it (8-bit or "{" in an atom): never an OK for the names it does know
            return self.refuse(b"%s BAD Invalid characters in atom\r\n" % cmd.tag)  # (in order: refuse)
        pool, target, cmd = self.pool, self.selected or self.home, enabling(cmd)  # what the proxy announces only
        pool.remember_enabled([t.value for t in cmd.args.tokens])  # type: ignore[union-attr]

        def done(start: ResponseStart) -> None:
            conn = pool.ready(target)
            if start.status == "OK" and conn is not None:
                conn.enabled.update(pool.confirm_enabled([t.value for t in cmd.args.tokens]))  # type: ignore[union-attr]

        conn = pool.ready(target)
        if conn is not None and not pool.busy_except(conn):  # as it is: not replayed first
            self.relay.send(conn, cmd.tag, cmd.name, cmd.args, after=done)
        else:
            self.relay_cmd(cmd, target, done)

    def cmd_idle(self, cmd: Command, spec: CommandSpec) -> None:
        """IDLE: relayed; until it ends only DONE is read, and sent on (idle.py)."""
        self.idle.start(cmd)

    def cmd_cancel_update(self, cmd: Command, spec: CommandSpec) -> None:
        self.cmd_to_selected(cmd, spec)  # the relay gives the client's tags back as the proxy's

    def cmd_append(self, cmd: Command, spec: CommandSpec) -> None:  # never collected: the reader streams it
        self.tagged(cmd.tag, "BAD", "APPEND is streamed")

    # -- the backends' side (ResponseSink, RelayHost) --------------------------------------------

    def _attach(self, proto: BackendProtocol) -> None:
        """A new backend connection: it reports here, and each side is the other's producer."""
        proto.sink = self
        self.flow.attach(proto)

    def untagged(self, backend: BackendProtocol, start: ResponseStart | None, data: bytes, end: bool) -> None:
        if start is not None:
            if start.name == "ESEARCH" or start.code == "NOUPDATE":
                data = self.relay.translate(backend, data)
            elif start.status == "BYE":
                if end and self.phase is not Phase.LOGOUT and self.dies_with(backend):  # the session ends with it:
                    return lastanswers.held_bye(self, backend, self.ctx.reactor)  # no more read; it comes last
                self._byes += (backend,)  # the client has its reason (a BYE captured by a transfer is not)
        self.flow.out.write(backend, data, end)

    def dies_with(self, conn: BackendProtocol) -> bool:
        """Losing the home or selected mailbox's backend ends the session; not a parked one dead unused (keepalive)."""
        return conn.name == self.selected or (conn.name == self.home and not self.ctx.keepalive.unused(conn))

    def relay_finished(self, conn: BackendProtocol) -> None:
        if self.pool is not None:
            self.pool.check_quiet()
        self.appends.answered_one()
        self.command_done()

    def relay_lost(self, conn: BackendProtocol, tag: bytes) -> None:
        self.idle.lost(conn)
        if not self.dies_with(conn) and self.phase is not Phase.LOGOUT:
            self.tagged(tag, "NO", "[UNAVAILABLE] Mail server connection lost")

    def backend_lost(self, backend: BackendProtocol, reason: Failure) -> None:
        if self.pool is not None:
            self.pool.forget(backend, for_good=self.dies_with(backend))
        self.relay.end_updates(backend)
        told = backend in self._byes and not self.flow.out.holds(backend)  # its BYE written, not queued
        cut = self.flow.detach(backend)  # mid-response (a literal): nothing more is written, the session ends
        if self.phase is Phase.LOGOUT:
            return
        log.warn("session {id}: backend {name} connection lost: {why}", id=self.id, name=backend.name,
                 why=reason.getErrorMessage())
        self.idle.lost(backend)
        if cut:  # nothing more can be written
            self.end(None)
        elif self.dies_with(backend):  # what the others have whole is answered first (lastanswers.py)
            # its BYE, if one came (queued, captured by a staged APPEND's STATUS: dropped), says why (probe j5 of stop 59)
            lastanswers.end_after_answers(self, self.ctx.reactor, None if told else backend.bye or b"* BYE Mail server connection lost\r\n")


_COLLABORATORS = {"mailboxes": MailboxCommands, "auth": Authenticator}
_STATELESS = {"copies": CopyCommands, "selection": SelectCommands}  # made per command: no memory per idle session


def _handler(name: str) -> Callable[[ClientSession, Command, CommandSpec], None]:
    """``select`` -> ClientSession.cmd_select; ``mailboxes.select`` -> session.mailboxes.select(cmd)."""
    owner, _, method = name.rpartition(".")
    if not owner:
        return getattr(ClientSession, "cmd_" + method)  # type: ignore[no-any-return]
    if (made := _STATELESS.get(owner)) is not None:
        run = getattr(made, method)  # a missing one fails at import, not at run time
        return lambda session, cmd, spec: run(made(session.mailboxes), cmd)  # type: ignore[no-any-return]
    getattr(_COLLABORATORS[owner], method)
    return lambda session, cmd, spec: getattr(getattr(session, owner), method)(cmd)


_DISPATCH = {spec.name: _handler(spec.handler) for spec in COMMANDS.values()}
