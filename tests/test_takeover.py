"""A proxy killed mid-move on a shared PostgreSQL map: another proxy on the host takes the move over
within its quick check (``[map].recovery_check_seconds``), not at its 30-second sweep.

Until then the other proxies' clients see the move half done: after a cross-server MOVE's copies
are committed, each message in the source and in its copy (soak seed 11017: two clients moved one
message each, the user ended with it twice). Judged by a census of the backends after the journal
is empty (polled, never a timed assertion), and by what a client of the survivor reaches.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
from movecheck import census, faulty, judge, seed, through_proxy, wait_paused
from test_several_proxies import RULES, _config, _entries, _logged_in, ids, wait_journal_empty

pytestmark = pytest.mark.usefixtures("clean_mail")

# kill point -> (the command A runs, where the mail is once recovery is done)
KILLS = {
    "move-appended:1": (b"UID MOVE 1:* Shared/Dest", ("b3", "Shared/Dest")),  # copies committed: finished
    "copied:1": (b"RENAME Work Shared/Work", ("b1", "Work")),  # a batch copied, not committed: rolled back
    "committed:1": (b"RENAME Work Shared/Work", ("b3", "Shared/Work")),  # every message verified: finished
}
GONE = "is gone; recovering them now"  # the survivor's check found the dead owner (recovery.py)


def _checking(dsn: str, seconds: float | None = None) -> dict:
    config = _config(dsn)
    if seconds is not None:
        config["map"]["recovery_check_seconds"] = seconds
    return config


def kill_mid_move(proxy_factory, fleet, pg_dsn, step: str, survivor: dict, n: int = 30,
                  mailbox: str = "Work", user: str = "carol"):
    """*n* messages in *mailbox* on b1; proxy A SIGKILLed at *step* of KILLS[step]'s command, a proxy
    of config *survivor* running beside it: (ids, survivor, the monotonic time A's client saw it die)."""
    command, _where = KILLS[step]
    work = ids(mailbox.lower(), n)
    seed(fleet["b1"], user, mailbox, work)
    if command.startswith(b"UID MOVE"):
        seed(fleet["b3"], user, "Shared/Dest", [])
    a = proxy_factory(_config(pg_dsn), rules=RULES, command=faulty("--kill-at", step))
    b = proxy_factory(survivor, rules=RULES)
    w = _logged_in(a, user)
    if command.startswith(b"UID MOVE"):
        assert w.cmd(b"s", b"SELECT " + mailbox.encode())[-1].startswith(b"s OK")
    w.send(b"m " + command.replace(b"Work", mailbox.encode()) + b"\r\n")
    assert w.closed(60), "proxy A was not killed at " + step
    killed = time.monotonic()
    a.process.wait(10)
    return work, b, killed


def _recovered(log: str, outcome: str) -> int:
    """How many entries of carol's this proxy's recovery says it *outcome* (recovery.describe's lines)."""
    return sum("recovery: carol: " in line and f": {outcome}" in line for line in log.splitlines())


def _once_through(fleet, proxy, user: str, work: list[str], where_to: tuple[str, str]) -> None:
    counts, where = census(fleet, user)
    assert judge(counts, work) == ([], []), {i: where[i] for i in work if counts[i] != 1}
    assert {where[i][0] for i in work} == {where_to}
    reached = through_proxy(proxy, user)  # the survivor's client: every message once
    assert [i for i in work if reached[i] != 1] == []


@pytest.mark.parametrize("step", list(KILLS))
def test_the_survivor_takes_a_killed_proxys_move_over_at_its_check(proxy_factory, fleet, pg_dsn, step):
    """On main only B's 30-second sweep (or `recover`) took A's entry: for up to 30 s B's clients saw
    the half-done move (bench: tests/measure_takeover.py)."""
    work, b, killed = kill_mid_move(proxy_factory, fleet, pg_dsn, step, _checking(pg_dsn))
    wait_journal_empty(pg_dsn)
    print(f"{step}: journal empty {time.monotonic() - killed:.2f} s after the kill")
    assert _entries(pg_dsn) == 0, b.stderr_text()[-3000:]
    _once_through(fleet, b, "carol", work, KILLS[step][1])
    b.stop()  # its log whole (the outcome's line comes just after the entry is gone)
    log = b.stderr_text()
    assert GONE in log, log[-3000:]  # taken by B's check, not by its sweep
    assert _recovered(log, "rolled back" if step == "copied:1" else "finished") == 1, log[-3000:]


def test_two_survivors_noticing_one_dead_owner_only_one_claims(proxy_factory, fleet, pg_dsn):
    """B and C check every 0.1 s: both may find A dead at once; the claim (a compare-and-set of the
    owner) lets one recover it, the other leaves it."""
    work, b, _killed = kill_mid_move(proxy_factory, fleet, pg_dsn, "move-appended:1", _checking(pg_dsn, 0.1))
    c = proxy_factory(_checking(pg_dsn, 0.1), rules=RULES)
    wait_journal_empty(pg_dsn)
    assert _entries(pg_dsn) == 0
    _once_through(fleet, c, "carol", work, KILLS["move-appended:1"][1])
    b.stop()  # their logs whole
    c.stop()
    logs = [p.stderr_text() for p in (b, c)]
    assert sum(_recovered(log, "finished") for log in logs) == 1, logs


def _owners(dsn: str) -> list[str | None]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT owner FROM journal ORDER BY id").fetchall()]


def test_a_stopped_owner_is_never_taken_over_while_a_dead_one_is(proxy_factory, fleet, pg_dsn, tmp_path):
    """A is SIGSTOPped mid-move for 5 s (its pid lives), D is SIGKILLed mid-move meanwhile: B's check
    (every 0.1 s) takes D's entry over and never A's; A, continued, finishes its RENAME itself."""
    work = ids("work", 20)
    seed(fleet["b1"], "carol", "Work", work)
    pause = tmp_path / "pause"
    pause.mkdir()
    a = proxy_factory(_config(pg_dsn), rules=RULES, command=faulty("--pause-at", "copied:1", "--pause-dir", str(pause)))
    on_a = _logged_in(a)
    on_a.send(b"r RENAME Work Shared/Work\r\n")
    assert wait_paused(pause, "copied:1") == "copied:1"
    os.kill(a.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        other, b, _killed = kill_mid_move(proxy_factory, fleet, pg_dsn, "copied:1", _checking(pg_dsn, 0.1),
                                          n=10, mailbox="Other")
        deadline = time.monotonic() + 180
        while _entries(pg_dsn) != 1 and time.monotonic() < deadline:  # D's entry taken over and rolled back
            time.sleep(0.05)
        assert _entries(pg_dsn) == 1 and GONE in b.stderr_text(), b.stderr_text()[-3000:]
        time.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))  # A stays stopped 5 s, B checking meanwhile
        owners = _owners(pg_dsn)
        assert len(owners) == 1 and owners[0] is not None and f":{a.pid}:" in owners[0], owners
    finally:
        os.kill(a.pid, signal.SIGCONT)
    (pause / "resume").touch()
    reply = on_a.until_tagged(b"r")
    assert reply[-1].startswith(b"r OK"), reply  # a journal write of a taken-over move would have failed
    on_a.close()
    assert _entries(pg_dsn) == 0
    counts, where = census(fleet, "carol")
    assert judge(counts, work + other) == ([], [])
    assert {where[i][0] for i in work} == {("b3", "Shared/Work")}
    assert {where[i][0] for i in other} == {("b1", "Other")}
    reached = through_proxy(b, "carol")
    assert [i for i in work + other if reached[i] != 1] == []


