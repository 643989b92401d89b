"""Nine DELETEs of one placed mailbox at once, through two proxies of two workers each on one SQLite map.

A DELETE of a placed mailbox holds its name, waits for the other processes to see the hold (1.25 s on SQLite:
relocation.seen_within), sends the DELETE, unplaces. The others wait the hold out (holds.WAIT, 3 s) and are routed
again. On main each of them, though the placement was gone by then, waited its own 1.25 s in turn: the fourth in
line waited past 3 s and was told `NO [INUSE] Mailbox is being moved to another server` (Dovecot, one DELETE after
the other: one OK, then NONEXISTENT; probe k3 of stop 59, F4). Now a DELETE whose placement another removed
meanwhile does not wait. One of those that waited, seeing the name free, looked again as another process took it:
refused INUSE (tests/test_hold_race_unit.py); it waits for that holder too.
"""

from __future__ import annotations

import threading

import pytest
from imapwire import Wire
from movecheck import census, cli, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")
N = 9  # DELETEs at once


def test_deletes_of_a_placed_mailbox_at_once_get_one_ok_and_nonexistent(proxy_factory, fleet, tmp_path):
    seed(fleet["b1"], "carol", "Box", ["many-a", "many-b"])
    masters = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}
    config = {"backends": masters, "map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}, "proxy": {"workers": 2}}
    proxies = [proxy_factory(config, rules=[{"mailbox": "Q/*", "backend": "b2"}]) for _ in range(2)]
    moved = cli("move", "--config", str(proxies[0].config_path), "carol", "Box", "b2", timeout=300)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    wires = [Wire(proxies[i % 2].host, proxies[i % 2].port, timeout=60) for i in range(N)]
    for w in wires:
        w.login("carol")
    answers: dict[int, bytes] = {}
    start = threading.Barrier(N)

    def delete(i: int) -> None:
        start.wait()
        answers[i] = wires[i].cmd(b"d%d" % i, b"DELETE Box")[-1]

    threads = [threading.Thread(target=delete, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    said = " | ".join(f"{i}: {answers.get(i, b'(none)')!r}" for i in range(N))  # (a dict's repr is cut short)
    texts = sorted(a.split(b" ", 1)[1].split(b" (")[0] for a in answers.values())
    assert len(texts) == N and texts[-1].startswith(b"OK"), said
    assert all(t.startswith(b"NO [NONEXISTENT]") for t in texts[:-1]), said  # main: NO [INUSE] after 3.1 s
    for w in wires:
        w.close()
    counts, _where = census(fleet, "carol")
    assert counts["many-a"] == counts["many-b"] == 0  # deleted with Box
