"""Running it like Dovecot or nginx, against real Dovecot: metrics scraped over HTTP after
scripted sessions, /health, JSON logs, the client's real address (PROXY protocol, ID) in
the proxy's log and in Dovecot's, and the loop guard."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import signal
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest
from imapwire import Wire, wait_for
from mailcheck import contents
from prometheus_client.parser import text_string_to_metric_families

from referral_proxy.fleet import DEFAULT_USERS, free_port

pytestmark = pytest.mark.usefixtures("clean_mail")

MESSAGE = (b"From: ops@example.test\r\nTo: alice@example.test\r\nSubject: metrics\r\n\r\n"
           + b"counted once, carried once\r\n" * 40)


class CountingSocket:
    """A socket that counts what goes each way."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent, self.received = sock, 0, 0

    def sendall(self, data: bytes) -> None:
        self.sent += len(data)
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.received += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.sock, name)


class Counted(Wire):
    """Wire with exact byte counts, optionally behind a PROXY protocol header."""

    def __init__(self, host: str, port: int, header: bytes = b"") -> None:
        raw = socket.create_connection((host, port), timeout=60)
        if header:
            raw.sendall(header)
        self.sock = CountingSocket(raw)
        self.buf = b""
        self.greeting = self.line()

    def finish(self) -> None:
        """Read until the proxy closes the connection (every byte it wrote is counted)."""
        assert self.closed(), "the proxy did not close the connection"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    list(text_string_to_metric_families(text))  # the exposition parses
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def v2_header(src: str, sport: int, dst: str, dport: int) -> bytes:
    body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(body)) + body


def dovecot_line(backend, before: int, pattern: str) -> str:
    """The first line of *backend*'s log past offset *before* that matches *pattern*, waited for:
    Dovecot's log process writes a login's line a moment after the client has its OK (seen: 5 of 200
    direct logins had no line yet when their OK came)."""
    def find() -> str | None:
        return next((line for line in backend.log_text()[before:].splitlines() if re.search(pattern, line)), None)

    return wait_for(find, f"{pattern!r} in Dovecot {backend.name}'s log")


def json_events(proxy) -> list[dict]:
    text = proxy.stderr_text()
    whole = text[:text.rfind("\n") + 1]  # a line still being written is read at the next look (CI of stop 51)
    return [json.loads(line) for line in whole.splitlines() if line.strip()]  # every whole line parses


