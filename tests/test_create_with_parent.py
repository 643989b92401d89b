"""A mailbox CREATEd inside one a move placed goes with its parent (creating.py).

Placements are per name. After ``move carol Projects b2``, a ``CREATE Projects/New`` went where the
rules (the default, b1) send ``Projects/New``: the tree lay over two servers and its next RENAME was
refused ``[CANNOT] A mailbox inside lives on another server`` (probe v2 of stop 52). Judged by what
each backend holds (a census by content) and by what a client reaches through the proxy.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, inbox_apart, journal_store, quote, seed, wait_paused
from storehelp import now
from test_moves import MASTERS, RULES, _exactly_once, _logged_in, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def _names(backend, user: str = "carol") -> set[str]:
    with backend.client(user) as m:
        typ, data = m.list()
    assert typ == "OK", data
    out = set()
    for line in data:
        raw = line if isinstance(line, bytes) else line[0] + line[1]
        name = raw.split(b') "/" ', 1)[1].decode()
        out.add(name[1:-1].replace('\\"', '"').replace("\\\\", "\\") if name.startswith('"') else name)
    return out


def _moved(proxy, fleet, parent: str) -> tuple[list[str], list[str]]:
    mail, kid = ids("proj", 3), ids("kid", 2)
    seed(fleet["b1"], "carol", parent, mail)
    seed(fleet["b1"], "carol", parent + "/Kid", kid)
    moved = cli("move", "--config", str(proxy.config_path), "carol", parent, "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    return mail, kid


def _append(w: Wire, mailbox: str, mid: str) -> list[bytes]:
    data = b"From: t@example.test\r\nMessage-ID: <%s>\r\nSubject: new\r\n\r\nbody of %s\r\n" % (mid.encode(), mid.encode())
    return w.cmd(b"a", b"APPEND " + quote(mailbox).encode() + b" {%d+}\r\n" % len(data) + data)


@pytest.mark.parametrize("parent", ["Projects", 'q"uo\\te %*'])
def test_a_mailbox_created_inside_a_moved_one_goes_with_it_and_the_tree_renames_whole(proxy_factory, fleet, parent):
    proxy = proxy_factory(MASTERS, rules=RULES)
    mail, kid = _moved(proxy, fleet, parent)
    w = _logged_in(proxy)
    for name in (parent + "/New", parent + "/Kid/Deep", parent + "/New/"):
        reply = w.cmd(b"c", b"CREATE " + quote(name).encode())
        assert reply[-1].startswith(b"c OK" if not name.endswith("/New/") else b"c NO [ALREADYEXISTS]"), (name, reply)
    assert _append(w, parent + "/New", "new-0@t")[-1].startswith(b"a OK")
    assert _append(w, parent + "/Kid/Deep", "deep-0@t")[-1].startswith(b"a OK")
    b1, b2 = _names(fleet["b1"]), _names(fleet["b2"])
    assert {parent + "/New", parent + "/Kid/Deep"} <= b2 and not {parent + "/New", parent + "/Kid/Deep"} & b1, (b1, b2)
    # The whole tree on b2: its RENAME to a name of b1 (the default) moves it all, nothing left behind.
    reply = w.cmd(b"r", b"RENAME " + quote(parent).encode() + b" Done")
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", mail + kid + ["new-0@t", "deep-0@t"])
    _counts, where = census(fleet, "carol")
    assert where["new-0@t"] == [("b1", "Done/New")] and where["deep-0@t"] == [("b1", "Done/Kid/Deep")], dict(where)
    assert _no_entries(proxy)


def test_a_name_already_where_the_rules_send_it_stays_there(proxy_factory, fleet):
    """A child made on the rules' backend before (by an older version, or directly) is not shadowed by a new
    empty one beside the moved parent: its CREATE is answered by the backend that has it."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    _moved(proxy, fleet, "Projects")
    seed(fleet["b1"], "carol", "Projects/Old", ["old-0@t"])
    w = _logged_in(proxy)
    reply = w.cmd(b"c", b"CREATE Projects/Old")
    assert reply[-1].startswith(b"c NO [ALREADYEXISTS]"), reply
    assert "Projects/Old" not in _names(fleet["b2"])
    reply = w.cmd(b"s", b"SELECT Projects/Old")
    assert b"* 1 EXISTS\r\n" in reply and reply[-1].startswith(b"s OK"), reply
    w.close()
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")
    assert "Projects/Old ->" not in shown.stdout and "Projects/Kid -> b2" in shown.stdout, shown.stdout + shown.stderr


