"""Tests of the test infrastructure itself: real Dovecot instances (the
``fleet`` fixture) and the ``proxy_factory`` machinery (against a stand-in
proxy, so these tests do not depend on the real proxy)."""

from __future__ import annotations

import imaplib
import socket
import ssl
import textwrap
import tomllib

import pytest
from conftest import ProxyStartError, deep_merge, dovecot_root, parse_listen, toml_dumps

from referral_proxy.fleet import (
    DEFAULT_USERS,
    MASTER_PASSWORD,
    MASTER_USER,
    Dovecot,
    DovecotError,
    make_tls_material,
)

MESSAGE = b"From: a@example.test\r\nSubject: fleet test\r\n\r\nHello.\r\n"


def _logout(conn: imaplib.IMAP4) -> None:
    try:
        conn.logout()
    except (imaplib.IMAP4.error, OSError):
        pass


# ------------------------------------------------------------------- fleet


def test_fleet_layout(fleet):
    assert sorted(fleet.backends) == ["b1", "b2", "b3"]
    hosts = {name: d.host for name, d in fleet.backends.items()}
    assert hosts == {"b1": "127.0.0.2", "b2": "127.0.0.3", "b3": "127.0.0.4"}
    for d in fleet.backends.values():
        assert d.running
        assert d.endpoint == f"tcp:host={d.host}:port={d.port}"
        assert d.url == f"imap://{d.host}:{d.port}"
        assert d.imaps_port and d.imaps_port != d.port
    assert fleet["b2"] is fleet.backends["b2"]


@pytest.mark.parametrize("user", sorted(DEFAULT_USERS))
def test_every_user_logs_in_and_stores_mail(fleet, clean_mail, user):
    d = fleet["b1"]
    conn = d.client(user)  # dave's password has spaces, quotes and a backslash
    try:
        assert conn.create("Fleet")[0] == "OK"
        typ, data = conn.append("Fleet", r"(\Flagged)", None, MESSAGE)
        assert typ == "OK" and b"APPENDUID" in data[0]
        typ, data = conn.select("Fleet")
        assert (typ, data) == ("OK", [b"1"])
        typ, data = conn.fetch("1", "(FLAGS BODY.PEEK[])")
        assert typ == "OK"
        assert data[0][1] == MESSAGE
        assert b"\\Flagged" in data[0][0]
    finally:
        _logout(conn)
    assert (d.mail_dir / user).is_dir()


def test_raw_login_with_quoted_password(fleet):
    """dave's password sent as an IMAP quoted string, escapes done by hand."""
    d = fleet["b2"]
    pw = DEFAULT_USERS["dave"]
    quoted = '"' + pw.replace("\\", "\\\\").replace('"', '\\"') + '"'
    with socket.create_connection((d.host, d.port), timeout=10) as s:
        f = s.makefile("rwb")
        assert f.readline().startswith(b"* OK")
        f.write(f"a LOGIN dave {quoted}\r\n".encode())
        f.flush()
        line = f.readline()
        while line.startswith(b"*"):
            line = f.readline()
        assert line.startswith(b"a OK"), line
        f.write(b"b LOGOUT\r\n")
        f.flush()