def test_metrics_show_exact_counts_after_scripted_sessions(proxy_factory, fleet):
    metrics_port, dead_port = free_port(), free_port("127.0.0.2")
    # backend_keepalive 0: session 3's clean backend connection is closed with it, not parked for
    # the default 10 s, which the wait for backend_connections == 0 below (30 s) raced (16 s a run).
    proxy = proxy_factory({
        "proxy": {"backend_keepalive": 0},
        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
        "backends": {"b9": {"endpoint": f"tcp:host=127.0.0.2:port={dead_port}", "url": f"imap://127.0.0.2:{dead_port}",
                            "connect_timeout": 5}},
    }, rules=[{"mailbox": "Shared/*", "backend": "b3"}, {"user": "carol", "mailbox": "*", "backend": "b9"}])
    # What came before the script (the fixture's readiness probe): subtracted below.
    base = wait_for(lambda: (s := scrape(metrics_port)) and value(s, "referral_proxy_sessions") == 0 and s,
                    "the readiness probe's session to end")
    wires = []

    # 1: alice appends, creates a mailbox on b3, copies across servers, logs out.
    w = Counted(proxy.host, proxy.port)
    wires.append(w)
    assert w.cmd(b"a", b"LOGIN alice secret")[-1].startswith(b"a OK")
    assert w.cmd(b"b", b"APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE)[-1].startswith(b"b OK")
    assert w.cmd(b"c", b"CREATE Shared/Ops")[-1].startswith(b"c OK")
    assert w.cmd(b"d", b"SELECT INBOX")[-1].startswith(b"d OK")
    assert w.cmd(b"e", b"COPY 1 Shared/Ops")[-1].startswith(b"e OK [COPYUID")
    w.cmd(b"f", b"LOGOUT")
    w.finish()
    # 2: a wrong password.
    w = Counted(proxy.host, proxy.port)
    wires.append(w)
    assert w.cmd(b"a", b"LOGIN alice wrong")[-1].startswith(b"a NO")
    w.cmd(b"b", b"LOGOUT")
    w.finish()
    # 3: referral-aware (RLIST), referred on SELECT, then the client just goes away.
    w = Counted(proxy.host, proxy.port)
    wires.append(w)
    assert w.cmd(b"a", b"LOGIN alice secret")[-1].startswith(b"a OK")
    assert w.cmd(b"b", b'RLIST "" "*"')[-1].startswith(b"b OK")
    assert w.cmd(b"c", b"SELECT Shared/Ops")[-1].startswith(b"c NO [REFERRAL imap://alice;AUTH=*@127.0.0.4:")
    w.sock.sock.close()
    # 4: carol's home backend is down.
    w = Counted(proxy.host, proxy.port)
    wires.append(w)
    assert w.cmd(b"a", b"LOGIN carol secret")[-1] == b"a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"
    w.cmd(b"b", b"LOGOUT")
    w.finish()

    samples = wait_for(lambda: (s := scrape(metrics_port)) and value(s, "referral_proxy_sessions") == 0
                       and value(s, "referral_proxy_backend_connections") == 0 and s, "every session to end")
    expected = {
        ("referral_proxy_sessions_total", (("outcome", "logout"),)): 3,
        ("referral_proxy_sessions_total", (("outcome", "client_closed"),)): 1,
        ("referral_proxy_logins_total", (("result", "ok"),)): 2,
        ("referral_proxy_logins_total", (("result", "failed"),)): 1,
        ("referral_proxy_logins_total", (("result", "unavailable"),)): 1,
        ("referral_proxy_logins_total", (("result", "referred"),)): 0,
        ("referral_proxy_commands_total", (("command", "LOGIN"), ("result", "ok"))): 2,
        ("referral_proxy_commands_total", (("command", "LOGIN"), ("result", "no"))): 2,
        ("referral_proxy_commands_total", (("command", "APPEND"), ("result", "ok"))): 1,
        ("referral_proxy_commands_total", (("command", "CREATE"), ("result", "ok"))): 1,
        ("referral_proxy_commands_total", (("command", "SELECT"), ("result", "ok"))): 1,
        ("referral_proxy_commands_total", (("command", "SELECT"), ("result", "no"))): 1,
        ("referral_proxy_commands_total", (("command", "COPY"), ("result", "ok"))): 1,
        ("referral_proxy_commands_total", (("command", "RLIST"), ("result", "ok"))): 1,
        ("referral_proxy_commands_total", (("command", "LOGOUT"), ("result", "ok"))): 3,
        ("referral_proxy_referrals_total", (("command", "SELECT"),)): 1,
        ("referral_proxy_backend_connect_failures_total", (("backend", "b9"),)): 1,
        ("referral_proxy_backend_connect_failures_total", (("backend", "b1"),)): 0,
        ("referral_proxy_transfers_total", (("kind", "copy"), ("result", "ok"))): 1,
        ("referral_proxy_transfer_bytes_total", (("kind", "copy"),)): len(MESSAGE),
        ("referral_proxy_transfer_bytes_total", (("kind", "rename"),)): 0,
        ("referral_proxy_bytes_total", (("direction", "client_in"),)): sum(w.sock.sent for w in wires),
        ("referral_proxy_bytes_total", (("direction", "client_out"),)): sum(w.sock.received for w in wires),
        ("referral_proxy_command_seconds_count", (("command", "SELECT"),)): 2,
        ("referral_proxy_command_seconds_bucket", (("command", "SELECT"), ("le", "+Inf"))): 2,
    }
    got = {key: value(samples, key[0], **dict(key[1])) - value(base, key[0], **dict(key[1])) for key in expected}
    assert got == expected
    commands = {k: v for k, v in samples.items() if k[0] == "referral_proxy_commands_total"}
    assert sum(commands.values()) == 13 and not any(k[0] == "referral_proxy_commands_total" for k in base)
    assert value(samples, "referral_proxy_bytes_total", direction="backend_in") > len(MESSAGE)
    assert value(samples, "referral_proxy_bytes_total", direction="backend_out") > 2 * len(MESSAGE)
    # The census: the copy is on b3 once, the original on b1 once.
    sha = hashlib.sha256(MESSAGE).hexdigest()
    assert [m[3] for m in contents(fleet["b3"], "alice", "Shared/Ops")] == [sha]
    assert [m[3] for m in contents(fleet["b1"], "alice", "INBOX")] == [sha]


def test_health_flips_when_a_backend_stops(proxy_factory, spare_backend):
    metrics_port = free_port()
    proxy_factory({
        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1", "health_interval": 0.2},
        "backends": {"spare": {"endpoint": spare_backend.endpoint, "url": spare_backend.url}},
    })

    def health() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    status, body = wait_for(lambda: (h := health())[0] == 200 and h, "a healthy fleet")
    assert body.splitlines()[0] == "ok" and "spare: ok (greeted)" in body
    spare_backend.kill()
    status, body = wait_for(lambda: (h := health())[0] == 503 and h, "/health to say 503")
    assert body.splitlines()[0] == "unhealthy"
    assert re.search(r"^spare: DOWN \(cannot connect: .*refused", body, re.M), body
    assert "b1: ok (greeted)" in body
    assert value(scrape(metrics_port), "referral_proxy_backend_up", backend="spare") == 0
    spare_backend.start()
    wait_for(lambda: health()[0] == 200, "/health to recover")
    assert value(scrape(metrics_port), "referral_proxy_backend_up", backend="spare") == 1


def test_health_follows_a_reload(proxy_factory, spare_backend):
    """/health and backend_up checked the start-up backends for good: a reload pointing spare at a dead port
    kept saying "spare: ok" while logins routed there failed (hostile probe 4); added and removed ones too."""
    metrics_port = free_port()
    proxy = proxy_factory({
        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1", "health_interval": 3600},
        "backends": {"spare": {"endpoint": spare_backend.endpoint, "url": spare_backend.url}},
    })

    def health() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            return e.read().decode()

    wait_for(lambda: "spare: ok (greeted)" in health(), "spare checked")
    text = proxy.config_path.read_text()
    dead = f"tcp:host=127.0.0.6:port={free_port('127.0.0.6')}"
    proxy.config_path.write_text(text.replace(spare_backend.endpoint, dead))
    proxy.send_signal(signal.SIGHUP)  # the next round would be an hour away: the reload checks at once
    body = wait_for(lambda: "spare: DOWN" in (h := health()) and h, "spare DOWN after the reload")
    assert body.splitlines()[0] == "unhealthy" and "b1: ok (greeted)" in body, body
    assert value(scrape(metrics_port), "referral_proxy_backend_up", backend="spare") == 0
    proxy.config_path.write_text(re.sub(r"\[backends\.spare\][^\[]*", "", text))
    proxy.send_signal(signal.SIGHUP)
    body = wait_for(lambda: "spare" not in (h := health()) and h, "spare gone from /health")
    assert body.splitlines()[0] == "ok", body
    assert not [k for k in scrape(metrics_port) if k[0] == "referral_proxy_backend_up" and ("backend", "spare") in k[1]]


def test_proxy_v2_client_address_in_the_json_log_and_in_dovecots_log(proxy_factory, fleet):
    haproxy_port = free_port()
    proxy = proxy_factory({
        "proxy": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1",
                             f"haproxy:tcp:{haproxy_port}:interface=127.0.0.1"]},
        "log": {"format": "json", "level": "debug"},
    }, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    before = len(fleet["b1"].log_text())
    header = v2_header("192.0.2.7", 40007, "198.51.100.1", 143)
    w = Counted(proxy.host, haproxy_port, header)
    assert w.greeting.startswith(b"* OK")
    password = DEFAULT_USERS["dave"]
    quoted_password = password.replace("\\", "\\\\").replace('"', '\\"')
    assert w.cmd(b"a", b'LOGIN dave "%s"' % quoted_password.encode())[-1].startswith(b"a OK")
    marker = b"BODY-MARKER-4f1c0b"
    body = b"Subject: private\r\n\r\n" + marker + b"\r\n"
    assert w.cmd(b"b", b"CREATE Shared/Caf&AOk-")[-1].startswith(b"b OK")
    assert w.cmd(b"c", b"APPEND INBOX {%d+}\r\n" % len(body) + body)[-1].startswith(b"c OK")
    assert w.cmd(b"d", b"SELECT INBOX")[-1].startswith(b"d OK")
    assert w.cmd(b"e", b"COPY 1 Shared/Caf&AOk-")[-1].startswith(b"e OK [COPYUID")
    w.cmd(b"f", b"LOGOUT")
    w.finish()
    # A wrong password from a plain client too: never logged either.
    plain = Counted(proxy.host, proxy.port)
    assert plain.cmd(b"a", b'LOGIN alice "hunter2-never-logged"')[-1].startswith(b"a NO")
    plain.cmd(b"b", b"LOGOUT")
    plain.finish()

    def ended(events: list[dict]) -> bool:
        ends = [e for e in events if e["event"] == "session_end"]
        return any(e["client"] == "192.0.2.7:40007" for e in ends) and any(e.get("user") is None and
                                                                            e["bytes_in"] for e in ends)

    events = wait_for(lambda: (e := json_events(proxy)) and ended(e) and e, "both sessions to end in the log")
    mine = [e for e in events if e.get("client") == "192.0.2.7:40007"]
    kinds = [e["event"] for e in mine]
    assert kinds[0] == "session_start" and kinds[-1] == "session_end" and "login" in kinds and "transfer" in kinds
    start = mine[0]
    assert start["local"] == "198.51.100.1:143" and isinstance(start["session"], int)
    login = next(e for e in mine if e["event"] == "login")
    assert (login["user"], login["backend"], login["result"]) == ("dave", "b1", "ok")
    transfer = next(e for e in mine if e["event"] == "transfer")
    assert (transfer["kind"], transfer["result"], transfer["mailbox"], transfer["src"], transfer["dst"]) == (
        "copy", "ok", "Shared/Café", "b1", "b3")
    assert transfer["bytes"] == len(body) and transfer["user"] == "dave"
    end = mine[-1]
    assert end["bytes_in"] == w.sock.sent and end["bytes_out"] == w.sock.received
    assert end["outcome"] == "logout" and end["seconds"] >= 0
    failed = next(e for e in events if e["event"] == "login" and e["result"] == "failed")
    assert failed["user"] == "alice" and failed["client"].startswith("127.0.0.1:")
    for e in events:
        assert {"time", "level", "event", "message"} <= set(e)
    text = proxy.stderr_text()
    for secret in (password, "w0rd", "hunter2-never-logged", "secret", marker.decode()):
        assert secret not in text, secret
    assert "b'" not in text and 'b"' not in text
    # Dovecot saw the client's address, and the proxy's session id, in its login line.
    login_line = dovecot_line(fleet["b1"], before, r"Login: user=<dave>")
    assert "rip=192.0.2.7" in login_line and "lip=198.51.100.1" in login_line
    assert re.search(r"session=<rp[0-9a-f]+-%d>" % start["session"], login_line), login_line
    assert dovecot_line(fleet["b3"], 0, r"user=<dave>.*rip=192\.0\.2\.7")