def test_a_referral_aware_client_s_create_goes_where_the_rules_send_it_and_places_nothing(proxy_factory, fleet):
    """A placement made for a referral the client may never follow pulled later CREATEs of the name away from a
    parent moved back (probe z1 of stop 53): such a client is proxied or referred by the rules, as before."""
    proxy = proxy_factory({**MASTERS, "proxy": {"referrals": "always"}}, rules=RULES)
    _moved(proxy, fleet, "Projects")
    w = _logged_in(proxy)
    reply = w.cmd(b"c", b"CREATE Projects/Ref")
    assert reply[-1].startswith(b"c OK"), reply  # b1, the home: proxied
    w.close()
    assert "Projects/Ref" in _names(fleet["b1"])
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")
    assert "Projects/Ref ->" not in shown.stdout and "Projects/Kid -> b2" in shown.stdout, shown.stdout + shown.stderr


def test_only_the_direct_parent_counts_and_never_inbox(proxy_factory, fleet):
    """After `move carol INBOX b2` (its children stay), INBOX/Old/Kid went to b2 with INBOX, away from INBOX/Old
    on b1, whose RENAME was then refused [CANNOT] (probe z1 of stop 53)."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    seed(fleet["b1"], "carol", "INBOX", ids("inbox", 2))
    seed(fleet["b1"], "carol", "INBOX/Old", ids("old", 2))
    inbox_apart(fleet["b1"], fleet["b2"], "carol")
    moved = cli("move", "--config", str(proxy.config_path), "carol", "INBOX", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    w = _logged_in(proxy)
    for name in (b"INBOX/Old/Kid", b"INBOX/New"):
        assert w.cmd(b"c", b"CREATE " + name)[-1].startswith(b"c OK")
    assert {"INBOX/Old/Kid", "INBOX/New"} <= _names(fleet["b1"])
    assert _append(w, "INBOX/Old/Kid", "kid-0@t")[-1].startswith(b"a OK")
    assert w.cmd(b"r", b"RENAME INBOX/Old Done")[-1].startswith(b"r OK")
    w.close()
    _exactly_once(fleet, proxy, "carol", ids("inbox", 2) + ids("old", 2) + ["kid-0@t"])


def test_a_create_the_parent_s_server_refuses_is_answered_as_there_and_the_session_goes_on(proxy_factory, fleet):
    proxy = proxy_factory(MASTERS, rules=RULES)
    _moved(proxy, fleet, "Projects")
    w = _logged_in(proxy)
    reply = w.cmd(b"c", b"CREATE Projects/" + b"x" * 300)  # longer than a file name may be
    assert reply[-1].startswith(b"c NO [CANNOT] Mailbox name too long"), reply
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    assert w.cmd(b"d", b"CREATE Projects/Fine")[-1].startswith(b"d OK")
    w.close()
    assert "Projects/Fine" in _names(fleet["b2"]) and "Projects/Fine" not in _names(fleet["b1"])
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")  # the refused one placed nowhere
    assert "xxxxx" not in shown.stdout and "Projects/Fine -> b2" in shown.stdout, shown.stdout + shown.stderr


def _journal_create(store, owner) -> None:
    """A CREATE's entry as creating.py writes it (the parent reserved, shared), owned by *owner* (None: cut off)."""
    from storehelp import now

    from referral_proxy.journal import Reservation

    now(store.begin_move("carol", "create", [Reservation("Projects", True, True)],
                         {"mailbox": "Projects/Orphan", "backend": "b2"}, owner, "/"))