def test_wrong_password_refused(fleet):
    conn = imaplib.IMAP4(fleet["b1"].host, fleet["b1"].port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login("alice", "not-the-password")
    finally:
        conn.shutdown()


def test_master_user_lands_in_users_mail(fleet, clean_mail):
    d = fleet["b3"]
    conn = d.client("alice")
    try:
        conn.create("FromAlice")
        conn.append("FromAlice", None, None, MESSAGE)
    finally:
        _logout(conn)

    conn = imaplib.IMAP4(d.host, d.port, timeout=10)
    try:
        token = f"alice\0{MASTER_USER}\0{MASTER_PASSWORD}".encode()
        typ, _ = conn.authenticate("PLAIN", lambda _: token)
        assert typ == "OK"
        typ, data = conn.select("FromAlice")
        assert (typ, data) == ("OK", [b"1"])
        assert conn.fetch("1", "(BODY.PEEK[])")[1][0][1] == MESSAGE
    finally:
        _logout(conn)

    conn = d.master_client("dave")
    try:
        assert conn.select("FromAlice")[0] == "NO"  # dave's own mail, not alice's
    finally:
        _logout(conn)

    # the master's password is checked, and the master can't log in as itself
    for token in (f"alice\0{MASTER_USER}\0wrong".encode(),
                  f"nobody\0{MASTER_USER}\0{MASTER_PASSWORD}".encode()):
        conn = imaplib.IMAP4(d.host, d.port, timeout=10)
        try:
            with pytest.raises(imaplib.IMAP4.error):
                conn.authenticate("PLAIN", lambda _, t=token: t)
        finally:
            conn.shutdown()


def test_master_user_login_separator(fleet):
    d = fleet["b1"]
    conn = imaplib.IMAP4(d.host, d.port, timeout=10)
    try:
        assert conn.login(f"bob*{MASTER_USER}", MASTER_PASSWORD)[0] == "OK"
    finally:
        _logout(conn)


def test_starttls_verified_against_ca(fleet):
    for d in fleet.backends.values():
        ctx = ssl.create_default_context(cafile=str(fleet.tls.ca_cert))
        conn = imaplib.IMAP4(d.host, d.port, timeout=10)
        try:
            assert "STARTTLS" in conn.capabilities
            conn.starttls(ctx)  # hostname checked against the SAN iPAddress
            assert conn.sock.getpeercert()["subjectAltName"]
            assert conn.login("carol", DEFAULT_USERS["carol"])[0] == "OK"
        finally:
            _logout(conn)


def test_starttls_wrong_ca_refused(fleet, tmp_path):
    other = make_tls_material(tmp_path / "other", ["127.0.0.2"])
    ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    d = fleet["b1"]
    conn = imaplib.IMAP4(d.host, d.port, timeout=10)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.starttls(ctx)
    finally:
        try:
            conn.shutdown()
        except OSError:
            pass


def test_certificate_does_not_match_other_ip(fleet):
    """The certificate names 127.0.0.2-4 only: 127.0.0.1 must not verify."""
    d = fleet["b1"]
    ctx = ssl.create_default_context(cafile=str(fleet.tls.ca_cert))
    with socket.create_connection((d.host, d.imaps_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_imaps_port(fleet):
    d = fleet["b2"]
    ctx = ssl.create_default_context(cafile=str(fleet.tls.ca_cert))
    conn = imaplib.IMAP4_SSL(d.host, d.imaps_port, ssl_context=ctx, timeout=10)
    try:
        assert conn.login("bob", DEFAULT_USERS["bob"])[0] == "OK"
        assert conn.select("INBOX")[0] == "OK"
    finally:
        _logout(conn)


def test_reset_mail_one_user(fleet, clean_mail):
    d = fleet["b1"]
    for user in ("alice", "bob"):
        conn = d.client(user)
        conn.create("Keep")
        _logout(conn)
    d.reset_mail("alice")
    for user, expected in (("alice", "NO"), ("bob", "OK")):
        conn = d.client(user)
        try:
            assert conn.select("Keep")[0] == expected
        finally:
            _logout(conn)


def test_kill_and_restart(fleet):
    """kill() frees the ports at once; start() again on the same ports keeps the mail."""
    d = Dovecot("kr", "127.0.0.9", dovecot_root() / "kr")
    try:
        d.start()
        conn = d.client("alice")
        conn.create("Survives")
        conn.select("INBOX")  # a session open during the kill
        d.kill()
        assert not d.running
        assert not d._group()
        with pytest.raises(OSError):
            socket.create_connection((d.host, d.port), timeout=2).close()
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            conn.noop()
        d.kill()  # idempotent
        port = d.port
        d.start()
        assert d.port == port and d.running
        conn = d.client("alice")
        assert conn.select("Survives")[0] == "OK"
        _logout(conn)
        d.stop()
        assert d.process.returncode == 0  # SIGTERM was enough: not killed at the stop's timeout
        assert not d.running and not d._group()
        d.stop()  # idempotent
    finally:
        d.stop()


def test_start_failure_reports_log(fleet):
    # an address that is not local cannot be bound: Dovecot exits at once
    d = Dovecot("bad", "192.0.2.1", dovecot_root() / "bad", port=1143)
    with pytest.raises(DovecotError) as info:
        d.start(timeout=10)
    assert "192.0.2.1" in str(info.value) and "log" in str(info.value)
    assert not d.running and not d._group()


def test_unreachable_root_refused(tmp_path):
    # pytest's tmp_path is 0700: Dovecot's unprivileged processes couldn't reach it
    tmp_path.chmod(0o700)
    d = Dovecot("x", "127.0.0.9", tmp_path / "x")
    with pytest.raises(DovecotError, match="world-traversable"):
        d.start()


# ------------------------------------------------------ proxy_factory helpers


def test_toml_dumps_round_trip():
    data = {
        "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"], "hostname": "h",
                  "allow_plaintext_login": True, "max": 3, "odd key": 'q"uo\\te\n'},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "tls": "none"},
                     "b.2": {"url": "imap://x"}},
        "map": {"default": "b1", "store": "sqlite:map.sqlite3",
                "rules": [{"user": "bob", "mailbox": "*", "backend": "b2"},
                          {"user": "carol", "mailbox": "Archive/*", "backend": "b3"}]},
    }
    assert tomllib.loads(toml_dumps(data)) == data


