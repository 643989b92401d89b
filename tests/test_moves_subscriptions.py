"""Subscriptions across a move: a mailbox RENAMEd to another server leaves the subscription list
as Dovecot's own RENAME does (the old names stay subscribed, the new ones are not: RFC 3501 6.3.6,
a server never removes a name from it unilaterally); a mailbox the administrator moves keeps
its name and so its subscription, now kept by the backend that holds it."""

from __future__ import annotations

import imaplib
import signal
import time

import pytest
from movecheck import census, cli, inbox_apart, judge, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}


def _lsub(conn) -> set[str]:
    typ, data = conn.lsub('""', "*")
    assert typ == "OK", data
    return {line.rsplit(b' "/" ', 1)[1].strip(b'"').decode() for line in data if line}


def test_a_rename_across_servers_leaves_subscriptions_as_a_rename_on_one_server(fleet, proxy_factory):
    proxy = proxy_factory(rules=[{"user": "carol", "mailbox": "Far*", "backend": "b2"}])
    seed(fleet["b1"], "carol", "A", ["a-1@t", "a-2@t"])
    seed(fleet["b1"], "carol", "A/k", ["k-1@t"])
    seed(fleet["b1"], "carol", "L", ["l-1@t"])
    seed(fleet["b1"], "carol", "L/k", [])
    c = proxy.login("carol")
    for name in ("A", "A/k", "L", "L/k"):
        assert c.subscribe(name)[0] == "OK"
    assert c.rename("L", "M")[0] == "OK"  # on b1, by Dovecot itself
    typ, data = c.rename("A", "Far")  # b1 -> b2, by the proxy
    assert typ == "OK", data
    assert b"moved to another server" in data[0]
    subs = _lsub(c)
    assert {"L", "L/k"} <= subs and not {"M", "M/k"} & subs  # what Dovecot does
    assert {"A", "A/k"} <= subs and not {"Far", "Far/k"} & subs  # the same across servers
    counts, where = census(fleet, "carol")
    assert judge(counts, ["a-1@t", "a-2@t", "k-1@t", "l-1@t"]) == ([], [])
    assert where["k-1@t"][0] == ("b2", "Far/k")
    c.logout()


def test_a_mailbox_the_administrator_moves_stays_subscribed(fleet, proxy_factory):
    proxy = proxy_factory({"backends": MASTERS})
    seed(fleet["b1"], "carol", "Work", ["w-1@t"])
    seed(fleet["b1"], "carol", "Work/Deep", ["d-1@t"])
    seed(fleet["b1"], "carol", "Play", [])
    c = proxy.login("carol")
    for name in ("Work", "Work/Deep", "Play"):
        assert c.subscribe(name)[0] == "OK"
    c.logout()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    c = proxy.login("carol")
    assert {"Work", "Work/Deep", "Play"} <= _lsub(c)
    c.logout()
    with fleet["b1"].client("carol") as b1, fleet["b2"].client("carol") as b2:
        assert not {"Work", "Work/Deep"} & _lsub(b1)  # each name subscribed where it lives
        assert {"Work", "Work/Deep"} <= _lsub(b2)
    counts, where = census(fleet, "carol")
    assert judge(counts, ["w-1@t", "d-1@t"]) == ([], [])
    assert where["d-1@t"][0] == ("b2", "Work/Deep")


@pytest.mark.parametrize("to", ["Proj/Work", "Far"], ids=["on-its-backend", "across"])
def test_a_moved_mailbox_renamed_later_keeps_its_old_name_subscribed_and_unsubscribable(fleet, proxy_factory, to):
    """Work moved to b2 by the administrator, then RENAMEd by the client: the old name's placement goes
    (it routes to b1 again), its subscription stays on b2, as Dovecot keeps it. LSUB showed it no more,
    and UNSUBSCRIBE (to b1) left it there, shown by LIST (SUBSCRIBED) for good (hostile probe 3, F1)."""
    rules = [{"user": "carol", "mailbox": "Proj/*", "backend": "b2"}, {"user": "carol", "mailbox": "Far", "backend": "b3"}]
    proxy = proxy_factory({"backends": MASTERS}, rules=rules)
    seed(fleet["b1"], "carol", "Work", ["w-1@t"])
    c = proxy.login("carol")
    assert c.subscribe("Work")[0] == "OK"
    c.logout()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    c = proxy.login("carol")
    assert c.rename("Work", to)[0] == "OK"
    assert "Work" in _lsub(c)  # as one Dovecot: the old name stays subscribed (RFC 3501 6.3.6)
    assert c.unsubscribe("Work")[0] == "OK"
    assert "Work" not in _lsub(c)
    c._simple_command("LIST", "(SUBSCRIBED)", '""', '"*"')
    data = c.untagged_responses.pop("LIST", [])
    assert not [x for x in data if x and x.endswith(b" Work")], data
    c.logout()
    for d in fleet.backends.values():
        with d.client("carol") as m:
            assert "Work" not in _lsub(m), d.name
    counts, where = census(fleet, "carol")
    assert judge(counts, ["w-1@t"]) == ([], [])