def test_a_create_cut_off_before_its_placement_is_placed_by_recovery(proxy_factory, fleet):
    """Killed between the CREATE on the parent's backend and its placement: the new mailbox was out of sight,
    and once the parent moved on, for good (a later move of it refused ALREADYEXISTS: probe z2 of stop 53)."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    _moved(proxy, fleet, "Projects")
    seed(fleet["b2"], "carol", "Projects/Orphan", ["orphan-0@t"])  # made there; the proxy died before placing it
    store = journal_store(proxy)
    try:
        _journal_create(store, None)
    finally:
        now(store.close())
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "placed Projects/Orphan on b2" in recovered.stdout + recovered.stderr, (
        recovered.stdout + recovered.stderr)
    w = _logged_in(proxy)
    reply = w.cmd(b"s", b"SELECT Projects/Orphan")
    assert b"* 1 EXISTS\r\n" in reply and reply[-1].startswith(b"s OK"), reply
    w.close()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Projects", "b1")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    _counts, where = census(fleet, "carol")
    assert where["orphan-0@t"] == [("b1", "Projects/Orphan")], dict(where)


def test_a_move_of_the_parent_waits_for_a_create_under_way(proxy_factory, fleet, tmp_path):
    """A move that began while a CREATE was on its way carried the new child aside and back; mail delivered to
    it meanwhile went to that backend's INBOX, out of sight (probe z2 of stop 53). The CREATE holds the parent
    (shared: the mailbox is read and written as ever) from before it is sent until it is placed."""
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--pause-at", "reserved:1", "--pause-dir", str(pause)))
    mail, kid = _moved(proxy, fleet, "Projects")
    w = _logged_in(proxy)
    w.send(b"c CREATE Projects/New\r\n")
    assert wait_paused(pause, "reserved:1") == "reserved:1"  # the proxy stopped there, its CREATE's hold written
    held = cli("move", "--config", str(proxy.config_path), "--wait", "1", "carol", "Projects", "b1")
    assert held.returncode != 0 and "nothing changed" in held.stdout + held.stderr, held.stdout + held.stderr
    (pause / "resume").touch()
    assert w.until_tagged(b"c")[-1].startswith(b"c OK")
    assert _append(w, "Projects/New", "new-0@t")[-1].startswith(b"a OK")
    w.close()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Projects", "b1")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    _exactly_once(fleet, proxy, "carol", mail + kid + ["new-0@t"])
    _counts, where = census(fleet, "carol")
    assert where["new-0@t"] == [("b1", "Projects/New")], dict(where)


def _placements(proxy) -> str:
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return shown.stdout


def test_a_deleted_child_s_placement_goes_with_it_and_its_next_create_follows_the_parent(proxy_factory, fleet):
    """Probe a1 of stop 54: Projects/New, made beside the moved parent (placed on b2), then DELETEd, kept its
    placement; the parent moved back, a new Projects/New went to b2 again: the tree split, RENAME [CANNOT]."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    mail, kid = _moved(proxy, fleet, "Projects")
    w = _logged_in(proxy)
    assert w.cmd(b"c", b"CREATE Projects/New")[-1].startswith(b"c OK")
    assert "Projects/New" in _placements(proxy)
    reply = w.cmd(b"d", b"DELETE Projects/New")
    assert reply[-1].startswith(b"d OK"), reply
    assert "Projects/New" not in _placements(proxy) and "Projects/New" not in _names(fleet["b2"])
    # a parent deleted while a child remains (Dovecot keeps its name) keeps its placement
    reply = w.cmd(b"d", b"DELETE Projects")
    assert reply[-1].startswith(b"d OK"), reply
    assert "Projects/Kid" in _names(fleet["b2"]) and "Projects " in _placements(proxy)
    assert w.cmd(b"c", b"CREATE Projects")[-1].startswith(b"c OK")
    assert _append(w, "Projects", "again-0@t")[-1].startswith(b"a OK")
    w.close()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Projects", "b1")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    w = _logged_in(proxy)
    assert w.cmd(b"c", b"CREATE Projects/New")[-1].startswith(b"c OK")
    assert _append(w, "Projects/New", "new-0@t")[-1].startswith(b"a OK")
    reply = w.cmd(b"r", b"RENAME Projects Done")
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", kid + ["again-0@t", "new-0@t"])
    _counts, where = census(fleet, "carol")
    assert where["new-0@t"] == [("b1", "Done/New")] and where["again-0@t"] == [("b1", "Done")], dict(where)
    assert not set(mail) & set(where)  # deleted with Projects, by the client
    assert _no_entries(proxy)


