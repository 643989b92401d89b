"""The proxy's TCP connections, both sides: socket options, and writes sent at the end of the loop pass.

Twisted's TCP transport buffers every write, registers the socket for writing
(``epoll_ctl``), sends on the NEXT loop pass and unregisters once drained: per
relayed command two more ``epoll_ctl`` and one more event dispatch on each side.
Here a write to a connection with nothing queued is collected and sent with one
``send()`` when the current loop pass ends (so the responses one read produced go
in one system call, as before); only what the kernel does not take goes through
Twisted's buffer and write events, with its producer back-pressure unchanged. The
loop pass itself dispatches events without Twisted's per-event log context
(``callWithLogger``/``callWithContext``), which the proxy's log does not use.

Only Twisted's epoll reactor is sped up (:func:`install`); on any other reactor, and
for in-memory test transports, :func:`attach` changes nothing. :func:`tune_socket` sets
TCP_NODELAY and keepalive on a new connection, :func:`quick_ack` acknowledges at once.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import sys
import termios
from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, clientFromString
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["install", "installed", "attach", "FastLoop", "tune_socket", "tcp_socket", "quick_ack", "client_endpoint",
           "connect_tcp", "drop", "sending"]

log = Logger()

_FD_WRITE = abstract.FileDescriptor.write  # the raw buffered write (what TLS itself uses)
_IOV_MAX = 1024  # buffers one sendmsg() takes (Linux's UIO_MAXIOV)
_GATHER_FROM = 16 * 1024  # bytes a pass wrote to one connection from which they are sent unjoined


class _EndOfPassWrite:
    """Mixed into a TCP connection's class: :meth:`write` collects, :meth:`_rp_flush` sends."""

    _rp_out: list[bytes] | None = None  # written this pass, not yet sent (instance attribute when set)
    _rp_early = False  # a client's connection: sent before the backends' in a pass

    def write(self, data: bytes) -> None:
        out = self._rp_out
        if out is not None:  # keep the order of what this pass already wrote
            if type(data) is not bytes:
                abstract._dataMustBeBytes(data)
            if data:
                out.append(data)
            return
        if (self.TLS or not self.connected or self.disconnecting or self._writeDisconnected  # type: ignore[attr-defined]
                or self._tempDataLen or len(self.dataBuffer) > self.offset or type(data) is not bytes):  # type: ignore[attr-defined]
            super().write(data)  # type: ignore[misc]
            return
        if data:
            self._rp_out = [data]
            self.reactor._rp_loop.dirty.append(self)  # type: ignore[attr-defined]

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        self._rp_flush()  # what was written in clear text goes first
        super().startTLS(ctx, normal)  # type: ignore[misc]

    def _rp_flush(self) -> None:
        out = self._rp_out
        if out is None:
            return
        self._rp_out = None
        if not self.connected or self._writeDisconnected or self._aborting:  # type: ignore[attr-defined]
            return  # dropped, as Twisted drops its buffer on a lost or aborted connection
        # Several writes holding a literal's chunk or more: sendmsg(), no copy into one joined buffer.
        total = 0 if len(out) == 1 else sum(map(len, out))
        data = None if total > _GATHER_FROM else out[0] if len(out) == 1 else b"".join(out)
        if not (self._tempDataLen or len(self.dataBuffer) > self.offset):  # type: ignore[attr-defined]
            try:
                if data is not None:
                    sent = self.socket.send(data)  # type: ignore[attr-defined]
                else:
                    sent = self.socket.sendmsg(out if len(out) <= _IOV_MAX else out[:_IOV_MAX])  # type: ignore[attr-defined]
            except OSError as e:
                # Would block: buffered below. A real error: buffered too, and the write
                # event that follows finds it and loses the connection the usual way.
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS):
                    log.debug("send failed: {why}", why=e)
                sent = 0
            if data is None:
                if sent == total:
                    return
                data = b"".join(out)  # (rare: the kernel took only part)
            elif sent == len(data):
                return
            data = data[sent:]
        elif data is None:
            data = b"".join(out)
        _FD_WRITE(self, data)  # type: ignore[arg-type]  # the rest waits for a write event


# Twisted's read size, and the one a backend connection grows to while an answer fills
# every read (a big FETCH): 4 x fewer reads, loop passes and relay calls per MB; what one
# read holds (a client that does not read gets at most this much more queued before the
# backend is paused). 1 MiB was slower: the allocator trims the heap after each read.
READ_SIZE = 64 * 1024
BIG_READ = 256 * 1024


