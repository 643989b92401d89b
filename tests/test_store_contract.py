"""The map store's contract (store.MapStore), one suite run on every store: memory, SQLite, PostgreSQL.

Each store is reached as a proxy would: MailboxMap over it, coroutines for writes;
several instances of one SQLite file or one PostgreSQL database stand for several
proxy processes.
"""

from __future__ import annotations

import time

import pytest
from storehelp import REACTOR, now

from referral_proxy.config import MapConfig, RuleConfig
from referral_proxy.journal import InUse, LostEntry, Reservation, Step, StoreUnavailable
from referral_proxy.routing import MailboxMap
from referral_proxy.store import SCHEMA_VERSION, MemoryStore, SchemaError, SQLiteStore

CONFIG = MapConfig(default="b1", rules=(RuleConfig("*", ("b2",), user="Bob"), RuleConfig("Shared/*", ("b3",))))
FAR = "elsewhere.example:1:1"  # an owner on another host: never taken for dead by a pid check


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def kind(request):
    return request.param


@pytest.fixture
def make_store(kind, tmp_path, request):
    """make_store(lease_seconds=60) -> another handle on the SAME store (memory: the same object)."""
    made = []
    memory = MemoryStore()
    dsn = request.getfixturevalue("pg_dsn") if kind == "postgresql" else None

    def make(lease_seconds: float = 60.0):
        if kind == "memory":
            return memory
        if kind == "sqlite":
            s = SQLiteStore(tmp_path / "map.sqlite3")
        else:
            from referral_proxy.pgstore import PostgresStore

            s = PostgresStore(dsn, REACTOR, lease_seconds=lease_seconds)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        now(s.close())


def _snapshot_seen(store, check, tries=2000):
    """Poll *store* (as lookups do) until *check(snapshot)*: a listener's delivery is not instant."""
    for _ in range(tries):
        snap = store.poll()
        if snap is not None and check(snap):
            return True
        time.sleep(0.005)
    return False


def test_begin_move_reserves_in_one_transaction(make_store):
    store = make_store()
    first = now(store.begin_move("carol", "move", [Reservation("Big"), Reservation("Shared/Z")], {"n": 1}, "me", "/"))
    with pytest.raises(InUse):
        now(store.begin_move("carol", "move", [Reservation("Small"), Reservation("Shared/Z/c")], {"n": 2}, "me", "/"))
    assert [e.id for e in now(store.journal())] == [first]  # the refused one wrote nothing
    assert sorted(r.name for _i, u, r in now(store.load()).reservations) == ["Big", "Shared/Z"]
    other = now(store.begin_move("dave", "move", [Reservation("Big")], {}, "me", "/"))  # another user: no clash
    now(store.journal_step(first, Step.PLANNED, {"n": 3}, "me"))
    (entry,) = [e for e in now(store.journal()) if e.id == first]
    assert (entry.step, entry.data, entry.owner, entry.user, entry.op) == (Step.PLANNED, {"n": 3}, "me", "carol", "move")
    with pytest.raises(LostEntry):
        now(store.journal_step(first, Step.PLANNED, {"n": 4}, "somebody else"))  # fenced: only the owner writes
    assert not now(store.claim(first, "you", "somebody else"))
    assert not now(store.disown(first, "you"))
    assert now(store.disown(first, "me")) and now(store.claim(first, "you", None))
    assert [e.owner for e in now(store.journal()) if e.id == first] == ["you"]
    now(store.end_move(first))
    assert [e.id for e in now(store.journal())] == [other]
    assert [(u, r.name) for _i, u, r in now(store.load()).reservations] == [("dave", "Big")]
    now(store.begin_move("carol", "move", [Reservation("Small"), Reservation("Shared/Z/c")], {}, "me", "/"))