def test_a_rename_into_a_moved_parent_goes_with_it_unless_the_name_is_where_the_rules_send_it(proxy_factory, fleet):
    """Probe a1 of stop 54: RENAME Loose Projects/Loose (Loose on b1, Projects moved to b2) renamed on b1: the
    tree split. It goes across to the parent's backend now; a name already on the rules' backend is not shadowed."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    mail, kid = _moved(proxy, fleet, "Projects")
    seed(fleet["b1"], "carol", "Loose", ["loose-0@t"])
    seed(fleet["b1"], "carol", "Taken", ["taken-0@t"])
    seed(fleet["b1"], "carol", "Projects/Taken", ["there-0@t"])  # made directly where the rules send the name
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME Taken Projects/Taken")
    assert reply[-1].startswith(b"r NO [ALREADYEXISTS]"), reply
    reply = w.cmd(b"r", b"RENAME Loose Projects/Loose")
    assert reply[-1].startswith(b"r OK"), reply
    assert "Projects/Loose" in _names(fleet["b2"]) and "Loose" not in _names(fleet["b1"])
    with fleet["b1"].client("carol") as m:  # (it splits the tree itself: the next RENAME would be refused)
        assert m.delete("Projects/Taken")[0] == "OK"
    reply = w.cmd(b"r", b"RENAME Projects Done")
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", mail + kid + ["loose-0@t", "taken-0@t"])
    _counts, where = census(fleet, "carol")
    assert where["loose-0@t"] == [("b1", "Done/Loose")] and where["taken-0@t"] == [("b1", "Taken")], dict(where)
    assert _no_entries(proxy)


def test_a_delete_cut_off_before_its_placement_went_is_unplaced_by_recovery(proxy_factory, fleet):
    """Killed between the DELETE and the placement's removal: recovery removes it if the mailbox is gone there,
    and keeps it if it is still there."""
    from referral_proxy.journal import Reservation

    proxy = proxy_factory(MASTERS, rules=RULES)
    _moved(proxy, fleet, "Projects")
    store = journal_store(proxy)
    try:
        for name in ("Projects/Gone", "Projects/Kid"):
            if name.endswith("Gone"):
                now(store.set("carol", name, ("b2",)))
            now(store.begin_move("carol", "delete", [Reservation(name, False)], {"mailbox": name, "backend": "b2"},
                                 None, "/"))
    finally:
        now(store.close())
    recovered = cli("recover", "--config", str(proxy.config_path))
    out = recovered.stdout + recovered.stderr
    assert recovered.returncode == 0 and "unplaced Projects/Gone, deleted from b2" in out, out
    shown = _placements(proxy)
    assert "Projects/Gone" not in shown and "Projects/Kid" in shown, shown
    assert _no_entries(proxy)


def test_a_rename_into_a_moved_parent_of_a_mailbox_moved_beside_it_stays_there(proxy_factory, fleet):
    """Probe b1 of stop 54: Loose2 moved to b2 beside Projects; RENAME Loose2 Projects/Loose2 went across to b1
    (where the rules send the new name): the tree split. It is renamed on b2, its placement following it."""
    proxy = proxy_factory(MASTERS, rules=RULES)
    mail, kid = _moved(proxy, fleet, "Projects")
    seed(fleet["b1"], "carol", "Loose2", ["loose2-0@t"])
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Loose2", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME Loose2 Projects/Loose2")
    assert reply[-1].startswith(b"r OK") and b"another server" not in reply[-1], reply
    assert "Projects/Loose2" in _names(fleet["b2"]) and "Projects/Loose2" in _placements(proxy)
    reply = w.cmd(b"r", b"RENAME Projects Done")
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", mail + kid + ["loose2-0@t"])
    _counts, where = census(fleet, "carol")
    assert where["loose2-0@t"] == [("b1", "Done/Loose2")], dict(where)


def test_a_delete_of_the_selected_placed_mailbox_is_answered_as_dovecot_answers_it(proxy_factory, fleet):
    """Probe b1 of stop 54: the placement's check went on the connection Dovecot ends after deleting the selected
    mailbox: the client heard NO [UNAVAILABLE] for a DELETE that was done. Now Dovecot's OK and BYE."""
    import time

    proxy = proxy_factory(MASTERS, rules=RULES)
    _moved(proxy, fleet, "Projects")
    w = _logged_in(proxy)
    assert w.cmd(b"c", b"CREATE Projects/Sel")[-1].startswith(b"c OK")
    assert w.cmd(b"s", b"SELECT Projects/Sel")[-1].startswith(b"s OK")
    w.send(b"d DELETE Projects/Sel\r\n")
    assert w.line().startswith(b"d OK"), "DELETE"
    assert w.line().startswith(b"* BYE Selected mailbox was deleted")
    w.close()
    deadline = time.monotonic() + 10
    while "Projects/Sel" in _placements(proxy) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Projects/Sel" not in _placements(proxy) and "Projects/Sel" not in _names(fleet["b2"])
    assert _no_entries(proxy)


