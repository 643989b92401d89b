"""A session that ends with nothing under way is freed by reference counting, no cycle left
to the collector (referral_proxy.teardown); one that ends mid-command keeps working for
what still answers it. And the local address of a connection without a getsockname()
per accept (origin.local_address)."""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from referral_proxy.origin import local_address
from referral_proxy.session import ClientSession
from referral_proxy.testing.fakes import HeldConnector, NoDelayTransport, SessionHarness

DONE = Failure(ConnectionDone())


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Only reference counting frees objects while the test runs; what is left over is
    counted by the collection at its end."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    _MINE.clear()
    try:
        yield
    finally:
        _MINE.clear()
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _new_session(h: SessionHarness) -> weakref.ref[ClientSession]:
    h.session = ClientSession(h.context)
    h.client = NoDelayTransport()
    h.session.makeConnection(h.client)
    return weakref.ref(h.session)


def _forget(h: SessionHarness) -> None:
    h.connector.backends.clear()
    h.session = None  # type: ignore[assignment]
    h.client = None  # type: ignore[assignment]


def _lose(h: SessionHarness) -> None:
    """The client's connection lost, as Twisted's TCP transport tells it (its producer let go first)."""
    if h.client.producer is not None:
        h.client.unregisterProducer()
    _track(h.session)
    h.session.connectionLost(DONE)


_MINE: set[tuple[int, type]] = set()  # the objects of the sessions a test ended (id, type)


def _track(session: ClientSession) -> None:
    """Remember *session* and its collaborators, to find them among the garbage: other tests'
    objects may become garbage meanwhile (Twisted's log buffer letting old events go)."""
    flow = session.flow
    parts = [session, session.relay, session.mailboxes, session.auth, session.appends, session.idle,
             session.reader, session.pool, flow, flow.out, flow.client_output, flow.gate, flow.backends]
    _MINE.update((id(o), type(o)) for o in parts if o is not None)


def _cyclic_garbage() -> list[str]:
    """The tracked objects only a collection frees (each type named once)."""
    gc.collect()
    names = sorted({type(o).__name__ for o in gc.garbage if (id(o), type(o)) in _MINE})
    gc.garbage.clear()
    return names


def _login_select(h: SessionHarness) -> None:
    h.login()
    h.send(b"s SELECT INBOX\r\n")
    tag = h.to_backend().split(b" ", 1)[0]
    h.from_backend(b"* 3 EXISTS\r\n%s OK [READ-WRITE] Select completed.\r\n" % tag)
    assert h.to_client().endswith(b"s OK [READ-WRITE] Select completed.\r\n")


def test_a_session_ended_by_logout_leaves_no_cycle(no_collector: None) -> None:
    h = SessionHarness()
    _forget(h)  # the harness's own first session is left as it is: not part of the count
    _cyclic_garbage()
    for _ in range(3):  # the second and third: nothing cached by the first counts
        ref = _new_session(h)
        _login_select(h)
        h.send(b"o LOGOUT\r\n")
        assert h.to_client() == b"* BYE Logging out\r\no OK Logout completed.\r\n"
        backend = h.backend
        _track(h.session)
        h.session.connectionLost(DONE)
        backend.connectionLost(DONE)
        h.turns()
        _forget(h)
        del backend
        assert ref() is None, "the session outlived its last reference"
        assert _cyclic_garbage() == []


def test_a_client_gone_before_login_or_between_commands_leaves_no_cycle(no_collector: None) -> None:
    h = SessionHarness()
    _forget(h)
    _cyclic_garbage()
    ref = _new_session(h)  # connected, never logged in
    _lose(h)
    _forget(h)
    assert ref() is None
    ref = _new_session(h)  # logged in, a mailbox selected, then the client is killed
    _login_select(h)
    backend = h.backend
    _lose(h)
    h.turns()
    assert b"LOGOUT" in backend.transport.value()
    backend.connectionLost(DONE)
    _forget(h)
    del backend
    assert ref() is None
    assert _cyclic_garbage() == []


def test_a_client_killed_mid_command_is_left_to_the_collector_and_the_late_answer_is_harmless(
        no_collector: None) -> None:
    """A command in flight: the session is not unlinked (its answer still comes back to it)."""
    h = SessionHarness()
    _forget(h)
    _cyclic_garbage()
    ref = _new_session(h)
    _login_select(h)
    h.send(b"f FETCH 1 (FLAGS)\r\n")
    tag = h.to_backend().split(b" ", 1)[0]
    session = h.session
    _track(session)
    session.connectionLost(DONE)
    backend = h.backend
    backend.dataReceived(b"* 1 FETCH (FLAGS (\\Seen))\r\n%s OK Fetch completed.\r\n" % tag)  # no error
    h.turns()
    assert session.relay is not None and session.relay.in_flight == 0
    backend.connectionLost(DONE)
    _forget(h)
    del session, backend
    assert ref() is not None  # a cycle: the collector's, as before
    assert "ClientSession" in _cyclic_garbage()


class _Record(Protocol):
    def __init__(self, box: list[Any]) -> None:
        self.box = box

    def connectionMade(self) -> None:
        self.box.append((local_address(self.transport), self.transport.getHost()))


