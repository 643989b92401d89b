"""Resource limits of one session and of the process, with in-memory transports.

A client that never reads its answers is no longer read (before and after login, the
proxy's own answers included); commands in flight are capped; a login timeout of a
client that does not read aborts it; connections are counted in all, per address,
unauthenticated per address and per user; failed logins wait as Dovecot's auth penalty
makes them; max_connections fits the file descriptors. Real sockets and real Dovecot:
tests/test_limits_dovecot.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from referral_proxy.admission import (
    MAX_PENALTY,
    PENALTY_EXPIRE_SECS,
    Admission,
    LoginPenalty,
    address_key,
    penalty_seconds,
    sessions_for,
)
from referral_proxy.config import ConfigError, ConnectionLimits
from referral_proxy.session import CLOSE_GRACE, TURN, ClientSession
from referral_proxy.testing.fakes import (
    FakeConnector,
    NoDelayTransport,
    SessionHarness,
    SlowReaderTransport,
    minimal_config,
)

CAPABILITY_OK = b"a OK Capability completed."


def drain_all(h: SessionHarness) -> bytes:
    """The client reads until nothing more comes (each read may let the session write more,
    now or in its next turn)."""
    client = h.client
    assert isinstance(client, SlowReaderTransport)
    out = b""
    while True:
        data = client.drain()
        h.turns()
        if not data and not client.value():
            return out
        out += data


# -- a client that does not read -----------------------------------------------------------------


def test_before_login_a_client_that_does_not_read_is_not_read():
    client = SlowReaderTransport(buffer_size=1024)
    h = SessionHarness(client=client)
    h.send(b"a CAPABILITY\r\n" * 30)
    # The proxy's own answers fill the output: it stops there, and stops reading the socket.
    assert len(client.value()) < 1024 + 400
    assert client.producerState == "paused"
    assert h.session.reader.buffered > 0  # the rest waits, unread, in the reader (one read at most)
    # Once the client reads, every command is answered, in order.
    assert drain_all(h).count(CAPABILITY_OK) == 30
    assert client.producerState == "producing"


def test_after_login_a_full_output_pauses_the_backends_and_stops_relaying():
    client = SlowReaderTransport(buffer_size=1024)
    h = SessionHarness(minimal_config(max_commands_in_flight=10_000), client=client)
    h.login()
    client.drain()
    h.send(b"n NOOP\r\n" * 500)
    sent = h.to_backend().count(b" NOOP\r\n")
    assert sent == 500  # the backend reads them: nothing is full yet
    h.from_backend(b"".join(b"* OK still here, padding the answer to a decent size\r\nrp%d OK NOOP done\r\n" % i
                            for i in range(1, 501)))
    assert client.producerState == "paused"  # the client is not read ...
    assert h.backend.transport.producerState == "paused"  # ... nor the backend
    h.send(b"m NOOP\r\n" * 100)
    assert h.to_backend() == b""  # nothing more is relayed meanwhile
    out = drain_all(h)
    assert out.count(b"n OK NOOP done") == 500
    assert h.to_backend().count(b" NOOP\r\n") == 100
    assert h.backend.transport.producerState == "producing"


def test_a_session_handles_a_turn_of_commands_then_lets_the_others_go_first():
    h = SessionHarness(minimal_config(max_commands_in_flight=10_000))
    h.login()
    h.session.dataReceived(b"a NOOP\r\n" * 1000)  # as the reactor delivers one read
    assert h.to_backend().count(b" NOOP\r\n") == TURN
    assert h.client.producerState == "paused"  # the socket is not read meanwhile
    h.turns()  # the reactor's next passes
    assert h.to_backend().count(b" NOOP\r\n") == 1000 - TURN
    assert h.client.producerState == "producing"


def test_a_client_that_does_not_log_in_gets_a_bye_after_a_few_dozen_commands():
    h = SessionHarness()
    h.to_client()
    h.send(b"a CAPABILITY\r\n" * 10 + b"b FROB\r\n" * 10 + b"\r\n" * 12 + b"c NOOP\r\n" * 100)
    out = h.to_client()
    assert out.count(b"a OK") == 10 and out.count(b"b BAD") == 10 and out.count(b"* BAD") == 12
    assert out.endswith(b"* BYE Too many commands before login\r\n") and b"c OK" not in out
    assert h.client.disconnecting
    h2 = SessionHarness()
    h2.send(b"a NOOP\r\n" * 31 + b"L LOGIN alice secret\r\n" + b"n NOOP\r\n" * 100)
    assert h2.to_client().count(b"L OK") == 1  # the 32nd logs in: after it, no such limit
    assert h2.to_backend().count(b" NOOP\r\n") == 64  # (the cap on commands in flight, not this)


@pytest.mark.parametrize("logged_in", [False, True])
def test_a_refused_command_without_end_ends_the_session(logged_in):
    """`ID ({0+}{0+}...` for ever: refused, then dropped unread only as far as a command may
    go; then * BYE (the drop had cost a line's work per 6 bytes, for ever, with no output
    to stop it: 50 such clients made another client's NOOP wait 7 s)."""
    h = SessionHarness(minimal_config(max_literals=5, max_append_messages=5))
    if logged_in:
        h.login()
    h.to_client()
    h.send(b"i ID (" + b"{0+}\r\n" * 12)  # the 6th refused: 6 more parts dropped, as a command may have
    assert h.to_client() == b"i NO [LIMIT] Too many literals in one command (limit 5)\r\n"
    assert not h.client.disconnecting
    h.send(b"{0+}\r\n" * 100 + b"n NOOP\r\n")
    assert h.to_client() == b"* BYE Too long command (more than 6 parts)\r\n"
    assert h.client.disconnecting
    if logged_in:
        assert h.to_backend().endswith(b" LOGOUT\r\n")


def test_commands_in_flight_are_capped():
    h = SessionHarness(minimal_config(max_commands_in_flight=3))
    h.login()
    h.send(b"".join(b"a%d NOOP\r\n" % i for i in range(10)))
    assert h.to_backend() == b"rp1 NOOP\r\nrp2 NOOP\r\nrp3 NOOP\r\n"
    assert h.client.producerState == "paused"
    h.from_backend(b"rp1 OK done\r\n")
    assert h.to_backend() == b"rp4 NOOP\r\n"
    h.from_backend(b"".join(b"rp%d OK done\r\n" % i for i in range(2, 11)))
    assert h.to_backend() == b"".join(b"rp%d NOOP\r\n" % i for i in range(5, 11))
    assert h.to_client().count(b" OK done") == 10
    assert h.client.producerState == "producing"


def test_the_cap_never_stops_the_command_being_read():
    """An APPEND's literal and an IDLE's DONE are read whatever the cap: they are the command in flight."""
    h = SessionHarness(minimal_config(max_commands_in_flight=1))
    h.login()
    h.send(b"a APPEND INBOX {5+}\r\nhello\r\nb NOOP\r\n")
    assert h.to_backend() == b"rp1 APPEND INBOX {5+}\r\nhello\r\n"  # whole; b waits for a's answer
    h.from_backend(b"rp1 OK [APPENDUID 1 1] done\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"
    h.from_backend(b"rp2 OK done\r\n")
    h.to_client()
    h.send(b"i IDLE\r\n")
    h.from_backend(b"+ idling\r\n")
    h.send(b"DONE\r\nc NOOP\r\n")
    assert h.to_backend() == b"rp3 IDLE\r\nDONE\r\n"
    h.from_backend(b"rp3 OK idle done\r\n")
    assert h.to_backend() == b"rp4 NOOP\r\n"


def test_the_proxys_own_answers_behind_a_backend_response_stop_the_reading():
    h = SessionHarness()
    h.login()
    h.send(b"f NOOP\r\n")
    h.from_backend(b"* 1 FETCH (BODY[] {10}\r\n01234")  # a response in the middle
    h.send(b"x FROB\r\n" * 200)  # answered by the proxy itself: they must wait, and so must the reading
    assert b"x BAD" not in h.client.value()  # (held until f is answered: ac369b9; before, queued behind the FETCH)
    assert h.client.producerState == "paused"
    h.from_backend(b"56789)\r\nrp1 OK done\r\n")
    out = h.to_client()
    assert out.startswith(b"* 1 FETCH (BODY[] {10}\r\n0123456789)\r\n")  # whole, then the others
    assert out.count(b"x BAD Unknown command FROB\r\n") == 200 and out.count(b"f OK done\r\n") == 1
    assert h.client.producerState == "producing"


# -- closing: timeouts and refusals are aborted ---------------------------------------------------------


def test_a_login_timeout_aborts_a_client_that_does_not_read():
    client = SlowReaderTransport(buffer_size=256)
    h = SessionHarness(minimal_config(login_timeout=5), client=client)
    h.send(b"a CAPABILITY\r\n" * 100)
    assert client.producerState == "paused"
    h.reactor.advance(5)
    assert client.disconnected  # aborted: loseConnection would wait for it to read
    assert b"* BYE" not in client.value()


def test_a_login_timeout_says_bye_and_aborts_after_a_grace():
    h = SessionHarness(minimal_config(login_timeout=5))
    h.to_client()
    h.reactor.advance(5)
    assert h.to_client() == b"* BYE Autologout; no login in time\r\n"
    assert h.client.disconnecting and not h.client.disconnected
    h.reactor.advance(CLOSE_GRACE)
    assert h.client.disconnected


def test_a_logout_after_a_full_output_closes_once_the_client_has_read_it():
    """Twisted closes only once no producer is registered: a paused one, resumed by the
    drain, kept the connection open (the fuzzer found it: a hang after * BYE)."""
    client = SlowReaderTransport(buffer_size=40)  # the BYE and the OK fill it again
    h = SessionHarness(client=client)
    h.send(b"a CAPABILITY\r\n" * 20 + b"z LOGOUT\r\n")
    assert client.producer_paused
    out = drain_all(h)
    assert out.endswith(b"* BYE Logging out\r\nz OK Logout completed.\r\n")
    assert client.closed


def test_a_logout_that_is_not_read_is_aborted_after_a_grace():
    h = SessionHarness()
    h.send(b"a LOGOUT\r\n")
    assert h.to_client().endswith(b"a OK Logout completed.\r\n")
    assert h.client.disconnecting and not h.client.disconnected
    h.session.connectionLost(None)  # it went away in time: no abort pending
    assert not h.reactor.getDelayedCalls() or all(not c.active() for c in h.reactor.getDelayedCalls())


# -- connection limits -------------------------------------------------------------------------------


def _connect(h: SessionHarness, peer: str = "192.0.2.1") -> tuple[ClientSession, NoDelayTransport]:
    from twisted.internet.address import IPv4Address, IPv6Address

    session = ClientSession(h.context)
    address = IPv6Address("TCP", peer, 4000) if ":" in peer else IPv4Address("TCP", peer, 4000)
    transport = NoDelayTransport(peerAddress=address)
    session.makeConnection(transport)
    return session, transport


def test_connections_over_the_limits_get_bye_unavailable():
    h = SessionHarness(minimal_config(max_connections=6, max_connections_per_ip=3, max_unauthenticated_per_ip=2))
    a1, t1 = _connect(h, "192.0.2.1")
    a2, _ = _connect(h, "192.0.2.1")
    _, t3 = _connect(h, "192.0.2.1")
    assert t1.value().startswith(b"* OK ")
    assert t3.value() == (b"* BYE [UNAVAILABLE] Too many connections from your address waiting to log in "
                          b"(limit 2)\r\n")
    assert t3.disconnecting and t3.producer is None
    assert h.context.observer.refusals_total["max_unauthenticated_per_ip"] == 1
    a1.dataReceived(b"L LOGIN alice secret\r\n")  # a logged-in one no longer counts as waiting
    assert t1.value().endswith(b"L OK [CAPABILITY " + t1.value().split(b"L OK [CAPABILITY ")[1])
    _, t4 = _connect(h, "192.0.2.1")
    assert t4.value().startswith(b"* OK ")
    _, t5 = _connect(h, "192.0.2.1")
    assert t5.value() == b"* BYE [UNAVAILABLE] Too many connections from your address (limit 3)\r\n"
    _, t6 = _connect(h, "192.0.2.2")
    _, t7 = _connect(h, "192.0.2.3")
    assert t6.value().startswith(b"* OK ") and t7.value().startswith(b"* OK ")
    _, t8 = _connect(h, "192.0.2.4")  # the harness's own session counts too: 6 in all
    assert t8.value() == b"* BYE [UNAVAILABLE] Too many connections to this server (limit 6); try again later\r\n"
    a2.connectionLost(None)
    a2.connectionLost(None)  # twice: counted once
    _, t9 = _connect(h, "192.0.2.4")
    assert t9.value().startswith(b"* OK ")
    assert h.context.observer.refusals_total == {"max_connections": 1, "max_connections_per_ip": 1,
                                                  "max_unauthenticated_per_ip": 1}


def test_a_refused_connection_is_aborted_if_its_bye_does_not_leave():
    h = SessionHarness(minimal_config(max_connections=1))
    _, t = _connect(h)
    assert t.disconnecting and not t.disconnected
    h.reactor.advance(CLOSE_GRACE)
    assert t.disconnected


def test_ipv6_clients_are_counted_by_their_64():
    h = SessionHarness(minimal_config(max_connections_per_ip=2, max_unauthenticated_per_ip=2))
    _connect(h, "2001:db8:1:2::1")
    _connect(h, "2001:db8:1:2:ffff::9")
    _, t = _connect(h, "2001:db8:1:2::77")
    _, other = _connect(h, "2001:db8:1:3::1")
    assert t.value().startswith(b"* BYE [UNAVAILABLE] Too many connections from your address")
    assert other.value().startswith(b"* OK ")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6", 48) == "2001:db8:1::/48"


def test_sessions_of_one_user_are_limited_at_login():
    h = SessionHarness(minimal_config(max_connections_per_user=1))
    h.login(b"alice")
    second, t = _connect(h, "192.0.2.9")
    second.dataReceived(b"L LOGIN Alice secret\r\n")  # the same user, another spelling
    assert t.value().endswith(b"L NO [LIMIT] Too many connections for this user (limit 1)\r\n")
    refused_backend = h.connector.backends[-1]
    assert refused_backend.transport.value().endswith(b" LOGOUT\r\n") and refused_backend.transport.disconnecting
    assert h.context.observer.logins_total["limit"] == 1
    second.dataReceived(b"M LOGIN bob secret\r\n")
    assert b"M OK [CAPABILITY " in t.value()


# -- the failed-login penalty ------------------------------------------------------------------------------


def test_the_penalty_grows_like_dovecots_and_falls_with_time():
    p, cap, now = LoginPenalty(), 15.0, 1000.0
    assert [penalty_seconds(n, cap) for n in range(6)] == [0.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    delays = []
    for i in range(6):
        delays.append(p.delay("192.0.2.1", "alice", cap, now))
        p.failed("192.0.2.1", "alice", f"guess{i}", cap, now)
    assert delays == [0.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    # Dovecot lowers a penalty a step for each step's delay passed since the last failure:
    # with the 15 s cap, all of it at once when 15 s have passed.
    assert p.delay("192.0.2.1", "bob", cap, now + 14.9) == 15.0
    assert p.delay("192.0.2.1", "bob", cap, now + 15) == 0.0
    slow = LoginPenalty()
    for i in range(MAX_PENALTY):
        slow.failed("192.0.2.1", "alice", f"x{i}", 60.0, now)
    assert slow.delay("192.0.2.1", "bob", 60.0, now) == 32.0  # a cap of 60 s: 4, 8, 16, 32
    assert slow.delay("192.0.2.1", "bob", 60.0, now + 31.9) == 32.0
    assert slow.delay("192.0.2.1", "bob", 60.0, now + 32) == 0.0
    assert len(slow) == 2  # the address and the user ...
    assert slow.delay("192.0.2.1", "bob", 60.0, now + PENALTY_EXPIRE_SECS + 60) == 0.0
    assert len(slow) == 0  # ... forgotten 14 s + the cap after their last change


def test_a_guesser_waiting_out_each_delay_stays_at_the_cap():
    """Probe j2 of stop 59: pipelined wrong LOGINs waited 0.5, 4.5, 8.5, 15.5, then 4.5 s again: the failure after a
    15 s wait was counted from the penalty as the wait had lowered it. Dovecot raises the one it looked up."""
    p, cap, now = LoginPenalty(), 15.0, 1000.0
    waits = []
    for i in range(7):
        asked = now
        waits.append(p.delay("192.0.2.1", "alice", cap, asked))
        now = asked + waits[-1] + 0.01  # the credentials checked once the wait is over: wrong
        p.failed("192.0.2.1", "alice", f"guess{i}", cap, now, asked)
    assert waits == [0.0, 4.0, 8.0, 15.0, 15.0, 15.0, 15.0]
    assert p.delay("192.0.2.1", "bob", cap, now + 14.9) == 15.0 and p.delay("192.0.2.1", "bob", cap, now + 15) == 0.0


def test_the_same_wrong_password_again_does_not_raise_the_penalty():
    p, now = LoginPenalty(), 50.0
    for _ in range(5):
        p.failed("192.0.2.1", "alice", "old password", 15.0, now)
    assert p.delay("192.0.2.1", "alice", 15.0, now) == 4.0


def test_the_penalty_is_per_address_and_per_user_and_a_success_resets_it():
    p, now, cap = LoginPenalty(), 0.0, 15.0
    for i in range(3):
        p.failed(f"192.0.2.{i}", "alice", f"guess{i}", cap, now)  # a botnet: three addresses, one user
    assert p.delay("198.51.100.1", "alice", cap, now) == 15.0  # the user's penalty
    assert p.delay("192.0.2.0", "bob", cap, now) == 4.0  # the address's own
    assert p.delay("198.51.100.1", "bob", cap, now) == 0.0
    p.succeeded("198.51.100.1", "alice")
    assert p.delay("198.51.100.1", "alice", cap, now) == 0.0
    assert p.delay("2001:db8:1:2::1", "carol", cap, now) == 0.0
    p.failed("2001:db8:1:2::1", "carol", "x", cap, now)
    assert p.delay("2001:db8:1:ffff::9", "dave", cap, now) == 4.0  # an IPv6 address counts by its /48
    assert p.delay("192.0.2.1", "alice", 0, now) == 0.0  # login_penalty = 0: off


def test_a_failed_login_makes_the_next_one_wait_before_it_reaches_a_backend():
    connector = FakeConnector(refuse=True)
    h = SessionHarness(minimal_config(login_penalty=15), connector=connector)
    h.to_client()
    h.send(b"a LOGIN alice wrong\r\n")
    assert h.to_client() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    connector.refuse = False
    h.send(b"b LOGIN alice secret\r\nc NOOP\r\n")
    assert len(connector.credentials) == 1 and h.to_client() == b""  # waiting: not even c is read
    h.reactor.advance(3.9)
    assert len(connector.credentials) == 1
    h.reactor.advance(0.1)
    assert len(connector.credentials) == 2
    assert h.to_client().startswith(b"b OK [CAPABILITY ")
    assert h.to_backend().endswith(b" NOOP\r\n")  # c, read once the login is done
    assert h.context.observer.login_delays_total == 1 and h.context.observer.login_delay_seconds == 4.0
    # The success reset it: the next login of the same client does not wait.
    assert h.context.admission.penalty.delay("192.168.1.1", "alice", 15, h.reactor.seconds()) == 0.0


# -- file descriptors, configuration --------------------------------------------------------------------


def test_max_connections_fits_the_file_descriptors():
    assert sessions_for(1024) == (1024 - 128) // 2
    assert sessions_for(256) == (256 - 64) // 2
    assert sessions_for(40) == 4
    a = Admission(fd_sessions=10)
    assert a.max_connections(ConnectionLimits(max_connections=1000)) == 10
    assert a.max_connections(ConnectionLimits(max_connections=5)) == 5
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096));"
            "from referral_proxy.admission import file_descriptors;"
            "print(file_descriptors(2000), file_descriptors(9000), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(None, 2)
    assert out[:2] == ["2000", "4096"]  # raised as far as the hard limit allows, never above


@pytest.mark.parametrize("key,value,message", [
    ("max_connections", 0, "proxy.max_connections: must be positive"),
    ("max_connections_per_ip", -1, "proxy.max_connections_per_ip: must be positive"),
    ("max_unauthenticated_per_ip", "10", "proxy.max_unauthenticated_per_ip: wrong type str"),
    ("max_connections_per_user", 1.5, "proxy.max_connections_per_user: wrong type float"),
    ("max_commands_in_flight", True, "proxy.max_commands_in_flight: wrong type bool"),
    ("login_penalty", -1, "proxy.login_penalty: must be between 0 (off) and 3600 seconds"),
    ("login_penalty", "15", "proxy.login_penalty: wrong type str"),
])
def test_connection_limit_keys_are_checked(key, value, message):
    with pytest.raises(ConfigError) as e:
        minimal_config(**{key: value})
    assert str(e.value) == message


def test_connection_limit_defaults():
    limits = minimal_config().proxy.connections
    assert limits == ConnectionLimits(max_connections=1000, max_connections_per_ip=100, max_unauthenticated_per_ip=20,
                                      max_connections_per_user=50, max_commands_in_flight=64, login_penalty=15.0)
    assert minimal_config(login_penalty=0).proxy.connections.login_penalty == 0.0


def test_behind_a_load_balancer_the_proxy_header_address_is_counted():
    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import Factory

    from referral_proxy.proxyproto import HeaderFirstFactory

    h = SessionHarness(minimal_config(max_unauthenticated_per_ip=1))

    class Sessions(Factory):
        def buildProtocol(self, addr):
            return ClientSession(h.context)

    factory = HeaderFirstFactory(Sessions(), h.reactor, 10.0)

    def via_balancer(client: str) -> NoDelayTransport:
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        transport = NoDelayTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5555))  # the balancer
        proto.makeConnection(transport)
        proto.dataReceived(b"PROXY TCP4 %s 127.0.0.1 40001 143\r\n" % client.encode())
        return transport

    assert via_balancer("198.51.100.1").value().startswith(b"* OK ")
    assert via_balancer("198.51.100.2").value().startswith(b"* OK ")  # the balancer's address is not what counts
    assert via_balancer("198.51.100.1").value().startswith(b"* BYE [UNAVAILABLE] Too many connections")
    assert h.context.admission.counts("198.51.100.1") == (1, 1)
    assert h.context.admission.counts("10.0.0.1") == (0, 0)


