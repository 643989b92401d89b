"""renamehold.py without a backend: what a RENAME's hold holds back, what it waits for, and for how long.

The race it prevents, with real Dovecot: tests/test_rename_stale_lock.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from referral_proxy import proxyappends, renamehold
from referral_proxy.append import AppendCommand, _Part
from referral_proxy.backend import BackendProtocol
from referral_proxy.config import BackendConfig
from referral_proxy.flow import PeerPause, ReadGate
from referral_proxy.journal import Reservation
from referral_proxy.renamehold import QUIET_WAIT, REMOTE_HOLD, REMOTE_QUIET, hold_for_another, hold_others
from referral_proxy.turns import Turns


class _Producer:
    def __init__(self) -> None:
        self.paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.paused -= 1

    def stopProducing(self) -> None:
        pass


def _backend(name: str = "b1") -> tuple[BackendProtocol, _Producer]:
    conn = BackendProtocol(BackendConfig(name=name, endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2"))
    conn.makeConnection(StringTransport())
    conn.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
    producer = _Producer()
    conn.transport.registerProducer(producer, True)
    return conn, producer


def _sent(conn: BackendProtocol) -> bytes:
    out = conn.transport.value()
    conn.transport.clear()
    return out


def test_the_next_command_and_all_after_it_wait_while_what_is_in_flight_goes_on():
    conn, producer = _backend()
    appending = conn.command(b"APPEND X {5}", then=[b"hello\r\n"])
    assert _sent(conn) == b"rp1 APPEND X {5}\r\n"
    conn.hold_writes()
    in_flight = conn.tags_in_flight()
    assert in_flight == {b"rp1"}
    conn.dataReceived(b"+ go\r\n")  # the command in flight: its literal goes, held or not
    assert _sent(conn) == b"hello\r\n" and producer.paused == 0
    status = conn.command(b"STATUS X (MESSAGES)")  # begun while held: it and what follows wait
    conn.write(b"anything after it\r\n")
    assert _sent(conn) == b"" and producer.paused == 1  # the client's reading paused with it
    assert conn.tags_in_flight() == {b"rp1"} and conn.still_in_flight(in_flight)
    conn.dataReceived(b"rp1 OK [APPENDUID 1 1] done\r\n")
    assert appending.called and not conn.still_in_flight(in_flight)
    conn.release_writes()
    assert _sent(conn) == b"rp2 STATUS X (MESSAGES)\r\nanything after it\r\n" and producer.paused == 0
    conn.dataReceived(b"* STATUS X (MESSAGES 1)\r\nrp2 OK done\r\n")
    assert status.called
    conn.command(b"NOOP")  # released: nothing held any more
    assert _sent(conn) == b"rp3 NOOP\r\n"


def test_a_hold_with_nothing_begun_releases_nothing_and_pauses_nothing():
    conn, producer = _backend()
    conn.hold_writes()
    conn.write(b"DONE\r\n")  # an IDLE's end is no command begun
    assert _sent(conn) == b"DONE\r\n"
    conn.release_writes()
    assert producer.paused == 0 and _sent(conn) == b""


def _session(user: str, conns: dict[str, BackendProtocol], idling: BackendProtocol | None = None) -> SimpleNamespace:
    return SimpleNamespace(user=user, pool=SimpleNamespace(conns=conns),
                           idle=SimpleNamespace(current=None if idling is None else SimpleNamespace(conn=idling)))


def _ctx(clock: Clock, *sessions: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(reactor=clock, sessions=list(sessions), rename_holds={}, remote_holds={}, move_turns=Turns(),
                           look_at_sessions=lambda: False)


def _fired(d: defer.Deferred) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_a_rename_waits_for_the_other_sessions_commands_in_flight_on_its_backend_only():
    clock = Clock()
    own, _ = _backend()
    busy, _ = _backend()
    idle, _ = _backend()
    elsewhere, _ = _backend("b2")
    stranger, _ = _backend()
    for conn, text in ((own, b"NOOP"), (busy, b"STATUS X (MESSAGES)"), (elsewhere, b"NOOP"), (stranger, b"NOOP")):
        conn.command(text)
    idle.write(b"rp1 IDLE\r\n")
    idle.expect(b"rp1", lambda *_: None)
    ctx = _ctx(clock, _session("carol", {"b1": own}), _session("carol", {"b1": busy, "b2": elsewhere}),
               _session("carol", {"b1": idle}, idling=idle), _session("dave", {"b1": stranger}))
    held = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol", own)))
    clock.advance(1)
    assert not held  # the STATUS on b1 of carol's other session: not answered yet
    assert ctx.rename_holds[("b1", "carol")].conns == {busy, idle}
    busy.dataReceived(b"rp1 OK done\r\n")
    clock.advance(renamehold.POLL)
    assert len(held) == 1 and callable(held[0])  # the IDLE is not waited for, nor b2, nor dave
    busy.command(b"SELECT X")
    assert _sent(busy) == b"rp1 STATUS X (MESSAGES)\r\n"  # (sent before the hold) and not the SELECT
    own.command(b"RENAME X Y")
    assert _sent(own).endswith(b"RENAME X Y\r\n")  # the RENAME's own connection is not held
    held[0]()
    assert _sent(busy) == b"rp2 SELECT X\r\n" and ctx.rename_holds == {}


def test_a_command_still_in_flight_after_quiet_wait_is_renamed_past():
    clock = Clock()
    other, _ = _backend()
    other.command(b"FETCH 1:* BODY.PEEK[]")
    ctx = _ctx(clock, _session("carol", {"b1": other}))
    held = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol")))
    clock.advance(QUIET_WAIT - 1)
    assert not held
    clock.advance(2)
    assert held and callable(held[0])
    held[0]()
    held[0]()  # once, from any path
    assert ctx.rename_holds == {}


def test_two_renames_on_one_backend_hold_one_after_the_other_each_sending_its_own():
    """Each holding the other's connection, neither RENAME would ever be sent (soak C 80001: 420 s)."""
    clock = Clock()
    one, _ = _backend()
    two, _ = _backend()
    ctx = _ctx(clock, _session("carol", {"b1": one}), _session("carol", {"b1": two}))
    first = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol", one)))
    second = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol", two)))
    assert first and not second  # the second waits for the first's RENAME
    one.command(b"RENAME A B")
    two.command(b"STATUS X (MESSAGES)")
    assert _sent(one) == b"rp1 RENAME A B\r\n" and _sent(two) == b""
    one.dataReceived(b"rp1 OK done\r\n")
    first[0]()
    assert second and _sent(two) == b"rp1 STATUS X (MESSAGES)\r\n"  # the first's hold let go...
    two.dataReceived(b"rp1 OK done\r\n")
    clock.advance(renamehold.POLL)
    two.command(b"RENAME C D")  # ... and the second's RENAME goes on its own connection
    one.command(b"NOOP")
    assert _sent(two) == b"rp2 RENAME C D\r\n" and _sent(one) == b""
    second[0]()
    assert _sent(one) == b"rp2 NOOP\r\n" and ctx.rename_holds == {}


