"""moveview.py without a backend: which backend shows each name at each step, and that a LIST
reads the journal only while a mailbox move holds a name of its user."""

from __future__ import annotations

import pytest
from storehelp import now

from referral_proxy.config import MapConfig
from referral_proxy.journal import Reservation, Step
from referral_proxy.moveview import HIDDEN, move_view
from referral_proxy.routing import MailboxMap
from referral_proxy.store import MemoryStore


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def journal(self):
        self.reads += 1
        return await super().journal()


def _map() -> tuple[MailboxMap, CountingStore]:
    store = CountingStore()
    return MailboxMap(MapConfig("b1"), store), store


def _begin(m: MailboxMap, user: str, pairs: list[list[str]], step: Step, old: str, new: str):
    aside = "referral-proxy-aside-0000"
    reservations = [Reservation(old), Reservation(aside)] + ([Reservation(new)] if new != old else [])
    entry = now(m.begin_move(user, "move", reservations, {"src": "b1", "dst": "b3", "pairs": pairs}))
    path = [Step.PLANNED, Step.CREATING, Step.CREATED, Step.COPYING, Step.COPIED, Step.COMMITTED, Step.SUBSCRIBED,
            Step.PLACED, Step.ASIDE, Step.DRAINED]
    for s in path[:path.index(step) + 1] if step is not Step.RESERVED else []:
        now(m.step(entry, s))
    return entry


def test_no_journal_read_without_a_move_of_the_user():
    m, store = _map()
    assert now(move_view(m, "carol")).shown == {}
    _begin(m, "dave", [["Work", "Shared/W"]], Step.COPYING, "Work", "Shared/W")  # another user's
    assert now(move_view(m, "carol")).shown == {}
    assert store.reads == 0
    assert now(move_view(m, "DAVE")).shown == {"Work": "b1", "Shared/W": HIDDEN}
    assert store.reads == 1


@pytest.mark.parametrize("step, work, new", [(Step.RESERVED, None, None), (Step.CREATED, "b1", HIDDEN),
                                             (Step.COPIED, "b1", HIDDEN), (Step.COMMITTED, HIDDEN, "b3"),
                                             (Step.PLACED, HIDDEN, "b3"), (Step.DRAINED, HIDDEN, "b3")])
def test_a_rename_shows_the_old_names_before_the_commit_point_and_the_new_ones_after(step, work, new):
    m, _store = _map()
    pairs = [["Work", "Shared/W"], ["Work/c", "Shared/W/c"]]
    _begin(m, "carol", pairs if step is not Step.RESERVED else [], step, "Work", "Shared/W")
    view = now(move_view(m, "carol"))
    if work is None:
        assert view.shown == {}  # nothing planned, nothing made: as routed
        return
    assert view.shown == {"Work": work, "Work/c": work, "Shared/W": new, "Shared/W/c": new}
    owner = view.owner(lambda name: "routed", "/")
    assert (owner("Work/c"), owner("Shared/W"), owner("Other")) == (work, new, "routed")
    assert now(move_view(m, "carol", subscriptions=True)).shown == {}  # a RENAME leaves subscriptions alone
    assert view.backends == [b for b in dict.fromkeys([work, new]) if b]


@pytest.mark.parametrize("step, shown", [(Step.COPIED, "b1"), (Step.COMMITTED, "b1"), (Step.SUBSCRIBED, "b3"),
                                         (Step.DRAINED, "b3")])
def test_an_admin_move_switches_when_its_subscriptions_are_carried(step, shown):
    m, _store = _map()
    _begin(m, "carol", [["Work", "Work"]], step, "Work", "Work")
    assert now(move_view(m, "carol")).shown == {"Work": shown}
    assert now(move_view(m, "carol", subscriptions=True)).shown == {"Work": shown}


def test_a_rename_of_inbox_never_hides_inbox():
    m, _store = _map()
    _begin(m, "carol", [["INBOX", "Shared/In"]], Step.PLACED, "INBOX", "Shared/In")
    assert now(move_view(m, "carol")).shown == {"INBOX": "b1", "Shared/In": "b3"}


def test_status_is_taken_only_for_a_name_a_mailbox_move_holds():
    """mailbox_moves(user, name): a RENAME on one backend (op rename-local, no aside name) holds its
    names too, and STATUS of them stays NO [INUSE] (tests/test_rfc2193.py)."""
    m, _store = _map()
    now(m.begin_move("carol", "rename-local", [Reservation("Local"), Reservation("Local2")], {}))
    assert m.mailbox_moves("carol", "Local") == set()
    entry = _begin(m, "carol", [["Work", "Shared/W"]], Step.COPIED, "Work", "Shared/W")
    assert m.mailbox_moves("carol", "Local") == set()
    assert m.mailbox_moves("carol", "Work/c") == m.mailbox_moves("carol", "Shared/W") == {entry.id}
    assert m.mailbox_moves("carol", "Other") == set() and m.mailbox_moves("carol") == {entry.id}
