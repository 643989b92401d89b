"""The Observer's counts and events, driven through a real session on in-memory transports."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from referral_proxy.config import parse_config
from referral_proxy.observe import EVENTS_NAMESPACE, Observer
from referral_proxy.origin import LoopGuard
from referral_proxy.testing.fakes import FakeConnector, SessionHarness, minimal_config


def observed(config=None, connector=None):
    clock = Clock()
    config = config or minimal_config()
    observer = Observer(LoopGuard(config), clock=clock.seconds, backends=tuple(config.backends))
    events: list[dict] = []
    observer.log = Logger(namespace=EVENTS_NAMESPACE, observer=events.append)
    h = SessionHarness(config, connector=connector, observer=observer)
    return h, observer, clock, events


def named(events, name):
    return [e["rp_fields"] | {"event": e["rp_event"]} for e in events if e.get("rp_event") == name]


def test_commands_bytes_and_durations_are_exact():
    h, o, clock, events = observed()
    sent = received = b""
    received += h.to_client()  # the greeting
    for data in (b"L LOGIN alice secret\r\n",):
        h.send(data)
        sent += data
    received += h.to_client()
    h.to_backend()
    # Pipelined: three commands in one write, answered one by one, one of them 2.5 s later.
    data = b"a1 SELECT INBOX\r\na2 NOOP\r\na3 FETCH 1 BODY[]\r\n"
    h.send(data)
    sent += data
    h.from_backend(b"* 1 EXISTS\r\nrp1 OK [READ-WRITE] Select completed.\r\nrp2 OK NOOP done.\r\n")
    clock.advance(2.5)
    h.from_backend(b"* 1 FETCH (BODY[] {22}\r\nhello\r\na3 OK fake!\r\n)\r\nrp3 OK Fetch completed.\r\n")
    received += h.to_client()
    h.send(b"zz FROB\r\n")
    sent += b"zz FROB\r\n"
    h.from_backend(b"rp4 BAD Unknown command\r\n")
    received += h.to_client()
    assert o.commands_total == {("LOGIN", "ok"): 1, ("SELECT", "ok"): 1, ("NOOP", "ok"): 1, ("FETCH", "ok"): 1,
                                ("OTHER", "bad"): 1}
    assert o.bytes_client_in == len(sent)
    assert o.bytes_client_out == len(received)
    assert o.logins_total == {"ok": 1, "failed": 0, "referred": 0, "unavailable": 0, "limit": 0}
    counts, total = o.command_seconds["FETCH"]
    assert sum(counts) == 1 and total[0] == 2.5
    assert sum(o.command_seconds["SELECT"][0]) == 1 and o.command_seconds["SELECT"][1][0] == 0.0
    h.session.connectionLost(Failure(ConnectionError()))
    assert o.sessions == 0 and o.sessions_total == {"client_closed": 1}
    end = named(events, "session_end")[0]
    assert end["bytes_in"] == len(sent) and end["bytes_out"] == len(received)
    assert end["user"] == "alice" and end["backend"] == "b1" and end["outcome"] == "client_closed"


def test_logout_outcome_and_login_events():
    h, o, _, events = observed(connector=FakeConnector(refuse=True))
    h.send(b"L LOGIN mallory wrong\r\n")
    assert b"L NO [AUTHENTICATIONFAILED]" in h.to_client()
    h.send(b"X LOGOUT\r\n")
    assert o.logins_total["failed"] == 1
    assert o.sessions == 1 and o.sessions_total == {}  # the transport reports the close, below
    h.session.connectionLost(Failure(ConnectionError()))
    assert o.sessions_total == {"logout": 1}
    login = named(events, "login")[0]
    assert login["user"] == "mallory" and login["result"] == "failed" and login["backend"] == "b1"
    assert login["client"] and login["session"] == h.session.id
    assert o.commands_total == {("LOGIN", "no"): 1, ("LOGOUT", "ok"): 1}


def test_referral_counted_by_command():
    config = parse_config({
        "proxy": {"listen": ["tcp:0:interface=127.0.0.1"], "referrals": "always"},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"},
                     "b2": {"endpoint": "tcp:host=127.0.0.3:port=1", "url": "imap://127.0.0.3:1"}},
        "map": {"default": "b1", "rules": [{"mailbox": "Shared/*", "backend": "b2"}]},
    }, base=Path("."))
    h, o, _, events = observed(config)
    h.login()
    h.send(b"s1 SELECT Shared/Team\r\n")
    assert h.to_client().startswith(b"s1 NO [REFERRAL imap://alice;AUTH=*@127.0.0.3:1/Shared/Team]")
    assert o.referrals_total == {"SELECT": 1}
    assert o.commands_total[("SELECT", "no")] == 1
    referral = named(events, "referral")[0]
    assert referral["urls"] == ["imap://alice;AUTH=*@127.0.0.3:1/Shared/Team"] and referral["user"] == "alice"


def test_a_client_cannot_grow_the_label_set():
    h, o, _, _ = observed()
    h.login()
    for i in range(50):
        h.send(b"t%d X-NONSENSE-%d\r\n" % (i, i))
        h.from_backend(b"rp%d BAD no\r\n" % (i + 1))
    assert {k[0] for k in o.commands_total} == {"LOGIN", "OTHER"}
    assert o.commands_total[("OTHER", "bad")] == 50
    assert set(o.command_seconds) == {"LOGIN", "OTHER"} and sum(o.command_seconds["OTHER"][0]) == 50


def test_the_histogram_counts_every_answer_and_the_counts_each_result():
    """OK, NO and BAD answers of one command, pipelined and one by one: the histogram's
    count is their sum, its sum their seconds; a command never answered is in neither."""
    h, o, clock, _ = observed()
    h.login()
    h.send(b"a1 NOOP\r\na2 NOOP\r\na3 NOOP\r\n")
    clock.advance(0.003)
    h.from_backend(b"rp1 OK done\r\nrp2 NO [ALERT] not now\r\n")
    clock.advance(0.5)
    h.from_backend(b"rp3 BAD what\r\n")
    h.send(b"a4 NOOP\r\n")
    clock.advance(100.0)
    h.from_backend(b"rp4 OK done\r\n")
    h.send(b"a5 CHECK\r\n")  # never answered
    totals = o.commands_total
    assert {k: v for k, v in totals.items() if k[0] == "NOOP"} == {("NOOP", "ok"): 2, ("NOOP", "no"): 1,
                                                                      ("NOOP", "bad"): 1}
    assert "CHECK" not in {k[0] for k in totals} and "CHECK" not in o.command_seconds
    counts, total = o.command_seconds["NOOP"]
    assert sum(counts) == 4 and abs(total[0] - (0.003 + 0.003 + 0.503 + 100.0)) < 1e-9
    assert counts[3] == 2 and counts[10] == 1 and counts[-1] == 1  # <= 5 ms twice, <= 1 s, +Inf


def test_id_from_an_untrusted_client_can_only_lower_the_ttl():
    h, o, _, _ = observed()
    h.send(b'i ID ("x-originating-ip" "203.0.113.9" "x-originating-port" "7" "x-proxy-ttl" "2")\r\n')
    origin = o.origin(h.session)
    assert origin.client_ip != "203.0.113.9" and origin.ttl == 2
    assert b'"x-proxy-ttl" "1"' in o.id_for_backend(h.session)


def test_ttl_zero_refuses_the_login_before_any_backend():
    h, o, _, events = observed()
    h.to_client()
    h.send(b'i ID ("x-proxy-ttl" "0")\r\nL LOGIN alice secret\r\n')
    out = h.to_client()
    assert b"L NO [UNAVAILABLE] Proxy loop detected: x-proxy-ttl is spent; login refused\r\n" in out
    assert h.connector.backends == []  # nothing was connected
    assert o.logins_total["unavailable"] == 1
    assert named(events, "login")[0]["result"] == "unavailable"


def test_our_own_session_id_coming_back_is_a_loop():
    h, o, _, _ = observed()
    own = o.guard.instance
    h.to_client()
    h.send(b'i ID ("x-session-id" "rp%s-77" "x-proxy-ttl" "4")\r\nL LOGIN alice secret\r\n' % own.encode())
    assert b"L NO [UNAVAILABLE] Proxy loop detected: this proxy received its own session back" in h.to_client()
    assert h.connector.backends == []


def test_home_backend_that_is_our_own_listener_is_refused():
    config = parse_config({
        "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"]},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.1:port=1143", "url": "imap://127.0.0.1:1143"}},
        "map": {"default": "b1"},
    }, base=Path("."))
    h, o, _, _ = observed(config)
    h.to_client()
    h.send(b"L LOGIN alice secret\r\n")
    out = h.to_client()
    assert out.startswith(b"L NO [UNAVAILABLE] Proxy loop detected: backend b1 (tcp:host=127.0.0.1:port=1143) is "
                          b"this proxy's own listener")
    assert h.connector.backends == []
