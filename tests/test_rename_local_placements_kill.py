"""A RENAME on one backend whose renamed mailboxes were placed by name (an admin move put them there):
the placements follow the new names, and a proxy killed amid that leaves nothing for the recovery to
miss. Helper probe B (this stop): Proj and 40 children moved to b2 (each placed), ``map set bob Zed b2``,
``RENAME Proj Zed``, the proxy SIGKILLed 60-90 ms in: in 4 of 10 rounds one child (Zed/c10) had no
placement after the start-up recovery, so the proxy sent its name to b1 and the mail there was out
of every client's reach. The follow did "unplace old, place new" child by child, and the recovery
looked for the old names still placed: one killed between its two writes was placed nowhere.

A kill is a store write that fails here (no later write of this process happens, as after SIGKILL);
the recovery is localrename.reconcile_local on the entry as the store kept it."""

from __future__ import annotations

import pytest
from twisted.internet.defer import ensureDeferred

from referral_proxy import localrename
from referral_proxy.config import MapConfig
from referral_proxy.journal import Reservation, Step
from referral_proxy.routing import MailboxMap
from referral_proxy.store import MemoryStore

CHILDREN = [f"Proj/c{i}" for i in range(6)]


class Killed(Exception):
    """The process died here: the write was not done, nor anything after it."""


def _settled(coroutine):
    result: list = []
    ensureDeferred(coroutine).addBoth(result.append)
    assert result, "it waited"
    return result[0]


class _Conn:
    """The backend the RENAME ran on: it renamed (the tree is under the new name now)."""

    name = "b2"
    renaming = 0


def _placed_map() -> MailboxMap:
    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    for name in ["Proj", *CHILDREN, "Zed", "Other"]:
        _settled(mailbox_map.place("bob", name, ["b2"]))
    return mailbox_map


def _entry(mailbox_map: MailboxMap, old: str = "Proj", new: str = "Zed"):
    entry = _settled(mailbox_map.begin_move("bob", "rename-local", [Reservation(old, subtree=True), Reservation(new)],
                                            {"backend": "b2", "old": old, "new": new}))
    entry.data["follow"] = localrename._placements_to_follow(mailbox_map, "bob", "b2", old, new)
    _settled(mailbox_map.step(entry, Step.RENAMING))
    return entry


@pytest.mark.parametrize("writes", range(1, 2 * len(CHILDREN) + 3))
def test_a_kill_at_any_write_of_the_follow_leaves_every_renamed_mailbox_placed_after_recovery(monkeypatch, writes):
    mailbox_map = _placed_map()
    entry = _entry(mailbox_map)
    done = [0]
    for method in ("place", "unplace"):
        real = getattr(mailbox_map, method)

        async def dying(*args, _real=real):
            done[0] += 1
            if done[0] >= writes:
                raise Killed()
            return await _real(*args)

        monkeypatch.setattr(mailbox_map, method, dying)
    outcome = _settled(localrename._follow_placements(mailbox_map, "bob", entry.data["follow"]))
    killed = hasattr(outcome, "check") and outcome.check(Killed)
    monkeypatch.undo()

    async def renamed_there(_conn, name):
        return name.startswith("Zed")

    monkeypatch.setattr(localrename, "exists", renamed_there)
    again = MailboxMap(MapConfig(default="b1"), mailbox_map.store)  # the proxy started again on the same store
    _settled(again.open())
    assert _settled(localrename.reconcile_local(again, _settled(again.entries())[0], _Conn())) == "renamed: placements follow"
    placed = again.placements("bob")
    assert placed == {"Zed": ("b2",), "Other": ("b2",), **{"Zed" + c[4:]: ("b2",) for c in CHILDREN}}, (killed, placed)
    assert not _settled(again.entries())


def test_renaming_into_its_own_parent_keeps_the_names_that_are_both_old_and_new():
    """``RENAME A/B A`` (A not there: Dovecot's maildir takes it): A/B/B becomes A/B, a name that is also
    an old one; it must stay placed, whatever order the placements are read in."""
    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    for name in ["A/B/B", "A/B", "A/B/C"]:
        _settled(mailbox_map.place("bob", name, ["b2"]))
    entry = _entry(mailbox_map, "A/B", "A")
    _settled(localrename._follow_placements(mailbox_map, "bob", entry.data["follow"]))
    assert mailbox_map.placements("bob") == {"A": ("b2",), "A/B": ("b2",), "A/C": ("b2",)}
