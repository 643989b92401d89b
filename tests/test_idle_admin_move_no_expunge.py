"""A session IDLE in a mailbox the admin `move` takes to another backend must be told BYE before the
move's drain empties the source: it must never hear its messages EXPUNGEd (they are all still in
the mailbox, on the new backend; a client that believes the EXPUNGE drops its copies, as one does
when Dovecot says so). Seen (tests/race_idle_reload42.py, round 42): ``* 3 EXPUNGE``, ``* 2 EXPUNGE``,
``* 1 EXPUNGE``, then ``* BYE Your mail moved to another server`` 0.6 s after the move ended: the
`move` process (another process on the SQLite map) drained INBOX before the proxy's watch, which
looks once a second (relocation.CHECK_SECONDS), had seen it begin; it never waited for it.

On a PostgreSQL map (CI runs this file on one too) the move waits until every proxy has read its entry, and
each said so before its sessions had been looked at (probe m6 of stop 61: 2 of 6 idlers heard it here).

Timing-dependent by nature (the watch's tick against a short move): several short moves, each must
hold. Judged by the idler's own wire and a census of the backends."""

from __future__ import annotations

import threading
import time

import pytest
from imapwire import Wire
from movecheck import census, cli, judge, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def _idle(proxy, box: bytes) -> tuple[Wire, list[bytes], threading.Thread]:
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT " + box)[-1].startswith(b"s OK")
    w.send(b"i IDLE\r\n")
    assert w.line().startswith(b"+ ")
    heard: list[bytes] = []

    def read() -> None:
        try:
            while True:
                heard.append(w.line())
        except (ConnectionError, OSError):
            heard.append(b"(closed)")

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return w, heard, t


def _polling(proxy, box: bytes) -> tuple[Wire, list[bytes], threading.Thread]:
    """A client selected in *box* that sends NOOP every 20 ms (probe m7 of stop 61: such sessions, in the middle
    of a command when the move was seen, heard the drain's EXPUNGEs; 15 of 84)."""
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT " + box)[-1].startswith(b"s OK")
    heard: list[bytes] = []

    def poll() -> None:
        n = 0
        try:
            while not heard or heard[-1] != b"(closed)":
                n += 1
                w.send(b"p%d NOOP\r\n" % n)
                while not heard or not heard[-1].startswith(b"p%d " % n):
                    heard.append(w.line())  # (each line as it comes: a BYE is kept when the close follows it)
                time.sleep(0.02)
        except (ConnectionError, OSError):
            heard.append(b"(closed)")

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return w, heard, t


@pytest.mark.parametrize("client", [_idle, _polling], ids=["idle", "polling"])
@pytest.mark.parametrize("box", ["INBOX", "Work"])
def test_an_idler_never_hears_its_mail_expunged_by_an_admin_move(proxy_factory, fleet, box, client):
    mail = [f"m-{i}@t" for i in range(3)]
    seed(fleet["b1"], "carol", box, mail)
    proxy = proxy_factory(MASTERS)
    where, bad = "b1", []
    for rnd in range(6):
        to = "b2" if where == "b1" else "b1"
        w, heard, t = client(proxy, box.encode())
        moved = cli("move", "--config", str(proxy.config_path), "carol", box, to)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        where = to
        t.join(15)  # closed by the BYE
        w.close()
        t.join(5)
        assert any(line.startswith(b"* BYE") for line in heard), (rnd, heard)
        expunged = [line for line in heard if line.endswith(b" EXPUNGE\r\n")]
        if expunged:
            bad.append((rnd, heard))
        time.sleep(0.3 * (rnd % 3))  # another phase of the proxy's watch
    counts, places = census(fleet, "carol")
    assert judge(counts, mail) == ([], []), places
    assert not bad, f"{len(bad)} of 6 idlers heard their mail expunged: {bad[:2]}"
