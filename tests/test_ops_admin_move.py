"""`referral-proxy move` in the running proxies' metrics (issue 12): the admin move runs in its own
process and counts in the map store; every proxy sharing that store exports the same
``referral_proxy_transfers_total{kind="admin_move",result}`` and
``referral_proxy_transfer_bytes_total{kind="admin_move"}``, scraped here over HTTP after
the CLI ran against the real Dovecot backends. The bytes expected are read from the
backends themselves (RFC822.SIZE of every moved message where the census finds it)."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import deep_merge
from movecheck import LEFT_TO_RECOVER, census, cli, faulty, judge, seed, start_paused
from storehelp import REACTOR, now
from test_ops_dovecot import scrape, value

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, Dovecot, free_port
from referral_proxy.journal import Reservation, Step

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}
KINDS = ("copy", "move", "rename", "admin_move")


def _proxies(proxy_factory, store: str, n: int = 2, extra: dict | None = None):
    """*n* proxies on one map store, each with its /metrics port (and *extra* merged into its config)."""
    out = []
    for _ in range(n):
        port = free_port()
        proxy = proxy_factory(deep_merge({"backends": MASTERS, "map": {"store": store},
                                          "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, extra or {}))
        out.append((proxy, port))
    return out


def _transfers(port: int) -> dict:
    s = scrape(port)
    return {**{(k, r): value(s, "referral_proxy_transfers_total", kind=k, result=r) for k in KINDS for r in ("ok", "failed")},
            **{k: value(s, "referral_proxy_transfer_bytes_total", kind=k) for k in KINDS}}


def _sizes(backend: Dovecot, user: str, mailbox: str) -> dict[str, int]:
    """Message-Id -> RFC822.SIZE of every message of *mailbox*, read straight from the backend."""
    import re

    with backend.client(user) as m:
        typ, data = m.select(f'"{mailbox}"', readonly=True)
        assert typ == "OK", data
        typ, data = m.fetch("1:*", "(RFC822.SIZE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        out = {}
        for item in data:
            if isinstance(item, tuple):
                size = int(re.search(rb"RFC822\.SIZE (\d+)", item[0]).group(1))
                out[re.search(rb"<([^>]+)>", item[1]).group(1).decode()] = size
        return out


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_store(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'shared-map.sqlite3'}"
    return request.getfixturevalue("pg_dsn")


def test_admin_moves_are_counted_once_in_every_proxys_metrics(proxy_factory, fleet, shared_store):
    (a, port_a), (b, port_b) = _proxies(proxy_factory, shared_store)
    work = [f"work-{i}@t" for i in range(6)]
    child = [f"child-{i}@t" for i in range(3)]
    seed(fleet["b1"], "carol", "Work", work[:3], size=700)
    seed(fleet["b1"], "carol", "Work", work[3:], size=9000, create=False)
    seed(fleet["b1"], "carol", "Work/Deep", child, size=150_000)
    zero = _transfers(port_a)
    assert zero == _transfers(port_b) and zero[("admin_move", "ok")] == 0 and zero["admin_move"] == 0

    moved = cli("move", "--config", str(a.config_path), "carol", "Work", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work + child) == ([], [])
    assert {where[i][0] for i in work} == {("b2", "Work")} and {where[i][0] for i in child} == {("b2", "Work/Deep")}
    carried = sum(_sizes(fleet["b2"], "carol", "Work").values()) + sum(_sizes(fleet["b2"], "carol", "Work/Deep").values())
    assert carried > 450_000
    for port in (port_a, port_b):  # the same store-wide totals from every proxy (aggregate with max)
        t = _transfers(port)
        assert (t[("admin_move", "ok")], t[("admin_move", "failed")], t["admin_move"]) == (1, 0, carried), port
        assert all(t[(k, r)] == 0 for k in ("copy", "move", "rename") for r in ("ok", "failed"))  # the proxies' own

    # Refused or failed moves count under "failed", carrying no bytes; a move to where it is already is none.
    missing = cli("move", "--config", str(b.config_path), "carol", "Nope", "b3")
    assert missing.returncode == 1 and "NONEXISTENT" in missing.stderr, missing.stderr
    seed(fleet["b3"], "carol", "Work", [])  # the destination has a Work already: refused before any copy
    exists = cli("move", "--config", str(a.config_path), "carol", "Work", "b3")
    assert exists.returncode == 1 and "ALREADYEXISTS" in exists.stderr, exists.stderr
    from referral_proxy.openstore import open_store

    holder = open_store(shared_store, REACTOR)  # another move holds Work (as a proxy's RENAME would)
    holder.start()
    entry = now(holder.begin_move("carol", "move", [Reservation("Work")], {}, "elsewhere.example:1:1", "/"))
    now(holder.journal_step(entry, Step.COPYING, {}, "elsewhere.example:1:1"))  # under way: no holds.WAIT
    try:
        busy = cli("move", "--config", str(a.config_path), "--wait", "0.5", "carol", "Work", "b1")
    finally:
        now(holder.end_move(entry))
        now(holder.close())
    assert busy.returncode == 1 and "INUSE" in busy.stderr, busy.stderr
    there = cli("move", "--config", str(a.config_path), "carol", "Work", "b2")
    assert there.returncode == 0 and "already" in there.stdout, there.stdout + there.stderr
    for port in (port_a, port_b):
        t = _transfers(port)
        assert (t[("admin_move", "ok")], t[("admin_move", "failed")], t["admin_move"]) == (1, 3, carried), port
    counts, where = census(fleet, "carol")
    assert judge(counts, work + child) == ([], []) and {where[i][0][0] for i in work + child} == {"b2"}


def test_a_move_killed_before_its_outcome_is_not_counted_by_recover(proxy_factory, fleet):
    """Recovery finishes (or undoes) a transfer that was already counted, or whose process died
    before it could be: it is not a transfer of its own, in no kind's counts."""
    ((proxy, port),) = _proxies(proxy_factory, "sqlite:map.sqlite3", 1, LEFT_TO_RECOVER)
    work = [f"work-{i}@t" for i in range(4)]
    seed(fleet["b1"], "carol", "Work", work)
    killed = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3", command=faulty("--kill-at", "placed:1"))
    assert killed.returncode != 0 and "killed at placed:1" in killed.stderr, killed.stderr
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []) and {where[i][0] for i in work} == {("b3", "Work")}
    t = _transfers(port)
    assert (t[("admin_move", "ok")], t[("admin_move", "failed")], t["admin_move"]) == (0, 0, 0)


