"""The journal's table, reservations and the map store's contract (both stores), without backends."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
from referral_proxy.routing import MailboxMap, MemoryStore, SQLiteStore, canonical_user

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


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "map.sqlite3")
    yield s
    s.close()


def test_store_contract(store):
    first = store.begin_move("carol", "move", [Reservation("Big"), Reservation("Shared/Z")], {"n": 1}, "me", "/")
    with pytest.raises(InUse):
        store.begin_move("carol", "move", [Reservation("Small"), Reservation("Shared/Z/c")], {"n": 2}, "me", "/")
    assert [e.id for e in store.journal()] == [first]  # the refused one wrote nothing
    assert sorted(r.name for u, r in store.reservations()) == ["Big", "Shared/Z"]
    other = store.begin_move("dave", "move", [Reservation("Big")], {}, "me", "/")  # another user: no clash
    store.journal_step(first, Step.PLANNED, {"n": 3})
    (entry,) = [e for e in store.journal() if e.id == first]
    assert (entry.step, entry.data, entry.owner, entry.user, entry.op) == (Step.PLANNED, {"n": 3}, "me", "carol", "move")
    assert not store.claim(first, "you", "somebody else")
    assert store.claim(first, None, "me") and store.claim(first, "you", None)
    assert [e.owner for e in store.journal() if e.id == first] == ["you"]
    store.end_move(first)
    assert [e.id for e in store.journal()] == [other]
    assert [(u, r.name) for u, r in store.reservations()] == [("dave", "Big")]
    store.begin_move("carol", "move", [Reservation("Small"), Reservation("Shared/Z/c")], {}, "me", "/")


def test_map_reservations_use_canonical_names(store):
    m = MailboxMap(CONFIG, store)
    entry = m.begin_move("Carol", "move", [Reservation("inbox", subtree=False), Reservation("Work")], {})
    assert entry.user == "carol"
    assert m.reserved("CAROL", "INBOX") and m.reserved("carol", "Work/Deep") and not m.reserved("carol", "Workshop")
    assert not m.reserved("carol", "INBOX/child") and not m.reserved("dave", "Work")
    with pytest.raises(InUse):
        m.begin_move("carol", "move", [Reservation("Inbox", subtree=False)], {})
    pin = m.begin_move("carol", "move-messages", [Reservation("Other", False, True)], {})
    assert not m.reserved("carol", "Other")  # a MOVE's pins keep RENAMEs out, not the user
    m.end_move(entry)
    m.end_move(pin)
    assert not m.reserved("carol", "Work")


def test_steps_follow_the_table_and_reach_the_hook():
    seen = []
    m = MailboxMap(CONFIG, MemoryStore(), on_step=lambda e: seen.append(e.step))
    entry = m.begin_move("carol", "move", [Reservation("Work")], {"x": 1})
    m.step(entry, Step.PLANNED)
    with pytest.raises(ValueError):
        m.step(entry, Step.PLACED)
    assert seen == [Step.RESERVED, Step.PLANNED]
    assert m.entries()[0].step is Step.PLANNED


def test_user_names_are_canonical_in_routing():
    assert canonical_user("BoB") == "bob" and canonical_user("BoB", "as-is") == "BoB"
    assert canonical_user("ÉRIC") == "Éric"  # ASCII only, as Dovecot's %L
    m = MailboxMap(CONFIG)
    assert m.home("BOB").backends == m.home("bob").backends == ("b2",)
    m.place("Alice", "Archive", ["b3"])
    assert m.lookup("alice", "Archive").backends == ("b3",)
    assert m.placements("ALICE") == {"Archive": ("b3",)}
    as_is = MailboxMap(MapConfig(default="b1", rules=CONFIG.rules, username_format="as-is"))
    assert as_is.home("bob").backends == ("b1",) and as_is.home("Bob").backends == ("b2",)


def _race(path: str, name: str, barrier, out) -> None:
    store = SQLiteStore(path)
    barrier.wait()
    try:
        store.begin_move("carol", "move", [Reservation("Work"), Reservation(name)], {}, f"p{os.getpid()}", "/")
        out.put("won")
    except InUse:
        out.put("in use")
    store.close()


def test_two_processes_cannot_both_reserve(tmp_path):
    path = str(tmp_path / "map.sqlite3")
    SQLiteStore(path).close()
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
        for e in store.journal():
            store.end_move(e.id)
        store.close()


def test_another_process_sees_a_reservation_at_once(tmp_path):
    path = tmp_path / "map.sqlite3"
    m = MailboxMap(CONFIG, SQLiteStore(path))
    assert not m.reserved("carol", "Work")
    code = ("from referral_proxy.routing import SQLiteStore; from referral_proxy.journal import Reservation; "
            f"SQLiteStore({str(path)!r}).begin_move('carol', 'move', [Reservation('Work')], {{}}, 'x', '/')")
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


def test_the_design_document_shows_the_table():
    text = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0][1:-1] in {s.value for s in Step}:
            rows[Step(cells[0][1:-1])] = ({None if a == "start" else Step(a) for a in cells[1].split(", ")}, cells[2])
    assert rows == {step: (set(rule.after), rule.recovery.value) for step, rule in TABLE.items()}
