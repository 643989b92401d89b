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
from dataclasses import dataclass

from twisted.logger import Logger

from . import referrals
from .backend import AuthenticationFailed, BackendError, BackendProtocol, Credentials
from .context import ProxyContext
from .imap.command import ParseError
from .imap.grammar import Arguments
from .imap.response import completion_text
from .pool import backend_config, connect_first

__all__ = ["LoginOutcome", "login_credentials", "sasl_plain", "log_in"]

log = Logger()


@dataclass(frozen=True)
class LoginOutcome:
    """A logged-in home connection, or the tagged answer refusing the login."""

    user: str
    conn: BackendProtocol | None
    answer: str = ""  # "NO [AUTHENTICATIONFAILED] ..." when conn is None


def login_credentials(args: Arguments) -> Credentials:
    """``LOGIN user password`` (both astrings, already parsed)."""
    user, password = (t.value for t in args.tokens)  # type: ignore[union-attr]
    return Credentials(user=user.decode("utf-8", "replace"), password=password.decode("utf-8", "replace"))


def sasl_plain(blob: bytes) -> Credentials:
    """The credentials of a SASL PLAIN response (RFC 4616); ParseError if it is not one."""
    try:
        decoded = base64.b64decode(b"" if blob == b"=" else blob, validate=True)
        authzid, authcid, password = decoded.split(b"\0")
        return Credentials(user=authcid.decode("utf-8"), password=password.decode("utf-8"),
                           authzid=authzid.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ParseError("Invalid SASL PLAIN response") from None


async def log_in(ctx: ProxyContext, creds: Credentials, session_id: int) -> LoginOutcome:
    """Log in to the user's home backend (replicas in order) with the client's credentials."""
    user = creds.authzid or creds.user
    route = ctx.mailbox_map.home(user)
    try:
        conn = await connect_first(route.backends, lambda name: ctx.connect(backend_config(ctx, name), creds))
    except AuthenticationFailed as e:
        log.info("session {id}: login of {user} refused by backend", id=session_id, user=user)
        start = e.response.start
        if start.code:  # the backend's own reason, e.g. [AUTHENTICATIONFAILED] or [UNAVAILABLE]
            return LoginOutcome(user, None, completion_text(start))
        return LoginOutcome(user, None, "NO [AUTHENTICATIONFAILED] "
                                        + (start.text.decode("utf-8", "replace") or "Authentication failed."))
    except BackendError as e:
        log.warn("session {id}: no backend for {user}: {why}", id=session_id, user=user, why=str(e))
        return LoginOutcome(user, None, "NO [UNAVAILABLE] Mail server temporarily unavailable")
    backend = ctx.config.backends.get(conn.name)
    if (backend is not None and ctx.config.proxy.login_referrals and backend.login_referral
            and referrals.referable(ctx.config, backend)):
        conn.logout()  # the credentials are good: send the client to its server (RFC 2221)
        url = referrals.login_url(ctx.config, backend, user)
        log.info("session {id}: {user} referred to {url}", id=session_id, user=user, url=url)
        return LoginOutcome(user, None, f"NO [REFERRAL {url}] Log in to {backend.url_host} directly")
    return LoginOutcome(user, conn)
