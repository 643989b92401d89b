"""A backend STOPPED while a command the proxy carries out itself waits on it (stall.py): the
client gets an answer within ``answer_timeout`` + a margin, not ``* OK Hang in there..`` for
ever (helper attack14c); the session goes on; no mail is lost or doubled (census), whether the
stopped backend then resumes (SIGCONT) or is killed and restarted."""

from __future__ import annotations

import os
import signal
import time

import pytest
from imapwire import Wire
from movecheck import census, seed
from race_hang import _bob_served as bob_served
from race_hang import _heard as heard
from race_hang import hang_at

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

T = 2
CONFIG = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD, "answer_timeout": T}
                       for b in ("b1", "b2", "b3")}}
RULES = [{"mailbox": "Far*", "backend": "b2"}, {"user": "bob", "mailbox": "*", "backend": "b3"}]
COMMANDS = {"list": b'LIST "" "*"', "lsub": b'LSUB "" "*"', "status": b"STATUS Far (MESSAGES)",
            "copy": b"UID COPY 2:* Far"}
# "copy" is answered on main too (~30 s): each transfer logs in to b2 anew, and connect_backend
# bounds a login (3 x connect_timeout); the MOVE tests below are the transfer's cut read.
WORK = [f"work-{i}@t" for i in range(10)]


def stopped_session(proxy_factory, fleet, copied_one: bool = False):
    seed(fleet["b1"], "carol", "Work", WORK)
    seed(fleet["b2"], "carol", "Far", [])
    seed(fleet["b3"], "bob", "INBOX", ["bob-1@t"])
    proxy = proxy_factory(CONFIG, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"t1", b"STATUS Far (MESSAGES)")[-1].startswith(b"t1 OK")  # a connection to b2
    assert w.cmd(b"t2", b"SELECT Work")[-1].startswith(b"t2 OK")
    if copied_one:  # a COPY across first: the transfer's own connection to b2 is there (not a new login)
        assert w.cmd(b"t0", b"UID COPY 1 Far")[-1].startswith(b"t0 OK")
    return proxy, w


