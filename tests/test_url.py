"""Tests of referral_proxy.imap.url (RFC 5092 IMAP URLs for RFC 2193 referrals)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from referral_proxy.imap import mutf7
from referral_proxy.imap.url import has_dot_segment, imap_url, parse_imap_url


@pytest.mark.parametrize(
    "args, url",
    [
        # The cases the session's referrals rely on.
        (("127.0.0.3", 1143, "alice", b"Shared/Projects"), "imap://alice;AUTH=*@127.0.0.3:1143/Shared/Projects"),
        (("127.0.0.3", 1143, "alice", b"Caf&AOk-"), "imap://alice;AUTH=*@127.0.0.3:1143/Caf%C3%A9"),
        (("h", None, "a;b@c/d e%", b"My Box"), "imap://a%3Bb%40c%2Fd%20e%25;AUTH=*@h/My%20Box"),
        (("h", 143, "bob", None), "imap://bob;AUTH=*@h:143/"),
        # RFC 5092 section 6's example, from the modified UTF-7 of RFC 3501.
        (
            ("psicorp.example.org", None, None, b"~peter/&ZeVnLIqe-/&U,BTFw-"),
            "imap://psicorp.example.org/~peter/%E6%97%A5%E6%9C%AC%E8%AA%9E/%E5%8F%B0%E5%8C%97",
        ),
        (("h", None, None, b"INBOX"), "imap://h/INBOX"),
        (("h", 993, None, None), "imap://h:993/"),
        (("h", 0, "u", b"x"), "imap://u;AUTH=*@h:0/x"),
        (("::1", 143, "a", b"INBOX"), "imap://a;AUTH=*@[::1]:143/INBOX"),
        (("[2001:db8::7]", None, None, b"INBOX"), "imap://[2001:db8::7]/INBOX"),
        (("fe80::1%eth0", None, None, b"x"), "imap://[fe80::1%25eth0]/x"),
        # "&-" is "&" in modified UTF-7 and "&" is a bchar.
        (("h", None, "u", b"R&-D"), "imap://u;AUTH=*@h/R&D"),
        # Astral plane: one four-byte UTF-8 sequence, not two surrogates.
        (("h", None, "u", b"&2D3eAA-"), "imap://u;AUTH=*@h/%F0%9F%98%80"),
        # A user name in UTF-8.
        (("h", None, "józef", b"x"), "imap://j%C3%B3zef;AUTH=*@h/x"),
    ],
)
def test_imap_url(args, url):
    assert imap_url(*args) == url


def test_auth_type():
    assert imap_url("h", None, "u", b"x", auth="GSSAPI") == "imap://u;AUTH=GSSAPI@h/x"


@pytest.mark.parametrize(
    "mailbox, enc",
    [
        # Not modified UTF-7: the raw bytes are percent-encoded.
        (b"Caf\xc3\xa9", "Caf%C3%A9"),
        (b"\xff", "%FF"),
        (b"a&b", "a&b"),
        (b"50%", "50%25"),
        (b"&AGE-", "&AGE-"),
    ],
)
def test_mailbox_not_modified_utf7(mailbox, enc):
    assert imap_url("h", None, None, mailbox) == "imap://h/" + enc


BCHAR_LITERAL = "abcXYZ019-._~!$'()*+,&=:@/"
BCHAR_ENCODED = {ch: f"%{ord(ch):02X}" for ch in ' ;?#%"<>[]{}|\\^`'}


@pytest.mark.parametrize("ch", BCHAR_LITERAL)
def test_mailbox_bchar_kept(ch):
    assert imap_url("h", None, None, mutf7.encode("x" + ch)) == "imap://h/x" + ch


@pytest.mark.parametrize("ch, enc", BCHAR_ENCODED.items())
def test_mailbox_other_chars_encoded(ch, enc):
    assert imap_url("h", None, None, mutf7.encode("x" + ch)) == "imap://h/x" + enc


@pytest.mark.parametrize("ch", "abcXYZ019-._~!$'()*+,&=")
def test_user_achar_kept(ch):
    assert imap_url("h", None, "u" + ch, b"x") == f"imap://u{ch};AUTH=*@h/x"


@pytest.mark.parametrize("ch", ' :@/;?#%"<>[]{}|\\^`\x00\x7f')
def test_user_other_chars_encoded(ch):
    assert imap_url("h", None, "u" + ch, b"x") == f"imap://u%{ord(ch):02X};AUTH=*@h/x"


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (("h", None, "", b"x"), {}),
        (("h", None, "u", b"x"), {"auth": ""}),
        (("h", None, "u", b""), {}),
        (("h", -1, "u", b"x"), {}),
        (("h", 65536, "u", b"x"), {}),
        (("", None, "u", b"x"), {}),
        (("h/x", None, "u", b"x"), {}),
        (("u@h", None, "u", b"x"), {}),
        (("h:143", None, "u", b"x"), {}),
        (("[h]", None, "u", b"x"), {}),
    ],
)
def test_imap_url_rejects(args, kwargs):
    with pytest.raises(ValueError):
        imap_url(*args, **kwargs)


@pytest.mark.parametrize(
    "url, parts",
    [
        # RFC 2193's examples.
        ("IMAP://user;AUTH=*@SERVER2/REMOTE", ("user", "SERVER2", None, "REMOTE")),
        ("IMAP://user;AUTH=*@SERVER2/SHARED/FOO", ("user", "SERVER2", None, "SHARED/FOO")),
        # RFC 5092's examples.
        (
            "imap://minbari.example.org/gray-council;UIDVALIDITY=385759045/;UID=20/;PARTIAL=0.1024",
            (None, "minbari.example.org", None, "gray-council"),
        ),
        ("imap://michael@minbari.example.org/users.*", ("michael", "minbari.example.org", None, "users.*")),
        (
            "imap://;AUTH=*@minbari.example.org/gray%20council?SUBJECT%20shadows",
            (None, "minbari.example.org", None, "gray council"),
        ),
        (
            "imap://psicorp.example.org/~peter/%E6%97%A5%E6%9C%AC%E8%AA%9E/%E5%8F%B0%E5%8C%97",
            (None, "psicorp.example.org", None, "~peter/日本語/台北"),
        ),
        ("imap://joe@example.com/INBOX/;uid=20/;section=1.2", ("joe", "example.com", None, "INBOX")),
        ("imap://;auth=gssapi@h/x", (None, "h", None, "x")),
        ("imap://a%3Bb%40c%2Fd%20e%25;AUTH=*@h/My%20Box", ("a;b@c/d e%", "h", None, "My Box")),
        ("imap://u;AUTH=*@[::1]:143/INBOX", ("u", "::1", 143, "INBOX")),
        ("imap://[fe80::1%25eth0]/x", (None, "fe80::1%eth0", None, "x")),
        ("imap://bob;AUTH=*@h:143/", ("bob", "h", 143, None)),
        ("imap://h", (None, "h", None, None)),
        ("imap://h:/", (None, "h", None, None)),
        ("imap://h//x", (None, "h", None, "/x")),
        ("imap://h/a%2fb%3B", (None, "h", None, "a/b;")),
    ],
)
def test_parse_imap_url(url, parts):
    assert parse_imap_url(url) == parts


@pytest.mark.parametrize(
    "url",
    [
        "http://h/x",
        "imap:/h/x",
        "imap:///x",
        "imap://@h/x",
        "imap://u;AUTH=@h/x",
        "imap://u;FOO=*@h/x",
        "imap://u;AUTH=*;x@h/x",
        "imap://u v@h/x",
        "imap://u;AUTH=*h/x",
        "imap://h:x/",
        "imap://h:65536/",
        "imap://h:-1/",
        "imap://[::1/x",
        "imap://[::1]x/",
        "imap://[nothex]/x",
        "imap://h/a b",
        "imap://h/a%zz",
        "imap://h/a%2",
        "imap://h/%FF",
        "imap://h/x#frag",
    ],
)
def test_parse_imap_url_rejects(url):
    with pytest.raises(ValueError):
        parse_imap_url(url)


hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,20}\.){0,3}[a-z]{1,10}", fullmatch=True),
    st.ip_addresses().map(str),
)
users = st.one_of(st.none(), st.text(min_size=1))
ports = st.one_of(st.none(), st.integers(0, 65535))
mailboxes = st.one_of(st.none(), st.text(min_size=1))


@given(hosts, ports, users, mailboxes)
def test_round_trip(host, port, user, mailbox):
    wire = None if mailbox is None else mutf7.encode(mailbox)
    assume(wire is None or not has_dot_segment(wire))  # no URL for those (below)
    url = imap_url(host, port, user, wire)
    assert url.isascii() and url.isprintable()
    assert parse_imap_url(url) == (user, host, port, mailbox)


@given(hosts, ports, users, st.binary(min_size=1))
def test_round_trip_of_raw_utf8_names(host, port, user, raw):
    # A name that is not modified UTF-7 goes out as its raw bytes; when those
    # are UTF-8 (a client that ignored RFC 3501), the URL still means them.
    assume(not has_dot_segment(raw))
    url = imap_url(host, port, user, raw)
    try:
        expected = mutf7.decode(raw)
    except ValueError:
        try:
            expected = raw.decode("utf-8")
        except UnicodeDecodeError:
            with pytest.raises(ValueError):
                parse_imap_url(url)
            return
    assert parse_imap_url(url) == (user, host, port, expected)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, as written: what every resolution of a URL does to its path (5.2.2)."""
    out: list[str] = []
    while path:
        if path.startswith(("../", "./")):
            path = path[path.index("/") + 1:]
        elif path.startswith("/./") or path == "/.":
            path = "/" + path[3:]
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4:]
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            cut = path.find("/", 1)
            cut = len(path) if cut < 0 else cut
            out.append(path[:cut])
            path = path[cut:]
    return "".join(out)


