"""The loser of two RENAMEs (or of a RENAME and a DELETE) of one placed mailbox is told what Dovecot tells it.

Probe k3 of stop 59 (60 of 60 through the proxy; Dovecot direct: NONEXISTENT 20 of 20): Box placed on b2 (an
admin move), two sessions `RENAME Box Q/Box` and `RENAME Box Q/Box2` (Q/* is b2's: both RENAMEs on b2). Both were
routed to b2 before either held the names; the winner renamed Box and its placement followed the new name, so
Box routed to b1 by the default when the loser looked again: told `NO [INUSE] Mailbox was moved to another server
meanwhile`, though nothing moved. Now it is asked where the name goes now: absent there, the answer is Dovecot's
`NO [NONEXISTENT]`. Both are routed before either holds the names by holding the SQLite map's write lock a moment
from here (probe k3's way). Real Dovecot; judged by census.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
from imapwire import Wire
from movecheck import census, cli, judge, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("box, first, second", [
    ("Box", b"RENAME Box Q/Box", b"RENAME Box Q/Box2"),
    ("Box", b"DELETE Box", b"RENAME Box Q/Box"),
    ("Caf&AOk-", b"RENAME Caf&AOk- Q/Box", b"RENAME Caf&AOk- Q/Box2"),  # named as Dovecot names it: decoded
    # Box made anew on b1 (the default) right after the DELETE, before the RENAME looks again: no move put it
    # there; main said "moved to another server meanwhile" (probe l5 F1, 6 of 6), a retry renaming the new one
    ("Box", (b"DELETE Box", b"CREATE Box"), b"RENAME Box Q/Box"),
], ids=["rename-rename", "delete-rename", "rename-rename-mutf7", "delete-create-rename"])
def test_the_loser_of_a_race_for_a_placed_mailbox_gets_nonexistent(proxy_factory, fleet, box, first, second):
    if os.environ.get("RP_TEST_STORE") == "postgresql":
        pytest.skip("the race is lined up through the SQLite map's write lock")
    seed(fleet["b1"], "carol", box, ["k3-a", "k3-b"])
    masters = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}
    proxy = proxy_factory({"backends": masters}, rules=[{"mailbox": "Q/*", "backend": "b2"}])
    moved = cli("move", "--config", str(proxy.config_path), "carol", box, "b2", timeout=300)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    wires = [Wire(proxy.host, proxy.port, timeout=60) for _ in range(2)]
    for w in wires:
        w.login("carol")
    answers: dict[int, bytes] = {}

    def run(i: int, line: bytes | tuple[bytes, bytes]) -> None:
        if isinstance(line, tuple):  # pipelined: the second right after the first's answer
            wires[i].send(b"x%d %s\r\ny%d %s\r\n" % (i, line[0], i, line[1]))
            answers[i] = wires[i].until_tagged(b"x%d" % i)[-1]
            answers[i + 2] = wires[i].until_tagged(b"y%d" % i)[-1]
        else:
            answers[i] = wires[i].cmd(b"x%d" % i, line)[-1]

    db = sqlite3.connect(proxy.workdir / "map.sqlite3", isolation_level=None, timeout=10)
    db.execute("BEGIN IMMEDIATE")  # neither can hold the names yet: both are routed to b2 first
    try:
        threads = [threading.Thread(target=run, args=(i, line)) for i, line in enumerate([first, second])]
        for t in threads:
            t.start()
            time.sleep(0.05)  # not a measurement: the first is first
        time.sleep(1.0)  # not a measurement: both routed, both waiting for the lock
    finally:
        db.execute("ROLLBACK")
        db.close()
    for t in threads:
        t.join(60)
    won = [i for i in (0, 1) if answers[i].startswith(b"x%d OK" % i)]
    assert len(won) == 1, answers
    lost = answers[1 - won[0]]
    assert lost.startswith(b"x%d NO [NONEXISTENT]" % (1 - won[0])), answers  # main: NO [INUSE] ... moved meanwhile
    if box != "Box":
        assert lost.rstrip().endswith(": Caf\xc3\xa9".encode("latin-1")), lost
    for w in wires:
        w.close()
    if isinstance(first, tuple):
        assert answers[2].startswith(b"y0 OK"), answers  # the CREATE
    counts, where = census(fleet, "carol")
    if (isinstance(first, tuple) or first.startswith(b"DELETE")) and won == [0]:
        assert counts["k3-a"] == counts["k3-b"] == 0  # deleted with Box, as Dovecot does
    else:
        assert judge(counts, ["k3-a", "k3-b"]) == ([], []), dict(where)
