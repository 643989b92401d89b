"""peerholds.py without processes: finding the other proxies on one SQLite map file, asking them to
hold, and holding for them (what is held, for how long, what is said), and the master's relay asking
them for its workers' RENAMEs.

The race it prevents, with real proxies and Dovecot: tests/test_rename_stale_lock.py
(``..._on_one_sqlite_file``, ``..._between_a_master_and_another_proxy...``)."""

from __future__ import annotations

import json
import os
import socket

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from referral_proxy import peerholds
from referral_proxy.peerholds import MapFile, PeerHolds, _Serve, address, listening, map_file
from referral_proxy.renamehold import REMOTE_HOLD
from referral_proxy.workerholds import ASK_WAIT, MASTER, PEER, HoldRelay, encode

KEY = "0123456789abcdef01234567"
OURS = frozenset({0, os.getuid()})
WHERE = MapFile(KEY, OURS)
HEAD = "Num       RefCount Protocol Flags    Type St Inode Path\n"


def _row(path: str, flags: str = "00010000", inode: int = 1) -> str:
    return f"0000000000000000: 00000002 00000000 {flags} 0001 01 {inode} {path}\n"


def test_the_other_proxies_on_the_map_file_are_found_listening(tmp_path):
    me = os.getpid()
    table = tmp_path / "unix"
    table.write_text(HEAD + "".join([
        _row(f"@{peerholds.PREFIX}/{KEY}/101"),
        _row(f"@{peerholds.PREFIX}/{KEY}/101", flags="00000000", inode=2),  # a connection it accepted
        _row(f"@{peerholds.PREFIX}/{KEY}/202", inode=3),
        _row(f"@{peerholds.PREFIX}/{KEY}/{me}", inode=4),  # this process's own
        _row(f"@{peerholds.PREFIX}/{'f' * 24}/303", inode=5),  # another map file's
        _row(f"@{peerholds.PREFIX}/{KEY}/x1", inode=6),  # not ours
        _row(f"/run/{peerholds.PREFIX}/{KEY}/404", inode=7),  # a file, not an abstract name
        "garbage\n",
        _row("", inode=8),
    ]))
    assert listening(KEY, me, table) == [address(KEY, 101), address(KEY, 202)]
    assert address(KEY, 101) == f"\0{peerholds.PREFIX}/{KEY}/101"
    assert listening(KEY, me, tmp_path / "missing") == []


def test_one_key_per_map_file_whatever_path_names_it_and_its_owner_trusted(tmp_path):
    (tmp_path / "map.sqlite3").write_bytes(b"")
    (tmp_path / "link.sqlite3").symlink_to(tmp_path / "map.sqlite3")
    if os.getuid() == 0:
        os.chown(tmp_path / "map.sqlite3", 4321, -1)
    one = map_file(f"sqlite:{tmp_path / 'map.sqlite3'}")
    assert one is not None and one == map_file(f"sqlite:{tmp_path / 'link.sqlite3'}")
    assert one.uids == OURS | ({4321} if os.getuid() == 0 else set())  # (a proxy run as the mail user, `move` as root)
    other = map_file(f"sqlite:{tmp_path / 'other.sqlite3'}")  # not made yet
    assert other is not None and other.key != one.key and other.uids == OURS
    assert map_file("sqlite::memory:") is None and map_file("postgresql://p@db/map") is None and map_file(None) is None