def test_a_connection_made_while_a_rename_holds_is_held_too():
    clock = Clock()
    other, _ = _backend()
    ctx = _ctx(clock, _session("carol", {"b1": other}))
    held = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol")))
    late, _ = _backend()
    ctx.rename_holds[("b1", "carol")].add(late)  # as BackendPool.add does
    late.command(b"STATUS X (MESSAGES)")
    assert _sent(late) == b""
    held[0]()
    assert _sent(late) == b"rp1 STATUS X (MESSAGES)\r\n" and ctx.rename_holds == {}


def test_the_wait_is_shorter_than_half_the_answer_timeout_of_what_it_holds():
    clock = Clock()
    other = BackendProtocol(BackendConfig(name="b1", endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2",
                                          answer_timeout=4.0))
    other.makeConnection(StringTransport())
    other.command(b"FETCH 1:* BODY.PEEK[]")
    ctx = _ctx(clock, _session("carol", {"b1": other}))
    held = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol")))
    clock.advance(1.9)
    assert not held
    clock.advance(0.2)
    assert held


def test_nothing_held_without_another_session_of_the_user():
    clock = Clock()
    ctx = _ctx(clock)
    held = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol")))
    assert held and ctx.rename_holds == {}
    standalone = SimpleNamespace(reactor=clock, sessions=())  # referral-proxy move, recover
    assert _fired(defer.ensureDeferred(hold_others(standalone, "b1", "carol")))


