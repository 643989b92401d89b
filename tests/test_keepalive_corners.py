"""keepalive.py's corners a real Dovecot cannot produce, on scripted backends: a backend
without UNSELECT, an UNSELECT refused, a parked connection that speaks (BYE, EXISTS) or
closes, the old mailbox's news arriving before UNSELECT's answer, expiry, the bounds."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from referral_proxy import keepalive
from referral_proxy.backend import BackendProtocol, Credentials
from referral_proxy.config import BackendConfig
from referral_proxy.fastpath import _FAST
from referral_proxy.session import ClientSession
from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, NoDelayTransport, SessionHarness, minimal_config


@dataclass
class Reusing(FakeConnector):
    """Connections made through the context's KeepAlive, as service.connect_for does."""

    keep: Any = None

    async def __call__(self, config: BackendConfig, credentials: Credentials) -> BackendProtocol:
        return await self.keep.connect(config, credentials, None,
                                       lambda: FakeConnector.__call__(self, config, credentials))


def harness(caps=DOVECOT_CAPS) -> SessionHarness:
    h = SessionHarness(minimal_config(backend_keepalive=10), connector=Reusing(capabilities=tuple(caps)))
    h.connector.keep = h.context.keepalive
    return h


def end_first_session(h: SessionHarness) -> BackendProtocol:
    h.login()
    h.send(b"S SELECT INBOX\r\n")
    sent = h.to_backend()
    tag = re.match(rb"(rp\d+) SELECT", sent).group(1)
    h.from_backend(b"* 3 EXISTS\r\n%s OK [READ-WRITE] Select completed.\r\n" % tag)
    h.to_client()
    h.send(b"Z LOGOUT\r\n")
    assert h.to_client().endswith(b"Z OK Logout completed.\r\n")
    return h.backend


def unselect_tag(h: SessionHarness) -> bytes:
    m = re.fullmatch(rb"(rp\d+) UNSELECT\r\n", h.to_backend())
    assert m is not None
    return m.group(1)


def second_session(h: SessionHarness) -> tuple[ClientSession, NoDelayTransport]:
    s, t = ClientSession(h.context), NoDelayTransport()
    s.makeConnection(t)
    t.clear()
    s.dataReceived(b"L LOGIN alice secret\r\n")
    h.turns()
    return s, t


def test_a_clean_connection_is_unselected_parked_and_taken_without_the_old_news():
    h = harness()
    conn = end_first_session(h)
    tag = unselect_tag(h)
    assert len(h.context.keepalive) == 1
    s, t = second_session(h)  # before UNSELECT is answered: not offered yet
    assert len(h.connector.backends) == 2
    s.dataReceived(b"Z LOGOUT\r\n")
    h.turns()
    conn.dataReceived(b"* 4 EXISTS\r\n* 1 EXPUNGE\r\n%s OK Unselect completed.\r\n" % tag)  # the old mailbox's
    s, t = second_session(h)
    assert len(h.connector.backends) == 2  # the first one taken
    assert t.value().startswith(b"L OK [CAPABILITY ")
    assert b"EXISTS" not in t.value() and b"EXPUNGE" not in t.value()
    t.clear()
    conn.transport.clear()
    s.dataReceived(b"N NOOP\r\n")
    h.turns()
    tag = re.match(rb"(rp\d+) NOOP", conn.transport.value()).group(1)
    conn.dataReceived(b"%s OK NOOP completed.\r\n" % tag)
    h.turns()
    assert t.value() == b"N OK NOOP completed.\r\n"
    assert h.context.keepalive.reused == 1


def test_without_unselect_nothing_is_parked():
    h = harness([c for c in DOVECOT_CAPS if c != "UNSELECT"])
    end_first_session(h)
    assert h.to_backend().endswith(b" LOGOUT\r\n")
    assert len(h.context.keepalive) == 0
    second_session(h)
    assert len(h.connector.backends) == 2


