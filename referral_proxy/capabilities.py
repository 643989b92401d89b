"""Which capabilities the proxy announces, before and after login.

Before login the proxy answers everything itself. After login a client sees the
proxy's own capabilities and those of the home backend that the declared command
table (commands.py) says the proxy relays correctly; the list of what is never
relayed, and why, is ``commands.NOT_RELAYED``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from . import referrals
from .commands import PROXY_OWN, post_login_capabilities
from .imap.quoting import safe_text

__all__ = ["pre_login", "post_login", "before_login", "greeting", "after_login", "login_answer", "PROXY_OWN"]

post_login = post_login_capabilities


def pre_login(*, tls_available: bool, tls_active: bool, plaintext_allowed: bool,
              login_referrals: bool = False, mailbox_referrals: bool = True) -> list[str]:
    """Capabilities in the greeting and before authentication.

    MAILBOX-REFERRALS is announced here too: referral clients such as cyradm
    read the capabilities only before they log in.
    """
    caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
    if mailbox_referrals:
        caps.append("MAILBOX-REFERRALS")
    if login_referrals:
        caps.append("LOGIN-REFERRALS")
    if tls_available and not tls_active:
        caps.append("STARTTLS")
    if plaintext_allowed or tls_active:
        caps.append("AUTH=PLAIN")
    else:
        caps.append("LOGINDISABLED")
    return caps


def before_login(config: Any, tls_available: bool, tls_active: bool) -> list[str]:
    """pre_login for *config*'s [proxy] settings."""
    p = config.proxy
    return pre_login(tls_available=tls_available, tls_active=tls_active, plaintext_allowed=p.allow_plaintext_login,
                     login_referrals=referrals.login_referrals_apply(config), mailbox_referrals=p.referrals != "never")


# The last greeting made: (config, (TLS available, TLS active), its bytes).
_GREETING: list[Any] = [None, None, b""]


def greeting(config: Any, tls_available: bool, tls_active: bool) -> bytes:
    """The greeting line: made once per configuration and TLS state (every connection sends it)."""
    kept_config, kept_tls, line = _GREETING
    if kept_config is not config or kept_tls != (tls_available, tls_active):
        caps = " ".join(before_login(config, tls_available, tls_active))
        line = b"* OK [CAPABILITY %s] %s referral-proxy ready.\r\n" % (caps.encode(), config.proxy.hostname.encode())
        _GREETING[:] = [config, (tls_available, tls_active), line]
    return line  # type: ignore[no-any-return]


@lru_cache(maxsize=64)
def after_login(backend_caps: tuple[str, ...], mailbox_referrals: bool, move_ok: bool) -> tuple[str, ...]:
    """The capabilities announced after login (every login and CAPABILITY asks: kept per backend list).
    *move_ok*: every backend has UIDPLUS (a cross-server MOVE removes the source messages by UID)."""
    caps = post_login(backend_caps, mailbox_referrals=mailbox_referrals)
    return tuple(caps if move_ok else [c for c in caps if c.upper() != "MOVE"])


@lru_cache(maxsize=64)
def login_answer(caps: tuple[str, ...]) -> tuple[str, bool, bytes]:
    """(the capabilities as one text, BINARY among them, the login's OK text as the session's tagged() writes it)."""
    text = " ".join(caps)
    return text, "BINARY" in text.split(), safe_text(f"[CAPABILITY {text}] Logged in").encode("utf-8")
