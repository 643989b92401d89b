"""RFC 2193 / RFC 2221 to the letter (issue 15): no referral loops, invalid names refused as
Dovecot refuses them (never referred with raw bytes), COPY with nothing selected, login
referrals as a tagged OK. Against real Dovecot; the proxy is compared with direct Dovecot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from imapwire import Wire

from referral_proxy.config import parse_config
from referral_proxy.imap.url import parse_imap_url
from referral_proxy.referrals import login_referrals_apply, mailbox_urls, referable
from referral_proxy.routing import Route

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]


def _same(line: bytes) -> bytes:
    """A server line without Dovecot's timing text."""
    return re.sub(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"", line)


# -- no referral loops: the proxy is never named, at any position of a replica set -------------


def _config(listen: list[str], urls: dict[str, str], hostname: str = "proxy.test"):
    raw = {"proxy": {"listen": listen, "hostname": hostname},
           "backends": {n: {"endpoint": "tcp:host=127.0.0.9:port=1143", "url": u} for n, u in urls.items()},
           "map": {"default": next(iter(urls))}}
    return parse_config(raw, base=Path("/tmp"))


@pytest.mark.parametrize("listen, url", [
    ("tcp:1143:interface=127.0.0.1", "imap://127.0.0.1:1143"),
    ("tcp:port=1143:interface=127.0.0.1", "imap://localhost:1143"),
    ("tcp:1143", "imap://127.0.0.5:1143"),  # every interface: any loopback address reaches it
    ("tcp:1143", "imap://proxy.test:1143"),  # the proxy's own host name
    ("haproxy:tcp:1143:interface=10.0.0.1", "imap://10.0.0.1:1143"),  # behind a load balancer too
    ("tcp:143:interface=10.0.0.1", "imap://10.0.0.1"),  # the default port
])
def test_a_url_that_reaches_a_listener_of_the_proxy_is_never_referred_to(listen, url):
    config = _config([listen], {"self": url, "b3": "imap://10.9.9.9:143"})
    assert not referable(config, config.backends["self"])
    assert referable(config, config.backends["b3"])
    for members in (("self", "b3"), ("b3", "self"), ("self", "b3", "self")):
        assert mailbox_urls(config, Route(members), "alice", b"Loop/Box") == ["imap://alice;AUTH=*@10.9.9.9:143/Loop/Box"]
    assert mailbox_urls(config, Route(("self",)), "alice", b"Loop/Box") == []


@pytest.mark.parametrize("url", ["imap://[::1]:1143", "imap://[2001:db8::7]"])
def test_a_backend_at_an_ipv6_address_is_never_referred_to(url):
    """Its URL's "]" would end the [REFERRAL ...] code (RFC 3501 resp-text-code): proxied instead (probe j3 F2)."""
    raw = {"proxy": {"listen": ["tcp:1143:interface=127.0.0.1"], "hostname": "proxy.test", "login_referrals": True},
           "backends": {"v6": {"endpoint": "tcp:host=127.0.0.9:port=1143", "url": url, "login_referral": True},
                        "b3": {"endpoint": "tcp:host=127.0.0.9:port=1143", "url": "imap://10.9.9.9:143"}},
           "map": {"default": "v6"}}
    config = parse_config(raw, base=Path("/tmp"))
    assert not referable(config, config.backends["v6"])
    assert mailbox_urls(config, Route(("v6", "b3")), "alice", b"S/x") == ["imap://alice;AUTH=*@10.9.9.9:143/S/x"]
    assert mailbox_urls(config, Route(("v6",)), "alice", b"S/x") == []
    assert not login_referrals_apply(config)


def _loop_proxy(proxy_factory, fleet, members: list[str]):
    """A proxy whose backend "loop" is b3 reached by its endpoint, but whose url is the proxy's own."""
    config = proxy_factory.default_config(rules=[{"mailbox": "Loop/*", "backend": members}])
    port = int(config["proxy"]["listen"][0].split(":")[1])
    config["backends"]["loop"] = {"endpoint": fleet["b3"].endpoint, "url": f"imap://127.0.0.1:{port}", "tls": "none"}
    return proxy_factory(proxy_factory.toml(config))


