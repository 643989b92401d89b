"""A command waiting for its turn while the selected mailbox's backend dies and comes back (probe k2 of stop 59).

The soak of seed 9460 saw one UID MOVE answered by Dovecot's own `BAD No mailbox selected`: the MOVE waited for
its mailbox's turn (crossturns.py: another session's relayed MOVE out of it); meanwhile the backend was SIGKILLed
and restarted within the 3 s the ending session gives commands under way (lastanswers.ANSWER_WAIT); the turn came,
and the pool opened a NEW connection to the restarted backend, with nothing selected on it. RFC 3501's BAD says
the client erred; it did not. Now the session never connects again to a backend it ends with (pool.forget
for_good): that MOVE is answered NO [UNAVAILABLE], then the BYE. Real Dovecot; the turn is held by its lock file
(SQLite map), standing in for the other session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import time

import pytest
from imapwire import Wire
from movecheck import census, judge, seed
from test_store_hung import _signal

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_a_move_waiting_for_its_turn_is_not_sent_to_the_restarted_backend(proxy_factory, fleet):
    if os.environ.get("RP_TEST_STORE") == "postgresql":
        pytest.skip("the turn is held through the SQLite map's lock files")
    seed(fleet["b1"], "carol", "X", ["k2-a", "k2-b"])
    seed(fleet["b1"], "carol", "T", [])
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT X")[-1].startswith(b"s OK")
    assert w.cmd(b"f", b"UID FETCH 1 (UID BODY.PEEK[]<0.100>)")[-1].startswith(b"f OK")
    turns = proxy.workdir / "map.sqlite3.turns"
    turns.mkdir(exist_ok=True)
    path = turns / hashlib.sha256(repr(("b1", "carol", "X")).encode()).hexdigest()[:32]
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another session's MOVE out of X, as far as the proxy can tell
        w.send(b"m UID MOVE 1 T\r\n")
        time.sleep(0.3)  # not a measurement: the MOVE is waiting for the turn
        fleet["b1"].kill()
        try:
            time.sleep(0.3)
        finally:
            fleet["b1"].start()  # back within the session's last 3 s
    finally:
        os.close(fd)  # the turn is free
    answer = w.until_tagged(b"m")
    assert answer[-1].startswith(b"m NO [UNAVAILABLE]"), answer  # main: m BAD No mailbox selected (...)
    assert w.line().startswith(b"* BYE"), "the session ends with its selected mailbox's backend"
    w.close()
    counts, where = census(fleet, "carol")
    assert judge(counts, ["k2-a", "k2-b"]) == ([], [])
    assert {m for i in ("k2-a", "k2-b") for m in where[i]} == {("b1", "X")}, dict(where)


def test_a_copy_across_read_before_the_selected_backend_died_is_not_answered_bad(proxy_factory, fleet):
    """Probe k4 of stop 59 (5 of 20 by timing; here lined up): a UID COPY to another backend, read before the
    selected mailbox's backend was SIGKILLed, its task begun after (behind an APPEND whose answer was slow):
    the selected connection gone, it was answered `BAD No mailbox selected`; now NO [UNAVAILABLE]."""
    seed(fleet["b1"], "carol", "X", ["k4-a"])
    seed(fleet["b2"], "carol", "Q/T", [])
    proxy = proxy_factory(rules=[{"mailbox": "Q/*", "backend": "b2"}])
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT X")[-1].startswith(b"s OK")
    assert w.cmd(b"t", b"STATUS Q/T (MESSAGES)")[-1].startswith(b"t OK")  # the session's b2 connection
    slow = fleet["b2"].sessions("carol")
    message = b"Message-ID: <k4-b>\r\nSubject: k4\r\n\r\nbody\r\n"
    _signal(slow, signal.SIGSTOP)  # the APPEND's answer waits: the COPY's task begins after it
    try:
        w.send(b"a APPEND Q/T {%d+}\r\n%s\r\nc UID COPY 1 Q/T\r\n" % (len(message), message))
        time.sleep(0.3)  # not a measurement: both read
        fleet["b1"].kill()
        try:
            time.sleep(0.3)
        finally:
            fleet["b1"].start()
    finally:
        _signal(slow, signal.SIGCONT)
    answer = w.until_tagged(b"c")
    assert b"a OK" in b"".join(answer), answer  # the APPEND to b2 is answered, before the BYE
    assert answer[-1].startswith(b"c NO [UNAVAILABLE]"), answer  # main: c BAD No mailbox selected
    assert w.line().startswith(b"* BYE")
    w.close()
    counts, where = census(fleet, "carol")
    assert judge(counts, ["k4-a", "k4-b"]) == ([], []), dict(where)
