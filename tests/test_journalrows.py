"""A journal step writes what changed (journalrows.py), not the entry's whole data; old entries still recover.

Measured before: every step rewrote the whole data, ~9 steps per mailbox, so a move of 1,000
mailboxes wrote 1.06 GB of JSON (bench/bench_many_boxes.py). The stores here are SQLite and
PostgreSQL; the move tests run on either (RP_TEST_STORE=postgresql)."""

from __future__ import annotations

import json
import random

import pytest
from movecheck import LEFT_TO_RECOVER, census, cli, faulty, journal_empty, journal_store, judge, seed
from storehelp import REACTOR, now

from referral_proxy.config import load_config
from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER
from referral_proxy.journal import LostEntry, Reservation, Step
from referral_proxy.journalrows import apply, diff
from referral_proxy.openstore import open_store
from referral_proxy.store import SQLiteStore

FAR = "elsewhere.example:1:1"


def _roundtrip(data: dict) -> dict:
    return json.loads(json.dumps(data))


def _mutate(rnd: random.Random, data: dict, i: int) -> None:
    """One step's changes, of the kinds the mover makes: lists grow, records change in place, are
    filtered out, keys come and go, a value becomes None or a tuple."""
    choice = rnd.randrange(8)
    if choice == 0:
        data["pairs"].append([f"F{i}", f"F{i}"])
    elif choice == 1:
        data["batches"].append({"pair": i, "src": f"1:{i}", "validity": 7, "uidnext": i, "hashes": ["ab"] * 3})
    elif choice == 2 and data["batches"]:
        rec = rnd.choice(data["batches"])
        rec["src"] = f"{i}"
        rec.pop("hashes", None)
    elif choice == 3:
        data["batches"] = [rec for rec in data["batches"] if rnd.random() < 0.8]
    elif choice == 4:
        data["validity"][str(i)] = i
        data["at"] = i
    elif choice == 5:
        data["pending"] = None if data.get("pending") else {"pair": i, "src": "1:*"}
    elif choice == 6:
        data["drained"].append(i)
        data.pop("extra", None) if i % 2 else data.update(extra=(i, "t"))
    else:
        data["created"] = data["created"][: rnd.randrange(len(data["created"]) + 1)]


def test_diff_and_apply_rebuild_the_data_json_would_keep():
    rnd = random.Random(11)
    data: dict = {"pairs": [], "created": [1, 2, 3], "validity": {}, "batches": [], "pending": None, "drained": []}
    kept = _roundtrip(data)
    for i in range(400):
        _mutate(rnd, data, i)
        ops = json.loads(json.dumps(diff(kept, data)))
        kept = apply(kept, ops)
        assert kept == _roundtrip(data)
    data.pop("extra", None)  # a tuple is never equal to the list JSON gave back: written again each time
    kept = apply(kept, json.loads(json.dumps(diff(kept, data))))
    assert diff(kept, data) == []  # nothing changed: nothing to write


@pytest.fixture(params=["sqlite", "postgresql"])
def store_factory(request, tmp_path):
    """store_factory() -> another handle on one SQLite file or PostgreSQL database (closed at the end)."""
    spec = f"sqlite:{tmp_path / 'map.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_dsn")
    handles = []

    def another():
        handles.append(open_store(spec, REACTOR))
        handles[-1].start()
        return handles[-1]

    yield another
    while handles:
        now(handles.pop().close())


def _counting(monkeypatch) -> list[int]:
    """Bytes of JSON serialised from now on (as bench_many_boxes counts them)."""
    written = [0]
    real = json.dumps

    def counting(obj, *a, **k):
        text = real(obj, *a, **k)
        written[0] += len(text)
        return text

    monkeypatch.setattr(json, "dumps", counting)
    return written


