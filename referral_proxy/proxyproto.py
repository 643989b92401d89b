"""``haproxy:`` listeners: the PROXY protocol (v1 and v2) in front of a client session.

Twisted's wrapper (``twisted.protocols.haproxy``) with two changes a mail proxy needs:
the session is connected only once the header has been read whole, so from its first
moment (its greeting, its log event, its ID toward backends) getPeer()/getHost() are the
addresses the load balancer carried; and a header that arrives in pieces is collected
instead of refused. A connection whose first bytes are no PROXY header, or that sends
none within the timeout, is closed without a word. Such a listener must be reachable
by the load balancer only: whoever connects to it says who the client is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["HeaderFirstProtocol", "HeaderFirstFactory", "listen_endpoint", "with_backlog", "BACKLOG"]

PREFIX = "haproxy:"
_V2 = V2Parser.PREFIX


class HeaderFirstProtocol(HAProxyProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped protocol (see the module docstring)."""

    _connected = False
    _buffer = b""
    _timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._refuse)

    def dataReceived(self, data: bytes) -> None:
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            head = self._buffer + data
            if head.startswith(V1Parser.PROXYSTR):
                self._parser = V1Parser()
            elif len(head) >= 16 and head[:12] == _V2 and head[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
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
        self.wrappedProtocol.makeConnection(self)
        if remaining and self._connected:
            self.wrappedProtocol.dataReceived(remaining)

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
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = HeaderFirstProtocol
    noisy = False

    def __init__(self, wrapped: Any, reactor: Any, timeout: float) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.timeout = timeout


@implementer(IStreamServerEndpoint)
class _HeaderFirstEndpoint:
    def __init__(self, inner: Any, reactor: Any, timeout: float) -> None:
        self.inner, self.reactor, self.timeout = inner, reactor, timeout

    def listen(self, factory: Any) -> Any:
        return self.inner.listen(HeaderFirstFactory(factory, self.reactor, self.timeout))


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


def listen_endpoint(reactor: Any, spec: str, header_timeout: float, *, inner: Any = None) -> Any:
    """The server endpoint of a ``[proxy] listen`` string; ``haproxy:...`` wraps the rest
    (or *inner*, the endpoint to use for the rest: a socket inherited from a master)."""
    if spec.startswith(PREFIX):
        if inner is None:
            inner = serverFromString(reactor, with_backlog(spec[len(PREFIX):]))
        return _HeaderFirstEndpoint(inner, reactor, header_timeout)
    return inner if inner is not None else serverFromString(reactor, with_backlog(spec))
