"""The SQLite map store LOCKED by another process (a second connection holding ``BEGIN EXCLUSIVE``,
as a `sqlite3` shell or a backup does) for longer than the proxy waits, at each step of a RENAME
across, a UID MOVE across and a UID COPY across: the client gets an answer (never SERVERBUG),
other sessions are served meanwhile, and once the lock is gone recovery leaves every message
there once and no name reserved. Judged by a census of the backends.

Seen on main (RENAME Work Shared/Work, locked after copied:1, held 25 s): another user's NOOP
waited 9.0 s (SQLite's 10 s busy wait in the reactor thread), the client got ``NO [SERVERBUG]``
after 30 s, and the journal entry stayed at 'copied' under the live proxy's name: every later
RENAME of Work answered ``NO [INUSE]`` until the proxy restarted.
"""

from __future__ import annotations

import sqlite3
import time

import pytest
from imapwire import Wire
from movecheck import census, faulty, seed, through_proxy, wait_paused
from test_store_hung import _answer

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
MASTERS = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}
WAIT = "1"  # seconds the proxy waits for the lock (faultproxy --store-lock-wait); the test holds it longer

# None: locked before the command (its first write, the entry's begin); else after that step's write
RENAME_AT = [None, "reserved:1", "planned:1", "creating:1", "created:1", "copying:1", "copied:1", "committed:1",
             "subscribed:1", "placed:1", "aside:1", "drained:1"]
MOVE_AT = [None, "reserved:1", "move-appending:1", "move-appended:1", "move-expunging:1"]
CASES = ([("RENAME", p) for p in RENAME_AT] + [("UID MOVE", p) for p in MOVE_AT] + [("UID COPY", None)])


def _entries(proxy) -> list:
    with sqlite3.connect(str(proxy.workdir / "map.sqlite3")) as db:
        return db.execute("SELECT id, op, step, owner FROM journal").fetchall()


def _wait_no_entries(entries) -> list:
    """Poll *entries()* until the proxy's recovery emptied the journal (60 s at most: a bound for a hang only)."""
    deadline = time.monotonic() + 60
    while (left := entries()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("command, point", CASES, ids=[f"{c}-{p or 'begin'}" for c, p in CASES])
def test_store_locked_past_the_wait(proxy_factory, fleet, tmp_path, command, point):
    locks: list[sqlite3.Connection] = []

    def hold(proxy) -> None:
        locks.append(sqlite3.connect(str(proxy.workdir / "map.sqlite3"), isolation_level=None))
        locks[0].execute("BEGIN EXCLUSIVE")

    def release() -> None:
        locks[0].execute("COMMIT")
        locks[0].close()

    run_with_store_away(proxy_factory, fleet, tmp_path, command, point, {"backends": MASTERS}, hold, release,
                        lambda proxy: _wait_no_entries(lambda: _entries(proxy)))


def run_with_store_away(proxy_factory, fleet, tmp_path, command, point, config, hold, release, wait_empty) -> None:
    """*command* (RENAME Work Shared/Work, or UID MOVE/COPY 1:* of Work to Shared/Dest) with the store
    taken away by *hold(proxy)* at *point* (None: before it) and given back by *release()* once the
    client is answered; then *wait_empty(proxy)* (the journal entries left) and a census."""
    work = [f"work-{i}@t" for i in range(20)]
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    seed(fleet["b2"], "bob", "Other", ["other@t"])
    pause = tmp_path / "pause"
    pause.mkdir()
    options = ["--store-lock-wait", WAIT] + (["--pause-at", point, "--pause-dir", str(pause)] if point else [])
    proxy = proxy_factory(config, rules=[*RULES, {"user": "bob", "mailbox": "*", "backend": "b2"}],
                          command=faulty(*options))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    bystander = Wire(proxy.host, proxy.port, timeout=120)
    bystander.login("bob")
    if command == "RENAME":
        line = b"c RENAME Work Shared/Work\r\n"
    else:
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        line = b"c " + command.encode() + b" 1:* Shared/Dest\r\n"
    if point is None:
        hold(proxy)
        w.send(line)
    else:
        w.send(line)
        assert wait_paused(pause, point) == point
        hold(proxy)
        (pause / "resume").touch()
    try:
        # another user is served while the store is away (routed from what the proxy read last)
        selected = bystander.cmd(b"b", b"SELECT Other")
        assert selected[-1].startswith(b"b OK") and b"* 1 EXISTS\r\n" in selected, selected
        reply = _answer(w, b"c", 90)
        assert reply[-1].startswith((b"c OK", b"c NO")) and b"SERVERBUG" not in reply[-1], reply
    finally:
        release()
    w.close()
    bystander.close()
    assert wait_empty(proxy) == []  # recovered once the store is back: no name held for good
    counts, where = census(fleet, "carol")
    places = {i: sorted(where[i]) for i in work}
    if command == "UID COPY":  # each in Work once, and copied once or not at all
        assert all(("b1", "Work") in p and len(p) <= 2 for p in places.values()), places
        assert len({len(p) for p in places.values()}) == 1, places  # all copied, or none
    else:  # each message once, all in one place
        assert all(len(p) == 1 for p in places.values()), places
        assert len({p[0] for p in places.values()}) == 1, places
    reached = through_proxy(proxy, "carol")
    assert all(reached[i] == counts[i] for i in work), (reached, counts)
    again = Wire(proxy.host, proxy.port, timeout=120)
    again.login("carol")
    name = b"Work" if ("b1", "Work") in places[work[0]] else b"Shared/Work"
    if name == b"Work" or command == "RENAME":  # the names are free: a RENAME of the mailbox goes through
        target = b"Shared/Again" if name == b"Work" else b"Again"
        deadline = time.monotonic() + 60  # PostgreSQL back: the proxy's listener reconnects first
        while (renamed := again.cmd(b"r", b"RENAME " + name + b" " + target))[-1].startswith(b"r NO [UNAVAILABLE]"):
            assert time.monotonic() < deadline, renamed
            time.sleep(0.2)
        assert renamed[-1].startswith(b"r OK"), renamed
    again.close()