def test_proxy_v1_header_and_a_trusted_upstream_id(proxy_factory, fleet):
    haproxy_port = free_port()
    proxy = proxy_factory({"proxy": {
        "listen": [f"tcp:{free_port()}:interface=127.0.0.1", f"haproxy:tcp:{haproxy_port}:interface=127.0.0.1"],
        "trusted_networks": ["127.0.0.0/8"]}})
    before = len(fleet["b1"].log_text())
    w = Counted(proxy.host, haproxy_port, b"PROXY TCP4 198.51.100.9 127.0.0.1 40001 %d\r\n" % haproxy_port)
    w.login("alice")
    w.cmd(b"z", b"LOGOUT")
    # A trusted upstream proxy says who its client is, before the login, as Dovecot's proxy does.
    w = Counted(proxy.host, proxy.port)
    w.cmd(b"i", b'ID ("x-originating-ip" "203.0.113.5" "x-originating-port" "4242" "x-session-id" "upstream-1" '
                b'"x-proxy-ttl" "3")')
    w.login("bob")
    w.cmd(b"z", b"LOGOUT")
    assert dovecot_line(fleet["b1"], before, r"Login: user=<alice>.*rip=198\.51\.100\.9")
    assert dovecot_line(fleet["b1"], before, r"Login: user=<bob>.*rip=203\.0\.113\.5.*session=<upstream-1>")
    assert "client=203.0.113.5:4242" in wait_for(lambda: "user=bob" in proxy.stderr_text() and proxy.stderr_text(),
                                                 "bob's login in the proxy's log")


