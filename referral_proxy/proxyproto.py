"""``haproxy:`` listeners: the PROXY protocol (v1 and v2) in front of a client session.

Twisted's wrapper (``twisted.protocols.haproxy``) with two changes a mail proxy needs:
the session is connected only once the header has been read whole, so from its first
moment (its greeting, its log event, its ID toward backends) getPeer()/getHost() are the
addresses the load balancer carried; and a header that arrives in pieces is collected
instead of refused. A connection whose first bytes are no PROXY header, or that sends
none within the timeout, is closed without a word. Such a listener must be reachable
by the load balancer only: whoever connects to it says who the client is.

Headers are read as the specification says, not as Twisted's parsers let through (they
took ``evil.example``, ``1.2.3.4<ESC>[31m`` or port 99999 as the client, a v1 line of
any length that came in one read, and raised a bare ValueError on a port ``4x``): a v1
line is at most 107 bytes, its addresses IP addresses of its family and its ports
0-65535; ``PROXY UNKNOWN``, a v2 LOCAL, UNSPEC or UNIX header mean "the connection's
own addresses"; a v2 DGRAM header is refused. Addresses are kept in one spelling
(``2001:db8::7`` whichever version said it): they key the login penalty and keepalive.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IHandshakeListener, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["HeaderFirstProtocol", "HeaderFirstFactory", "listen_endpoint", "StrictV1", "StrictV2", "with_backlog",
           "BACKLOG"]

PREFIX = "haproxy:"
_V2 = V2Parser.PREFIX
V1_MAX = 107  # bytes of a v1 header, its CRLF included (the specification's bound)
_FAMILIES = {b"TCP4": (4, IPv4Address), b"TCP6": (6, IPv6Address)}


def _ip(raw: bytes | str, version: int) -> str:
    """An IP address of *version* in its one canonical spelling, or InvalidProxyHeader."""
    try:
        ip = ipaddress.ip_address(raw.decode("ascii") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader() from None
    if ip.version != version or "%" in str(ip):  # a scope id ("fe80::1%<any bytes>", probe v6 of stop 52): no
        raise InvalidProxyHeader()              # client's address, and x-originating-ip Dovecot cannot read
    return str(ip)


def _port(raw: bytes) -> int:
    if not (raw.isdigit() and len(raw) <= 5 and int(raw) <= 0xFFFF):
        raise InvalidProxyHeader()
    return int(raw)


class StrictV1:
    """A v1 header (``PROXY TCP4 src dst sport dport``): whole, bounded, every field checked."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | tuple[None, None]:
        self.buffer += data
        end = self.buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(self.buffer) >= V1_MAX:
                raise InvalidProxyHeader()
            return None, None
        line, rest = self.buffer[:end], self.buffer[end + 2:]
        self.buffer = b""
        return self.parse(line), rest

    @staticmethod
    def parse(line: bytes) -> ProxyInfo:
        fields = line.split(b" ")
        if fields[0] != b"PROXY" or len(fields) < 2:
            raise InvalidProxyHeader()
        if fields[1] == b"UNKNOWN":  # the sender does not know: the connection's own addresses
            return ProxyInfo(line, None, None)
        if len(fields) != 6 or fields[1] not in _FAMILIES:
            raise InvalidProxyHeader()
        version, cls = _FAMILIES[fields[1]]
        src, dst = _ip(fields[2], version), _ip(fields[3], version)
        return ProxyInfo(line, cls("TCP", src, _port(fields[4])), cls("TCP", dst, _port(fields[5])))


class StrictV2(V2Parser):
    """Twisted's v2 parser (TLVs skipped), its result checked: TCP over IPv4/IPv6, or none."""

    def feed(self, data: bytes) -> tuple[ProxyInfo, bytes] | tuple[None, None]:
        try:
            info, rest = super().feed(data)
        except (ValueError, KeyError, IndexError, struct.error):
            raise InvalidProxyHeader() from None
        if info is None:
            return None, None
        source, dest = info.source, info.destination
        if source is None or dest is None or not isinstance(source, (IPv4Address, IPv6Address)):
            return ProxyInfo(info.header, None, None), rest  # LOCAL, UNSPEC, UNIX: no client address
        if source.type != "TCP" or not isinstance(dest, type(source)):
            raise InvalidProxyHeader()  # DGRAM: no IMAP client
        version, cls = (4, IPv4Address) if isinstance(source, IPv4Address) else (6, IPv6Address)
        return ProxyInfo(info.header, cls("TCP", _ip(source.host, version), source.port),
                         cls("TCP", _ip(dest.host, version), dest.port)), rest