@pytest.mark.parametrize("after", ["cont", "kill"])
@pytest.mark.parametrize("what", list(COMMANDS))
def test_a_stopped_backend_gets_its_client_an_answer(proxy_factory, fleet, what, after):
    proxy, w = stopped_session(proxy_factory, fleet, what == "copy")
    b2 = fleet["b2"]
    group = os.getpgid(b2.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        w.send(b"t3 " + COMMANDS[what] + b"\r\n")
        got = heard(w, b"t3", T + 40)
        assert got and got[-1].startswith(b"t3 "), got  # an answer, not stayalive lines for ever
        assert w.cmd(b"t4", b"NOOP")[-1].startswith(b"t4 OK")
        bob_served(proxy)
    finally:
        if after == "cont":
            os.killpg(group, signal.SIGCONT)
        else:
            b2.kill()
            b2.start()
    listed = w.cmd(b"t5", b'LIST "" "*"')
    assert listed[-1].startswith(b"t5 OK") and any(b"Far" in x for x in listed), listed
    w.close()
    counts, where = census(fleet, "carol")
    copied = got[-1].startswith(b"t3 OK") and what == "copy"
    expected = {i: 2 if copied or (what == "copy" and i == WORK[0]) else 1 for i in WORK}
    assert {i: counts[i] for i in WORK} == expected, (got[-1], dict(where))


def test_two_sessions_at_once_both_get_their_answers(proxy_factory, fleet):
    proxy, w = stopped_session(proxy_factory, fleet)
    v = Wire(proxy.host, proxy.port, timeout=60)
    v.login("carol")
    assert v.cmd(b"v1", b"STATUS Far (MESSAGES)")[-1].startswith(b"v1 OK")
    group = os.getpgid(fleet["b2"].pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        w.send(b't3 LIST "" "*"\r\n')
        v.send(b"v2 UID COPY 1:* Far\r\n")
        got_w, got_v = heard(w, b"t3", T + 40), heard(v, b"v2", T + 40)
        assert got_w and got_w[-1].startswith(b"t3 ") and got_v and got_v[-1].startswith(b"v2 "), (got_w, got_v)
    finally:
        os.killpg(group, signal.SIGCONT)
    for x, tag in ((w, b"t4"), (v, b"v4")):
        assert x.cmd(tag, b'LIST "" "*"')[-1].startswith(tag + b" OK")
    counts, where = census(fleet, "carol")
    assert {counts[i] for i in WORK} == ({2} if got_v[-1].startswith(b"v2 OK") else {1}), dict(where)


def test_a_big_fetch_a_client_does_not_read_is_not_cut(proxy_factory, fleet):
    """The backends of a client that does not read are paused (back-pressure), a merged LIST
    waiting behind; 3 T later the client reads: everything arrives, nothing was cut."""
    big = [f"big-{i}@t" for i in range(8)]
    seed(fleet["b2"], "carol", "Far", big, size=1_000_000)
    proxy = proxy_factory(CONFIG, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Far")[-1].startswith(b"s OK")
    w.send(b'f FETCH 1:* BODY.PEEK[]\r\nl LIST "" "*"\r\n')
    time.sleep(3 * T)
    fetched = heard(w, b"f", 60)
    assert fetched[-1].startswith(b"f OK"), fetched[-1:]
    assert sum(1 for x in fetched if b" FETCH " in x) == len(big)
    assert heard(w, b"l", 60)[-1].startswith(b"l OK")


def test_a_slow_move_of_a_big_message_is_progress_not_a_stall(proxy_factory, fleet, tmp_path):
    """A 20 MB MOVE whose destination stops for 17 s (8 T) while the message streams into it: the source's
    FETCH (bounded) is paused by the destination's back-pressure, the APPEND is a write: nothing is
    cut; the destination resumes and the MOVE completes, the message once, where it went (hang_at)."""
    stopped, answer = hang_at(proxy_factory, fleet, tmp_path, "move", "move-appending:1", "b2", "cont", CONFIG,
                              n=1, size=20_000_000)
    assert not [x for x in stopped if x.startswith(b"c ")] and answer[-1].startswith(b"c OK"), (stopped, answer[-1:])


@pytest.mark.parametrize("after", ["cont", "kill"])
def test_a_move_whose_source_stops_while_its_bodies_are_read(proxy_factory, fleet, tmp_path, after):
    """A cross-server MOVE at its journal step move-appending: the source (b1) stops before the
    bodies' UID FETCH; that read is cut after T, the MOVE answered NO while b1 is still stopped (not
    stayalive lines until it resumes); census exact after SIGCONT or SIGKILL + restart (hang_at)."""
    stopped, _answer = hang_at(proxy_factory, fleet, tmp_path, "move", "move-appending:1", "b1", after, CONFIG)
    assert stopped[-1].startswith(b"c NO"), stopped


def test_a_move_whose_destination_stops_before_its_copies_are_verified(proxy_factory, fleet, tmp_path):
    """The MULTIAPPEND committed (move-appending:3: its UIDs recorded), then b2 stops: the verification's EXAMINE of the
    destination is a read like the hashes' FETCH after it, cut after T (hostile probe 5: stayalive lines
    until b2 resumed, 40 s), and the NO said nothing of the copies made, yet the recovery finished the MOVE.
    Since probe h1 of stop 58 the NO is recorded first and recovery takes the copies back: the source stays."""
    stopped, _answer = hang_at(proxy_factory, fleet, tmp_path, "move", "move-appending:3", "b2", "cont", CONFIG)
    assert stopped[-1].startswith(b"c NO [UNAVAILABLE] The connection to b2 ended before the copies were checked: "
                                  b"nothing was moved"), stopped
    where = census(fleet, "carol")[1]  # (hang_at's census: every message once) as the NO says: in the source
    assert {tuple(places) for places in where.values()} == {(("b1", "Work"),)}, dict(where)