def test_names_and_data_are_kept_byte_for_byte(make_store):
    store = make_store()
    odd = 'Quo"te\\ 50% * \r\n caf\xe9 \udcff'  # quotes, wildcards, CR LF, 8-bit and undecodable bytes
    now(store.set("carol", odd, ("b2", "b3")))
    entry = now(store.begin_move("carol", "move", [Reservation(odd)], {"old": odd, "nul": "a\x00b"}, "me", "/"))
    assert now(store.load()).placements[("carol", odd)] == ("b2", "b3")
    assert [r.name for _i, _u, r in now(store.load()).reservations] == [odd]
    assert [e.data for e in now(store.journal())] == [{"old": odd, "nul": "a\x00b"}]
    now(store.end_move(entry))
    now(store.unset("carol", odd))
    assert now(store.load()).placements == {}


def test_map_reservations_use_canonical_names(make_store):
    m = MailboxMap(CONFIG, make_store())
    entry = now(m.begin_move("Carol", "move", [Reservation("inbox", subtree=False), Reservation("Work")], {}))
    assert entry.user == "carol"
    assert m.reserved("CAROL", "INBOX") and m.reserved("carol", "Work/Deep") and not m.reserved("carol", "Workshop")
    assert not m.reserved("carol", "INBOX/child") and not m.reserved("dave", "Work")
    with pytest.raises(InUse):
        now(m.begin_move("carol", "move", [Reservation("Inbox", subtree=False)], {}))
    pin = now(m.begin_move("carol", "move-messages", [Reservation("Other", False, True)], {}))
    assert not m.reserved("carol", "Other")  # a MOVE's pins keep RENAMEs out, not the user
    now(m.end_move(entry))
    now(m.end_move(pin))
    assert not m.reserved("carol", "Work")


def test_steps_follow_the_table_and_reach_the_hook(make_store):
    seen = []
    m = MailboxMap(CONFIG, make_store(), on_step=lambda e: seen.append(e.step))
    entry = now(m.begin_move("carol", "move", [Reservation("Work")], {"x": 1}))
    now(m.step(entry, Step.PLANNED))
    with pytest.raises(ValueError):
        now(m.step(entry, Step.PLACED))
    assert seen == [Step.RESERVED, Step.PLANNED]
    assert now(m.entries())[0].step is Step.PLANNED


def test_placements_are_canonical_and_survive_a_restart(make_store, kind):
    m = MailboxMap(CONFIG, make_store())
    now(m.place("Alice", "inbox/Archive", ["b3"]))
    assert m.lookup("alice", "INBOX/Archive").backends == ("b3",)
    assert m.placements("ALICE") == {"INBOX/Archive": ("b3",)}
    if kind != "memory":
        again = MailboxMap(CONFIG, make_store())
        again.start()
        assert again.lookup("ALICE", "Inbox/Archive").backends == ("b3",)


def test_another_process_learns_of_every_change(make_store, kind):
    if kind == "memory":
        pytest.skip("one process only")
    a, b = make_store(), make_store()
    mb = MailboxMap(CONFIG, b)
    now(a.set("carol", "Work", ("b3",)))
    entry = now(a.begin_move("carol", "move", [Reservation("Shared/X")], {}, "me", "/"))
    for _ in range(2000):  # SQLite: the next lookup sees it; PostgreSQL: once the listener has re-read
        if mb.lookup("carol", "Work").backends == ("b3",) and mb.reserved("carol", "Shared/X/y"):
            break
        time.sleep(0.005)
    assert mb.lookup("carol", "Work").backends == ("b3",) and mb.reserved("carol", "Shared/X/y")
    now(a.end_move(entry))
    assert _snapshot_seen(b, lambda s: not s.reservations) or not mb.reserved("carol", "Shared/X")


def test_two_recoverers_at_once_one_wins(make_store):
    """Many processes claim one abandoned entry at the same moment: exactly one gets it."""
    stores = [make_store() for _ in range(6)]
    entry = now(stores[0].begin_move("carol", "move", [Reservation("Work")], {}, FAR, "/"))
    now(stores[0].disown(entry, FAR))
    from twisted.internet import defer

    claims = defer.gatherResults([defer.ensureDeferred(s.claim(entry, f"r{i}", None)) for i, s in enumerate(stores)])
    won = REACTOR.wait(claims)
    assert sorted(won) == [False] * 5 + [True]
    (owner,) = [e.owner for e in now(stores[0].journal())]
    assert owner == f"r{won.index(True)}"