@pytest.mark.parametrize("members", [["b3", "loop"], ["loop", "b3"]])
def test_replica_set_with_the_proxy_as_a_member_refers_only_to_the_others(proxy_factory, fleet, members):
    with fleet["b3"].client("alice") as m:
        m.create("Loop/Box")
    proxy = _loop_proxy(proxy_factory, fleet, members)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.cmd(b"r", b'RLIST "" "*"')
    b3 = fleet["b3"]
    url = b"imap://alice;AUTH=*@%s:%d/Loop/Box" % (b3.host.encode(), b3.port)
    for tag, command in [(b"s", b"SELECT Loop/Box"), (b"t", b"STATUS Loop/Box (MESSAGES)"), (b"c", b"CREATE Loop/New")]:
        reply = w.cmd(tag, command)
        assert reply == [tag + b" NO [REFERRAL " + url.replace(b"Loop/Box", command.split()[1]) + b"] Remote mailbox\r\n"]
        # the loop member's url (the proxy's own address; b3 may have the same port on 127.0.0.4)
        assert b"@127.0.0.1:%d/" % proxy.port not in reply[0]
    w.close()


def test_a_mailbox_only_the_proxy_itself_would_be_named_for_is_proxied(proxy_factory, fleet):
    with fleet["b3"].client("alice") as m:
        m.create("Loop/Box")
        m.append("Loop/Box", "", None, b"Subject: looped\r\n\r\nhere\r\n")
    proxy = _loop_proxy(proxy_factory, fleet, ["loop"])
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.cmd(b"r", b'RLIST "" "*"')  # referral-aware: still no referral to itself
    reply = w.cmd(b"s", b"SELECT Loop/Box")
    assert reply[-1].startswith(b"s OK") and b"* 1 EXISTS\r\n" in reply, reply
    assert w.cmd(b"n", b"RENAME Loop/Box Loop/Other")[-1].startswith(b"n OK")  # no pair naming the proxy either
    w.close()


# -- COPY with nothing selected; names that are not valid modified UTF-7 ----------------------


def test_copy_with_nothing_selected_is_bad_as_with_dovecot(proxy_factory, fleet):
    proxy = proxy_factory(rules=RULES)
    answers = []
    for host, port in ((fleet["b1"].host, fleet["b1"].port), (proxy.host, proxy.port)):
        w = Wire(host, port)
        w.login()
        w.send(b'r RLIST "" "*"\r\n')  # aware through the proxy; BAD from Dovecot, ignored
        w.until_tagged(b"r")
        answers.append([_same(line) for tag in (b"c", b"u", b"m") for line in
                        w.cmd(tag, b"%s 1 Shared/X" % {b"c": b"COPY", b"u": b"UID COPY", b"m": b"MOVE"}[tag])])
        w.close()
    assert answers[1] == answers[0]
    assert answers[0][0] == b"c BAD No mailbox selected.\r\n"


_BAD_NAMES = [b'"Shared/&Jjo"', b'"Shared/Caf\xe9"', b'"Shared/Caf\xc3\xa9"', b'"Shared/&AOk"', b'"Shared/&AGE-"',
              b"{10+}\r\nShared/x\ry",
              b'"Shared/&AOk-&AOk-"', b'"Shared/x&AOk-&AOk-y"',  # a shift right after another (answers19)
              # A "." or ".." segment: its URL resolves elsewhere (imap://h/Shared/x/.. is imap://h/Shared/)
              b'"Shared/x/.."', b'"Shared/./x"', b'"Shared/.."',
              b'"Shared//x"', b'"Shared/x//"']  # an empty level: Dovecot's "Has adjacent hierarchy separators"


def _commands(name: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"s", b"SELECT " + name), (b"e", b"EXAMINE " + name), (b"t", b"STATUS %s (MESSAGES)" % name),
            (b"c", b"CREATE " + name), (b"d", b"DELETE " + name), (b"b", b"SUBSCRIBE " + name),
            (b"u", b"UNSUBSCRIBE " + name), (b"n", b"RENAME Work " + name), (b"a", b"APPEND %s {5+}\r\nhello" % name),
            (b"i", b"SELECT INBOX"), (b"k", b"COPY 1 " + name)]


def _direct_and_through(fleet, proxy, commands: list[tuple[bytes, bytes]]) -> list[list[bytes]]:
    """The last line of each of *commands* sent in a referral-aware session (after RLIST) straight to b3,
    and through *proxy*."""
    answers = []
    for host, port in ((fleet["b3"].host, fleet["b3"].port), (proxy.host, proxy.port)):
        w = Wire(host, port)
        w.login()
        w.cmd(b"r", b'RLIST "" "*"')
        answers.append([_same(w.cmd(tag, command)[-1]) for tag, command in commands])
        w.close()
    return answers