def test_a_move_whose_count_cannot_be_written_still_moves_and_says_so(proxy_factory, fleet, tmp_path):
    path = tmp_path / "counted.sqlite3"  # SQLite whatever RP_TEST_STORE says: the test writes the file itself
    ((proxy, port),) = _proxies(proxy_factory, f"sqlite:{path}", 1)
    work = [f"work-{i}@t" for i in range(4)]
    seed(fleet["b1"], "carol", "Work", work)
    db = sqlite3.connect(str(path))
    for op in ("INSERT", "UPDATE"):  # the counter refuses every write, the rest of the store works
        db.execute(f"CREATE TRIGGER no_count_{op} BEFORE {op} ON transfer_counts BEGIN SELECT RAISE(ABORT, 'counter "
                   f"refused'); END")
    db.commit()
    db.close()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b2")
    assert moved.returncode == 0 and "moved carol Work from b1 to b2" in moved.stdout, moved.stdout + moved.stderr
    assert "could not be counted" in moved.stderr and "counter refused" in moved.stderr, moved.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []) and {where[i][0] for i in work} == {("b2", "Work")}
    t = _transfers(port)  # nothing counted, and the scrape still answers
    assert (t[("admin_move", "ok")], t["admin_move"]) == (0, 0)


def test_a_move_waits_its_turn_while_a_name_is_held(proxy_factory, fleet, tmp_path):
    """A user whose clients RENAME across back to back held a name at every try: `move carol '*' b2` failed
    at once with [INUSE], 10 tries of 10 (probe t1 of stop 51). It now tries again for --wait seconds (60 by
    default): here another move holds Work for 1.5 s, and the admin move goes through after it."""
    import time

    work = [f"w-{i}@t" for i in range(5)]
    seed(fleet["b1"], "carol", "Work", work)
    store = f"sqlite:{tmp_path / 'map.sqlite3'}"
    (a, _port), = _proxies(proxy_factory, store, n=1)
    from referral_proxy.openstore import open_store

    holder = open_store(store, REACTOR)
    holder.start()
    entry = now(holder.begin_move("carol", "move", [Reservation("Work")], {}, "elsewhere.example:1:1", "/"))
    now(holder.journal_step(entry, Step.COPYING, {}, "elsewhere.example:1:1"))  # under way: refused at once
    mover = start_paused(tmp_path / "none", "never:1", "move", "--config", str(a.config_path), "carol", "Work", "b2")
    time.sleep(1.5)  # its first tries meet the hold
    held = cli("recover", "--config", str(a.config_path))  # and `recover` says who holds it
    assert "left in the journal" in held.stdout, held.stdout
    assert "held by elsewhere.example:1:1" in held.stdout, held.stdout
    now(holder.end_move(entry))
    now(holder.close())
    out = mover.communicate(timeout=120)[0].decode()
    assert mover.returncode == 0 and "moved carol Work" in out, out
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []) and {where[i][0] for i in work} == {("b2", "Work")}
