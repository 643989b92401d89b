"""Authentication: LOGIN, AUTHENTICATE PLAIN (with SASL-IR), and the login itself.

The proxy checks credentials by logging in to the user's home backend (the route
of INBOX) with them, trying replicas in order when one cannot be reached. A
backend's refusal is passed on (its response code kept); with login referrals
(RFC 2221) a user whose backend asks for it is referred there once the
credentials are known to be good. Passwords never reach a log.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from . import referrals
from .backend import AuthenticationFailed, BackendError, BackendProtocol, Credentials
from .context import Connect, ProxyContext
from .flow import Block
from .imap.command import ParseError
from .imap.grammar import Arguments
from .imap.reader import Command, CommandReader, TextLine
from .imap.response import completion_text
from .origin import peer_ip
from .pool import backend_config, connect_first

__all__ = ["Authenticator", "AuthHost", "LoginOutcome", "login_credentials", "sasl_plain", "log_in"]

log = Logger()

#: The longest SASL PLAIN message (in base64) the proxy hands a backend. Dovecot's login
#: process reads at most 8191 bytes of it in AUTHENTICATE PLAIN's initial response and closes
#: the connection without a word on a longer one (2.3.19, measured): a password of 8 KB was
#: answered NO [UNAVAILABLE], counted and logged as the backend failing (and each replica
#: tried in turn), where it is the client's credentials that no backend can take.
MAX_PLAIN_BASE64 = 8191


def plain_length(creds: Credentials) -> int:
    """The size of *creds* as the SASL PLAIN response a backend gets (backend._login's blob)."""
    raw = sum(len(s.encode("utf-8", "surrogateescape")) for s in (creds.authzid, creds.user, creds.password)) + 2
    return 4 * -(-raw // 3)


@dataclass(frozen=True)
class LoginOutcome:
    """A logged-in home connection, or the tagged answer refusing the login, and what to log."""

    user: str
    conn: BackendProtocol | None
    answer: str = ""  # "NO [AUTHENTICATIONFAILED] ..." when conn is None; "OK [REFERRAL ...] ..." (RFC 2221)
    result: str = "ok"  # ok | failed | unavailable | referred
    backend: str | None = None
    details: dict[str, str] = field(default_factory=dict)  # why, url


def login_credentials(args: Arguments) -> Credentials:
    """``LOGIN user password`` (both astrings, already parsed)."""
    user, password = (t.value for t in args.tokens)  # type: ignore[union-attr]
    return Credentials(user=_text(user), password=_text(password))


def _text(data: bytes) -> str:
    """A name or password byte for byte (surrogateescape; backend.py encodes it back so): a Latin-1
    one works as directly, and two of them are never one user (map entry, penalty) nor one keepalive
    key. ``replace`` made every one U+FFFD: a name Dovecot never saw, the same for ``j\\xe9r`` and ``j\\xe8r``."""
    return data.decode("utf-8", "surrogateescape")


def password_owner(ctx: ProxyContext, login: str) -> str:
    """Whose password a login tries, the key of the user's login penalty: ``bob*admin``'s is the master user
    admin's (with ``master_user_separator``), ``bob*bob``'s bob's (a key per spelling gave a botnet twice the
    guesses at bob's, and one per user at admin's: probe v6, stop 52)."""
    separator = ctx.config.map.master_user_separator
    return ctx.mailbox_map.canonical(login.rpartition(separator)[2] if separator and separator in login else login)


class NotPlain(ValueError):
    """Base64 that is no SASL PLAIN message: a failed authentication (Dovecot: NO), not a BAD."""


def sasl_plain(blob: bytes) -> Credentials:
    """The credentials of a SASL PLAIN response (RFC 4616): ParseError if it is not base64,
    NotPlain if it decodes to no PLAIN message (the empty response is one of those)."""
    try:
        decoded = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("Invalid SASL PLAIN response") from None
    try:
        authzid, authcid, password = decoded.split(b"\0")
    except ValueError:
        raise NotPlain("Authentication failed.") from None
    return Credentials(user=_text(authcid), password=_text(password), authzid=_text(authzid))


async def log_in(ctx: ProxyContext, connect: Connect, creds: Credentials) -> LoginOutcome:
    """Log in to the user's home backend (replicas in order) with the client's credentials."""
    user = ctx.mailbox_map.login_user(creds.authzid or creds.user)  # routing, placements, INUSE, logs: one name
    route = ctx.mailbox_map.home(user)
    if plain_length(creds) > MAX_PLAIN_BASE64:  # no backend reads them: a failed login, not one unavailable
        return LoginOutcome(user, None, "NO [AUTHENTICATIONFAILED] Credentials too long", "failed", route.primary,
                            {"why": "credentials too long"})
    try:
        conn = await connect_first(route.backends, lambda name: connect(backend_config(ctx, name), creds))
    except AuthenticationFailed as e:
        start = e.response.start
        if start.code:  # the backend's own reason, e.g. [AUTHENTICATIONFAILED] or [UNAVAILABLE]
            answer = completion_text(start)
        else:
            answer = "NO [AUTHENTICATIONFAILED] " + (start.text.decode("utf-8", "replace") or "Authentication failed.")
        return LoginOutcome(user, None, answer, "failed", route.primary)
    except BackendError as e:
        return LoginOutcome(user, None, "NO [UNAVAILABLE] Mail server temporarily unavailable", "unavailable",
                            route.primary, {"why": str(e)})
    backend = ctx.config.backends.get(conn.name)
    if (backend is not None and ctx.config.proxy.login_referrals and backend.login_referral
            and referrals.referable(ctx.config, backend)):
        # RFC 2221 4: a tagged NO would say this server holds no mailbox the user can reach,
        # which is false (the proxy serves every one of them); a tagged OK says the user's
        # mailboxes are elsewhere and logs the user in all the same. The credentials were good.
        url = referrals.login_url(ctx.config, backend, referrals.url_user(ctx.config, creds, user))
        return LoginOutcome(user, conn, f"OK [REFERRAL {url}] Logged in; your mail server is {backend.url_host}",
                            "referred", conn.name, {"url": url})
    return LoginOutcome(user, conn, backend=conn.name)


class AuthHost(Protocol):
    """What authentication needs of its session."""

    ctx: ProxyContext
    id: int
    reader: CommandReader
    connect: Connect  # how this session reaches backends
    transport: Any

    @property
    def closed(self) -> bool:
        """The client has gone (a login finishing late logs its backend out)."""

    def plaintext_ok(self) -> bool: ...

    def send(self, data: bytes) -> None: ...

    def tagged(self, tag: bytes, status: str, text: str) -> None: ...

    def answer(self, tag: bytes, response: str) -> None: ...

    def block(self, reason: Block) -> None: ...

    def unblock(self, reason: Block) -> None: ...

    def block_commands(self, reason: Block) -> None:
        """No command read meanwhile (the socket is still read until ``pause_if_blocked``)."""

    def pause_if_blocked(self, reason: Block) -> None: ...

    def logged_in(self, tag: bytes, user: str, credentials: Credentials, conn: BackendProtocol,
                  answer: str = "", **details: str) -> None:
        """The login succeeded on *conn*, the user's home backend (*answer*: an RFC 2221
        ``OK [REFERRAL ...]`` to give instead of the plain OK)."""


class Authenticator:
    """LOGIN and AUTHENTICATE PLAIN of one session, with the SASL exchange in between."""

    __slots__ = ("host", "_sasl_tag")  # no per-instance dict

    def __init__(self, host: AuthHost) -> None:
        self.host = host
        self._sasl_tag: bytes | None = None  # AUTHENTICATE awaiting the client's response line

    def login(self, cmd: Command) -> None:
        if not self.host.plaintext_ok():
            return self.host.tagged(cmd.tag, "NO", "[PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first")
        self._start(cmd.tag, login_credentials(cmd.args))

    def authenticate(self, cmd: Command) -> None:
        host = self.host
        mechanism, *initial = (t.value for t in cmd.args.tokens)  # type: ignore[union-attr]
        if mechanism.upper() != b"PLAIN":
            return host.tagged(cmd.tag, "NO", "[ALERT] Unsupported authentication mechanism.")  # Dovecot's words
        if not host.plaintext_ok():
            return host.tagged(cmd.tag, "NO", "[PRIVACYREQUIRED] Plaintext authentication is disabled; use STARTTLS first")
        if initial:  # SASL-IR (RFC 4959): "=" is the empty response there (only there)
            return self._sasl_plain(cmd.tag, b"" if initial[0] == b"=" else initial[0])
        self._sasl_tag = cmd.tag
        host.reader.expect_line()
        host.send(b"+ \r\n")

    def sasl_response(self, line: TextLine) -> bool:
        """The client's SASL response line, if one was awaited (True: taken)."""
        tag, self._sasl_tag = self._sasl_tag, None
        if tag is None:
            return False
        if not line.clean:
            self.host.tagged(tag, "BAD", "Invalid SASL response")
        elif line.data == b"*":  # exactly: " *" or "AGFs Y2U=" is no base64 (RFC 4648), as Dovecot reads it
            self.host.tagged(tag, "BAD", "Authentication cancelled")
        else:
            self._sasl_plain(tag, line.data)
        return True

    def _sasl_plain(self, tag: bytes, blob: bytes) -> None:
        try:
            creds = sasl_plain(blob)
        except ParseError as e:
            return self.host.tagged(tag, "BAD", str(e))
        except NotPlain as e:
            return self.host.tagged(tag, "NO", f"[AUTHENTICATIONFAILED] {e}")
        self._start(tag, creds)

    def _start(self, tag: bytes, creds: Credentials) -> None:
        if self.host.ctx.observer.refuses_login(self.host, tag, creds.authzid or creds.user):
            return  # a proxy loop: answered
        # No command is read until the login ends; the socket is paused only if it has not ended
        # when this call returns (a parked backend connection taken: it has).
        self.host.block_commands(Block.LOGIN)
        d = defer.ensureDeferred(self._log_in(tag, creds))
        d.addErrback(lambda f: log.failure("session {id}: login crashed", f, id=self.host.id))
        self.host.pause_if_blocked(Block.LOGIN)

    async def _log_in(self, tag: bytes, creds: Credentials) -> None:
        host = self.host
        ctx = host.ctx
        limits = ctx.config.proxy.connections
        penalty, clock = ctx.admission.penalty, ctx.reactor.seconds
        ip, who = self._client_ip(), password_owner(ctx, creds.user)
        asked = clock()
        delay = penalty.delay(ip, who, limits.login_penalty, asked)
        if delay > 0:
            ctx.observer.login_delayed(host, creds.user, delay)
            await task.deferLater(ctx.reactor, delay)
            if host.closed:
                return
        outcome = await log_in(ctx, host.connect, creds)
        if outcome.result == "failed":
            penalty.failed(ip, who, creds.password, limits.login_penalty, clock(), asked)
        elif outcome.result in ("ok", "referred"):
            penalty.succeeded(ip, who)
        conn = outcome.conn
        if host.closed:  # the client left meanwhile
            if conn is not None:
                conn.logout()
            return
        if conn is not None:
            refusal = ctx.admission.logged_in(host, outcome.user, limits)  # canonical already
            if refusal is not None:
                conn.logout()
                outcome = LoginOutcome(outcome.user, None, f"NO [LIMIT] {refusal.text}", "limit", conn.name,
                                       {"why": refusal.reason})
        if outcome.conn is None:
            ctx.observer.login(host, outcome.user, outcome.backend, outcome.result, **outcome.details)
            host.answer(tag, outcome.answer)
        else:
            host.logged_in(tag, outcome.user, creds, outcome.conn, outcome.answer, **outcome.details)
        host.unblock(Block.LOGIN)

    def _client_ip(self) -> str:
        """The client's address: the PROXY header's, or the one a trusted upstream's ID said."""
        origin = self.host.ctx.observer.origin(self.host)
        return origin.client_ip if origin is not None else peer_ip(self.host.transport)
