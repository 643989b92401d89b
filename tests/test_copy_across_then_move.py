"""A MOVE across may not begin while a COPY across of one of its mailboxes is landing.

copywait.py's race (1): a COPY across checked for MOVEs (none), then its APPEND on the destination
was held (Dovecot waiting for the mailbox's dovecot-uidlist lock, held here by the test as
test_rename_move_stalled.HeldLock does for INBOX). A MOVE of the same message to the same mailbox,
begun meanwhile, took the destination's UIDNEXT before the COPY's copy landed and was cut off before
its own commit (journaled at move-appending, hashes recorded, outcome unknown). Recovery found the
COPY's copy above that UIDNEXT, by content, took it for the MOVE's and expunged the source: work-2
once where the COPY (answered OK) and a MOVE that never committed make two. Now a COPY across holds
its mailboxes' copy_lock names (shared) until its copy has landed, and a MOVE across takes its own
exclusively (transfer.move_reservations): the MOVE waits for the COPY. Real Dovecot; census by content.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import LEFT_TO_RECOVER, QUICK_REFUSAL, census, cli, journal_store, merged, seed
from storehelp import now
from test_moves import MASTERS, RULES, _killed_move_data, _no_entries, ids

from referral_proxy.journal import InUse, Step
from referral_proxy.transfer import move_reservations

pytestmark = pytest.mark.usefixtures("clean_mail")


def _held_lock(backend, user: str, mailbox_dir: str):
    """test_rename_move_stalled.HeldLock on the Maildir++ folder *mailbox_dir* (".Shared.Dest")."""
    from test_rename_move_stalled import HeldLock

    lock = HeldLock(backend, user)
    lock.path.unlink()
    lock.root = Path(backend.user_mail_dir(user)) / mailbox_dir
    lock.path = lock.root / "dovecot-uidlist.lock"
    lock.path.write_text(f"{lock.holder.pid}:{__import__('socket').gethostname()}")
    return lock


def _journal_cut_off_move(proxy, data: dict) -> bool:
    """The MOVE of *data* (Work on b1 -> Shared/Dest on b3) journaled as a proxy killed at move-appending
    leaves it, holding what transfer._hold takes; False (nothing written) if its names are held: a
    real MOVE waits then, and reads the destination's UIDNEXT only once it has them."""
    store = journal_store(proxy)
    try:
        held = move_reservations(data["src_mailbox"], data["dst_mailbox"], "/")
        try:
            entry = now(store.begin_move("carol", "move-messages", held, data, None, "/"))
        except InUse:
            return False
        now(store.journal_step(entry, Step.MOVE_APPENDING, data, None))
        return True
    finally:
        now(store.close())


def _session(proxy) -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    return w


def _proxy_and_session(proxy_factory, fleet, wait: dict):
    """Work (b1) with work-0..4, Shared/Dest (b3) empty; a proxy (*wait*: its move_wait_seconds) and a
    session of carol's selecting Work."""
    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    proxy = proxy_factory(merged(MASTERS, LEFT_TO_RECOVER, wait), rules=RULES)
    return proxy, _session(proxy)


def _copy_held(fleet, w: Wire):
    """`c UID COPY 3 Shared/Dest` sent on *w* and held at its commit by Shared/Dest's lock (the lock)."""
    lock = _held_lock(fleet["b3"], "carol", ".Shared.Dest")
    try:
        w.send(b"c UID COPY 3 Shared/Dest\r\n")
        assert lock.stalled_move_linked()  # (the COPY's message waits in tmp/ for the lock)
    except BaseException:
        lock.release()
        raise
    return lock


def _journaled_ops(proxy) -> list[str]:
    store = journal_store(proxy)
    try:
        return sorted(e.op for e in now(store.journal()))
    finally:
        now(store.close())


def test_a_move_cut_off_while_a_copy_across_of_its_message_lands_takes_not_the_copys_copy(proxy_factory, fleet):
    """`UID COPY 3 Shared/Dest` (Work on b1 -> b3) held at its commit by Shared/Dest's lock; a MOVE of
    UID 3 to Shared/Dest cut off at move-appending tries to begin meanwhile. Before: it began, its
    UIDNEXT below the COPY's copy; `recover` took that copy for the MOVE's: work-2 once. Now it cannot
    begin until the COPY is answered; begun then (UIDNEXT above the copy) and cut off, recovery finds
    nothing of its own: work-2 twice, in Work and Shared/Dest."""
    proxy, w = _proxy_and_session(proxy_factory, fleet, QUICK_REFUSAL)
    lock = _copy_held(fleet, w)
    try:
        began_during_copy = _journal_cut_off_move(proxy, _killed_move_data(fleet, "3"))
    finally:
        assert lock.release()
    assert w.until_tagged(b"c")[-1].startswith(b"c OK")
    if not began_during_copy:  # as a real MOVE does: it begins once the COPY let go
        assert _journal_cut_off_move(proxy, _killed_move_data(fleet, "3"))
    w.close()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert sorted(where["work-2@t"]) == [("b1", "Work"), ("b3", "Shared/Dest")], (where["work-2@t"], recovered.stdout)
    assert not began_during_copy
    assert all(counts[m] == 1 for m in ("work-0@t", "work-1@t", "work-3@t", "work-4@t")), counts
    assert _no_entries(proxy)