def test_an_append_held_back_by_this_process_s_rename_is_not_under_way_for_its_confirmation():
    """The RENAME waits for every proxy's confirmation of its reservation, its own proxy's too, and that
    waits for the APPENDs under way to its names: one the RENAME holds back would hold it for RENAME_WAIT
    and have it refused (soak C 80132: RENAME Shared/* Shared/A NO [INUSE] after 10 s, the APPEND to Shared/A
    answered just after)."""
    conn, _ = _backend()
    conn.capabilities = frozenset({"MULTIAPPEND"})
    cmd = AppendCommand(SimpleNamespace(no_staging=()), b"a", conn, b"Shared/A")
    session = SimpleNamespace(user="carol", appends=SimpleNamespace(unanswered={cmd}))
    ctx = SimpleNamespace(mailbox_map=SimpleNamespace(separator="/"), sessions=[session])
    entries = [(7, "carol", Reservation("Shared/A"))]
    assert not cmd.held_back and proxyappends._under_way(ctx, entries)  # begun: its first message may come now
    conn.hold_writes()
    assert cmd.held_back and not proxyappends._under_way(ctx, entries)  # its APPEND line would be held back
    conn.command(b"APPEND Shared/A {3}")
    cmd.parts.append(_Part(b"rp1"))
    assert cmd.held_back and not proxyappends._under_way(ctx, entries)
    conn.release_writes()
    assert not cmd.held_back and proxyappends._under_way(ctx, entries)
    sent_first, _ = _backend()
    sent_first.command(b"APPEND Shared/A {3}")
    sent_first.hold_writes()
    cmd.conn, cmd.parts = sent_first, [_Part(b"rp1")]
    assert not cmd.held_back and proxyappends._under_way(ctx, entries)  # at Dovecot before the hold: under way


class _Client:
    """The client's transport as the session's ReadGate sees it: is its reading paused?"""

    disconnected = disconnecting = False

    def __init__(self) -> None:
        self.reading = True

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True


