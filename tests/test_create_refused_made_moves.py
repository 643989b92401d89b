"""Each CREATE a move makes of a name it holds reserved and found absent, answered as Dovecot 2.3.19 now and
then answers one: ``NO [ALREADYEXISTS]``, the mailbox made (createrelay.py, in front of a real Dovecot).

* the drain's drop (drain.py, past the commit point, on the source): before, `move` stopped with
  "committed but not finished" and recovery counted a MOVE death that never was;
* each destination mailbox of an admin move (a subtree, a whole user) and of a client's RENAME across
  (mover.py, mailops.create since f159e89: before it, the move was rolled back, answered NO), made under
  a private name and renamed into place (validity.create_unlike): its CREATE or its RENAME so answered;
* the roll-back of a move whose destination was taken as made: deleted only if it is still empty.

Judged by a census of the backends.
"""

from __future__ import annotations

import re

import pytest
from createrelay import RefusingRelay
from movecheck import LEFT_TO_RECOVER, census, cli, deliver, faulty, seed
from test_moves import MASTERS, RULES, _exactly_once, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")

DROPS = rb"referral-proxy-aside-\S+/drop-\d+"
MADE = rb'"?referral-proxy-aside-[^/\s]+/new-\d+"?'  # each destination is made under such a name (validity.py)


@pytest.fixture
def relayed(fleet, proxy_factory):
    """``relayed(backend, pattern, extra=None)``: a RefusingRelay in front of *backend* and the proxy
    (the config every `move` and `recover` here uses) reaching *backend* through it; closed at the end."""
    relays: list[RefusingRelay] = []

    def start(backend: str, pattern: bytes, extra: dict | None = None, command: bytes = b"CREATE"):
        b = fleet[backend]
        relay = RefusingRelay(b.host, b.port, pattern, command)
        relay.start()
        relays.append(relay)
        backends = {k: dict(v) for k, v in MASTERS["backends"].items()}
        backends[backend]["endpoint"] = relay.endpoint()
        return relay, proxy_factory({**MASTERS, **(extra or {}), "backends": backends}, rules=RULES)

    yield start
    for relay in relays:
        relay.close()


def _names(backend, user: str = "carol") -> list[str]:
    with backend.client(user) as m:
        typ, data = m.list('""', '"*"')
        assert typ == "OK", data
        return [d.decode().rsplit(" ", 1)[-1].strip('"') for d in data if d]


def test_the_drains_drop_refused_as_existing_and_made_finishes_the_move(fleet, relayed):
    inbox, work = ids("inbox", 2), ids("work", 8)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    relay, proxy = relayed("b1", DROPS)
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    assert relay.refused, moved.stdout + moved.stderr
    assert moved.returncode == 0, moved.stdout + moved.stderr
    _exactly_once(fleet, proxy, "carol", inbox + work)
    where = census(fleet, "carol")[1]
    assert all(where[i] == [("b3", "Work")] for i in work), where
    assert not [n for n in _names(fleet["b1"]) if n.startswith("referral-proxy-")], _names(fleet["b1"])
    assert _no_entries(proxy)


def _made(names: list[bytes]) -> set[bytes]:
    """The private names, made and refused, each once whatever it was made again (validity.py)."""
    assert all(re.fullmatch(MADE, n) for n in names), names
    return set(names)


@pytest.mark.parametrize("command", [b"CREATE", b"RENAME"])
@pytest.mark.parametrize("what", ["Work", "*", "rename"])
def test_each_destination_refused_as_existing_and_made_is_taken(fleet, relayed, what, command):
    """Each destination is made under a private name, then renamed into place (validity.create_unlike):
    either refused as existing yet done is taken."""
    inbox, work, child = ids("inbox", 3), ids("work", 6), ids("child", 4)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/Sub", child)
    relay, proxy = relayed("b3", MADE + (rb" [^\r\n]+" if command == b"RENAME" else b""), None, command)
    if what == "rename":  # a client's RENAME across (Shared/* is on b3)
        m = proxy.login("carol")
        try:
            typ, data = m.rename("Work", "Shared/Work")
        finally:
            m.logout()
        assert typ == "OK", data
        new = "Shared/Work"
    else:
        moved = cli("move", "--config", str(proxy.config_path), "carol", what, "b3")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        new = "Work"
    if command == b"RENAME":
        assert sorted(r.split(b" ", 1)[1].strip(b'"') for r in relay.refused) == [new.encode(), new.encode() + b"/Sub"]
        assert len(_made([r.split(b" ", 1)[0] for r in relay.refused])) == 2
    else:
        assert len(_made(relay.refused)) == 2, relay.refused
    _exactly_once(fleet, proxy, "carol", inbox + work + child)
    where = census(fleet, "carol")[1]
    assert all(where[i] == [("b3", new)] for i in work) and all(where[i] == [("b3", new + "/Sub")] for i in child)
    assert all(where[i] == [("b3" if what == "*" else "b1", "INBOX")] for i in inbox), where
    assert not [n for n in _names(fleet["b3"]) if n.startswith("referral-proxy-")], _names(fleet["b3"])


@pytest.mark.parametrize("foreign", [False, True])
def test_a_destination_taken_as_made_is_deleted_at_roll_back_only_if_empty(fleet, relayed, foreign):
    """Killed once the destination was taken as made (journaled created), recovery rolls the move back:
    the destination is deleted if empty; one that mail reached meanwhile (straight to the backend)
    is kept with that mail."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    relay, proxy = relayed("b3", MADE, LEFT_TO_RECOVER)
    config = str(proxy.config_path)
    killed = cli("move", "--config", config, "carol", "Work", "b3", command=faulty("--kill-at", "created:1"))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert len(_made(relay.refused)) == 1, relay.refused
    stray = ["stray@t"] if foreign else []
    if foreign:
        assert deliver(fleet["b3"], "carol", "Work", "stray@t") == "Work"
    recovered = cli("recover", "--config", config)
    assert recovered.returncode == 0 and "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert all(where[i] == [("b1", "Work")] for i in work) and sum(counts.values()) == len(work) + len(stray), where
    assert ("Work" in _names(fleet["b3"])) is foreign
    if foreign:
        assert where["stray@t"] == [("b3", "Work")]
    assert _no_entries(proxy)


def test_a_move_cut_off_before_its_destination_is_renamed_into_place_leaves_no_private_mailbox(fleet, relayed):
    """The connection to the destination cut before the RENAME of the private name made (validity.py)
    into place: the roll-back deletes that name too (it was left, empty, on the backend)."""
    work = ids("work", 4)
    seed(fleet["b1"], "carol", "Work", work)
    relay, proxy = relayed("b3", MADE + rb" [^\r\n]+", None, b"RENAME")
    relay.cuts = 1
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    assert relay.refused and moved.returncode != 0, moved.stdout + moved.stderr
    where = census(fleet, "carol")[1]
    assert all(where[i] == [("b1", "Work")] for i in work) and len(where) == len(work), where
    assert not [n for n in _names(fleet["b3"]) if n.startswith("referral-proxy-") or n == "Work"], _names(fleet["b3"])
    assert _no_entries(proxy)