def test_an_untrusted_client_cannot_pose_as_another_address(proxy_factory, fleet):
    proxy = proxy_factory()
    before = len(fleet["b1"].log_text())
    w = Counted(proxy.host, proxy.port)
    w.cmd(b"i", b'ID ("x-originating-ip" "203.0.113.66")')
    w.login("alice")
    w.cmd(b"z", b"LOGOUT")
    line = dovecot_line(fleet["b1"], before, r"Login: user=<alice>")
    assert "rip=127.0.0.1" in line and "203.0.113.66" not in line


def test_a_proxy_pointed_at_itself_refuses_clearly_and_does_not_loop(proxy_factory):
    port = free_port()
    proxy = proxy_factory({
        "proxy": {"listen": [f"tcp:{port}:interface=127.0.0.1"]},
        "backends": {"b1": {"endpoint": f"tcp:host=127.0.0.1:port={port}", "url": f"imap://127.0.0.1:{port}"}},
    })
    probes = proxy.stderr_text().count("session start")  # the fixture's readiness check
    w = Counted(proxy.host, proxy.port)
    reply = w.cmd(b"a", b"LOGIN alice secret")
    assert reply == [b"a NO [UNAVAILABLE] Proxy loop detected: backend b1 (tcp:host=127.0.0.1:port=%d) is this "
                     b"proxy's own listener; login refused\r\n" % port]
    w.cmd(b"z", b"LOGOUT")
    time.sleep(0.5)  # a loop, if there were one, would have made sessions meanwhile
    starts = proxy.stderr_text().count("session start") - probes
    assert starts == 1, proxy.stderr_text()
    assert "is one of this proxy's own listeners" in proxy.stderr_text()


