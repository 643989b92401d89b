"""`referral-proxy map set` / `unset` of a name a client's RENAME across holds, while it runs: refused
(as the proxy answers a client's command on it NO [INUSE]); once the move is over it goes through.
Judged by a census of the backends and by what a client reaches through the proxy.

Seen on main (RENAME Work Shared/Work, b1 -> b3, 20 messages; `map set carol Shared/Work b2` at its
'placed' step): the command said ``carol Shared/Work -> b2``, the RENAME answered OK, and the 20
messages on b3 were out of the proxy's reach (its LIST showed Shared/Work from b2: empty, or none).
At 'copied' the move's own placement overwrote the admin's without a word.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, seed, through_proxy, wait_paused

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
MASTERS = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}


@pytest.mark.parametrize("point", ["copied:1", "placed:1"])
def test_map_set_of_a_name_a_rename_holds_is_refused(proxy_factory, fleet, tmp_path, point):
    work = [f"work-{i}@t" for i in range(20)]
    seed(fleet["b1"], "carol", "Work", work)
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory({"backends": MASTERS}, rules=RULES,
                          command=faulty("--pause-at", point, "--pause-dir", str(pause)))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    w.send(b"c RENAME Work Shared/Work\r\n")
    assert wait_paused(pause, point) == point
    config = str(proxy.config_path)
    try:
        for args in (["set", "carol", "Shared/Work", "b2"], ["set", "carol", "Work", "b2"],
                     ["unset", "carol", "Shared/Work"]):
            refused = cli("map", "--config", config, *args)
            assert refused.returncode == 1 and "held by a move" in refused.stderr, (args, refused)
    finally:
        (pause / "resume").touch()
    assert w.until_tagged(b"c")[-1].startswith(b"c OK")
    w.close()
    # OK may come ANSWER_WITHIN seconds past the commit point, the drain finishing behind (the pause
    # above, three CLI runs on a loaded machine, can outlast it): the census once the move is over
    deadline = time.monotonic() + 120
    while "moves in progress: none" not in cli("map", "--config", config, "show", "carol").stdout:
        assert time.monotonic() < deadline, "the move never finished"
        time.sleep(0.5)
    counts, where = census(fleet, "carol")
    assert {tuple(where[i]) for i in work} == {(("b3", "Shared/Work"),)}
    reached = through_proxy(proxy, "carol")
    assert [i for i in work if reached[i] != 1] == [], reached
    done = cli("map", "--config", config, "show", "carol")
    assert "moves in progress: none" in done.stdout, done.stdout
    placed = cli("map", "--config", config, "set", "carol", "Archive", "b2")  # nothing held now: goes through
    assert placed.returncode == 0, placed.stderr


@pytest.mark.parametrize("command", ["set", "unset"])
def test_a_move_that_begins_while_map_set_writes_cannot_begin(tmp_path, command, capsys):
    """The check and the write were two steps: a move that began between them (here: as the write is
    about to go out) went on, and the admin's placement was overwritten or sent its name where its mail
    is not. Now one of the two is refused: the move (InUse: the client's NO [INUSE], try again)."""
    import argparse

    from storehelp import now

    from referral_proxy.config import parse_config
    from referral_proxy.journal import InUse, Reservation
    from referral_proxy.mapcli import _command
    from referral_proxy.routing import MailboxMap
    from referral_proxy.store import SQLiteStore

    config = parse_config({
        "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"]},
        "backends": {b: {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"} for b in ("b1", "b2")},
        "map": {"default": "b1", "store": f"sqlite:{tmp_path / 'map.sqlite3'}"}}, base=tmp_path)
    admin = MailboxMap(config.map, SQLiteStore(tmp_path / "map.sqlite3"))
    proxy = MailboxMap(config.map, SQLiteStore(tmp_path / "map.sqlite3"))  # another process: a client's RENAME
    admin.start()
    proxy.start()
    now(admin.place("carol", "Work", ("b2",)))
    began: list = []
    write = admin.place if command == "set" else admin.unplace

    async def racing(*a) -> None:
        try:
            began.append(await proxy.begin_move("carol", "move", [Reservation("Work")], {}))
        except InUse:
            pass
        await write(*a)

    setattr(admin, "place" if command == "set" else "unplace", racing)
    args = argparse.Namespace(map_command=command, user="carol", mailbox="Work", backends=["b2"])
    status = now(_command(args, config, admin))
    assert not (began and status == 0), "a move began on Work while `map %s` wrote it" % command
    assert status == 0 and not began, capsys.readouterr()  # the map command was first: it goes through
    entry = now(proxy.begin_move("carol", "move", [Reservation("Work")], {}))  # and holds nothing after
    now(proxy.end_move(entry))


@pytest.mark.parametrize("name", ["", "Work\r\nFAKE", "A\nB", "Work&AA0ACg-FAKE"], ids=["empty", "crlf", "lf", "shifted"])
def test_map_set_of_a_name_no_client_can_send_is_refused(proxy_factory, name):
    """An empty name, or one holding CR, LF or NUL (no IMAP client can name it; `map show` printed it raw):
    refused, nothing written (hostile probe 4)."""
    proxy = proxy_factory(rules=RULES)
    done = cli("map", "--config", str(proxy.config_path), "set", "carol", name, "b2")
    assert done.returncode == 2 and "not a mailbox name" in done.stderr, (done.stdout, done.stderr)
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")
    assert shown.returncode == 0 and "-> b2" not in shown.stdout and "b2 (placed" not in shown.stdout, shown.stdout


def test_map_set_naming_a_backend_twice_is_refused(proxy_factory):
    """`map set carol Work b2 b2`: a replica named twice is no second copy (a typo, as in a rule's list):
    refused, nothing written (stop 50 found it stored as two replicas)."""
    proxy = proxy_factory(rules=RULES)
    done = cli("map", "--config", str(proxy.config_path), "set", "carol", "Work", "b2", "b2")
    assert done.returncode == 2 and "a backend is named twice: b2 b2" in done.stderr, (done.stdout, done.stderr)
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")
    assert shown.returncode == 0 and "Work -> b2" not in shown.stdout, shown.stdout


def test_map_set_of_a_name_with_a_wildcard_says_it_is_no_pattern(proxy_factory):
    """`map set carol 'Pro*' b2` places the mailbox named Pro* (legal, a client can create it), and says that
    it is not a pattern: an operator who meant one learns it at once, not from mail gone missing."""
    proxy = proxy_factory(rules=RULES)
    done = cli("map", "--config", str(proxy.config_path), "set", "carol", "Pro*", "b2")
    assert done.returncode == 0 and "not as a pattern" in done.stderr, (done.stdout, done.stderr)
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")
    assert "Pro* -> b2" in shown.stdout, shown.stdout
    done = cli("map", "--config", str(proxy.config_path), "set", "carol", "Projects", "b2")
    assert done.returncode == 0 and "pattern" not in done.stderr, (done.stdout, done.stderr)
