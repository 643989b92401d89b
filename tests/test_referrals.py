"""RFC 2193 referral-aware sessions against three real Dovecot backends.

The map: everyone's Shared/* lives on b3, bob's home is b2, everything else on b1.
"""

from __future__ import annotations

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"user": "bob", "mailbox": "*", "backend": "b2"}]


def _url(fleet, backend, user, mailbox):
    b = fleet[backend]
    return f"imap://{user};AUTH=*@{b.host}:{b.port}/{mailbox}".encode()


def _seed(fleet, user="alice"):
    """INBOX with one message on the home backend, Shared/Projects (one message, subscribed) on b3."""
    home = "b2" if user == "bob" else "b1"
    with fleet[home].client(user) as m:
        m.append("INBOX", "", None, b"Subject: home\r\n\r\nhome\r\n")
        m.create("Work")
        m.subscribe("INBOX")
        m.subscribe("Work")
    with fleet["b3"].client(user) as m:
        m.create("Shared/Projects")
        m.append("Shared/Projects", "", None, b"Subject: shared\r\n\r\nshared\r\n")
        m.subscribe("Shared/Projects")
        m.create("Stray")  # a copy the map does not give to b3: never shown


def _names(lines, kind=b"LIST"):
    return sorted(line.rsplit(b" ", 1)[1].strip().strip(b'"') for line in lines if line.startswith(b"* " + kind))