@pytest.mark.parametrize("trusted", [False, True], ids=["ttl", "session-id"])
def test_two_proxies_pointed_at_each_other_stop_by_ttl_or_session_id(proxy_factory, trusted):
    port_a, port_b = free_port(), free_port()
    nets = ["127.0.0.0/8"] if trusted else []

    def config(own: int, other: int) -> dict:
        return {"proxy": {"listen": [f"tcp:{own}:interface=127.0.0.1"], "trusted_networks": nets},
                "backends": {"b1": {"endpoint": f"tcp:host=localhost:port={other}", "url": f"imap://127.0.0.1:{other}"}}}

    a = proxy_factory(config(port_a, port_b))
    b = proxy_factory(config(port_b, port_a))
    probes = a.stderr_text().count("session start") + b.stderr_text().count("session start")
    w = Counted(a.host, a.port)
    reply = w.cmd(b"a", b"LOGIN alice secret")
    assert len(reply) == 1 and reply[0].startswith(b"a NO [UNAVAILABLE] Proxy loop detected: "), reply
    assert (b"x-proxy-ttl is spent" if not trusted else b"its own session back") in reply[0]
    w.cmd(b"z", b"LOGOUT")
    starts = a.stderr_text().count("session start") + b.stderr_text().count("session start") - probes
    # untrusted: 5 hops (ttl 5 .. 0) + the client's = 6 sessions; trusted: A's id comes back on the 2nd hop
    assert starts == (3 if trusted else 6), (a.stderr_text(), b.stderr_text())


def test_session_outcomes_backend_lost_and_shutdown(proxy_factory, spare_backend):
    metrics_port = free_port()
    proxy = proxy_factory({
        "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
        "backends": {"spare": {"endpoint": spare_backend.endpoint, "url": spare_backend.url}},
    }, rules=[{"user": "carol", "mailbox": "*", "backend": "spare"}])
    lost = Counted(proxy.host, proxy.port)
    lost.login("carol")
    stays = Counted(proxy.host, proxy.port)
    stays.login("alice")
    spare_backend.kill()
    assert lost.line() == b"* BYE Mail server connection lost\r\n"
    lost.finish()
    samples = wait_for(lambda: (s := scrape(metrics_port)) and value(s, "referral_proxy_sessions") == 1 and s,
                       "carol's session to end")
    assert value(samples, "referral_proxy_sessions_total", outcome="backend_lost") == 1
    proxy.stop()
    assert stays.line() == b"* BYE Server shutting down\r\n"
    ends = [line for line in proxy.stderr_text().splitlines() if "session end" in line and "user=alice" in line]
    assert len(ends) == 1 and "outcome=shutdown" in ends[0], proxy.stderr_text()
