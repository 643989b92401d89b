"""Backend connections kept across a user's sessions (keepalive.py), against real Dovecot:
a parked connection goes only to a login of exactly the same credentials and client
address, never to two sessions, never with the last session's mailbox or its news; a
session that leaves state behind (ENABLE, CONDSTORE) or ends mid-command parks nothing.

Whether a login took a parked connection is read from Dovecot's own log: each backend
login writes one ``imap-login: Login: user=<...>`` line, with the proxy's session id when the proxy logged in."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import time
import urllib.request

import pytest
from imapwire import Wire, wait_for

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, free_port

pytestmark = pytest.mark.usefixtures("clean_mail")

MESSAGE = b"From: a@example.test\r\nSubject: %s\r\n\r\nbody %s\r\n"


def logins(dovecot, user: str) -> int:
    """Backend logins of *user* through a proxy (its ID's session id: rp...) Dovecot has logged so far."""
    pattern = r"imap-login: (?:Info: )?Login: user=<%s>, .*session=<rp" % re.escape(user)
    return len(re.findall(pattern, dovecot.log_text()))


def settle(dovecot, user: str, count: int, timeout: float = 30.0) -> int:
    """Dovecot's login count for *user* once it reaches *count* (its log is written a moment after)."""
    deadline = time.monotonic() + timeout
    while logins(dovecot, user) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return logins(dovecot, user)


def session(proxy, user: str = "alice", password: str = "secret") -> tuple[Wire, list[bytes]]:
    w = Wire(proxy.host, proxy.port)
    return w, w.cmd(b"L", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))


def logout(w: Wire) -> None:
    assert w.cmd(b"Z", b"LOGOUT")[-1].startswith(b"Z OK")
    w.sock.close()


def parked(proxy, dovecot, user: str = "alice", select: bytes | None = b"INBOX") -> int:
    """Log *user* in, select, log out: the connection is parked. Dovecot's login count after."""
    before = logins(dovecot, user)
    w, reply = session(proxy, user)
    assert reply[-1].startswith(b"L OK"), reply
    if select is not None:
        assert w.cmd(b"S", b"SELECT " + select)[-1].startswith(b"S OK")
    logout(w)
    after = settle(dovecot, user, before + 1)
    until_parked(proxy)
    return after


def append_direct(dovecot, user: str, mailbox: str, subject: bytes) -> None:
    conn = dovecot.client(user)
    try:
        if mailbox != "INBOX":
            conn.create(mailbox)
        conn.append(mailbox, None, None, MESSAGE % (subject, subject))
    finally:
        conn.logout()


