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
import time

import pytest
from imapwire import Wire
from movecheck import census, judge, seed

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
