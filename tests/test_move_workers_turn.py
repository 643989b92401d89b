"""Two sessions on the two workers of one master ([proxy] workers = 2) MOVE the same message within
one backend at the same moment. turns.py orders the MOVEs of one process only: on main the message
ended in both destinations in 9 to 14 of 30 rounds (Dovecot 2.3.19 lets both succeed: dovecot_move_race.py).
crossturns.py makes the workers take turns too. Judged by a census of the backend, every message once."""

from __future__ import annotations

import pytest
from imapwire import Wire, at_once, wait_for
from movecheck import census, seed
from test_workers import one_on_each, workers_of

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = 30


def test_two_workers_moving_one_message_at_once_leave_it_once(proxy_factory, fleet):
    mail = [f"workers-{i}@t" for i in range(ROUNDS)]
    seed(fleet["b1"], "carol", "Work", mail)
    for box in ("A", "B"):
        seed(fleet["b1"], "carol", box, [])
    proxy = proxy_factory(workers=2)
    wait_for(lambda: len(workers_of(proxy.pid)) == 2, "2 workers")
    sessions: list[Wire] = list(one_on_each(proxy, proxy.pid, "carol").values())  # one on each worker
    race_one_message_each_round(fleet, sessions, mail)


def test_two_proxies_on_one_sqlite_file_moving_one_message_at_once_leave_it_once(proxy_factory, fleet, tmp_path):
    """The same through two separate proxies on one SQLite map file: they take the turns in the lock
    files beside it (crossturns.beside_store)."""
    mail = [f"proxies-{i}@t" for i in range(ROUNDS)]
    seed(fleet["b1"], "carol", "Work", mail)
    for box in ("A", "B"):
        seed(fleet["b1"], "carol", box, [])
    config = {"map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    sessions = [Wire(p.host, p.port, timeout=30) for p in (proxy_factory(config), proxy_factory(config))]
    for w in sessions:
        w.login("carol")
    race_one_message_each_round(fleet, sessions, mail)


def race_one_message_each_round(fleet, sessions: list[Wire], mail: list[str]) -> None:
    """Round i: both sessions (Work selected on b1) `UID MOVE i` at once, to A and to B; then a census:
    every message once."""
    for w in sessions:
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    for i in range(len(mail)):
        scripts = [b"a UID MOVE %d A\r\nf NOOP\r\n" % (i + 1), b"b UID MOVE %d B\r\nf NOOP\r\n" % (i + 1)]
        at_once(sessions, scripts, [b"f", b"f"])
        for w in sessions:  # both hear of the expunge before the next round
            assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    for w in sessions:
        w.close()
    counts, where = census(fleet, "carol")
    bad = {i: where[i] for i in mail if counts[i] != 1}
    assert not bad, f"{len(bad)} of {len(mail)} rounds: {bad}"


# -- scripted: the lock between processes (two open files of one process conflict as two processes do) --

from twisted.internet import defer, task  # noqa: E402


def test_a_file_turn_waits_for_the_other_holder_and_a_cancelled_wait_holds_nothing(tmp_path):
    from referral_proxy.crossturns import FileTurns
    clock = task.Clock()
    one, two = FileTurns(tmp_path, clock), FileTurns(tmp_path, clock)
    first = defer.ensureDeferred(one.take(("b1", "carol", "Work")))
    release = first.result  # free: taken at once
    waiting = defer.ensureDeferred(two.take(("b1", "carol", "Work")))
    other = defer.ensureDeferred(two.take(("b1", "carol", "A")))
    assert other.called  # another mailbox: its own lock
    clock.advance(1)
    assert not waiting.called
    release()
    release()  # a second call (completion and loss both) changes nothing
    clock.advance(1)
    assert waiting.called
    waiting.result()
    gone = defer.ensureDeferred(one.take(("b1", "carol", "A")))  # held by `other`
    gone.cancel()  # its session ended while it waited
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    other.result()
    again = defer.ensureDeferred(two.take(("b1", "carol", "A")))
    assert again.called  # the cancelled wait left no lock behind