def test_a_step_writes_what_changed_not_the_whole_entry(store_factory, monkeypatch):
    """1,000 mailboxes' pairs: each later step writes about as much as the first ones (main: the whole
    data each time, 2,000 steps x ~60 KB)."""
    store = store_factory()
    data: dict = {"pairs": [[f"Folder{i:04d}", f"Folder{i:04d}"] for i in range(1000)], "created": [], "batches": []}
    entry = now(store.begin_move("carol", "move", [Reservation(None)], data, "me", "/"))
    now(store.journal_step(entry, Step.PLANNED, data, "me"))
    written = _counting(monkeypatch)
    for i in range(1000):
        data["created"].append(i)
        now(store.journal_step(entry, Step.CREATING, data, "me"))
        data["batches"].append({"pair": i, "src": "1:3", "dst": f"{i}:{i + 2}", "validity": 5, "modseq": 9})
        now(store.journal_step(entry, Step.CREATED, data, "me"))
    whole = len(json.dumps(data))
    assert written[0] < 4 * whole, (written[0], whole)  # main: ~1,000 x whole
    (read,) = now(store.journal())
    assert (read.data, read.step) == (_roundtrip(data), Step.CREATED)


def test_another_writer_of_the_entry_between_two_steps_is_written_over_whole(store_factory):
    """Two handles on one store (a process that gave an entry up and took it back, another process of
    the same owner): a delta is only applied to exactly the data it was computed from."""
    a, b = store_factory(), store_factory()
    data = {"pairs": [["A", "A"]], "batches": []}
    entry = now(a.begin_move("carol", "move", [Reservation("A")], data, "me", "/"))
    now(a.journal_step(entry, Step.PLANNED, data, "me"))
    (seen,) = now(b.journal())
    seen.data["batches"].append({"pair": 0, "src": "1"})
    now(b.journal_step(entry, Step.CREATING, seen.data, "me"))  # b knew nothing of it: written whole
    data["pairs"].append(["B", "B"])
    now(a.journal_step(entry, Step.CREATED, data, "me"))  # a's last write is not the newest: whole
    assert [e.data for e in now(b.journal())] == [data]
    assert now(b.claim(entry, FAR, "me", dead=True))
    with pytest.raises(LostEntry):
        now(a.journal_step(entry, Step.COPYING, {"pairs": []}, "me"))
    now(b.journal_step(entry, Step.COPYING, {**data, "pending": 1}, FAR))
    assert [e.data for e in now(a.journal())] == [{**data, "pending": 1}]
    now(a.end_move(entry))
    assert now(b.journal()) == []


def test_an_entry_written_by_the_previous_version_is_read_and_stepped(tmp_path):
    """An SQLite file of schema 2 (every step wrote the whole data into the journal row, no
    journal_steps) with an entry left in it: opening migrates it; the entry reads as it was and its
    next steps are written the new way."""
    import sqlite3

    path = tmp_path / "map.sqlite3"
    db = sqlite3.connect(str(path))
    for statement in [
        "CREATE TABLE placements (user TEXT NOT NULL, mailbox TEXT NOT NULL, backends TEXT NOT NULL,"
        " PRIMARY KEY (user, mailbox))",
        "CREATE TABLE journal (id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, op TEXT NOT NULL,"
        " data TEXT NOT NULL, step TEXT NOT NULL, created REAL NOT NULL, owner TEXT)",
        "CREATE TABLE reservations (entry INTEGER NOT NULL, user TEXT NOT NULL, name BLOB, subtree INTEGER NOT NULL,"
        " shared INTEGER NOT NULL)",
        "CREATE TABLE transfer_counts (kind TEXT NOT NULL, result TEXT NOT NULL, n INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL, PRIMARY KEY (kind, result))",
        "INSERT INTO journal (user, op, data, step, created, owner) VALUES ('carol', 'move',"
        " '{\"pairs\": [[\"Work\", \"Work\"]], \"created\": [0], \"batches\": []}', 'created', 0, 'gone.example:1:1')",
        "PRAGMA user_version = 2",
    ]:
        db.execute(statement)
    db.commit()
    db.close()
    store = SQLiteStore(path)
    store.start()
    assert "migrated from version 2" in store.migrated
    (entry,) = now(store.journal())
    assert (entry.step, entry.data) == (Step.CREATED, {"pairs": [["Work", "Work"]], "created": [0], "batches": []})
    assert now(store.claim(entry.id, "me", "gone.example:1:1", dead=True))
    entry.data["batches"].append({"pair": 0, "src": "1:2"})
    now(store.journal_step(entry.id, Step.COPYING, entry.data, "me"))
    entry.data["pending"] = None
    now(store.journal_step(entry.id, Step.COPIED, entry.data, "me"))
    (again,) = now(store.journal())
    assert (again.step, again.data) == (Step.COPIED, entry.data)
    now(store.close())


