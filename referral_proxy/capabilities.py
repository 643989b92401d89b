"""Which capabilities the proxy announces, before and after login.

Before login the proxy answers everything itself. After login a client sees the
proxy's own capabilities and those of the home backend that the declared command
table (commands.py) says the proxy relays correctly; the list of what is never
relayed, and why, is ``commands.NOT_RELAYED``.
"""

from __future__ import annotations

from .commands import PROXY_OWN, post_login_capabilities

__all__ = ["pre_login", "post_login", "PROXY_OWN"]

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
