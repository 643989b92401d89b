"""The transparent proxy in front of real Dovecot backends, driven by real clients."""

from __future__ import annotations

import hashlib
import imaplib
import os
import socket
import threading
import time

import imapclient
import psutil
import pytest
from imapwire import Wire
from procmem import reset_peak, rss

pytestmark = pytest.mark.usefixtures("clean_mail")


def _msg(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return b"From: a@example.test\r\nTo: b@example.test\r\nSubject: " + subject.encode() + b"\r\n\r\n" + body


def test_greeting_and_capabilities_before_login(proxy_factory):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    assert w.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ")
    assert b"proxy.test" in w.greeting
    reply = w.cmd(b"a1", b"CAPABILITY")
    caps = reply[0].split()
    assert caps[:2] == [b"*", b"CAPABILITY"]
    assert b"AUTH=PLAIN" in caps and b"LITERAL+" in caps and b"SASL-IR" in caps
    assert reply[1] == b"a1 OK Capability completed.\r\n"
    assert w.cmd(b"a2", b"NOOP") == [b"a2 OK NOOP completed.\r\n"]
    assert w.cmd(b"a3", b"SELECT INBOX")[-1].startswith(b"a3 BAD")
    assert w.cmd(b"a4", b"FROB")[-1] == b"a4 BAD Unknown command FROB\r\n"
    reply = w.cmd(b"a5", b'ID ("name" "test")')
    assert reply[0].startswith(b'* ID ("name" "referral-proxy"')
    assert w.cmd(b"a6", b"LOGOUT") == [b"* BYE Logging out\r\n", b"a6 OK Logout completed.\r\n"]
    assert w.closed()


def test_imaplib_full_session(proxy_factory, fleet):
    proxy = proxy_factory()
    m = proxy.imaplib()
    typ, data = m.login("alice", "secret")
    assert typ == "OK"
    typ, data = m.capability()
    caps = set(data[0].decode().split())
    # What the proxy relays from Dovecot, and what it must hide.
    assert {"IDLE", "UIDPLUS", "MOVE", "LITERAL+", "NAMESPACE", "CONDSTORE", "MULTIAPPEND"} <= caps
    assert not any(c.startswith(("AUTH=", "COMPRESS")) for c in caps)
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    assert m.create("Work")[0] == "OK"
    assert any(b'"Work"' in line or b" Work" in line for line in m.list()[1])
    for i in range(3):
        assert m.append("Work", r"(\Flagged)", None, _msg(f"n{i}"))[0] == "OK"
    typ, data = m.select("Work")
    assert typ == "OK" and data == [b"3"]
    typ, data = m.fetch("1:3", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = [d[1].strip() for d in data if isinstance(d, tuple)]
    assert subjects == [b"Subject: n0", b"Subject: n1", b"Subject: n2"]
    assert m.store("2", "+FLAGS", r"(\Deleted)")[0] == "OK"
    assert m.search(None, "DELETED") == ("OK", [b"2"])
    typ, data = m.expunge()
    assert typ == "OK" and data == [b"2"]
    typ, data = m.uid("SEARCH", None, "ALL")
    assert typ == "OK" and len(data[0].split()) == 2
    assert m.logout()[0] == "BYE"
    # The backend itself holds what the client did.
    direct = fleet["b1"].client("alice")
    direct.select("Work")
    assert direct.search(None, "ALL")[1] == [b"1 2"]
    direct.logout()


def test_imapclient_session_with_idle(proxy_factory, fleet):
    proxy = proxy_factory()
    c = imapclient.IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=20)
    c.login("alice", "secret")
    c.create_folder("Idle")
    c.select_folder("Idle")
    c.idle()  # waits for the "+ idling" the proxy relays

    def deliver():
        time.sleep(0.5)
        other = fleet["b1"].client("alice")
        other.append("Idle", "", None, _msg("while idle"))
        other.logout()

    t = threading.Thread(target=deliver)
    t.start()
    # idle_check returns at the first untagged answer; Dovecot's own "* OK Still here"
    # keepalive (timed from a hash of user and address, so at any moment) may come first
    responses: list = []
    deadline = time.monotonic() + 15
    while (1, b"EXISTS") not in responses and time.monotonic() < deadline:
        responses += c.idle_check(timeout=max(0.1, deadline - time.monotonic()))
    t.join()
    c.idle_done()
    assert (1, b"EXISTS") in responses
    uids = c.search(["SUBJECT", "while idle"])
    assert len(uids) == 1
    body = c.fetch(uids, ["RFC822"])[uids[0]][b"RFC822"]
    assert body == _msg("while idle")
    c.logout()


def test_literals_before_login_sync_and_nonsync(proxy_factory):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.send(b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
    assert w.until_tagged(b"a1")[-1].startswith(b"a1 OK [CAPABILITY ")
    w.close()
    w = Wire(proxy.host, proxy.port)
    w.send(b"a1 LOGIN {5}\r\n")
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(b"alice {6}\r\n")
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(b"secret\r\n")
    assert w.until_tagged(b"a1")[-1].startswith(b"a1 OK ")
    w.close()


def test_awkward_password_through_imaplib_and_sasl(proxy_factory):
    from referral_proxy.fleet import DEFAULT_USERS

    proxy = proxy_factory()
    m = proxy.imaplib()
    assert m.login("dave", DEFAULT_USERS["dave"])[0] == "OK"
    m.logout()
    # AUTHENTICATE PLAIN with an initial response, and without one.
    import base64

    blob = base64.b64encode(b"\0dave\0" + DEFAULT_USERS["dave"].encode())
    w = Wire(proxy.host, proxy.port)
    assert w.cmd(b"a1", b"AUTHENTICATE PLAIN " + blob)[-1].startswith(b"a1 OK [CAPABILITY ")
    w.close()
    w = Wire(proxy.host, proxy.port)
    w.send(b"a1 AUTHENTICATE PLAIN\r\n")
    assert w.line() == b"+ \r\n"
    w.send(blob + b"\r\n")
    assert w.until_tagged(b"a1")[-1].startswith(b"a1 OK ")
    w.close()
    w = Wire(proxy.host, proxy.port)
    w.send(b"a1 AUTHENTICATE PLAIN\r\n")
    assert w.line() == b"+ \r\n"
    w.send(b"*\r\n")
    assert w.line() == b"a1 BAD Authentication cancelled\r\n"
    w.close()


def test_bad_credentials(proxy_factory):
    proxy = proxy_factory()
    m = proxy.imaplib()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login("alice", "wrong")
    # The session goes on: a second try works.
    assert m.login("alice", "secret")[0] == "OK"
    m.logout()
    stderr = proxy.stderr_text()
    assert "wrong" not in stderr and "secret" not in stderr, "a password reached the log"


def test_home_backend_unreachable(proxy_factory):
    from referral_proxy.fleet import free_port

    dead = free_port("127.0.0.5")
    proxy = proxy_factory({"backends": {"dead": {"endpoint": f"tcp:host=127.0.0.5:port={dead}",
                                                 "url": f"imap://127.0.0.5:{dead}"}},
                           "map": {"default": "dead"}})
    w = Wire(proxy.host, proxy.port)
    reply = w.cmd(b"a1", b"LOGIN alice secret")
    assert reply == [b"a1 NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
    assert w.cmd(b"a2", b"NOOP") == [b"a2 OK NOOP completed.\r\n"]
    w.close()


def test_replica_used_when_primary_is_down(proxy_factory):
    from referral_proxy.fleet import free_port

    dead = free_port("127.0.0.5")
    proxy = proxy_factory({"backends": {"dead": {"endpoint": f"tcp:host=127.0.0.5:port={dead}",
                                                 "url": f"imap://127.0.0.5:{dead}"}},
                           "map": {"rules": [{"user": "alice", "mailbox": "*", "backend": ["dead", "b1"]}]}})
    m = proxy.imaplib()
    assert m.login("alice", "secret")[0] == "OK"
    m.logout()


def test_pipelined_commands_keep_their_tags(proxy_factory):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"ap", b"APPEND INBOX {5+}\r\nhello")[-1].startswith(b"ap OK")
    w.send(b"p1 NOOP\r\np2 SELECT INBOX\r\np3 CAPABILITY\r\np4 FETCH 1:* FLAGS\r\np5 NOOP\r\n")
    lines = w.until_tagged(b"p5")
    tagged = [line.split()[0] for line in lines if not line.startswith((b"*", b"+"))]
    assert tagged == [b"p1", b"p2", b"p3", b"p4", b"p5"]
    assert all(b" OK " in line for line in lines if not line.startswith((b"*", b"+")))
    w.close()


def test_unknown_command_after_login_is_refused_not_relayed(proxy_factory):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    reply = w.cmd(b"x1", b"FROBNICATE")
    assert reply == [b"x1 BAD Unknown command FROBNICATE\r\n"]  # the proxy's own: no backend saw it
    assert w.cmd(b"x2", b"NOOP")[-1].startswith(b"x2 OK")
    assert w.cmd(b"x3", b"LOGIN a b") == [b"x3 BAD LOGIN is not allowed after login\r\n"]
    w.close()


def test_oversized_line_and_literals_leave_the_session_usable(proxy_factory):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"big SEARCH TEXT " + b"x" * 70000 + b"\r\n")
    assert w.line() == b"big BAD Command line too long (limit 65536 bytes)\r\n"
    assert w.cmd(b"n1", b"NOOP")[-1].startswith(b"n1 OK")
    # A synchronizing literal over the limit is refused before the client sends it.
    w.send(b"s1 SELECT INBOX\r\n")
    w.until_tagged(b"s1")
    w.send(b"lit SEARCH TEXT {100000}\r\n")
    assert w.line() == b"lit NO [TOOBIG] Literal too large (limit 65536 bytes)\r\n"
    assert w.cmd(b"n2", b"NOOP")[-1].startswith(b"n2 OK")
    # A non-synchronizing one is drained, then refused; what follows still works.
    w.send(b"lit2 SEARCH TEXT {100000+}\r\n" + b"y" * 100000 + b" OR SEEN {3+}\r\nabc\r\nn3 NOOP\r\n")
    assert w.line() == b"lit2 NO [TOOBIG] Literal too large (limit 65536 bytes)\r\n"
    assert w.until_tagged(b"n3")[-1].startswith(b"n3 OK")
    # An APPEND over the message limit: nothing is appended.
    w.send(b"ap APPEND INBOX {600000000}\r\n")
    assert w.line().startswith(b"ap NO [TOOBIG]")
    assert w.cmd(b"st", b"STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 0)\r\n"
    # Garbage gets BAD with a reason.
    w.send(b"\r\n")
    assert w.line().startswith(b"* BAD Invalid command")
    w.close()


@pytest.mark.parametrize("script", [
    b"a APPEND INBOX {99999999999999999999+}\r\n%s\r\nz NOOP\r\n",
    b"a APPEND INBOX {%d+}\r\n%s {99999999999999999999+}\r\nxx\r\nz NOOP\r\n",  # the 2nd message of a MULTIAPPEND
], ids=["first", "second"])
def test_a_literal_plus_larger_than_any_command_ends_the_session_with_nothing_appended(proxy_factory, fleet, script):
    """Its announced bytes were dropped for ever (RFC 7888 lets a server drain them): every command after them
    with them, and the client waited for good; Dovecot says BYE (probe g2 of stop 57). The MULTIAPPEND's first
    message, already at the backend, is cancelled there and the command answered before the BYE."""
    message = _msg("never-appended-g2f2")
    proxy = proxy_factory(max_message=5000)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(script % (len(message), message) if b"%d" in script else script % message)
    assert [w.line(), w.line()] == [b"a NO [TOOBIG] Message too large (limit 5000 bytes); nothing was appended\r\n",
                                    b"* BYE Literal too large to skip (limit 1048576 bytes)\r\n"]
    assert w.closed()
    with fleet["b1"].client("alice") as direct:
        direct.select("INBOX", readonly=True)
        assert direct.search(None, "HEADER", "Subject", "never-appended-g2f2") == ("OK", [b""])


def test_append_sync_literal_waits_for_backend_trycreate(proxy_factory):
    """A large synchronizing APPEND literal is announced to Dovecot first: its TRYCREATE arrives before the data."""
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"a1 APPEND Nowhere {200000}\r\n")
    reply = w.line()
    assert reply.startswith(b"a1 NO [TRYCREATE]"), reply
    assert w.cmd(b"a2", b"NOOP")[-1].startswith(b"a2 OK")
    w.send(b"a3 APPEND INBOX {200000}\r\n")
    assert w.line().startswith(b"+ ")
    w.send(b"Subject: big\r\n\r\n" + b"z" * (200000 - 16) + b"\r\n")
    assert w.until_tagged(b"a3")[-1].startswith(b"a3 OK [APPENDUID ")
    w.close()



def test_50mb_message_both_ways_with_bounded_memory(proxy_factory, fleet):
    proxy = proxy_factory()
    size = 50 * 1024 * 1024
    body = (b"0123456789abcdef" * 4 + b"\r\n") * (size // 66)
    message = _msg("big", body)
    m = proxy.imaplib()
    m.login("alice", "secret")
    reset_peak(proxy.pid)
    before, _ = rss(proxy.pid)
    assert m.append("INBOX", None, None, message)[0] == "OK"
    m.select("INBOX", readonly=True)
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK"
    fetched = data[0][1]
    _, peak = rss(proxy.pid)
    m.logout()
    assert hashlib.sha256(fetched).hexdigest() == hashlib.sha256(message).hexdigest()
    # The message went through the proxy both ways without the proxy holding it.
    growth = peak - before
    print(f"proxy peak memory growth: {growth / 1e6:.1f} MB")
    assert growth < 24 * 1024 * 1024, f"proxy memory grew by {growth / 1e6:.1f} MB for a {size / 1e6:.0f} MB message"
    direct = fleet["b1"].client("alice")
    direct.select("INBOX", readonly=True)
    assert direct.fetch("1", "(RFC822.SIZE)")[1][0] == b"1 (RFC822.SIZE %d)" % len(message)
    direct.logout()


def _backend_connections(proxy_pid: int, port: int) -> int:
    return sum(
        1 for c in psutil.Process(proxy_pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("keepalive", [0, 1])
def test_client_drop_closes_backend_connection(proxy_factory, fleet, keepalive):
    # keepalive 0: closed at once; 1: the clean ones are parked (keepalive.py) and logged out after
    # 1 s. The default (10 s) would race this wait: it failed CI once that way (stop 23).
    proxy = proxy_factory(backend_keepalive=keepalive)
    port = fleet["b1"].port
    clients = []
    for _ in range(5):
        w = Wire(proxy.host, proxy.port)
        w.login()
        clients.append(w)
    assert _wait_for(lambda: _backend_connections(proxy.pid, port) == 5)
    # Dropped mid-command (inside a literal) and between commands alike.
    clients[0].send(b"a APPEND INBOX {1000+}\r\npartial")
    for w in clients:
        w.sock.close()
    assert _wait_for(lambda: _backend_connections(proxy.pid, port) == 0), "leaked backend connections"
    direct = fleet["b1"].client("alice")
    assert direct.status("INBOX", "(MESSAGES)")[1] == [b'INBOX (MESSAGES 0)'], "a partial APPEND was saved"
    direct.logout()


def test_backend_death_gives_bye(proxy_factory, spare_backend):
    solo = spare_backend
    proxy = proxy_factory({"backends": {"solo": {"endpoint": solo.endpoint, "url": solo.url}},
                           "map": {"default": "solo"}})
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    solo.kill()
    line = w.line()
    assert line.startswith(b"* BYE"), line
    assert w.closed()
    solo.start()
    w = Wire(proxy.host, proxy.port)
    w.login()  # the proxy itself is fine
    w.close()


def _socket_option(pid: int, fd: int, level: int, option: int) -> int:
    """Read a socket option of another process's socket (pidfd_getfd, Linux >= 5.6, root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if dup < 0:
            pytest.skip(f"pidfd_getfd not permitted here (errno {ctypes.get_errno()})")
        with socket.socket(fileno=dup) as s:
            return s.getsockopt(level, option)
    finally:
        os.close(pidfd)


def test_tcp_nodelay_and_keepalive_on_both_connections(proxy_factory, fleet):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    conns = [c for c in psutil.Process(proxy.pid).net_connections(kind="tcp")
             if c.status == psutil.CONN_ESTABLISHED]
    client_side = [c for c in conns if c.laddr.port == proxy.port]
    backend_side = [c for c in conns if c.raddr and c.raddr.port == fleet["b1"].port]
    assert len(client_side) == 1 and len(backend_side) == 1
    from referral_proxy.netio import KEEPIDLE

    for c in client_side + backend_side:
        assert _socket_option(proxy.pid, c.fd, socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # keepalive: a vanished peer is found, its session and backends closed
        assert _socket_option(proxy.pid, c.fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        assert _socket_option(proxy.pid, c.fd, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPIDLE
    w.close()


def test_search_with_literals_sync_and_nonsync(proxy_factory, fleet):
    with fleet["b1"].client("alice") as m:
        m.append("INBOX", None, None, _msg("needle in a haystack"))
        m.append("INBOX", None, None, _msg("other"))
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.cmd(b"s", b"SELECT INBOX")
    w.send(b"f1 SEARCH CHARSET UTF-8 SUBJECT {6}\r\n")
    assert w.line() == b"+ Ready for literal data\r\n"
    w.send(b"needle\r\n")
    assert w.until_tagged(b"f1")[0] == b"* SEARCH 1\r\n"
    reply = w.cmd(b"f2", b"UID SEARCH OR SUBJECT {5+}\r\nother SUBJECT {8+}\r\nhaystack")
    assert reply[0].split()[:2] == [b"*", b"SEARCH"] and len(reply[0].split()) == 4
    w.close()


def test_runs_under_twistd_and_says_bye_on_sigterm(proxy_factory, fleet, tmp_path):
    import signal
    import subprocess
    import sys

    from referral_proxy.fleet import free_port
    from referral_proxy.testing.proxyproc import REPO_ROOT

    # The same configuration the fixture writes, served by twistd through the plugin.
    reference = proxy_factory()
    port = free_port("127.0.0.1")
    config = tmp_path / "twistd.toml"
    config.write_text(reference.config_path.read_text().replace(f"tcp:{reference.port}:", f"tcp:{port}:"))
    # PYTHONPATH: this checkout's plugin and package, not whatever is installed (nothing, or another
    # checkout's editable install: 'Unknown command: referral-proxy' on a machine without this one's)
    twistd = subprocess.Popen(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "-n", "--pidfile=", "--logfile=-", "referral-proxy", "--config", str(config)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                w = Wire("127.0.0.1", port)
                break
            except OSError:
                assert twistd.poll() is None and time.monotonic() < deadline, twistd.stdout.read().decode()
                time.sleep(0.1)
        w.login()
        assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        twistd.send_signal(signal.SIGTERM)
        assert w.line() == b"* BYE Server shutting down\r\n"
        assert w.closed()
        assert twistd.wait(20) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
    finally:
        if twistd.poll() is None:
            twistd.kill()
            twistd.wait()


@pytest.mark.parametrize("greets", [False, True], ids=["silent", "greets-then-silent"])
def test_a_backend_that_never_answers_does_not_hold_the_login(proxy_factory, greets):
    """A fake backend (Dovecot will not hang on purpose): accepts, maybe greets, then says nothing."""
    from referral_proxy.fleet import free_port

    port = free_port("127.0.0.5")
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.5", port))
    server.listen(8)
    held = []

    def serve():
        try:
            while True:
                conn, _ = server.accept()
                held.append(conn)
                if greets:
                    conn.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+] mute\r\n")
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        proxy = proxy_factory({"backends": {"mute": {"endpoint": f"tcp:host=127.0.0.5:port={port}",
                                                     "url": f"imap://127.0.0.5:{port}", "connect_timeout": 1}},
                               "map": {"default": "mute"}})
        w = Wire(proxy.host, proxy.port, timeout=30)
        assert w.cmd(b"a", b"LOGIN alice secret") == [b"a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
        assert w.cmd(b"b", b"NOOP") == [b"b OK NOOP completed.\r\n"]
        w.close()
    finally:
        server.close()
        for conn in held:
            conn.close()
