"""A proxy process that stalls past its move lease (PostgreSQL map) between journaling a batch's
hashes and sending the batch's last byte (round 9a).

SIGSTOP, a paused VM, a swap storm: the owner renews nothing meanwhile, so recovery (another proxy's
sweep, or `recover`) takes the entry over, looks for the batch by content, finds nothing -- its
last byte was never sent -- and finishes or ends the move without it. When the stalled process
went on, it sent that last byte: on main the batch was committed a second time (a RENAME's delta
batch: 5 of 5 late messages twice in the destination; a cross-server MOVE: 30 of 30 messages both
in the source and in the destination, the client told NO). routing.MailboxMap.record_before_commit:
a hashes write that took more than half the lease is not followed by the commit (LostEntry).

The stall is faultproxy.py's pause at the journal write (the reactor blocked, as SIGSTOP would);
the lease is 1 s. Judged by a census of the backends.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, cli, deliver, faulty, judge, seed, wait_paused
from test_several_proxies import _config, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def _stalling(proxy_factory, fleet, pg_dsn, tmp_path, mailbox: str, work: list[str], points: list[str]):
    """carol's *work* in *mailbox* on b1; a proxy (lease 1 s, Shared/* on b3) pausing at *points*."""
    seed(fleet["b1"], "carol", mailbox, work)
    pause = tmp_path / "pause"
    pause.mkdir()
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 1
    a = proxy_factory(config, rules=[{"mailbox": "Shared/*", "backend": "b3"}],
                      command=faulty(*[x for p in points for x in ("--pause-at", p)], "--pause-dir", str(pause)))
    return a, pause


@pytest.mark.parametrize("step", ["delta-copying:2", "move-appending:2"])
def test_a_stalled_owner_taken_over_by_recovery_commits_no_second_copy(proxy_factory, fleet, pg_dsn, tmp_path, step):
    """delta-copying:2: RENAME Work Shared/W carrying 5 messages delivered after its commit point;
    move-appending:2: UID MOVE 1:* Shared/W out of INBOX. Each stalls 3 s after its hashes' write."""
    work = ids("work", 30)
    points = ["placed:1", step] if step.startswith("delta") else [step]
    a, pause = _stalling(proxy_factory, fleet, pg_dsn, tmp_path, "INBOX" if step.startswith("move") else "Work",
                         work, points)
    w = Wire(a.host, a.port, timeout=120)
    w.login("carol")
    late: list[str] = []
    if step.startswith("delta"):
        w.send(b"r RENAME Work Shared/W\r\n")
        assert wait_paused(pause, "placed:1") == "placed:1"
        late = ids("late", 5)  # delivered past the commit point: the drain's delta batch carries them
        assert [deliver(fleet["b1"], "carol", "Work", m) for m in late] == ["Work"] * 5
        (pause / "resume").touch()
    else:
        seed(fleet["b3"], "carol", "Shared/W", [])
        assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        w.send(b"r UID MOVE 1:* Shared/W\r\n")
    assert wait_paused(pause, step) == step
    time.sleep(3)  # not a measurement: three leases of 1 s run out while the owner is stalled
    taken = cli("recover", "--config", str(a.config_path))
    assert taken.returncode == 0 and "carol" in taken.stdout, taken.stdout + taken.stderr  # taken over
    (pause / "resume").touch()
    answer = w.until_tagged(b"r")[-1]
    if step.startswith("move"):  # not "the mailbox map is unreachable": it was not
        assert answer.startswith(b"r NO [UNAVAILABLE]") and b"recovery took the operation over" in answer, answer
    w.close()
    for _ in range(600):  # the stalled process's own end of it (a roll-back, a disown) is over
        again = cli("recover", "--config", str(a.config_path))
        if "left in the journal" not in again.stdout:
            break
        time.sleep(0.1)
    counts, where = census(fleet, "carol")
    lost, duplicated = judge(counts, work + late)
    assert (lost, duplicated) == ([], []), (answer, taken.stdout, lost, [(d, where[d]) for d in duplicated[:5]])


def test_a_stalled_rename_rolled_back_by_recovery_is_told_so(proxy_factory, fleet, pg_dsn, tmp_path):
    """RENAME Work Shared/W stalls 3 s past its lease right after creating Shared/W on b3; `recover`
    rolls it back (Shared/W deleted). Resumed, the proxy's next step fails on the missing Shared/W:
    the client was told that failure ("STATUS failed on b3: Mailbox doesn't exist") and the stalled
    process undid once more what was no longer its own. Now it checks the entry is still its own
    before undoing, and says recovery took the operation over."""
    work = ids("work", 10)
    a, pause = _stalling(proxy_factory, fleet, pg_dsn, tmp_path, "Work", work, ["created:1"])
    w = Wire(a.host, a.port, timeout=120)
    w.login("carol")
    w.send(b"r RENAME Work Shared/W\r\n")
    assert wait_paused(pause, "created:1") == "created:1"
    time.sleep(3)  # not a measurement: three leases of 1 s run out while the owner is stalled
    taken = cli("recover", "--config", str(a.config_path))
    assert taken.returncode == 0 and "carol" in taken.stdout, taken.stdout + taken.stderr
    (pause / "resume").touch()
    answer = w.until_tagged(b"r")[-1]
    assert answer.startswith(b"r NO [UNAVAILABLE]") and b"recovery took the operation over" in answer, answer
    assert w.cmd(b"l", b'LIST "" "*"')[-1].startswith(b"l OK")
    w.close()
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []), where
    assert {m for i in work for m in where[i]} == {("b1", "Work")}, dict(where)  # rolled back: all in Work