@pytest.mark.parametrize("name", _BAD_NAMES)
def test_invalid_names_are_refused_as_dovecot_refuses_them_never_referred(proxy_factory, fleet, name):
    for backend in ("b1", "b3"):
        with fleet[backend].client("alice") as m:
            m.create("Work")
            m.append("INBOX", "", None, b"Subject: one\r\n\r\none\r\n")
    direct, through = _direct_and_through(fleet, proxy_factory(rules=RULES), _commands(name))
    assert not any(b"REFERRAL" in line for line in through), through
    for d, t in zip(direct, through):
        if t.startswith((b"i ", b"k ")):
            assert t.split()[:2] == d.split()[:2], (d, t)  # SELECT INBOX; the COPY is the proxy's own
        else:
            assert t == d, (d, t)


def test_a_name_ending_with_the_separator_is_not_referred_where_only_create_takes_it(proxy_factory, fleet):
    """``Shared/x/``: CREATE takes it (RFC 3501 6.3.3: it makes Shared/x), every other command of Dovecot's
    refuses it (``Ends with hierarchy separator``): proxied and so refused, never referred (probe g3)."""
    with fleet["b3"].client("alice") as m:
        m.create("Shared/x")
    direct, through = _direct_and_through(fleet, proxy_factory(rules=RULES), _commands(b'"Shared/x/"')[:3])
    assert direct == through and all(b"Ends with hierarchy separator" in line for line in direct), (direct, through)


def test_utf8_names_are_valid_once_utf8_accept_is_enabled_where_the_home_backend_announces_it():
    """A UTF-8 name is one a client may send (and a referral carries, as UTF-8 in its URL) after ENABLE
    UTF8=ACCEPT, when the home backend announces UTF8=ACCEPT; where it does not (Dovecot 2.3, the test
    fleet) the ENABLE enabled nothing and such a name is proxied and refused there as directly
    (test_referral_edges.py). The URL of a UTF-8 name is its UTF-8, percent-encoded."""
    from functools import partial
    from types import SimpleNamespace

    from referral_proxy.imap.url import imap_url
    from referral_proxy.mailboxes import MailboxCommands
    from referral_proxy.pool import BackendPool

    for announced, enabled, valid in [(True, True, True), (False, True, False), (True, False, False)]:
        ctx = SimpleNamespace(backend_caps={"b1": frozenset({"IMAP4REV1"} | ({"UTF8=ACCEPT"} if announced else set()))})
        pool = SimpleNamespace(enabled=(b"UTF8=ACCEPT",) if enabled else (), ctx=ctx)
        pool.enabled_where_announced = partial(BackendPool.enabled_where_announced, pool)
        host = SimpleNamespace(home="b1", pool=pool, ctx=ctx, mailbox_map=SimpleNamespace(separator="/"))
        commands = MailboxCommands(host)  # type: ignore[arg-type]
        assert commands.valid_name("Shared/Café".encode()) is valid
        assert commands.valid_name(b"Shared/Caf&AOk-")
    assert parse_imap_url(imap_url("h", None, "alice", "Shared/Café".encode()))[3] == "Shared/Café"


# -- RFC 2221: a login referral is a tagged OK: the proxy serves the user all the same ----------


def test_login_referral_is_a_tagged_ok_and_the_session_goes_on(proxy_factory, fleet):
    with fleet["b2"].client("bob") as m:
        m.append("INBOX", "", None, b"Subject: bob's\r\n\r\nhere\r\n")
    proxy = proxy_factory({"proxy": {"login_referrals": True}, "backends": {"b2": {"login_referral": True}}},
                          rules=[{"user": "bob", "mailbox": "*", "backend": "b2"}])
    w = Wire(proxy.host, proxy.port)
    assert b"LOGIN-REFERRALS" in w.greeting
    b2 = fleet["b2"]
    reply = w.cmd(b"l", b"LOGIN bob secret")
    assert reply[0].startswith(b"* CAPABILITY IMAP4rev1 ")
    assert reply[1] == b"l OK [REFERRAL imap://bob;AUTH=*@%s:%d/] Logged in; your mail server is %s\r\n" % (
        b2.host.encode(), b2.port, b2.host.encode())
    select = w.cmd(b"s", b"SELECT INBOX")
    assert select[-1].startswith(b"s OK") and b"* 1 EXISTS\r\n" in select
    w.close()
    w = Wire(proxy.host, proxy.port)
    assert w.cmd(b"m", b"LOGIN bob wrong")[0].startswith(b"m NO [AUTHENTICATIONFAILED]")  # never referred
    w.close()


