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


# -- a session: the APPEND and the RENAME's turns (appendturns.py), scripted ---------------------------

from referral_proxy import appendturns  # noqa: E402
from referral_proxy.appendturns import rename_turns  # noqa: E402
from referral_proxy.testing.fakes import SessionHarness  # noqa: E402


def _renaming(h: SessionHarness, names: list[bytes]) -> list:
    got: list = []
    defer.ensureDeferred(rename_turns(h.context, "b1", "alice", names)).addCallback(got.append)
    h.turns()
    return got


def test_an_append_arriving_during_a_rename_of_its_parent_waits_for_it():
    h = SessionHarness()
    h.login()
    rename = _renaming(h, [b"INBOX/S", b"INBOX/S/x"])
    assert len(rename) == 1  # no APPEND under way: at once
    h.send(b"a APPEND inbox/S/x {3+}\r\nabc\r\n")  # INBOX in another case: the same mailbox
    assert h.to_backend() == b""
    rename[0]()
    h.turns()
    assert h.to_backend().endswith(b" APPEND inbox/S/x {3+}\r\nabc\r\n")  # routed again, sent as the client wrote it


def test_a_rename_waits_for_the_appends_under_way_to_its_mailboxes_only():
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND A/B/x {3+}\r\nabc\r\n")
    sent = h.to_backend()
    ptag = sent.split(b" APPEND ")[0].rsplit(b"\n", 1)[-1]
    assert len(_renaming(h, [b"C", b"C/x"])) == 1  # another subtree: not in its way
    rename = _renaming(h, [b"A/B", b"A/B/x"])
    assert rename == []
    h.send(b"b APPEND A/B/x {3+}\r\ndef\r\n")  # after the RENAME, which waits
    assert h.to_backend() == b""
    h.from_backend(ptag + b" OK [APPENDUID 7 1] Append completed.\r\n")
    assert h.to_client() == b"a OK [APPENDUID 7 1] Append completed.\r\n"
    h.reactor.advance(0.01)
    assert len(rename) == 1
    rename[0]()
    h.turns()
    assert h.to_backend().endswith(b" APPEND A/B/x {3+}\r\ndef\r\n")


def test_a_rename_gives_up_on_an_append_whose_client_stopped_in_its_literal():
    """An APPEND whose client stopped in the middle of its literal held the RENAME of its parent, and
    every APPEND queued behind that RENAME, for as long as the client stayed connected: now the RENAME
    gives up after APPEND_WAIT seconds (mailboxes.py answers it NO [INUSE]) and holds nothing."""
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND A/B/x {10+}\r\nabc")  # and nothing more
    assert b" APPEND A/B/x {10+}" in h.to_backend()
    failed: list = []
    rename_turns(h.context, "b1", "alice", [b"A/B", b"A/B/x"]).addErrback(failed.append)
    h.reactor.advance(appendturns.APPEND_WAIT - 0.1)
    assert failed == []
    h.reactor.advance(0.2)
    assert len(failed) == 1 and failed[0].check(defer.TimeoutError)
    assert not h.context.move_turns.busy(("APPEND", "b1", "alice", b"A/B/x"))  # an APPEND after it is not held
    assert appendturns.may_begin(h.context, "b1", "alice", b"A/B/x")


def test_shared_holders_in_one_process_hold_one_flock_until_the_last_lets_go(tmp_path):
    clock = task.Clock()
    here, there = FileTurns(tmp_path, clock), FileTurns(tmp_path, clock)
    first, second = here.try_share("k"), here.try_share("k")
    assert first is not None and second is not None
    got: list = []
    defer.ensureDeferred(there.take("k")).addCallback(got.append)
    first()
    clock.advance(0.01)
    assert got == []  # the second still holds it
    second()
    clock.advance(0.01)
    assert len(got) == 1
    assert here.try_share("k") is None  # (its file kept open for the next try)
    got[0]()
    again = here.try_share("k")
    assert again is not None
    again()


# -- the lock files: removed by their last holder, exclusion kept while they come and go ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from referral_proxy import crossturns  # noqa: E402

_STEP = st.tuples(st.integers(0, 2), st.sampled_from("kl"), st.sampled_from(["ex", "sh", "try", "end"]))


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(_STEP, max_size=40))
def test_file_turns_keep_exclusion_while_their_files_are_removed_and_made_again(tmp_path_factory, steps):
    """Three "processes" (each its own open files) taking, sharing and ending turns of two keys in any
    order: an exclusive holder is never beside another holder, whoever removed or re-made the file."""
    where, clock = tmp_path_factory.mktemp("turns"), task.Clock()
    procs = [FileTurns(where, clock) for _ in range(3)]
    granted: list[tuple[str, str, object]] = []  # (key, kind, release)

    def check() -> None:
        for key in "kl":
            kinds = [kind for k, kind, _r in granted if k == key]
            assert "ex" not in kinds or len(kinds) == 1, kinds

    for proc, key, kind in steps:
        if kind == "end":
            mine = [g for g in granted if g[0] == key]
            if mine:
                granted.remove(mine[0])
                mine[0][2]()
        elif kind == "try":
            release = procs[proc].try_share(key)
            if release is not None:
                granted.append((key, "sh", release))
        else:
            d = defer.ensureDeferred(procs[proc].take(key, fcntl.LOCK_EX if kind == "ex" else fcntl.LOCK_SH))
            d.addCallback(lambda release, key=key, kind=kind: granted.append((key, kind, release)))
            d.addErrback(lambda _f: None)
        clock.advance(0.01)
        check()
    while granted:  # the waiters get their turns as the holders end theirs
        granted.pop(0)[2]()
        clock.advance(0.01)
        check()
    for _ in range(10):  # (a waiter let in at the very end)
        clock.advance(0.01)
        while granted:
            granted.pop(0)[2]()
    parked = sum(len(p._idle) for p in procs)
    assert len(list(where.iterdir())) <= parked  # no file left but those kept open for the next APPEND


def test_file_turns_leave_no_file_per_mailbox_ever_used(tmp_path):
    """2,000 keys appended to and renamed once each: the directory keeps at most the IDLE_FILES files
    a process holds open for the next APPEND (probe 5, stop 47: one file per mailbox ever used)."""
    clock = task.Clock()
    here, there = FileTurns(tmp_path, clock), FileTurns(tmp_path, clock)
    for n in range(2000):
        key = ("b1", "alice", f"box{n}")
        release = here.try_share(key)
        assert release is not None
        release()
        defer.ensureDeferred(there.take(key)).addCallback(lambda end: end())
        clock.advance(0.01)
    assert len(list(tmp_path.iterdir())) <= crossturns.IDLE_FILES


def test_file_turns_closed_at_stop_leave_no_file_behind(tmp_path):
    """Each process kept its last IDLE_FILES APPEND keys' files open and left them at exit: 64 more after
    every restart (probe 8, stop 48). close() lets them go; a file another process holds stays."""
    clock = task.Clock()
    here, there = FileTurns(tmp_path, clock), FileTurns(tmp_path, clock)
    for n in range(crossturns.IDLE_FILES + 6):
        release = here.try_share(("b1", "alice", f"box{n}"))
        assert release is not None
        release()
    held = there.try_share(("b1", "alice", "box0"))
    assert held is not None and len(list(tmp_path.iterdir())) >= crossturns.IDLE_FILES
    here.close()
    assert len(list(tmp_path.iterdir())) == 1  # box0's: held by the other process
    held()
    there.close()
    assert list(tmp_path.iterdir()) == []