def test_an_unselect_refused_drops_it():
    h = harness()
    conn = end_first_session(h)
    tag = unselect_tag(h)
    conn.dataReceived(b"%s NO No.\r\n" % tag)
    assert len(h.context.keepalive) == 0
    assert conn.transport.value().endswith(b" LOGOUT\r\n")
    second_session(h)
    assert len(h.connector.backends) == 2


def test_a_parked_connection_that_speaks_or_closes_is_dropped():
    for news in (b"* BYE Server shutting down.\r\n", b"* 5 EXISTS\r\n", b"* OK [ALERT] hello\r\n", None):
        h = harness()
        conn = end_first_session(h)
        conn.dataReceived(b"%s OK Unselect completed.\r\n" % unselect_tag(h))
        assert len(h.context.keepalive) == 1
        if news is None:
            conn.transport.loseConnection()
            conn.connectionLost(None)
        else:
            conn.dataReceived(news)
        assert len(h.context.keepalive) == 0
        s, t = second_session(h)
        assert len(h.connector.backends) == 2, news
        assert t.value().startswith(b"L OK")


def test_it_expires_with_a_logout():
    h = harness()
    conn = end_first_session(h)
    conn.dataReceived(b"%s BAD No mailbox selected.\r\n" % unselect_tag(h))  # RFC 3691: not selected
    assert len(h.context.keepalive) == 1
    conn.transport.clear()
    h.reactor.advance(10)
    assert conn.transport.value().endswith(b" LOGOUT\r\n")
    assert len(h.context.keepalive) == 0


def test_enable_or_condstore_or_a_half_read_command_parks_nothing():
    for rest in (b"E ENABLE UTF8=ACCEPT\r\n", b"C UID FETCH 1 (FLAGS) (CHANGEDSINCE 4)\r\n",
                 b"T STATUS INBOX (MESSAGES HIGHESTMODSEQ)\r\n", b"X SELECT INBOX (CONDSTORE)\r\n",
                 b"I ID NIL\r\n", b"P FETCH 1 (BODY[]"):
        h = harness()
        h.login()
        h.send(rest)
        sent = h.to_backend()
        if rest.startswith(b"P"):
            h.session.connectionLost(None)
        else:
            while sent:  # (a CONDSTORE word: its ENABLE first on the connection, pool.note, then the command)
                for tag in re.findall(rb"(?m)^(rp\d+) ", sent):
                    h.from_backend(tag + b" OK done\r\n")
                sent = h.to_backend()
            h.send(b"Z LOGOUT\r\n")
            assert h.to_client().endswith(b"Z OK Logout completed.\r\n")
        assert len(h.context.keepalive) == 0, rest
    h = harness()  # and the same without them: parked
    h.login()
    h.send(b"Z LOGOUT\r\n")
    assert len(h.context.keepalive) == 1


def test_bounds_per_user():
    h = harness()
    sessions = []
    for _ in range(keepalive.PER_USER + 2):
        s, t = ClientSession(h.context), NoDelayTransport()
        s.makeConnection(t)
        s.dataReceived(b"L LOGIN alice secret\r\n")
        h.turns()
        sessions.append(s)
    for s in sessions:
        s.dataReceived(b"Z LOGOUT\r\n")
        h.turns()
    assert len(h.context.keepalive) == keepalive.PER_USER


def test_every_fast_path_command_is_whitelisted():
    assert set(_FAST) <= keepalive.REUSABLE


def test_a_session_gone_with_a_task_under_way_or_another_backend_busy_parks_nothing():
    from referral_proxy.flow import Block

    h = harness()
    h.login()
    h.session.block(Block.TASK)  # a command waiting for a connection or a quiet backend
    h.session.connectionLost(None)
    assert len(h.context.keepalive) == 0
    assert h.to_backend().endswith(b" LOGOUT\r\n")
    h = harness()
    h.login()
    h.send(b"A UID FETCH 1 (FLAGS)\r\n")  # in flight on the home backend
    h.session.connectionLost(None)
    assert len(h.context.keepalive) == 0


