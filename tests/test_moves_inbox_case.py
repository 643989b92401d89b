"""INBOX's children spelled in another case (``inbox/sub``, ``Inbox/Sub``) are INBOX's children
(RFC 3501 5.1, and Dovecot resolves them so): moves, RENAMEs and their hierarchy checks must
find them. Before: the mover's LIST of ``inbox/sub`` found Dovecot's ``INBOX/sub`` and compared
it as another name: a cross-server RENAME said NONEXISTENT, a MOVE into it TRYCREATE, and a RENAME
on one backend skipped every check of the children (a child renamed into a name another backend
owns became unreachable; a child placed elsewhere kept its old name). Judged by a census.
"""

from __future__ import annotations

import pytest
from movecheck import census, cli, seed
from test_moves import MASTERS, RULES, _exactly_once, _logged_in, _no_entries, ids

from referral_proxy.routing import normalize

pytestmark = pytest.mark.usefixtures("clean_mail")


def _seeded(fleet):
    sub, kid = ids("sub", 3), ids("kid", 2)
    seed(fleet["b1"], "carol", "INBOX/sub", sub)
    seed(fleet["b1"], "carol", "INBOX/sub/k", kid)
    return sub, kid


def _with_inbox(proxy_factory, fleet):
    """_seeded, INBOX with mail too, a proxy and a client logged in."""
    sub, kid = _seeded(fleet)
    inbox = ids("inbox", 2)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = proxy_factory(MASTERS, rules=RULES)
    return sub, kid, inbox, proxy, _logged_in(proxy)


