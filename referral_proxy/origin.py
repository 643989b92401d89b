"""Where a client really comes from, what the backends are told of it, and the loop guard.

A listener may be a ``haproxy:`` endpoint (PROXY protocol v1/v2, Twisted's wrapper):
its transport's getPeer()/getHost() are then the addresses the load balancer carried.
A trusted upstream (``[proxy] trusted_networks``: a proxy or director in front) may
instead say them in ``ID ("x-originating-ip" ...)`` before login. Either way the
address is the one logged, counted and sent on to every backend that announces ID,
as Dovecot's own proxy does, with ``x-proxy-ttl`` one less than this hop's; a login
whose TTL is spent, or that comes back carrying this very process's session id, is
refused instead of looping.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import tcp

from .config import BackendConfig, Config
from .imap.command import Atom, ParenList, String, Token
from .imap.quoting import quoted

__all__ = ["Origin", "LoopGuard", "address_text", "id_arguments", "id_command", "peer_ip"]

# Fields a trusted upstream may set; x-proxy-ttl and x-session-id count from anyone
# (a lower TTL or a looping session id can only make that client's own login fail).
_ADDRESS_FIELDS = ("x-originating-ip", "x-originating-port", "x-connected-ip", "x-connected-port")
_SESSION_ID = re.compile(r"^[A-Za-z0-9+/=._:-]{1,80}\Z")


def address_text(host: str, port: int | str | None) -> str:
    """``192.0.2.7:143`` / ``[2001:db8::1]:143``: how logs show an address."""
    if port is None or port == "":
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_ip(transport: Any) -> str:
    """The client's address of a new connection (the PROXY header's on a ``haproxy:`` listener)."""
    return _host_port(transport.getPeer())[0]


def _host_port(addr: Any) -> tuple[str, int | None]:
    """(host, port) of a Twisted address (IPv4Address, IPv6Address, UNIXAddress ...)."""
    host = getattr(addr, "host", None)
    if host is None:
        return "?", None
    return str(host), getattr(addr, "port", None)


_WILDCARDS = ("0.0.0.0", "::", "")


def local_address(transport: Any) -> Any:
    """The local address of a new connection (``getHost()``): of a plain TCP connection
    whose listener is bound to one address, that listener's address, asked of the kernel
    once per listener, not by a getsockname() per accept; otherwise its own ``getHost()``
    (a wildcard listener, a ``haproxy:`` or TLS wrapper's own answer)."""
    if type(transport).getHost is not tcp.Server.getHost:
        return transport.getHost()
    port = transport.server  # None: a connection adopted without its listener
    host = getattr(port, "_rp_host", None) if port is not None else False
    if host is None:
        bound = port.getHost()
        host = False if getattr(bound, "host", "") in _WILDCARDS else bound
        port._rp_host = host  # an attribute of our own on Twisted's listening port
    return host or transport.getHost()


@dataclass(slots=True)
class Origin:
    """One client session's real addresses, its session id toward backends, and its TTL."""

    client_ip: str
    client_port: int | None
    local_ip: str
    local_port: int | None
    session_id: str
    ttl: int
    trusted: bool = False  # the peer is in trusted_networks: its ID may say who the client is
    loop: str | None = None  # why a login must be refused (a proxy loop), or None

    @classmethod
    def of(cls, transport: Any, session_id: str, ttl: int) -> Origin:
        """From a new connection: its peer (PROXY-protocol aware) is the client."""
        client_ip, client_port = _host_port(transport.getPeer())
        local_ip, local_port = _host_port(local_address(transport))
        return cls(client_ip, client_port, local_ip, local_port, session_id=session_id, ttl=ttl)

    @property
    def client(self) -> str:
        return address_text(self.client_ip, self.client_port)

    @property
    def local(self) -> str:
        return address_text(self.local_ip, self.local_port)


def id_arguments(args: Sequence[Token] | None) -> dict[str, str]:
    """The field/value pairs of an ``ID`` command's arguments (NIL: none), names lowercased.

    Values that are NIL, not strings, or not printable text are left out."""
    if not args or not isinstance(args[0], ParenList):
        return {}
    items = args[0].items
    out: dict[str, str] = {}
    for key, value in zip(items[0::2], items[1::2]):
        if not isinstance(key, (String, Atom)) or not isinstance(value, (String, Atom)):
            continue
        if isinstance(value, Atom) and value.value.upper() == b"NIL":
            continue
        try:
            k, v = key.value.decode("ascii").lower(), value.value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if v.isprintable() and len(v) <= 256:
            out[k] = v
    return out


def id_command(origin: Origin) -> bytes:
    """``ID (...)`` as Dovecot's proxy sends it to a backend before the login."""
    pairs = [
        ("x-originating-ip", origin.client_ip),
        ("x-originating-port", origin.client_port),
        ("x-connected-ip", origin.local_ip),
        ("x-connected-port", origin.local_port),
        ("x-session-id", origin.session_id),
        ("x-proxy-ttl", max(origin.ttl - 1, 0)),
    ]
    fields = [quoted(k.encode()) + b" " + quoted(str(v).encode()) for k, v in pairs if v not in (None, "", "?")]
    return b"ID (" + b" ".join(fields) + b")"


def _listen_addresses(spec: str) -> tuple[str, int] | None:
    """(interface, port) a server endpoint string listens on; interface "" = every one."""
    parts = re.split(r"(?<!\\):", spec)
    while parts and parts[0] == "haproxy":
        parts = parts[1:]
    if not parts or parts[0] not in ("tcp", "tcp6", "ssl", "tls"):
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    kw = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    try:
        port = int(kw.get("port") or positional[0])
    except (IndexError, ValueError):
        return None
    return kw.get("interface", "").replace("\\:", ":"), port


def _client_address(spec: str) -> tuple[str, int] | None:
    """(host, port) a client endpoint string connects to."""
    parts = re.split(r"(?<!\\):", spec)
    if not parts or parts[0] not in ("tcp", "tcp6", "ssl", "tls"):
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    kw = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    host = kw.get("host") or (positional[0] if positional else "")
    try:
        port = int(kw.get("port") or positional[1])
    except (IndexError, ValueError):
        return None
    return host.replace("\\:", ":"), port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class LoopGuard:
    """Per process: builds each session's Origin, reads the IDs clients send, and says no to
    logins that would loop (TTL spent, our own session id back, a backend that is us)."""

    config: Config
    instance: str = field(default_factory=lambda: os.urandom(6).hex())

    def __post_init__(self) -> None:
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in self.config.proxy.trusted_networks]
        self._listening = [a for a in (_listen_addresses(s) for s in self.config.proxy.listen) if a is not None]
        self._self: dict[str, bool] = {}
        self._any_self: tuple[Config | None, bool] = (None, False)  # (config asked of, its answer)

    def origin(self, transport: Any, session_number: int) -> Origin:
        """The Origin of a new connection, and whether its peer is a trusted upstream."""
        origin = Origin.of(transport, f"rp{self.instance}-{session_number}", self.config.proxy.proxy_ttl)
        # behind a balancer's header that named no client, the peer is the balancer: trusted, yet not the
        # one speaking, whose ID would then say any address it likes (probe d2 of stop 55)
        origin.trusted = self.trusts(origin.client_ip) and not getattr(transport, "client_unknown", False)
        return origin

    def trusts(self, ip: str) -> bool:
        if not self._trusted:  # the usual case: no address needs parsing
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    def received_id(self, origin: Origin, fields: dict[str, str]) -> None:
        """A client's ID before login: a trusted upstream says who the client is; anyone
        may lower the TTL; our own session id coming back means we are in a loop."""
        ttl = fields.get("x-proxy-ttl")
        if ttl is not None:
            try:
                origin.ttl = min(origin.ttl, int(ttl))
            except ValueError:
                pass
        upstream_id = fields.get("x-session-id", "")
        if upstream_id.startswith(f"rp{self.instance}-"):
            origin.loop = "this proxy received its own session back (it is, through some path, its own backend)"
        if origin.ttl <= 0:
            origin.loop = origin.loop or "x-proxy-ttl is spent"
        if not origin.trusted:
            return
        ip = fields.get("x-originating-ip")
        if ip is not None and _valid_ip(ip):
            origin.client_ip, origin.client_port = ip, _port(fields.get("x-originating-port"))
        ip = fields.get("x-connected-ip")
        if ip is not None and _valid_ip(ip):
            origin.local_ip, origin.local_port = ip, _port(fields.get("x-connected-port"))
        if _SESSION_ID.match(upstream_id):
            origin.session_id = upstream_id  # one id along the whole chain, as Dovecot does

    def is_self(self, backend: BackendConfig) -> bool:
        """The backend's endpoint is one of this proxy's own listeners (asked at every backend
        connection: the answer per endpoint string is kept)."""
        known = self._self.get(backend.endpoint)
        if known is None:
            known = self._self[backend.endpoint] = self._is_self(backend.endpoint)
        return known

    def any_self(self, config: Config) -> bool:
        """Whether some backend of *config* is one of this proxy's own listeners (asked at every
        login: none, the usual answer, spares the login the lookup of the user's home)."""
        asked, known = self._any_self
        if asked is not config:
            known = any(self.is_self(b) for b in config.backends.values())
            self._any_self = (config, known)
        return known

    def _is_self(self, endpoint: str) -> bool:
        target = _client_address(endpoint)
        if target is None:
            return False
        host, port = target
        if not host:
            return False
        for interface, listen_port in self._listening:
            if listen_port != port:
                continue
            if interface == host or (interface in ("", "0.0.0.0", "::") and _is_loopback(host)):
                return True
            if _is_loopback(interface) and host == "localhost":
                return True
        return False


def _valid_ip(text: str) -> bool:
    """A plain IP address: no scope id ("fe80::1%x", as proxyproto._ip)."""
    try:
        ipaddress.ip_address(text)
        return "%" not in text
    except ValueError:
        return False


def _port(text: str | None) -> int | None:
    try:
        port = int(text or "")
    except ValueError:
        return None
    return port if 0 < port < 65536 else None