def test_a_parked_connection_written_to_after_it_was_parked_is_not_reused():
    h = harness()
    conn = end_first_session(h)
    conn.dataReceived(b"%s OK Unselect completed.\r\n" % unselect_tag(h))
    conn.write(b"x1 SELECT INBOX\r\n")  # a stale reference of the old session's, say
    second_session(h)
    assert len(h.connector.backends) == 2
    assert conn.transport.disconnecting


def _limited_login(parked_user: str | None, refusals: int = 1) -> tuple[int, Any, Any, Any]:
    """A login of alice under another key than her parked connection's (an authzid), refused
    [LIMIT] *refusals* times: how often it was tried, its Deferred, the harness, the parked connection."""
    from twisted.internet import defer

    from referral_proxy.backend import AuthenticationFailed, Tagged
    from referral_proxy.imap.response import parse_response_start

    raw = b"rp1 NO [LIMIT] Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10)"
    h, conn = harness(), None
    if parked_user is not None:
        conn = end_first_session(h)
        conn.dataReceived(b"%s OK Unselect completed.\r\n" % unselect_tag(h))
        conn.reuse_key = keepalive.ReuseKey(conn.config.name, conn.config.endpoint, "none", "", parked_user, "secret", "", ())
        assert len(h.context.keepalive) == 1
        conn.transport.clear()
    backend, creds, calls = h.context.config.backends["b1"], Credentials("alice", "secret", "alice"), []

    async def opener() -> BackendProtocol:
        calls.append(1)
        if len(calls) <= refusals:
            raise AuthenticationFailed(Tagged(parse_response_start(raw), raw))
        return await FakeConnector.__call__(h.connector, backend, creds)

    d = defer.ensureDeferred(h.context.keepalive.connect(backend, creds, None, opener))
    h.reactor.pump([0.1] * 25)  # past every wait (each one scheduled as the one before ends)
    return len(calls), d, h, conn


def test_a_login_refused_limit_logs_out_the_users_parked_connections_and_tries_again():
    tries, d, h, conn = _limited_login("alice")
    assert tries == 2  # alice's own parked one logged out, the login tried again and taken
    assert conn.transport.value().endswith(b" LOGOUT\r\n") and len(h.context.keepalive) == 0
    assert d.result.reuse_key.authzid == "alice"
    for parked_user in ("bob", None):  # nothing of alice's parked: her refusal as it came, bob's untouched
        tries, d, h, _ = _limited_login(parked_user)
        assert tries == 1
        assert type(d.result.value).__name__ == "AuthenticationFailed"
        d.addErrback(lambda _f: None)
        assert len(h.context.keepalive) == (1 if parked_user else 0)


def test_a_login_refused_limit_at_every_try_gets_the_last_refusal():
    tries, d, h, conn = _limited_login("alice", refusals=99)
    assert tries == 1 + len(keepalive.LIMIT_RETRIES)  # once, then after each wait
    assert type(d.result.value).__name__ == "AuthenticationFailed" and b"[LIMIT]" in d.result.value.response.raw
    d.addErrback(lambda _f: None)
    assert conn.transport.value().endswith(b" LOGOUT\r\n") and len(h.context.keepalive) == 0


def _ended_after(h: SessionHarness, seconds: float) -> BackendProtocol:
    """The first session's connection, its session ended *seconds* after its login, UNSELECT answered."""
    h.login()
    h.reactor.advance(seconds)
    h.send(b"Z LOGOUT\r\n")
    assert h.to_client().endswith(b"Z OK Logout completed.\r\n")
    conn = h.backend
    if len(h.context.keepalive):
        conn.dataReceived(b"%s OK Unselect completed.\r\n" % unselect_tag(h))
    return conn


def test_a_connection_is_reused_only_within_backend_keepalive_of_its_login():
    """Probe w1 (stop 52): each session that took a parked connection parked it again for another
    backend_keepalive seconds: a user who logged in every 1.5 s (keepalive 3) kept logging in with a
    password changed on the backend 21 s before, for good, and saw a quota raised never. The backend
    checked the credentials at the connection's login: it is reused backend_keepalive seconds from then."""
    h = harness()  # backend_keepalive = 10
    conn = _ended_after(h, 8)
    assert len(h.context.keepalive) == 1  # parked for the 2 s left
    h.reactor.advance(2.5)
    assert conn.transport.disconnecting and len(h.context.keepalive) == 0
    second_session(h)
    assert len(h.connector.backends) == 2  # a login of its own