@pytest.mark.parametrize("spelled", ["inbox/sub", "Inbox/sub"])
def test_a_rename_on_one_backend_checks_the_children_of_inbox_in_any_case(proxy_factory, fleet, spelled):
    """"Shared" is b1's, "Shared/k" would be b3's: Dovecot would rename INBOX/sub/k out of reach."""
    sub, kid = _seeded(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME " + spelled.encode() + b" Shared")
    assert reply[-1].startswith(b"r NO [CANNOT]"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", sub + kid)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in kid} == {("b1", "INBOX/sub/k")}


def test_a_child_of_inbox_placed_elsewhere_refuses_the_rename_in_any_case(proxy_factory, fleet):
    sub, kid = _seeded(fleet)
    remote = ids("remote", 2)
    seed(fleet["b3"], "carol", "INBOX/sub/Remote", remote)
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert cli("map", "--config", str(proxy.config_path), "set", "carol", "INBOX/sub/Remote", "b3").returncode == 0
    w = _logged_in(proxy)
    for cmd in (b"RENAME inbox/sub INBOX/other", b"RENAME iNbOx/sub Archive/other"):
        reply = w.cmd(b"r", cmd)
        assert reply[-1].startswith(b"r NO [CANNOT] A mailbox inside lives on another server"), (cmd, reply)
    w.close()
    _exactly_once(fleet, proxy, "carol", sub + kid + remote)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in sub} == {("b1", "INBOX/sub")} and {where[i][0] for i in remote} == {("b3", "INBOX/sub/Remote")}


def test_a_placement_under_inbox_follows_a_rename_spelled_in_another_case(proxy_factory, fleet):
    sub, kid = _seeded(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert cli("map", "--config", str(proxy.config_path), "set", "carol", "INBOX/sub/k", "b1").returncode == 0
    w = _logged_in(proxy)
    assert w.cmd(b"r", b"RENAME inbox/sub INBOX/other")[-1].startswith(b"r OK")
    w.close()
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol").stdout
    assert "INBOX/other/k -> b1" in shown and "INBOX/sub/k" not in shown, shown
    _exactly_once(fleet, proxy, "carol", sub + kid)


@pytest.mark.parametrize("spelled, to", [("inbox/sub", "Shared/S"), ("Inbox/sub", "Archive/S")])
def test_inbox_children_in_another_case_move_across_servers(proxy_factory, fleet, spelled, to):
    sub, kid, inbox, proxy, w = _with_inbox(proxy_factory, fleet)
    reply = w.cmd(b"r", b"RENAME " + spelled.encode() + b" " + to.encode())
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", sub + kid + inbox)
    counts, where = census(fleet, "carol")
    far = "b3" if to.startswith("Shared") else "b2"
    assert {where[i][0] for i in sub} == {(far, to)} and {where[i][0] for i in kid} == {(far, to + "/k")}
    assert {where[i][0] for i in inbox} == {("b1", "INBOX")}
    assert _no_entries(proxy)


def test_admin_move_of_an_inbox_child_spelled_in_another_case(proxy_factory, fleet):
    sub, kid = _seeded(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    moved = cli("move", "--config", str(proxy.config_path), "CaRoL", "inbox/sub", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    _exactly_once(fleet, proxy, "carol", sub + kid)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in sub} == {("b2", "INBOX/sub")} and {where[i][0] for i in kid} == {("b2", "INBOX/sub/k")}
    assert _no_entries(proxy)


@pytest.mark.parametrize("command", [b"UID MOVE 1:* inbox/sub", b"UID COPY 1:* Inbox/sub"])
def test_mail_moved_across_servers_into_an_inbox_child_spelled_in_another_case(proxy_factory, fleet, command):
    sub, kid = _seeded(fleet)
    x = ids("x", 3)
    seed(fleet["b3"], "carol", "Shared/X", x)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    assert w.cmd(b"s", b"SELECT Shared/X")[-1].startswith(b"s OK")
    reply = w.cmd(b"m", command)
    assert reply[-1].startswith(b"m OK"), reply
    w.close()
    counts, where = census(fleet, "carol")
    moved = command.startswith(b"UID MOVE")
    if moved:
        _exactly_once(fleet, proxy, "carol", sub + kid + x)
    assert {frozenset(where[i]) for i in x} == {frozenset([("b1", "INBOX/sub")] + ([] if moved else [("b3", "Shared/X")]))}


@pytest.mark.parametrize("selected, command", [(b"inbox/sub", b"RENAME INBOX/sub Shared/S"),
                                               (b"Inbox/sub/k", b"RENAME iNBOX/sub Shared/S"),
                                               (b"Inbox", b"RENAME INBOX Shared/In")])
def test_the_sessions_own_selected_mailbox_is_not_moved_whatever_its_case(proxy_factory, fleet, selected, command):
    sub, kid, inbox, proxy, w = _with_inbox(proxy_factory, fleet)
    assert w.cmd(b"s", b"SELECT " + selected)[-1].startswith(b"s OK")
    reply = w.cmd(b"r", command)
    assert reply[-1].startswith(b"r NO [INUSE] Close"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", sub + kid + inbox)
    counts, where = census(fleet, "carol")
    assert all(where[i][0][0] == "b1" for i in sub + kid + inbox)


def test_inbox_is_case_insensitive_in_ascii_only():
    assert normalize("iNbOx/sub") == "INBOX/sub" and normalize("Inbox") == "INBOX"
    for name in ("\u0131nbox", "\u0131NBOX/sub", "INBO\u0058\u0307"):  # dotless i; X + a combining dot
        assert normalize(name) == name


def test_a_name_python_upper_cases_to_inbox_is_not_inbox(proxy_factory, fleet):
    """U+0131 (dotless i) upper-cases to "I" in Python: "\u0131nbox" was taken for INBOX, and a UTF8=ACCEPT
    client's RENAME of that (nonexistent) name carried INBOX's mail to another server."""
    sub, kid, inbox, proxy, w = _with_inbox(proxy_factory, fleet)
    assert w.cmd(b"e", b"ENABLE UTF8=ACCEPT")[-1].startswith(b"e OK")
    reply = w.cmd(b"r", 'RENAME "\u0131nbox" Shared/X'.encode())
    assert reply[-1].startswith(b"r NO"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", sub + kid + inbox)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in inbox} == {("b1", "INBOX")}
