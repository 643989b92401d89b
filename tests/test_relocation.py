"""A session whose user's home, or whose selected mailbox, a move took elsewhere ends with BYE (relocation.py).

Real Dovecot for what a client sees; the watch's own rules (when a session is left to finish
its command first) in memory. Without it, a client IDLE in INBOX while its user moved saw every
message expunged and then nothing: new mail went to the new home, the session stayed on the old.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
from movecheck import cli, deliver, seed
from test_moves import MASTERS, RULES, ids
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from referral_proxy.config import MapConfig
from referral_proxy.journal import Reservation
from referral_proxy.relocation import BYE, RelocationWatch
from referral_proxy.routing import MailboxMap
from referral_proxy.store import MemoryStore

pytestmark = pytest.mark.usefixtures("clean_mail")


def _idle(proxy, user: str, mailbox: bytes) -> socket.socket:
    s = socket.create_connection((proxy.host, proxy.port), timeout=30)
    s.sendall(b"a LOGIN %s secret\r\nb SELECT %s\r\nc IDLE\r\n" % (user.encode(), mailbox))
    got = b""
    while b"+ " not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    return s


def _until_closed(s: socket.socket, seconds: float = 30.0) -> bytes:
    """Everything the proxy sends until it closes the connection (or *seconds* pass: then what came)."""
    got = b""
    deadline = time.monotonic() + seconds
    s.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    s.close()
    return got


@pytest.mark.parametrize("what", ["*", "INBOX"])
def test_a_session_idle_in_inbox_while_its_user_moves_is_told_bye(proxy_factory, fleet, what):
    inbox = ids("inbox", 5)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory(MASTERS, rules=RULES)
    carol = _idle(proxy, "carol", b"INBOX")
    bob = _idle(proxy, "bob", b"INBOX")  # another user: untouched
    moved = cli("move", "--config", str(proxy.config_path), "carol", what, "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    got = _until_closed(carol)
    assert b"* BYE " + BYE + b"\r\n" in got, got
    bob.sendall(b"DONE\r\nd LOGOUT\r\n")
    bye = _until_closed(bob)
    assert b"c OK" in bye and b"d OK" in bye and BYE not in bye, bye
    assert deliver(fleet["b2"], "carol", "INBOX", "new@t") == "INBOX"
    m = proxy.login("carol")  # the client logs in again: the new home, all of it
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) == len(inbox) + 1, data
    m.logout()


def test_a_session_with_a_moved_mailbox_selected_is_told_bye(proxy_factory, fleet):
    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    proxy = proxy_factory(MASTERS, rules=RULES)
    carol = _idle(proxy, "carol", b"Work")
    other = _idle(proxy, "carol", b"INBOX")  # the same user, a mailbox that stays: untouched
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert b"* BYE " in _until_closed(carol)  # Dovecot's own, at the RENAME aside, or ours
    other.sendall(b"DONE\r\nd NOOP\r\ne LOGOUT\r\n")
    got = _until_closed(other)
    assert b"d OK" in got and BYE not in got, got


# -- the watch, in memory -----------------------------------------------------------------------


class _Session(SimpleNamespace):
    def shutdown(self, why: bytes) -> None:
        self.told = why


def _session(home: str, selected: str | None = None, mailbox: bytes | None = None, *, in_flight: int = 0,
             idle: object = None, since: int = 0) -> _Session:
    return _Session(id=1, user="carol", home=home, selected=selected, selected_mailbox=mailbox, told=None,
                    mailboxes=SimpleNamespace(selected_since=since),
                    idle=SimpleNamespace(current=idle), relay=SimpleNamespace(in_flight=in_flight),
                    flow=SimpleNamespace(blocked=()), reader=SimpleNamespace(between_commands=True),
                    appends=SimpleNamespace(unanswered=()), pool=None)


def test_the_watch_waits_for_a_command_under_way_and_ignores_what_stays():
    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    busy = _session("b1", in_flight=1)
    idle = _session("b1", "b1", b"INBOX", in_flight=1, idle=SimpleNamespace(done_sent=False))
    stays = _session("b1", "b3", b"Work")
    elsewhere = _session("b1", "b1", b"Work")
    sessions = {id(s): s for s in (busy, idle, stays, elsewhere)}
    watch = RelocationWatch(None, mailbox_map, sessions.values())
    ensureDeferred(mailbox_map.place("carol", "Work", ["b3"]))
    watch.check()
    assert (busy.told, idle.told, stays.told, elsewhere.told) == (None, None, None, BYE)
    ensureDeferred(mailbox_map.place("carol", "INBOX", ["b2"]))
    watch.check()
    assert (busy.told, idle.told, stays.told) == (None, BYE, BYE)  # the busy one finishes its command first
    busy.relay.in_flight = 0
    watch.check()  # the map did not change since, but a session was left waiting
    assert busy.told == BYE
    again = _session("b2")
    watch.sessions = [again]
    watch.check()
    assert again.told is None  # nothing changed: nobody is looked at


def test_a_session_with_a_mailbox_selected_that_a_rename_takes_across_is_told_bye(proxy_factory, fleet):
    """A RENAME across leaves the old name where the rules route it (b1 again): the placements do not
    tell. On main the session stayed, selected in a mailbox renamed aside and deleted on b1; its
    Dovecot process then wrote its stale index into a new Work there ("indexid changed")."""
    seed(fleet["b1"], "carol", "Work", ids("work", 5))
    proxy = proxy_factory(MASTERS, rules=RULES)
    carol = socket.create_connection((proxy.host, proxy.port), timeout=30)
    carol.sendall(b"a LOGIN carol secret\r\nb SELECT Work\r\n")  # selected, not IDLE: no command to notice anything
    got = b""
    while b"b OK" not in got:
        chunk = carol.recv(65536)
        assert chunk, got
        got += chunk
    other = _idle(proxy, "carol", b"INBOX")  # the same user, a mailbox that stays: untouched
    renamer = socket.create_connection((proxy.host, proxy.port), timeout=60)  # then selects the new name: stays
    renamer.sendall(b'a LOGIN carol secret\r\nb RENAME Work "Archive/W"\r\nc SELECT "Archive/W"\r\n')
    assert BYE in _until_closed(carol)
    renamer.sendall(b"d NOOP\r\ne LOGOUT\r\n")
    other.sendall(b"DONE\r\nd NOOP\r\ne LOGOUT\r\n")
    renamed, stayed = _until_closed(renamer), _until_closed(other)
    assert b"b OK" in renamed and b"c OK" in renamed, renamed
    for got in (renamed, stayed):
        assert b"d OK" in got and BYE not in got, got


def test_the_watch_ends_sessions_in_a_mailbox_a_move_held_even_if_it_ended_before_it_looked():
    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    watch = RelocationWatch(None, mailbox_map, [])
    old = _session("b1", "b1", b"Proj")  # the old Proj, renamed aside by the move
    new = _session("b1", "b1", b"Shared/B")  # a stale one of the destination's name
    child = _session("b1", "b1", b"Proj/c")
    stays = _session("b1", "b1", b"Work")
    busy = _session("b1", "b1", b"Proj", in_flight=1)
    names = [Reservation("Proj"), Reservation("referral-proxy-aside-0a1b2c3d"), Reservation("Shared/B")]
    entry = _run(mailbox_map.begin_move("carol", "move", names, {}))
    _run(mailbox_map.end_move(entry))  # over (a second is long) before the watch looks: no placement changed
    since = _session("b1", "b1", b"Shared/B", since=mailbox_map.moves_begun)  # selected the new one after it
    watch.sessions = [old, new, child, stays, busy, since]
    watch.check()
    assert (old.told, new.told, child.told, stays.told, busy.told, since.told) == (BYE, BYE, BYE, None, None, None)
    busy.relay.in_flight = 0
    watch.check()  # left waiting: looked at again
    assert busy.told == BYE
    local = [Reservation("Work"), Reservation("Work2")]  # a RENAME on one backend (localrename.py): Dovecot's own
    pinned = [Reservation("Work", False, True), Reservation("Archive/X", False, True)]  # a MOVE across pins them
    for reservations in (local, pinned):
        _run(mailbox_map.end_move(_run(mailbox_map.begin_move("carol", "x", reservations, {}))))
    watch.check()
    assert stays.told is None


def _run(coroutine):
    result = []
    ensureDeferred(coroutine).addBoth(result.append)
    assert result, "it waited"
    if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
        result[0].raiseException()
    return result[0]


def test_the_watch_looks_as_soon_as_a_move_begins_not_a_second_later():
    """The move may rename the mailbox aside, and another move make one of that name, within the second."""
    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    clock = Clock()
    old = _session("b1", "b1", b"Proj")
    watch = RelocationWatch(clock, mailbox_map, [old])
    watch.start()
    try:
        _run(mailbox_map.begin_move("carol", "move", [Reservation("Proj"), Reservation("referral-proxy-aside-1"),
                                                      Reservation("Shared/B")], {}))
        assert old.told is None  # not inside the call that began it
        clock.advance(0)
        assert old.told == BYE
    finally:
        watch.stop()