def test_a_connection_older_than_backend_keepalive_is_not_parked():
    h = harness()
    conn = _ended_after(h, 11)
    assert len(h.context.keepalive) == 0 and conn.transport.disconnecting


def test_a_reload_that_secures_a_backend_reuses_no_connection_made_without_tls():
    """Probe w1 (stop 52): the key held the endpoint but not tls nor ca: after a reload to tls = "starttls" every
    login for as long as the user kept polling ran on the parked cleartext connection."""
    from dataclasses import replace

    h = harness()
    plain = h.context.config.backends["b1"]
    creds = Credentials("alice", "secret")
    keys = [h.context.keepalive.key(b, creds, None) for b in (plain, replace(plain, tls="starttls"),
                                                              replace(plain, tls="starttls", ca=Path("ca.pem")))]
    assert len(set(keys)) == 3


def test_a_reload_that_shortens_backend_keepalive_applies_to_connections_parked_before_it():
    """Probe x1 (stop 52): parked with backend_keepalive = 60, then reloaded to 1: 3.5 s after its login the
    connection still took a login with a password the backend had refused since (its timer set at parking)."""
    from dataclasses import replace

    h = harness()  # backend_keepalive = 10
    conn = _ended_after(h, 1)
    assert len(h.context.keepalive) == 1
    config = h.context.config
    h.context.config = replace(config, proxy=replace(config.proxy, backend_keepalive=2))
    h.reactor.advance(1.5)  # 2.5 s after its login: older than 2
    second_session(h)
    assert len(h.connector.backends) == 2 and conn.transport.disconnecting


def test_a_parked_connection_closed_by_its_backend_before_the_loop_read_it_is_not_reused():
    """Dovecot's process killed right before the next login: its close waits unread in the socket while
    the login takes the connection, which answered OK, then BYE (probe y5 of stop 53). Peeked at: dropped."""
    for closed in (False, True):
        h = harness()
        conn = end_first_session(h)
        conn.dataReceived(b"%s OK Unselect completed.\r\n" % unselect_tag(h))
        ours, theirs = socket.socketpair()
        conn.transport.getHandle = lambda ours=ours: ours
        if closed:
            theirs.close()
        s, t = second_session(h)
        assert len(h.connector.backends) == (2 if closed else 1), closed
        assert t.value().startswith(b"L OK")
        ours.close()
        theirs.close()


def test_a_taken_connection_lost_before_its_first_use_is_replaced_without_a_bye():
    """Its Dovecot killed after take()'s look (probe y5 F2, the window left): the close comes after LOGIN OK.
    Nothing was sent or heard on it since: the session goes on, its next command on a new connection. Once
    used, losing it ends the session as before."""
    for used in (False, True):
        h = harness()
        conn = end_first_session(h)
        conn.dataReceived(b"%s OK Unselect completed.\r\n" % unselect_tag(h))
        s, t = second_session(h)
        assert len(h.connector.backends) == 1 and t.value().startswith(b"L OK")
        t.clear()
        if used:
            s.dataReceived(b"N NOOP\r\n")
            h.turns()
        conn.transport.loseConnection()
        conn.connectionLost(Failure(ConnectionDone()))
        h.turns()
        if used:
            assert t.value() == b"* BYE Mail server connection lost\r\n", t.value()
            continue
        assert t.value() == b"" and not t.disconnecting
        s.dataReceived(b"S SELECT INBOX\r\n")
        h.turns()
        assert len(h.connector.backends) == 2
        fresh = h.connector.backends[-1]
        tag = re.search(rb"(rp\d+) SELECT INBOX\r\n", fresh.transport.value()).group(1)
        fresh.dataReceived(b"* 3 EXISTS\r\n%s OK [READ-WRITE] Select completed.\r\n" % tag)
        h.turns()
        assert t.value().endswith(b"S OK [READ-WRITE] Select completed.\r\n"), t.value()
