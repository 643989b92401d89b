"""Which capabilities the proxy announces, before and after login.

After login a client sees the home backend's extensions that the proxy can relay
byte for byte, plus the proxy's own. An extension is left out only when relaying
it would be wrong: it changes the wire framing (COMPRESS), the session state
behind the proxy's back (UNAUTHENTICATE), or is answered by the proxy itself.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["pre_login", "post_login", "PROXY_OWN"]

# Announced by the proxy itself, whatever the backend has.
PROXY_OWN = ("IMAP4rev1", "LITERAL+", "ID", "MAILBOX-REFERRALS", "MULTIAPPEND")

# Relayed as the backend announces them (exact names).
_RELAYED = frozenset({
    "ACL", "APPENDLIMIT", "BINARY", "CATENATE", "CHILDREN", "CONDSTORE", "CREATE-SPECIAL-USE",
    "ENABLE", "ESEARCH", "ESORT", "IDLE", "LIST-EXTENDED", "LIST-MYRIGHTS", "LIST-STATUS",
    "METADATA", "METADATA-SERVER", "MOVE", "MULTIAPPEND", "MULTISEARCH", "NAMESPACE",
    "OBJECTID", "PREVIEW", "QRESYNC", "QUOTA", "QUOTASET", "REPLACE", "SAVEDATE", "SEARCHRES",
    "SORT", "SPECIAL-USE", "STATUS=SIZE", "UIDPLUS", "UNSELECT", "URL-PARTIAL", "URLAUTH",
    "URLAUTH=BINARY", "UTF8=ACCEPT", "WITHIN", "XLIST", "LIST-METADATA", "PARTIAL",
})
# Relayed families: any capability starting with one of these.
_RELAYED_PREFIXES = (
    "APPENDLIMIT=", "CONTEXT=", "I18NLEVEL=", "QUOTA=", "RIGHTS=", "SORT=", "THREAD=",
    "SNIPPET=", "PREVIEW=", "COMPRESS-NEVER",
)
# Never relayed, with the reason:
#  COMPRESS=*        changes the byte stream under the proxy's codec
#  STARTTLS, LOGINDISABLED, AUTH=*, SASL-IR, LOGIN-REFERRALS: pre-login, the proxy's own
#  UNAUTHENTICATE    would log the backend out while the proxy believes it logged in
#  NOTIFY            events of mailboxes on other backends cannot be merged yet
#  LITERAL-, LITERAL+ the proxy offers LITERAL+ itself toward clients
#  IMAP4rev2         the proxy speaks IMAP4rev1 toward clients


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


def post_login(backend_caps: Iterable[str], *, mailbox_referrals: bool = True) -> list[str]:
    """The proxy's own capabilities followed by the relayable ones of the home backend.

    Without referrals (``referrals = "never"``) MAILBOX-REFERRALS is not announced:
    a proxy that never refers should not invite RLIST."""
    caps = [c for c in PROXY_OWN if mailbox_referrals or c != "MAILBOX-REFERRALS"]
    seen = {c.upper() for c in caps}
    for cap in backend_caps:
        up = cap.upper()
        if up in seen:
            continue
        if up in _RELAYED or up.startswith(_RELAYED_PREFIXES):
            caps.append(cap)
            seen.add(up)
    return caps
