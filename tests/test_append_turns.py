"""The shared turns of APPENDs against the exclusive turns of RENAMEs (turns.py, crossturns.py,
appendturns.py), scripted: many APPENDs at once, a RENAME after them all, an APPEND after the RENAME."""

from __future__ import annotations

import fcntl

from twisted.internet import defer, task

from referral_proxy.crossturns import FileTurns
from referral_proxy.turns import Turns


def test_shared_turns_run_together_and_an_exclusive_one_waits_for_them_all():
    turns = Turns()
    first, second = turns.try_share("k"), turns.try_share("k")
    assert first is not None and second is not None
    got: list = []
    turns.take("k").addCallback(got.append)
    assert got == []  # the RENAME waits for both APPENDs
    assert turns.try_share("k") is None  # an APPEND after it waits for it (first come, first served)
    later: list = []
    turns.share("k").addCallback(later.append)
    first()
    assert got == []
    second()
    assert len(got) == 1 and later == []
    got[0]()
    assert len(later) == 1
    assert turns.try_share("k") is not None  # (shared with the one let in)
    later[0]()


def test_waiters_let_in_together_and_a_cancelled_one_passed_over():
    turns = Turns()
    rename: list = []
    turns.take("k").addCallback(rename.append)
    appends: list = []
    gone = turns.share("k")
    gone.addErrback(lambda _f: None)
    for _ in range(2):
        turns.share("k").addCallback(appends.append)
    after: list = []
    turns.take("k").addCallback(after.append)
    gone.cancel()
    rename[0]()
    assert len(appends) == 2 and after == []
    appends[0]()
    appends[1]()
    assert len(after) == 1
    after[0]()
    assert not turns.busy("k")


def test_a_turn_given_and_ended_at_once_leaves_the_key_free():
    turns = Turns()
    release = turns.take("k").result
    turns.share("k").addCallback(lambda end: end())
    release()
    assert not turns.busy("k")


def test_file_turns_shared_between_processes_exclusive_waits(tmp_path):
    clock = task.Clock()
    a, b = FileTurns(tmp_path, clock), FileTurns(tmp_path, clock)  # (two open files: as two processes)
    one, two = a.try_share("k"), b.try_share("k")
    assert one is not None and two is not None
    got: list = []
    defer.ensureDeferred(a.take("k", fcntl.LOCK_EX)).addCallback(got.append)
    clock.advance(0.01)
    assert got == []
    one()
    two()
    clock.advance(0.01)
    assert len(got) == 1
    assert b.try_share("k") is None  # held exclusive elsewhere
    got[0]()
    again = b.try_share("k")
    assert again is not None
    again()