def test_a_move_across_waits_for_a_copy_across_landing_in_its_destination(proxy_factory, fleet):
    """The same COPY held at its commit; another session's `UID MOVE 4 Shared/Dest` (work-3) waits for
    it (not journaled, its destination's UIDNEXT not read, while the COPY's entry is there), then moves: work-2 in Work and Shared/Dest, work-3 in
    Shared/Dest only; nothing left in the journal."""
    proxy, w = _proxy_and_session(proxy_factory, fleet, {"map": {"move_wait_seconds": 120}})
    mover = _session(proxy)
    lock = _copy_held(fleet, w)
    try:
        mover.send(b"m UID MOVE 4 Shared/Dest\r\n")
        time.sleep(1.5)  # (before: the MOVE journaled at move-appending, its UIDNEXT read, held at the lock too)
        ops = _journaled_ops(proxy)
        assert "move-messages" not in ops and "copy-messages" in ops, ops
    finally:
        assert lock.release()
    assert w.until_tagged(b"c")[-1].startswith(b"c OK")
    assert mover.until_tagged(b"m")[-1].startswith(b"m OK")
    w.close()
    mover.close()
    _counts, where = census(fleet, "carol")
    assert sorted(where["work-2@t"]) == [("b1", "Work"), ("b3", "Shared/Dest")], where["work-2@t"]
    assert where["work-3@t"] == [("b3", "Shared/Dest")], where["work-3@t"]
    assert _no_entries(proxy)


@pytest.mark.parametrize(("first", "second", "clash"), [
    (("Work", "Shared/Dest"), ("Other", "Shared/Dest"), True),   # two MOVEs into one mailbox
    (("Work", "Shared/Dest"), ("Work", "Other"), True),          # two MOVEs from one mailbox
    (("Work", "Shared/Dest"), ("Shared/Dest", "Other"), False),  # out of another's destination: moved_on
    (("Work", "Shared/Dest"), ("INBOX", "Archive/X"), False),    # nothing in common
    (("inbox", "Shared/Dest"), ("INBOX", "Other"), True),         # INBOX in any case
])
def test_which_moves_across_wait_for_each_other(first, second, clash):
    """move_reservations: MOVEs across into one mailbox, or from one, cannot hold their entries at once;
    a MOVE out of another's destination can (test_several_proxies_moved_on: recovery follows that copy)."""
    from referral_proxy.journal import conflicts

    a, b = move_reservations(*first, "/"), move_reservations(*second, "/")
    assert any(conflicts(x, y, "/") for x in a for y in b) is clash


def test_copies_across_do_not_wait_for_each_other_and_a_move_waits_for_them():
    """A COPY across's reservations (transfer._copying: copy_lock names and its mailboxes, shared) clash
    with a MOVE across of either of its mailboxes and a RENAME of either, and with nothing of another COPY's."""
    from referral_proxy.journal import Reservation, conflicts
    from referral_proxy.transfer import copy_reservations

    def copy(src, dst):
        return copy_reservations(src, dst, "/")

    def clash(a, b):
        return any(conflicts(x, y, "/") for x in a for y in b)

    assert not clash(copy("Work", "Shared/Dest"), copy("Work", "Shared/Dest"))
    assert clash(copy("Work", "Shared/Dest"), move_reservations("Other", "Shared/Dest", "/"))
    assert clash(copy("Shared/Dest", "Other"), move_reservations("Work", "Shared/Dest", "/"))
    assert clash(copy("Work", "Archive/X"), move_reservations("Work", "Other", "/"))
    assert not clash(copy("Work", "Archive/X"), move_reservations("INBOX", "Other", "/"))
    # a RENAME's (exclusive, subtree) reservation of either mailbox or a parent is in a COPY's way, both
    # ways: it renamed the destination under the COPY's MULTIAPPEND (test_rename_during_copy_across.py)
    assert clash(copy("Shared/Dest", "Work"), [Reservation("Shared", subtree=True)])
    assert clash(copy("Shared/Dest", "Work"), [Reservation("Work")])
    assert not clash(copy("Shared/Dest", "Work"), [Reservation("Workshop"), Reservation("Shared/Destiny")])


def test_a_copy_across_cut_off_by_a_kill_leaves_an_entry_recover_releases(proxy_factory, fleet):
    """The COPY held at its commit as above, and its proxy SIGKILLed: its entry (op copy-messages, at
    reserved) stays, its owner gone; `recover` releases it, SETTLE seconds after its claim (whether the
    copy landed is Dovecot's, once the lock goes) and a MOVE across of that mailbox then goes through."""
    proxy, w = _proxy_and_session(proxy_factory, fleet, QUICK_REFUSAL)
    lock = _copy_held(fleet, w)
    try:
        proxy.kill()
        assert _journaled_ops(proxy) == ["copy-messages"]
    finally:
        assert lock.release()
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "COPY Work -> Shared/Dest" in recovered.stdout, recovered.stdout
    # (its last byte went: not "nothing was changed", the copy may be there; probe i1 of stop 58)
    assert "released (a COPY never answered" in recovered.stdout, recovered.stdout
    assert _no_entries(proxy)
    again = proxy_factory(merged(MASTERS, LEFT_TO_RECOVER, QUICK_REFUSAL), rules=RULES)
    m = Wire(again.host, again.port, timeout=120)
    m.login("carol")
    assert m.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    assert m.cmd(b"m", b"UID MOVE 4 Shared/Dest")[-1].startswith(b"m OK")
    m.close()
    counts, where = census(fleet, "carol")
    assert where["work-3@t"] == [("b3", "Shared/Dest")], where["work-3@t"]
    assert where["work-2@t"].count(("b1", "Work")) == 1 and counts["work-2@t"] in (1, 2), where["work-2@t"]