@pytest.mark.parametrize("mailbox", [b".", b"..", b"Shared/..", b"Shared/x/..", b"Shared/./x", b"../INBOX"])
def test_a_name_with_a_dot_segment_has_no_url(mailbox):
    """RFC 3986 5.2.2: a client resolving imap://h/Shared/x/.. gets imap://h/Shared/: it would
    open, DELETE or APPEND to another mailbox than the one referred."""
    assert has_dot_segment(mailbox)
    path = "/" + mailbox.decode()
    assert _remove_dot_segments(path) != path  # what a referral-aware client following it would open
    with pytest.raises(ValueError):
        imap_url("h", None, "u", mailbox)


@pytest.mark.parametrize("mailbox", [b"a.", b".a", b"...", b"a..b", b"Shared/.x", b"x/a.b/y"])
def test_dots_that_are_not_a_whole_segment_stay_in_the_url(mailbox):
    assert not has_dot_segment(mailbox)
    url = imap_url("h", None, "u", mailbox)
    assert _remove_dot_segments("/" + mailbox.decode()) == "/" + mailbox.decode()
    assert parse_imap_url(url)[3] == mailbox.decode()


@pytest.mark.parametrize("user", ["j\udce9r", "\udcff", "caf\u00e9\udce9"])
def test_a_login_name_that_is_not_utf8_round_trips_as_its_bytes(user):
    # auth.py reads a LOGIN name of Latin-1 bytes as surrogateescape; its referral names those bytes.
    url = imap_url("h", None, user, b"INBOX")
    assert url.isascii() and ("%E9" in url or "%FF" in url), url
    assert parse_imap_url(url)[0] == user