@pytest.mark.parametrize("pattern", ['"*"', '"%"'])
def test_a_subscribed_parent_that_is_no_mailbox_keeps_subscribed_when_its_child_lives_elsewhere(fleet, proxy_factory,
                                                                                             pattern):
    """Box subscribed on b1, renamed away (its subscription stays), Box/kid made on b3: ``RETURN (SUBSCRIBED)``
    showed Box ``(\\NonExistent)`` from b3, which holds no subscription to it; Dovecot, holding all of them,
    says ``(\\NonExistent \\Subscribed)`` (hostile probe 3, F3)."""
    proxy = proxy_factory(rules=[{"user": "carol", "mailbox": "Box/*", "backend": "b3"}])
    c = proxy.login("carol")
    for command in (("create", "Box"), ("subscribe", "Box"), ("rename", "Box", "Tmp"), ("create", "Box/kid")):
        assert getattr(c, command[0])(*command[1:])[0] == "OK", command
    c._simple_command("LIST", '""', pattern, "RETURN", "(SUBSCRIBED)")
    data = c.untagged_responses.pop("LIST", [])
    box = [x for x in data if x and x.endswith(b'"/" Box')]
    assert len(box) == 1 and b"\\Subscribed" in box[0] and b"\\NonExistent" in box[0], data
    c.logout()


def _stray_subscriptions(fleet) -> None:
    """On b1, which the rule Shared/* no longer routes them to: a subscription to Shared/Old (its mailbox
    gone) and a stray mailbox Shared/Stray, subscribed, as a rule changed by a reload leaves them."""
    with fleet["b1"].client("carol") as b1:
        for command in (("create", "Shared/Old"), ("subscribe", "Shared/Old"), ("delete", "Shared/Old"),
                        ("create", "Shared/Stray"), ("subscribe", "Shared/Stray")):
            assert getattr(b1, command[0])(*command[1:])[0] == "OK", command
    with fleet["b3"].client("carol") as b3:  # one the owner holds, subscribed only on b1
        assert b3.create("Shared/Both")[0] == "OK"
    with fleet["b1"].client("carol") as b1:  # (Dovecot subscribes only a mailbox it has)
        for command in (("create", "Shared/Both"), ("subscribe", "Shared/Both"), ("delete", "Shared/Both")):
            assert getattr(b1, command[0])(*command[1:])[0] == "OK", command


def _rlsub(c) -> set[str]:
    imaplib.Commands.setdefault("RLSUB", ("AUTH", "SELECTED"))
    typ, data = c._simple_command("RLSUB", '""', '"*"')
    assert typ == "OK", data
    return {x.rsplit(b' "/" ', 1)[1].strip(b'"').decode() for x in c.untagged_responses.pop("LSUB", []) if x}


def _list(c, *args) -> dict[str, bytes]:
    c._simple_command("LIST", *args)
    return {x.rsplit(b' "/" ', 1)[1].strip(b'"').decode(): x for x in c.untagged_responses.pop("LIST", []) if x}


def test_a_subscription_kept_where_its_name_no_longer_routes_is_listed_by_every_form(fleet, proxy_factory):
    """LSUB lists a subscription kept on a backend that does not own the name (merge()); LIST (SUBSCRIBED)
    and RETURN (SUBSCRIBED) left it out (RFC 5258 3: the same names; probe t6 of stop 51). One Dovecot
    holding them all says (\\Subscribed \\NonExistent) for the two the owner lacks, (\\Subscribed) for the other."""
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    _stray_subscriptions(fleet)
    c = proxy.login("carol")
    assert {"Shared/Old", "Shared/Stray", "Shared/Both"} <= _lsub(c)
    for selection in ("(SUBSCRIBED)", "(SUBSCRIBED RECURSIVEMATCH)"):
        got = _list(c, selection, '""', '"*"')
        for name in ("Shared/Old", "Shared/Stray"):
            assert name in got and b"\\Subscribed" in got[name] and b"\\NonExistent" in got[name], (selection, got)
        assert b"\\Subscribed" in got["Shared/Both"] and b"\\NonExistent" not in got["Shared/Both"], got
    got = _list(c, '""', '"*"', "RETURN", "(SUBSCRIBED)")
    assert b"\\Subscribed" in got["Shared/Both"] and "Shared/Stray" not in got, got  # a stray is no mailbox
    c.logout()