class _Here:
    """A proxy's own holds: hold_here(backend, user) calls, each answered by the test."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, defer.Deferred]] = []
        self.released: list[tuple[str, str]] = []

    def hold_here(self, backend: str, user: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.asked.append((backend, user, d))
        return d

    def grant(self, i: int = -1) -> None:
        backend, user, d = self.asked[i]
        d.callback(lambda: self.released.append((backend, user)))


def _served(here: _Here, clock: Clock) -> tuple[_Serve, StringTransport]:
    serve = _Serve(here.hold_here, clock, OURS)
    transport = StringTransport()
    serve.makeConnection(transport)  # (a StringTransport has no socket: no SO_PEERCRED to look at)
    return serve, transport


ODD_USER = 'c"a\\r%o*l\r\n\udce9'  # CR LF " \ % * and an 8-bit byte (surrogateescape), as a name may be


def test_a_hold_asked_byte_by_byte_is_held_said_and_ended_by_the_close():
    here, clock = _Here(), Clock()
    serve, transport = _served(here, clock)
    line = encode({"hold": "77.1", "backend": "b1", "user": ODD_USER})
    for i in range(len(line)):
        serve.dataReceived(line[i:i + 1])
    serve.dataReceived(encode({"hold": "77.2", "backend": "b2", "user": "x"}))  # one hold per connection
    assert [(b, u) for b, u, _d in here.asked] == [("b1", ODD_USER)]
    assert transport.value() == b""  # not said before it holds
    here.grant()
    assert json.loads(transport.value()) == {"held": "77.1"}
    assert here.released == []
    serve.connectionLost(Failure(ConnectionDone()))  # the RENAME is over (or its process died)
    assert here.released == [("b1", ODD_USER)]
    clock.advance(REMOTE_HOLD + 1)
    assert here.released == [("b1", ODD_USER)]  # once


def test_a_hold_lasts_remote_hold_at_most():
    here, clock = _Here(), Clock()
    serve, transport = _served(here, clock)
    serve.dataReceived(encode({"hold": "77.1", "backend": "b1", "user": "carol"}))
    here.grant()
    clock.advance(REMOTE_HOLD - 0.1)
    assert here.released == [] and not transport.disconnecting
    clock.advance(0.2)
    assert here.released == [("b1", "carol")] and transport.disconnecting
    serve.connectionLost(Failure(ConnectionDone()))
    assert here.released == [("b1", "carol")]


def test_a_close_while_the_commands_in_flight_are_waited_for_holds_nothing():
    here, clock = _Here(), Clock()
    serve, transport = _served(here, clock)
    serve.dataReceived(b"not json\n" + encode(["a", "list"]) + encode({"hold": "77.1", "backend": "b1",
                                                                        "user": "carol"}))
    serve.connectionLost(Failure(ConnectionDone()))
    here.grant()  # held only now: let go at once, nothing said
    assert here.released == [("b1", "carol")] and transport.value() == b""


def test_a_hold_that_fails_here_closes_the_connection_at_once():
    here, clock = _Here(), Clock()
    serve, transport = _served(here, clock)
    serve.dataReceived(encode({"hold": "77.1", "backend": "b1", "user": "carol"}))
    here.asked[0][2].errback(RuntimeError("no"))
    assert transport.disconnecting and transport.value() == b""


def _connect(reactor: MemoryReactorClock, i: int) -> tuple[object, StringTransport]:
    """The i-th connection PeerHolds asked for, made."""
    _address, factory, _timeout, _pid = reactor.unixClients[i]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def _table(tmp_path, *pids: int):
    table = tmp_path / "unix"
    table.write_text(HEAD + "".join(_row(f"@{peerholds.PREFIX}/{KEY}/{p}", inode=p) for p in pids))
    return table


def test_a_rename_goes_on_once_every_other_proxy_holds_or_is_gone(tmp_path):
    reactor = MemoryReactorClock()
    peers = PeerHolds(WHERE, reactor, _table(tmp_path, 101, 202, 303))
    d = defer.ensureDeferred(peers.hold("b1", ODD_USER))
    assert [a for a, *_ in reactor.unixClients] == [address(KEY, p) for p in (101, 202, 303)]
    one, t1 = _connect(reactor, 0)
    two, t2 = _connect(reactor, 1)
    asked = json.loads(t1.value())
    assert asked["backend"] == "b1" and asked["user"] == ODD_USER and json.loads(t2.value()) == asked
    reactor.unixClients[2][1].clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # died meanwhile
    one.dataReceived(encode({"held": asked["hold"]}))
    assert not d.called
    two.connectionLost(Failure(ConnectionDone()))  # gone before it held: not waited for
    assert d.called
    release = d.result
    assert not t1.disconnecting
    release()
    assert t1.disconnecting


def test_a_rename_waits_ask_wait_at_most_and_its_release_ends_the_late_hold(tmp_path):
    reactor = MemoryReactorClock()
    peers = PeerHolds(WHERE, reactor, _table(tmp_path, 101))
    d = defer.ensureDeferred(peers.hold("b1", "carol"))
    proto, transport = _connect(reactor, 0)
    reactor.advance(ASK_WAIT - 0.1)
    assert not d.called
    reactor.advance(0.2)
    assert d.called  # renaming regardless
    release = d.result
    proto.dataReceived(encode({"held": "late"}))  # (said too late: nothing waits for it)
    release()
    assert transport.disconnecting  # the other proxy lets go


def test_no_other_proxy_no_connection(tmp_path):
    reactor = MemoryReactorClock()
    d = defer.ensureDeferred(PeerHolds(WHERE, reactor, _table(tmp_path, os.getpid())).hold("b1", "carol"))
    assert d.called and reactor.unixClients == []


class _Peers:
    """The relay's ask of the other proxies: each call answered by the test."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, defer.Deferred]] = []
        self.released: list[tuple[str, str]] = []

    async def hold(self, backend: str, user: str):
        d: defer.Deferred = defer.Deferred()
        self.asked.append((backend, user, d))
        return await d

    def grant(self, i: int = -1) -> None:
        backend, user, d = self.asked[i]
        d.callback(lambda: self.released.append((backend, user)))