def test_no_login_referral_to_the_proxy_itself(proxy_factory, fleet):
    """RFC 2221 3: a referral SHOULD NOT lead to a server that refers again: never the proxy itself."""
    config = proxy_factory.default_config(rules=[{"user": "bob", "mailbox": "*", "backend": "b2"}])
    port = int(config["proxy"]["listen"][0].split(":")[1])
    config["proxy"]["login_referrals"] = True
    config["backends"]["b2"].update(url=f"imap://127.0.0.1:{port}", login_referral=True)
    proxy = proxy_factory(proxy_factory.toml(config))
    w = Wire(proxy.host, proxy.port)
    reply = w.cmd(b"l", b"LOGIN bob secret")
    assert reply[-1].startswith(b"l OK [CAPABILITY ") and b"[REFERRAL" not in b"".join(reply), reply
    w.close()


@pytest.mark.parametrize("flagged, own_url, announced", [(False, False, False), (True, True, False), (True, False, True)])
def test_login_referrals_is_announced_exactly_when_a_login_may_be_referred(proxy_factory, fleet, flagged, own_url,
                                                                          announced):
    """RFC 2221 3 (referral19): with ``login_referrals`` on but no backend to refer a login to (none has
    ``login_referral``, or the one that has is the proxy itself), main announced LOGIN-REFERRALS in the
    greeting and CAPABILITY all the same; no login was ever referred."""
    config = proxy_factory.default_config(rules=[{"user": "bob", "mailbox": "*", "backend": "b2"}])
    config["proxy"]["login_referrals"] = True
    if flagged:
        config["backends"]["b2"]["login_referral"] = True
    if own_url:
        config["backends"]["b2"]["url"] = "imap://127.0.0.1:%s" % config["proxy"]["listen"][0].split(":")[1]
    proxy = proxy_factory(proxy_factory.toml(config))
    w = Wire(proxy.host, proxy.port)
    caps = w.cmd(b"c", b"CAPABILITY")[0]
    assert (b"LOGIN-REFERRALS" in w.greeting, b" LOGIN-REFERRALS" in caps) == (announced, announced), (w.greeting, caps)
    reply = w.cmd(b"l", b"LOGIN bob secret")
    assert (b"[REFERRAL " in reply[-1]) == announced, reply
    w.close()


# -- a mailbox a move holds is never referred ---------------------------------------------------


def test_a_mailbox_a_move_holds_is_in_use_not_referred(proxy_factory, fleet):
    """main answered a referral-aware client's RENAME of a mailbox a move holds (either name) with the
    pair of urls before it looked at the hold: the client would rename it on the backend itself
    while the move reads it. SELECT, STATUS, DELETE, APPEND, COPY said NO [INUSE] already."""
    from storehelp import REACTOR, now

    from referral_proxy.config import load_config
    from referral_proxy.journal import Reservation, Step
    from referral_proxy.openstore import open_store

    with fleet["b3"].client("alice") as m:
        m.create("Shared/W")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login()
    w.cmd(b"r", b'RLIST "" "*"')
    store = open_store(load_config(proxy.config_path).map.store, REACTOR)
    store.start()
    entry = now(store.begin_move("alice", "rename", [Reservation("Shared/W", subtree=True)], {}, "x", "/"))
    now(store.journal_step(entry, Step.PLANNED, {}, "x"))  # under way: refused at once, not after holds.WAIT
    now(store.settle())
    for command in (b"RENAME Shared/W Shared/Z", b"RENAME Shared/W Local", b"RENAME Shared/Y Shared/W/kid",
                    b"SELECT Shared/W", b"STATUS Shared/W (MESSAGES)", b"DELETE Shared/W",
                    b"APPEND Shared/W {5+}\r\nhello"):
        assert w.cmd(b"m", command)[-1].startswith(b"m NO [INUSE]"), command
    now(store.end_move(entry))
    now(store.settle())
    now(store.close())
    assert w.cmd(b"n", b"RENAME Shared/W Shared/Z")[-1].startswith(b"n NO [REFERRAL imap://alice;AUTH=*@")
    w.close()
    with fleet["b3"].client("alice") as m:
        assert m.select("Shared/W")[0] == "OK"  # nothing renamed it


