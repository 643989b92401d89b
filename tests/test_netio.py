"""End-of-pass writes (referral_proxy.netio) on a private epoll reactor, real sockets:
what one loop pass wrote goes in one send() with no write event, order and producer
back-pressure hold when the kernel takes only part, an aborted connection sends
nothing; the quick-ack rule (only after a read that left a command unfinished)."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from zope.interface import implementer

from referral_proxy import netio
from referral_proxy.testing.fakes import NoDelayTransport, SessionHarness


class _Server(Protocol):
    def __init__(self, box: list[Any]) -> None:
        self.box = box

    def connectionMade(self) -> None:
        netio.attach(self.transport)
        self.box.append(self)


@implementer(IPushProducer)
class _Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


@pytest.fixture
def loop():
    """A private epoll reactor with end-of-pass writes, a listening port, a client socket
    and the server protocol; writes to the reactor's addWriter are recorded."""
    reactor = EPollReactor()
    assert netio.install(reactor)
    added: list[Any] = []
    real_add = reactor.addWriter

    def add_writer(selectable: Any) -> None:
        added.append(selectable)
        real_add(selectable)

    reactor.addWriter = add_writer  # type: ignore[method-assign]
    box: list[Any] = []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Server(box)), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    spin(reactor, lambda: box)
    yield reactor, box[0], client, added
    client.close()
    for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        try:
            selectable.connectionLost(None)
        except Exception:
            pass


