"""A mailbox move's batch found by content after a kill may be another client's own message (mover._find_pending).

A batch's MULTIAPPEND cut off with its outcome unknown (its hashes journaled, no APPENDUID):
recovery looks for its copies by content above the UIDNEXT recorded before it. Before recovery
another client (straight to the backends, as a command under way when the move began would)
moved the very source message to the destination itself. Taken for the batch's copy, it was
expunged by the roll-back, or (past the commit point) recorded as copied and then taken back
as a copy whose source someone else took away: the message was nowhere. As for a MOVE of
messages (movefinish, 778dc35), a copy found by content whose source is gone is now taken for
the move's only if another message of its content is somewhere the user sees.
Judged by a census of the backends (movecheck.py).
"""

from __future__ import annotations

import pytest
from movecheck import LEFT_TO_RECOVER, census, cli, deliver, faulty, journal_store, seed
from storehelp import now
from test_moves import MASTERS, RULES, _copy_directly, _exactly_once, _hashes, _no_entries, _state, ids

from referral_proxy.journal import Reservation, Step

pytestmark = pytest.mark.usefixtures("clean_mail")

GONE = "gone.example:1:1"  # the owner of an entry whose process is gone


def _client_takes(fleet, box: str, uid: str, to: tuple[str, str] | None) -> None:
    """Another client, straight to the backends: b1's *box* UID *uid* moved *to* (backend, mailbox) as
    RFC 3501 has it (appended there, expunged here), or just expunged (*to* None)."""
    if to is not None:
        if to[0] == "b1":
            with fleet["b1"].client("carol") as m:
                m.create(to[1])
        _copy_directly(fleet, "b1", box, to[0], to[1], uid)
    with fleet["b1"].client("carol") as m:
        m.select(box)
        assert m.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert m.uid("EXPUNGE", uid)[0] == "OK"


@pytest.mark.parametrize("committed", [False, True])
def test_a_message_a_client_moved_to_the_destination_is_not_rolled_back_as_the_batchs_copy(proxy_factory, fleet,
                                                                                          committed):
    """RENAME Work Shared/Work killed in its first batch, the MULTIAPPEND's outcome unknown. Not
    committed: a client moves work-2 to Shared/Work itself; the roll-back took it for the batch's
    copy and expunged it (lost on main). Committed: the client moves work-2 on within b1; its copy
    at the destination is the batch's, and goes with the roll-back."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Work", [])  # made by the move (journaled as created)
    proxy = proxy_factory(MASTERS, rules=RULES)
    validity, uidnext = _state(fleet["b3"], "Shared/Work")
    hashes = _hashes(fleet["b1"], "Work", "1:5")
    if committed:
        _copy_directly(fleet, "b1", "Work", "b3", "Shared/Work", "1:5")
    store = journal_store(proxy)
    data = {"src": "b1", "dst": "b3", "old": "Work", "new": "Shared/Work", "token": "t0",
            "pairs": [["Work", "Shared/Work"]], "created": [0], "validity": {"0": _state(fleet["b1"], "Work")[0]},
            "batches": [], "pending": {"pair": 0, "src": "1:5", "validity": validity, "uidnext": uidnext,
                                       "hashes": hashes},
            "aside": [], "drained": [], "settled": {}}
    held = [Reservation("Work"), Reservation("referral-proxy-aside-t0"), Reservation("Shared/Work")]
    entry = now(store.begin_move("carol", "move", held, data, GONE, "/"))
    now(store.journal_step(entry, Step.COPYING, data, GONE))
    now(store.disown(entry, GONE))
    now(store.close())
    _client_takes(fleet, "Work", "3", ("b1", "Other") if committed else ("b3", "Shared/Work"))
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    _exactly_once(fleet, proxy, "carol", work)
    counts, where = census(fleet, "carol")
    assert where[work[2]] == [("b1", "Other") if committed else ("b3", "Shared/Work")]
    assert {where[i][0] for i in work[:2] + work[3:]} == {("b1", "Work")}
    assert _no_entries(proxy)


@pytest.mark.parametrize("then", ["moved there", "committed, moved on", "committed, expunged"])
def test_a_message_a_client_moved_to_the_destination_is_not_taken_for_the_delta_batchs_copy(proxy_factory, fleet,
                                                                                           then):
    """`move carol Work b3` past its commit point; late@t reached the source meanwhile and its delta
    batch was cut off, the MULTIAPPEND's outcome unknown. Not committed, a client moves late@t to
    b3's Work itself: recovery recorded that message as the batch's copy, found its source gone
    and took the "copy" back (lost on main). Committed, the client moves late@t on within b1 (its
    copy is taken back: it is once, where the client put it), or expunges it (its copy, found by
    content, is not told from the client's own: it stays, never lost)."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    config = str(proxy.config_path)
    killed = cli("move", "--config", config, "carol", "Work", "b3", command=faulty("--kill-at", "placed:1"))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert deliver(fleet["b1"], "carol", "Work", "late@t") == "Work"
    validity, uidnext = _state(fleet["b3"], "Work")
    hashes = _hashes(fleet["b1"], "Work", "6")
    if then.startswith("committed"):
        _copy_directly(fleet, "b1", "Work", "b3", "Work", "6")
    store = journal_store(proxy)
    try:
        (entry,) = now(store.journal())
        data = entry.data
        data["pending"] = {"pair": 0, "src": "6", "validity": validity, "uidnext": uidnext, "hashes": hashes}
        now(store.journal_step(entry.id, Step.DELTA_COPYING, data, entry.owner))
        if entry.owner is not None:
            now(store.disown(entry.id, entry.owner))
    finally:
        now(store.close())
    _client_takes(fleet, "Work", "6", {"moved there": ("b3", "Work"), "committed, moved on": ("b1", "Other"),
                                      "committed, expunged": None}[then])
    recovered = cli("recover", "--config", config)
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    late = ["late@t"] if then != "committed, expunged" else []
    _exactly_once(fleet, proxy, "carol", work + late, may=["late@t"])
    counts, where = census(fleet, "carol")
    if then != "committed, expunged":
        assert where["late@t"] == [("b1", "Other") if then == "committed, moved on" else ("b3", "Work")]
    assert {where[i][0] for i in work} == {("b3", "Work")}
    assert _no_entries(proxy)
