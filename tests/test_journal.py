"""The journal's table, reservations, canonical names, SQLite across processes (the contract: test_store_contract)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from storehelp import now

from referral_proxy.config import MapConfig, RuleConfig
from referral_proxy.journal import (
    TABLE,
    InUse,
    Recovery,
    Reservation,
    Step,
    check_transition,
    conflicts,
    owner_gone,
    process_owner,
)
from referral_proxy.routing import MailboxMap, SQLiteStore, canonical_user

CONFIG = MapConfig(default="b1", rules=(RuleConfig("*", ("b2",), user="Bob"), RuleConfig("Shared/*", ("b3",))))


def test_the_table_is_whole_and_every_step_is_reachable():
    assert set(TABLE) == set(Step)
    assert {r.recovery for r in TABLE.values()} == set(Recovery)
    reachable, todo = set(), [None]
    while todo:
        before = todo.pop()
        for step, rule in TABLE.items():
            if before in rule.after and step not in reachable:
                reachable.add(step)
                todo.append(step)
    assert reachable == set(Step)
    # Before the commit point a move is undone, after it only ever finished.
    for step in (Step.CREATING, Step.CREATED, Step.COPYING, Step.COPIED):
        assert TABLE[step].recovery is Recovery.ROLL_BACK
    for step in (Step.COMMITTED, Step.SUBSCRIBED, Step.PLACED, Step.ASIDE, Step.DELTA_COPYING, Step.DRAINED):
        assert TABLE[step].recovery is Recovery.FINISH
        assert Step.COPYING not in TABLE[step].after and Step.CREATING not in TABLE[step].after


def test_transitions_are_checked():
    check_transition(None, Step.RESERVED)
    check_transition(Step.COPIED, Step.COMMITTED)
    for before, after in [(None, Step.PLANNED), (Step.COPYING, Step.COMMITTED), (Step.PLACED, Step.COPYING),
                          (Step.COMMITTED, Step.CREATING)]:
        with pytest.raises(ValueError):
            check_transition(before, after)


@pytest.mark.parametrize("a, b, clash", [
    (Reservation("Work"), Reservation("Work/A"), True),
    (Reservation("Work", subtree=False), Reservation("Work/A"), False),
    (Reservation("Work", subtree=False), Reservation("Work"), True),
    (Reservation("Shared/Z"), Reservation("Shared/Z/c"), True),
    (Reservation("Shared/Z"), Reservation("Shared/Zz"), False),
    (Reservation("Shared"), Reservation("Shared/Z/c", subtree=False), True),
    (Reservation(None), Reservation("x", subtree=False), True),
    (Reservation("a", False, shared=True), Reservation("a", False, shared=True), False),
    (Reservation("a", False, shared=True), Reservation("a"), True),
    (Reservation("50% off"), Reservation("50xx off"), False),
    (Reservation("*"), Reservation("Work"), False),
])
def test_conflicts(a, b, clash):
    assert conflicts(a, b, "/") is clash
    assert conflicts(b, a, "/") is clash


def test_user_names_are_canonical_in_routing():
    assert canonical_user("BoB") == "bob" and canonical_user("BoB", "as-is") == "BoB"
    assert canonical_user("ÉRIC") == "Éric"  # ASCII only, as Dovecot's %L
    m = MailboxMap(CONFIG)
    assert m.home("BOB").backends == m.home("bob").backends == ("b2",)
    now(m.place("Alice", "Archive", ["b3"]))
    assert m.lookup("alice", "Archive").backends == ("b3",)
    assert m.placements("ALICE") == {"Archive": ("b3",)}
    as_is = MailboxMap(MapConfig(default="b1", rules=CONFIG.rules, username_format="as-is"))
    assert as_is.home("bob").backends == ("b1",) and as_is.home("Bob").backends == ("b2",)


def _race(path: str, name: str, barrier, out) -> None:
    store = SQLiteStore(path)
    barrier.wait()
    try:
        now(store.begin_move("carol", "move", [Reservation("Work"), Reservation(name)], {}, f"p{os.getpid()}", "/"))
        out.put("won")
    except InUse:
        out.put("in use")
    now(store.close())


def test_two_processes_cannot_both_reserve(tmp_path):
    path = str(tmp_path / "map.sqlite3")
    now(SQLiteStore(path).close())
    ctx = multiprocessing.get_context("fork")
    for round_ in range(5):
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(path, f"Shared/{round_}-{i}", barrier, out)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        results = sorted(out.get(timeout=5) for _ in procs)
        assert results == ["in use"] * 3 + ["won"], results
        store = SQLiteStore(path)
        for e in now(store.journal()):
            now(store.end_move(e.id))
        now(store.close())


def test_another_process_sees_a_reservation_at_once(tmp_path):
    path = tmp_path / "map.sqlite3"
    m = MailboxMap(CONFIG, SQLiteStore(path))
    assert not m.reserved("carol", "Work")
    code = ("from referral_proxy.routing import SQLiteStore; from referral_proxy.journal import Reservation; "
            f"c = SQLiteStore({str(path)!r}).begin_move('carol', 'move', [Reservation('Work')], {{}}, 'x', '/')\n"
            "try:\n    c.send(None)\nexcept StopIteration:\n    pass")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
    assert m.reserved("carol", "Work/A")
    assert m.lookup("carol", "Work").backends == ("b1",)


def test_owner_gone():
    me = process_owner()
    assert not owner_gone(me)
    assert owner_gone(None)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = me.split(":")[0]
    assert owner_gone(f"{host}:{child.pid}:123")
    assert not owner_gone(f"elsewhere.example:{child.pid}:123")  # another host: never taken for gone
    assert owner_gone(f"{host}:{os.getpid()}:not-my-start-time")  # a reused pid is not its owner
    namespace = me.split(":")[3]
    assert owner_gone(f"{host}:{child.pid}:123:{namespace}")
    # another PID namespace (a container with the host's name and network): its pid means nothing here
    assert not owner_gone(f"{host}:{child.pid}:123:{int(namespace) + 1}")


def test_the_design_document_shows_the_table():
    text = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0][1:-1] in {s.value for s in Step}:
            rows[Step(cells[0][1:-1])] = ({None if a == "start" else Step(a) for a in cells[1].split(", ")}, cells[2])
    assert rows == {step: (set(rule.after), rule.recovery.value) for step, rule in TABLE.items()}


def test_backends_under_lists_every_backend_that_may_own_a_child():
    """hierarchy.members_elsewhere lists a subtree only where a child may live: the placements under
    it, the rules whose pattern may match a name under it, the default unless a catch-all hides it."""
    rules = (RuleConfig("Shared/*", ("b3", "b3r")), RuleConfig("Arch%", ("b2",)), RuleConfig("Exact/Name", ("b4",)),
             RuleConfig("inbox/*", ("b5",)), RuleConfig("*", ("b6",), user="bob"), RuleConfig("Work/*", ("b7",)))
    m = MailboxMap(MapConfig(default="b1", rules=rules))
    assert m.backends_under("carol", "Work") == ["b7", "b1"]
    assert m.backends_under("carol", "Shared") == ["b3", "b1"]  # the primary, not its replica
    assert m.backends_under("carol", "Shared/A") == ["b3", "b1"]
    assert m.backends_under("carol", "Sha") == ["b1"]  # "Sha/x" is no "Shared/..." name
    assert m.backends_under("carol", "Archive") == ["b2", "b1"]  # over-approximated: % stops at "/"
    assert m.backends_under("carol", "Exact") == ["b4", "b1"] and m.backends_under("carol", "Exac") == ["b1"]
    assert m.backends_under("carol", "INBOX") == ["b5", "b1"] == m.backends_under("carol", "Inbox")
    assert m.backends_under("bob", "Work") == ["b6"]  # his catch-all: later rules and the default unreachable
    now(m.place("carol", "Work/Far", ["b9"]))
    now(m.place("carol", "Workshop/Far", ["b8"]))
    assert m.backends_under("CAROL", "Work") == ["b9", "b7", "b1"]


def test_a_reservation_holds_until_its_move_ends_and_no_longer():
    """reserved() answers from an empty table once the last move ends (its fast way out):
    ending one of a user's two moves keeps the other's names held, in any spelling of the user."""
    m = MailboxMap(CONFIG)
    assert not m.reserved("carol", "Work")
    first = now(m.begin_move("Carol", "move", [Reservation("Work")], {}))
    second = now(m.begin_move("carol", "move", [Reservation("INBOX/Old", subtree=False)], {}))
    assert m.reserved("CAROL", "Work/A") and m.reserved("carol", "inbox/Old")
    assert not m.reserved("carol", "Other") and not m.reserved("dave", "Work")
    now(m.end_move(first))
    assert not m.reserved("carol", "Work") and m.reserved("carol", "INBOX/Old")
    now(m.end_move(second))
    assert not m.reserved("carol", "INBOX/Old")
    third = now(m.begin_move("carol", "move", [Reservation("Work")], {}))  # held again after the table emptied
    assert m.reserved("carol", "Work")
    now(m.end_move(third))
    assert not m.reserved("carol", "Work")
    assert m.lookup("carol", "Anything").backends == ("b1",) and m.lookup("bob", "x").backends == ("b2",)


def test_the_check_reads_owners_only_and_sweeps_only_when_one_is_gone(monkeypatch):
    """Every check (here 2 s of a fake clock) reads the journal's owners, nothing else, while the owner
    lives; the sweep (backends reached) runs at start-up and once an owner is found gone."""
    from types import SimpleNamespace

    from storehelp import now
    from test_store_contract import _dead_owner
    from twisted.internet import task

    from referral_proxy import recovery
    from referral_proxy.config import MapConfig
    from referral_proxy.journal import Reservation
    from referral_proxy.routing import MailboxMap, MemoryStore

    sweeps, reads = [], []

    async def recover_all(*_a, **_k) -> list[str]:
        sweeps.append(1)
        return []

    monkeypatch.setattr(recovery, "recover_all", recover_all)
    monkeypatch.setattr(recovery, "carry_old_homes", recover_all)
    store, clock = MemoryStore(), task.Clock()
    owners = store.journal_owners
    monkeypatch.setattr(store, "journal_owners", lambda: reads.append(1) or owners())
    monkeypatch.setattr(store, "journal", lambda: pytest.fail("the check reads the whole journal"))
    config = MapConfig(default="b1", recovery_check_seconds=2)
    m = MailboxMap(config, store)
    sweep = recovery.RecoverySweep(clock, lambda: SimpleNamespace(map=config), m)
    sweep.start()
    assert len(sweeps) == 2  # start-up: recover_all and carry_old_homes
    now(store.begin_move("carol", "move", [Reservation("Work")], {}, m.owner, "/"))  # this process: alive
    for _ in range(5):
        clock.advance(2)
    assert (len(reads), len(sweeps)) == (5, 2)
    now(store.begin_move("carol", "move", [Reservation("Other")], {}, _dead_owner(), "/"))
    clock.advance(2)
    assert (len(reads), len(sweeps)) == (6, 4)
    sweep.stop()


def test_a_dead_copy_across_entry_is_released_only_after_its_append_could_settle():
    """A COPY across whose proxy died may have left its APPEND held by Dovecot (a mailbox lock) that
    still commits: recovery holds the entry's names SETTLE seconds (a fake clock) before releasing it,
    so a MOVE across begun at once does not read the destination's UIDNEXT below that copy."""
    from storehelp import now
    from test_store_contract import _dead_owner
    from twisted.internet import defer, task

    from referral_proxy.recovery import recover_all
    from referral_proxy.routing import MemoryStore
    from referral_proxy.transfer import COPIES, SETTLE, copy_reservations, move_reservations

    store, clock = MemoryStore(), task.Clock()
    m = MailboxMap(MapConfig(default="b1"), store)
    now(store.begin_move("carol", COPIES, copy_reservations("Work", "Dest", "/"),
                         {"src_mailbox": "Work", "dst_mailbox": "Dest", "src": "b1", "dst": "b2"}, _dead_owner(), "/"))
    done = defer.Deferred.fromCoroutine(recover_all(m, lambda user: lambda name: pytest.fail("connected"), clock))
    clock.advance(SETTLE - 0.5)
    assert not done.called
    with pytest.raises(InUse):  # still held: a MOVE across into its destination waits
        now(m.begin_move("carol", "move-messages", move_reservations("Other", "Dest", "/"), {}))
    clock.advance(0.5)
    lines = now(done)
    assert len(lines) == 1 and "COPY Work -> Dest across servers, at reserved: released" in lines[0], lines
    now(m.end_move(now(m.begin_move("carol", "move-messages", move_reservations("Other", "Dest", "/"), {}))))


def test_a_move_cut_off_before_it_read_its_mailboxes_is_described_so():
    """Not "MOVE None -> None (None -> None)" (probe 4, stop 48: a MOVE across killed right after its
    entry was written, released by recovery)."""
    from referral_proxy.journal import JournalEntry, Step
    from referral_proxy.recovery import describe

    bare = JournalEntry(7, "alice", "move-messages", {}, Step.RESERVED)
    assert describe(bare) == "alice: MOVE across, before it sent anything, at reserved"
    named = JournalEntry(8, "alice", "move-messages", {"src_mailbox": "Work", "dst_mailbox": "Shared/P", "src": "b1",
                                                       "dst": "b3"}, Step.MOVE_APPENDING)
    assert describe(named) == "alice: MOVE Work -> Shared/P (b1 -> b3), at move-appending"