def test_status_of_a_name_a_mailbox_move_carries_is_referred_where_the_view_shows_it(proxy_factory, fleet):
    """STATUS of a name a mailbox move holds is answered from the move's view (moveview.py): for a
    referral-aware session, the backend that shows the name is referred as STATUS of any of its
    mailboxes is, not proxied (on the code before: proxied, OK, for a session that refers)."""
    from storehelp import REACTOR, now

    from referral_proxy.config import load_config
    from referral_proxy.journal import Reservation, Step
    from referral_proxy.openstore import open_store

    with fleet["b3"].client("alice") as m:
        m.create("Shared/W")
    with fleet["b1"].client("alice") as m:
        m.create("Work")
    proxy = proxy_factory(rules=RULES)
    aware, plain = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    aware.login()
    plain.login()
    aware.cmd(b"r", b'RLIST "" "*"')  # referral-aware from now on
    store = open_store(load_config(proxy.config_path).map.store, REACTOR)
    store.start()
    names = [Reservation("Work", subtree=True), Reservation("Shared/W", subtree=True),
             Reservation("referral-proxy-aside-test")]
    data = {"src": "b1", "dst": "b3", "pairs": [["Work", "Shared/W"]]}
    entry = now(store.begin_move("alice", "move", names, data, "x", "/"))
    now(store.journal_step(entry, Step.COMMITTED, data, "x"))
    now(store.settle())
    try:
        referred = aware.cmd(b"s", b"STATUS Shared/W (MESSAGES)")
        assert referred[-1].startswith(b"s NO [REFERRAL imap://alice;AUTH=*@"), referred
        assert b"Shared/W" in referred[-1] and fleet["b3"].host.encode() in referred[-1]
        assert plain.cmd(b"s", b"STATUS Shared/W (MESSAGES)")[-1].startswith(b"s OK")  # proxied: b3's
        for w in (aware, plain):  # the old name is no mailbox past the commit point
            assert w.cmd(b"t", b"STATUS Work (MESSAGES)")[-1].startswith(b"t NO Mailbox doesn't exist")
    finally:
        now(store.end_move(entry))
        now(store.settle())
        now(store.close())
    aware.close()
    plain.close()


# -- a referral-aware client following the URL lands on the mailbox it asked for ------------------

_ODD = ["Shared/a%b", "Shared/a*b", 'Shared/q"x', "Shared/b\\s", "Shared/semi;UID=3", "Shared/q?x", "Shared/h#x",
        "Shared/sp ace", "Shared/Café", "Shared/☺/kid", "Shared/a&b", "Shared/%2F", "Shared/{x}", "Shared/]",
        "Shared/a,b=c+d!$'()~", "Shared/tab@at:colon"]


def _astring(name: bytes) -> bytes:
    from referral_proxy.imap.grammar import encode_astring

    return encode_astring(name) or b"{%d+}\r\n" % len(name) + name


@pytest.mark.parametrize("login", ["alice", "ALICE"])
def test_following_each_referral_url_opens_the_mailbox_referred(proxy_factory, fleet, login):
    """Every command that refers (SELECT, EXAMINE, STATUS, CREATE's sibling DELETE, SUBSCRIBE, APPEND)
    names a URL that, parsed back (imap/url.py) and followed on the backend it names (LOGIN as its
    user, the name encoded to modified UTF-7 again), opens that very mailbox: the same UIDVALIDITY
    as on b3 directly. Names with every byte RFC 5092 escapes, a login in upper case."""
    from referral_proxy.imap import mutf7

    b3 = fleet["b3"]
    direct = {}
    with b3.client("alice") as m:
        for name in _ODD:
            wire = mutf7.encode(name)
            assert m._simple_command("CREATE", _astring(wire).decode("ascii", "surrogateescape"))[0] == "OK", name
            typ, data = m._simple_command("STATUS", _astring(wire).decode("ascii", "surrogateescape"), "(UIDVALIDITY)")
            direct[name] = re.search(rb"UIDVALIDITY (\d+)", m.untagged_responses.pop("STATUS")[-1]).group(1)
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login(login)
    w.cmd(b"r", b'RLIST "" "*"')
    for name in _ODD:
        box = _astring(mutf7.encode(name))
        for tag, command in ((b"s", b"SELECT " + box), (b"e", b"EXAMINE " + box), (b"t", b"STATUS %s (MESSAGES)" % box),
                             (b"d", b"DELETE " + box), (b"b", b"SUBSCRIBE " + box), (b"a", b"APPEND %s {1}" % box)):
            line = w.cmd(tag, command)[-1]
            m = re.fullmatch(rb"%s NO \[REFERRAL (\S+)\] Remote mailbox\r\n" % tag, line)
            assert m, (name, line)
            user, host, port, mailbox = parse_imap_url(m.group(1).decode("ascii"))
            assert (user, host, port, mailbox) == ("alice", b3.host, b3.port, name), m.group(1)
        followed = Wire(host, port)
        followed.login(user)
        reply = followed.cmd(b"x", b"EXAMINE " + _astring(mutf7.encode(mailbox)))
        followed.close()
        assert reply[-1].startswith(b"x OK"), (name, reply)
        assert b"[UIDVALIDITY %s]" % direct[name] in b"".join(reply), (name, reply)
    w.close()