class _BulkReads:
    """Mixed into an outgoing (backend) TCP connection: BIG_READ bytes a read while reads
    fill the buffer, 64 KiB again from the first read that does not."""

    def _dataReceived(self, data: bytes) -> Any:
        n, size = len(data), self.bufferSize  # type: ignore[attr-defined,has-type]
        if n >= size and size < BIG_READ:
            self.bufferSize = BIG_READ
        elif n < READ_SIZE < size:
            self.bufferSize = READ_SIZE
        return super()._dataReceived(data)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}
_READ_HERE: set[type] = set()  # the classes FastLoop reads itself (tcp.Connection.doRead's)
_EPOLLIN = 1  # select.EPOLLIN, alone (no EPOLLOUT, EPOLLHUP, EPOLLERR with it)
_WOULD_BLOCK = (errno.EWOULDBLOCK, errno.EAGAIN)


def _fast_class(cls: type) -> type:
    fast = _CLASSES.get(cls)
    if fast is None:
        bases = (_BulkReads, _EndOfPassWrite, cls) if issubclass(cls, tcp.Client) else (_EndOfPassWrite, cls)
        fast = _CLASSES[cls] = type("EndOfPass" + cls.__name__, bases, {"_rp_early": issubclass(cls, tcp.Server)})
        if getattr(fast, "doRead", None) is tcp.Connection.doRead:
            _READ_HERE.add(fast)
    return fast


class FastLoop:
    """The reactor's loop pass: send what was written before and after the events."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.dirty: list[_EndOfPassWrite] = []
        self._poller = reactor._poller
        self._selectables = reactor._selectables
        self._dispatch = reactor._doReadOrWrite

    def flush(self) -> None:
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            if len(dirty) == 1:
                dirty[0]._rp_flush()
                continue
            for conn in dirty:
                if conn._rp_early:
                    conn._rp_flush()
            for conn in dirty:
                if not conn._rp_early:
                    conn._rp_flush()

    def iterate(self, timeout: float | None) -> None:
        """EPollReactor.doPoll, with writes flushed and no log context per event."""
        if self.dirty:
            self.flush()  # written by timed calls or Deferreds since the last pass
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables, dispatch = self._selectables, self._dispatch
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == _EPOLLIN and selectable.__class__ in _READ_HERE:
                # PosixReactorBase._doReadOrWrite + tcp.Connection.doRead for a read event alone
                why: Any = None
                conn: Any = selectable  # a tcp.Connection (its class is in _READ_HERE)
                try:
                    if conn.fileno() == -1:
                        why = _NO_FILEDESC
                    else:
                        try:
                            data = conn.socket.recv(conn.bufferSize)
                        except OSError as se:
                            if se.args[0] not in _WOULD_BLOCK:
                                why = CONNECTION_LOST
                        else:
                            why = conn._dataReceived(data)  # b"": CONNECTION_DONE
                except BaseException:  # as Twisted: the application's error logged, the connection lost
                    why = sys.exc_info()[1]
                    legacy_log.err()
                if why:
                    try:
                        self.reactor._disconnectSelectable(selectable, why, True)
                    except Exception:
                        log.failure("reactor dispatch failed for {selectable!r}", selectable=selectable)
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("reactor dispatch failed for {selectable!r}", selectable=selectable)
        if self.dirty:
            self.flush()


def install(reactor: Any) -> bool:
    """Use the end-of-pass writes on *reactor* if it is Twisted's epoll reactor; True if so."""
    if getattr(reactor, "_rp_loop", None) is not None:
        return True
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    loop = FastLoop(reactor)
    setattr(reactor, "_rp_loop", loop)  # noqa: B010 (an attribute of our own on Twisted's object)
    setattr(reactor, "doIteration", loop.iterate)  # noqa: B010 (mainLoop calls it once a pass)
    return True


def installed(reactor: Any) -> bool:
    return getattr(reactor, "_rp_loop", None) is not None


def attach(transport: Any) -> None:
    """Let the TCP connection under *transport* (under a TLS wrapper too) write at the end of
    the pass, if its reactor has :func:`install`\\ ed; anything else is left as it is."""
    conn = _tcp_connection(transport)
    if conn is not None and installed(getattr(conn, "reactor", None)) and not isinstance(conn, _EndOfPassWrite):
        conn.__class__ = _fast_class(type(conn))


# TCP keepalive: a peer that vanished (a client behind a NAT that forgot it, a backend
# host that went down) is found after about KEEPIDLE + KEEPCNT * KEEPINTVL seconds
# instead of never, so neither its session nor the connections behind it leak.
KEEPIDLE, KEEPINTVL, KEEPCNT = 120, 20, 4


