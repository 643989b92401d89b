"""A client's input while a login or a task holds its session, attacked on real sockets in
front of real Dovecot: logins and commands pipelined in one write (or a byte at a time)
behind the failed-login penalty, bytes sent during a login's wait, a client that leaves
during it or right after its LOGIN, many short sessions each in one write, two sessions of
one user at once, a client gone in the middle of a MOVE to another server. Every tagged
answer comes once and in order, every checked login is logged and counted, every message
is left exactly once (census of the backends), every session ends (the sessions gauge)."""

from __future__ import annotations

import collections
import socket
import threading
import time

import pytest
from imapwire import Wire, wait_for
from test_ops_dovecot import scrape, value
from test_transfer import MASTERS, RULES, _contents, _seed

from referral_proxy.fleet import free_port

RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a reset


def _proxy(proxy_factory, config=None, **options):
    port = free_port()
    proxy = proxy_factory({**(config or {}), "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, **options)
    return proxy, port


def _session(proxy, data: bytes, tags: list[bytes], *, one_byte_at_a_time: bool = False) -> list[bytes]:
    """The tagged answers (b"tag STATUS") up to the last tag's, in the order they came."""
    with socket.create_connection((proxy.host, proxy.port), timeout=60) as s, s.makefile("rb") as f:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert f.readline().startswith(b"* OK")
        if one_byte_at_a_time:
            for i in range(len(data)):
                s.sendall(data[i:i + 1])
        else:
            s.sendall(data)
        out: list[bytes] = []
        while True:
            line = f.readline()
            if not line:
                return [*out, b"EOF"]
            if line.split(b" ", 1)[0] in tags:
                out.append(b" ".join(line.split()[:2]))
                if line.startswith(tags[-1] + b" "):
                    return out
            elif line.startswith(b"* BYE") and tags[-1] != b"z":
                out.append(line.rstrip())


def _all_ended(proxy, metrics_port: int) -> None:
    wait_for(lambda: value(scrape(metrics_port), "referral_proxy_sessions") == 0, "every session ended")
    log = proxy.stderr_text()
    assert "Traceback" not in log and "crashed" not in log, log[-4000:]


def test_logins_and_commands_pipelined_behind_the_penalty_answered_in_order(proxy_factory):
    proxy, metrics = _proxy(proxy_factory, login_penalty=1)
    pw = proxy.users["alice"].encode()
    script = (b"a LOGIN alice wrong1\r\nb LOGIN alice wrong2\r\nc LOGIN alice \"%s\"\r\n"
              b"d SELECT INBOX\r\ne NOOP\r\nz LOGOUT\r\n" % pw)
    tags = [b"a", b"b", b"c", b"d", b"e", b"z"]
    want = [b"a NO", b"b NO", b"c OK", b"d OK", b"e OK", b"z OK"]
    assert _session(proxy, script, tags) == want
    assert proxy.stderr_text().count("login delayed") == 2  # b and c waited
    assert _session(proxy, script, tags, one_byte_at_a_time=True) == want
    _all_ended(proxy, metrics)


def test_bytes_sent_during_the_penalty_wait_then_the_client_leaves(proxy_factory):
    proxy, metrics = _proxy(proxy_factory, login_penalty=1)
    pw = proxy.users["alice"].encode()
    for step in range(4):
        with socket.create_connection((proxy.host, proxy.port), timeout=60) as s, s.makefile("rb") as f:
            f.readline()
            s.sendall(b"a LOGIN alice wrong%d\r\n" % step)
            assert f.readline().startswith(b"a NO")
            s.sendall(b'b LOGIN alice "%s"\r\n' % pw)  # waits the penalty
            if step >= 1:
                s.sendall(b"c SELECT INBOX\r\n")  # during the wait
            if step >= 2:
                for byte in b"d NOOP\r\n":  # a byte at a time, during the wait
                    s.send(bytes([byte]))
            if step == 3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    assert _session(proxy, b'l LOGIN alice "%s"\r\nz LOGOUT\r\n' % pw, [b"l", b"z"]) == [b"l OK", b"z OK"]
    _all_ended(proxy, metrics)


def test_a_failed_login_of_a_client_that_leaves_at_once_is_logged_and_counted(proxy_factory):
    """What fail2ban reads: a guess sent with the close right behind it is checked, logged and
    counted as any other (a read gate that saw the close during the check lost all three)."""
    proxy, metrics = _proxy(proxy_factory, login_penalty=0)
    for i in range(5):
        with socket.create_connection((proxy.host, proxy.port), timeout=30) as s, s.makefile("rb") as f:
            f.readline()
            s.sendall(b"a LOGIN alice wrong%d\r\n" % i)
    _all_ended(proxy, metrics)
    wait_for(lambda: value(scrape(metrics), "referral_proxy_logins_total", result="failed") == 5, "5 failed logins")
    assert proxy.stderr_text().count("result=failed") == 5


@pytest.mark.usefixtures("clean_mail")
@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_gone_during_a_move_to_another_server_leaves_every_message_once(proxy_factory, fleet, how):
    n = 200
    _seed(fleet["b1"], "Work", n)
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Dest")
    before = collections.Counter(x[3] for x in _contents(fleet["b1"], "Work"))
    proxy, metrics = _proxy(proxy_factory, MASTERS, rules=RULES)
    for delay in (0.0, 0.05, 0.1, 0.2):
        w = Wire(proxy.host, proxy.port, timeout=60)
        w.login()
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        w.send(b"m MOVE 1:* Shared/Dest\r\n")
        time.sleep(delay)  # (not asserted: where in the MOVE the client leaves)
        if how == "reset":
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        w.sock.close()
        _all_ended(proxy, metrics)
        work, dest = _contents(fleet["b1"], "Work"), _contents(fleet["b3"], "Shared/Dest")
        assert collections.Counter(x[3] for x in work + dest) == before, (delay, len(work), len(dest))
        if work:  # moved back for the next round
            with fleet["b1"].client("alice") as m:
                m.select("Work")
        if dest:
            w = Wire(proxy.host, proxy.port, timeout=60)
            w.login()
            assert w.cmd(b"s", b"SELECT Shared/Dest")[-1].startswith(b"s OK")
            assert w.cmd(b"m", b"MOVE 1:* Work")[-1].startswith(b"m OK")
            w.close()
    assert "copied to" not in proxy.stderr_text()  # no MOVE was left for recovery to finish


def test_short_sessions_each_in_one_write_and_two_of_one_user_at_once(proxy_factory):
    proxy, metrics = _proxy(proxy_factory, login_penalty=1)
    pw = {u: proxy.users[u].encode() for u in ("alice", "bob")}
    results: list[tuple[str, list[bytes]]] = []
    lock = threading.Lock()

    def run(user: str, n: int) -> None:
        for _ in range(n):
            wrong = b"w LOGIN %s wrong\r\n" % user.encode() if user == "bob" else b""
            script = wrong + b'l LOGIN %s "%s"\r\ns SELECT INBOX\r\nf UID FETCH 1:* FLAGS\r\nz LOGOUT\r\n' % (
                user.encode(), pw[user])
            got = _session(proxy, script, ([b"w"] if wrong else []) + [b"l", b"s", b"f", b"z"])
            with lock:
                results.append((user, got))

    threads = [threading.Thread(target=run, args=(user, 4)) for user in ("alice", "alice", "bob", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 16
    for user, got in results:
        assert got == ([b"w NO"] if user == "bob" else []) + [b"l OK", b"s OK", b"f OK", b"z OK"], (user, got)
    _all_ended(proxy, metrics)
