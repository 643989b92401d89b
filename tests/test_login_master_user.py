"""A Dovecot master user's login through the proxy (``LOGIN "bob*proxy-master" master-secret``, the separator
Dovecot's ``auth_master_user_separator``): with ``[map] master_user_separator = "*"`` it is bob's session,
routed, held and kept alive as bob's; the backend checks the master credentials. Probe C (this stop): routed
by the whole string, it landed on the map's default backend (b1), where bob's mail is not, and a message
appended there went where bob never sees it. Judged by a census of the backends."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import pytest
from imapwire import Wire
from mailcheck import contents

from referral_proxy.config import ConfigError, parse_config
from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER
from referral_proxy.imap.url import parse_imap_url

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_a_master_users_login_is_the_users_session_on_the_users_backend(proxy_factory, fleet):
    with fleet["b2"].client("bob") as m:
        m.create("BobBox")
    proxy = proxy_factory({"map": {"master_user_separator": "*"}}, rules=[{"user": "bob", "mailbox": "*", "backend": "b2"}])
    w = Wire(proxy.host, proxy.port)
    reply = w.cmd(b"L", b'LOGIN "BOB*%s" "%s"' % (MASTER_USER.encode(), MASTER_PASSWORD.encode()))
    assert reply[-1].startswith(b"L OK"), reply
    listed = w.cmd(b"l", b'LIST "" "*"')
    assert listed[-1].startswith(b"l OK") and any(b"BobBox" in line for line in listed), listed
    msg = b"Subject: from support\r\nMessage-Id: <master-1@t>\r\n\r\nhello bob\r\n"
    w.send(b"a APPEND BobBox {%d+}\r\n" % len(msg) + msg + b"\r\n")
    assert w.until_tagged(b"a")[-1].startswith(b"a OK"), "appended"
    w.cmd(b"o", b"LOGOUT")
    assert [c[3] for c in contents(fleet["b2"], "bob", "BobBox")] == [hashlib.sha256(msg).hexdigest()]
    for name in ("b1", "b3"):
        with fleet[name].client("bob") as m:
            typ, data = m.list('""', "*")
        assert not [x for x in data if x and b"BobBox" in x], (name, data)
    wrong = Wire(proxy.host, proxy.port)
    reply = wrong.cmd(b"L", b'LOGIN "bob*%s" "not-it"' % MASTER_USER.encode())
    assert reply[-1].startswith(b"L NO"), reply  # the backend checks the master password


@pytest.mark.parametrize("separator", ["ab", "x", " "])
def test_a_separator_that_could_be_part_of_a_name_is_refused(separator):
    text = ('[proxy]\nlisten = ["tcp:1143"]\n[backends.b1]\nendpoint = "tcp:host=127.0.0.1:port=143"\n'
            f'url = "imap://127.0.0.1/"\n[map]\ndefault = "b1"\nmaster_user_separator = "{separator}"\n')
    with pytest.raises(ConfigError, match="master_user_separator"):
        parse_config(tomllib.loads(text), base=Path("/tmp"))


@pytest.mark.parametrize("login", [b"bob*%s" % MASTER_USER.encode(), b"BOB*%s" % MASTER_USER.encode()])
def test_a_master_users_referral_names_a_login_the_client_can_follow_with_its_password(proxy_factory, fleet, login):
    """RFC 2193: the client follows a referral's URL with the password it gave. A master login's named bob,
    whose password the client does not have (probe 3 of stop 49): it names bob and the master part now."""
    with fleet["b3"].client("bob") as m:
        m.create("Shared/box")
    proxy = proxy_factory({"map": {"master_user_separator": "*"}}, rules=[{"mailbox": "Shared/*", "backend": "b3"}],
                          referrals="always")
    w = Wire(proxy.host, proxy.port)
    assert w.cmd(b"L", b'LOGIN "%s" "%s"' % (login, MASTER_PASSWORD.encode()))[-1].startswith(b"L OK")
    answer = w.cmd(b"s", b"SELECT Shared/box")[-1]
    w.close()
    m = re.search(rb"\[REFERRAL ([^\] ]+)\]", answer)
    assert m, answer
    user, host, port, mailbox = parse_imap_url(m.group(1).decode("ascii"))
    assert (user, mailbox, (host, port)) == (f"bob*{MASTER_USER}", "Shared/box", (fleet["b3"].host, fleet["b3"].port))
    there = Wire(host, port)
    assert there.cmd(b"L", b'LOGIN "%s" "%s"' % (user.encode(), MASTER_PASSWORD.encode()))[-1].startswith(b"L OK")
    assert there.cmd(b"s", b"SELECT " + mailbox.encode())[-1].startswith(b"s OK")
    there.close()
