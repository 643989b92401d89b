"""With ``[proxy] workers = 2`` a session whose selected mailbox a RENAME across (made through the
other worker) takes is told BYE, as on one worker (relocation.py).

On main (helper attack17): session b (worker 1) SELECTs Work; session a (worker 0) RENAMEs it to
Far/W (``Far*`` on b2), then CREATEs Work and APPENDs to it. The move began and ended between two
looks of worker 1 at the SQLite map (a lookup, or its watch once a second), so b was never told:
its next UID STORE got ``NO [SERVERBUG] Internal error`` or its connection was dropped without a
word (Dovecot: ``duplicate transaction log sequence``: b's process still had the old Work's index
open in the new Work). The RENAME now sets no source aside before the other workers have looked
(relocation.seen_within). Judged by b's answers and a census of every backend."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest
from imapwire import Wire, wait_for
from movecheck import census, seed
from test_workers import MOVES as MASTERS
from test_workers import one_on_each

from referral_proxy.relocation import BYE

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]
ROUNDS = 3


def _step(proxy) -> str | None:
    """The step of the (one) journal entry of the proxy's SQLite map (``placed@rows``), None if there is none."""
    with sqlite3.connect(proxy.config_path.parent / "map.sqlite3") as db:
        row = db.execute("SELECT step FROM journal").fetchone()
    return row[0] if row else None


def _rest(w: Wire, quiet: float = 2) -> bytes:
    """What *w* was sent and has not read, until the proxy closes it or says nothing for *quiet* s."""
    got, w.buf = w.buf, b""
    w.sock.settimeout(quiet)
    try:
        while chunk := w.sock.recv(65536):
            got += chunk
    except OSError:
        pass
    return got


@pytest.mark.parametrize("where", ["workers", "sqlite-proxies"])
def test_a_session_on_the_other_worker_with_a_mailbox_a_rename_takes_across_is_told_bye(proxy_factory, fleet,
                                                                                       tmp_path, where):
    """*where*: the two workers of one master, or two separate proxies on one SQLite map file."""
    if where == "workers":
        proxy = proxy_factory(rules=RULES, workers=2)
    else:
        config = {"map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
        proxy, other = proxy_factory(config, rules=RULES), proxy_factory(config, rules=RULES)
    msg = b"Message-Id: <new-%d@t>\r\nSubject: x\r\n\r\nhello\r\n"
    for i in range(ROUNDS):
        seed(fleet["b1"], "carol", f"Work{i}", [f"w{i}-{k}@t" for k in range(3)])
        if where == "workers":
            a, b = one_on_each(proxy, proxy.pid, "carol").values()
        else:
            a, b = Wire(proxy.host, proxy.port, timeout=30), Wire(other.host, other.port, timeout=30)
            a.login("carol")
            b.login("carol")
        assert b.cmd(b"s", b"SELECT Work%d" % i)[-1].startswith(b"s OK")
        assert a.cmd(b"a", b"RENAME Work%d Far/W%d" % (i, i))[-1].startswith(b"a OK")
        m = msg % i
        a.send(b"c CREATE Work%d\r\nd APPEND Work%d {%d+}\r\n%s\r\n" % (i, i, len(m), m))
        assert a.until_tagged(b"d")[-1].startswith(b"d OK")
        time.sleep(1.5)  # past the watch's next look (relocation.CHECK_SECONDS)
        b.send(b"x UID STORE 1:* +FLAGS (\\Deleted)\r\ny EXPUNGE\r\n")
        said = _rest(b)
        assert b"* BYE " + BYE in said and b"x " not in said, said  # told, before anything reached the new Work
        a.close()
        b.close()
    _counts, where = census(fleet, "carol")
    for i in range(ROUNDS):
        assert where[f"new-{i}@t"] == [("b1", f"Work{i}")], where
        assert all(where[f"w{i}-{k}@t"] == [("b2", f"Far/W{i}")] for k in range(3)), where


def test_an_idler_on_the_other_worker_hears_no_expunge_when_the_master_finishes_a_killed_workers_rename(
        proxy_factory, fleet):
    """Worker a RENAMEs Work across and is SIGKILLed past the commit point, in its wait for the other workers
    to have looked (relocation.seen_within): the master's recovery drained the source at once, and the idler
    on worker b heard ``* n EXPUNGE`` for every message (all still there, in Shared/Work) before its BYE
    (hostile probe 2). The recovery waits as the move would have (relocation.seen_by_another_process)."""
    mail = [f"w-{k}@t" for k in range(40)]
    seed(fleet["b1"], "carol", "Work", mail)
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Shared/*", "backend": "b3"}], workers=2)
    (pid_a, a), (_pid_b, b) = one_on_each(proxy, proxy.pid, "carol").items()
    assert b.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    b.send(b"i IDLE\r\n")
    assert b.line().startswith(b"+ ")
    a.send(b"r RENAME Work Shared/Work\r\n")
    deadline = time.monotonic() + 60
    while (_step(proxy) or "").partition("@")[0] not in ("committed", "subscribed", "placed"):  # past the commit
        assert time.monotonic() < deadline, _step(proxy)
        time.sleep(0.002)
    os.kill(pid_a, signal.SIGKILL)
    said = _rest(b, 6)
    assert b"* BYE " + BYE in said and b" EXPUNGE\r\n" not in said, said
    wait_for(lambda: _step(proxy) is None, "the master finished the move", timeout=60)
    counts, where = census(fleet, "carol")
    assert all(where[m] == [("b3", "Shared/Work")] for m in mail), where