def test_a_live_owner_is_never_taken_over_but_a_lapsed_lease_is(make_store, kind):
    if kind != "postgresql":
        pytest.skip("leases: PostgreSQL (SQLite on one host checks the owner's pid)")
    # 3 s: the checks of a live lease below must fit in it (1 s did not leave a loaded machine x3)
    store = make_store(lease_seconds=3.0)
    m = MailboxMap(CONFIG, store)
    entry = now(store.begin_move("carol", "move", [Reservation("Work")], {}, FAR, "/"))
    (seen,) = now(m.entries())
    assert not m.abandoned(seen) and not now(m.claim(seen))  # its owner renews: hands off
    assert now(m.owners_gone()) == []  # (recovery's quick check: the same)
    for _ in range(100):
        if now(store.renew(FAR, [entry])) == [entry]:  # the owner renewing
            break
    deadline = time.monotonic() + 30  # the owner stops renewing (a dead host): its lease runs out
    while time.monotonic() < deadline:
        (seen,) = now(m.entries())
        if m.abandoned(seen):
            break
        time.sleep(0.01)
    assert m.abandoned(seen) and now(m.owners_gone()) == [entry] and now(m.claim(seen))
    with pytest.raises(LostEntry):  # the old owner, back, cannot write its next step
        now(store.journal_step(entry, Step.PLANNED, {}, FAR))


def test_a_process_never_takes_over_its_own_entry_still_at_work_when_its_lease_lapsed(make_store, kind):
    """CI of 69b8dd2 (test_store_hung, PostgreSQL stopped past the lease in a RENAME's finish): once the store
    answered again, the proxy's own recovery sweep found its own entry's lease run out and took it over while its
    mover still worked on it: recovery took the 30 copies back as the mover set the source aside (all out of
    sight). Its own recovery leaves it to the mover; another process may take it (test above)."""
    if kind != "postgresql":
        pytest.skip("leases: PostgreSQL")
    store = make_store(lease_seconds=1.0)
    m = MailboxMap(CONFIG, store)
    entry = now(m.begin_move("carol", "move", [Reservation("Work")], {}))  # this process's own, at work
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # nothing renews it (the store away, as far as the lease knows)
        (seen,) = now(m.entries())
        if seen.lease_expired:
            break
        time.sleep(0.05)
    assert seen.lease_expired and seen.owner == m.owner
    assert not m.abandoned(seen) and now(m.owners_gone()) == []
    other = MailboxMap(CONFIG, store)  # another process may: its owner may be stalled for good
    assert other.abandoned(seen) and now(other.owners_gone()) == [entry.id]


def test_an_unreachable_store_raises_store_unavailable(tmp_path, kind):
    if kind != "postgresql":
        pytest.skip("only a network store can be away")
    from referral_proxy.pgstore import PostgresStore

    store = PostgresStore(f"postgresql:///nothing?host={tmp_path}&user=postgres", REACTOR)
    with pytest.raises(StoreUnavailable):
        store.start()
    store.start_in_reactor()
    with pytest.raises(StoreUnavailable):
        now(store.set("carol", "Work", ("b2",)))
    now(store.close())


def test_a_database_without_schema_is_refused_in_one_line(postgres, kind):
    if kind != "postgresql":
        pytest.skip("PostgreSQL only")
    from referral_proxy.pgstore import PostgresStore, SchemaError, migrate

    dsn = postgres.create_db("empty")
    store = PostgresStore(dsn, REACTOR)
    with pytest.raises(SchemaError, match="migrate"):
        store.start()
    assert "created" in migrate(dsn) and "up to date" in migrate(dsn)
    store.start()
    now(store.close())


# -- the transfer counters (admin moves run in their own process; every proxy's /metrics reads them) ------


