"""Hostile clients on real sockets, the proxy in front of real Dovecot: memory stays
bounded whatever they do, the limits answer clearly, too few file descriptors refuse
cleanly instead of failing, failed logins wait. Memory is the kernel's count of the
proxy's resident pages (tests/procmem.py), never a timing.
"""

from __future__ import annotations

import re
import resource
import socket
import time

import pytest
from procmem import reset_peak, rss

from referral_proxy.admission import sessions_for
from referral_proxy.keepalive import IN_ALL
from referral_proxy.testing.hostile import KINDS, Crowd, Hostile, source_addresses

MiB = 1024 * 1024
RAISED = {"max_connections_per_ip": 10_000, "max_unauthenticated_per_ip": 10_000,
          "max_connections_per_user": 10_000, "login_penalty": 0}


def served(proxy, user: str = "alice", source: str = "127.0.0.1") -> bytes:
    """A legitimate client's LOGIN and NOOP from *source*: b"OK", or the line it got instead."""
    with socket.create_connection((proxy.host, proxy.port), timeout=30, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        greeting = f.readline()
        if not greeting.startswith(b"* OK"):
            return greeting
        s.sendall(b'l LOGIN %s "%s"\r\nn NOOP\r\nz LOGOUT\r\n' % (user.encode(), proxy.users[user].encode()))
        lines = [f.readline() for _ in range(3)]
        while not lines[-1].startswith(b"z ") and lines[-1]:
            lines.append(f.readline())
        tagged = [line for line in lines if line[:2] in (b"l ", b"n ")]
        return b"OK" if [t[:4] for t in tagged] == [b"l OK", b"n OK"] else b" | ".join(lines)


def wait_closed(conns: list[Hostile], most: float = 30.0) -> list[Hostile]:
    """Those of *conns* still open after at most *most* seconds (polled, not timed)."""
    deadline = time.monotonic() + most
    open_ = list(conns)
    while open_ and time.monotonic() < deadline:
        open_ = [c for c in open_ if c.alive()]
        time.sleep(0.2)
    return open_


@pytest.mark.parametrize("kind,then", [
    ("pipeline-pre", "bye"),  # 32 commands without a login: * BYE, closed
    ("unknown-pre", "bye"),
    ("pipeline-post", "not read"),  # its output full: no longer read
    ("id-literals", "drained"),  # one command without end: refused, the rest drained for nothing
])
def test_clients_that_never_read_hold_bounded_memory(proxy_factory, kind, then):
    proxy = proxy_factory(**RAISED)
    base, _ = rss(proxy.pid)
    reset_peak(proxy.pid)
    crowd = Crowd(KINDS[kind], proxy.host, proxy.port, 20, source_addresses(4), password=proxy.users["alice"])
    try:
        assert len(crowd.accepted) == 20, crowd.refusals or crowd.errors
        blocked = crowd.push_until_blocked(limit=(4 if then == "drained" else 16) * MiB, quiet=0.5)
        if then == "bye":
            assert wait_closed(crowd.members) == []
        elif then == "not read":
            # The proxy stops reading each of them: its sockets fill and nothing more goes out,
            # long before 16 MiB a connection (the landed code read on without end).
            assert blocked, [m.sent for m in crowd.members]
        now, peak = rss(proxy.pid)
        assert (peak - base) / 20 < 1 * MiB, f"{(peak - base) / 20 / 1024:.0f} KiB a connection"
        assert served(proxy) == b"OK"
    finally:
        crowd.close()
    log = proxy.stderr_text()
    assert "Traceback" not in log
    if then == "bye":
        assert log.count("outcome=too_many_commands") == 20


@pytest.mark.parametrize("kind", ["one-byte-literals", "big-command"])
def test_a_command_held_under_its_limits_costs_what_the_limits_say(proxy_factory, kind):
    proxy = proxy_factory(**RAISED)
    base, _ = rss(proxy.pid)
    crowd = Crowd(KINDS[kind], proxy.host, proxy.port, 10, source_addresses(2))
    try:
        assert len(crowd.accepted) == 10
        assert served(proxy) == b"OK"  # they have all been read by now (it came after them)
        now, _ = rss(proxy.pid)
        # max_command (1 MiB) of bytes plus ~150 bytes for each of max_literals: ~1.2 MiB, and
        # a reader's buffer; 3 MiB leaves room for the allocator's rounding.
        assert (now - base) / 10 < 3 * MiB, f"{(now - base) / 10 / 1024:.0f} KiB a connection"
    finally:
        crowd.close()


def test_slowloris_clients_are_closed_at_the_login_timeout(proxy_factory):
    """A byte a tick of a LOGIN line that never ends: the login timeout ends it (an aborted
    close when its output is backed up: tests/test_limits.py)."""
    proxy = proxy_factory(login_timeout=2, **RAISED)
    crowd = Crowd(KINDS["slowloris"], proxy.host, proxy.port, 5, source_addresses(1))
    try:
        crowd.keep_busy(1.0)
        assert wait_closed(crowd.members) == []
    finally:
        crowd.close()
    assert proxy.stderr_text().count("outcome=login_timeout") == 5


def test_connection_limits_say_bye_unavailable_and_a_legitimate_client_is_served(proxy_factory):
    proxy = proxy_factory(max_connections=12, max_connections_per_ip=5, max_unauthenticated_per_ip=3)
    idle = Crowd(KINDS["idle"], proxy.host, proxy.port, 5, ["127.0.1.1"])
    auth = Crowd(KINDS["idle-auth"], proxy.host, proxy.port, 3, ["127.0.1.2"], password=proxy.users["alice"])
    more = Crowd(KINDS["idle"], proxy.host, proxy.port, 3, ["127.0.1.2"])
    try:
        assert len(idle.accepted) == 3 and idle.refusals == [
            b"* BYE [UNAVAILABLE] Too many connections from your address waiting to log in (limit 3)\r\n"] * 2
        assert len(auth.accepted) == 3  # logged in: no longer waiting to log in
        assert len(more.accepted) == 2 and more.refusals == [
            b"* BYE [UNAVAILABLE] Too many connections from your address (limit 5)\r\n"]
        assert served(proxy) == b"OK"  # the 9th, from another address
        others = Crowd(KINDS["idle"], proxy.host, proxy.port, 5, ["127.0.1.3", "127.0.1.4"])
        assert len(others.accepted) == 4 and others.refusals == [
            b"* BYE [UNAVAILABLE] Too many connections to this server (limit 12); try again later\r\n"]
        assert served(proxy).startswith(b"* BYE [UNAVAILABLE] Too many connections to this server")
        others.close()
        assert wait_closed(others.accepted) == []
        deadline = time.monotonic() + 30
        while (answer := served(proxy)) != b"OK" and time.monotonic() < deadline:
            time.sleep(0.1)  # the proxy sees the closes in its own time
        assert answer == b"OK"
    finally:
        for c in (idle, auth, more):
            c.close()
    log = proxy.stderr_text()
    assert len(re.findall(r"connection refused.*max_unauthenticated_per_ip", log)) == 2
    assert "Traceback" not in log


def _few_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # ulimit -n 256, soft and hard


def test_thousands_of_connections_with_few_descriptors_are_refused_cleanly(proxy_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2000:
        pytest.skip("this test needs 2000 file descriptors of its own")
    proxy = proxy_factory(preexec=_few_descriptors, max_connections_per_ip=10_000, max_unauthenticated_per_ip=10_000)
    most = sessions_for(256 - min(IN_ALL, 256 // 4))  # parked backend connections' share aside
    crowd = Crowd(KINDS["idle"], proxy.host, proxy.port, 1500, source_addresses(6, "127.0.2."))
    try:
        assert not crowd.errors, crowd.errors[:3]
        assert len(crowd.accepted) == most
        assert set(crowd.refusals) == {
            b"* BYE [UNAVAILABLE] Too many connections to this server (limit %d); try again later\r\n" % most}
        # A legitimate client is refused as clearly (not dropped without a word) ...
        assert served(proxy).startswith(b"* BYE [UNAVAILABLE] Too many connections to this server")
        for m in crowd.accepted[:20]:
            m.close()
        # ... and served as soon as there is room: with its home backend's descriptor too.
        deadline = time.monotonic() + 30
        while (answer := served(proxy)) != b"OK" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer == b"OK"
    finally:
        crowd.close()
    log = proxy.stderr_text()
    assert f"max_connections 1000 lowered to {most}" in log
    assert "EMFILE" not in log and "Too many open files" not in log and "Traceback" not in log


def test_failed_logins_make_the_next_ones_wait(proxy_factory):
    proxy = proxy_factory(login_penalty=1)  # each wait: min(2 * 2**penalty, 1) = 1 s
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as s:
        f = s.makefile("rb")
        greeting = f.readline()
        assert greeting.startswith(b"* OK"), greeting
        s.sendall(b"a LOGIN alice wrong1\r\nb LOGIN alice wrong2\r\nc LOGIN alice \"%s\"\r\n"
                  % proxy.users["alice"].encode())
        seen: list[bytes] = []
        answers = _tagged(f, 3, seen)
    # On a failure: every line the client got (a BYE says who closed) and the proxy's own log.
    assert [a.split()[:2] for a in answers] == [[b"a", b"NO"], [b"b", b"NO"], [b"c", b"OK"]], (
        seen, proxy.running, proxy.stderr_text()[-3000:])
    assert proxy.stderr_text().count("login delayed") == 2  # b and c waited; a did not


def _tagged(f, n: int, seen: list[bytes]) -> list[bytes]:
    """The next *n* tagged lines (fewer at EOF); *seen* gets every line read."""
    out = []
    while len(out) < n:
        line = f.readline()
        seen.append(line)
        if not line:
            break
        if not line.startswith((b"*", b"+")):
            out.append(line)
    return out
