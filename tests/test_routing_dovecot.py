"""The declared command table against real Dovecot: every mailbox argument routes its command,
tags inside responses are the client's, nothing the proxy did not check reaches a backend.

Two Dovecots of their own with METADATA, QUOTA and ACL enabled: r1 (alice's home) and
r3 (everyone's ``Shared/*``). Each routed command names a mailbox on r3 while a mailbox
on r1 is selected; r1 holds a stray ``Shared/X`` that answers differently, so a command
that went to the selected backend shows.
"""

from __future__ import annotations

import re
import signal

import pytest
from conftest import dovecot_root
from imapwire import Wire, wait_for
from referral_proxy.testing.dovecot import Dovecot

EXTRA = """
mail_plugins = $mail_plugins quota acl
protocol imap {
  mail_plugins = $mail_plugins imap_quota imap_acl
  imap_metadata = yes
}
mail_attribute_dict = file:%h/dovecot-attributes
plugin {
  acl = vfile
  quota_rule = *:storage=100M
}
"""

RULES = [{"mailbox": "Shared/*", "backend": "r3"}]
BIG = b"Subject: big\r\n\r\n" + b"x" * 30000 + b"\r\n"


@pytest.fixture(scope="module")
def rich(fleet):  # the fleet only for its session-wide set-up (users, checks)
    r1 = Dovecot("rich1", "127.0.0.11", dovecot_root() / "rich1", extra_config=EXTRA)
    r3 = Dovecot("rich3", "127.0.0.12", dovecot_root() / "rich3", extra_config=EXTRA)
    r1.start()
    r3.start()
    yield {"r1": r1, "r3": r3}
    r1.stop()
    r3.stop()


@pytest.fixture
def seeded(rich):
    r1, r3 = rich["r1"], rich["r3"]
    r1.reset_mail("alice")
    r3.reset_mail("alice")
    with r1.client("alice") as m:
        m.append("INBOX", "", None, b"Subject: home\r\n\r\nhome\r\n")
        m.create("Shared/X")  # a stray copy the map gives to r3: must never answer
    with r3.client("alice") as m:
        m.create("Shared/X")
        m.create("Shared/Only")
        m.append("Shared/X", "", None, BIG)
        m.append("Shared/X", "", None, BIG)
    for d, text in ((r1, b"stray on r1"), (r3, b"on r3")):
        w = _direct(d)
        assert w.cmd(b"m", b'SETMETADATA Shared/X (/private/comment "%s")' % text)[-1].startswith(b"m OK")
        w.close()
    return rich


def _direct(d: Dovecot) -> Wire:
    w = Wire(d.host, d.port)
    w.login("alice", d.password("alice"))
    return w


def _comment(d: Dovecot) -> bytes:
    w = _direct(d)
    reply = b"".join(w.cmd(b"g", b"GETMETADATA Shared/X /private/comment"))
    w.close()
    return reply


def _proxy(proxy_factory, rich, **kw):
    backends = {name: {"endpoint": d.endpoint, "url": d.url} for name, d in rich.items()}
    return proxy_factory({"backends": backends, "map": {"default": "r1"}}, rules=RULES, **kw)


def test_mailbox_commands_go_where_the_mailbox_is_while_another_backend_is_selected(proxy_factory, seeded):
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    assert w.cmd(b"a", b"STATUS Shared/X (MESSAGES)")[0] == b"* STATUS Shared/X (MESSAGES 2)\r\n"
    reply = w.cmd(b"b", b"GETMETADATA Shared/X /private/comment")
    assert b"on r3" in b"".join(reply) and reply[-1].startswith(b"b OK"), reply
    assert w.cmd(b"c", b'SETMETADATA Shared/X (/private/comment "set through the proxy")')[-1].startswith(b"c OK")
    reply = w.cmd(b"d", b"GETQUOTAROOT Shared/X")
    usage = [int(m.group(1)) for line in reply for m in [re.search(rb"STORAGE (\d+) ", line)] if m]
    assert usage and usage[0] >= 58, reply  # r3's two 30 KB messages, not r1's one small one
    for tag, command in [(b"e", b"MYRIGHTS Shared/Only"), (b"f", b"GETACL Shared/Only"),
                         (b"g", b"LISTRIGHTS Shared/Only bob"), (b"h", b"SETACL Shared/Only bob lr"),
                         (b"i", b"DELETEACL Shared/Only bob")]:
        reply = w.cmd(tag, command)
        assert reply[-1].startswith(tag + b" OK"), reply  # r1 has no Shared/Only: it would say NO
    # The selected mailbox on r1 is untouched by all of that.
    assert b"BODY[TEXT] {6}\r\n" in w.cmd(b"j", b"FETCH 1 BODY[TEXT]")[0]
    w.close()
    assert b"set through the proxy" in _comment(seeded["r3"])
    assert b"stray on r1" in _comment(seeded["r1"])


