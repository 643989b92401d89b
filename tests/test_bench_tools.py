"""The benchmark's own tools work: the load generator, the auth_http responder, the peers.

Smoke tests in a few seconds, against the real Dovecot fleet: what the load generator
appended is on the backend byte for byte, a wrong password is counted as an error, the
auth_http responder sends nginx to the backend it was given, and each installed peer
proxy (bench/peers.py) relays a LOGIN and an APPEND to the backend.  No timings.
"""

from __future__ import annotations

import http.client
import imaplib
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
import peers  # noqa: E402

from referral_proxy.fleet import make_root  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_mail")

USERS = (("alice", "secret"), ("bob", "secret"), ("carol", "secret"))


def _inbox_bodies(backend, user: str) -> list[bytes]:
    conn = backend.client(user)
    try:
        typ, data = conn.select("INBOX", readonly=True)
        assert typ == "OK"
        if int(data[0]) == 0:
            return []
        typ, data = conn.fetch("1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        return [part[1] for part in data if isinstance(part, tuple)]
    finally:
        conn.logout()


def test_loadgen_runs_the_mix_and_its_appends_arrive_whole(fleet, proxy_factory):
    proxy = proxy_factory()
    cfg = loadgen.LoadConfig(host=proxy.host, port=proxy.port, users=USERS, clients=4, processes=2,
                             seconds=2.0, intervals=1, warmup=0.3, seed=7)
    res = loadgen.run_load(cfg)
    assert res.errors == {}, res.error_samples
    assert res.sessions > 0
    assert sum(res.by_command.values()) == sum(res.interval_ops) > 0
    for command in ("LOGIN", "SELECT", "FETCH", "EXPUNGE", "APPEND", "LOGOUT"):
        assert res.by_command[command] > 0, res.by_command
    # census on the backend: every message there is one of the generator's, byte for byte
    pool = set(loadgen.make_messages(64, random.Random(cfg.seed)))
    bodies = [b for user, _ in USERS for b in _inbox_bodies(fleet["b1"], user)]
    assert bodies, "the load generator appended nothing that stayed"
    assert all(b in pool for b in bodies)


def test_loadgen_counts_refused_logins_as_errors(fleet, proxy_factory):
    proxy = proxy_factory()
    cfg = loadgen.LoadConfig(host=proxy.host, port=proxy.port, users=(("alice", "wrong"),), clients=2,
                             processes=1, seconds=1.0, intervals=1, warmup=0.2)
    res = loadgen.run_load(cfg)
    assert res.interval_ops == [0]
    assert res.errors.get("LOGIN", 0) > 0
    assert any("LOGIN" in s and "NO" in s for s in res.error_samples)


def _auth_http(backend) -> tuple[subprocess.Popen, str, int]:
    """The responder as a subprocess, and where it listens (its first line of output)."""
    p = subprocess.Popen([sys.executable, str(BENCH / "auth_http.py"), "--server", f"{backend.host}:{backend.port}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    line = p.stdout.readline().decode()
    m = re.fullmatch(r"listening on (\S+):(\d+)\n", line)
    assert m, (line, p.stderr.read() if p.poll() is not None else "")
    return p, m.group(1), int(m.group(2))


def test_auth_http_sends_nginx_to_the_backend(fleet):
    b1 = fleet["b1"]
    p, host, port = _auth_http(b1)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/auth", headers={"Auth-Method": "plain", "Auth-User": "alice",
                                              "Auth-Pass": "secret", "Auth-Protocol": "imap",
                                              "Auth-Login-Attempt": "1", "Client-IP": "127.0.0.1"})
        r = conn.getresponse()
        assert r.status == 200
        assert r.getheader("Auth-Status") == "OK"
        assert (r.getheader("Auth-Server"), int(r.getheader("Auth-Port"))) == (b1.host, b1.port)
        conn.close()
        # the answer works: the backend takes alice's LOGIN there
        imap = imaplib.IMAP4(r.getheader("Auth-Server"), int(r.getheader("Auth-Port")), timeout=10)
        assert imap.login("alice", "secret")[0] == "OK"
        imap.logout()
        # no user: not OK
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/auth")
        assert conn.getresponse().getheader("Auth-Status") != "OK"
        conn.close()
    finally:
        p.terminate()
        p.wait(10)


def test_auth_http_refuses_a_non_loopback_backend():
    r = subprocess.run([sys.executable, str(BENCH / "auth_http.py"), "--server", "192.0.2.1:143"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "loopback" in r.stderr


@pytest.mark.parametrize("name", ["dovecot-proxy", "perdition", "nginx"])
def test_peer_relays_login_and_append(fleet, name):
    missing = peers.missing_peers([name])
    if missing:
        pytest.skip(missing[name])
    b1 = fleet["b1"]
    root = make_root("rp-peer-test-")
    target = {"dovecot-proxy": peers.DovecotProxyTarget, "perdition": peers.PerditionTarget,
              "nginx": peers.NginxTarget}[name](root, b1)
    try:
        target.start()
        assert target.cpu_root is not None
        msg = f"Subject: through {name}\r\n\r\nbody {time.monotonic_ns()}\r\n".encode()
        imap = imaplib.IMAP4(target.host, target.port, timeout=15)
        assert imap.login("alice", "secret")[0] == "OK"
        assert imap.append("INBOX", None, None, msg)[0] == "OK"
        imap.logout()
        assert _inbox_bodies(b1, "alice") == [msg]
        assert peers.tree_cpu_seconds(target.cpu_root) is not None
    finally:
        target.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert target.cpu_root is None  # stopped, its whole process group with it
