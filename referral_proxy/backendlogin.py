"""Connecting to a backend and logging in: a BackendProtocol ready to relay, or a BackendError.

The greeting, STARTTLS (or implicit TLS, the certificate checked against the url's host), the
capabilities, the ID that tells the backend who the client is, and the login, bounded as a whole.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger

from .backend import BackendProtocol, NotConnected
from .backendtypes import AuthenticationFailed, BackendError, BackendUnavailable, Credentials, Tagged
from .config import BackendConfig
from .imap.quoting import astring
from .netio import client_endpoint, connect_tcp, drop

__all__ = ["LOGIN_TIMEOUT_FACTOR", "BeforeLogin", "connect_backend", "open_connection", "tls_options"]

log = Logger()

# Greeting, STARTTLS and login together may take this many connect_timeouts
# (a refused login alone costs Dovecot's auth delay, up to a few seconds).
LOGIN_TIMEOUT_FACTOR = 3


def tls_options(config: BackendConfig):  # -> IOpenSSLClientConnectionCreator
    """Certificate checks against the backend url's host with the configured CA."""
    trust = Certificate.loadPEM(config.ca.read_bytes()) if config.ca is not None else platformTrust()
    return optionsForClientTLS(config.url_host, trustRoot=trust)


BeforeLogin = Callable[[BackendProtocol], Awaitable[None]]

async def open_connection(reactor: Any, config: BackendConfig) -> tuple[BackendProtocol, Any]:
    """A connection to *config*'s backend, its greeting not read yet: (protocol, connector).

    Plain TCP goes through the reactor's own connect (netio.connect_tcp); its failure
    fails the greeting with NotConnected. Anything else (implicit TLS) goes through its
    endpoint: NotConnected at once."""
    proto = BackendProtocol(config)
    proto.clock = reactor
    if config.tls != "implicit":
        connector = connect_tcp(reactor, config.endpoint, proto, config.connect_timeout, proto.not_connected)
        if connector is not None:
            return proto, connector
    endpoint = client_endpoint(reactor, config.endpoint)
    if config.tls == "implicit":
        endpoint = wrapClientTLS(tls_options(config), endpoint)
    try:
        factory = Factory.forProtocol(lambda: proto)
        factory.noisy = False
        d = endpoint.connect(factory)
        d.addTimeout(config.connect_timeout, reactor)
        return await d, None
    except Exception as e:
        raise NotConnected(_why(e)) from e


async def connect_backend(reactor: Any, config: BackendConfig, credentials: Credentials,
                          before_login: BeforeLogin | None = None) -> BackendProtocol:
    """Connect, secure, log in: a BackendProtocol ready to relay, or a BackendError.

    *before_login* runs on the secured connection just before the login (the ID that
    tells the backend who the client is). The whole conversation is bounded: a backend that
    accepts but never answers must not hold the client's LOGIN (or SELECT) forever; at the
    limit the connection is dropped, which fails whatever the conversation awaits."""
    try:
        proto, connector = await open_connection(reactor, config)
    except NotConnected as e:
        log.warn("backend {name}: cannot connect: {why}", name=config.name, why=str(e))
        raise BackendUnavailable(f"backend {config.name} unreachable") from e
    limit, late = LOGIN_TIMEOUT_FACTOR * config.connect_timeout, []

    def too_late() -> None:
        late.append(True)
        drop(proto, connector)

    timer = reactor.callLater(limit, too_late)
    try:
        await _set_up(proto, config, credentials, before_login)
        return proto
    except AuthenticationFailed:
        proto.logout()
        raise
    except BackendError as e:  # NotConnected too: a failed greeting
        refused = isinstance(e, NotConnected)
        why = f"no answer within {limit:g}s" if late else f"cannot connect: {e}" if refused else str(e)
        log.warn("backend {name}: {why}", name=config.name, why=why)
        drop(proto, connector)
        if late or refused:
            raise BackendUnavailable(f"backend {config.name} unreachable" if refused else why) from e
        raise
    except Exception as e:
        log.warn("backend {name}: {why}", name=config.name, why=_why(e))
        drop(proto, connector)
        raise BackendUnavailable(f"backend {config.name} unavailable") from e
    finally:
        if timer.active():
            timer.cancel()


