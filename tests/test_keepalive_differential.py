"""A reused backend connection (keepalive.py) against a fresh one, on real Dovecot: the
second of two sessions must read byte for byte the same (tags, UIDVALIDITY and Dovecot's
timings aside) whether its LOGIN took the connection the first one parked or logged in
anew (``backend_keepalive = 0``), and the mail must end the same (census by content).

What the rest of the suite does not try: state of the first session's selected mailbox
(a saved search ``$``, EXAMINE, ``\\Deleted`` stored in a command pipelined with LOGOUT:
nothing expunged), the user's mail moved to another backend and back, or a mailbox
renamed behind it, while the connection is parked; MODSEQ spelled as a literal (never
parked: CONDSTORE would stay on)."""

from __future__ import annotations

import re
import time

import pytest
from imapwire import Wire
from movecheck import census, cli, seed
from test_keepalive import metric, until_parked

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, free_port

pytestmark = pytest.mark.usefixtures("clean_mail")

SUBJECTS = b"FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"


def proxy_with(proxy_factory, keepalive: float):
    port = free_port()
    masters = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}
    proxy = proxy_factory({"backends": masters, "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}},
                          backend_keepalive=keepalive)
    proxy.metrics_port = port
    return proxy


def normal(lines: list[bytes]) -> list[bytes]:
    """What may differ between two runs on fresh mail: Dovecot's timings and UIDVALIDITY."""
    return [re.sub(rb"UIDVALIDITY \d+", b"UIDVALIDITY V", re.sub(rb" \([0-9.+ ]+ secs\)", b"", x)) for x in lines]


def until_no_session(proxy) -> None:
    """Until the proxy has ended every client session (what it parks, it has parked by then)."""
    deadline = time.monotonic() + 30
    while metric(proxy.metrics_port, "referral_proxy_sessions") != 0:
        assert time.monotonic() < deadline, "a session never ended"
        time.sleep(0.02)


def two_sessions(proxy, fleet, first: bytes, between, second: list[bytes]):
    """Seed, run *first* (raw, LOGOUT written right behind it), *between*, then *second* command
    by command: the second session's lines, the logins that took a parked connection, the census."""
    fleet.reset_mail()
    b1 = fleet.backends["b1"]
    seed(b1, "alice", "INBOX", ["in-1", "in-2", "in-3"])
    seed(b1, "alice", "Other", ["other-1"])
    reused = metric(proxy.metrics_port, "referral_proxy_backend_reused_total")
    w = Wire(proxy.host, proxy.port)
    w.send(b"L LOGIN alice secret\r\n" + first + b"Z LOGOUT\r\n")
    assert w.until_tagged(b"Z")[-1].startswith(b"Z OK")
    w.sock.close()
    until_no_session(proxy)  # its clean connection parked by then
    if between is not None:
        between(proxy, fleet)
    w = Wire(proxy.host, proxy.port)
    w.login()
    lines = []
    for i, command in enumerate(second):
        lines += w.cmd(b"B%d" % i, command)
    assert w.cmd(b"Z", b"LOGOUT")[-1].startswith(b"Z OK")
    w.sock.close()
    took = metric(proxy.metrics_port, "referral_proxy_backend_reused_total") - reused
    counts, where = census(fleet, "alice")
    return normal(lines), took, (counts, {mid: sorted(places) for mid, places in where.items()})


def admin_move(mailbox: str, *backends: str):
    def run(proxy, _fleet) -> None:
        for backend in backends:
            moved = cli("move", "--config", str(proxy.config_path), "alice", mailbox, backend)
            assert moved.returncode == 0, moved.stdout + moved.stderr
    return run


def renamed(_proxy, fleet) -> None:
    with fleet.backends["b1"].client("alice") as m:
        assert m.rename("Other", "Renamed")[0] == "OK"


CASES = {
    # the first session's saved search, EXAMINE, \Deleted stored right before LOGOUT: none of it after
    "selected-state": (b"E EXAMINE Other\r\nS SELECT INBOX\r\nV SEARCH RETURN (SAVE) 2\r\n"
                       b"D STORE 1:* +FLAGS (\\Deleted)\r\n", None,
                       [b"SELECT INBOX", b"FETCH $ (FLAGS)", SUBJECTS, b"EXAMINE Other", b"STORE 1 +FLAGS (\\Seen)"], 1),
    # the user's every mailbox moved to b2 and back while parked: nothing lost, nothing twice
    "moved-away-and-back": (b"S SELECT Other\r\n", admin_move("*", "b2", "b1"),
                            [b'LIST "" "*"', b"SELECT INBOX", SUBJECTS, b"SELECT Other", SUBJECTS], 1),
    # a mailbox moved away while parked: the parked connection is home's, the mailbox b2's
    "moved-away": (b"S SELECT Other\r\n", admin_move("Other", "b2"),
                   [b'LIST "" "*"', b"SELECT Other", SUBJECTS, b"STATUS Other (MESSAGES)"], 1),
    "renamed-behind-it": (b"S SELECT Other\r\n", renamed,
                          [b'LIST "" "*"', b"SELECT Other", b"SELECT Renamed", SUBJECTS], 1),
    # MODSEQ as a literal enables CONDSTORE for good: never parked
    "modseq-literal": (b"S SELECT INBOX\r\nM FETCH 1 ({6+}\r\nMODSEQ)\r\n", None, [b"SELECT INBOX", b"FETCH 1 (FLAGS)"], 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_next_session_reads_the_same_through_a_reused_connection(proxy_factory, fleet, case):
    first, between, second, takes = CASES[case]
    kept, fresh = proxy_with(proxy_factory, 60), proxy_with(proxy_factory, 0)
    through_kept, took, mail_kept = two_sessions(kept, fleet, first, between, second)
    through_fresh, _, mail_fresh = two_sessions(fresh, fleet, first, between, second)
    assert took == takes  # the parked connection was taken (or, for a tainted session, none was parked)
    assert through_kept == through_fresh
    assert mail_kept == mail_fresh
    assert all(n == 1 for n in mail_kept[0].values()) and len(mail_kept[0]) == 4, mail_kept


CUT = b"Message-Id: <cut-%d>\r\nSubject: cut\r\n\r\n" + b"x" * 200 + b"\r\n"
CUTS = {  # what the client writes after SELECT INBOX, whether it ends mid-command, parked after, appended
    "mid-literal-plus": (b"A APPEND INBOX {%d+}\r\n" % len(CUT % 1) + (CUT % 1)[:50], True, 0, []),
    "mid-multiappend": (b"A APPEND INBOX {%d+}\r\n%s {%d+}\r\n%s" % (len(CUT % 1), CUT % 1, len(CUT % 2), (CUT % 2)[:30]),
                        True, 0, []),
    "append-then-logout": (b"A APPEND INBOX {%d+}\r\n%s\r\nZ LOGOUT\r\n" % (len(CUT % 1), CUT % 1), False, 1, ["cut-1"]),
}


@pytest.mark.parametrize("cut", list(CUTS))
def test_a_session_cut_mid_append_parks_nothing_and_one_appending_before_logout_does(proxy_factory, fleet, cut):
    """A LITERAL+ APPEND or a MULTIAPPEND cut mid-message (the backend mid-literal) parks nothing;
    an APPEND pipelined with LOGOUT parks once answered; the next session is clean, the mail once."""
    data, mid_command, parks, appended = CUTS[cut]
    b1 = fleet.backends["b1"]
    seed(b1, "alice", "INBOX", ["in-1", "in-2"])
    proxy = proxy_with(proxy_factory, 60)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    w.send(data)
    if not mid_command:
        assert any(x.startswith(b"A OK") for x in w.until_tagged(b"Z"))
    w.sock.close()  # a FIN behind what was written: the proxy reads it all, then the end
    until_no_session(proxy)
    if parks:
        until_parked(proxy, parks)  # its UNSELECT answered
    assert metric(proxy.metrics_port, "referral_proxy_backend_parked") == parks
    w = Wire(proxy.host, proxy.port)
    w.login()
    lines = w.cmd(b"N", b"NOOP") + w.cmd(b"S", b"SELECT INBOX") + w.cmd(b"F", SUBJECTS)
    assert lines[0].startswith(b"N OK"), lines  # nothing of the last session's APPEND, answer or news
    assert b"* %d EXISTS\r\n" % (2 + len(appended)) in lines, lines
    assert not any(x.startswith(b"rp") or x.startswith(b"A ") for x in lines), lines
    assert w.cmd(b"Z", b"LOGOUT")[-1].startswith(b"Z OK")
    w.sock.close()
    assert metric(proxy.metrics_port, "referral_proxy_backend_reused_total") == parks
    counts, _ = census(fleet, "alice")
    assert counts == {mid: 1 for mid in ["in-1", "in-2", *appended]}, counts
