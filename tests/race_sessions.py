"""Two sessions of one proxy racing on the same mailboxes across servers (attack8).

Not collected by the suite (none of these found anything on main; ~4 min): run it by name,
``python3 -m pytest tests/race_sessions.py``. Each race starts both commands at the same
instant (a barrier), several times, the second one a little later each time; it is judged
only by a census of the backends (movecheck.py): every message that must survive exactly
once, one a client took away (EXPUNGE, DELETE) at most once.
"""

from __future__ import annotations

import threading
import time

import pytest
from imapwire import Wire, at_once
from movecheck import body, census, judge, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
ROUNDS = 3

# name: (mailbox each session selects first or None, command A, command B, what may vanish:
# "" nothing, "work" Work's messages (B took them away), "copies": a COPY's copies, at most once).
# A command's own SELECT first: "s SELECT Work\r\n" before it, sent in the same write.
RACES = {
    "two moves of the same uids to two backends": (b"Work", b"UID MOVE 1:40 Shared/Dest", b"UID MOVE 1:40 Archive/Dest", ""),
    "move across and a move on the source's backend": (b"Work", b"UID MOVE 1:40 Shared/Dest", b"UID MOVE 10:30 Other", ""),
    "move across and expunge": (b"Work", b"UID MOVE 1:40 Shared/Dest", b"UID EXPUNGE 1:40", "work"),
    "copy across and a move on the source's backend": (b"Work", b"UID COPY 1:40 Shared/Dest", b"UID MOVE 10:30 Other", "copies"),
    "copy across and delete the source": (None, b"s SELECT Work\r\nz UID COPY 1:40 Shared/Dest", b"DELETE Work", "work"),
    "move across and delete the source": (None, b"s SELECT Work\r\nz UID MOVE 1:40 Shared/Dest", b"DELETE Work", "work"),
    "move across and delete the destination": (b"Work", b"UID MOVE 1:40 Shared/Dest", b"DELETE Shared/Dest", "work"),
    "move across and rename the source on its backend": (b"Work", b"UID MOVE 1:40 Shared/Dest", b"RENAME Work Work2", ""),
    "rename across to two backends": (None, b"RENAME Work Shared/W1", b"RENAME Work Archive/W2", ""),
    "two renames across to one name": (None, b"RENAME Work Shared/W1", b"RENAME Other Shared/W1", ""),
    "rename across and create the new name's child there": (None, b"RENAME Work Shared/W1", b"CREATE Shared/W1/x", ""),
    "rename across and create the new name there": (None, b"RENAME Work Shared/W1", b"CREATE Shared/W1", ""),
    "rename across and unsubscribe": (None, b"RENAME Work Shared/W1", b"UNSUBSCRIBE Work", ""),
}


def _seeded(fleet, k: int, deleted: bool) -> tuple[list[str], list[str]]:
    work, other = [f"work-{k}-{i}@t" for i in range(40)], [f"other-{k}-{i}@t" for i in range(10)]
    seed(fleet["b1"], "carol", "Work", work, size=20000)
    seed(fleet["b1"], "carol", "Other", other, size=20000)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    seed(fleet["b2"], "carol", "Archive/Dest", [])
    with fleet["b1"].client("carol") as m:
        m.subscribe("Work")
        if deleted:  # for UID EXPUNGE
            m.select("Work")
            m.uid("STORE", "1:40", "+FLAGS.SILENT", "(\\Deleted)")
    return work, other


def _session(proxy, select: bytes | None) -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=180)
    w.login("carol")
    if select is not None:
        assert w.cmd(b"s", b"SELECT " + select)[-1].startswith(b"s OK")
    return w


@pytest.mark.parametrize("race", sorted(RACES))
def test_two_sessions_at_once(proxy_factory, fleet, race):
    select, a, b, vanish = RACES[race]
    proxy = proxy_factory(MASTERS, rules=RULES)
    for k in range(ROUNDS):
        if k:
            fleet.reset_mail("carol")
        work, other = _seeded(fleet, k, b"EXPUNGE" in b)
        wires = [_session(proxy, select), _session(proxy, select)]
        later = b"n NOOP\r\n" * k + b"z " + b + b"\r\n"  # the second one k NOOPs' round trips later
        first = a + b"\r\n" if a.startswith(b"s SELECT") else b"z " + a + b"\r\n"
        answers = at_once(wires, [first, later], [b"z", b"z"])
        for w in wires:
            w.close()
        counts, where = census(fleet, "carol")
        if vanish == "copies":  # a COPY: the source stays whole, each copy at most once more
            assert [i for i in work + other if not 1 <= counts[i] <= 2] == [], (answers, dict(where))
            continue
        must, may = (other, work) if vanish else (work + other, [])
        assert judge(counts, must, may) == ([], []), (answers, dict(where))


@pytest.mark.parametrize("change", [b"RENAME Work Shared/W1", b"RENAME Work Archive/R", b"DELETE Work"])
@pytest.mark.parametrize("box", [b"Work", b"Shared/Work"])
def test_an_append_sent_in_pieces_while_another_session_moves_or_deletes_its_mailbox(proxy_factory, fleet, change, box):
    """The message's first half sent, then the other session's command, then the rest: an APPEND
    answered OK has its message where the mailbox went (or gone with a DELETE after it)."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    change = change.replace(b"Work", box, 1)
    for k, delay in enumerate((0.0, 0.3, 1.5)):
        if k:
            fleet.reset_mail("carol")
        old = [f"old-{k}-{i}@t" for i in range(40)]
        seed(fleet["b3" if box.startswith(b"Shared/") else "b1"], "carol", box.decode(), old, size=20000)
        writer, other = _session(proxy, box), _session(proxy, None)
        new = f"new-{k}@t"
        message = body(new, 3000)
        writer.send(b"p APPEND %s {%d}\r\n" % (box, len(message)))
        assert writer.line().startswith(b"+")
        writer.send(message[:1000])
        changed = threading.Thread(target=other.cmd, args=(b"r", change))
        changed.start()
        time.sleep(delay)  # not judged: only where the rest arrives
        writer.send(message[1000:] + b"\r\n")
        appended = writer.until_tagged(b"p")[-1].startswith(b"p OK")
        changed.join(180)
        counts, where = census(fleet, "carol")
        deleted = change.startswith(b"DELETE") and not counts[old[0]]
        must = [] if deleted else old + ([new] if appended else [])
        assert judge(counts, must, [new] + old) == ([], []), (appended, dict(where))
        for w in (writer, other):
            w.close()
