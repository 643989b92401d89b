"""Transparent sessions across three real Dovecot backends: the client sees one mail store."""

from __future__ import annotations

import os
import signal

import imapclient
import pytest
from imapwire import Wire, wait_for

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, free_port

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"user": "bob", "mailbox": "*", "backend": "b2"}]


def _seed(fleet, user="alice"):
    home = "b2" if user == "bob" else "b1"
    with fleet[home].client(user) as m:
        m.append("INBOX", "", None, b"Subject: home\r\n\r\nhome\r\n")
        m.create("Work")
        m.create("Shared/Hidden")  # the map gives Shared/* to b3: a stray copy, never shown
    with fleet["b3"].client(user) as m:
        m.create("Shared/Projects")
        m.create("Shared/Projects/2026")
        for i in range(3):
            m.append("Shared/Projects", "", None, b"Subject: p%d\r\n\r\nproject %d\r\n" % (i, i))
        m.create("Work")  # a stray copy on b3 of a b1 mailbox


def _list(m, pattern="*"):
    typ, data = m.list('""', pattern)
    assert typ == "OK"
    return {line.rsplit(b" ", 1)[1].strip(b'"'): line.split(b")")[0] + b")" for line in data if line}


def test_list_merges_every_backend_once(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    m = proxy.imaplib()
    m.login("alice", "secret")
    listed = _list(m)
    assert sorted(listed) == [b"INBOX", b"Shared", b"Shared/Projects", b"Shared/Projects/2026", b"Work"]
    assert b"\\HasChildren" in listed[b"Shared/Projects"]
    assert b"\\HasNoChildren" in listed[b"Shared/Projects/2026"]
    assert b"\\HasNoChildren" in listed[b"Work"] and b"\\HasNoChildren" in listed[b"INBOX"]
    assert b"\\Noselect" in listed[b"Shared"] and b"\\HasChildren" in listed[b"Shared"]
    assert sorted(_list(m, "%")) == [b"INBOX", b"Shared", b"Work"]
    assert sorted(_list(m, "Shared/%")) == [b"Shared/Projects"]
    assert sorted(_list(m, "inbox")) == [b"INBOX"]
    m.logout()


def test_select_fetch_store_search_expunge_on_a_remote_mailbox(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    m = proxy.imaplib()
    m.login("alice", "secret")
    assert m.select("Shared/Projects") == ("OK", [b"3"])
    typ, data = m.fetch("1:3", "(BODY[TEXT])")
    assert [d[1] for d in data if isinstance(d, tuple)] == [b"project 0\r\n", b"project 1\r\n", b"project 2\r\n"]
    assert m.store("2", "+FLAGS", r"(\Deleted)")[0] == "OK"
    assert m.search(None, "DELETED") == ("OK", [b"2"])
    # Switching to a mailbox on another backend unselects, never expunges.
    assert m.select("INBOX") == ("OK", [b"1"])
    with fleet["b3"].client("alice") as direct:
        assert direct.select("Shared/Projects") == ("OK", [b"3"])
    assert m.select("Shared/Projects") == ("OK", [b"3"])
    typ, data = m.expunge()
    assert data == [b"2"]
    assert m.status("Shared/Projects", "(MESSAGES)")[1] == [b'Shared/Projects (MESSAGES 2)']
    assert m.status("Work", "(MESSAGES)")[1] == [b"Work (MESSAGES 0)"]
    assert m.create("Shared/New")[0] == "OK"
    assert m.subscribe("Shared/Projects")[0] == "OK"
    assert m.subscribe("Work")[0] == "OK"
    typ, data = m.lsub()
    assert sorted(line.rsplit(b" ", 1)[1].strip(b'"') for line in data) == [b"Shared/Projects", b"Work"]
    m.logout()
    with fleet["b3"].client("alice") as direct:
        assert direct.select("Shared/Projects") == ("OK", [b"2"])
        assert direct.list('""', "Shared/New")[1][0] is not None
        assert [line.rsplit(b" ", 1)[1] for line in direct.lsub()[1]] == [b"Shared/Projects"]
    with fleet["b1"].client("alice") as direct:
        assert direct.list('""', "Shared/New")[1] == [None]  # created where the map says only
        assert [line.rsplit(b" ", 1)[1] for line in direct.lsub()[1]] == [b"Work"]


def test_imapclient_across_three_backends(proxy_factory, fleet):
    _seed(fleet, "bob")
    proxy = proxy_factory(rules=RULES)
    c = imapclient.IMAPClient(proxy.host, port=proxy.port, ssl=False, timeout=20)
    c.login("bob", "secret")
    folders = sorted(f[2] for f in c.list_folders())
    assert folders == ["INBOX", "Shared", "Shared/Projects", "Shared/Projects/2026", "Work"]
    c.select_folder("INBOX")
    assert c.search() == [1]
    c.select_folder("Shared/Projects")
    uids = c.search()
    assert len(uids) == 3
    c.add_flags(uids[:1], [b"\\Flagged", b"$Label1"])
    assert b"$Label1" in c.get_flags(uids[:1])[uids[0]]
    c.select_folder("Work", readonly=True)
    assert c.search() == []
    c.logout()
    with fleet["b3"].client("bob") as direct:
        direct.select("Shared/Projects")
        assert b"$Label1" in direct.fetch("1", "(FLAGS)")[1][0]


def test_remote_backend_down_fails_only_that_command(proxy_factory, fleet):
    _seed(fleet)
    dead = free_port("127.0.0.5")
    config = {"backends": {"dead": {"endpoint": f"tcp:host=127.0.0.5:port={dead}", "url": f"imap://127.0.0.5:{dead}"}}}
    proxy = proxy_factory(config, rules=[{"mailbox": "Down/*", "backend": "dead"}] + RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b"SELECT Down/x") == [b"a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
    # A LIST that cannot see every backend is refused rather than partial (a sync client
    # would take the missing mailboxes for deleted).
    assert w.cmd(b"b", b'LIST "" "*"') == [b"b NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
    assert w.cmd(b"c", b"SELECT Shared/Projects")[-1].startswith(b"c OK")
    assert w.cmd(b"d", b"STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 1)\r\n"
    w.close()


def test_master_user_for_other_backends(proxy_factory, fleet):
    _seed(fleet)
    good = {"backends": {"b3": {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD}}}
    proxy = proxy_factory(good, rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b"SELECT Shared/Projects")[-1].startswith(b"a OK")
    w.close()
    # Dovecot's log process writes the line a moment after the login's OK: waited for
    wait_for(lambda: "proxy-master" in fleet["b3"].log_text() or "master" in fleet["b3"].log_text().lower(),
             "the master login in b3's log")
    # A wrong master password proves the master user (not alice's own password) is what b3 sees.
    bad = {"backends": {"b3": {"master_user": MASTER_USER, "master_password": "wrong"}}}
    proxy = proxy_factory(bad, rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b"SELECT Shared/Projects") == [b"a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
    assert w.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
    w.close()


def test_map_set_and_sighup_reach_a_running_session(proxy_factory, fleet, tmp_path):
    import subprocess
    import sys

    _seed(fleet)
    with fleet["b2"].client("alice") as m:
        m.create("Moved")
        m.append("Moved", "", None, b"Subject: on b2\r\n\r\nx\r\n")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b"STATUS Moved (MESSAGES)")[-1].startswith(b"a NO")  # b1 has no such mailbox
    cli = [sys.executable, "-m", "referral_proxy", "map", "--config", str(proxy.config_path)]
    out = subprocess.run(cli + ["set", "alice", "Moved", "b2"], capture_output=True, text=True, check=True)
    assert "alice Moved -> b2" in out.stdout
    shown = subprocess.run(cli + ["show", "alice"], capture_output=True, text=True, check=True).stdout
    assert "Moved -> b2" in shown and "Shared/* -> b3" in shown
    assert w.cmd(b"b", b"STATUS Moved (MESSAGES)")[0] == b"* STATUS Moved (MESSAGES 1)\r\n"
    subprocess.run(cli + ["unset", "alice", "Moved"], capture_output=True, text=True, check=True)
    assert w.cmd(b"c", b"STATUS Moved (MESSAGES)")[-1].startswith(b"c NO")
    # A rule change in the file takes effect on SIGHUP for this very session.
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace('mailbox = "Shared/*"', 'mailbox = "Mov*"').replace('backend = "b3"', 'backend = "b2"', 1))
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for(lambda: "reloaded" in proxy.stderr_text(), "the reload")  # 10 s, unchecked, were too few loaded
    assert w.cmd(b"d", b"STATUS Moved (MESSAGES)")[0] == b"* STATUS Moved (MESSAGES 1)\r\n"
    # A broken file is refused and the running rules stay.
    proxy.config_path.write_text("[proxy\n")
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in proxy.stderr_text(), "the refusal")  # not a 0.5 s sleep on a guess
    assert w.cmd(b"e", b"STATUS Moved (MESSAGES)")[0] == b"* STATUS Moved (MESSAGES 1)\r\n"
    w.close()


def test_pipelined_commands_across_backends_keep_order(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"1 SELECT Shared/Projects\r\n2 FETCH 1:* (BODY[TEXT])\r\n3 STATUS INBOX (MESSAGES)\r\n"
           b"4 SELECT INBOX\r\n5 FETCH 1 (BODY[TEXT])\r\n6 NOOP\r\n")
    lines = w.until_tagged(b"6")
    tags = [line.split()[0] for line in lines if line[:1].isdigit()]
    assert tags == [b"1", b"2", b"3", b"4", b"5", b"6"]
    text = b"".join(lines)
    assert text.index(b"project 2") < text.index(b"* STATUS INBOX (MESSAGES 1)") < text.index(b"home\r\n")
    w.close()


def test_list_extended_parent_of_remote_mailboxes(proxy_factory, fleet):
    """A parent whose children live on another backend: \\NonExistent when its owner lacks it
    (as one Dovecot says it), a plain entry when its owner has it but the selection skipped it."""
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Projects")
        m.subscribe("Shared/Projects")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert b'* LIST (\\NonExistent) "/" Shared (CHILDINFO ("SUBSCRIBED"))\r\n' in w.cmd(
        b"a1", b'LIST (SUBSCRIBED RECURSIVEMATCH) "" %')
    assert b'* LIST (\\NonExistent \\HasChildren) "/" Shared\r\n' in w.cmd(b"a2", b'LIST "" * RETURN (CHILDREN)')
    assert w.cmd(b"a3", b"CREATE Shared")[-1].startswith(b"a3 OK")  # on b1, its owner, unsubscribed
    assert b'* LIST () "/" Shared (CHILDINFO ("SUBSCRIBED"))\r\n' in w.cmd(
        b"a4", b'LIST (SUBSCRIBED RECURSIVEMATCH) "" %')
    w.close()


@pytest.mark.parametrize("stray", ["made", "deleted-parent"])
def test_list_extended_parent_kept_as_a_stray_where_its_children_are(proxy_factory, fleet, stray):
    """Shared routes to b1 (no Shared there); b3, holding Shared/Projects, also has a Shared of its own: made there
    directly, or CREATEd and DELETEd (Dovecot keeps a deleted parent's node, listed without \\Noselect). The
    extended LIST left Shared out altogether (b3's line hidden as a stray, nothing in its place), and passed on b3's
    `* NO Mailbox doesn't exist: Shared` for a name it had left out (probe l2 F1, F2). One Dovecot holding the whole
    tree lists `(\\NonExistent \\HasChildren) "/" Shared` and says no NO."""
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Projects")
        m.create("Shared")
        if stray == "deleted-parent":
            m.delete("Shared")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    said = w.cmd(b"a1", b'LIST "" "%" RETURN (CHILDREN)')
    assert said.count(b'* LIST (\\NonExistent \\HasChildren) "/" Shared\r\n') == 1, said  # main: no Shared
    said = w.cmd(b"a2", b'LIST () "" "%"')
    assert b'* LIST (\\NonExistent) "/" Shared\r\n' in said, said
    said = w.cmd(b"a3", b'LIST "" "%" RETURN (STATUS (MESSAGES))')
    assert b'* LIST (\\NonExistent) "/" Shared\r\n' in said and not [x for x in said if x.startswith(b"* NO")], said
    said = w.cmd(b"a4", b'LIST "" "*" RETURN (CHILDREN)')  # every name once
    names = [x.rsplit(b" ", 1)[1] for x in said if x.startswith(b"* LIST")]
    assert sorted(names) == [b"INBOX\r\n", b"Shared\r\n", b"Shared/Projects\r\n"], said
    with fleet["b3"].client("alice") as m:  # a stray with no child anywhere is no node: left out as before
        m.delete("Shared/Projects")
    said = w.cmd(b"a5", b'LIST "" "%" RETURN (CHILDREN)')
    assert not [x for x in said if x.endswith(b" Shared\r\n")], said
    w.close()


def test_list_subscribed_stray_parent_gets_its_children_from_every_backend(proxy_factory, fleet):
    """Shared made and subscribed on b3 (it routes to b1), Shared/Projects there too: LIST (SUBSCRIBED) showed it
    `(\\Subscribed \\NonExistent \\HasNoChildren)`, a child flag that contradicts the session's own LIST (probe l5
    F2); one Dovecot with the whole tree: \\HasChildren."""
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Projects")
        m.create("Shared")
        m.subscribe("Shared")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    said = w.cmd(b"a1", b'LIST (SUBSCRIBED) "" "%" RETURN (CHILDREN)')
    assert b'* LIST (\\Subscribed \\NonExistent \\HasChildren) "/" Shared\r\n' in said, said  # main: \HasNoChildren
    w.close()
