"""dup21a (soak A, seed 53157): the stalled MOVE of dup20a again, its source renamed WITHIN b1 and its
parent then moved to b3 and back by the admin: the message twice on ONE backend, Dovecot's doing.

The soak's story (history.txt, proxy.log, b1's dovecot.log of the run): b1 SIGKILLed; 0.57 s later
c1's ``UID MOVE`` of o-Work-39 from Proj to INBOX (both on b1: relayed as it is) got no answer before
a proxy worker and then the proxy were killed (1.0 and 1.5 s later). 2.6 s after it,
``RENAME Proj Work/c`` (both on b1: relayed, Dovecot's own rename) answered OK; then the admin moved
Work (Work and Work/c) to b3 and back to b1, o-Work-39 still in Work/c. The census found the message
in b1's Work/c AND b1's INBOX. b1's dovecot.log shows the MOVE's imap process (proxy session 222's
b1 connection, pid 22022: c1's session since b1's restart; its one relayed UID MOVE is this one)
closing at 00:56:05, with every other process that waited ~120 s on INBOX's lock (APPENDs "running
for 120.5 s, in locks"), as ``Connection closed (UID MOVE finished 120.574 secs ago)``: Dovecot's
clock stops in a blocking lock wait, so a MOVE that stalled from its start and committed at the
lock's release logs exactly that (the test below leaves ``UID MOVE finished 3.472 secs ago`` after
a 3.5 s stall). So the stalled MOVE committed into INBOX two minutes after its client was gone and
long after its source had been renamed and carried away and back.

So the cause is dup20a's (tests/test_rename_move_stalled.py): Dovecot's MOVE links the message into
the destination, waits on the destination's dovecot-uidlist lock, and expunges the source only after
that; it does not notice its client left. Here with the lock held by the test (as the killed
Dovecot's lock acts until it is stale): the proxy killed during the stall, a new one relays
``RENAME Proj Work/c`` and the admin moves Work out and back; the message is in Work/c and INBOX --
what Dovecot alone leaves after its own ``RENAME Proj Work/c`` -- never nowhere, every other message
once. The soak's judge on main since dup20a (Ledger.backend_died(lost=True): a MOVE whose answer was
lost up to LOCK_STALL after a backend kill may leave a second copy) allows it; checked in
tests/test_moves_soak.py with this run's own times.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import census, cli, seed
from test_moves import MASTERS, RULES, _no_entries
from test_rename_move_stalled import HeldLock, _stalled_move

pytestmark = pytest.mark.usefixtures("clean_mail")


def _seed(fleet) -> HeldLock:
    seed(fleet["b1"], "carol", "INBOX", ["in-1@t"])
    seed(fleet["b1"], "carol", "Proj", ["proj-1@t", "proj-2@t"])
    seed(fleet["b1"], "carol", "Work", ["work-1@t"])
    return HeldLock(fleet["b1"], "carol")


def _expected(where: dict) -> None:
    assert sorted(where["proj-1@t"]) == [("b1", "INBOX"), ("b1", "Work/c")], where
    assert where["proj-2@t"] == [("b1", "Work/c")], where
    assert where["work-1@t"] == [("b1", "Work")] and where["in-1@t"] == [("b1", "INBOX")], where


def test_dovecot_alone_leaves_a_stalled_move_twice_after_renaming_its_source_within(fleet):
    """The reference: no proxy, Dovecot's own ``RENAME Proj Work/c`` during the stall: two copies on b1."""
    lock = _seed(fleet)
    try:
        w = _stalled_move(fleet["b1"].host, fleet["b1"].port, b"Proj")
        assert lock.stalled_move_linked()
        w.close()
        with fleet["b1"].client("carol") as m:
            assert m.rename('"Proj"', '"Work/c"')[0] == "OK"
    finally:
        assert lock.release()
    _expected(census(fleet, "carol")[1])


@pytest.mark.parametrize("admin", ["rename", "rename+admin-out-and-back"])
def test_proxy_relayed_rename_and_admin_moves_after_a_stalled_move_leave_what_dovecot_alone_leaves(
        proxy_factory, fleet, admin):
    """As in the soak: the relayed MOVE stalls, the proxy is killed; a new proxy relays
    ``RENAME Proj Work/c`` and (second case) the admin moves Work to b3 and back to b1 before the
    lock goes. The message is where Dovecot alone leaves it: Work/c and INBOX, both on b1."""
    lock = _seed(fleet)
    try:
        relay = proxy_factory(MASTERS, rules=RULES)
        w = _stalled_move(relay.host, relay.port, b"Proj")
        assert lock.stalled_move_linked()
        relay.kill()
        w.close()
        proxy = proxy_factory(MASTERS, rules=RULES)
        r = Wire(proxy.host, proxy.port, timeout=120)
        r.login("carol")
        assert r.cmd(b"r", b"RENAME Proj Work/c")[-1].startswith(b"r OK")
        if admin != "rename":
            for to in ("b3", "b1"):
                moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", to, timeout=300)
                assert moved.returncode == 0, moved.stdout + moved.stderr
    finally:
        assert lock.release()
    _expected(census(fleet, "carol")[1])
    assert not os.listdir(Path(fleet["b1"].user_mail_dir("carol")) / "tmp")
    assert _no_entries(proxy)


def test_the_soak_allows_the_runs_second_copy():
    """The judge on main since dup20a, fed seed 53157's own times (history.txt): KILL b1 at 41690.668,
    c1's MOVE of o-Work-39 sent at 41691.242 and its connection cut (a worker kill at 41692.267, the
    proxy's at 41692.793; c1 back at 41693.749): one more copy allowed, the census finding its copies
    on b1, the backend killed. main f159e89's judge (a kill counted only from the MOVE's own start)
    allowed none: the run's verdict, "duplicated 1". Narrowed: copies found only on other backends
    than the one killed before the MOVE are allowed nothing (the stall is on the killed one's lock)."""
    import time

    from soak import Ledger

    def judged(where: dict) -> dict:
        now = time.monotonic()
        ledger = Ledger()
        ledger.history.append((now - (41693.749 - 41690.668), -1, "KILL b1"))
        ledger.backend_died("o-Work-39@soak", now - (41693.749 - 41691.242), lost=True)
        ledger.settle(where)
        return dict(ledger.copies_maybe)

    assert judged({"o-Work-39@soak": [("b1", "Work/c"), ("b1", "INBOX")]}) == {"o-Work-39@soak": 1}
    assert judged({"o-Work-39@soak": [("b3", "Shared/B"), ("b1", "INBOX")]}) == {"o-Work-39@soak": 1}  # 49164's
    assert judged({"o-Work-39@soak": [("b3", "Shared/B"), ("b2", "Archive")]}) == {}