def test_getmetadata_of_a_pattern_answers_each_mailbox_from_its_own_server(proxy_factory, seeded):
    """Dovecot answers GETMETADATA "*" for every mailbox the pattern matches (an extension of RFC 5464);
    relayed to the home backend it left out Shared/X on r3 and showed r1's stray copy of it (probe 2
    of stop 47). Each backend of the user is asked; a mailbox's entries come from its owner only."""
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    for tag, pattern in ((b"a", b'"*"'), (b"b", b"Shared/%"), (b"c", b'"*/X"')):
        reply = w.cmd(tag, b"GETMETADATA " + pattern + b" /private/comment")
        text = b"".join(reply)
        names = [line.split(b" ")[2] for line in reply if line.startswith(b"* METADATA ")]
        assert b"on r3" in text and b"stray on r1" not in text and reply[-1].startswith(tag + b" OK"), reply
        assert len(names) == len(set(names)) and b"Shared/X" in names, reply
        assert (b"INBOX" in names) == (pattern == b'"*"'), reply
    reply = w.cmd(b"d", b"GETMETADATA Shared/X /private/comment")
    assert b"on r3" in b"".join(reply) and reply[-1].startswith(b"d OK"), reply


def test_esearch_and_context_updates_carry_the_clients_tags(proxy_factory, seeded):
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT Shared/X")[-1].startswith(b"s OK")
    assert w.cmd(b"a1", b"SEARCH RETURN (ALL) ALL")[0] == b'* ESEARCH (TAG "a1") ALL 1:2\r\n'
    assert w.cmd(b"a2", b"UID SEARCH RETURN (MIN MAX) ALL")[0] == b'* ESEARCH (TAG "a2") UID MIN 1 MAX 2\r\n'
    assert w.cmd(b"a5", b"SORT RETURN (COUNT) (DATE) UTF-8 ALL")[0] == b'* ESEARCH (TAG "a5") COUNT 2\r\n'
    assert w.cmd(b"a3", b"SEARCH RETURN (UPDATE COUNT) ALL")[0] == b'* ESEARCH (TAG "a3") COUNT 2\r\n'
    with seeded["r3"].client("alice") as m:
        m.append("Shared/X", "", None, b"Subject: new\r\n\r\nnew\r\n")
    reply = w.cmd(b"n", b"NOOP")
    assert b'* ESEARCH (TAG "a3") ADDTO (0 3)\r\n' in reply, reply
    assert w.cmd(b"a4", b'CANCELUPDATE "a3"')[-1].startswith(b"a4 OK Updates cancelled")  # not "Unknown tag"
    assert w.cmd(b"a6", b'CANCELUPDATE "a3"')[-1].startswith(b"a6 NO")  # cancelled already
    w.close()


def test_a_search_pipelined_before_a_select_of_the_same_backend_names_the_clients_tag(proxy_factory, seeded):
    """Probe l4 F1 (10 of 10): `SEARCH RETURN (COUNT) ALL` then SELECT (or EXAMINE) in one write: the SELECT, sent
    at once, ended the connection's tag references while the search was unanswered: `(TAG "rp4")` reached the
    client (RFC 4731: it matches results to commands by that tag). An update search's updates end at the SELECT."""
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT Shared/X")[-1].startswith(b"s OK")
    for verb in (b"SELECT", b"EXAMINE"):
        w.send(b"b SEARCH RETURN (COUNT) ALL\r\nu UID SEARCH RETURN (UPDATE MIN) ALL\r\nc " + verb + b" Shared/X\r\n")
        said = w.until_tagged(b"b") + w.until_tagged(b"u") + w.until_tagged(b"c")
        esearch = [line for line in said if line.startswith(b"* ESEARCH")]
        assert esearch == [b'* ESEARCH (TAG "b") COUNT 2\r\n', b'* ESEARCH (TAG "u") UID MIN 1\r\n'], said  # main: rpN
    with seeded["r3"].client("alice") as m:
        m.append("Shared/X", "", None, b"Subject: new\r\n\r\nnew\r\n")
    reply = w.cmd(b"n", b"NOOP")
    assert not [line for line in reply if b"ESEARCH" in line], reply  # the SELECT ended u's updates
    assert w.cmd(b"a", b"SEARCH RETURN (UPDATE COUNT) ALL")[0] == b'* ESEARCH (TAG "a") COUNT 3\r\n'
    w.close()


