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
from referral_proxy.store import MemoryStore, SQLiteStore

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
    store = make_store(lease_seconds=1.0)
    m = MailboxMap(CONFIG, store)
    entry = now(store.begin_move("carol", "move", [Reservation("Work")], {}, FAR, "/"))
    (seen,) = now(m.entries())
    assert not m.abandoned(seen) and not now(m.claim(seen))  # its owner renews: hands off
    for _ in range(100):
        if now(store.renew(FAR, [entry])) == 1:  # the owner renewing
            break
    for _ in range(600):  # the owner stops renewing (a dead host): its lease runs out
        (seen,) = now(m.entries())
        if m.abandoned(seen):
            break
        time.sleep(0.01)
    assert m.abandoned(seen) and now(m.claim(seen))
    with pytest.raises(LostEntry):  # the old owner, back, cannot write its next step
        now(store.journal_step(entry, Step.PLANNED, {}, FAR))


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