# -- found by the session fuzzer ----------------------------------------------------------------------------


def test_a_backend_bye_the_client_never_saw_still_gets_a_bye():
    """Dovecot says BYE (its mailbox deleted under it) during a transfer's own FETCH: that
    BYE is captured, not relayed, so the proxy must say one (it said none: a close
    without a word): Dovecot's, which says why (probe j5 of stop 59)."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    h = SessionHarness()
    h.login()
    h.backend.command(b"UID FETCH 1 BODY.PEEK[]")  # a transfer's internal command captures the untagged
    h.from_backend(b"* BYE Mailbox was deleted under us\r\n")
    h.backend.connectionLost(Failure(ConnectionDone()))
    assert h.to_client() == b"* BYE Mailbox was deleted under us\r\n"
    assert h.client.disconnecting


def test_a_relayed_backend_bye_is_the_only_bye():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    h = SessionHarness()
    h.login()
    h.send(b"a NOOP\r\n")
    h.from_backend(b"* BYE Server shutting down\r\n")
    h.backend.connectionLost(Failure(ConnectionDone()))
    assert h.to_client() == b"* BYE Server shutting down\r\n"


def test_a_done_before_the_backends_plus_keeps_that_plus_from_the_next_command():
    """IDLE and DONE pipelined: the backend's + for the IDLE, arriving late, was taken as
    the + of the APPEND read after it, whose message then went to the backend before it
    said yes; refused (TRYCREATE), the backend would read the message as commands."""
    h = SessionHarness()
    h.login()
    h.send(b"i IDLE\r\nDONE\r\na APPEND Nowhere {5}\r\n")
    assert h.to_backend() == b"rp1 IDLE\r\nDONE\r\n"  # the APPEND waits for the IDLE's own + and answer
    h.from_backend(b"+ idling\r\n")
    assert h.to_client() == b"+ idling\r\n" and h.to_backend() == b""
    h.from_backend(b"rp1 OK Idle completed\r\n")
    assert h.to_client() == b"i OK Idle completed\r\n"
    assert h.to_backend() == b"rp2 APPEND Nowhere {5}\r\n"  # now: its literal waits for its own +
    h.from_backend(b"rp2 NO [TRYCREATE] Mailbox does not exist\r\n")
    assert h.to_client() == b"a NO [TRYCREATE] Mailbox does not exist\r\n"
    h.send(b"x CREATE Evil\r\n")  # what the client sends now is a command of its own, checked
    assert h.to_backend() == b"rp3 CREATE Evil\r\n"


@pytest.mark.parametrize("username_format,same", [("lower", True), ("as-is", False)])
def test_the_penalty_counts_the_maps_user_name(username_format, same):
    """BOB and bob are one user for the penalty exactly when they are one for the map."""
    config = minimal_config(login_penalty=15)
    config = replace(config, map=replace(config.map, username_format=username_format))
    h = SessionHarness(config, connector=FakeConnector(refuse=True))
    h.to_client()
    h.send(b"a LOGIN ALICE wrong\r\n")
    assert h.to_client() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    elsewhere = "203.0.113.9"  # not the client's address: only the user's penalty counts
    penalty, now = h.context.admission.penalty, h.reactor.seconds()
    assert penalty.delay(elsewhere, "alice", 15, now) == (4.0 if same else 0.0)
    assert penalty.delay(elsewhere, "ALICE", 15, now) == (0.0 if same else 4.0)


@pytest.mark.parametrize("login,owner", [('"bob*bob"', "bob"), ('"alice*admin"', "admin"), ('"BOB*Bob"', "bob"),
                                         ("bob", "bob")])
def test_the_penalty_counts_the_user_whose_password_is_tried(login, owner):
    """Probe v6 (stop 52): ``LOGIN "bob*bob" guess`` tries bob's own password (Dovecot: a master login as
    oneself), but the penalty was keyed "bob*bob": a botnet got twice the guesses at bob's; and every
    ``user*admin`` had its own key for guesses at the master user admin's password."""
    config = minimal_config(login_penalty=15)
    config = replace(config, map=replace(config.map, master_user_separator="*"))
    h = SessionHarness(config, connector=FakeConnector(refuse=True))
    h.to_client()
    h.send(b"a LOGIN %s wrong\r\n" % login.encode())
    assert h.to_client() == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    penalty, now = h.context.admission.penalty, h.reactor.seconds()
    assert penalty.delay("203.0.113.9", owner, 15, now) == 4.0  # from anywhere: the user's penalty


def test_parked_backend_connections_are_fitted_to_the_descriptors_too(monkeypatch):
    """Left out, 180 parked connections under ulimit -n 256 made accept() fail (EMFILE): 55 of 85 clients
    closed without a greeting, well under max_connections as lowered (probe y5 of stop 53)."""
    from referral_proxy import service
    from referral_proxy.testing.fakes import minimal_config

    monkeypatch.setattr(service, "file_descriptors", lambda wanted: 256)
    a = service.admission_for(minimal_config())
    assert a.fd_parked == 64 and a.fd_sessions == sessions_for(256 - 64)
    assert a.fd_sessions * 2 + a.fd_parked <= 256 - 32  # (a reserve kept besides)
    from referral_proxy.context import ProxyContext
    from referral_proxy.testing.fakes import SessionHarness
    h = SessionHarness(minimal_config())
    assert h.context.keepalive.in_all == 500  # no bound known: keepalive.IN_ALL
    ctx = ProxyContext(**{**{f: getattr(h.context, f) for f in ("config", "reactor", "mailbox_map", "connect")},
                          "admission": a})
    assert ctx.keepalive.in_all == 64
