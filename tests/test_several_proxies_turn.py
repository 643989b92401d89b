"""Two proxies on one PostgreSQL map, a session on each, MOVE the same message within one backend at
the same moment. turns.py orders one process and crossturns.py one master's workers; Dovecot 2.3.19
lets both MOVEs succeed (dovecot_move_race.py), so on main the message could end in both destinations.
pgturns.py makes the proxies take turns through the database. Judged by a census: every message once."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import seed
from test_move_workers_turn import race_one_message_each_round
from test_several_proxies import RULES, _config, _logged_in

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = 30


def test_two_proxies_moving_one_message_at_once_leave_it_once(proxy_factory, fleet, pg_dsn):
    mail = [f"proxies-{i}@t" for i in range(ROUNDS)]
    seed(fleet["b1"], "carol", "Work", mail)
    for box in ("A", "B"):
        seed(fleet["b1"], "carol", box, [])
    proxies = [proxy_factory(_config(pg_dsn), rules=RULES) for _ in range(2)]
    sessions: list[Wire] = [_logged_in(p) for p in proxies]
    race_one_message_each_round(fleet, sessions, mail)


# -- scripted: the lock between processes, on a real PostgreSQL, the reactor's clock driven by the test --

import queue  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from twisted.internet import defer, task  # noqa: E402


class ThreadClock(task.Clock):
    """A Clock that also takes calls from the turns' thread; wait() runs both until a result."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kw) -> None:
        self.from_thread.put((f, args, kw))

    def addSystemEventTrigger(self, *args, **kw) -> None:
        pass

    def run(self, seconds: float, until=lambda: False) -> None:
        """Run for *seconds* of real time (the clock follows it), or until *until()*."""
        end = time.monotonic() + seconds
        last = time.monotonic()
        while time.monotonic() < end and not until():
            try:
                f, args, kw = self.from_thread.get(timeout=0.005)
                f(*args, **kw)
            except queue.Empty:
                pass
            now = time.monotonic()
            self.advance(now - last)
            last = now


def _take(turns, key) -> defer.Deferred:
    return defer.ensureDeferred(turns.take(key))


def test_a_turn_waits_for_the_other_proxy_and_is_free_once_it_releases_or_dies(pg_dsn):
    from referral_proxy.pgturns import PgTurns
    clock = ThreadClock()
    one, two = PgTurns(pg_dsn, clock), PgTurns(pg_dsn, clock)
    key = ("b1", "carol", "Work")
    first = _take(one, key)
    clock.run(10, lambda: first.called)
    release = first.result
    waiting, other = _take(two, key), _take(two, ("b1", "carol", "A"))
    clock.run(10, lambda: other.called)
    assert other.called  # another mailbox: its own lock
    clock.run(0.5)
    assert not waiting.called  # held by the other proxy
    release()
    release()  # a second call (completion and loss both) changes nothing
    clock.run(10, lambda: waiting.called)
    assert waiting.called
    gone = _take(one, key)  # held by `two` now
    clock.run(0.3)
    gone.cancel()  # its session ended while it waited
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    two.close()  # a proxy that dies: its connection, and its locks, go
    third = PgTurns(pg_dsn, clock)
    again = _take(third, key)
    clock.run(10, lambda: again.called)
    assert again.called and callable(again.result)
    one.close()
    third.close()


def test_a_database_that_does_not_answer_is_passed_over_and_a_late_grant_given_back(pg_dsn, postgres):
    from test_store_hung import _server_pids, _signal

    from referral_proxy import pgturns
    clock = ThreadClock()
    key = ("b1", "carol", "Work")
    one, two = pgturns.PgTurns(pg_dsn, clock), pgturns.PgTurns(pg_dsn, clock)
    warm = _take(one, ("b1", "carol", "warm"))  # connected before the database stops answering
    clock.run(10, lambda: warm.called)
    warm.result()
    pids = _server_pids(postgres)
    _signal(pids, signal.SIGSTOP)
    try:
        passed = _take(one, key)
        clock.run(pgturns.TRY_SECONDS + 5, lambda: passed.called)
        assert passed.called and passed.result is pgturns.no_turn  # the MOVE goes on without
        again = _take(one, key)
        assert again.called and again.result is pgturns.no_turn  # not asked again for PAUSE_SECONDS
    finally:
        _signal(pids, signal.SIGCONT)
    clock.run(2)  # the attempt that waited is answered now: its lock is given back
    taken = _take(two, key)
    clock.run(10, lambda: taken.called)
    assert taken.called and taken.result is not pgturns.no_turn
    one.close()
    two.close()