@implementer(IHandshakeListener)
class HeaderFirstProtocol(HAProxyProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol (see the module docstring).

    On a ``haproxy:ssl:`` listener the header comes in clear text and TLS begins after it,
    as HAProxy's send-proxy does (Twisted's own ``haproxy:ssl:`` wanted it inside TLS). The
    handshake's end is passed on: a TLS session registers its output's back-pressure
    then (flow.py); without it a client that did not read had a 50 MB FETCH held whole."""

    _connected = False
    _buffer = b""
    _timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._refuse)
        if not self.factory.trusts(transport.getPeer()):
            self._refuse()  # only the balancers named in trusted_networks may say who the client is

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            head = self._buffer + data
            if head.startswith(V1Parser.PROXYSTR):
                self._parser = StrictV1()
            elif len(head) >= 16 and head[:12] == _V2 and head[12] & 0xF0 == 0x20:
                self._parser = StrictV2()
            elif len(head) < 16 and (_V2.startswith(head[:12]) or V1Parser.PROXYSTR.startswith(head)):
                self._buffer = head  # too short to tell yet
                return
            else:
                return self._refuse()
            data, self._buffer = head, b""
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            return self._refuse()
        if info is None:
            return
        self._proxyInfo = info
        self._cancel_timer()
        self._connected = True
        tls = self.factory.tls
        if tls is not None:
            self.startTLS(tls)  # what follows the header is the client's TLS
        self.wrappedProtocol.makeConnection(self)
        if remaining and self._connected:
            if tls is not None:
                self.transport.protocol.dataReceived(remaining)  # into the TLS layer, below this one
            else:
                self.wrappedProtocol.dataReceived(remaining)

    @property
    def client_unknown(self) -> bool:
        """The header named no client (UNKNOWN, LOCAL, UNSPEC, UNIX): the addresses are the balancer's own,
        which is not the client (its trust is not the client's: origin.LoopGuard.origin)."""
        info = self._proxyInfo
        return info is None or info.source is None

    def handshakeCompleted(self) -> None:
        if self._connected and IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def startTLS(self, options: Any, normal: bool = True) -> None:
        """STARTTLS on the connection below; this transport then provides ISSLTransport too."""
        self.transport.startTLS(options, normal)
        directlyProvides(self, providedBy(self.transport))

    def connectionLost(self, reason: Any) -> None:
        self._cancel_timer()
        if self._connected:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)

    def _refuse(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = HeaderFirstProtocol
    noisy = False

    def __init__(self, wrapped: Any, reactor: Any, timeout: float, *, tls: Any = None,
                 trusted: tuple[str, ...] = ()) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.timeout = timeout
        self.tls = tls  # the TLS context of a haproxy:ssl: listener, started after the header
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in trusted]

    def trusts(self, peer: Any) -> bool:
        """Whether *peer* may send a header: anyone if no trusted_networks are configured."""
        if not self._trusted:
            return True
        try:
            address = ipaddress.ip_address(getattr(peer, "host", ""))
        except ValueError:
            return False
        return any(address in net for net in self._trusted)


@implementer(IStreamServerEndpoint)
class _HeaderFirstEndpoint:
    def __init__(self, inner: Any, reactor: Any, timeout: float, tls: Any, trusted: tuple[str, ...]) -> None:
        self.inner, self.reactor, self.timeout, self.tls, self.trusted = inner, reactor, timeout, tls, trusted

    def listen(self, factory: Any) -> Any:
        return self.inner.listen(HeaderFirstFactory(factory, self.reactor, self.timeout, tls=self.tls,
                                                    trusted=self.trusted))


#: The kernel's accept queue of a client listener (Linux caps it at net.core.somaxconn). Twisted's
#: default, 50, dropped the handshakes of a reconnect storm: with 300 clients connecting at once
#: 12 of them thought themselves connected and waited for a greeting that never came (IMAP's
#: server speaks first, so nothing ever told them). nginx's is 511.
BACKLOG = 1024
_QUEUED = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(spec: str) -> str:
    """*spec* with ``backlog=BACKLOG`` unless it names a backlog itself (or has no accept queue)."""
    kind = spec.split(":", 1)[0].lower()
    if kind not in _QUEUED or ":backlog=" in spec.lower():
        return spec
    return spec + ":backlog=%d" % BACKLOG


def listen_endpoint(reactor: Any, spec: str, header_timeout: float, *, inner: Any = None, tls: Any = None,
                    trusted: tuple[str, ...] = ()) -> Any:
    """The server endpoint of a ``[proxy] listen`` string; ``haproxy:...`` wraps the rest
    (or *inner*, the endpoint to use for the rest: a socket inherited from a master, with
    *tls* the context of its ``ssl:``). ``haproxy:ssl:`` listens on plain TCP and starts
    TLS after the header; *trusted* (``[proxy] trusted_networks``) are the only peers whose
    header is read when there are any."""
    if spec.startswith(PREFIX):
        if inner is None:
            inner = serverFromString(reactor, with_backlog(spec[len(PREFIX):]))
            if isinstance(inner, SSL4ServerEndpoint):
                tls = inner._sslContextFactory
                inner = TCP4ServerEndpoint(reactor, inner._port, inner._backlog, inner._interface)
        return _HeaderFirstEndpoint(inner, reactor, header_timeout, tls, trusted)
    return inner if inner is not None else serverFromString(reactor, with_backlog(spec))