def test_a_second_update_search_of_one_tag_is_refused_and_a_cancel_ends_the_updates(proxy_factory, seeded):
    """Probe C (this stop): two ``SEARCH RETURN (UPDATE ...)`` tagged t1 both ran (each under its own proxy
    tag), and after ``CANCELUPDATE "t1"`` (which cancelled one) the other's ADDTO still came. Dovecot refuses
    the second (BAD); so does the proxy. And RFC 5267's tags are quoted strings: an atom is BAD, as with Dovecot."""
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT Shared/X")[-1].startswith(b"s OK")
    w.send(b"t1 SEARCH RETURN (UPDATE COUNT) ALL\r\nt1 SEARCH RETURN (UPDATE MIN) ALL\r\n")
    answers = [w.until_tagged(b"t1")[-1], w.until_tagged(b"t1")[-1]]
    assert sorted(a.split(b" ")[1] for a in answers) == [b"BAD", b"OK"], answers
    assert w.cmd(b"u", b"CANCELUPDATE t1")[-1].startswith(b"u BAD "), "an atom, not a quoted tag"
    assert w.cmd(b"c", b'CANCELUPDATE "t1"')[-1].startswith(b"c OK")
    with seeded["r3"].client("alice") as m:
        m.append("Shared/X", "", None, b"Subject: new\r\n\r\nnew\r\n")
    reply = w.cmd(b"n", b"NOOP")
    assert not [line for line in reply if b"ESEARCH" in line], reply
    w.close()


def test_searchres_dollar_goes_to_the_backend_that_holds_the_result(proxy_factory, seeded):
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT Shared/X")[-1].startswith(b"s OK")
    assert w.cmd(b"r", b"SEARCH RETURN (SAVE) 2")[-1].startswith(b"r OK")
    assert w.cmd(b"f", b"FETCH $ (UID)")[0] == b"* 2 FETCH (UID 2)\r\n"
    # A COPY of $ into a mailbox on another backend: the proxy copies across, from r3's result.
    reply = w.cmd(b"c", b"UID COPY $ INBOX")
    assert reply[-1].startswith(b"c OK [COPYUID "), reply
    w.close()
    with seeded["r1"].client("alice") as m:
        assert m.select("INBOX")[1] == [b"2"]


def test_reload_adds_a_backend_and_a_rule_naming_it_together(proxy_factory, seeded):
    r1 = seeded["r1"]
    proxy = proxy_factory({"backends": {"r1": {"endpoint": r1.endpoint, "url": r1.url}}, "map": {"default": "r1"}})
    before = Wire(proxy.host, proxy.port)
    before.login()
    assert before.cmd(b"a", b"STATUS Shared/X (MESSAGES)")[0] == b"* STATUS Shared/X (MESSAGES 0)\r\n"  # the stray
    r3 = seeded["r3"]
    text = proxy.config_path.read_text()
    text = text.replace("[map]", f'[backends.r3]\nendpoint = "{r3.endpoint}"\nurl = "{r3.url}"\n\n[map]')
    proxy.config_path.write_text(text + '\n[[map.rules]]\nmailbox = "Shared/*"\nbackend = "r3"\n')
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in proxy.stderr_text(), "the reload")  # 10 s, unchecked, were too few loaded
    # The session from before and a new one both see r3 now; nothing else changed.
    assert before.cmd(b"b", b"STATUS Shared/X (MESSAGES)")[0] == b"* STATUS Shared/X (MESSAGES 2)\r\n"
    assert before.cmd(b"c", b"SELECT Shared/X")[-1].startswith(b"c OK")
    after = Wire(proxy.host, proxy.port)
    after.login()
    assert after.cmd(b"d", b"STATUS Shared/X (MESSAGES)")[0] == b"* STATUS Shared/X (MESSAGES 2)\r\n"
    assert after.cmd(b"e", b"STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 1)\r\n"
    before.close()
    after.close()
    assert "Traceback" not in proxy.stderr_text()
    assert "the map rules changed; no mail moves with them" in proxy.stderr_text()  # (probe 3, stop 48)


def test_a_reload_that_routes_a_selected_mailbox_elsewhere_ends_that_session_only(proxy_factory, seeded):
    """Probe r2 (stop 50): the rule of a selected mailbox re-pointed by a reload: its STORE and EXPUNGE were
    refused NO [INUSE] "being moved" for as long as the session lasted (nothing was moved). The session is told
    BYE, as after a move; one whose selected mailbox stays where it was goes on."""
    proxy = _proxy(proxy_factory, seeded)
    moved, stays = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    moved.login()
    stays.login()
    assert moved.cmd(b"a", b"SELECT Shared/X")[-1].startswith(b"a OK")
    assert stays.cmd(b"a", b"SELECT INBOX")[-1].startswith(b"a OK")
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text.replace('backend = "r3"', 'backend = "r1"'))
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in proxy.stderr_text(), "the reload")
    assert moved.closed(), "the session whose selected mailbox the rules took elsewhere was not ended"
    assert stays.cmd(b"b", b"STORE 1 +FLAGS (\\Flagged)")[-1].startswith(b"b OK")
    stays.close()


