"""pgstore's confirmation of a change that brings new journal entries (proxyappends.py), two stores on
one real PostgreSQL database standing for two proxies: the first's ``confirmed()`` waits until the
second's reactor confirms; not for a shared reservation, nor for a proxy without the hook."""

from __future__ import annotations

import time

from storehelp import REACTOR, now

from referral_proxy.journal import Reservation

FAR = "elsewhere.example:1:1"


def _stores(pg_dsn, hook=None):
    from referral_proxy.pgstore import PostgresStore

    a, b = PostgresStore(pg_dsn, REACTOR), PostgresStore(pg_dsn, REACTOR)
    b.on_new_entries = hook
    a.start()
    b.start()
    return a, b


def _until(check, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        now(_pause())


async def _pause():
    from twisted.internet import defer

    d = defer.Deferred()
    REACTOR.callFromThread(d.callback, None)  # (let queued hooks run)
    time.sleep(0.01)
    await d


def test_a_reservation_is_confirmed_only_once_the_other_proxy_says_so(pg_dsn):
    heard = []
    a, b = _stores(pg_dsn, lambda change, entries, renames: heard.append((change, entries, renames)))
    try:
        entry = now(a.begin_move("carol", "rename-local", [Reservation("A/B"), Reservation("C")], {"backend": "b2"},
                                 FAR, "/"))
        assert not now(a.confirmed(1.0))  # b read it (its hook was called), b did not confirm
        _until(lambda: heard)
        (change, entries, renames), = heard
        assert sorted(r.name for _e, _u, r in entries) == ["A/B", "C"] and {u for _e, u, _r in entries} == {"carol"}
        assert renames == {entry: "b2"}  # a RENAME on one backend: b holds its sessions there (renamehold.py)
        b.confirm(change)
        assert now(a.confirmed(10.0))
        now(a.set("carol", "X", ("b2",)))  # a later change, no new entry: read and said at once
        assert now(a.confirmed(5.0))
    finally:
        now(a.close())
        now(b.close())


def test_a_shared_reservation_or_a_proxy_without_the_hook_is_not_waited_for(pg_dsn):
    heard = []
    a, b = _stores(pg_dsn, lambda change, entries, renames: heard.append(change))
    try:
        now(a.begin_move("carol", "move", [Reservation("A", subtree=False, shared=True)], {}, FAR, "/"))
        assert now(a.confirmed(5.0)) and not heard  # a cross-server MOVE's pins hold no APPEND back
        b.on_new_entries = None
        now(a.begin_move("carol", "rename-local", [Reservation("D")], {}, FAR, "/"))
        assert now(a.confirmed(5.0))
    finally:
        now(a.close())
        now(b.close())
