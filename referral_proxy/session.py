"""One client's IMAP session: the state machine and the dispatch of every command.

Bytes from the client go through the codec's Framer. Before login the proxy
answers everything itself. After login each command is collected whole (small
commands) or streamed (APPEND), then handled by the entry for its name in
``_HANDLERS`` below: relayed to the backend that owns its mailbox (opening a
connection to it on first use), answered with an RFC 2193 referral in a
referral-aware session, merged across backends (LIST/LSUB), or answered here.
Responses come back as raw bytes; only the tag of a completion is rewritten.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import __version__, capabilities, listing, referrals
from .append import AppendCommand, remove_appended, split_mailbox
from .backend import (
    AuthenticationFailed,
    BackendError,
    BackendProtocol,
    BackendUnavailable,
    Credentials,
    quick_ack,
    tune_socket,
)
from .config import BackendConfig, Config
from .flow import AllBackends, Output, PeerPause, ReadGate
from .imap.command import (
    Atom,
    CommandStart,
    ParenList,
    ParseError,
    String,
    Token,
    astring_value,
    parse_arguments,
    parse_command_start,
    tag_of,
)
from .imap.framing import NEED_DATA, Framer, Line, LineTooLong, LiteralData, LiteralEnd, LiteralSpec
from .imap.quoting import astring, quoted
from .imap.response import ResponseStart, completion_text
from .mailops import TransferError
from .mover import ANSWER_WITHIN, MoveIncomplete, Mover, rename_here
from .routing import MailboxMap, Route
from .transfer import copy_across

__all__ = ["ProxyContext", "ClientSession"]

log = Logger()

# A collected (non-APPEND) command may not grow past this many bytes in all.
MAX_COLLECTED = 1024 * 1024

Connect = Callable[[BackendConfig, Credentials], Awaitable[BackendProtocol]]


@dataclass
class ProxyContext:
    """What every session shares: configuration, map, reactor, backend connector."""

    config: Config
    mailbox_map: MailboxMap
    reactor: Any
    connect: Connect
    server_tls: Any = None  # IOpenSSLServerConnectionCreator for STARTTLS, or None
    sessions: set[ClientSession] = field(default_factory=set)
    backend_caps: dict[str, frozenset[str]] = field(default_factory=dict)  # as last seen after login
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)


class Phase(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    LOGOUT = "logout"


@dataclass
class _Collect:
    """A command gathered whole before it is handled or relayed."""

    start: CommandStart
    fragments: list[bytes]
    literals: list[bytes] = field(default_factory=list)
    current: bytearray | None = None  # the literal being received
    size: int = 0
    append_mailbox: bool = False  # an APPEND whose mailbox name is a literal: stream after it


class _Refused(Exception):
    """A command answered with a NO before reaching a backend."""

    def __init__(self, response: str) -> None:
        super().__init__(response)
        self.response = response


class ClientSession(Protocol):
    """The server side of one client connection."""

    def __init__(self, context: ProxyContext) -> None:
        self.ctx = context
        self.config = context.config
        self.limits = context.config.proxy.limits
        self.map = context.mailbox_map
        self.id = context.next_id()
        self.phase = Phase.NOT_AUTHENTICATED
        self.user: str | None = None
        self.home: str | None = None  # name of the backend serving the session
        self.selected: str | None = None  # backend where a mailbox is selected (or being selected)
        self.selected_mailbox: bytes | None = None
        self.referral_aware = False
        self._credentials: Credentials | None = None
        self._conns: dict[str, BackendProtocol] = {}
        self._connecting: dict[str, defer.Deferred[BackendProtocol]] = {}
        self._enabled: list[bytes] = []  # what the client ENABLEd, replayed on new connections
        self._framer = Framer(self.limits.max_line)
        self._gate: ReadGate | None = None
        self._backends_producer = AllBackends()
        self._out = Output(self._transport_write)
        self._cmd: _Collect | AppendCommand | None = None
        self._blocked: str | None = None
        self._pumping = False
        self._sasl_tag: bytes | None = None  # AUTHENTICATE awaiting the client's response line
        self._idle: tuple[bytes, BackendProtocol] | None = None  # a relayed IDLE: client tag, backend
        self._idle_waiters: list[tuple[BackendProtocol | None, defer.Deferred[None]]] = []
        self._login_timer: Any = None
        self._peer = "?"
        self._socket: Any = None
        self._closed_waiters: list[defer.Deferred[None]] = []

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self._socket = tune_socket(self.transport)
        self._gate = ReadGate(self.transport)
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.ctx.sessions.add(self)
        self._login_timer = self.ctx.reactor.callLater(self.config.proxy.login_timeout, self._login_timed_out)
        log.info("session {id} from {peer}", id=self.id, peer=self._peer)
        caps = " ".join(self._pre_login_caps())
        self._send(b"* OK [CAPABILITY %s] %s referral-proxy ready.\r\n" % (caps.encode(), self.config.proxy.hostname.encode()))

    def dataReceived(self, data: bytes) -> None:
        quick_ack(self._socket)
        self._framer.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.phase = Phase.LOGOUT
        self._cancel_login_timer()
        self.ctx.sessions.discard(self)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)
        cmd = self._cmd
        if isinstance(cmd, AppendCommand) and cmd.client_gone():
            # An emulated MULTIAPPEND removes what it saved, then closes its connection itself.
            self._conns.pop(cmd.conn.name, None)
        self._logout_backends()
        log.info("session {id} closed ({user})", id=self.id, user=self.user or "not logged in")

    def when_closed(self) -> defer.Deferred[None]:
        """Fires once the client's connection is gone (what was written is flushed)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.transport is None or getattr(self.transport, "disconnected", False):
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d

    def shutdown(self) -> None:
        """The proxy is stopping: tell the client, and log its backends out."""
        if self.phase is not Phase.LOGOUT:
            self._out = Output(self._transport_write)
            self._send(b"* BYE Server shutting down\r\n")
            self._logout_backends()
            self._close()

    def _logout_backends(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.sink = None
            conn.logout()

    def _close(self) -> None:
        self.phase = Phase.LOGOUT
        self.transport.loseConnection()

    # -- output --------------------------------------------------------------

    def _transport_write(self, data: bytes) -> None:
        self.transport.write(data)

    def _send(self, data: bytes) -> None:
        """A response of the proxy's own: never written inside a relayed one."""
        self._out.write(self, data)

    def _tagged(self, tag: bytes, status: str, text: str) -> None:
        self._send(b"%s %s %s\r\n" % (tag, status.encode(), text.encode("utf-8")))

    # -- input pump --------------------------------------------------------------

    def _block(self, reason: str) -> None:
        self._blocked = reason
        if self._gate is not None:
            self._gate.pause("session")

    def _unblock(self) -> None:
        self._blocked = None
        if self._gate is not None:
            self._gate.resume("session")
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._blocked is None and self.phase is not Phase.LOGOUT:
                event = self._framer.next_event()
                if event is NEED_DATA:
                    break
                self._event(event)
        finally:
            self._pumping = False

    def _event(self, event: object) -> None:
        cmd = self._cmd
        if isinstance(event, Line):
            if event.first:
                self._line(event)
            elif isinstance(cmd, _Collect):
                self._collect_fragment(cmd, event)
            elif isinstance(cmd, AppendCommand):
                cmd.fragment(event.data, event.literal)
        elif isinstance(event, LiteralData):
            if isinstance(cmd, _Collect):
                assert cmd.current is not None
                cmd.current += event.data
            elif isinstance(cmd, AppendCommand):
                cmd.data(event.data)
        elif isinstance(event, LiteralEnd):
            if isinstance(cmd, _Collect):
                assert cmd.current is not None
                cmd.literals.append(bytes(cmd.current))
                cmd.current = None
            elif isinstance(cmd, AppendCommand):
                cmd.literal_end()
        elif isinstance(event, LineTooLong):
            self._line_too_long(event)

    def _line_too_long(self, event: LineTooLong) -> None:
        why = f"Command line too long (limit {event.limit} bytes)"
        cmd, self._cmd = self._cmd, None
        if event.first:
            self._tagged(tag_of(event.prefix) or b"*", "BAD", why)
        elif isinstance(cmd, _Collect):
            self._tagged(cmd.start.tag, "BAD", why)
        elif isinstance(cmd, AppendCommand):
            cmd.line_too_long(why.encode())

    def _run(self, tag: bytes, work: Coroutine[Any, Any, None]) -> None:
        """Handle a command that must wait (a connection, a quiet backend): input pauses meanwhile."""
        self._block("task")

        def failed(f: Failure) -> None:
            if f.check(_Refused):
                self._send(b"%s %s\r\n" % (tag, f.value.response.encode()))
            elif f.check(BackendError):
                log.warn("session {id}: {why}", id=self.id, why=f.getErrorMessage())
                self._tagged(tag, "NO", "[UNAVAILABLE] Mail server temporarily unavailable")
            else:
                log.failure("session {id}: command failed", f, id=self.id)
                self._tagged(tag, "NO", "[SERVERBUG] Internal proxy error")

        def finished(_: object) -> None:
            if self._blocked == "task":
                self._unblock()

        defer.ensureDeferred(work).addErrback(failed).addBoth(finished)

    # -- a new command line ----------------------------------------------------------

    def _line(self, line: Line) -> None:
        if self._sasl_tag is not None:
            self._sasl_response(line)
            return
        if self._idle is not None:
            # DONE (or whatever the client sends) goes to the backend, which ends the IDLE.
            if line.literal is not None:
                self._framer.reject_literal()
            self._idle[1].write(line.data + b"\r\n")
            return
        try:
            start = parse_command_start(line.data)
        except ParseError as e:
            if line.literal is not None:
                self._framer.reject_literal()
            self._tagged(tag_of(line.data) or b"*", "BAD", f"Invalid command: {e}")
            return
        if self.phase is Phase.NOT_AUTHENTICATED:
            self._not_authenticated(line, start)
        else:
            self._authenticated(line, start)

    def _not_authenticated(self, line: Line, start: CommandStart) -> None:
        name = start.name
        if name in ("LOGIN", "AUTHENTICATE", "ID"):
            self._begin_collect(line, start)
        elif line.literal is not None:
            self._framer.reject_literal()
            self._tagged(start.tag, "BAD", f"Unexpected literal in {name}")
        elif name == "CAPABILITY":
            self._send(b"* CAPABILITY %s\r\n" % " ".join(self._pre_login_caps()).encode())
            self._tagged(start.tag, "OK", "Capability completed.")
        elif name == "NOOP":
            self._tagged(start.tag, "OK", "NOOP completed.")
        elif name == "LOGOUT":
            self._logout(start.tag)
        elif name == "STARTTLS":
            self._starttls(start.tag)
        elif name in _AUTHENTICATED_COMMANDS:
            self._tagged(start.tag, "BAD", f"{name} is not allowed before login")
        else:
            self._tagged(start.tag, "BAD", f"Unknown command {name}")

    def _authenticated(self, line: Line, start: CommandStart) -> None:
        name = start.name
        if name in ("LOGIN", "AUTHENTICATE", "STARTTLS"):
            if line.literal is not None:
                self._framer.reject_literal()
            self._tagged(start.tag, "BAD", f"{name} is not allowed after login")
        elif name == "APPEND":
            self._begin_append(line, start)
        else:
            self._begin_collect(line, start)

    # -- collected commands ---------------------------------------------------------

    def _begin_collect(self, line: Line, start: CommandStart, *, append_mailbox: bool = False) -> None:
        cmd = _Collect(start, [start.rest], size=len(line.data), append_mailbox=append_mailbox)
        self._cmd = cmd
        self._collect_literal_or_finish(cmd, line.literal)

    def _collect_fragment(self, cmd: _Collect, line: Line) -> None:
        if cmd.append_mailbox:  # the mailbox literal of an APPEND is in: stream the rest
            self._cmd = None
            self._append(cmd.start, cmd.literals[0], astring(cmd.literals[0]), line.data, line.literal)
            return
        cmd.fragments.append(line.data)
        cmd.size += len(line.data)
        self._collect_literal_or_finish(cmd, line.literal)

    def _collect_literal_or_finish(self, cmd: _Collect, literal: LiteralSpec | None) -> None:
        if literal is None:
            self._cmd = None
            self._dispatch_collected(cmd)
            return
        cmd.size += literal.size
        limit = self.limits.max_literal
        if literal.size > limit or cmd.size > MAX_COLLECTED:
            self._cmd = None
            self._framer.reject_literal()
            self._tagged(cmd.start.tag, "NO", f"[TOOBIG] Literal too large (limit {limit} bytes)")
            return
        cmd.current = bytearray()
        self._framer.accept_literal()
        if literal.sync:
            self._send(b"+ Ready for literal data\r\n")

    def _dispatch_collected(self, cmd: _Collect) -> None:
        try:
            args: list[Token] | None = parse_arguments(cmd.fragments, cmd.literals)
        except ParseError as e:
            if self.phase is Phase.NOT_AUTHENTICATED:
                self._tagged(cmd.start.tag, "BAD", f"Invalid arguments: {e}")
                return
            args = None  # relayed as it is: the backend explains what is wrong
        if self.phase is Phase.NOT_AUTHENTICATED:
            try:
                _PRE_LOGIN[cmd.start.name](self, cmd.start.tag, args)
            except ParseError as e:
                self._tagged(cmd.start.tag, "BAD", f"Invalid arguments: {e}")
            return
        _HANDLERS.get(cmd.start.name, ClientSession._to_selected)(self, cmd, args)

    # -- pre-login commands --------------------------------------------------------------

    def _pre_login_caps(self) -> list[str]:
        p = self.config.proxy
        return capabilities.pre_login(
            tls_available=self.ctx.server_tls is not None,
            tls_active=self._tls_active(),
            plaintext_allowed=p.allow_plaintext_login,
            login_referrals=p.login_referrals,
            mailbox_referrals=p.referrals != "never",
        )

    def _post_login_caps(self) -> list[str]:
        conn = self._conns.get(self.home or "")
        caps = capabilities.post_login(sorted(conn.capabilities) if conn is not None else [],
                                       mailbox_referrals=self.config.proxy.referrals != "never")
        # A cross-server MOVE removes the source messages by UID: no MOVE if a backend lacks UIDPLUS.
        if any("UIDPLUS" not in c for c in self.ctx.backend_caps.values()):
            caps = [c for c in caps if c.upper() != "MOVE"]
        return caps

    def _tls_active(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def _plaintext_ok(self) -> bool:
        return self.config.proxy.allow_plaintext_login or self._tls_active()

    def _id_command(self, tag: bytes, args: list[Token] | None) -> None:
        self._send(b'* ID ("name" "referral-proxy" "version" %s)\r\n' % quoted(__version__.encode()))
        self._tagged(tag, "OK", "ID completed.")

    def _starttls(self, tag: bytes) -> None:
        if self.ctx.server_tls is None or self._tls_active():
            self._tagged(tag, "BAD", "STARTTLS is not available")
            return
        # Anything the client pipelined after STARTTLS was sent in clear text and
        # could be an injection: drop it (the same defence as Dovecot's and Postfix's).
        self._tagged(tag, "OK", "Begin TLS negotiation now.")
        self._framer = Framer(self.limits.max_line)
        self.transport.startTLS(self.ctx.server_tls)

    def _login_command(self, tag: bytes, args: list[Token] | None) -> None:
        if args is None or len(args) != 2:
            raise ParseError("LOGIN takes a user name and a password")
        if not self._plaintext_ok():
            self._tagged(tag, "NO", "[PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first")
            return
        user = astring_value(args[0]).decode("utf-8", "replace")
        password = astring_value(args[1]).decode("utf-8", "replace")
        self._start_login(tag, Credentials(user=user, password=password))

    def _authenticate_command(self, tag: bytes, args: list[Token] | None) -> None:
        if not args:
            raise ParseError("AUTHENTICATE needs a mechanism")
        mechanism = astring_value(args[0]).upper()
        if mechanism != b"PLAIN":
            self._tagged(tag, "NO", "Unsupported authentication mechanism")
            return
        if not self._plaintext_ok():
            self._tagged(tag, "NO", "[PRIVACYREQUIRED] Plaintext authentication is disabled; use STARTTLS first")
            return
        if len(args) > 2:
            raise ParseError("too many arguments")
        if len(args) == 2:
            self._sasl_plain(tag, astring_value(args[1]))
        else:
            self._sasl_tag = tag
            self._send(b"+ \r\n")

    def _sasl_response(self, line: Line) -> None:
        tag, self._sasl_tag = self._sasl_tag, None
        assert tag is not None
        if line.literal is not None:
            self._framer.reject_literal()
            self._tagged(tag, "BAD", "Invalid SASL response")
        elif line.data.strip() == b"*":
            self._tagged(tag, "BAD", "Authentication cancelled")
        else:
            self._sasl_plain(tag, line.data.strip())

    def _sasl_plain(self, tag: bytes, blob: bytes) -> None:
        try:
            decoded = base64.b64decode(b"" if blob == b"=" else blob, validate=True)
            authzid, authcid, password = decoded.split(b"\0")
            creds = Credentials(
                user=authcid.decode("utf-8"), password=password.decode("utf-8"), authzid=authzid.decode("utf-8"),
            )
        except (binascii.Error, ValueError, UnicodeDecodeError):
            self._tagged(tag, "BAD", "Invalid SASL PLAIN response")
            return
        self._start_login(tag, creds)

    def _start_login(self, tag: bytes, creds: Credentials) -> None:
        self._block("login")
        d = defer.ensureDeferred(self._login(tag, creds))
        d.addErrback(lambda f: log.failure("session {id}: login crashed", f, id=self.id))

    async def _login(self, tag: bytes, creds: Credentials) -> None:
        user = self.map.canonical(creds.authzid or creds.user)  # routing, placements, INUSE, logs: one name
        route = self.map.home(user)
        proto = None
        failure: BackendError | None = None
        for name in route.backends:
            try:
                proto = await self.ctx.connect(self.config.backends[name], creds)
                break
            except AuthenticationFailed as e:
                failure = e
                break
            except BackendError as e:
                failure = e  # a replica may still answer
        if self.phase is Phase.LOGOUT:  # the client left meanwhile
            if proto is not None:
                proto.logout()
            return
        if proto is None:
            if isinstance(failure, AuthenticationFailed):
                log.info("session {id}: login of {user} refused by backend", id=self.id, user=user)
                start = failure.response.start
                if start.code:  # the backend's own reason, e.g. [AUTHENTICATIONFAILED] or [UNAVAILABLE]
                    self._send(b"%s %s\r\n" % (tag, completion_text(start).encode()))
                else:
                    self._tagged(tag, "NO", "[AUTHENTICATIONFAILED] " + (start.text.decode("utf-8", "replace")
                                                                          or "Authentication failed."))
            else:
                log.warn("session {id}: no backend for {user}: {why}", id=self.id, user=user, why=str(failure))
                self._tagged(tag, "NO", "[UNAVAILABLE] Mail server temporarily unavailable")
            self._unblock()
            return
        backend_config = self.config.backends[proto.name]
        if self.config.proxy.login_referrals and backend_config.login_referral and referrals.referable(self.config, backend_config):
            proto.logout()  # the credentials are good: send the client to its server (RFC 2221)
            url = referrals.login_url(self.config, backend_config, user)
            log.info("session {id}: {user} referred to {url}", id=self.id, user=user, url=url)
            self._send(referrals.referral(tag, [url], f"Log in to {backend_config.url_host} directly"))
            self._unblock()
            return
        self.user, self._credentials, self.home = user, creds, proto.name
        self._attach(proto)
        self.phase = Phase.AUTHENTICATED
        self.referral_aware = self.config.proxy.referrals == "always"
        self._cancel_login_timer()
        log.info("session {id}: {user} logged in on {backend}", id=self.id, user=user, backend=proto.name)
        self._tagged(tag, "OK", f"[CAPABILITY {' '.join(self._post_login_caps())}] Logged in")
        self._unblock()

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.phase is Phase.NOT_AUTHENTICATED:
            self._send(b"* BYE Autologout; no login in time\r\n")
            self._close()

    def _cancel_login_timer(self) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None

    def _logout(self, tag: bytes) -> None:
        self._send(b"* BYE Logging out\r\n")
        self._tagged(tag, "OK", "Logout completed.")
        self._logout_backends()
        self._close()

    # -- backend connections ----------------------------------------------------------

    def _attach(self, proto: BackendProtocol) -> None:
        """Add *proto* to the session's connections, each side the other's producer."""
        self._conns[proto.name] = proto
        self.ctx.backend_caps[proto.name] = proto.capabilities
        proto.sink = self
        if not self._backends_producer.transports:
            self.transport.registerProducer(self._backends_producer, True)
        self._backends_producer.add(proto.transport)
        assert self._gate is not None
        proto.transport.registerProducer(PeerPause(self._gate, f"backend:{proto.name}"), True)

    def _ready(self, name: str) -> BackendProtocol | None:
        """The open connection to *name*, if there is one."""
        conn = self._conns.get(name)
        return conn if conn is not None and not conn.closed else None

    def _credentials_for(self, backend: BackendConfig) -> Credentials:
        """The user's own credentials, or the backend's master user acting as the user."""
        assert self._credentials is not None and self.user is not None
        if backend.master_user is not None and backend.master_password is not None:
            return Credentials(user=backend.master_user, password=backend.master_password, authzid=self.user)
        return self._credentials

    async def _connection(self, route: Route | str) -> BackendProtocol:
        """An authenticated connection to the route's backend, opened on first use."""
        names = (route,) if isinstance(route, str) else route.backends
        last: BackendError | None = None
        for name in names:
            conn = self._ready(name)
            if conn is not None:
                return conn
            try:
                if name not in self._connecting:
                    cfg = self.config.backends[name]
                    self._connecting[name] = defer.ensureDeferred(self.ctx.connect(cfg, self._credentials_for(cfg)))
                try:
                    conn = await self._connecting[name]
                finally:
                    self._connecting.pop(name, None)
            except AuthenticationFailed as e:
                raise BackendUnavailable(f"backend {name} refused the login of {self.user}") from e
            except BackendError as e:
                last = e
                continue
            if self.phase is Phase.LOGOUT:
                conn.logout()
                raise BackendUnavailable("session closed")
            self._attach(conn)
            log.info("session {id}: {user} also connected to {backend}", id=self.id, user=self.user, backend=name)
            return conn
        raise last or BackendUnavailable("no backend")

    def _busy_except(self, conn: BackendProtocol | None) -> bool:
        return any(c.busy for c in self._conns.values() if c is not conn)

    def _quiet(self, conn: BackendProtocol | None) -> defer.Deferred[None]:
        """Fires once no backend but *conn* has a command in flight (None: no backend at all).

        Responses of two backends would interleave on the client's connection;
        commands to one backend may still be pipelined.
        """
        def ready() -> bool:
            return not self._busy_except(conn) and (conn is not None or not any(c.busy for c in self._conns.values()))

        if ready():
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append((conn, d))
        return d

    def _check_quiet(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for conn, d in waiters:
            if not self._busy_except(conn) and (conn is not None or not any(c.busy for c in self._conns.values())):
                d.callback(None)
            else:
                self._idle_waiters.append((conn, d))

    async def _prepare(self, conn: BackendProtocol) -> None:
        """Replay what the client ENABLEd on a connection that has not seen it."""
        missing = [e for e in self._enabled if e not in conn.enabled]
        if missing:
            await conn.command(b"ENABLE " + b" ".join(missing))
            conn.enabled.update(missing)

    def _fast(self, name: str) -> BackendProtocol | None:
        """The connection to relay to at once, if nothing has to happen first."""
        conn = self._ready(name)
        if conn is None or self._busy_except(conn) or any(e not in conn.enabled for e in self._enabled):
            return None
        return conn

    # -- relaying ---------------------------------------------------------------------

    def _relay(self, conn: BackendProtocol, cmd: _Collect, after: Callable[[ResponseStart], None] | None = None,
               name: str | None = None) -> None:
        """Send a whole collected command to *conn* under the proxy's tag."""
        ptag = conn.next_tag()
        tag = cmd.start.tag
        conn.expect(ptag, lambda start, raw: self._relayed_done(conn, tag, ptag, start, raw, after))
        name = name or cmd.start.name
        head = ptag + b" " + name.encode() + (b" " + cmd.fragments[0] if cmd.fragments[0] else b"")
        parts = [head] + cmd.fragments[1:]
        if name == "IDLE":
            self._idle = (tag, conn)
            conn.on_continuation = lambda text: self._send(b"+ " + text + b"\r\n")
        if not cmd.literals:
            conn.write(head + b"\r\n")
            return
        if "LITERAL+" in conn.capabilities:
            out = []
            for part, lit in zip(parts, cmd.literals):
                out += [part, b"{%d+}\r\n" % len(lit), lit]
            out += [parts[-1], b"\r\n"]
            conn.write(b"".join(out))
            return
        # A backend without LITERAL+: announce each literal and wait for its "+".
        self._block("literal")
        pending = list(zip(parts, cmd.literals))

        def send_next() -> None:
            if not pending:
                conn.write(parts[-1] + b"\r\n")
                self._unblock()
                return
            part, lit = pending.pop(0)
            conn.on_continuation = lambda _text: (conn.write(lit), send_next())
            conn.write(part + b"{%d}\r\n" % len(lit))

        send_next()

    def _relayed_done(self, conn: BackendProtocol, tag: bytes, ptag: bytes, start: ResponseStart, raw: bytes,
                      after: Callable[[ResponseStart], None] | None) -> None:
        if self._idle is not None and self._idle[0] == tag:
            self._idle = None
        if start.tag is None:  # the connection is lost
            if not self._session_dies_with(conn):
                self._tagged(tag, "NO", "[UNAVAILABLE] Mail server connection lost")
        else:
            self._out.write(conn, tag + raw[len(ptag):])
            if after is not None:
                after(start)
        if self._blocked == "literal":
            conn.on_continuation = None
            self._unblock()  # the backend refused before all literals were sent
        self._check_quiet()

    def _relay_to(self, cmd: _Collect, route: Route | str, after: Callable[[ResponseStart], None] | None = None,
                  name: str | None = None) -> None:
        """Relay to the route's backend: at once if it is ready, else once it is."""
        first = route if isinstance(route, str) else route.primary
        conn = self._fast(first)
        if conn is not None:
            self._relay(conn, cmd, after, name)
            return

        async def later() -> None:
            conn = await self._connection(route)
            await self._quiet(conn)
            await self._prepare(conn)
            self._relay(conn, cmd, after, name)

        self._run(cmd.start.tag, later())

    # -- command handlers (post-login) -------------------------------------------------

    def _mailbox(self, args: list[Token] | None, index: int) -> bytes | None:
        if args is None or len(args) <= index or not isinstance(args[index], (Atom, String)):
            return None
        return args[index].value  # type: ignore[union-attr]

    def _route_of(self, mailbox: bytes) -> Route:
        assert self.user is not None
        return self.map.lookup(self.user, mailbox.decode("utf-8", "surrogateescape"))

    def _refers(self, route: Route) -> bool:
        """In a referral-aware session, a mailbox on another backend is referred, not proxied."""
        return (
            self.referral_aware
            and route.primary != self.home
            and referrals.referable(self.config, self.config.backends[route.primary])
        )

    def _in_use(self, tag: bytes, *mailboxes: bytes) -> bool:
        """A mailbox being moved between servers: NO [INUSE] until it is in its new place."""
        assert self.user is not None
        for m in mailboxes:
            if self.map.reserved(self.user, m.decode("utf-8", "surrogateescape")):
                self._tagged(tag, "NO", "[INUSE] Mailbox is being moved to another server; try again shortly")
                return True
        return False

    def _refer(self, tag: bytes, route: Route, mailbox: bytes) -> None:
        assert self.user is not None
        self._send(referrals.referral(tag, referrals.mailbox_urls(self.config, route, self.user, mailbox)))

    def _to_selected(self, cmd: _Collect, args: list[Token] | None = None) -> None:
        """Commands of the selected mailbox (and anything unknown): where the mailbox is selected."""
        assert self.home is not None
        self._relay_to(cmd, self.selected or self.home)

    def _to_home(self, cmd: _Collect, args: list[Token] | None) -> None:
        assert self.home is not None
        self._relay_to(cmd, self.home)

    def _target(self, cmd: _Collect, args: list[Token] | None, index: int) -> tuple[bytes, Route] | None:
        """The mailbox argument and its route, or None when the command was answered here
        (no such argument: relayed for the backend to explain; a mailbox being moved: INUSE)."""
        mailbox = self._mailbox(args, index)
        if mailbox is None:
            self._to_selected(cmd)
            return None
        if self._in_use(cmd.start.tag, mailbox):
            return None
        return mailbox, self._route_of(mailbox)

    def _by_mailbox(self, cmd: _Collect, args: list[Token] | None) -> None:
        """CREATE, DELETE, STATUS, SUBSCRIBE ...: to the backend that owns the mailbox."""
        target = self._target(cmd, args, 0)
        if target is None:
            return
        mailbox, route = target
        if self._refers(route):
            return self._refer(cmd.start.tag, route, mailbox)
        self._relay_to(cmd, route)

    def _select(self, cmd: _Collect, args: list[Token] | None) -> None:
        """SELECT / EXAMINE: the selected state moves to the mailbox's backend."""
        target = self._target(cmd, args, 0)
        if target is None:
            return
        mailbox, route = target
        refer = self._refers(route)
        conn = self._fast(route.primary)
        self.selected_mailbox = None if refer else mailbox
        if not refer and conn is not None and self.selected in (None, conn.name):
            self.selected = conn.name
            self._relay(conn, cmd, self._select_done(conn))
            return

        async def switch() -> None:
            conn = None if refer else await self._connection(route)
            await self._quiet(None)
            old = self._ready(self.selected) if self.selected else None
            if old is not None and old is not conn:
                # A failed or referred SELECT leaves no mailbox selected (RFC 3501 6.3.1).
                await self._unselect(old)
            if refer:
                self.selected = None
                return self._refer(cmd.start.tag, route, mailbox)
            assert conn is not None
            await self._prepare(conn)
            self.selected = conn.name
            self._relay(conn, cmd, self._select_done(conn))

        self._run(cmd.start.tag, switch())

    def _select_done(self, conn: BackendProtocol) -> Callable[[ResponseStart], None]:
        def done(start: ResponseStart) -> None:
            if start.status == "NO" and self.selected == conn.name:
                self.selected = None
                self.selected_mailbox = None
        return done

    async def _unselect(self, conn: BackendProtocol) -> None:
        """Leave the mailbox selected on *conn* without expunging it (never CLOSE)."""
        result = await conn.deselect()
        for r in result.responses:
            if r.start.code != "CLOSED":
                self._out.write(conn, r.raw)
        if b"QRESYNC" in self._enabled:
            self._send(b"* OK [CLOSED] Previous mailbox closed.\r\n")

    def _closed_mailbox(self, cmd: _Collect, args: list[Token] | None) -> None:
        """CLOSE / UNSELECT: relayed where the mailbox is selected; the session is unselected after."""
        def done(start: ResponseStart) -> None:
            if start.status == "OK":
                self.selected = None
                self.selected_mailbox = None
        assert self.home is not None
        self._relay_to(cmd, self.selected or self.home, done)

    def _copy(self, cmd: _Collect, args: list[Token] | None) -> None:
        """COPY / MOVE: relayed when the destination lives with the selected mailbox, else carried out here."""
        target = self._target(cmd, args, 1)
        if target is None or args is None:
            return
        mailbox, route = target
        if "MOVE" in cmd.start.name and self.selected_mailbox and self._in_use(cmd.start.tag, self.selected_mailbox):
            return  # a message moved out of a mailbox being moved would exist twice
        source = self.selected or self.home
        if route.primary == source or source in route.backends:
            return self._relay_to(cmd, source)  # type: ignore[arg-type]
        if self._refers(route):
            return self._refer(cmd.start.tag, route, mailbox)
        message_set = args[0].value if isinstance(args[0], Atom) else b""
        self._run(cmd.start.tag, self._copy_across(cmd, message_set, mailbox, route))

    async def _copy_across(self, cmd: _Collect, message_set: bytes, mailbox: bytes, route: Route) -> None:
        name = cmd.start.name
        src = self._ready(self.selected) if self.selected else None
        if src is None:
            raise _Refused("BAD No mailbox selected")
        await self._quiet(None)
        dst = await self._fresh(route)
        try:
            outcome = await copy_across(src, message_set, name.startswith("UID "), dst, mailbox, "MOVE" in name,
                                        mailbox_map=self.map, user=self.user or "",
                                        source_mailbox=self.selected_mailbox or b"", clock=self.ctx.reactor)
        except TransferError as e:
            text = str(e)
            raise _Refused(text if text.startswith(("NO ", "BAD ")) else "NO " + text) from None
        finally:
            dst.logout()
        for raw in outcome.untagged:
            self._out.write(src, raw)
        self._tagged(cmd.start.tag, outcome.status, outcome.text)

    async def _fresh(self, route: Route | str) -> BackendProtocol:
        """A NEW connection of the session's user, for a transfer (never the session's own)."""
        names = (route,) if isinstance(route, str) else route.backends
        last: BackendError | None = None
        for name in names:
            cfg = self.config.backends[name]
            try:
                return await self.ctx.connect(cfg, self._credentials_for(cfg))
            except BackendError as e:
                last = e
        raise last or BackendUnavailable("no backend")

    def _rename(self, cmd: _Collect, args: list[Token] | None) -> None:
        """RENAME on one backend is relayed (placements follow); across backends it is referred."""
        old, new = self._mailbox(args, 0), self._mailbox(args, 1)
        if old is None or new is None:
            return self._to_selected(cmd)
        old_route, new_route = self._route_of(old), self._route_of(new)
        if self.referral_aware and (self._refers(old_route) or self._refers(new_route)):
            assert self.user is not None
            urls = [referrals.mailbox_urls(self.config, old_route, self.user, old)[0],
                    referrals.mailbox_urls(self.config, new_route, self.user, new)[0]]
            self._send(referrals.referral(cmd.start.tag, urls))
            return
        if self._in_use(cmd.start.tag, old, new):
            return
        if old_route.primary != new_route.primary:
            return self._run(cmd.start.tag, self._rename_across(cmd, old, new, old_route, new_route))
        self._run(cmd.start.tag, self._rename_here(cmd, old, new, old_route))

    async def _rename_here(self, cmd: _Collect, old: bytes, new: bytes, route: Route) -> None:
        """RENAME on one backend: mover.rename_here holds the names and lets placements follow."""
        conn = await self._connection(route)
        await self._quiet(None)
        outcome = await rename_here(self.map, self.user or "", conn, old.decode("utf-8", "surrogateescape"),
                                    new.decode("utf-8", "surrogateescape"))
        for raw in outcome.untagged:
            self._out.write(conn, raw)
        self._send(b"%s %s\r\n" % (cmd.start.tag, outcome.completion.encode("utf-8", "replace")))

    async def _rename_across(self, cmd: _Collect, old: bytes, new: bytes, old_route: Route, new_route: Route) -> None:
        """RENAME to a name another backend owns: the journaled move of transfer.Mover."""
        assert self.user is not None
        await self._quiet(None)
        sep = self.map.separator.encode()
        if self.selected_mailbox is not None and (
                self.selected_mailbox == old or self.selected_mailbox.startswith(old + sep)):
            raise _Refused("NO [INUSE] Close (or unselect) the mailbox before moving it to another server")
        mover = Mover(self.map, self._fresh, self.user, clock=self.ctx.reactor, answer_within=ANSWER_WITHIN)
        try:
            result = await mover.rename(old.decode("utf-8", "surrogateescape"), new.decode("utf-8", "surrogateescape"),
                                        old_route.primary, new_route.primary)
        except MoveIncomplete as e:
            log.warn("session {id}: {user} RENAME {old} {new}: {why}", id=self.id, user=self.user, old=old, new=new,
                     why=str(e))
            self._tagged(cmd.start.tag, "OK", "Rename completed; the old mailbox is still being emptied.")
            return
        except TransferError as e:
            text = str(e)
            raise _Refused(text if text.startswith(("NO ", "BAD ")) else "NO " + text) from None
        log.info("session {id}: {user} moved {old} to {new} on {dst}: {n} mailbox(es), {m} message(s)", id=self.id,
                 user=self.user, old=old, new=new, dst=new_route.primary, n=result.mailboxes, m=result.messages)
        self._tagged(cmd.start.tag, "OK", f"Rename completed ({result.mailboxes} mailbox(es), "
                                          f"{result.messages} message(s) moved to another server"
                                          f"{'; the old mailbox is still being emptied' if result.pending else ''}).")

    def _enable(self, cmd: _Collect, args: list[Token] | None) -> None:
        """ENABLE: relayed, and remembered for connections opened later."""
        for a in args or ():
            if isinstance(a, Atom) and a.value.upper() not in self._enabled:
                self._enabled.append(a.value.upper())
        target = self.selected or self.home
        assert target is not None

        def done(start: ResponseStart) -> None:
            conn = self._ready(target)
            if start.status == "OK" and conn is not None:
                conn.enabled.update(self._enabled)

        # Relayed as it is (not through _fast, which would replay it first).
        conn = self._ready(target)
        if conn is not None and not self._busy_except(conn):
            self._relay(conn, cmd, done)
        else:
            self._relay_to(cmd, target, done)

    def _capability(self, cmd: _Collect, args: list[Token] | None) -> None:
        async def answer() -> None:
            await self._quiet(None)  # in order, after the relayed commands before it
            self._send(b"* CAPABILITY %s\r\n" % " ".join(self._post_login_caps()).encode())
            self._tagged(cmd.start.tag, "OK", "Capability completed.")

        if not any(c.busy for c in self._conns.values()):
            self._send(b"* CAPABILITY %s\r\n" % " ".join(self._post_login_caps()).encode())
            self._tagged(cmd.start.tag, "OK", "Capability completed.")
        else:
            self._run(cmd.start.tag, answer())

    def _logout_command(self, cmd: _Collect, args: list[Token] | None) -> None:
        async def answer() -> None:
            await self._quiet(None)
            self._logout(cmd.start.tag)

        self._run(cmd.start.tag, answer())

    # -- LIST / LSUB / RLIST / RLSUB --------------------------------------------------------

    def _list(self, cmd: _Collect, args: list[Token] | None) -> None:
        name = cmd.start.name
        kind = "LSUB" if name in ("LSUB", "RLSUB") else "LIST"
        remote_option = (
            name == "LIST" and args is not None and len(args) > 0 and isinstance(args[0], ParenList)
            and any(isinstance(t, Atom) and t.value.upper() == b"REMOTE" for t in args[0].items)
        )
        if (name in ("RLIST", "RLSUB") or remote_option) and self.config.proxy.referrals == "aware":
            self.referral_aware = True
        if args is None:
            return self._relay_to(cmd, self.home, name=kind)  # type: ignore[arg-type]
        remote = name in ("RLIST", "RLSUB") or remote_option or not self.referral_aware
        assert self.user is not None and self.home is not None
        backends = self.map.backends_for(self.user) if remote else [self.home]
        if listing.is_basic_list(args):
            reference, pattern = (astring_value(a) for a in args)
            if pattern == b"":  # the hierarchy delimiter: any backend knows it
                return self._relay_to(cmd, self.home, name=kind)
            self._run(cmd.start.tag, self._merged_list(cmd.start.tag, kind, reference, pattern, backends))
        else:
            self._run(cmd.start.tag, self._filtered_list(cmd, kind, backends, remote_option))

    async def _gather(self, backends: list[str], command: bytes) -> list[tuple[str, Any]]:
        """Run *command* on every backend; their LIST/LSUB/STATUS answers, others relayed."""
        conns = [await self._connection(b) for b in backends]
        await self._quiet(None)
        results = []
        for conn in conns:
            result = await conn.command(command)
            if not result.ok:  # the backend's own answer, BAD or NO, as a direct client would get it
                raise _Refused(completion_text(result.start))
            for r in result.responses:
                results.append((conn.name, r))
        return results

    def _owner(self, name: str) -> str:
        assert self.user is not None
        return self.map.lookup(self.user, name).primary

    async def _merged_list(self, tag: bytes, kind: str, reference: bytes, pattern: bytes, backends: list[str]) -> None:
        entries = []
        for backend, r in await self._gather(backends, kind.encode() + b' "" "*"'):
            if r.start.name == kind:
                fragments, literals = r.arguments
                try:
                    entries.append(listing.parse_list_entry(fragments, literals, backend))
                except ParseError:
                    log.warn("session {id}: unparsable {kind} from {b}", id=self.id, kind=kind, b=backend)
            else:
                self._out.write(self._conns.get(backend) or self, r.raw)
        separator = self.map.separator
        merged = listing.merge(entries, self._owner, separator, placeholders=(kind == "LIST" or b"%" in pattern))
        out = [listing.format_entry(kind.encode(), e) for e in listing.select(merged, reference, pattern, separator)]
        self._send(b"".join(out) + b"%s OK %s completed.\r\n" % (tag, kind.encode()))

    async def _filtered_list(self, cmd: _Collect, kind: str, backends: list[str], remote_option: bool) -> None:
        """LIST-EXTENDED forms: the command as sent, on every backend, each mailbox from its owner."""
        text = kind.encode() + b" " + cmd.fragments[0]
        if cmd.literals:
            text = kind.encode() + b" " + b"".join(
                f + b"{%d+}\r\n" % len(lit) + lit for f, lit in zip(cmd.fragments, cmd.literals)) + cmd.fragments[-1]
        out, seen = [], set()
        for backend, r in await self._gather(backends, text):
            fragments, literals = r.arguments
            if r.start.name in ("LIST", "LSUB"):
                try:
                    entry = listing.parse_list_entry(fragments, literals, backend)
                except ParseError:
                    continue
                if self._owner(entry.text) != backend or entry.text in seen:
                    continue
                seen.add(entry.text)
                if remote_option and backend != self.home:
                    out.append(listing.add_flag(r.raw, b"\\Remote"))
                else:
                    out.append(r.raw)
            elif r.start.name == "STATUS":
                try:
                    mailbox = astring_value(parse_arguments(fragments, literals)[0])
                except (ParseError, IndexError):
                    continue
                if self._owner(mailbox.decode("utf-8", "surrogateescape")) == backend:
                    out.append(r.raw)
            else:
                out.append(r.raw)
        self._send(b"".join(out) + b"%s OK %s completed.\r\n" % (cmd.start.tag, kind.encode()))

    # -- APPEND (streamed; the work is in append.py) -------------------------------------

    def _begin_append(self, line: Line, start: CommandStart) -> None:
        if not start.rest.strip() and line.literal is not None and line.literal.size <= self.limits.max_line:
            # The mailbox name itself is a literal: collect it, then stream the messages.
            self._begin_collect(line, start, append_mailbox=True)
            return
        token, rest = split_mailbox(start.rest)
        try:
            mailbox: bytes | None = astring_value(parse_arguments([token], [])[0])
        except (ParseError, IndexError):
            mailbox = None
        self._append(start, mailbox, token, rest, line.literal)

    def _append(self, start: CommandStart, mailbox: bytes | None, token: bytes, rest: bytes,
                literal: LiteralSpec | None) -> None:
        """Route an APPEND to the mailbox's backend and start streaming it there."""
        assert self.home is not None
        if mailbox is not None and self.map.reserved(self.user or "", mailbox.decode("utf-8", "surrogateescape")):
            if literal is not None:
                self._framer.reject_literal()
            self._tagged(start.tag, "NO", "[INUSE] Mailbox is being moved to another server; try again shortly")
            return
        route = self._route_of(mailbox) if mailbox is not None else Route((self.home,))
        if mailbox is not None and self._refers(route):
            if literal is not None:
                self._framer.reject_literal()  # refused before the client sends any message
            return self._refer(start.tag, route, mailbox)

        def go(conn: BackendProtocol) -> None:
            cmd = AppendCommand(self, start.tag, conn, token)
            self._cmd = cmd
            cmd.begin(rest, literal)

        conn = self._fast(route.primary)
        if conn is not None:
            return go(conn)

        async def later() -> None:
            try:
                conn = await self._connection(route)
                await self._quiet(conn)
                await self._prepare(conn)
            except BaseException:
                if literal is not None:
                    self._framer.reject_literal()
                raise
            go(conn)

        self._run(start.tag, later())

    def _append_ended(self, cmd: AppendCommand) -> None:
        """The client has sent all of *cmd* (or the rest will be drained)."""
        if self._cmd is cmd:
            self._cmd = None

    def _append_answered(self, cmd: AppendCommand) -> None:
        self._check_quiet()

    async def _remove_appended(self, backend: str, mailbox_token: bytes, uids: list[int]) -> BaseException | None:
        """Remove messages an emulated MULTIAPPEND saved, on a connection of its own
        (the session's may have another mailbox selected). None when done."""
        cfg = self.config.backends[backend]
        try:
            conn = await self.ctx.connect(cfg, self._credentials_for(cfg))
        except BackendError as e:
            return e
        try:
            await remove_appended(conn, mailbox_token, uids)
            return None
        except Exception as e:
            return e
        finally:
            conn.logout()

    # -- the backends' side (ResponseSink) ------------------------------------------------

    def untagged(self, backend: BackendProtocol, start: ResponseStart | None, data: bytes, end: bool) -> None:
        self._out.write(backend, data, end)

    def _session_dies_with(self, conn: BackendProtocol) -> bool:
        """Losing the home backend or the one holding the selected mailbox ends the session."""
        return conn.name in (self.home, self.selected)

    def backend_lost(self, backend: BackendProtocol, reason: Failure) -> None:
        if self._conns.get(backend.name) is backend:
            del self._conns[backend.name]
        self._backends_producer.transports.discard(backend.transport)
        self._out.abandon(backend)
        if self.phase is Phase.LOGOUT:
            return
        log.warn("session {id}: backend {name} connection lost: {why}", id=self.id, name=backend.name,
                 why=reason.getErrorMessage())
        if self._idle is not None and self._idle[1] is backend:
            self._idle = None
        if self._session_dies_with(backend):
            if not backend.bye_received:
                self._send(b"* BYE Mail server connection lost\r\n")
            self._logout_backends()
            self._close()
        else:
            self._check_quiet()


_PRE_LOGIN: dict[str, Callable[[ClientSession, bytes, list[Token] | None], None]] = {
    "LOGIN": ClientSession._login_command,
    "AUTHENTICATE": ClientSession._authenticate_command,
    "ID": ClientSession._id_command,
}

# Where each command is handled after login; anything else goes to _to_selected.
_HANDLERS: dict[str, Callable[[ClientSession, _Collect, list[Token] | None], None]] = {
    "CAPABILITY": ClientSession._capability,
    "LOGOUT": ClientSession._logout_command,
    "SELECT": ClientSession._select,
    "EXAMINE": ClientSession._select,
    "CLOSE": ClientSession._closed_mailbox,
    "UNSELECT": ClientSession._closed_mailbox,
    "CREATE": ClientSession._by_mailbox,
    "DELETE": ClientSession._by_mailbox,
    "SUBSCRIBE": ClientSession._by_mailbox,
    "UNSUBSCRIBE": ClientSession._by_mailbox,
    "STATUS": ClientSession._by_mailbox,
    "GETQUOTAROOT": ClientSession._by_mailbox,
    "GETACL": ClientSession._by_mailbox,
    "SETACL": ClientSession._by_mailbox,
    "DELETEACL": ClientSession._by_mailbox,
    "LISTRIGHTS": ClientSession._by_mailbox,
    "MYRIGHTS": ClientSession._by_mailbox,
    "RENAME": ClientSession._rename,
    "COPY": ClientSession._copy,
    "MOVE": ClientSession._copy,
    "UID COPY": ClientSession._copy,
    "UID MOVE": ClientSession._copy,
    "LIST": ClientSession._list,
    "LSUB": ClientSession._list,
    "RLIST": ClientSession._list,
    "RLSUB": ClientSession._list,
    "ENABLE": ClientSession._enable,
    "NAMESPACE": ClientSession._to_home,
    "ID": ClientSession._to_home,
    "GETQUOTA": ClientSession._to_home,
    "SETQUOTA": ClientSession._to_home,
}

# Commands that need a logged-in session (answered BAD before login, not "unknown").
_AUTHENTICATED_COMMANDS = frozenset(_HANDLERS) | {
    "APPEND", "CHECK", "EXPUNGE", "SEARCH", "FETCH", "STORE", "UID FETCH", "UID STORE", "UID SEARCH",
    "UID EXPUNGE", "IDLE", "GETMETADATA", "SETMETADATA", "SORT", "THREAD", "UID SORT", "UID THREAD", "NOOP",
} - {"CAPABILITY", "LOGOUT", "ID"}
