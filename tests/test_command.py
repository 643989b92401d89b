"""Tests of referral_proxy.imap.command: command heads and argument tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_proxy.imap.command import (
    Atom,
    CommandStart,
    ParenList,
    ParseError,
    String,
    astring_value,
    parse_arguments,
    parse_command_start,
    tag_of,
)
from referral_proxy.imap.quoting import quoted

# -- command heads -------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"A1 NOOP", CommandStart(b"A1", "NOOP", b"")),
        (b"a001 login bob secret", CommandStart(b"a001", "LOGIN", b"bob secret")),
        (b"A2 uid fetch 1:* (FLAGS)", CommandStart(b"A2", "UID FETCH", b"1:* (FLAGS)")),
        (b"A3 UID COPY 1 other", CommandStart(b"A3", "UID COPY", b"1 other")),
        (b"A4 UID EXPUNGE", CommandStart(b"A4", "UID EXPUNGE", b"")),
        (b"A5 APPEND saved ", CommandStart(b"A5", "APPEND", b"saved ")),
        (b"A5 CHECK ", CommandStart(b"A5", "CHECK", b"")),
        (b"A6 LIST  \"\" *", CommandStart(b"A6", "LIST", b' "" *')),
        (b"x-y.z]1 X-FOO-2 a", CommandStart(b"x-y.z]1", "X-FOO-2", b"a")),
        (b"[tag] NOOP", CommandStart(b"[tag]", "NOOP", b"")),
        (b"A7 RLIST \"\" %", CommandStart(b"A7", "RLIST", b'"" %')),
    ],
)
def test_parse_command_start(data, expected):
    assert parse_command_start(data) == expected


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "missing tag"),
        (b" NOOP", "missing tag"),
        (b"+ NOOP", "invalid tag"),
        (b"* NOOP", "invalid tag"),
        (b"(a) NOOP", "invalid tag"),
        (b"A1", "missing command name"),
        (b"A1 ", "missing command name"),
        (b"A1  NOOP", "missing command name"),
        (b"A+1 NOOP", "invalid character in tag"),
        (b"A*1 NOOP", "invalid character in tag"),
        (b'A"1 NOOP', "invalid character in tag"),
        (b"A\\1 NOOP", "invalid character in tag"),
        (b"A{1 NOOP", "invalid character in tag"),
        (b"A%1 NOOP", "invalid character in tag"),
        (b"A\x011 NOOP", "invalid character in tag"),
        (b"A\xe91 NOOP", "invalid character in tag"),
        (b"A1 NO(OP", "invalid command name"),
        (b"A1 \"NOOP\"", "invalid command name"),
        (b"A1 UID", "missing command after UID"),
        (b"A1 UID ", "missing command after UID"),
        (b"A1 UID *", "invalid command name"),
    ],
)
def test_parse_command_start_errors(data, reason):
    with pytest.raises(ParseError) as info:
        parse_command_start(data)
    assert str(info.value) == reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "data, tag",
    [
        (b"A1 NOOP", b"A1"),
        (b"A1", b"A1"),
        (b"A1 (((", b"A1"),
        (b"a]b {5}", b"a]b"),
        (b"", None),
        (b" A1", None),
        (b"* OK", None),
        (b"+ go", None),
        (b"A1(x", None),
        (b"A1+ NOOP", None),
    ],
)
def test_tag_of(data, tag):
    assert tag_of(data) == tag


# -- arguments -------------------------------------------------------------------


def args(text: bytes, *literals: bytes):
    """Parse ``text`` where each "\\x00LIT" marks the place of the next literal."""
    fragments = text.split(b"\x00LIT")
    return parse_arguments(fragments, literals)


A, Q, P = Atom, String, lambda *items: ParenList(tuple(items))


@pytest.mark.parametrize(
    "text, literals, expected",
    [
        (b"", (), []),
        (b"bob secret", (), [A(b"bob"), A(b"secret")]),
        (b"  bob   secret  ", (), [A(b"bob"), A(b"secret")]),
        (b'"" *', (), [Q(b""), A(b"*")]),
        (b'"a \\"b\\" \\\\c" x', (), [Q(b'a "b" \\c'), A(b"x")]),
        (b'"caf\xc3\xa9"', (), [Q(b"caf\xc3\xa9")]),
        (b"NIL 42 1:*,3 \\Seen $Junk", (), [A(b"NIL"), A(b"42"), A(b"1:*,3"), A(b"\\Seen"), A(b"$Junk")]),
        (b"saved (\\Seen \\Draft) \"date\"", (), [A(b"saved"), P(A(b"\\Seen"), A(b"\\Draft")), Q(b"date")]),
        (b"()", (), [P()]),
        (b"( a ( b (c) ) )", (), [P(A(b"a"), P(A(b"b"), P(A(b"c"))))]),
        (b"(a (b)) c", (), [P(A(b"a"), P(A(b"b"))), A(b"c")]),
        (
            b"1:5 (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100> BODY[])",
            (),
            [A(b"1:5"), P(A(b"FLAGS"), A(b"BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>"), A(b"BODY[]"))],
        ),
        (b"1 BODY[1.2.MIME] BINARY.PEEK[1]<0.5>", (), [A(b"1"), A(b"BODY[1.2.MIME]"), A(b"BINARY.PEEK[1]<0.5>")]),
        (b"BODY[a[b]c] x", (), [A(b"BODY[a[b]c]"), A(b"x")]),
        (b"a]b", (), [A(b"a]b")]),
        (b"x{y", (), [A(b"x{y")]),
        (b"a[b [ c[d[e] BODY[HEADER", (), [A(b"a[b"), A(b"["), A(b"c[d[e]"), A(b"BODY[HEADER")]),
        (b"(a[) b", (), [P(A(b"a[")), A(b"b")]),
        (b"\x00LIT \x00LIT", (b"bob", b"p a s s\r\n"), [Q(b"bob", True), Q(b"p a s s\r\n", True)]),
        (
            b"saved (\\Seen) \x00LIT \x00LIT \"x\" \x00LIT",
            (b"hello", b"world!", b""),
            [A(b"saved"), P(A(b"\\Seen")), Q(b"hello", True), Q(b"world!", True), Q(b"x"), Q(b"", True)],
        ),
        (b"(\x00LIT \x00LIT)", (b"a", b"b"), [P(Q(b"a", True), Q(b"b", True))]),
        (b"(\x00LIT)", (b"(", ), [P(Q(b"(", True))]),
    ],
)
def test_parse_arguments(text, literals, expected):
    result = args(text, *literals)
    assert result == expected
    assert all(type(tok) in (Atom, String, ParenList) for tok in result)


@pytest.mark.parametrize(
    "text, literals, reason",
    [
        (b"(a", (), "unbalanced parentheses"),
        (b"a)", (), "unbalanced parentheses"),
        (b"((a)", (), "unbalanced parentheses"),
        (b"(\x00LIT", (b"x",), "unbalanced parentheses"),
        (b'"abc', (), "unterminated quoted string"),
        (b'"ab\\', (), "invalid escape in quoted string"),
        (b'"a\\nb"', (), "invalid escape in quoted string"),
        (b'"a\rb"', (), "invalid character in quoted string"),
        (b'"a\x00b"', (), "invalid character in quoted string"),
        (b"BODY[HEADER.FIELDS (FROM TO", (), "unbalanced parentheses"),
        (b"BODY[a\rb]", (), "invalid character in arguments"),
        (b'"a"b', (), "missing space between arguments"),
        (b"a\"b\"", (), "missing space between arguments"),
        (b"(a)(b)", (), "missing space between arguments"),
        (b"a(b)", (), "missing space between arguments"),
        (b"a\x00LIT", (b"x",), "missing space before literal"),
        (b"\x00LIT\x00LIT", (b"x", b"y"), "missing space before literal"),
        (b"\x00LITa", (b"x",), "missing space between arguments"),
        (b"a \rb", (), "invalid character in arguments"),
        (b"a \x00", (), "invalid character in arguments"),
    ],
)
def test_parse_arguments_errors(text, literals, reason):
    with pytest.raises(ParseError) as info:
        args(text, *literals)
    assert str(info.value) == reason


def test_parse_arguments_needs_matching_counts():
    with pytest.raises(ValueError, match="one more fragment"):
        parse_arguments([b"a", b"b"], [])


def test_astring_value():
    assert astring_value(Atom(b"INBOX")) == b"INBOX"
    assert astring_value(String(b"a b")) == b"a b"
    assert astring_value(String(b"x\r\n", literal=True)) == b"x\r\n"
    with pytest.raises(ParseError, match="expected a string"):
        astring_value(ParenList((Atom(b"a"),)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 127).filter(lambda c: c not in (10, 13)), max_size=20).map(bytes), max_size=6))
def test_quoted_strings_round_trip(values):
    text = b" ".join(quoted(v) for v in values)
    assert parse_arguments([text], []) == [String(v) for v in values]
