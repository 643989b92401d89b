"""Tests of referral_proxy.imap.response: response heads and tag rewriting."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from referral_proxy.imap.command import ParseError
from referral_proxy.imap.response import (
    ResponseStart,
    parse_response_start,
    plain_untagged,
    plain_untagged_lines,
    replace_tag,
)


def status(kind, tag, st, code=None, args=b"", text=b""):
    return ResponseStart(kind, tag, st, code, args, text, None, None, b"")


def untagged(name, rest=b"", number=None):
    return ResponseStart("untagged", None, None, None, b"", b"", name, number, rest)


def cont(text):
    return ResponseStart("continuation", None, None, None, b"", text, None, None, b"")


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"A1 OK LOGIN completed", status("tagged", b"A1", "OK", text=b"LOGIN completed")),
        (b"p7 no [TRYCREATE] no such mailbox", status("tagged", b"p7", "NO", "TRYCREATE", b"", b"no such mailbox")),
        (b"A2 BAD", status("tagged", b"A2", "BAD")),
        (b"A2 OK ", status("tagged", b"A2", "OK")),
        (
            b"A3 OK [APPENDUID 38505 3955:3957] APPEND completed",
            status("tagged", b"A3", "OK", "APPENDUID", b"38505 3955:3957", b"APPEND completed"),
        ),
        (
            b"A4 NO [BADCHARSET (UTF-8 (x))] bad",
            status("tagged", b"A4", "NO", "BADCHARSET", b"(UTF-8 (x))", b"bad"),
        ),
        (
            b"A5 NO [REFERRAL imap://bob;AUTH=*@[::1]:143/a%5Bb%5D imap://h2/x] go there",
            status("tagged", b"A5", "NO", "REFERRAL", b"imap://bob;AUTH=*@[::1]:143/a%5Bb%5D imap://h2/x", b"go there"),
        ),
        (
            b'A6 NO [X-ODD "a ] b" c] text]',
            status("tagged", b"A6", "NO", "X-ODD", b'"a ] b" c', b"text]"),
        ),
        (b"A7 OK [READ-WRITE]", status("tagged", b"A7", "OK", "READ-WRITE")),
        (b"A8 OK [ ALERT ] x", status("tagged", b"A8", "OK", text=b"[ ALERT ] x")),
        (b"A9 OK [ALERT unterminated", status("tagged", b"A9", "OK", text=b"[ALERT unterminated")),
        (
            b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready",
            status("untagged", None, "OK", "CAPABILITY", b"IMAP4rev1 LITERAL+ AUTH=PLAIN", b"ready"),
        ),
        (
            b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited",
            status("untagged", None, "OK", "PERMANENTFLAGS", b"(\\Deleted \\Seen \\*)", b"Limited"),
        ),
        (b"* BYE logging out", status("untagged", None, "BYE", text=b"logging out")),
        (b"* preauth [ALERT]  hi", status("untagged", None, "PREAUTH", "ALERT", b"", b" hi")),
        (b"* CAPABILITY IMAP4rev1 IDLE", untagged("CAPABILITY", b"IMAP4rev1 IDLE")),
        (b'* LIST (\\HasNoChildren) "/" INBOX', untagged("LIST", b'(\\HasNoChildren) "/" INBOX')),
        (b"* 5 EXISTS", untagged("EXISTS", number=5)),
        (b"* 0 recent", untagged("RECENT", number=0)),
        (b"* 3 FETCH (FLAGS (\\Seen) BODY[] ", untagged("FETCH", b"(FLAGS (\\Seen) BODY[] ", 3)),
        (b"* SEARCH", untagged("SEARCH")),
        (b"* SEARCH ", untagged("SEARCH")),
        (b"* ENABLED UTF8=ACCEPT", untagged("ENABLED", b"UTF8=ACCEPT")),
        (b"+ Ready for literal", cont(b"Ready for literal")),
        (b"+ ", cont(b"")),
        (b"+", cont(b"")),
        (b"+dGVzdA==", cont(b"dGVzdA==")),
        (b"+ [ALERT] x", cont(b"[ALERT] x")),
    ],
)
def test_parse_response_start(data, expected):
    assert parse_response_start(data) == expected


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "missing tag"),
        (b"*", "missing space after *"),
        (b"*OK", "missing space after *"),
        (b"* ", "missing response data"),
        (b"* (x)", "missing response data"),
        (b"* 5", "missing name after number"),
        (b"* 5 ", "missing name after number"),
        (b"* LIST(x)", "invalid untagged response name"),
        (b"* OK[ALERT] x", "invalid untagged response name"),
        (b"A1", "missing status"),
        (b"A1 ", "invalid status in tagged response"),
        (b"A1 BYE x", "invalid status in tagged response"),
        (b"A1 FETCH x", "invalid status in tagged response"),
        (b"A1 OK[ALERT]", "invalid status in tagged response"),
        (b"A1 OKx", "invalid status in tagged response"),
        (b"A1(x OK", "missing status"),
        (b"(A1 OK", "invalid tag"),
    ],
)
def test_parse_response_start_errors(data, reason):
    with pytest.raises(ParseError) as info:
        parse_response_start(data)
    assert str(info.value) == reason


def test_replace_tag():
    assert replace_tag(b"p7 OK done", b"A1") == b"A1 OK done"
    assert replace_tag(b"proxy.123 NO [TRYCREATE] x\r\n", b"a") == b"a NO [TRYCREATE] x\r\n"
    assert replace_tag(b"p7", b"A1") == b"A1"
    for bad in (b"* OK x", b"+ go", b" OK", b"", b"p(7 OK"):
        with pytest.raises(ParseError):
            replace_tag(bad, b"A1")
    with pytest.raises(ValueError):
        replace_tag(b"p7 OK", b"A 1")


def test_completion_text_keeps_the_code():
    from referral_proxy.imap.response import completion_text, parse_response_start

    assert completion_text(parse_response_start(b"t1 NO [OVERQUOTA] Quota exceeded")) == "NO [OVERQUOTA] Quota exceeded"
    assert completion_text(parse_response_start(b"t1 BAD [BADCHARSET (UTF-8)] no")) == "BAD [BADCHARSET (UTF-8)] no"
    assert completion_text(parse_response_start(b"t1 NO plain")) == "NO plain"


# -- plain_untagged: what a relay may pass on without parsing --------------------------------

_SPECIAL_NAMES = {"CAPABILITY", "ESEARCH"}


def _needs_a_look(start: ResponseStart) -> bool:
    """What the backend connection and the session do something with (backend._begin,
    session.untagged)."""
    return (start.kind != "untagged" or start.status in ("BYE", "PREAUTH") or start.name in _SPECIAL_NAMES
            or start.code in ("CAPABILITY", "NOUPDATE"))


@pytest.mark.parametrize("data, plain", [
    (b"* 12 FETCH (UID 3 FLAGS (\\Seen))", True), (b"* 3 EXPUNGE", True), (b"* FLAGS (\\Seen)", True),
    (b"* OK [UIDNEXT 9] Predicted next UID", True), (b"* NO [ALERT] careful", True), (b'* LIST () "/" x', True),
    (b"* OK [CAPABILITY IMAP4rev1 IDLE] x", False), (b"* ok [Capability x]", False), (b"* BYE bye", False),
    (b"* bye", False), (b"* CAPABILITY IMAP4rev1", False), (b'* ESEARCH (TAG "a") ALL 1', False),
    (b'* OK [NOUPDATE "a"] x', False), (b"* 12", False), (b"* \x00x", False), (b"* PREAUTH hi", False),
    (b"+ go", False), (b"a1 OK done", False), (b"* !\n", False), (b"* OK\n", False),
])
def test_plain_untagged_examples(data, plain):
    assert plain_untagged(data) is plain


@settings(max_examples=3000, deadline=None)
@given(st.one_of(
    st.binary(max_size=40).map(lambda b: b"* " + b),
    st.tuples(st.sampled_from([b"OK", b"ok", b"NO", b"BAD", b"BYE", b"bye", b"PREAUTH", b"CAPABILITY", b"ESEARCH",
                               b"FLAGS", b"12", b"3 FETCH", b"7", b"capabilityX", b"LIST"]),
              st.sampled_from([b"", b" ", b" [", b" [CAPABILITY", b" [capability ", b" [NOUPDATE]", b" [NOUPDATE ",
                               b" [ALERT] x", b" x", b"\t", b"x", b" [CAPABILITYX] y", b"]", b" (x"]),
              st.binary(max_size=12)).map(lambda t: b"* " + b"".join(t)),
))
def test_plain_untagged_lines_parse_and_need_nothing(data):
    """What plain_untagged passes parses, and is nothing the relay acts on."""
    if plain_untagged(data):
        start = parse_response_start(data)
        assert not _needs_a_look(start), (data, start)


# -- plain_untagged_lines: the fast completion's check of the lines before it, in one match -----

_PIECES = [b"* ", b"*", b"1 ", b"12 ", b"FETCH", b"fetch ", b"EXISTS", b"OK", b"ok", b"NO ", b"BAD", b"BYE", b"PREAUTH",
           b"CAPABILITY", b"ESEARCH ", b"[", b"]", b"NOUPDATE", b"CAPABILITY]", b"[UIDNEXT 4]", b" ", b"(", b")",
           b"{3}", b'"', b"\\", b"x", b"\r", b"\n", b"\r\n", b"\x80", b"\x00", b"%", b"rp1 "]


def _old_head_check(head: bytes) -> bool:
    """What fastpath.completed_plain checked of the lines before the completion, line by line."""
    return head.count(b"\n") == head.count(b"\r\n") and all(plain_untagged(line) for line in head[:-2].split(b"\r\n"))


@settings(max_examples=3000, deadline=None)
@example(head=b"* 1 FETCH (FLAGS ())\r\n* OK [CAPABILITY IMAP4rev1] x\r\n")
@example(head=b"* OK\r\r\n")
@example(head=b"* 3 EXPUNGE\r\n* 4 EXISTS\n")
@example(head=b"* SEARCH\r\n\r\n")
@given(head=st.lists(st.sampled_from(_PIECES), max_size=14).map(b"".join).map(lambda b: b + b"\r\n")
       | st.lists(st.sampled_from(_PIECES), max_size=14).map(b"".join).map(lambda b: b + b"\n"))
def test_plain_untagged_lines_is_plain_untagged_line_by_line(head):
    assert plain_untagged_lines(head) == _old_head_check(head)


def test_plain_untagged_lines():
    assert plain_untagged_lines(b"* 1 FETCH (FLAGS (\\Seen))\r\n* 2 EXPUNGE\r\n* OK [UIDNEXT 4] x\r\n")
    assert plain_untagged_lines(b"")  # no lines: nothing to parse
    for head in (b"* 1 FETCH (FLAGS ())\r\n* BYE\r\n", b"* CAPABILITY IMAP4rev1\r\n", b"* 1 EXISTS\n",
                 b"* OK [NOUPDATE \"a\"] x\r\n", b"* 1 FETCH (FLAGS ())", b'* ESEARCH (TAG "a") ALL 1\r\n'):
        assert not plain_untagged_lines(head), head