def tune_socket(transport: object) -> socket.socket | None:
    """TCP_NODELAY (IMAP is interactive: Nagle would hold every command) and keepalive
    on a connection; its socket, for quick_ack (None for in-memory test transports).

    An accepted connection inherits these options from its listening socket (Linux), so
    the listener is given them once, with its first connection, and later ones skip the
    five system calls."""
    attach(transport)
    sock = tcp_socket(transport)
    if sock is None:
        set_tcp = getattr(transport, "setTcpNoDelay", None)
        if set_tcp is not None:
            try:
                set_tcp(True)
            except OSError:
                pass
        return None
    port = getattr(_tcp_connection(transport), "server", None)
    if getattr(port, "_rp_tuned", False):
        return sock
    _set_options(sock)
    if isinstance(port, tcp.Port) and sys.platform.startswith("linux"):
        _set_options(port.socket)
        port._rp_tuned = True  # type: ignore[attr-defined]
    return sock


def _set_options(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # also under TLS
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL), ("TCP_KEEPCNT", KEEPCNT)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        pass


def _tcp_connection(transport: Any) -> tcp.Connection | None:
    """The TCP connection under *transport* (a TLS or PROXY-protocol wrapper's, too)."""
    seen = 0
    while transport is not None and seen < 4:
        if isinstance(transport, tcp.Connection):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def tcp_socket(transport: object) -> socket.socket | None:
    """The TCP socket under a transport (under TLS too), or None (tests' in-memory ones)."""
    seen = 0
    while transport is not None and seen < 4:
        handle = getattr(transport, "getHandle", None)
        if handle is not None:
            try:
                sock = handle()
            except Exception:
                sock = None
            if isinstance(sock, socket.socket):
                return sock
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


def quick_ack(sock: socket.socket | None) -> None:
    """Acknowledge at once what was just read (Linux turns quick-ack off again by itself).

    A peer that writes a command in two pieces with Nagle on (c-client does, for
    each literal) otherwise waits for our delayed ACK, 40 ms, every time. Called
    only after a read that left a command or response unfinished: a whole one is
    acknowledged by our answer, and a system call per read would cost ~2.5 us."""
    if sock is not None and _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def sending(transport: Any) -> bool:
    """True if *transport* sends when this loop pass ends: that segment carries the ACK of
    what was read (Linux drops its delayed ACK then), so no :func:`quick_ack` is needed."""
    return getattr(transport, "_rp_out", None) is not None


# -- outgoing connections --------------------------------------------------------------

_ENDPOINTS: dict[tuple[int, str], Any] = {}


def client_endpoint(reactor: Any, spec: str) -> Any:
    """The client endpoint of *spec*, parsed once (Twisted's parser costs ~100 us a call)."""
    key = (id(reactor), spec)
    endpoint = _ENDPOINTS.get(key)
    if endpoint is None:
        if len(_ENDPOINTS) >= 256:  # reloads may name ever new endpoints: stay bounded
            _ENDPOINTS.clear()
        endpoint = _ENDPOINTS[key] = clientFromString(reactor, spec)
    return endpoint


class _OneConnection(ClientFactory):
    """The factory of one connection attempt: its protocol, or *failed(why)*."""

    noisy = False

    def __init__(self, protocol: Any, failed: Any) -> None:
        self.protocol_, self.failed = protocol, failed

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol_

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.failed(reason.getErrorMessage())


def connect_tcp(reactor: Any, spec: str, protocol: Any, timeout: float, failed: Any) -> Any:
    """Connect *protocol* with the reactor's own connectTCP if *spec* is a plain TCP client
    endpoint (no endpoint wrapper in every later read), *failed(why)* if that fails; the
    connector, or None for any other endpoint (the caller uses the endpoint itself)."""
    endpoint = client_endpoint(reactor, spec)
    if type(endpoint) not in (TCP4ClientEndpoint, TCP6ClientEndpoint):
        return None
    return reactor.connectTCP(endpoint._host, endpoint._port, _OneConnection(protocol, failed),
                              timeout=min(endpoint._timeout, timeout), bindAddress=endpoint._bindAddress)


def drop(proto: Any, connector: Any) -> None:
    """Drop a connection at once, whether it is made or still being made."""
    if proto.transport is not None:
        proto.transport.abortConnection()
    elif connector is not None:
        try:
            connector.stopConnecting()
        except Exception:  # already connected or failed meanwhile
            pass


def queued_input(sock: socket.socket | None) -> int:
    """Bytes the peer sent that wait, unread, in the kernel (0 if unknown): a client still sending while the
    proxy, its output backed up, reads nothing of it (unread.py)."""
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0