async def _set_up(proto: BackendProtocol, config: BackendConfig, credentials: Credentials,
                  before_login: BeforeLogin | None = None) -> None:
    """Greeting, STARTTLS, capabilities, (ID), login."""
    greeting = await proto.greeting
    if greeting.status != "OK":
        raise BackendUnavailable(f"backend {config.name} greeted with {greeting.status}")
    if config.tls == "starttls":
        await _starttls(proto, config)
    if not proto.capabilities:
        await _ok(proto, b"CAPABILITY")
    if before_login is not None:
        await before_login(proto)
    await _login(proto, credentials)
    if not proto.capabilities or not proto.capabilities.isdisjoint(("LOGINDISABLED", "STARTTLS")):  # pre-login ones
        await _ok(proto, b"CAPABILITY")


def _why(e: BaseException) -> str:
    """A readable reason, including the TLS verification error behind a lost connection."""
    cause = e.__cause__ or e.__context__
    text = str(e) or type(e).__name__
    if isinstance(e, BackendError) and cause is not None:
        text += f" ({_why(cause)})"
    return text


async def _ok(proto: BackendProtocol, text: bytes) -> Tagged:
    result = await proto.command(text)
    if not result.ok:
        raise BackendUnavailable(f"backend {proto.name}: {text.decode()} failed: {result.start.text.decode('utf-8', 'replace')}")
    return result


async def _starttls(proto: BackendProtocol, config: BackendConfig) -> None:
    if "STARTTLS" not in proto.capabilities:
        await _ok(proto, b"CAPABILITY")
    if "STARTTLS" not in proto.capabilities:
        raise BackendUnavailable(f"backend {config.name} does not offer STARTTLS")
    await _ok(proto, b"STARTTLS")
    if proto._framer.buffered:  # read after the OK in clear text, then as if under TLS: injected (a forged login OK)
        raise BackendUnavailable(f"backend {config.name} sent {proto._framer.buffered} bytes after its STARTTLS OK")
    proto.transport.startTLS(tls_options(config))
    proto.capabilities = frozenset()
    try:
        await _ok(proto, b"CAPABILITY")  # the first exchange under TLS: a failed verification shows here
    except BackendUnavailable:
        why = proto.lost_reason.getErrorMessage() if proto.lost_reason is not None else "no answer"
        raise BackendUnavailable(f"backend {config.name}: TLS handshake or certificate verification failed: {why}") from None


async def _login(proto: BackendProtocol, creds: Credentials) -> None:
    caps = proto.capabilities
    if "AUTH=PLAIN" in caps:
        blob = base64.b64encode(b"\0".join(s.encode("utf-8", "surrogateescape") for s in (creds.authzid, creds.user, creds.password)))
        if "SASL-IR" in caps:
            result = await proto.command(b"AUTHENTICATE PLAIN " + blob)
        else:
            result = await proto.command(b"AUTHENTICATE PLAIN", on_continuation=lambda _text: proto.write(blob + b"\r\n"))
    elif creds.authzid:
        raise BackendUnavailable(f"backend {proto.name} does not offer AUTH=PLAIN for a master-user login")
    else:
        user, password = (s.encode("utf-8", "surrogateescape") for s in (creds.user, creds.password))
        if "LITERAL+" not in caps and (b"\r" in user + password or b"\n" in user + password or not (user + password).isascii()):
            raise BackendUnavailable(f"backend {proto.name} cannot take these credentials with LOGIN")
        result = await proto.command(b"LOGIN " + astring(user) + b" " + astring(password))
    if not result.ok:
        raise AuthenticationFailed(result)