def start(proxy_factory, **proxy_options):
    """A proxy with /metrics (its port in .metrics_port): tests wait for what it says is parked."""
    port = free_port()
    proxy = proxy_factory({"metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, **proxy_options)
    proxy.metrics_port = port
    return proxy


@pytest.fixture
def proxy(proxy_factory):
    return start(proxy_factory, backend_keepalive=30)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(r"^%s (\S+)$" % re.escape(name), text, re.M).group(1))


def until_parked(proxy, count: int = 1, timeout: float = 30.0) -> None:
    """Until the proxy has *count* connections parked (UNSELECT answered): no sleeping on a guess."""
    deadline = time.monotonic() + timeout
    while metric(proxy.metrics_port, "referral_proxy_backend_parked") != count:
        assert time.monotonic() < deadline, f"never {count} parked"
        time.sleep(0.02)


def test_the_next_login_takes_the_parked_connection_and_is_answered_the_same(proxy_factory, fleet):
    proxy = start(proxy_factory, backend_keepalive=30)
    port = proxy.metrics_port
    b1 = fleet.backends["b1"]
    before = logins(b1, "alice")
    w, first = session(proxy)
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    logout(w)
    assert settle(b1, "alice", before + 1) == before + 1
    until_parked(proxy)
    w, second = session(proxy)
    assert second == first  # the same tagged OK, capabilities and all
    assert w.cmd(b"N", b"NOOP")[-1].startswith(b"N OK")
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    logout(w)
    until_parked(proxy)
    assert logins(b1, "alice") == before + 1  # one backend login for both sessions
    assert metric(port, "referral_proxy_backend_reused_total") == 1
    assert metric(port, "referral_proxy_backend_parked") == 1
    assert metric(port, 'referral_proxy_logins_total{result="ok"}') == 2  # both client logins counted


def test_another_user_with_the_same_password_never_gets_it(proxy, fleet):
    b1 = fleet.backends["b1"]
    append_direct(b1, "alice", "INBOX", b"alice's")
    bob_before = logins(b1, "bob")
    parked(proxy, b1, "alice")
    w, reply = session(proxy, "bob", "secret")  # alice's password too
    assert reply[-1].startswith(b"L OK")
    assert settle(b1, "bob", bob_before + 1) == bob_before + 1  # a login of bob's own
    lines = w.cmd(b"S", b"SELECT INBOX")
    assert b"* 0 EXISTS\r\n" in lines, lines
    logout(w)


def test_a_login_in_capitals_is_not_the_same_login(proxy, fleet):
    b1 = fleet.backends["b1"]
    alice = parked(proxy, b1, "alice")
    w, reply = session(proxy, "ALICE", "secret")
    capitals_in = reply[-1].startswith(b"L OK")
    if capitals_in:  # Dovecot may take the name in any case: then it logs in anew
        deadline = time.monotonic() + 10
        while logins(b1, "alice") + logins(b1, "ALICE") == alice and time.monotonic() < deadline:
            time.sleep(0.02)
        assert logins(b1, "alice") + logins(b1, "ALICE") == alice + 1
        logout(w)
    # the lowercase login still finds alice's parked connection
    w, reply = session(proxy, "alice", "secret")
    assert reply[-1].startswith(b"L OK")
    logout(w)
    until_parked(proxy, 2 if capitals_in else 1)
    assert logins(b1, "alice") + logins(b1, "ALICE") <= alice + 1


def test_a_wrong_password_never_gets_it(proxy, fleet):
    b1 = fleet.backends["b1"]
    alice = parked(proxy, b1, "alice")
    w, reply = session(proxy, "alice", "wrong")
    assert reply[-1].startswith(b"L NO"), reply
    w.sock.close()
    w, reply = session(proxy, "alice", "secret")  # the parked one is still there, untouched
    assert reply[-1].startswith(b"L OK")
    logout(w)
    until_parked(proxy)
    assert logins(b1, "alice") == alice


def test_master_user_logins_for_two_users_do_not_share(proxy, fleet):
    b1 = fleet.backends["b1"]
    append_direct(b1, "alice", "INBOX", b"alice's")

    def master_login(user: str) -> Wire:
        w = Wire(proxy.host, proxy.port)
        blob = base64.b64encode(b"\0".join([user.encode(), MASTER_USER.encode(), MASTER_PASSWORD.encode()]))
        reply = w.cmd(b"A", b"AUTHENTICATE PLAIN " + blob)
        assert reply[-1].startswith(b"A OK"), reply
        return w

    w = master_login("alice")
    assert b"* 1 EXISTS\r\n" in w.cmd(b"S", b"SELECT INBOX")
    logout(w)
    until_parked(proxy)
    w = master_login("bob")  # same authcid and password, another authzid
    lines = w.cmd(b"S", b"SELECT INBOX")
    assert b"* 0 EXISTS\r\n" in lines, lines
    logout(w)
    w = master_login("alice")
    assert b"* 1 EXISTS\r\n" in w.cmd(b"S", b"SELECT INBOX")
    logout(w)


def test_two_logins_at_once_never_share_one(proxy, fleet):
    b1 = fleet.backends["b1"]
    append_direct(b1, "alice", "One", b"one")
    append_direct(b1, "alice", "Two", b"two")
    direct = b1.client("alice")
    direct.append("Two", None, None, MESSAGE % (b"more", b"more"))
    direct.logout()
    alice = parked(proxy, b1, "alice")
    a, b = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    a.send(b"L LOGIN alice secret\r\nS SELECT One\r\n")
    b.send(b"L LOGIN alice secret\r\nS SELECT Two\r\n")
    ra, rb = a.until_tagged(b"S"), b.until_tagged(b"S")
    assert b"* 1 EXISTS\r\n" in ra and ra[-1].startswith(b"S OK"), ra
    assert b"* 2 EXISTS\r\n" in rb and rb[-1].startswith(b"S OK"), rb
    fa, fb = a.cmd(b"F", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"), b.cmd(b"F", b"FETCH 1:* (FLAGS)")
    assert sum(line.startswith(b"* ") and b" FETCH " in line for line in fa) == 1, fa
    assert sum(line.startswith(b"* ") and b" FETCH " in line for line in fb) == 2, fb
    logout(a)
    logout(b)
    assert settle(b1, "alice", alice + 1) == alice + 1  # one of them took the parked one, the other logged in


def test_the_last_sessions_mailbox_and_its_news_never_reach_the_next(proxy, fleet):
    b1 = fleet.backends["b1"]
    append_direct(b1, "alice", "INBOX", b"first")
    append_direct(b1, "alice", "INBOX", b"second")
    w, _ = session(proxy)
    assert b"* 2 EXISTS\r\n" in w.cmd(b"S", b"SELECT INBOX")
    logout(w)
    until_parked(proxy)
    append_direct(b1, "alice", "INBOX", b"delivered in between")  # a delivery into the mailbox it had selected
    direct = b1.client("alice")
    direct.select("INBOX")
    direct.store("1", "+FLAGS", "\\Deleted")
    direct.expunge()
    direct.logout()
    alice = logins(b1, "alice")
    w, reply = session(proxy)
    assert reply[-1].startswith(b"L OK")
    noop = w.cmd(b"N", b"NOOP")
    assert noop == [b"N OK NOOP completed.\r\n"] or all(not re.match(rb"\* \d+ (EXISTS|EXPUNGE|RECENT|FETCH)", x)
                                                       for x in noop), noop
    fetch = w.cmd(b"F", b"FETCH 1 (FLAGS)")
    assert fetch[-1].startswith(b"F BAD") or fetch[-1].startswith(b"F NO"), fetch  # nothing is selected
    lines = w.cmd(b"S", b"SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in lines, lines
    logout(w)
    until_parked(proxy)
    assert logins(b1, "alice") == alice  # it was the parked connection


def test_another_client_address_does_not_take_it(proxy_factory, fleet):
    proxy = start(proxy_factory, backend_keepalive=30, trusted_networks=["127.0.0.0/8"])
    b1 = fleet.backends["b1"]

    def from_ip(ip: bytes) -> Wire:
        w = Wire(proxy.host, proxy.port)
        assert w.cmd(b"I", b'ID ("x-originating-ip" "%s")' % ip)[-1].startswith(b"I OK")
        assert w.cmd(b"L", b"LOGIN alice secret")[-1].startswith(b"L OK")
        return w

    before = logins(b1, "alice")
    logout(from_ip(b"192.0.2.1"))
    assert settle(b1, "alice", before + 1) == before + 1
    until_parked(proxy, 1)
    logout(from_ip(b"192.0.2.2"))
    assert settle(b1, "alice", before + 2) == before + 2  # not the first one's
    until_parked(proxy, 2)
    logout(from_ip(b"192.0.2.1"))
    until_parked(proxy, 2)
    assert logins(b1, "alice") == before + 2  # the first one's, parked again


@pytest.mark.parametrize("stateful", [b"ENABLE CONDSTORE", b"FETCH 1 (FLAGS MODSEQ)",
                                      b"FETCH 1 (FLAGS) (CHANGEDSINCE 1)", b"STATUS INBOX (HIGHESTMODSEQ)"])
def test_a_session_that_enabled_something_parks_nothing(proxy, fleet, stateful):
    b1 = fleet.backends["b1"]
    append_direct(b1, "alice", "INBOX", b"one")
    before = logins(b1, "alice")
    w, _ = session(proxy)
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    assert w.cmd(b"X", stateful)[-1].startswith(b"X OK")
    logout(w)
    assert settle(b1, "alice", before + 1) == before + 1
    time.sleep(0.3)
    w, _ = session(proxy)
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    fetch = w.cmd(b"F", b"FETCH 1 (FLAGS)")
    assert all(b"MODSEQ" not in x for x in fetch), fetch  # CONDSTORE is not on
    logout(w)
    assert settle(b1, "alice", before + 2) == before + 2


def test_a_session_killed_mid_command_parks_nothing(proxy, fleet):
    b1 = fleet.backends["b1"]
    append_direct(b1, "alice", "INBOX", b"one")
    before = logins(b1, "alice")
    w, _ = session(proxy)
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    # The FETCH is held unanswered on Dovecot (its imap process stopped) until the proxy has ended
    # the session: mid-command for sure. (It used to be a 4 MB answer cut after 1000 bytes: whenever
    # the sockets' buffers took the whole answer -- here 4 MB of send buffer, a loaded machine -- the
    # FETCH was over on the backend before the proxy saw the reset, its connection rightly parked,
    # and the next login took it: "assert 1 == (0 + 2)" below, 1 run in 5 under load.)
    stopped = b1.sessions("alice")
    ended = proxy.stderr_text().count("outcome=client_closed")
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        w.send(b"F FETCH 1:* BODY.PEEK[]\r\n")
        w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        w.sock.close()  # a reset, the command under way
        wait_for(lambda: proxy.stderr_text().count("outcome=client_closed") > ended, "the session's end")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    w2 = Wire(proxy.host, proxy.port)
    w2.send(b"L LOGIN alice secret\r\nA APPEND INBOX {100}\r\n")
    w2.until_tagged(b"L")
    assert w2.line().startswith(b"+")
    w2.send(b"y" * 10)
    w2.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    w2.sock.close()  # mid-literal
    assert settle(b1, "alice", before + 2) == before + 2  # the FETCH's connection was not parked
    time.sleep(0.5)
    w, reply = session(proxy)
    assert reply[-1].startswith(b"L OK")
    assert w.cmd(b"N", b"NOOP")[-1].startswith(b"N OK")
    logout(w)
    assert settle(b1, "alice", before + 3) == before + 3  # nor the APPEND's


def test_off_when_zero(proxy_factory, fleet):
    proxy = proxy_factory(backend_keepalive=0)
    b1 = fleet.backends["b1"]
    before = logins(b1, "alice")
    for _ in range(2):
        w, _ = session(proxy)
        logout(w)
    assert settle(b1, "alice", before + 2) == before + 2


def test_whole_sessions_pipelined_in_one_write_with_deliveries_between(proxy, fleet):
    b1 = fleet.backends["b1"]
    before = logins(b1, "alice")
    for i in range(1, 6):
        append_direct(b1, "alice", "INBOX", b"delivery %d" % i)
        w = Wire(proxy.host, proxy.port)
        w.send(b"L LOGIN alice secret\r\nN NOOP\r\nS SELECT INBOX\r\nF FETCH 1:* (FLAGS)\r\nZ LOGOUT\r\n")
        lines = w.until_tagged(b"Z")
        w.sock.close()
        noop = lines[lines.index(next(x for x in lines if x.startswith(b"L OK"))) + 1:]
        assert noop[0].startswith(b"N OK NOOP completed"), lines  # nothing of the last session's mailbox
        assert b"* %d EXISTS\r\n" % i in lines, lines
        assert sum(b" FETCH (FLAGS" in x for x in lines) == i, lines
        until_parked(proxy)
    assert logins(b1, "alice") - before == 1  # one backend login for all five