def test_smuggled_commands_never_run_on_a_backend(proxy_factory, seeded):
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    evil = b"Evil\r\nX9 CREATE Injected\r\nX10 NOOP"
    w.send(b"c1 CREATE {%d+}\r\n%s\r\n" % (len(evil), evil))
    w.until_tagged(b"c1")
    w.send(b"n1 NOOP {26+}\r\n\r\nS1 CREATE Shared/Ghost\r\n\r\n")
    assert w.until_tagged(b"n1")[-1].startswith(b"n1 BAD")
    assert w.cmd(b"c2", b'CREATE "Shared/\\Z"')[-1].startswith(b"c2 BAD")
    assert w.cmd(b"c3", b"CREATE \"Wor\\k\"")[-1].startswith(b"c3 BAD")
    assert w.cmd(b"z", b"NOOP")[-1].startswith(b"z OK")
    w.close()
    for d in seeded.values():
        with d.client("alice") as m:
            names = b" ".join(m.list()[1])
            for name in (b"Injected", b"Ghost", b"Work", b"\\Z"):
                assert name not in names, (d.name, names)


# Arguments the proxy's grammar lets through but Dovecot's tokenizer refuses ("Invalid
# characters in atom", "8bit data in atom"): Dovecot then skips the line only, so the bytes
# of a {n+} literal after them would run as commands. Found by tests/sessionfuzz.py.
TOKENIZER_REFUSES = [b"UID STORE 1:* -FLAGS.S{409n NOOP", b"SEARCH \xffx", b'FETCH 1 BODY[a"b]',
                     b"FETCH 1 BINARY[1]<0.{5}>", b"FETCH 1 BODY[(]", b"SEARCH HEADER a\x7fb"]


def test_literals_after_arguments_a_backend_refuses_never_run_as_commands(proxy_factory, seeded):
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    for i, head in enumerate(TOKENIZER_REFUSES):
        smuggled = b"\r\nS%d CREATE Ghost%d\r\n" % (i, i)
        w.send(b"t%d %s {%d+}\r\n%s\r\n" % (i, head, len(smuggled), smuggled))
        assert w.until_tagged(b"t%d" % i)[-1].startswith(b"t%d BAD" % i)
    assert w.cmd(b"z", b"NOOP")[-1].startswith(b"z OK")
    w.close()
    for d in seeded.values():
        with d.client("alice") as m:
            assert b"Ghost" not in b" ".join(m.list()[1]), d.name


def test_pipelined_noop_and_sync_append_and_idle_done_against_dovecot(proxy_factory, seeded):
    proxy = _proxy(proxy_factory, seeded)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.send(b"a NOOP\r\nb APPEND INBOX {5}\r\n")
    lines = [w.line(), w.line()]
    assert lines[0].startswith(b"a OK") and lines[1] == b"+ Ready for literal data\r\n", lines
    w.send(b"hello\r\n")
    assert w.until_tagged(b"b")[-1].startswith(b"b OK [APPENDUID ")
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    w.send(b"i IDLE\r\n")
    assert w.line().startswith(b"+ ")
    w.send(b"DONE\r\nx2 NOOP\r\n")
    assert w.until_tagged(b"i")[-1].startswith(b"i OK")
    assert w.until_tagged(b"x2")[-1].startswith(b"x2 OK")
    w.close()
