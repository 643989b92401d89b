"""A worker (``[proxy] workers``) on an SQLite map whose move's last write failed (the file locked past
the wait): without leases an owner alive holds its entry, and only the master sweeps, so the entry
and its names stayed held (NO [INUSE]) until the worker exited. The worker gives it up again once
the store answers, for its master's sweep; a process with its own sweep recovers it itself."""

from __future__ import annotations

import sqlite3

import pytest
from storehelp import now
from twisted.internet import task

from referral_proxy.config import MapConfig
from referral_proxy.journal import Reservation, StoreUnavailable
from referral_proxy.routing import MailboxMap
from referral_proxy.store import SQLiteStore


def _owners(path) -> list:
    with sqlite3.connect(str(path)) as db:
        return db.execute("SELECT owner FROM journal").fetchall()


@pytest.mark.parametrize("sweeps", [False, True], ids=["worker", "own sweep"])
def test_an_entry_a_failed_write_left_held_is_given_up_again(tmp_path, sweeps):
    path = tmp_path / "map.sqlite3"
    store = SQLiteStore(path)
    store.start()
    m = MailboxMap(MapConfig(default="b1"), store)
    clock = task.Clock()
    m.start_leases(clock, 15.0, sweeps=sweeps)
    entry = now(m.begin_move("carol", "move", [Reservation("Work")], {}))
    lock = sqlite3.connect(str(path), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # a `sqlite3` shell, a backup
    store._db.execute("PRAGMA busy_timeout = 50")  # not the proxy's 10 s wait: the test holds the lock longer
    with pytest.raises(StoreUnavailable):
        now(m.end_move(entry))
    clock.advance(15.0)  # still locked: kept, tried again
    lock.execute("COMMIT")
    lock.close()
    assert _owners(path) == [(m.owner,)]
    clock.advance(15.0)
    if sweeps:  # its own sweep takes it (MailboxMap.abandoned): not given up behind its back
        assert _owners(path) == [(m.owner,)] and m.abandoned(now(m.entries())[0])
    else:
        assert _owners(path) == [(None,)]  # the master's sweep recovers an entry nobody owns
    now(m.close())