def _gated() -> tuple[BackendProtocol, PeerPause, _Client]:
    """A backend connection registered, as flow.attach does, with its client's ReadGate as producer."""
    client = _Client()
    conn = BackendProtocol(BackendConfig(name="b1", endpoint="tcp:host=127.0.0.2:port=1", url="imap://127.0.0.2"))
    conn.makeConnection(StringTransport())
    conn.dataReceived(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n")
    peer = PeerPause(ReadGate(client), "backend:b1")
    conn.transport.registerProducer(peer, True)
    return conn, peer, client


def test_the_backend_draining_does_not_let_a_held_session_s_client_read_on():
    """The hold pauses the client for a reason of its own: the backend's buffer draining meanwhile (Twisted
    resumes the producer it paused) must not let the client's next commands pile up in memory, held."""
    conn, peer, client = _gated()
    peer.pauseProducing()  # Twisted: the backend's send buffer is full
    conn.hold_writes()
    conn.command(b"STATUS X (MESSAGES)")
    assert not client.reading
    peer.resumeProducing()  # Twisted: it drained
    assert not client.reading  # still held
    conn.release_writes()
    assert client.reading and _sent(conn) == b"rp1 STATUS X (MESSAGES)\r\n"
    conn.hold_writes()
    conn.command(b"NOOP")
    peer.pauseProducing()
    conn.release_writes()
    assert not client.reading  # the back-pressure's own pause outlives the hold
    peer.resumeProducing()
    assert client.reading


def test_a_held_connection_lost_lets_its_client_read_again_and_answers_what_it_held():
    conn, peer, client = _gated()
    conn.hold_writes()
    status = _fired(conn.command(b"STATUS X (MESSAGES)"))
    assert not client.reading
    conn.transport.producer = None  # Twisted's connectionLost: the producer stopped, then forgotten
    peer.stopProducing()
    conn.connectionLost(Failure(ConnectionDone()))
    assert client.reading and status and isinstance(status[0], Failure)
    conn.release_writes()  # the RENAME's answer, later: nothing to send, nothing to resume twice
    assert client.reading and _sent(conn) == b""


def test_two_holds_on_one_connection_let_it_go_only_once_both_have():
    """A RENAME here and another proxy's both hold one connection: the first to end must not let go."""
    conn, producer = _backend()
    conn.hold_writes()
    conn.hold_writes()
    conn.command(b"STATUS X (MESSAGES)")
    conn.release_writes()
    assert _sent(conn) == b"" and producer.paused == 1 and conn.held_back(None)
    conn.release_writes()
    assert _sent(conn) == b"rp1 STATUS X (MESSAGES)\r\n" and producer.paused == 0 and not conn.held_back(None)


def test_another_proxys_rename_holds_every_session_there_but_one_renaming_here():
    """Two proxies renaming at once for one user on one backend would each hold the connection the
    other's RENAME goes on (its checks, then the RENAME): the one a RENAME of this process runs on is
    passed by; what the others have in flight is waited for REMOTE_QUIET at most."""
    clock = Clock()
    renaming, _ = _backend()
    renaming.renaming = 1
    busy, _ = _backend()
    busy.command(b"FETCH 1:* BODY.PEEK[]")
    _sent(busy)
    ctx = _ctx(clock, _session("carol", {"b1": renaming}), _session("carol", {"b1": busy}))
    held = _fired(defer.ensureDeferred(hold_for_another(ctx, "b1", "carol")))
    assert ctx.remote_holds[("b1", "carol")][0].conns == {busy}
    renaming.command(b"LIST \"\" \"X/*\"")
    assert _sent(renaming).endswith(b"X/*\"\r\n")  # this process's own RENAME goes on
    clock.advance(REMOTE_QUIET - 0.5)
    assert not held
    clock.advance(1)
    assert held and callable(held[0])  # the FETCH still in flight: the other proxy may go on now
    busy.command(b"NOOP")
    assert _sent(busy) == b""
    held[0]()
    assert _sent(busy) == b"rp2 NOOP\r\n" and ctx.remote_holds == {}


def test_a_hold_for_another_proxy_ends_with_its_entry_or_after_remote_hold():
    clock = Clock()
    conn, _ = _backend()
    holders = {7}
    mailbox_map = SimpleNamespace(holders=lambda user, reservations: set(holders), separator="/")
    ctx = _ctx(clock, _session("carol", {"b1": conn}))
    ctx.mailbox_map = mailbox_map
    confirmed: list[int] = []
    store = SimpleNamespace(confirm=confirmed.append)
    entries = [(7, "carol", Reservation("X"))]
    proxyappends.confirmer(ctx, store)(41, entries, {7: "b1"})
    clock.advance(renamehold.POLL)
    assert confirmed == [41] and conn.held_back(None)  # said read, and held while the entry lasts
    clock.advance(1)
    assert conn.held_back(None)
    holders.clear()  # the other proxy's RENAME ended
    clock.advance(renamehold.POLL)
    assert not conn.held_back(None) and ctx.remote_holds == {}
    holders.add(8)
    proxyappends.confirmer(ctx, store)(42, [(8, "carol", Reservation("Y"))], {8: "b1"})
    clock.advance(renamehold.POLL)
    assert confirmed == [41, 42] and conn.held_back(None)
    clock.advance(REMOTE_HOLD + 1)  # that proxy died mid-RENAME: its entry waits for recovery; not us
    assert not conn.held_back(None)


def test_a_hold_taken_before_another_one_failed_is_still_let_go(monkeypatch):
    """Two RENAMEs of other proxies in one change, the second hold failing: the first is not kept for ever."""
    clock = Clock()
    conn, _ = _backend()
    ctx = _ctx(clock, _session("carol", {"b1": conn}))
    ctx.mailbox_map = SimpleNamespace(holders=lambda user, reservations: set(), separator="/")
    real = proxyappends.hold_for_another
    calls = []

    async def flaky(ctx, backend, user):
        calls.append(backend)
        if len(calls) == 2:
            raise RuntimeError("the second hold fails")
        return await real(ctx, backend, user)

    monkeypatch.setattr(proxyappends, "hold_for_another", flaky)
    confirmed: list[int] = []
    entries = [(7, "carol", Reservation("X")), (8, "carol", Reservation("Y"))]
    proxyappends.confirmer(ctx, SimpleNamespace(confirm=confirmed.append))(5, entries, {7: "b1", 8: "b1"})
    assert calls == ["b1", "b1"] and confirmed == [5]
    clock.advance(renamehold.POLL)
    assert not conn.held_back(None) and ctx.remote_holds == {}


def test_a_hold_never_let_go_lets_go_by_itself_after_hold_max():
    """Probe l3 F1: a worker stopped answering one user's commands for good (4 of 19 rounds), new sessions too,
    the proxy sending their backend nothing: a hold kept, as a release never reached would keep it, holds every
    connection of the user to that backend in the process, those made later too. Now it ends after HOLD_MAX."""
    clock = Clock()
    other, _ = _backend()
    ctx = _ctx(clock, _session("carol", {"b1": other}))
    held = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol")))
    assert held and callable(held[0])  # (its release is never called)
    later, _ = _backend()
    ctx.rename_holds[("b1", "carol")].add(later)  # a session that logged in since (BackendPool.add)
    other.command(b"NOOP")
    later.command(b"NOOP")
    clock.advance(renamehold.HOLD_MAX - 1)
    assert _sent(other) == _sent(later) == b""
    clock.advance(1)
    assert _sent(other) == _sent(later) == b"rp1 NOOP\r\n" and ctx.rename_holds == {}
    other.dataReceived(b"rp1 OK done\r\n")
    turn = _fired(defer.ensureDeferred(hold_others(ctx, "b1", "carol")))  # the next RENAME's turn is free too
    assert turn and callable(turn[0])
    held[0]()  # late: nothing more
    turn[0]()


def test_two_holds_for_other_renames_let_go_in_either_order_leave_nothing_held():
    """Probe l3 F1, found by l6: two holds for other workers' or proxies' RENAMEs of one (backend, user) at once hold
    the same connections, and RenameHold, a dataclass, compared equal by them: letting go of the second removed the
    FIRST from ctx.remote_holds, so the second, let go, stayed there; every connection made after (BackendPool.add)
    was held by it for good (its HOLD_MAX timer cancelled at its release): the worker answered none of the user's
    commands to that backend any more, new sessions' too."""
    clock = Clock()
    conn, _ = _backend()
    ctx = _ctx(clock, _session("dave", {"b1": conn}))
    first = _fired(defer.ensureDeferred(hold_for_another(ctx, "b1", "dave")))
    second = _fired(defer.ensureDeferred(hold_for_another(ctx, "b1", "dave")))
    second[0]()  # the second lets go first
    later, _ = _backend()
    for hold in ctx.remote_holds.get(("b1", "dave"), ()):  # a session that logs in now (BackendPool.add)
        hold.add(later)
    first[0]()
    assert ctx.remote_holds == {}  # main: the let-go second hold, for good
    newest, _ = _backend()
    for hold in ctx.remote_holds.get(("b1", "dave"), ()):
        hold.add(newest)
    for c in (conn, later, newest):
        c.command(b"NOOP")
        assert _sent(c) == b"rp1 NOOP\r\n"


@pytest.mark.parametrize("mid_command_for", [3, 1000])
def test_a_new_entry_is_confirmed_once_the_sessions_it_moves_are_between_commands(mid_command_for):
    """A move's drain waits until every proxy has confirmed its entry: a session to end that is in the middle of a
    command when the entry is read is looked at again, and the confirmation waits (up to BYE_WAIT) until it is not:
    a client polling NOOPs heard the drain's EXPUNGEs before its BYE (probe m7 of stop 61, 15 of 84)."""
    clock = Clock()
    looks: list[float] = []

    def look() -> bool:
        looks.append(clock.seconds())
        return len(looks) <= mid_command_for  # True: a session it must end is mid-command

    ctx = _ctx(clock)
    ctx.look_at_sessions = look
    ctx.mailbox_map = SimpleNamespace(holders=lambda user, reservations: set(), separator="/")
    confirmed: list[int] = []
    proxyappends.confirmer(ctx, SimpleNamespace(confirm=confirmed.append))(9, [(7, "carol", Reservation("X"))], {})
    assert confirmed == []
    clock.pump([proxyappends.BYE_POLL] * 200)
    assert confirmed == [9]
    assert len(looks) == (4 if mid_command_for == 3 else round(proxyappends.BYE_WAIT / proxyappends.BYE_POLL) + 1)
