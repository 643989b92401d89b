"""A MOVE across while another session keeps clearing the sources' \\Deleted (a client's flag resync).

Probe r3 (stop 50): the MOVE flags its sources \\Deleted and expunges them; a STORE that took the flag
away between was read as "no right to set it", the copies were taken back, and the client was told
``OK No messages moved (they were gone)`` with all 300 still in the source (or ``OK Move completed`` with
half of them). Now the flag is set again (up to transfer.MARK_TRIES times, the last STORE and the UID
EXPUNGE in one write) and what cannot be moved is said: OK means every message is at the destination and
none at the source; NO [INUSE] means nothing moved; NO [COPYUID ...] "will be retried" leaves recovery to
finish it. Judged by the backends' census, by content, right after each answer and at the end.
"""

from __future__ import annotations

import threading
import time

from imapwire import Wire
from movecheck import census, seed
from test_moves import MASTERS

N = 120
ROUNDS = 4


def _storm(fleet, proxy, box: str, via_proxy: bool, stop: threading.Event) -> None:
    w = Wire(proxy.host, proxy.port) if via_proxy else Wire(fleet["b1"].host, fleet["b1"].port)
    w.login("alice")
    w.cmd(b"s", b"SELECT " + box.encode())
    while not stop.is_set():
        w.cmd(b"t", b"UID STORE 1:* -FLAGS.SILENT (\\Deleted)")
    w.close()


def test_a_move_across_under_a_deleted_flag_storm_says_what_it_moved(fleet, clean_mail, proxy_factory):
    # (master users: a move left to recovery, "will be retried", is finished by it; without them never)
    proxy = proxy_factory(MASTERS, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    everything = []
    for r in range(ROUNDS):
        src, dst = f"Src{r}", f"Shared/Dst{r}"
        ids = [f"storm{r}-{i}@t" for i in range(N)]
        everything += ids
        seed(fleet["b1"], "alice", src, ids, size=3000)
        with fleet["b3"].client("alice") as m:
            m.create(dst)
        stop = threading.Event()
        storm = threading.Thread(target=_storm, args=(fleet, proxy, src, r % 2 == 1, stop))
        storm.start()
        time.sleep(0.2)
        w = Wire(proxy.host, proxy.port)
        w.login("alice")
        w.cmd(b"s", b"SELECT " + src.encode())
        answer = w.cmd(b"m", b"UID MOVE 1:* " + dst.encode())[-1]
        w.close()
        stop.set()
        storm.join()
        _counts, where = census(fleet, "alice")
        at_src = [i for i in ids if ("b1", src) in where.get(i, [])]
        at_dst = [i for i in ids if ("b3", dst) in where.get(i, [])]
        if answer.startswith(b"m OK"):
            assert (len(at_src), len(at_dst)) == (0, N), (answer, len(at_src), len(at_dst))
        elif answer.startswith(b"m NO [INUSE]"):
            assert (len(at_src), len(at_dst)) == (N, 0), (answer, len(at_src), len(at_dst))
        else:
            assert answer.startswith(b"m NO [COPYUID ") and b"will be retried" in answer, answer
    deadline = time.monotonic() + 90  # a move left to recovery: finished within its sweep
    while True:
        counts, _where = census(fleet, "alice")
        wrong = {i: counts[i] for i in everything if counts[i] != 1}
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert wrong == {}