def test_transfer_counters_add_up_across_processes(make_store, kind):
    a, b = make_store(), make_store()  # two processes on one store (memory: the same object)
    assert now(a.transfer_counts()) == {}
    now(a.count_transfer("admin_move", "ok", 100))
    now(b.count_transfer("admin_move", "ok", 23))
    now(b.count_transfer("admin_move", "failed", 0))
    expected = {("admin_move", "ok"): (2, 123), ("admin_move", "failed"): (1, 0)}
    assert now(a.transfer_counts()) == expected and now(b.transfer_counts()) == expected
    if kind == "memory":
        return
    from twisted.internet import defer

    # many processes counting at the same moment: none is lost (one statement each, no read-modify-write)
    stores = [make_store() for _ in range(4)]
    REACTOR.wait(defer.gatherResults([defer.ensureDeferred(s.count_transfer("admin_move", "ok", 1 << 33))
                                      for s in stores for _ in range(5)]))
    assert now(a.transfer_counts())[("admin_move", "ok")] == (22, 123 + 20 * (1 << 33))  # past 32 bits
    again = make_store()  # persistent: a process started later reads the same totals
    assert now(again.transfer_counts()) == now(a.transfer_counts())


# The schema of the SQLite map file as the previous version (schema 1, user_version 0) wrote it.
SQLITE_V1 = [
    "CREATE TABLE placements ( user TEXT NOT NULL, mailbox TEXT NOT NULL, backends TEXT NOT NULL,"
    " PRIMARY KEY (user, mailbox))",
    "CREATE TABLE journal ( id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, op TEXT NOT NULL,"
    " data TEXT NOT NULL, step TEXT NOT NULL, created REAL NOT NULL, owner TEXT)",
    "CREATE TABLE reservations ( entry INTEGER NOT NULL, user TEXT NOT NULL, name BLOB, subtree INTEGER NOT NULL,"
    " shared INTEGER NOT NULL)",
    "INSERT INTO placements VALUES ('carol', 'Work', 'b3')",
    "INSERT INTO journal (user, op, data, step, created, owner) VALUES ('carol', 'move', '{\"old\": \"Work\"}',"
    " 'planned', 0, 'elsewhere.example:1:1')",
    "INSERT INTO reservations VALUES (1, 'carol', X'576F726B', 1, 0)",
]


def _v1_file(path, *, owner_column=True):
    import sqlite3

    db = sqlite3.connect(str(path))
    for statement in SQLITE_V1:
        if not owner_column:
            statement = statement.replace(", owner TEXT)", ")").replace(", owner)", ")").replace(
                ", 'elsewhere.example:1:1')", ")")
        db.execute(statement)
    db.commit()
    db.close()


def _user_version(path) -> int:
    import sqlite3

    db = sqlite3.connect(str(path))
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("owner_column", [True, False], ids=["version-1", "before-owners"])
def test_an_sqlite_map_file_of_the_previous_schema_opens_and_counts(tmp_path, owner_column):
    """SQLite is the embedded default nobody migrates by hand: opening the file migrates it, keeping everything."""
    path = tmp_path / "map.sqlite3"
    _v1_file(path, owner_column=owner_column)
    assert _user_version(path) == 0
    store = SQLiteStore(path)
    store.start()
    assert "migrated from version 1" in store.migrated and _user_version(path) == SCHEMA_VERSION
    m = MailboxMap(CONFIG, store)
    m.start()
    assert m.lookup("carol", "Work").backends == ("b3",) and m.reserved("carol", "Work/Deep")
    (entry,) = now(store.journal())
    assert (entry.user, entry.step, entry.data) == ("carol", Step.PLANNED, {"old": "Work"})
    now(store.count_transfer("admin_move", "ok", 42))
    assert now(store.transfer_counts()) == {("admin_move", "ok"): (1, 42)}
    assert SQLiteStore(path).migrated == "schema is up to date (version 3)"  # the next process: nothing to do
    now(store.close())