@pytest.mark.parametrize("mode", ["aware", "always"])
def test_a_referred_unsubscribe_removes_the_subscription_kept_elsewhere(fleet, proxy_factory, mode):
    """A referral-aware client's UNSUBSCRIBE of such a name was referred to the owner, which had none: RLSUB
    went on listing it for good (probe t6 of stop 51). The proxy now removes the copies kept on the user's
    other backends before it refers; the client following the referral removes the owner's."""
    proxy = proxy_factory({"proxy": {"referrals": mode}}, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    _stray_subscriptions(fleet)
    c = proxy.login("carol")
    assert {"Shared/Old", "Shared/Stray", "Shared/Both"} <= _rlsub(c)  # ("aware": referral-aware from here)
    for name in ("Shared/Old", "Shared/Stray", "Shared/Both"):
        typ, data = c.unsubscribe(name)
        assert typ == "NO" and b"[REFERRAL imap://" in data[0], data
        with fleet["b3"].client("carol") as b3:  # the client follows it
            b3.unsubscribe(name)
    assert not {n for n in _rlsub(c) if n.startswith("Shared/")}
    c.logout()
    for d in fleet.backends.values():
        with d.client("carol") as m:
            assert not {n for n in _lsub(m) if n.startswith("Shared/")}, d.name


def test_a_renamed_name_s_subscription_stays_in_sight_when_its_backend_holds_nothing_else(
        fleet, proxy_factory):
    """Work (+Work/Deep) subscribed, moved to b2 by the administrator, RENAMEd back to b1 (the default): the
    old names stay subscribed (RFC 3501 6.3.6), kept on b2 they were out of every LSUB's sight (b2 held
    nothing else of carol's), UNSUBSCRIBE said OK and left them, and they came back with her next mailbox
    on b2 (probe y1 of stop 53: movesubs.py)."""
    proxy = proxy_factory({"backends": MASTERS})
    seed(fleet["b1"], "carol", "Work", ["w-1@t"])
    seed(fleet["b1"], "carol", "Work/Deep", ["d-1@t"])
    seed(fleet["b1"], "carol", "Misc", ["m-1@t"])
    c = proxy.login("carol")
    for name in ("Work", "Work/Deep"):
        assert c.subscribe(name)[0] == "OK"
    c.logout()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    c = proxy.login("carol")
    assert c.rename("Work", "Other")[0] == "OK"
    assert {"Work", "Work/Deep"} <= _lsub(c) and not {"Other", "Other/Deep"} & _lsub(c)  # as one Dovecot
    assert c.unsubscribe("Work")[0] == "OK"
    assert "Work" not in _lsub(c) and "Work/Deep" in _lsub(c)
    c.logout()
    for d in fleet.backends.values():
        with d.client("carol") as m:
            assert "Work" not in _lsub(m), d.name
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Misc", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    c = proxy.login("carol")
    assert "Work" not in _lsub(c) and "Work/Deep" in _lsub(c)
    c.logout()
    counts, _where = census(fleet, "carol")
    assert judge(counts, ["w-1@t", "d-1@t", "m-1@t"]) == ([], [])


def test_a_user_moved_whole_keeps_subscriptions_of_names_that_are_no_mailboxes(fleet, proxy_factory):
    """Gone subscribed, then DELETEd (Dovecot keeps the subscription); `move carol '*' b2`, then the default
    pointed at b2 as the command says: b1 held nothing else of carol's, LSUB lost Gone and UNSUBSCRIBE
    could not reach it (probe y1 of stop 53: movesubs.py)."""
    proxy = proxy_factory({"backends": MASTERS})
    seed(fleet["b1"], "carol", "INBOX", ["i-1@t"])
    seed(fleet["b1"], "carol", "Lists", ["l-1@t"])
    seed(fleet["b1"], "carol", "Gone", [])
    c = proxy.login("carol")
    for name in ("INBOX", "Lists", "Gone"):
        assert c.subscribe(name)[0] == "OK"
    assert c.delete("Gone")[0] == "OK"
    before = _lsub(c)
    assert {"INBOX", "Lists", "Gone"} <= before
    c.logout()
    inbox_apart(fleet["b1"], fleet["b2"], "carol")
    moved = cli("move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    proxy.config_path.write_text(proxy.config_path.read_text().replace('default = "b1"', 'default = "b2"'))
    proxy.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "Gone" not in (after := _lsub(c := proxy.login("carol"))) and time.monotonic() < deadline:
        c.logout()
        time.sleep(0.2)
    assert after == before
    assert c.unsubscribe("Gone")[0] == "OK"
    assert "Gone" not in _lsub(c)
    c.logout()
    for d in fleet.backends.values():
        with d.client("carol") as m:
            assert "Gone" not in _lsub(m), d.name
    counts, _where = census(fleet, "carol")
    assert judge(counts, ["i-1@t", "l-1@t"]) == ([], [])