def spin(reactor: Any, until: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "condition not reached"
        reactor.iterate(0.01)


def recv_exactly(sock: socket.socket, n: int, reactor: Any = None) -> bytes:
    sock.settimeout(0.01)
    out = bytearray()
    deadline = time.monotonic() + 20
    while len(out) < n:
        assert time.monotonic() < deadline, f"got {len(out)} of {n} bytes"
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            chunk = None
        if chunk == b"":
            break
        if chunk:
            out += chunk
        if reactor is not None:
            reactor.iterate(0)
    return bytes(out)


def test_the_writes_of_one_pass_go_out_together_without_a_write_event(loop) -> None:
    reactor, server, client, added = loop
    assert type(server.transport).__name__.startswith("EndOfPass")
    reactor.callLater(0, lambda: [server.transport.write(b"* 1 EXISTS\r\n"), server.transport.write(b"* 0 RECENT\r\n"),
                                  server.transport.write(b"a OK done\r\n")])
    reactor.iterate(0)
    reactor.iterate(0)
    client.settimeout(5)
    data = client.recv(4096)
    assert data == b"* 1 EXISTS\r\n* 0 RECENT\r\na OK done\r\n"  # one send: all of it in one segment
    assert server.transport not in added  # never registered for writing


def test_what_the_kernel_does_not_take_keeps_its_order_and_pauses_the_producer(loop) -> None:
    reactor, server, client, added = loop
    producer = _Producer()
    server.transport.registerProducer(producer, True)
    server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    big = bytes(range(256)) * 16384  # 4 MiB: more than the socket buffers take
    parts = [big[:3_000_000], big[3_000_000:], b"tail\r\n"]
    reactor.callLater(0, server.transport.write, parts[0])
    reactor.iterate(0)
    reactor.iterate(0)
    assert server.transport in added  # the rest waits for write events, in Twisted's buffer
    assert producer.events == ["pause"]  # back-pressure: more than bufferSize is waiting
    server.transport.write(parts[1])  # a later pass: behind what waits
    server.transport.write(parts[2])
    got = recv_exactly(client, len(big) + 6, reactor)
    assert got == big + b"tail\r\n"
    spin(reactor, lambda: producer.events[-1:] == ["resume"])


def test_a_pass_of_several_big_writes_goes_by_sendmsg_in_order_and_what_is_left_waits(loop, monkeypatch) -> None:
    """Several writes over _GATHER_FROM bytes: one sendmsg(), no joined copy; what the
    kernel does not take (a 4 MiB pass) goes to Twisted's buffer in order."""
    reactor, server, client, added = loop
    calls: list[int] = []
    sock = server.transport.socket
    monkeypatch.setattr(server.transport, "socket", _Counting(sock, calls))
    head, body = b"rp3 APPEND INBOX {20480+}\r\n", bytes(range(256)) * 80
    reactor.callLater(0, lambda: [server.transport.write(head), server.transport.write(body)])
    reactor.iterate(0)
    reactor.iterate(0)
    assert recv_exactly(client, len(head) + len(body), reactor) == head + body
    assert calls == [2]  # one sendmsg of the two buffers
    big = [bytes([i]) * 1_000_000 for i in range(4)]
    reactor.callLater(0, lambda: [server.transport.write(b) for b in big])
    reactor.iterate(0)
    assert server.transport in added  # the kernel took only part
    assert recv_exactly(client, 4_000_000, reactor) == b"".join(big)


class _Counting:
    """A socket whose sendmsg() calls are recorded (the number of buffers each)."""

    def __init__(self, sock: socket.socket, calls: list[int]) -> None:
        self._sock, self._calls = sock, calls

    def sendmsg(self, buffers: list[bytes]) -> int:
        self._calls.append(len(buffers))
        return self._sock.sendmsg(buffers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_an_aborted_connection_sends_nothing_written_in_its_pass(loop) -> None:
    reactor, server, client, added = loop

    def write_then_abort() -> None:
        server.transport.write(b"* BYE never sent\r\n")
        server.transport.abortConnection()

    reactor.callLater(0, write_then_abort)
    for _ in range(5):
        reactor.iterate(0)
    client.settimeout(5)
    try:
        data = client.recv(4096)
    except ConnectionResetError:
        data = b""
    assert data == b""


def test_a_lost_peer_is_found_by_the_write_event_as_before(loop) -> None:
    reactor, server, client, added = loop
    lost: list[Any] = []
    server.connectionLost = lambda reason: lost.append(reason)  # type: ignore[method-assign]
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST
    time.sleep(0.05)
    for _ in range(3):
        reactor.callLater(0, server.transport.write, b"x" * 100)
        reactor.iterate(0.01)
    spin(reactor, lambda: lost)


def test_other_reactors_and_transports_are_left_alone() -> None:
    reactor = SelectReactor()
    assert not netio.install(reactor)
    box: list[Any] = []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Server(box)), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        spin(reactor, lambda: box)
        assert not type(box[0].transport).__name__.startswith("EndOfPass")
    finally:
        client.close()
        port.stopListening()


def test_quick_ack_only_after_a_read_that_left_a_command_unfinished(monkeypatch) -> None:
    """TCP_QUICKACK costs a system call: a whole command gets its ACK with the answer, a
    command cut in two (c-client's literal and its CRLF with Nagle on) gets it at once."""
    calls: list[int] = []
    monkeypatch.setattr("referral_proxy.session.quick_ack", lambda sock: calls.append(1))
    h = SessionHarness()
    h.login()
    calls.clear()
    h.send(b"a1 NOOP\r\n")
    assert calls == []
    h.send(b"a2 NOOP\r\na3 NO")
    assert calls == [1]
    h.send(b"OP\r\n")
    assert calls == [1]
    h.send(b"a4 SEARCH TEXT {5}\r\n")  # waits for our "+", then the data and the line's end
    h.send(b"hello")
    assert len(calls) == 3
    h.send(b"\r\n")
    assert len(calls) == 3


class _PassTransport(NoDelayTransport):
    """In memory, what netio's end-of-pass write marks: written this pass, not sent yet."""

    _rp_out: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        self._rp_out = (self._rp_out or []) + [data]
        super().write(data)


def test_no_quick_ack_when_our_answer_at_the_passs_end_carries_the_ack(monkeypatch) -> None:
    """A sync literal the proxy says "+" to itself: that segment acknowledges the command
    line (one setsockopt fewer per APPEND); nothing written: the ACK is sent at once."""
    calls: list[int] = []
    monkeypatch.setattr("referral_proxy.session.quick_ack", lambda sock: calls.append(1))
    client = _PassTransport()
    h = SessionHarness(client=client)
    h.login()
    client._rp_out, calls[:] = None, []
    h.send(b"a4 SEARCH TEXT {5}\r\n")  # "+" written this pass
    assert h.to_client() == b"+ Ready for literal data\r\n" and calls == []
    client._rp_out = None  # the pass ended: sent
    h.send(b"hello")  # nothing to send: the client may wait for our ACK (Nagle)
    assert calls == [1]


def test_sending_from_a_write_to_the_end_of_the_pass(loop) -> None:
    reactor, server, client, _added = loop
    assert not netio.sending(server.transport)
    server.transport.write(b"+ Ready\r\n")
    assert netio.sending(server.transport)
    reactor.iterate(0)
    assert not netio.sending(server.transport)
    assert client.recv(100) == b"+ Ready\r\n"


def test_every_accepted_connection_has_nodelay_and_keepalive(loop) -> None:
    """The first connection tunes its listener; later ones inherit the options (no calls)."""
    reactor, first, client, added = loop
    port = first.transport.server
    box: list[Any] = []
    port.factory = Factory.forProtocol(lambda: _Server(box))
    for _ in range(3):
        assert netio.tune_socket(first.transport) is not None  # as the session does, again: no harm
    assert getattr(port, "_rp_tuned", False)
    others = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
    try:
        spin(reactor, lambda: len(box) == 2)
        for server in box:
            sock = server.transport.socket
            netio.tune_socket(server.transport)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == netio.KEEPIDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == netio.KEEPCNT
    finally:
        for s in others:
            s.close()


def _backend(port: int, timeout: float):
    from referral_proxy.config import BackendConfig

    return BackendConfig(name="b9", endpoint=f"tcp:host=127.0.0.1:port={port}", url=f"imap://127.0.0.1:{port}",
                         connect_timeout=timeout)


def _outcome(reactor: Any, config: Any) -> Any:
    from twisted.internet import defer

    from referral_proxy.backend import Credentials
    from referral_proxy.backendlogin import connect_backend

    d = defer.ensureDeferred(connect_backend(reactor, config, Credentials("u", "p")))
    result: list[Any] = []
    d.addBoth(result.append)
    spin(reactor, lambda: result, timeout=20)
    return result[0]


def test_a_backend_that_accepts_and_never_greets_is_dropped_at_the_limit() -> None:
    from referral_proxy.backend import BackendUnavailable
    from referral_proxy.backendlogin import LOGIN_TIMEOUT_FACTOR

    reactor = EPollReactor()
    netio.install(reactor)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        failure = _outcome(reactor, _backend(silent.getsockname()[1], 0.1))
        assert failure.check(BackendUnavailable), failure
        assert f"no answer within {LOGIN_TIMEOUT_FACTOR * 0.1:g}s" in str(failure.value)
        conn, _ = silent.accept()
        conn.settimeout(5)
        try:
            assert conn.recv(100) == b""  # the proxy dropped it
        except ConnectionResetError:
            pass
        conn.close()
    finally:
        silent.close()


def test_a_refused_connection_is_unreachable() -> None:
    from referral_proxy.backend import BackendUnavailable

    reactor = EPollReactor()
    netio.install(reactor)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    failure = _outcome(reactor, _backend(port, 5))
    assert failure.check(BackendUnavailable) and "b9 unreachable" in str(failure.value), failure


def test_a_pass_sends_to_clients_before_backends(loop, monkeypatch) -> None:
    """The proxy's own "+" to a client goes out before the message data that read sent on to
    the backend: the client's next literal overlaps the backend's work on the last one."""
    reactor, server, client, added = loop
    outgoing: list[Any] = []

    class _Out(Protocol):
        def connectionMade(self) -> None:
            netio.attach(self.transport)
            outgoing.append(self)

    from twisted.internet.protocol import ClientFactory
    factory = ClientFactory.forProtocol(_Out)
    reactor.connectTCP("127.0.0.1", server.transport.getHost().port, factory)
    spin(reactor, lambda: outgoing and len(server.box) == 2)
    sent: list[Any] = []
    real = netio._EndOfPassWrite._rp_flush

    def recording(self: Any) -> None:
        sent.append(self)
        real(self)

    monkeypatch.setattr(netio._EndOfPassWrite, "_rp_flush", recording)
    backend, accepted = outgoing[0].transport, server.transport
    reactor.callLater(0, lambda: [backend.write(b"message data"), accepted.write(b"+ Ready for literal data\r\n")])
    reactor.iterate(0)
    reactor.iterate(0)
    assert sent == [accepted, backend]
    client.settimeout(5)
    assert client.recv(4096) == b"+ Ready for literal data\r\n"


def test_a_readable_connection_is_read_by_the_loop_pass_itself(loop, monkeypatch) -> None:
    """A read event alone on a connection of ours: the loop reads it without Twisted's
    dispatch and doRead (old code: doRead raised here, the connection was lost)."""
    reactor, server, client, added = loop
    got: list[bytes] = []
    lost: list[Any] = []
    server.dataReceived = got.append  # type: ignore[method-assign]
    server.connectionLost = lost.append  # type: ignore[method-assign]

    def boom(self: Any) -> None:
        raise AssertionError("Twisted's doRead called")

    monkeypatch.setattr(type(server.transport), "doRead", boom)
    client.sendall(b"a1 NOOP\r\n")
    spin(reactor, lambda: got or lost)
    client.sendall(b"a2 NOOP\r\na3 NOOP\r\n")
    spin(reactor, lambda: b"".join(got).endswith(b"a3 NOOP\r\n") or lost)
    assert not lost and b"".join(got) == b"a1 NOOP\r\na2 NOOP\r\na3 NOOP\r\n"


def test_the_loops_own_read_ends_on_eof_and_on_an_error_as_twisted_does(loop) -> None:
    """The peer's FIN: connectionLost(ConnectionDone); an exception from dataReceived:
    logged, the connection lost with it (what _doReadOrWrite does)."""
    from twisted.internet.error import ConnectionDone
    from twisted.python import log as legacy_log

    reactor, server, client, added = loop
    lost: list[Any] = []
    server.connectionLost = lost.append  # type: ignore[method-assign]
    client.shutdown(socket.SHUT_WR)
    spin(reactor, lambda: lost)
    assert lost[0].check(ConnectionDone)

    errors: list[Any] = []
    observer = errors.append
    legacy_log.addObserver(observer)
    try:
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Server(box)), interface="127.0.0.1")
        box: list[Any] = []
        other = socket.create_connection(("127.0.0.1", port.getHost().port))
        spin(reactor, lambda: box)
        failing = box[0]
        gone: list[Any] = []

        def fail(data: bytes) -> None:
            raise ValueError("the application failed")

        failing.dataReceived = fail  # type: ignore[method-assign]
        failing.connectionLost = gone.append  # type: ignore[method-assign]
        other.sendall(b"a1 NOOP\r\n")
        spin(reactor, lambda: gone)
        assert gone[0].check(ValueError)
        assert any(e.get("isError") for e in errors)
        other.close()
        port.stopListening()
    finally:
        legacy_log.removeObserver(observer)
