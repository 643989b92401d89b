"""RFC 2193 / RFC 2221 referral responses built from routes and backend urls.

A referral never names the proxy itself (RFC 2193: a server MUST NOT return
referrals that loop): a backend whose url reaches one of the proxy's own
listeners is left out of every referral, at whatever position of a replica set.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from .backend import Credentials
from .config import BackendConfig, Config
from .imap.url import imap_url
from .origin import _is_loopback, _listen_addresses
from .routing import Route

__all__ = ["mailbox_urls", "login_url", "login_referrals_apply", "referral", "referable", "referable_members"]

_WILDCARD = ("", "0.0.0.0", "::")


def _host_port(backend: BackendConfig) -> tuple[str, int | None]:
    parts = urlsplit(backend.url)
    return parts.hostname or "", parts.port


def referable(config: Config, backend: BackendConfig) -> bool:
    """False when the backend's url reaches one of the proxy's own listeners (``haproxy:``
    ones too): a client following the referral would come back here, a loop. False for an
    IPv6 address too: its URL's ``]`` would end the ``[REFERRAL ...]`` code (RFC 3501 resp-text-code)."""
    host, port = _host_port(backend)
    if ":" in host:
        return False
    port = port or 143
    own_names = {config.proxy.hostname.lower()}
    for spec in config.proxy.listen:
        address = _listen_addresses(spec)
        if address is None or address[1] != port:
            continue
        interface = address[0]
        if host == interface or host.lower() in own_names:
            return False
        if interface in _WILDCARD and _is_loopback(host):
            return False
        if _is_loopback(interface) and host == "localhost":
            return False
    return True


def referable_members(config: Config, route: Route) -> tuple[str, ...]:
    """The backends of *route* a referral may name, in preference order (never the proxy)."""
    out = []
    for name in route.backends:
        backend = config.backends.get(name)
        if backend is not None and referable(config, backend):
            out.append(name)
    return tuple(out)


def mailbox_urls(config: Config, route: Route, user: str, mailbox: bytes) -> list[str]:
    """One IMAP URL per backend of the route a referral may name, in preference order
    (empty: every member is the proxy itself, so the mailbox must be proxied)."""
    urls = []
    for name in referable_members(config, route):
        host, port = _host_port(config.backends[name])
        urls.append(imap_url(host, port, user, mailbox))
    return urls


def login_referrals_apply(config: Config) -> bool:
    """RFC 2221 3: LOGIN-REFERRALS is announced when a login may be referred: ``login_referrals`` on
    and a backend with ``login_referral`` that is not the proxy itself (auth.py refers to no other)."""
    return config.proxy.login_referrals and any(
        b.login_referral and referable(config, b) for b in config.backends.values())


def url_user(config: Config, login: Credentials | None, user: str) -> str:
    """The user a referral URL names: with a master user's LOGIN (``bob*admin``), *user* and that master part, as
    the client can follow it with the password it gave; else *user* (probe 3 of stop 49: it named bob)."""
    separator = config.map.master_user_separator
    if login is not None and not login.authzid and separator and separator in login.user:
        return user + separator + login.user.partition(separator)[2]
    return user


def login_url(config: Config, backend: BackendConfig, user: str) -> str:
    host, port = _host_port(backend)
    return imap_url(host, port, user, None)


def referral(tag: bytes, urls: Sequence[str], text: str = "Remote mailbox") -> bytes:
    """``tag NO [REFERRAL url ...] text``."""
    return b"%s NO [REFERRAL %s] %s\r\n" % (tag, " ".join(urls).encode("ascii"), text.encode())