def test_an_sqlite_map_file_of_a_newer_schema_is_refused_untouched(tmp_path):
    import sqlite3

    path = tmp_path / "map.sqlite3"
    SQLiteStore(path)
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version = 99")
    db.execute("DROP TABLE transfer_counts")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    with pytest.raises(SchemaError, match="newer .*upgrade referral-proxy"):
        store.start()
    db = sqlite3.connect(str(path))
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'transfer_counts'").fetchone()[0] == 0
    db.close()
    assert _user_version(path) == 99


def test_a_postgresql_database_of_the_previous_schema_is_refused_until_migrated(postgres, kind):
    if kind != "postgresql":
        pytest.skip("PostgreSQL only")
    import psycopg

    from referral_proxy.pgstore import PostgresStore, migrate

    dsn = postgres.create_db("previous")
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:  # as the previous version left it: schema 1
        conn.execute("DROP TABLE transfer_counts")
        conn.execute("UPDATE map_state SET schema_version = 1")
        conn.execute("INSERT INTO placements VALUES ('carol', 'Work', 'b3')")
    store = PostgresStore(dsn, REACTOR)
    with pytest.raises(SchemaError, match="version 1, older .*map --config FILE migrate"):
        store.start()
    assert migrate(dsn) == "schema migrated from version 1 (version 3)"
    store.start()
    assert MailboxMap(CONFIG, store).lookup("carol", "Work").backends == ("b3",)
    now(store.count_transfer("admin_move", "failed", 0))
    assert now(store.transfer_counts()) == {("admin_move", "failed"): (1, 0)}
    now(store.close())


def test_map_migrate_on_an_sqlite_file_says_what_it_did(tmp_path, capsys):
    from referral_proxy.cli import main

    path = tmp_path / "map.sqlite3"
    _v1_file(path)
    config = tmp_path / "proxy.toml"
    config.write_text('[proxy]\nlisten = ["tcp:1143:interface=127.0.0.1"]\n[backends.b1]\nendpoint = "tcp:127.0.0.2:143"\n'
                      f'url = "imap://127.0.0.2"\n[map]\ndefault = "b1"\nstore = "sqlite:{path}"\n')
    assert main(["map", "--config", str(config), "migrate"]) == 0
    assert capsys.readouterr().out == "schema migrated from version 1 (version 3)\n"
    assert main(["map", "--config", str(config), "migrate"]) == 0
    assert capsys.readouterr().out == "schema is up to date (version 3)\n"
    import sqlite3

    db = sqlite3.connect(str(path))
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()
    assert main(["map", "--config", str(config), "migrate"]) == 1
    assert "version 4, newer" in capsys.readouterr().err


def test_a_proxy_starting_as_another_begins_a_move_is_waited_for(pg_dsn):
    """B reads its map at start-up, its listener still connecting; A begins a move then: A's settle()
    must not return before B has the reservation (main: B had no row in `listeners` yet, A went
    ahead, B answered from a map without it until its listener's first read)."""
    import threading

    import psycopg

    from referral_proxy.pgstore import PostgresStore

    a = PostgresStore(pg_dsn, REACTOR)
    a.start()
    b = PostgresStore(pg_dsn, REACTOR)
    gate = threading.Event()
    listen = b._listen
    b._listen = lambda: (gate.wait(60), listen())  # B's listener comes late
    b.start()
    try:
        assert b.poll() is not None  # B's map as it read it at start-up: nothing held
        now(a.begin_move("carol", "move", [Reservation("Work", True)], {}, "x:1:1", "/"))
        with psycopg.connect(pg_dsn) as conn:  # what A's settle() waits for: B is among them
            waited = [r[0] for r in conn.execute("SELECT id FROM listeners WHERE seen < (SELECT change FROM map_state)")]
        assert b._id in waited, waited
        gate.set()
        now(a.settle())
        snapshot = b.poll()
        assert snapshot is not None and [r.name for _e, u, r in snapshot.reservations if u == "carol"] == ["Work"], snapshot
    finally:
        gate.set()
        now(a.close())
        now(b.close())


