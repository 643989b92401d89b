"""Tests of referral_proxy.imap.quoting, checked against the command parser where possible."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_proxy.imap.command import Atom, String, astring_value, parse_arguments
from referral_proxy.imap.framing import NEED_DATA, Framer, Line, LiteralData
from referral_proxy.imap.quoting import astring, capability_tokens, quoted


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"", b'""'),
        (b"INBOX", b'"INBOX"'),
        (b'a "b" \\c', b'"a \\"b\\" \\\\c"'),
        (b"\t\x7f(){}%*]", b'"\t\x7f(){}%*]"'),
    ],
)
def test_quoted(value, expected):
    assert quoted(value) == expected


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\x00b", b"caf\xc3\xa9"])
def test_quoted_refuses(value):
    with pytest.raises(ValueError):
        quoted(value)


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"INBOX", b"INBOX"),
        (b"Sent.2024-01/x_y&AOk-", b"Sent.2024-01/x_y&AOk-"),
        (b"", b'""'),
        (b"My Mail", b'"My Mail"'),
        (b"a]b", b'"a]b"'),
        (b"50%", b'"50%"'),
        (b"a*", b'"a*"'),
        (b"x{3}", b'"x{3}"'),
        (b'say "hi"', b'"say \\"hi\\""'),
        (b"back\\slash", b'"back\\\\slash"'),
        (b"caf\xc3\xa9", b"{5+}\r\ncaf\xc3\xa9"),
        (b"two\r\nlines", b"{10+}\r\ntwo\r\nlines"),
    ],
)
def test_astring(value, expected):
    assert astring(value) == expected


def parse_wire(wire: bytes):
    """Frame and parse one argument sent on the wire, as the proxy would."""
    framer = Framer()
    framer.receive_data(b"A1 X " + wire + b"\r\n")
    fragments, literals = [], []
    while (ev := framer.next_event()) is not NEED_DATA:
        if isinstance(ev, Line):
            fragments.append(ev.data[5:] if ev.first else ev.data)
            if ev.literal is not None:
                assert not ev.literal.sync
                framer.accept_literal()
                literals.append(b"")
        elif isinstance(ev, LiteralData):
            literals[-1] += ev.data
    return parse_arguments(fragments, literals)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=30) | st.text(max_size=10).map(lambda s: s.encode()))
def test_astring_round_trip(value):
    tokens = parse_wire(astring(value))
    assert len(tokens) == 1
    assert astring_value(tokens[0]) == value
    if isinstance(tokens[0], Atom):
        assert value and astring(value) == value
    else:
        assert isinstance(tokens[0], String)


def test_capability_tokens():
    assert capability_tokens(b"IMAP4rev1 LITERAL+ AUTH=PLAIN") == ["IMAP4REV1", "LITERAL+", "AUTH=PLAIN"]
    assert capability_tokens(b"  imap4rev1   idle\tmove ") == ["IMAP4REV1", "IDLE", "MOVE"]
    assert capability_tokens(b"") == []