@pytest.mark.parametrize("interface", ["127.0.0.1", "0.0.0.0"])
def test_local_address_is_getHost(interface: str) -> None:
    reactor = EPollReactor()
    box: list[Any] = []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Record(box)), interface=interface)
    clients = []
    try:
        for _ in range(2):
            clients.append(socket.create_connection(("127.0.0.1", port.getHost().port)))
            for _ in range(100):
                if len(box) == len(clients):
                    break
                reactor.iterate(0.01)
        assert [mine for mine, _ in box] == [theirs for _, theirs in box]
        assert [mine.port for mine, _ in box] == [port.getHost().port] * 2
        assert port._rp_host == (False if interface == "0.0.0.0" else port.getHost())
    finally:
        for c in clients:
            c.close()
        port.stopListening()
        for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):
            reactor.removeReader(selectable)
            reactor.removeWriter(selectable)



def _script(h: SessionHarness, connector: HeldConnector) -> Iterator[str]:
    """One session, step by step (a name per step): the client may be killed after each."""
    yield "connected"
    h.send(b"L LOGIN alice secret\r\n")
    yield "login under way"
    h.send(b"x NOOP\r\n")
    yield "a command sent during the login"
    connector.held.pop().callback(None)
    h.turns()
    yield "logged in"
    h.to_backend()
    backend = h.backend
    backend.dataReceived(b"rp1 OK NOOP completed.\r\n")
    h.turns()
    yield "the pipelined NOOP answered"
    h.send(b"s SELECT INBOX\r\n")
    yield "SELECT sent"
    tag = h.to_backend().split(b" ", 1)[0]
    backend.dataReceived(b"* 3 EXISTS\r\n")
    yield "SELECT half answered"
    backend.dataReceived(b"%s OK [READ-WRITE] Select completed.\r\n" % tag)
    h.turns()
    yield "SELECT answered"
    h.send(b"f FETCH 1:* (FLAGS)\r\ns2 STATUS INBOX (MESSAGES)\r\n")  # pipelined in one write
    yield "FETCH and STATUS sent"
    for line in h.to_backend().split(b"\r\n")[:-1]:
        tag = line.split(b" ", 1)[0]
        backend.dataReceived(b"%s OK done\r\n" % tag)
    h.turns()
    yield "FETCH and STATUS answered"
    h.send(b"o LOGOUT\r\n")
    yield "LOGOUT sent"


@pytest.mark.parametrize("kill_after", range(11))
def test_a_client_killed_at_every_step_ends_cleanly(kill_after: int) -> None:
    """Killed after each step, then every backend answers what it still owed and goes away:
    no error logged, nothing counted as still connected, the session not kept alive."""
    from twisted.logger import globalLogPublisher

    errors: list[dict] = []

    def watch(event: dict) -> None:
        if event.get("log_failure") is not None or getattr(event.get("log_level"), "name", "") in ("error", "critical"):
            errors.append(event)

    globalLogPublisher.addObserver(watch)
    try:
        connector = HeldConnector()
        h = SessionHarness(connector=connector)
        h.to_client()
        ref = weakref.ref(h.session)
        steps = _script(h, connector)
        for _ in range(kill_after + 1):
            assert next(steps, None) is not None
        _lose(h)
        h.turns()
        for held in connector.held:  # a login still connecting: its connection is made after all
            held.callback(None)
        h.turns()
        for backend in list(connector.backends):
            sent = backend.transport.value()
            for line in sent.split(b"\r\n")[:-1]:  # every command it was sent, answered late
                backend.dataReceived(b"%s OK late\r\n" % line.split(b" ", 1)[0])
            backend.connectionLost(DONE)
        h.turns()
        assert errors == []
        assert h.context.admission.connections == 0
        assert h.context.observer.sessions == 0
        _forget(h)
        gc.collect()
        assert ref() is None
    finally:
        globalLogPublisher.removeObserver(watch)


def test_200_short_sessions_each_pipelined_in_one_write(no_collector: None) -> None:
    """LOGIN, SELECT and LOGOUT in one write, 200 sessions, 10 logins under way together (the
    unauthenticated-per-address limit): each socket is paused for the bytes waiting behind
    its login, every session gets its three answers in order, and all are freed without the
    collector."""
    connector = HeldConnector()
    h = SessionHarness(connector=connector)
    _forget(h)
    _cyclic_garbage()
    refs = []
    for wave in range(20):
        sessions = []
        for i in range(wave * 10, wave * 10 + 10):
            refs.append(_new_session(h))
            h.to_client()
            h.send(b"a%d LOGIN alice secret\r\nb%d SELECT INBOX\r\nc%d LOGOUT\r\n" % (i, i, i))
            assert h.client.producerState == "paused"
            sessions.append((i, h.session, h.client))
        for held in connector.held:
            held.callback(None)
        connector.held.clear()
        h.turns()
        for (i, session, client), backend in zip(sessions, connector.backends):
            select = backend.transport.value().split(b"\r\n")[-2]
            assert select.endswith(b" SELECT INBOX"), select
            backend.dataReceived(b"%s OK [READ-WRITE] Select completed.\r\n" % select.split(b" ", 1)[0])
            h.turns()
            lines = client.value().split(b"\r\n")
            assert [line.split(b" ", 1)[0] for line in lines if line and not line.startswith(b"*")] == [
                b"a%d" % i, b"b%d" % i, b"c%d" % i], lines
            assert client.disconnecting
            if client.producer is not None:
                client.unregisterProducer()
            _track(session)
            session.connectionLost(DONE)
            backend.connectionLost(DONE)
        h.turns()
        del sessions, session, client, backend
        _forget(h)
    assert [r for r in refs if r() is not None] == []
    assert _cyclic_garbage() == []
