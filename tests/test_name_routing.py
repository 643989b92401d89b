"""A mailbox name the proxy routes by must be the name the backend acts on. Dovecot acts on a
literal name only up to its first NUL and drops a CREATE's trailing separator; routed by the
bytes as sent, such names made mailboxes (and took messages) on a backend the map does not give
them to. Judged by a census of the real backends, beside direct Dovecot's answers."""

from __future__ import annotations

import re

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Proj", "backend": "b3"}]
MSG = b"From: a@example.test\r\nSubject: routed\r\n\r\nbody\r\n"


def _names(fleet, backend: str, user: str = "alice") -> set[bytes]:
    """The mailboxes *user* has on *backend*, asked of that Dovecot directly (\\Noselect ones left out)."""
    w = Wire(fleet[backend].host, fleet[backend].port)
    w.login(user)
    names = set()
    for line in w.cmd(b"c", b'LIST "" "*"')[:-1]:
        m = re.match(rb'\* LIST \(([^)]*)\) "/" "?(.*?)"?\r\n', line)
        assert m, line
        if b"\\Noselect" not in m.group(1):
            names.add(m.group(2))
    w.close()
    return names


def _census(fleet) -> dict[str, set[bytes]]:
    return {b: _names(fleet, b) - {b"INBOX"} for b in ("b1", "b2", "b3")}


def _plain(line: bytes) -> bytes:
    return re.sub(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"", line)


def test_create_with_a_trailing_separator_goes_where_the_map_puts_the_mailbox_it_makes(proxy_factory, fleet):
    direct = Wire(fleet["b2"].host, fleet["b2"].port)
    direct.login()
    assert direct.cmd(b"d", b'CREATE "Shared/"')[-1].startswith(b"d OK")  # Dovecot makes "Shared"
    direct.close()
    assert b"Shared" in _names(fleet, "b2")
    fleet.reset_mail()

    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b'CREATE "Shared/"')[-1].startswith(b"a OK")
    assert w.cmd(b"b", b"CREATE Proj/")[-1].startswith(b"b OK")
    # "Shared" is not under Shared/*: the default's (b1); "Proj" is b3's. On the old code,
    # "Shared/" matched Shared/* (made on b3) and "Proj/" missed the rule Proj (made on b1).
    assert _census(fleet) == {"b1": {b"Shared"}, "b2": set(), "b3": {b"Proj"}}
    assert w.cmd(b"c", b"SELECT Shared")[-1].startswith(b"c OK")
    assert w.cmd(b"d", b"CREATE Proj")[-1].startswith(b"d NO [ALREADYEXISTS]")
    w.close()


@pytest.mark.parametrize("command", [
    b"CREATE {5+}\r\nProj\x00",
    b"CREATE {7+}\r\nProj\x00/x",
    b"SUBSCRIBE {5+}\r\nProj\x00",
    b"RENAME Work {5+}\r\nProj\x00",
])
def test_a_name_with_nul_is_refused_not_acted_on_up_to_the_nul_where_the_map_does_not_say(
        proxy_factory, fleet, command):
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b"CREATE Work")[-1].startswith(b"a OK")
    reply = w.cmd(b"b", command)
    # On the old code: routed as "Proj\0" (the default, b1), where Dovecot made or renamed "Proj".
    slot = b"dest" if command.startswith(b"RENAME") else b"mailbox"
    assert reply == [b"b BAD Invalid arguments: invalid %s argument\r\n" % slot], reply
    assert w.cmd(b"c", b"NOOP")[-1].startswith(b"c OK")
    w.close()
    assert _census(fleet) == {"b1": {b"Work"}, "b2": set(), "b3": set()}


def test_an_append_to_a_name_with_nul_is_refused_before_its_message(proxy_factory, fleet):
    with fleet["b3"].client("alice") as m:
        m.create("Proj")
    with fleet["b1"].client("alice") as m:  # a stray the map does not list: the old code appended here
        m.create("Proj")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    for tag, lit in ((b"a", b"{%d+}" % len(MSG)), (b"b", b"{%d}" % len(MSG))):
        w.send(tag + b" APPEND {5+}\r\nProj\x00 (\\Seen) " + lit + b"\r\n")
        if lit.endswith(b"+}"):
            w.send(MSG + b"\r\n")
        reply = w.until_tagged(tag)
        assert reply == [tag + b" BAD Invalid arguments: invalid mailbox argument\r\n"], reply
    assert w.cmd(b"c", b"NOOP")[-1].startswith(b"c OK")  # the body ran as no command
    w.close()
    for b in ("b1", "b3"):
        with fleet[b].client("alice") as m:
            assert m.select("Proj", readonly=True) == ("OK", [b"0"]), b