# -- users whose names RFC 5092 escapes in the URL's iuserinfo -------------------------------------

_ODD_USERS = {"o@x.example": "pw1", "p%q": "pw2", "s;t": "pw3", "mixed": "pw4", "a b+c": "pw5"}


@pytest.fixture(scope="module")
def odd_user_fleet():
    """Two Dovecots (home, and Shared/* elsewhere) whose users have "@", "%", ";", a space in
    their names (``auth_username_chars`` emptied: Dovecot's default refuses "%" and ";")."""
    from conftest import dovecot_root

    from referral_proxy.fleet import Dovecot

    pair = [Dovecot(f"oddusers{i}", f"127.0.0.{11 + i}", dovecot_root() / f"oddusers{i}", users=_ODD_USERS,
                    extra_config="auth_username_chars =\n") for i in range(2)]
    for d in pair:
        d.start()
    yield pair
    for d in pair:
        d.stop()


@pytest.mark.parametrize("login, user", [("o@x.example", "o@x.example"), ("p%q", "p%q"), ("s;t", "s;t"),
                                         ("MiXeD", "mixed"), ("a b+c", "a b+c")])
def test_users_with_odd_characters_follow_their_referrals_and_login_referrals(proxy_factory, odd_user_fleet,
                                                                             login, user):
    home, remote = odd_user_fleet
    direct = Wire(remote.host, remote.port)  # imaplib sends a user name with a space unquoted
    direct.cmd(b"L", b'LOGIN "%s" "%s"' % (user.encode(), _ODD_USERS[user].encode()))
    direct.cmd(b"c", b"CREATE Shared/Box")
    direct.close()
    config = {"backends": {"h": {"endpoint": home.endpoint, "url": home.url, "login_referral": True},
                           "r": {"endpoint": remote.endpoint, "url": remote.url}},
              "map": {"default": "h", "rules": [{"mailbox": "Shared/*", "backend": "r"}]}}
    proxy = proxy_factory(config, login_referrals=True)
    w = Wire(proxy.host, proxy.port)
    reply = w.cmd(b"L", b'LOGIN "%s" "%s"' % (login.encode(), _ODD_USERS[user].encode()))
    m = re.match(rb"L OK \[REFERRAL (\S+)\]", reply[-1])
    assert m, reply
    assert parse_imap_url(m.group(1).decode())[:3] == (user, home.host, home.port), m.group(1)
    w.cmd(b"r", b'RLIST "" "*"')
    reply = w.cmd(b"s", b"SELECT Shared/Box")
    w.close()
    m = re.fullmatch(rb"s NO \[REFERRAL (\S+)\] Remote mailbox\r\n", reply[-1])
    assert m, reply
    url_user, host, port, mailbox = parse_imap_url(m.group(1).decode("ascii"))
    assert (url_user, host, port, mailbox) == (user, remote.host, remote.port, "Shared/Box"), m.group(1)
    followed = Wire(host, port)
    assert followed.cmd(b"L", b'LOGIN "%s" "%s"' % (url_user.encode(), _ODD_USERS[user].encode()))[-1].startswith(b"L OK")
    assert followed.cmd(b"x", b"EXAMINE Shared/Box")[-1].startswith(b"x OK")
    followed.close()