def test_the_previous_version_takes_a_stepped_entry_for_another_versions(tmp_path):
    """A proxy of the version before still running (PostgreSQL, after `map migrate`) reads only the
    entry's row: its step must be one it does not know (it then reports the entry, never recovers
    it from the base, which misses every step since), not a step whose data it would trust."""
    import sqlite3

    path = tmp_path / "map.sqlite3"
    store = SQLiteStore(path)
    entry = now(store.begin_move("carol", "move", [Reservation("Work")], {"pairs": []}, "me", "/"))
    now(store.journal_step(entry, Step.PLANNED, {"pairs": [["Work", "Work"]]}, "me"))
    db = sqlite3.connect(str(path))
    ((step, data),) = db.execute("SELECT step, data FROM journal").fetchall()
    db.close()
    with pytest.raises(ValueError):
        Step(step)  # the version before: store._step() is None, "written by another version: not recovered"
    assert json.loads(data) == {"pairs": []}
    assert [(e.step, e.data) for e in now(store.journal())] == [(Step.PLANNED, {"pairs": [["Work", "Work"]]})]
    now(store.close())


# -- a whole-user move killed, its entry turned into the previous version's form, recovered ------------

RULES = [{"user": "bob", "mailbox": "*", "backend": "b2"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def _as_the_previous_version_left_it(proxy) -> int:
    """Every entry's data written whole into its journal row, its journal_steps rows gone (how the
    code before journalrows.py left an entry at a crash); how many step rows there were."""
    store = journal_store(proxy)
    try:
        entries = now(store.journal())
    finally:
        now(store.close())
    spec = load_config(proxy.config_path).map.store
    assert spec is not None
    if spec.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(spec.partition(":")[2], isolation_level=None)
        mark = "?"
    else:
        import psycopg

        conn = psycopg.connect(spec, autocommit=True)  # type: ignore[assignment]
        mark = "%s"
    try:
        rows = int(conn.execute("SELECT count(*) FROM journal_steps").fetchone()[0])
        for e in entries:
            conn.execute(f"UPDATE journal SET data = {mark}, nsteps = 0 WHERE id = {mark}", (json.dumps(e.data), e.id))
        conn.execute("DELETE FROM journal_steps")
    finally:
        conn.close()
    return rows


@pytest.mark.usefixtures("clean_mail")
@pytest.mark.parametrize("step", ["copied:2", "placed:1", "drained:1"])
def test_a_move_killed_by_the_previous_version_is_recovered(proxy_factory, fleet, step):
    inbox, work = [f"inbox-{i}@t" for i in range(30)], [f"work-{i}@t" for i in range(20)]
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/Deep", [])
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    config = str(proxy.config_path)
    killed = cli("move", "--config", config, "carol", "*", "b2", command=faulty("--kill-at", step))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert _as_the_previous_version_left_it(proxy) > 0
    recovered = cli("recover", "--config", config)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert ("rolled back" if step.startswith("copied") else "finished") in recovered.stdout, recovered.stdout
    counts, where = census(fleet, "carol")
    lost, duplicated = judge(counts, inbox + work, ())
    assert not lost and not duplicated, (lost[:5], [(d, where[d]) for d in duplicated[:5]])
    assert journal_empty(proxy)
