"""One client's IMAP session: the state machine and the dispatch of every command.

Bytes from the client go through the codec's Framer; each command is either
answered here (CAPABILITY, LOGIN, STARTTLS, LOGOUT ...), collected whole and
relayed (every small command), or streamed to the backend as it arrives (APPEND,
whose message literals may be huge). Responses come back from the backend as raw
bytes and only the tag of the completion is rewritten.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import __version__, capabilities
from .backend import (
    AuthenticationFailed,
    BackendError,
    BackendProtocol,
    Credentials,
    set_nodelay,
)
from .config import BackendConfig, Config
from .imap.command import CommandStart, ParseError, astring_value, parse_arguments, parse_command_start, tag_of
from .imap.framing import NEED_DATA, Framer, Line, LineTooLong, LiteralData, LiteralEnd, LiteralSpec
from .imap.quoting import quoted
from .imap.response import ResponseStart
from .routing import MailboxMap

__all__ = ["ProxyContext", "ClientSession", "ReadGate"]

log = Logger()

# Synchronizing APPEND literals up to this size are accepted at once and sent to a
# LITERAL+ backend as non-synchronizing: one round trip saved per small message.
SMALL_SYNC_LITERAL = 64 * 1024
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
    sessions: set["ClientSession"] = field(default_factory=set)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)


class Phase(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    LOGOUT = "logout"


@implementer(IPushProducer)
class ReadGate:
    """Pauses reading from a transport while any reason holds.

    It is registered as the producer of the *other* connection, so a slow peer
    pauses this one (back-pressure), and the session adds its own reasons.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons and not getattr(self._transport, "disconnected", False):
                self._transport.resumeProducing()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    def pauseProducing(self) -> None:
        self.pause("peer")

    def resumeProducing(self) -> None:
        self.resume("peer")

    def stopProducing(self) -> None:
        pass


@dataclass
class _Collect:
    """A command gathered whole before it is handled or relayed."""

    start: CommandStart
    fragments: list[bytes]
    literals: list[bytes] = field(default_factory=list)
    current: bytearray | None = None  # the literal being received
    size: int = 0


@dataclass
class _Stream:
    """An APPEND being streamed to the backend fragment by fragment."""

    tag: bytes
    ptag: bytes
    started: bool = False  # something of it has been written to the backend
    waiting: LiteralSpec | None = None  # a literal announced to the backend, awaiting its "+"
    refusal: bytes | None = None  # our answer, when we cancelled the backend's command