def test_deep_merge_and_parse_listen():
    base = {"a": {"b": 1, "c": [1]}, "d": "x"}
    assert deep_merge(base, {"a": {"c": [2], "e": True}, "d": None}) == \
        {"a": {"b": 1, "c": [2], "e": True}}
    assert base == {"a": {"b": 1, "c": [1]}, "d": "x"}
    assert parse_listen("tcp:1143:interface=127.0.0.1") == ("127.0.0.1", 1143)
    assert parse_listen("tcp:port=993:interface=127.0.0.5") == ("127.0.0.5", 993)
    assert parse_listen("ssl:1993:privateKey=k.pem") == ("127.0.0.1", 1993)


STUB_MAIN = textwrap.dedent('''\
    """Stand-in for `python -m referral_proxy`: greets and says BYE."""
    import signal, socket, sys, tomllib
    args = sys.argv[1:]
    config = tomllib.load(open(args[args.index("--config") + 1], "rb"))
    if config["proxy"].get("hostname") == "crash":
        sys.exit("stub: bad config " + config["proxy"]["hostname"])
    spec = config["proxy"]["listen"][0].split(":")
    port = int(spec[1])
    host = dict(p.split("=", 1) for p in spec[2:]).get("interface", "127.0.0.1")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen()
    print("stub listening", port, sorted(config["backends"]), file=sys.stderr, flush=True)
    while True:
        c, _ = srv.accept()
        c.sendall(b"* OK stub ready\\r\\n")
        c.close()
    ''')


@pytest.fixture
def stub_env(tmp_path):
    pkg = tmp_path / "stub" / "referral_proxy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(STUB_MAIN)
    return {"PYTHONPATH": str(tmp_path / "stub")}


def test_proxy_factory_with_stub(proxy_factory, fleet, stub_env):
    proxy = proxy_factory(
        {"backends": {"b1": {"tls": "starttls", "ca": str(fleet.tls.ca_cert)}, "b3": None}},
        rules=[{"user": "bob", "mailbox": "*", "backend": "b2"}],
        referrals="aware", env=stub_env)
    assert proxy.running and proxy.pid == proxy.process.pid
    config = tomllib.loads(proxy.config_path.read_text())
    assert config["proxy"]["listen"] == [f"tcp:{proxy.port}:interface=127.0.0.1"]
    assert config["proxy"]["hostname"] == "proxy.test"
    assert config["proxy"]["allow_plaintext_login"] is True
    assert config["proxy"]["referrals"] == "aware"
    assert config["backends"]["b1"] == {"endpoint": fleet["b1"].endpoint, "url": fleet["b1"].url,
                                        "tls": "starttls", "ca": str(fleet.tls.ca_cert)}
    assert config["backends"]["b2"]["tls"] == "none"
    assert "b3" not in config["backends"]
    assert config["map"] == {"default": "b1", "store": "sqlite:map.sqlite3",
                             "rules": [{"user": "bob", "mailbox": "*", "backend": "b2"}]}
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        assert s.makefile("rb").readline() == b"* OK stub ready\r\n"
    assert "stub listening" in proxy.stderr_text()
    assert proxy.stop() == 0
    assert not proxy.running


def test_proxy_factory_reports_stderr(proxy_factory, stub_env):
    with pytest.raises(ProxyStartError, match="stub: bad config crash"):
        proxy_factory(hostname="crash", env=stub_env)


def test_proxy_factory_raw_text(proxy_factory, stub_env):
    from referral_proxy.fleet import free_port
    port = free_port("127.0.0.1")
    text = f'[proxy]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n[backends]\n'
    proxy = proxy_factory(text, env=stub_env)
    assert proxy.port == port and proxy.config_path.read_text() == text


def test_a_greeting_from_another_process_is_not_ours(tmp_path):
    """Two test processes may be handed the same free port; the first to listen greets the other's
    start-up check. The proxy that was waited for had not bound yet (its stderr empty) and the test then
    talked to a stranger that closed on LOGIN (CI, stop 60). Only a listener of the process itself counts."""
    import socketserver
    import subprocess
    import sys
    import threading

    from referral_proxy.fleet import free_port
    from referral_proxy.testing.proxyproc import StartError, wait_greeting

    class Greet(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"* OK stranger\r\n")

    stranger = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greet)
    port = stranger.server_address[1]
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(StartError, match="from another process listening there"):
            wait_greeting("127.0.0.1", port, sleeper, "the sleeper", lambda: "", 1.0)
        wait_greeting("127.0.0.1", port, None, "anyone", lambda: "", 5.0)  # no process named: any greeting
    finally:
        sleeper.kill()
        sleeper.wait()
        stranger.shutdown()
        stranger.server_close()
    own = free_port("127.0.0.1")
    server = subprocess.Popen([sys.executable, "-c", (
        "import socket\n"
        f"s = socket.create_server(('127.0.0.1', {own}))\n"
        "while True:\n    c, _ = s.accept(); c.sendall(b'* OK own\\r\\n'); c.close()\n")])
    try:
        wait_greeting("127.0.0.1", own, server, "the server", lambda: "", 30.0)
    finally:
        server.kill()
        server.wait()
