"""A MOVE across while another session keeps clearing the sources' \\Deleted (a client's flag resync).

Probe r3 (stop 50): the MOVE flags its sources \\Deleted and expunges them; a STORE that took the flag
away between was read as "no right to set it", the copies were taken back, and the client was told
``OK No messages moved (they were gone)`` with all 300 still in the source (or ``OK Move completed`` with
half of them). Now the flag is set again (up to transfer.MARK_TRIES times, the last STORE and the UID
EXPUNGE in one write) and what cannot be moved is said: OK means every message is at the destination and
none at the source; NO [INUSE] means those still in the source were not moved: each message is in one of
the two, never both. (An expunge that kept some after its tries was answered NO [COPYUID ...] "will be
retried", recovery to finish it: without master users never, the messages at both ends; CI of c4e7b6e.)
Judged by the backends' census, by content, right after each answer and at the end.
"""

from __future__ import annotations

import threading
import time

from imapwire import Wire
from movecheck import census, seed

from referral_proxy.imap.uidset import expand_uid_set

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
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}])  # (no master user: nothing left to recovery)
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
        reply = w.cmd(b"m", b"UID MOVE 1:* " + dst.encode())
        answer = reply[-1]
        w.close()
        stop.set()
        storm.join()
        _counts, where = census(fleet, "alice")
        at_src = [i for i in ids if ("b1", src) in where.get(i, [])]
        at_dst = [i for i in ids if ("b3", dst) in where.get(i, [])]
        assert answer.startswith((b"m OK", b"m NO [INUSE]")), answer
        if answer.startswith(b"m OK"):
            assert (len(at_src), len(at_dst)) == (0, N), (answer, len(at_src), len(at_dst))
        assert len(at_src) + len(at_dst) == N and not set(at_src) & set(at_dst), (answer, len(at_src), len(at_dst))
        # the client is told what moved: an EXPUNGE each, and a COPYUID naming as many
        assert sum(line.endswith(b" EXPUNGE\r\n") for line in reply) == len(at_dst), (answer, len(at_dst))
        copyuids = [line.split()[4] for line in reply if line.startswith(b"* OK [COPYUID ")]
        assert sum(len(expand_uid_set(c)) for c in copyuids) == len(at_dst), (copyuids, len(at_dst))
    counts, _where = census(fleet, "alice")
    assert {i: counts[i] for i in everything if counts[i] != 1} == {}