def _dead_owner() -> str:
    """The owner string of a process of this host that has ended (as journal.process_owner writes it)."""
    import socket
    import subprocess
    import sys

    from referral_proxy.journal import _start_time

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    owner = f"{socket.gethostname()}:{child.pid}:{_start_time(child.pid)}"
    child.communicate(b"")
    return owner


def test_the_quick_check_lists_only_entries_whose_owner_is_gone(make_store):
    """owners_gone (recovery's check every few seconds): a dead owner on this host, yes; a live one
    (this process, another host's within its lease) or nobody (given up: the sweep's), no. And
    several recoverers claiming the dead one at once: exactly one wins."""
    store = make_store()
    m = MailboxMap(CONFIG, store)
    dead = _dead_owner()
    ids = {owner: now(store.begin_move("carol", "move", [Reservation(f"W{i}")], {}, owner, "/"))
           for i, owner in enumerate([dead, FAR, m.owner, "given up"])}
    now(store.disown(ids["given up"], "given up"))
    assert now(m.owners_gone()) == [ids[dead]]
    maps = [MailboxMap(CONFIG, make_store()) for _ in range(4)]
    from twisted.internet import defer

    seen = [next(e for e in now(x.entries()) if e.id == ids[dead]) for x in maps]
    won = REACTOR.wait(defer.gatherResults([defer.ensureDeferred(x.claim(e)) for x, e in zip(maps, seen)]))
    assert sorted(won) == [False] * 3 + [True]
    assert now(m.owners_gone()) == []  # its new owner lives



def test_a_claim_recovers_the_entry_as_its_owner_last_wrote_it(make_store):
    """A sweep reads every entry, then recovers them one by one: an owner that wrote more steps
    after that read, then died, is recovered from its last step, not the one read (soak seed
    14616: an admin `move` read at copying and killed at committed while an earlier entry was
    recovered was rolled back from the stale read; its last batch unknown, 26 copies stayed)."""
    store = make_store()
    m = MailboxMap(CONFIG, store)
    owner = _dead_owner()  # (the store checks the owner's name only: its steps are written as if it ran)
    entry = now(store.begin_move("carol", "move", [Reservation("Work")], {"batches": []}, owner, "/"))
    now(store.journal_step(entry, Step.COPYING, {"batches": [], "pending": {"pair": 0}}, owner))
    (seen,) = now(m.entries())  # the sweep's read
    now(store.journal_step(entry, Step.COPIED, {"batches": [{"pair": 0, "dst": "1:3"}], "pending": None}, owner))
    now(store.journal_step(entry, Step.COMMITTED, {"batches": [{"pair": 0, "dst": "1:3"}], "pending": None}, owner))
    assert seen.step is Step.COPYING and m.abandoned(seen) and now(m.claim(seen))
    assert seen.step is Step.COMMITTED and seen.data == {"batches": [{"pair": 0, "dst": "1:3"}], "pending": None}
    assert seen.owner == m.owner


def test_placement_is_read_from_the_store_not_from_what_a_poll_saw(make_store):
    """lookup_now: another process's placement is seen at once, before any poll picked it up (a move that
    waited for another's names looks where that one took them: mover.Mover.rename)."""
    mine, theirs = MailboxMap(CONFIG, make_store()), MailboxMap(CONFIG, make_store())
    assert now(mine.lookup_now("carol", "INBOX")).backends == ("b1",)
    now(theirs.place("Carol", "inbox", ["b3", "b2"]))
    assert now(mine.store.placement("carol", "INBOX")) == ("b3", "b2")
    assert now(mine.lookup_now("CAROL", "inbox")).backends == ("b3", "b2")
    assert now(mine.lookup_now("bob", "Shared/x")).backends == ("b2",)  # rules for what is not placed
    now(theirs.unplace("carol", "INBOX"))
    assert now(mine.lookup_now("carol", "INBOX")).backends == ("b1",)