@pytest.mark.parametrize("second", ["DELETE Projects/New", "CREATE Projects/New/Sub"])
def test_a_second_command_on_a_name_a_delete_holds_waits_for_it_and_is_answered_as_dovecot(
        proxy_factory, fleet, tmp_path, second):
    """Probe j4 of stop 59: two DELETEs of a placed Projects/New at once, or a CREATE inside it meanwhile: the
    second was told ``NO [INUSE] Mailbox is being moved to another server`` though nothing moved; Dovecot runs one
    after the other (NONEXISTENT for the second DELETE; the CREATE made). A DELETE's hold lasts moments: now waited
    out, then routed again. Proxy A stops right after its DELETE's hold is written; proxy B (the same map store)
    sends the second."""
    pause = tmp_path / "pause"
    pause.mkdir()
    store = {"map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    a = proxy_factory({**MASTERS, **store}, rules=RULES,
                      command=faulty("--pause-at", "reserved:1", "--pause-dir", str(pause)))
    b = proxy_factory({**MASTERS, **store}, rules=RULES)
    _moved(a, fleet, "Projects")
    wa, wb = _logged_in(a), _logged_in(b)
    assert wb.cmd(b"c", b"CREATE Projects/New")[-1].startswith(b"c OK")  # placed (B knows it: its own)
    assert "Projects/New" in _placements(a)
    time.sleep(1.0)  # A has read the placement (SQLite: another process's writes are read now and then)
    wa.send(b"d DELETE Projects/New\r\n")
    assert wait_paused(pause, "reserved:1") == "reserved:1"  # A holds the name and stops there
    wb.send(b"e " + second.encode() + b"\r\n")
    time.sleep(1.0)  # B waits for A's hold (old code: NO [INUSE] at once)
    (pause / "resume").touch()
    assert wa.until_tagged(b"d")[-1].startswith(b"d OK")
    answer = wb.until_tagged(b"e")[-1]
    if second.startswith("DELETE"):
        assert answer.startswith(b"e NO [NONEXISTENT]"), answer
    else:  # where the rules send it, its parent's placement gone with the DELETE (kin_route: the direct parent)
        assert answer.startswith(b"e OK"), answer
        assert "Projects/New/Sub" in _names(fleet["b1"]), (_names(fleet["b1"]), _names(fleet["b2"]))
    wa.close()
    wb.close()
    assert not [line for line in _placements(a).splitlines() if line.split()[:1] == ["Projects/New"]], _placements(a)
    assert _no_entries(a)