def test_a_rename_across_to_a_name_ending_in_the_separator_is_refused_as_directly_and_leaves_nothing(
        proxy_factory, fleet):
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login()
    direct.cmd(b"d1", b"CREATE Work")
    expected = [_plain(x) for x in direct.cmd(b"r", b'RENAME Work "Shared/y/"')]
    direct.close()
    fleet.reset_mail()

    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    assert w.cmd(b"a", b"CREATE Work")[-1].startswith(b"a OK")
    w.send(b"b APPEND Work {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
    assert w.until_tagged(b"b")[-1].startswith(b"b OK")
    reply = [_plain(x) for x in w.cmd(b"r", b'RENAME Work "Shared/y/"')]
    w.close()
    assert reply == expected, reply
    # On the old code: NO, but the move's CREATE had made "Shared/y" on b3 and its roll-back
    # (DELETE "Shared/y/") could not remove it.
    assert _census(fleet) == {"b1": {b"Work"}, "b2": set(), "b3": set()}
    with fleet["b1"].client("alice") as m:
        assert m.select("Work", readonly=True) == ("OK", [b"1"])


@pytest.mark.parametrize("command", [b'COPY 1 "Shared/y/"', b'MOVE 1 "Shared/y/"', b'UID COPY 1 "Shared//y"'])
def test_a_copy_across_to_a_name_no_backend_takes_is_refused_as_directly(proxy_factory, fleet, command):
    """The old code answered NO [TRYCREATE] (a client then CREATEs "Shared/y/", which makes
    "Shared/y", and COPYs to "Shared/y/" again: TRYCREATE again)."""
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login()
    direct.send(b"a APPEND INBOX {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
    direct.until_tagged(b"a")
    direct.cmd(b"s", b"SELECT INBOX")
    expected = [_plain(x) for x in direct.cmd(b"c", command)]
    direct.close()
    assert expected[-1].startswith(b"c NO [CANNOT] Invalid mailbox name"), expected
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.cmd(b"s", b"SELECT INBOX")
    assert [_plain(x) for x in w.cmd(b"c", command)] == expected
    w.close()
    assert _census(fleet) == {"b1": set(), "b2": set(), "b3": set()}
    with fleet["b1"].client("alice") as m:
        assert m.select("INBOX", readonly=True) == ("OK", [b"1"])


def _append(w: Wire, tag: bytes, mailbox: bytes, body: bytes) -> None:
    w.send(tag + b" APPEND " + mailbox + b" {%d+}\r\n" % len(body) + body + b"\r\n")
    assert w.until_tagged(tag)[-1].startswith(tag + b" OK")


def test_a_rename_across_of_inbox_child_in_lower_case_moves_it_and_its_children(proxy_factory, fleet):
    """``inbox/kid`` is ``INBOX/kid`` (RFC 3501 5.1): the old code looked for the mailbox and its
    children by the name as sent, found none and answered NO [NONEXISTENT]; Dovecot renames it."""
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    for tag, name in ((b"a", b"INBOX/kid"), (b"b", b"INBOX/kid/gk")):
        assert w.cmd(tag, b"CREATE " + name)[-1].startswith(tag + b" OK")
    _append(w, b"c", b"inbox/kid", MSG)
    _append(w, b"d", b"INBOX/kid/gk", MSG + b"2")
    # Selected under another case, it is still the selected mailbox: not moved from under it.
    assert w.cmd(b"e", b"SELECT inbox/KID")[-1].startswith(b"e NO")  # (only INBOX is case-blind)
    assert w.cmd(b"f", b"SELECT inbox/kid")[-1].startswith(b"f OK")
    reply = w.cmd(b"g", b"RENAME INBOX/kid Shared/kid")
    assert reply[-1].startswith(b"g NO [INUSE] "), reply
    assert w.cmd(b"h", b"UNSELECT")[-1].startswith(b"h OK")
    reply = w.cmd(b"r", b"RENAME inbox/kid Shared/kid")
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    assert _census(fleet) == {"b1": set(), "b2": set(), "b3": {b"Shared/kid", b"Shared/kid/gk"}}
    for name, body in (("Shared/kid", MSG), ("Shared/kid/gk", MSG + b"2")):
        with fleet["b3"].client("alice") as m:
            assert m.select(name, readonly=True) == ("OK", [b"1"])
            assert m.fetch("1", "(BODY.PEEK[])")[1][0][1] == body
