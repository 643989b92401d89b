"""Mail delivered to a user's old INBOX after a move took INBOX elsewhere is carried to the new one (oldhome.py).

Real Dovecot; judged by a census of the backends and by what a client of the proxy reaches.
Delivery agents are not the proxy's: until they are pointed at the new home, and for a
delivery racing the move's last round, mail keeps reaching the old backend's INBOX.
"""

from __future__ import annotations

import time

import pytest
from movecheck import (
    LEFT_TO_RECOVER,
    Deliverer,
    admin_move,
    body,
    census,
    cli,
    deliver,
    faulty,
    seed,
    start_paused,
    wait_paused,
)
from test_moves import MASTERS, RULES, _exactly_once, _no_entries, ids

from referral_proxy.config import MapConfig
from referral_proxy.routing import OLD_HOME_PREFIX, OLD_HOME_WATCH, MailboxMap
from referral_proxy.staging import is_private_name
from referral_proxy.store import MemoryStore

pytestmark = pytest.mark.usefixtures("clean_mail")


def _move(proxy, *args: str):
    return cli("move", "--config", str(proxy.config_path), *args)


def _recover(proxy) -> str:
    result = cli("recover", "--config", str(proxy.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("what", ["*", "INBOX", "inbox"])  # inbox: the watch was never written (attack9a)
def test_mail_delivered_to_the_old_home_during_and_after_a_move_is_carried(proxy_factory, fleet, what):
    """A deliverer feeds b1's INBOX without pause while the whole user (or INBOX alone) moves to b2,
    and on after `move` returned; `recover` carries what was left: every message once, all reachable."""
    inbox, work = ids("inbox", 150), ids("work", 10)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    d = Deliverer(fleet["b1"], "carol", "INBOX", "live", pause=0.01)
    d.start()
    moved = _move(proxy, "carol", what, "b2")
    d.stop()
    late = [f"late-{i}@t" for i in range(3)]  # after `move` returned (delivery not yet pointed at b2)
    assert [deliver(fleet["b1"], "carol", "INBOX", i) for i in late] == ["INBOX"] * 3
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "is carried to b2" in moved.stdout, moved.stdout
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol").stdout
    assert "old home b1: mail delivered to its INBOX is carried to the home until" in shown, shown
    assert OLD_HOME_PREFIX not in shown  # the record is not shown as a placement
    counts, _ = census(fleet, "carol", [fleet["b1"]])
    assert any(counts[i] for i in d.acked + late), "nothing was left on b1: the test proves nothing"
    out = _recover(proxy)
    assert "carried" in out and "delivered to the old INBOX on b1 to b2" in out, out
    _exactly_once(fleet, proxy, "carol", inbox + d.acked + late + work, may=d.refused)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in inbox + d.acked + late} == {("b2", "INBOX")}
    assert _recover(proxy).strip() == "nothing to recover"  # b1's INBOX is empty: nothing more carried
    assert _no_entries(proxy)


def test_a_running_proxy_carries_mail_that_reaches_the_old_home(proxy_factory, fleet):
    """No `recover`: the proxy's own sweep (every 30 s) carries it; a client then sees it in INBOX."""
    inbox = ids("inbox", 20)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert _move(proxy, "carol", "*", "b2").returncode == 0
    assert deliver(fleet["b1"], "carol", "INBOX", "after@t") == "INBOX"
    deadline = time.monotonic() + 120  # a bound, not a measurement: the sweep runs every 30 s
    while census(fleet, "carol", [fleet["b1"]])[0]["after@t"] and time.monotonic() < deadline:
        time.sleep(0.5)
    _exactly_once(fleet, proxy, "carol", inbox + ["after@t"])
    assert census(fleet, "carol")[1]["after@t"] == [("b2", "INBOX")]


def test_moving_back_ends_the_watch_of_the_new_home_and_watches_the_other(proxy_factory, fleet):
    inbox = ids("inbox", 10)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert _move(proxy, "carol", "*", "b2").returncode == 0
    assert _move(proxy, "carol", "*", "b1").returncode == 0
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol").stdout
    assert "old home b1" not in shown, shown  # the home is never shown as its own old home (probe m4 of stop 61)
    _recover(proxy)  # drops b1's record: b1 is the home again
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol").stdout
    assert "old home b2" in shown and "old home b1" not in shown, shown
    assert deliver(fleet["b2"], "carol", "INBOX", "stray@t") == "INBOX"
    assert "on b2 to b1" in _recover(proxy)
    _exactly_once(fleet, proxy, "carol", inbox + ["stray@t"])
    assert census(fleet, "carol")[1]["stray@t"] == [("b1", "INBOX")]


@pytest.mark.parametrize("step", ["copying:1", "copied:1", "committed:1", "placed:1"])
def test_a_carry_killed_at_any_step_is_recovered_exactly_once(proxy_factory, fleet, step):
    inbox, late = ids("inbox", 10), ids("late", 30)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    assert _move(proxy, "carol", "*", "b2").returncode == 0
    seed(fleet["b1"], "carol", "INBOX", late)  # delivered to the old home afterwards
    killed = cli("recover", "--config", str(proxy.config_path), command=faulty("--kill-at", step))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    _recover(proxy)  # finishes or rolls back the carry ...
    _recover(proxy)  # ... and carries again what a roll-back left
    _exactly_once(fleet, proxy, "carol", inbox + late)
    assert {census(fleet, "carol")[1][i][0] for i in late} == {("b2", "INBOX")}
    assert _no_entries(proxy)


def test_a_carry_keeps_no_client_out_of_inbox(proxy_factory, fleet, tmp_path):
    """While a carry runs (paused mid-copy), a client SELECTs INBOX, APPENDs to it, STOREs and EXPUNGEs
    there (a whole-user move or RENAME INBOX would wait: INUSE); the carry then ends, every message once."""
    inbox, late = ids("inbox", 10), ids("late", 20)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert _move(proxy, "carol", "*", "b2").returncode == 0
    seed(fleet["b1"], "carol", "INBOX", late)
    pause = tmp_path / "pause"
    carrying = start_paused(pause, "copying:1", "recover", "--config", str(proxy.config_path))
    try:
        wait_paused(pause, "copying:1")
        m = proxy.login("carol")
        assert m.select("INBOX")[0] == "OK"
        assert m.append("INBOX", None, None, body("during@t", 300))[0] == "OK"
        typ, found = m.search(None, "HEADER", "Message-Id", inbox[0])
        assert typ == "OK" and len(found[0].split()) == 1, found
        assert m.store(found[0], "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert m.expunge()[0] == "OK"
        typ, data = m.rename("INBOX", "Shared/Old")
        assert typ == "NO" and b"[INUSE]" in data[0], data
        m.logout()
        (pause / "resume").touch()
        out, _ = carrying.communicate(timeout=300)
    finally:
        carrying.kill()
    assert b"carried 20 message(s)" in out, out
    _exactly_once(fleet, proxy, "carol", inbox[1:] + late + ["during@t"])


def test_renaming_inbox_across_servers_does_not_watch_it(proxy_factory, fleet):
    """RENAME INBOX Shared/Old (RFC 3501: INBOX's messages move, INBOX stays the home): no record."""
    seed(fleet["b1"], "carol", "INBOX", ids("inbox", 5))
    proxy = proxy_factory(MASTERS, rules=RULES)
    m = proxy.login("carol")
    typ, data = m.rename("INBOX", "Shared/Old")
    m.logout()
    assert typ == "OK", data
    assert deliver(fleet["b1"], "carol", "INBOX", "new@t") == "INBOX"
    assert _recover(proxy).strip() == "nothing to recover"
    assert census(fleet, "carol")[1]["new@t"] == [("b1", "INBOX")]


@pytest.mark.parametrize("how", ["move", "rename"])
def test_a_delivery_to_a_folder_moved_off_a_backend_that_is_not_the_home_is_carried(proxy_factory, fleet, how):
    """Archive/2020 lives on b2 (a rule), carol's home is b1. Moved away (admin `move` to b3, or a client's
    RENAME across to b1), a delivery agent still sending to Archive/2020 on b2 saves to b2's INBOX (LDA's
    "Mailbox doesn't exist"), which no client of the proxy sees: left there for good (probe e4 of stop 56).
    b2 is watched as an old home now: that mail is carried to carol's INBOX, once."""
    archive = ids("archive", 20)
    seed(fleet["b2"], "carol", "Archive/2020", archive)
    proxy = proxy_factory(MASTERS, rules=RULES)
    if how == "move":
        moved = _move(proxy, "carol", "Archive/2020", "b3")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        new = "Archive/2020"
    else:
        m = proxy.login("carol")
        typ, data = m.rename("Archive/2020", "Kept2020")
        m.logout()
        assert typ == "OK", data
        new = "Kept2020"
    late = [f"late-{i}@t" for i in range(3)]  # a stale lookup: the MTA still delivers the folder to b2
    assert [deliver(fleet["b2"], "carol", "Archive/2020", i) for i in late] == ["INBOX"] * 3
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol").stdout
    assert "old home b2" in shown, shown
    assert "delivered to the old INBOX on b2 to b1" in _recover(proxy)
    _exactly_once(fleet, proxy, "carol", archive + late)
    _counts, where = census(fleet, "carol")
    assert {where[i][0] for i in late} == {("b1", "INBOX")}
    assert {where[i][0][1] for i in archive} == {new}


def test_a_move_waiting_for_another_move_of_inbox_carries_it_from_where_that_one_took_it(proxy_factory, fleet,
                                                                                      tmp_path):
    """`move carol INBOX b2` and `move carol INBOX b3` at once: the second waited for the first, then carried
    an empty INBOX from b1 (looked up before it waited) to b3 and made b3 the home; the 150 messages the first
    had moved stayed in b2's INBOX, out of reach, watched by nothing (probe e4 of stop 56). The second now
    looks again once the first is done: it carries them from b2."""
    inbox = ids("inbox", 150)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory(MASTERS, rules=RULES)
    pause = tmp_path / "pause"
    first = start_paused(pause, "planned", "move", "--config", str(proxy.config_path), "carol", "INBOX", "b2")
    assert wait_paused(pause, "planned") == "planned:1"
    second = admin_move(proxy, "carol", "INBOX", "b3")
    time.sleep(3)  # it has looked up INBOX (on b1 still) and waits for the first
    (pause / "resume").touch()
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and "from b2 to b3" in out, out + err
    _recover(proxy)
    _exactly_once(fleet, proxy, "carol", inbox)
    _counts, where = census(fleet, "carol")
    assert {where[i][0] for i in inbox} == {("b3", "INBOX")}


# -- the records, in memory ----------------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now


@pytest.mark.parametrize("user", ["carol", "Carol"])
def test_records_are_private_placements_never_routed_nor_listed(user):
    from twisted.internet.defer import ensureDeferred

    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    for now in (1000.0, 2000.0):
        ensureDeferred(mailbox_map.watch_old_home(user, "b1", _Clock(now)))
    ensureDeferred(mailbox_map.place("carol", "Work", ["b3"]))
    homes = mailbox_map.old_homes()
    assert [(h.user, h.backend, h.until) for h in homes] == [("carol", "b1", 2000 + OLD_HOME_WATCH)]  # one record
    assert mailbox_map.old_homes("CAROL") == homes
    assert mailbox_map.placements("carol") == {"Work": ("b3",)}
    assert mailbox_map.backends_for("carol") == ["b1", "b3"]
    assert is_private_name(homes[0].record.encode())


def test_mail_reaching_the_old_home_is_carried_into_an_inbox_of_its_uidvalidity(proxy_factory, fleet):
    """The move took INBOX onto one of its UIDVALIDITY (every message kept its UID: validity.py lets it). What
    reached the old INBOX after was refused as a renumbering move and stayed there, where no client sees it
    (soak seed 7001 of stop 49: 233 messages unreachable). No client saw those messages' UIDs there: carried
    as deliveries."""
    from movecheck import set_validity, validity_of

    inbox = ids("inbox", 5)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    mine = validity_of(fleet["b1"], "carol", "INBOX")
    validity_of(fleet["b2"], "carol", "INBOX")
    set_validity(fleet["b2"], "carol", "INBOX", mine)
    proxy = proxy_factory(MASTERS, rules=RULES)
    moved = _move(proxy, "carol", "*", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    late = [f"late-{i}@t" for i in range(3)]
    assert [deliver(fleet["b1"], "carol", "INBOX", i) for i in late] == ["INBOX"] * 3
    out = _recover(proxy)
    assert "delivered to the old INBOX on b1 to b2" in out, out
    _exactly_once(fleet, proxy, "carol", inbox + late)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in inbox + late} == {("b2", "INBOX")} and validity_of(fleet["b2"], "carol", "INBOX") == mine


def test_an_expired_watch_with_mail_still_waiting_goes_on_until_it_is_carried(proxy_factory, fleet):
    """Probe r5 (stop 50): the record of a watched old INBOX was dropped at its expiry with mail still there (the
    new home over quota refused it for hours): that mail stayed where no client reaches it, and nothing said so.
    The watch goes on, said at each sweep, until the old INBOX is empty; then it ends."""
    from storehelp import REACTOR, now

    from referral_proxy.config import load_config
    from referral_proxy.openstore import open_store

    seed(fleet["b1"], "carol", "INBOX", ids("in", 3))
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert _move(proxy, "carol", "*", "b2").returncode == 0
    late = ids("late", 2)
    for i in late:
        deliver(fleet["b1"], "carol", "INBOX", i)
    config = load_config(proxy.config_path)
    mailbox_map = MailboxMap(config.map, open_store(config.map.store, REACTOR))
    mailbox_map.start()
    (old,) = mailbox_map.old_homes("carol")
    now(mailbox_map.place("carol", f"{OLD_HOME_PREFIX}b1/{int(time.time()) - 10}", ["b1"]))  # expired 10 s ago
    now(mailbox_map.unplace("carol", old.record))
    now(mailbox_map.close())
    out = _recover(proxy)
    assert "the watch of the old INBOX on b1 is over, yet 2 message(s) wait there" in out, out
    assert "carried 2 message(s) delivered to the old INBOX on b1 to b2" in out, out
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in late} == {("b2", "INBOX")} and all(counts[i] == 1 for i in late)
    assert _recover(proxy).strip() == "nothing to recover"  # emptied: the expired record ended (a carry watches anew)
    mailbox_map = MailboxMap(config.map, open_store(config.map.store, REACTOR))
    mailbox_map.start()
    assert [h.until > time.time() for h in mailbox_map.old_homes("carol")] == [True]
    now(mailbox_map.close())
