"""RFC 2193 / RFC 2221 referral responses built from routes and backend urls."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from .config import BackendConfig, Config
from .imap.url import imap_url
from .routing import Route

__all__ = ["mailbox_urls", "login_url", "referral", "referable"]


def _host_port(backend: BackendConfig) -> tuple[str, int | None]:
    parts = urlsplit(backend.url)
    return parts.hostname or "", parts.port


def referable(config: Config, backend: BackendConfig) -> bool:
    """False when the backend's url is one of the proxy's own listeners: a referral would loop."""
    host, port = _host_port(backend)
    port = port or 143
    for spec in config.proxy.listen:
        fields = spec.split(":")
        if fields[0] not in ("tcp", "ssl", "tcp6") or len(fields) < 2:
            continue
        try:
            listen_port = int(fields[1].removeprefix("port="))
        except ValueError:
            continue
        interface = next((f.removeprefix("interface=") for f in fields[2:] if f.startswith("interface=")), "")
        if listen_port == port and interface in ("", "0.0.0.0", "::", host):
            return False
    return True


def mailbox_urls(config: Config, route: Route, user: str, mailbox: bytes) -> list[str]:
    """One IMAP URL per backend of the route, in preference order."""
    urls = []
    for name in route.backends:
        host, port = _host_port(config.backends[name])
        urls.append(imap_url(host, port, user, mailbox))
    return urls


def login_url(config: Config, backend: BackendConfig, user: str) -> str:
    host, port = _host_port(backend)
    return imap_url(host, port, user, None)


def referral(tag: bytes, urls: Sequence[str], text: str = "Remote mailbox") -> bytes:
    """``tag NO [REFERRAL url ...] text``."""
    return b"%s NO [REFERRAL %s] %s\r\n" % (tag, " ".join(urls).encode("ascii"), text.encode())