def test_capability_and_rlist_merge(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    caps = w.cmd(b"c", b"CAPABILITY")[0].split()
    assert b"MAILBOX-REFERRALS" in caps
    rlist = w.cmd(b"r1", b'RLIST "" "*"')
    assert rlist[-1] == b"r1 OK LIST completed.\r\n"
    assert _names(rlist) == [b"INBOX", b"Shared", b"Shared/Projects", b"Work"]
    assert b'* LIST (\\Noselect \\HasChildren) "/" "Shared"\r\n' in rlist
    # The session is referral-aware now: LIST shows only what its own backend (b1) holds.
    assert _names(w.cmd(b"l1", b'LIST "" "*"')) == [b"INBOX", b"Work"]
    assert _names(w.cmd(b"s1", b'RLSUB "" "*"'), b"LSUB") == [b"INBOX", b"Shared/Projects", b"Work"]
    assert _names(w.cmd(b"s2", b'LSUB "" "*"'), b"LSUB") == [b"INBOX", b"Work"]
    # The hierarchy delimiter query of cyradm.
    reply = w.cmd(b"d", b'RLIST "" ""')
    assert reply[0] == b'* LIST (\\Noselect) "/" ""\r\n' and reply[-1].startswith(b"d OK")
    w.close()


def test_exact_referral_lines(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.cmd(b"r", b'RLIST "" "%"')
    url = _url(fleet, "b3", "alice", "Shared/Projects")
    for tag, command in [(b"a1", b"SELECT Shared/Projects"), (b"a2", b"EXAMINE Shared/Projects"),
                         (b"a3", b"DELETE Shared/Projects"), (b"a4", b"SUBSCRIBE Shared/Projects"),
                         (b"a5", b"UNSUBSCRIBE Shared/Projects"), (b"a6", b"STATUS Shared/Projects (MESSAGES)")]:
        assert w.cmd(tag, command) == [tag + b" NO [REFERRAL " + url + b"] Remote mailbox\r\n"]
    # CREATE where the map places the new name elsewhere.
    assert w.cmd(b"c1", b"CREATE Shared/New") == [b"c1 NO [REFERRAL " + _url(fleet, "b3", "alice", "Shared/New") + b"] Remote mailbox\r\n"]
    # APPEND: refused before the client sends its literal (no "+").
    w.send(b"p1 APPEND Shared/Projects (\\Seen) {20}\r\n")
    assert w.line() == b"p1 NO [REFERRAL " + url + b"] Remote mailbox\r\n"
    # COPY / MOVE: the destination.
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    for tag, command in [(b"k1", b"COPY 1 Shared/Projects"), (b"k2", b"UID COPY 1:* Shared/Projects"),
                         (b"k3", b"MOVE 1 Shared/Projects"), (b"k4", b"UID MOVE 1 Shared/Projects")]:
        assert w.cmd(tag, command) == [tag + b" NO [REFERRAL " + url + b"] Remote mailbox\r\n"]
    # RENAME: a pair, old url (where it is now) then new url.
    assert w.cmd(b"n1", b"RENAME Shared/Projects Archive") == [
        b"n1 NO [REFERRAL " + url + b" " + _url(fleet, "b1", "alice", "Archive") + b"] Remote mailbox\r\n"]
    assert w.cmd(b"n2", b"RENAME Work Shared/Work") == [
        b"n2 NO [REFERRAL " + _url(fleet, "b1", "alice", "Work") + b" " + _url(fleet, "b3", "alice", "Shared/Work")
        + b"] Remote mailbox\r\n"]
    # Encoding: modified UTF-7 becomes UTF-8, then percent-encoded; spaces too.
    # INBOX was selected: a referred SELECT closes it, said with [CLOSED] as Dovecot says it before a failed SELECT.
    assert w.cmd(b"e1", b"SELECT Shared/Caf&AOk-") == [b"* OK [CLOSED] Previous mailbox closed.\r\n", b"e1 NO [REFERRAL " + _url(fleet, "b3", "alice", "Shared/Caf%C3%A9") + b"] Remote mailbox\r\n"]
    assert w.cmd(b"e2", b'SELECT "Shared/My Box"') == [b"e2 NO [REFERRAL " + _url(fleet, "b3", "alice", "Shared/My%20Box") + b"] Remote mailbox\r\n"]
    # Local mailboxes are served as usual; nothing happened on b3.
    assert w.cmd(b"l", b"STATUS Work (MESSAGES)")[-1].startswith(b"l OK")
    with fleet["b3"].client("alice") as m:
        assert m.select("Shared/Projects") == ("OK", [b"1"])
    w.close()


def test_replicas_give_several_urls_and_bob_is_referred_from_b2(proxy_factory, fleet):
    _seed(fleet, "bob")
    rules = [{"mailbox": "Shared/*", "backend": ["b3", "b1"]}, {"user": "bob", "mailbox": "*", "backend": "b2"}]
    proxy = proxy_factory(rules=rules, referrals="always")
    w = Wire(proxy.host, proxy.port)
    w.login("bob")
    assert w.cmd(b"a", b"SELECT Shared/Projects") == [
        b"a NO [REFERRAL " + _url(fleet, "b3", "bob", "Shared/Projects") + b" "
        + _url(fleet, "b1", "bob", "Shared/Projects") + b"] Remote mailbox\r\n"]
    # Bob's own mailboxes (on b2) are local to his session.
    assert w.cmd(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")
    w.close()


def test_list_remote_option_marks_remote_mailboxes(proxy_factory, fleet):
    _seed(fleet)
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    reply = w.cmd(b"x", b'LIST (REMOTE) "" "*"')
    assert reply[-1].startswith(b"x OK")
    shared = [line for line in reply if line.endswith(b'"Shared/Projects"\r\n') or line.endswith(b" Shared/Projects\r\n")]
    assert len(shared) == 1 and b"\\Remote" in shared[0]
    inbox = [line for line in reply if line.endswith(b" INBOX\r\n") or line.endswith(b'"INBOX"\r\n')]
    assert len(inbox) == 1 and b"\\Remote" not in inbox[0]
    assert not any(b"Stray" in line for line in reply)
    # ... and the session is referral-aware now.
    assert w.cmd(b"s", b"SELECT Shared/Projects")[0].startswith(b"s NO [REFERRAL ")
    w.close()


def test_never_mode_proxies_and_unaware_session_gets_no_referral(proxy_factory, fleet):
    _seed(fleet)
    for mode in ("never", "aware"):
        proxy = proxy_factory(rules=RULES, referrals=mode)
        w = Wire(proxy.host, proxy.port)
        w.login()
        if mode == "never":
            w.cmd(b"r", b'RLIST "" "*"')  # does not make a "never" session aware
        reply = w.cmd(b"s", b"SELECT Shared/Projects")
        assert reply[-1].startswith(b"s OK"), reply
        assert b"* 1 EXISTS\r\n" in reply
        w.close()


def test_login_referral(proxy_factory, fleet):
    proxy = proxy_factory({"proxy": {"login_referrals": True}, "backends": {"b2": {"login_referral": True}}}, rules=RULES)
    w = Wire(proxy.host, proxy.port)
    assert b"LOGIN-REFERRALS" in w.greeting
    b2 = fleet["b2"]
    # RFC 2221: a tagged OK (the proxy serves bob's mailboxes all the same), not a NO.
    assert w.cmd(b"l", b"LOGIN bob secret")[-1] == (
        b"l OK [REFERRAL imap://bob;AUTH=*@%s:%d/] Logged in; your mail server is %s\r\n" % (b2.host.encode(), b2.port, b2.host.encode()))
    w.close()
    w = Wire(proxy.host, proxy.port)
    # Bad credentials are not referred.
    assert w.cmd(b"m", b"LOGIN bob wrong")[0].startswith(b"m NO [AUTHENTICATIONFAILED]")
    w.login("alice")  # alice's home b1 is proxied as usual
    w.close()
