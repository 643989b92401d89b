"""A cross-server UID MOVE whose copies commit after recovery took its entry over (latecommit.py; probe k1 of
stop 59, 4 of 4: every message in both mailboxes).

Fencing keeps a stale owner from sending; bytes it sent before are beyond it. Here the destination's imap
process serving the MOVE is stopped while the MULTIAPPEND's last byte is on its way (a partition, a stalled
Dovecot), the proxy itself is stopped past its lease (1 s), and `recover` claims the entry, looks for the copies
by content, finds none (not committed yet) and releases it, the sources kept. Then Dovecot commits, the proxy goes
on, reads APPENDUID and loses the entry at its next journal write: on main it answered NO and left the copies
(each message twice). Now it waits for the entry's end, sees the sources still there and takes their copies
back. Real Dovecot and PostgreSQL; judged by census.
"""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest
from imapwire import Wire
from movecheck import census, cli, deliver, faulty, judge, seed, wait_paused
from test_several_proxies import _config, ids, recover_until_empty
from test_store_hung import _signal

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("late", [True, False], ids=["after-recovery-looked", "before-recovery-looked"])
def test_copies_committed_after_recovery_kept_the_sources_are_taken_back(proxy_factory, fleet, pg_dsn, tmp_path, late):
    """late=False: Dovecot commits before `recover` looks: it finds the copies and finishes the move (the sources
    expunged); the proxy, back, must then keep its copies (the only ones left), and says the messages moved."""
    work = ids("late", 40)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/W", [])
    pause = tmp_path / "pause"
    pause.mkdir()
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 1
    a = proxy_factory(config, rules=[{"mailbox": "Shared/*", "backend": "b3"}],
                      command=faulty("--pause-at", "move-appending:2", "--pause-dir", str(pause)))
    w = Wire(a.host, a.port, timeout=180)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:* Shared/W\r\n")
    assert wait_paused(pause, "move-appending:2") == "move-appending:2"  # the hashes are written
    stalled = fleet["b3"].sessions("carol")  # the MOVE's own connection to b3 among them
    assert stalled
    _signal(stalled, signal.SIGSTOP)
    proxy_stopped = False
    try:
        (pause / "resume").touch()  # the last byte goes: it waits in the stopped imap process's socket
        time.sleep(0.5)  # not a measurement: the proxy writes it
        os.kill(a.process.pid, signal.SIGSTOP)
        proxy_stopped = True
        if not late:
            _signal(stalled, signal.SIGCONT)
        time.sleep(3)  # not a measurement: three leases of 1 s run out (and, not late, Dovecot commits)
        taken = cli("recover", "--config", str(a.config_path))
        assert taken.returncode == 0 and "carol" in taken.stdout, taken.stdout + taken.stderr
    finally:
        _signal(stalled, signal.SIGCONT)  # Dovecot commits the copies
        time.sleep(0.5)
        if proxy_stopped:
            os.kill(a.process.pid, signal.SIGCONT)
    lines = w.until_tagged(b"m")
    answer = lines[-1]
    if late:
        assert answer.startswith(b"m NO [UNAVAILABLE]") and b"recovery took the operation over" in answer, answer
    else:  # moved after all: said so (main said NO, probe k1 F2), its COPYUID before the EXPUNGEs, as RFC 6851 asks
        assert answer.startswith(b"m OK"), answer
        said = [i for i, line in enumerate(lines) if line.startswith(b"* OK [COPYUID ")]
        expunged = [i for i, line in enumerate(lines) if line.endswith(b" EXPUNGE\r\n")]
        assert len(said) == 1 and len(expunged) == len(work) and said[0] < min(expunged), lines[:5]
    w.close()
    recover_until_empty(a, pg_dsn)
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []), (taken.stdout, {i: where[i] for i in work[:3]})
    kept = ("b1", "Work") if late else ("b3", "Shared/W")  # recovery kept the sources, or finished the move
    assert {m for i in work for m in where[i]} == {kept}, taken.stdout


@pytest.mark.parametrize("early", [False, True], ids=["after-recovery-looked", "before-recovery-looked"])
def test_a_rename_across_whose_late_batch_commits_after_recovery_copied_it_again(proxy_factory, fleet, pg_dsn,
                                                                                  tmp_path, early):
    """RENAME Work Shared/W past its commit point carries 5 messages delivered meanwhile (a delta batch). Its
    last byte waits in the destination's stopped imap process; the proxy stops past its lease; `recover` finishes
    the move: it finds nothing of that batch, copies the 5 again and drains the source. Then the batch commits:
    main kept the 5 twice in Shared/W (5 of 5); now the proxy takes its second copies back once the entry ended.
    early: the batch commits before `recover` looks, which adopts it; then a client puts the same bytes as one of
    them into Shared/W: that is no second copy of ours (probe k6: taken back, the moved message lost, 9 of 9)."""
    work, late = ids("work", 20), ids("late", 5)
    seed(fleet["b1"], "carol", "Work", work)
    pause = tmp_path / "pause"
    pause.mkdir()
    config = _config(pg_dsn)
    config["map"]["lease_seconds"] = 1
    a = proxy_factory(config, rules=[{"mailbox": "Shared/*", "backend": "b3"}],
                      command=faulty("--pause-at", "placed:1", "--pause-at", "delta-copying:2", "--pause-dir", str(pause)))
    w = Wire(a.host, a.port, timeout=180)
    w.login("carol")
    w.send(b"r RENAME Work Shared/W\r\n")
    assert wait_paused(pause, "placed:1") == "placed:1"  # past the commit point
    assert [deliver(fleet["b1"], "carol", "Work", m) for m in late] == ["Work"] * 5
    with fleet["b1"].client("carol") as m:
        m.select("Work", readonly=True)
        same = m.fetch(b"21", "(BODY.PEEK[])")[1][0][1]  # late[0]'s bytes, as stored
    (pause / "resume").touch()
    assert wait_paused(pause, "delta-copying:2") == "delta-copying:2"  # the late batch's hashes are written
    stalled = fleet["b3"].sessions("carol")
    _signal(stalled, signal.SIGSTOP)
    try:
        (pause / "resume").touch()
        time.sleep(0.5)  # not a measurement: the proxy writes the batch's last byte
        os.kill(a.process.pid, signal.SIGSTOP)
        if early:
            _signal(stalled, signal.SIGCONT)  # the batch commits: recovery will find it
        time.sleep(3)  # not a measurement: three leases of 1 s run out
        taken = cli("recover", "--config", str(a.config_path))
        assert taken.returncode == 0 and "finished" in taken.stdout, taken.stdout + taken.stderr
        if early:
            with fleet["b3"].client("carol") as m:
                assert m.append("Shared/W", None, None, same)[0] == "OK"  # a client's, the same bytes
    finally:
        _signal(stalled, signal.SIGCONT)
        time.sleep(0.5)
        os.kill(a.process.pid, signal.SIGCONT)
    assert w.until_tagged(b"r")[-1].startswith(b"r OK")  # answered at the commit point's wait, as before
    w.close()
    recover_until_empty(a, pg_dsn)
    wanted = collections.Counter(work + late + late[:1] * early)  # early: late[0] moved, and the client's
    for _ in range(300):  # the proxy's own taking back (once it saw the entry end) is over
        counts, where = census(fleet, "carol")
        if all(counts[i] == n for i, n in wanted.items()):
            break
        time.sleep(0.1)
    assert all(counts[i] == n for i, n in wanted.items()), {i: where[i] for i in late}
    assert {m for i in work + late for m in where[i]} == {("b3", "Shared/W")}