def _relay(live: set[int], peers: _Peers) -> tuple[HoldRelay, dict[int, list[dict]]]:
    said: dict[int, list[dict]] = {i: [] for i in range(PEER, 3)}
    return HoldRelay(lambda i, line: said[i].append(json.loads(line)), lambda: sorted(live), peers.hold), said


def test_a_workers_rename_waits_for_the_other_proxies_too_and_its_end_lets_them_go():
    peers = _Peers()
    relay, said = _relay({0, 1}, peers)
    relay.received(0, encode({"hold": "9.1", "backend": "b1", "user": "carol"}))
    assert [(b, u) for b, u, _d in peers.asked] == [("b1", "carol")]
    relay.received(1, encode({"held": [0, "9.1"]}))
    assert said[0] == []  # the other proxies have not held yet
    peers.grant()
    assert said[0] == [{"go": "9.1"}]
    relay.received(0, encode({"end": "9.1"}))
    assert peers.released == [("b1", "carol")]


def test_the_masters_own_rename_asks_the_other_proxies_but_a_hold_served_for_them_does_not_ask_back():
    peers = _Peers()
    relay, said = _relay({0}, peers)
    relay.received(MASTER, encode({"hold": "1.1", "backend": "b1", "user": "carol"}))
    assert len(peers.asked) == 1
    relay.received(PEER, encode({"hold": "1.2", "backend": "b1", "user": "carol"}))
    assert len(peers.asked) == 1  # never back to the proxies, one of which asked
    relay.received(0, encode({"held": [PEER, "1.2"]}))
    assert said[PEER] == [{"go": "1.2"}]


def test_a_rename_ended_before_the_other_proxies_held_lets_them_go_when_they_do():
    peers = _Peers()
    relay, said = _relay({0}, peers)
    relay.received(0, encode({"hold": "9.1", "backend": "b1", "user": "carol"}))
    relay.ended(0)  # its worker died
    peers.grant()
    assert peers.released == [("b1", "carol")] and relay.active == {} and relay.waiting == {}


def test_the_end_is_heard_at_once_even_if_this_process_stalls_before_the_reactor_turns():
    """A release shuts the socket down itself: the other proxy reads the end without this reactor running
    again (tests/test_list_during_moves.py's stepwise proxy stops the whole process at a journal step)."""
    mine, theirs = socket.socketpair()
    try:
        ask = peerholds._Ask(b"", OURS)
        transport = StringTransport()
        transport.socket = mine  # type: ignore[attr-defined]
        ask.makeConnection(transport)
        ask.end()
        theirs.settimeout(1)
        assert theirs.recv(10) == b""  # EOF, now
        assert transport.disconnecting
    finally:
        mine.close()
        theirs.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_only_processes_of_this_user_or_root_are_served_or_asked():
    """A process of another user (not root, this one's, the map file's owner) on the abstract socket (it
    has no file permissions) is neither served nor waited for."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"\0{peerholds.PREFIX}-test/{os.getpid()}")
    server.listen(2)
    children = []
    try:
        for uid in (0, 65534):
            pid = os.fork()
            if pid == 0:  # the child: connect as *uid*, wait to be closed
                try:
                    os.setuid(uid)
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.connect(server.getsockname())
                    c.recv(1)
                finally:
                    os._exit(0)
            children.append(pid)
            conn, _ = server.accept()
            with conn:
                transport = StringTransport()
                transport.socket = conn  # type: ignore[attr-defined]
                serve = _Serve(lambda b, u: defer.succeed(lambda: None), Clock(), OURS)
                serve.makeConnection(transport)
                assert transport.disconnecting is (uid != 0), uid
                ask = peerholds._Ask(b"line\n", OURS)
                transport = StringTransport()
                transport.socket = conn  # type: ignore[attr-defined]
                ask.makeConnection(transport)
                assert ask.held.called is (uid != 0) and transport.value() == (b"" if uid else b"line\n"), uid
    finally:
        server.close()
        for pid in children:
            os.waitpid(pid, 0)