class ClientSession(Protocol):
    """The server side of one client connection."""

    def __init__(self, context: ProxyContext) -> None:
        self.ctx = context
        self.config = context.config
        self.limits = context.config.proxy.limits
        self.id = context.next_id()
        self.phase = Phase.NOT_AUTHENTICATED
        self.user: str | None = None
        self.backend: BackendProtocol | None = None
        self._framer = Framer(self.limits.max_line)
        self._gate: ReadGate | None = None
        self._backend_gate: ReadGate | None = None
        self._cmd: _Collect | _Stream | None = None
        self._blocked: str | None = None
        self._stashed: Line | None = None  # a command waiting for the backend to go idle
        self._pumping = False
        self._sasl_tag: bytes | None = None  # AUTHENTICATE awaiting the client's response line
        self._idle: bytes | None = None  # client tag of a relayed IDLE
        self._relay_open = False  # an untagged response is being relayed (mid-literal)
        self._local_queue: list[bytes] = []
        self._login_timer: Any = None
        self._peer = "?"

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self._gate = ReadGate(self.transport)
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.ctx.sessions.add(self)
        self._login_timer = self.ctx.reactor.callLater(self.config.proxy.login_timeout, self._login_timed_out)
        log.info("session {id} from {peer}", id=self.id, peer=self._peer)
        caps = " ".join(self._pre_login_caps())
        self._send(b"* OK [CAPABILITY %s] %s referral-proxy ready.\r\n" % (caps.encode(), self.config.proxy.hostname.encode()))

    def dataReceived(self, data: bytes) -> None:
        self._framer.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.phase = Phase.LOGOUT
        self._cancel_login_timer()
        self.ctx.sessions.discard(self)
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.sink = None
            backend.logout()
        log.info("session {id} closed ({user})", id=self.id, user=self.user or "not logged in")

    def shutdown(self) -> None:
        """The proxy is stopping: tell the client, and log its backend out."""
        if self.phase is not Phase.LOGOUT:
            self._relay_open = False
            self._send(b"* BYE Server shutting down\r\n")
            if self.backend is not None:
                backend, self.backend = self.backend, None
                backend.sink = None
                backend.logout()
            self._close()

    def _close(self) -> None:
        self.phase = Phase.LOGOUT
        self.transport.loseConnection()

    # -- output --------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Write a response of the proxy's own, never inside a relayed one."""
        if self._relay_open:
            self._local_queue.append(data)
        else:
            self.transport.write(data)

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
                if self._stashed is not None:
                    line, self._stashed = self._stashed, None
                    self._line(line)
                    continue
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
            elif isinstance(cmd, _Stream):
                self._stream_fragment(cmd, event.data, event.literal)
        elif isinstance(event, LiteralData):
            if isinstance(cmd, _Collect):
                assert cmd.current is not None
                cmd.current += event.data
            elif isinstance(cmd, _Stream) and self.backend is not None:
                self.backend.write(event.data)
        elif isinstance(event, LiteralEnd):
            if isinstance(cmd, _Collect):
                assert cmd.current is not None
                cmd.literals.append(bytes(cmd.current))
                cmd.current = None
        elif isinstance(event, LineTooLong):
            self._line_too_long(event)

    def _line_too_long(self, event: LineTooLong) -> None:
        why = f"Command line too long (limit {event.limit} bytes)"
        cmd, self._cmd = self._cmd, None
        if event.first:
            self._tagged(tag_of(event.prefix) or b"*", "BAD", why)
        elif isinstance(cmd, _Collect):
            self._tagged(cmd.start.tag, "BAD", why)
        elif isinstance(cmd, _Stream):
            self._cancel_stream(cmd, b"%s BAD %s\r\n" % (cmd.tag, why.encode()))

    # -- a new command line ----------------------------------------------------------

    def _line(self, line: Line) -> None:
        if self._sasl_tag is not None:
            self._sasl_response(line)
            return
        if self._idle is not None and self.backend is not None:
            # DONE (or whatever the client sends) goes to the backend, which ends the IDLE.
            if line.literal is not None:
                self._framer.reject_literal()
            self.backend.write(line.data + b"\r\n")
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
        if name in ("CAPABILITY", "LOGOUT") and self.backend is not None and self.backend.busy:
            # Answer in order: after the relayed commands before it are complete.
            self._stashed = line
            self._block("drain")
            return
        if name == "CAPABILITY" and line.literal is None:
            self._send(b"* CAPABILITY %s\r\n" % " ".join(self._post_login_caps()).encode())
            self._tagged(start.tag, "OK", "Capability completed.")
        elif name == "LOGOUT" and line.literal is None:
            self._logout(start.tag)
        elif name in ("LOGIN", "AUTHENTICATE", "STARTTLS"):
            if line.literal is not None:
                self._framer.reject_literal()
            self._tagged(start.tag, "BAD", f"{name} is not allowed after login")
        elif name == "APPEND":
            self._begin_stream(line, start)
        else:
            self._begin_collect(line, start)

    # -- collected commands ---------------------------------------------------------

    def _begin_collect(self, line: Line, start: CommandStart) -> None:
        cmd = _Collect(start, [start.rest], size=len(line.data))
        self._cmd = cmd
        self._collect_literal_or_finish(cmd, line.literal)

    def _collect_fragment(self, cmd: _Collect, line: Line) -> None:
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
        name = cmd.start.name
        if self.phase is Phase.NOT_AUTHENTICATED:
            try:
                args = parse_arguments(cmd.fragments, cmd.literals)
                if name == "LOGIN":
                    self._login_command(cmd.start.tag, args)
                elif name == "AUTHENTICATE":
                    self._authenticate_command(cmd.start.tag, args)
                elif name == "ID":
                    self._id_command(cmd.start.tag)
            except ParseError as e:
                self._tagged(cmd.start.tag, "BAD", f"Invalid arguments: {e}")
            return
        self._relay_collected(cmd)

    # -- pre-login commands --------------------------------------------------------------

    def _pre_login_caps(self) -> list[str]:
        p = self.config.proxy
        return capabilities.pre_login(
            tls_available=self.ctx.server_tls is not None,
            tls_active=self._tls_active(),
            plaintext_allowed=p.allow_plaintext_login,
            login_referrals=p.login_referrals,
        )

    def _post_login_caps(self) -> list[str]:
        assert self.backend is not None
        return capabilities.post_login(sorted(self.backend.capabilities))

    def _tls_active(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def _plaintext_ok(self) -> bool:
        return self.config.proxy.allow_plaintext_login or self._tls_active()

    def _id_command(self, tag: bytes) -> None:
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

    def _login_command(self, tag: bytes, args: list[Any]) -> None:
        if len(args) != 2:
            raise ParseError("LOGIN takes a user name and a password")
        if not self._plaintext_ok():
            self._tagged(tag, "NO", "[PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first")
            return
        user = astring_value(args[0]).decode("utf-8", "replace")
        password = astring_value(args[1]).decode("utf-8", "replace")
        self._start_login(tag, Credentials(user=user, password=password))

    def _authenticate_command(self, tag: bytes, args: list[Any]) -> None:
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
        user = creds.authzid or creds.user
        route = self.ctx.mailbox_map.home(user)
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
                code = f"[{start.code}{' ' if start.code_args else ''}{start.code_args.decode('utf-8', 'replace')}] " if start.code else "[AUTHENTICATIONFAILED] "
                self._tagged(tag, "NO", code + (start.text.decode("utf-8", "replace") or "Authentication failed."))
            else:
                log.warn("session {id}: no backend for {user}: {why}", id=self.id, user=user, why=str(failure))
                self._tagged(tag, "NO", "[UNAVAILABLE] Mail server temporarily unavailable")
            self._unblock()
            return
        self._attach(proto)
        self.user = user
        self.phase = Phase.AUTHENTICATED
        self._cancel_login_timer()
        log.info("session {id}: {user} logged in on {backend}", id=self.id, user=user, backend=proto.name)
        self._tagged(tag, "OK", f"[CAPABILITY {' '.join(self._post_login_caps())}] Logged in")
        self._unblock()

    def _attach(self, proto: BackendProtocol) -> None:
        """Make *proto* the session's backend, each side the other's producer."""
        self.backend = proto
        proto.sink = self
        self._backend_gate = ReadGate(proto.transport)
        self.transport.registerProducer(self._backend_gate, True)
        assert self._gate is not None
        proto.transport.registerProducer(self._gate, True)

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
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.sink = None
            backend.logout()
        self._close()

    # -- relaying ---------------------------------------------------------------------

    def _relay_collected(self, cmd: _Collect) -> None:
        """Send a whole collected command to the backend under the proxy's tag."""
        backend = self.backend
        assert backend is not None
        ptag = backend.next_tag()
        tag = cmd.start.tag
        backend.expect(ptag, lambda start, raw: self._relayed_done(tag, ptag, start, raw))
        head = ptag + b" " + cmd.start.name.encode() + (b" " + cmd.fragments[0] if cmd.fragments[0] else b"")
        parts = [head] + cmd.fragments[1:]
        if cmd.start.name == "IDLE":
            self._idle = tag
            backend.on_continuation = lambda text: self._send(b"+ " + text + b"\r\n")
        if not cmd.literals:
            backend.write(head + b"\r\n")
            return
        if "LITERAL+" in backend.capabilities:
            out = []
            for part, lit in zip(parts, cmd.literals):
                out += [part, b"{%d+}\r\n" % len(lit), lit]
            out += [parts[-1], b"\r\n"]
            backend.write(b"".join(out))
            return
        # A backend without LITERAL+: announce each literal and wait for its "+".
        self._block("literal")
        pending = list(zip(parts, cmd.literals))

        def send_next() -> None:
            if not pending:
                backend.write(parts[-1] + b"\r\n")
                self._unblock()
                return
            part, lit = pending.pop(0)
            backend.on_continuation = lambda _text: (backend.write(lit), send_next())
            backend.write(part + b"{%d}\r\n" % len(lit))

        send_next()

    def _relayed_done(self, tag: bytes, ptag: bytes, start: ResponseStart, raw: bytes) -> None:
        if start.tag is None:  # connection lost: backend_lost says BYE
            return
        if self._idle == tag:
            self._idle = None
        self._send(tag + raw[len(ptag):])
        if self._blocked == "literal" and self.backend is not None:
            self.backend.on_continuation = None
            self._unblock()  # the backend refused before all literals were sent
        if self._blocked == "drain" and self.backend is not None and not self.backend.busy:
            self._unblock()

    # -- streamed APPEND -------------------------------------------------------------------

    def _begin_stream(self, line: Line, start: CommandStart) -> None:
        assert self.backend is not None
        ptag = self.backend.next_tag()
        cmd = _Stream(tag=start.tag, ptag=ptag)
        self._cmd = cmd
        self._stream_fragment(cmd, ptag + line.data[len(start.tag):], line.literal)

    def _stream_fragment(self, cmd: _Stream, data: bytes, literal: LiteralSpec | None) -> None:
        backend = self.backend
        assert backend is not None
        if literal is not None and literal.size > self.limits.max_message:
            self._framer.reject_literal()
            self._cancel_stream(
                cmd, b"%s NO [TOOBIG] Message too large (limit %d bytes)\r\n" % (cmd.tag, self.limits.max_message)
            )
            return
        if not cmd.started:
            cmd.started = True
            backend.expect(cmd.ptag, lambda start, raw: self._stream_done(cmd, start, raw))
        if literal is None:
            self._cmd = None
            backend.write(data + b"\r\n")
            return
        caps = backend.capabilities
        literal_plus = "LITERAL+" in caps or ("LITERAL-" in caps and literal.size <= 4096)
        if literal_plus and (not literal.sync or literal.size <= SMALL_SYNC_LITERAL):
            backend.write(data + literal.announce(sync=False) + b"\r\n")
            self._framer.accept_literal()
            if literal.sync:
                self._send(b"+ Ready for literal data\r\n")
            return
        # Let the backend decide before the client sends the data.
        cmd.waiting = literal
        self._block("literal")
        backend.on_continuation = lambda text: self._stream_continue(cmd, text)
        backend.write(data + literal.announce(sync=True) + b"\r\n")

    def _stream_continue(self, cmd: _Stream, text: bytes) -> None:
        literal, cmd.waiting = cmd.waiting, None
        assert literal is not None
        self._framer.accept_literal()
        if literal.sync:
            self._send(b"+ " + (text or b"Ready for literal data") + b"\r\n")
        self._unblock()

    def _cancel_stream(self, cmd: _Stream, answer: bytes) -> None:
        """Stop an APPEND the client cannot finish: nothing of it may be saved."""
        self._cmd = None
        if not cmd.started:
            self._send(answer)
            return
        cmd.refusal = answer
        # RFC 3502: a zero-length literal makes the server append nothing and fail.
        backend = self.backend
        assert backend is not None
        if "LITERAL+" in backend.capabilities:
            backend.write(b" {0+}\r\n\r\n")
        else:
            backend.on_continuation = lambda _text: backend.write(b"\r\n")
            backend.write(b" {0}\r\n")

    def _stream_done(self, cmd: _Stream, start: ResponseStart, raw: bytes) -> None:
        if start.tag is None:
            return
        if cmd.waiting is not None:
            # Refused before its literal: a sync client never sends it, a non-sync one's is drained.
            cmd.waiting = None
            self._framer.reject_literal()
            self._cmd = None
            if self.backend is not None:
                self.backend.on_continuation = None
            self._send(cmd.tag + raw[len(cmd.ptag):])
            self._unblock()
            return
        self._send(cmd.refusal if cmd.refusal is not None else cmd.tag + raw[len(cmd.ptag):])
        if self._blocked == "drain" and self.backend is not None and not self.backend.busy:
            self._unblock()

    # -- the backend's side (ResponseSink) ------------------------------------------------

    def untagged(self, start: ResponseStart | None, data: bytes, end: bool) -> None:
        self.transport.write(data)
        self._relay_open = not end
        if end and self._local_queue:
            queued, self._local_queue = self._local_queue, []
            self.transport.write(b"".join(queued))

    def backend_lost(self, backend: BackendProtocol, reason: Failure) -> None:
        if backend is not self.backend or self.phase is Phase.LOGOUT:
            return
        self.backend = None
        log.warn("session {id}: backend {name} connection lost: {why}", id=self.id, name=backend.name,
                 why=reason.getErrorMessage())
        self._relay_open = False
        if not backend.bye_received:
            self._send(b"* BYE Mail server connection lost\r\n")
        self._close()


# Commands that need a logged-in session (answered BAD before login, not "unknown").
_AUTHENTICATED_COMMANDS = frozenset({
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
    "STATUS", "APPEND", "CHECK", "CLOSE", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
    "UID FETCH", "UID STORE", "UID COPY", "UID MOVE", "UID SEARCH", "UID EXPUNGE", "IDLE", "ENABLE",
    "NAMESPACE", "UNSELECT", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA", "GETACL", "SETACL", "MYRIGHTS",
    "LISTRIGHTS", "DELETEACL", "GETMETADATA", "SETMETADATA", "SORT", "THREAD", "UID SORT", "UID THREAD",
    "RLIST", "RLSUB", "ESEARCH",
})
