"""Tests of referral_proxy.imap.mutf7 (RFC 3501 section 5.1.3 modified UTF-7)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from referral_proxy.imap.mutf7 import decode, decode_pattern, encode

EXAMPLES = [
    ("", b""),
    ("INBOX", b"INBOX"),
    ("&", b"&-"),
    ("A&B&&", b"A&-B&-&-"),
    ("Café", b"Caf&AOk-"),
    ("éé", b"&AOkA6Q-"),
    # RFC 3501 section 5.1.3.
    ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    # RFC 2152's example, shifted the IMAP way: "-" after a shift is literal.
    ("Hi Mom -☺-!", b"Hi Mom -&Jjo--!"),
    ("\t", b"&AAk-"),
    ("\x00\x7f", b"&AAAAfw-"),
    ("😀", b"&2D3eAA-"),  # astral: the surrogate pair D83D DE00
    ("a😀b\U0010ffff", b"a&2D3eAA-b&2,,f,w-"),  # "," stands for "/"
    (" !~", b" !~"),
]


@pytest.mark.parametrize("text, wire", EXAMPLES)
def test_encode_examples(text, wire):
    assert encode(text) == wire


@pytest.mark.parametrize("text, wire", EXAMPLES)
def test_decode_examples(text, wire):
    assert decode(wire) == text


def test_adjacent_shifts_are_accepted():
    # Not canonical, but not forbidden by RFC 3501 either.
    assert decode(b"&AOk-&AOk-") == "éé"


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(b"&", id="lone-amp"),
        pytest.param(b"Caf&AOk", id="unterminated"),
        pytest.param(b"&AO!-", id="bad-base64-char"),
        pytest.param(b"&AOk=-", id="padding"),
        pytest.param(b"&AOk/-", id="slash-not-comma"),
        pytest.param(b"&AOk -", id="space-in-shift"),
        pytest.param(b"Caf\xc3\xa9", id="raw-utf8"),
        pytest.param(b"\xff", id="8bit"),
        pytest.param(b"a\x00b", id="nul"),
        pytest.param(b"a\tb", id="tab"),
        pytest.param(b"\x7f", id="del"),
        pytest.param(b"&AGE-", id="shifted-letter"),
        pytest.param(b"&ACY-", id="shifted-amp"),
        pytest.param(b"&ACA-", id="shifted-space"),
        pytest.param(b"&AOkAYQ-", id="shifted-letter-after-e-acute"),
        pytest.param(b"&A-", id="length-1"),
        pytest.param(b"&AO-", id="length-2"),
        pytest.param(b"&AOkA-", id="length-4"),
        pytest.param(b"&AOkA6-", id="length-5"),
        pytest.param(b"&AOl-", id="spare-bits-set"),
        pytest.param(b"&AOkA6R-", id="spare-bits-set-2"),
        pytest.param(b"&2D0-", id="lone-high-surrogate"),
        pytest.param(b"&3gA-", id="lone-low-surrogate"),
        pytest.param(b"&3gDYPQ-", id="reversed-pair"),
    ],
)
def test_decode_rejects(wire):
    with pytest.raises(ValueError):
        decode(wire)


def test_encode_rejects_lone_surrogate():
    with pytest.raises(ValueError):
        encode("a\ud800b")


# Every code point but the surrogates (st.text()'s default), astral planes included.
any_text = st.text()
astral_text = st.text(
    st.one_of(st.characters(min_codepoint=0x10000), st.sampled_from("a&- ")), min_size=1
)


@given(st.one_of(any_text, astral_text))
def test_round_trip(text):
    assert decode(encode(text)) == text


@given(any_text)
def test_encoding_is_printable_ascii_and_canonical(text):
    wire = encode(text)
    assert all(0x20 <= byte <= 0x7E for byte in wire)
    # Shifted runs are maximal: never two in a row.
    assert re.search(rb"&[A-Za-z0-9+,]+-&[A-Za-z0-9+,]", wire) is None
    # A raw "&" only ever appears as "&-" when the text has one.
    assert wire.count(b"&-") == text.count("&")


mutf7_ish = st.lists(
    st.sampled_from([b"&", b"-", b"A", b"O", b"k", b",", b"2D", b"3g", b"+", b" ", b"\xc3"])
).map(b"".join)


@given(st.one_of(st.binary(), mutf7_ish))
def test_decode_only_raises_value_error(wire):
    # Hostile names from clients: a ValueError or a name that survives a round trip.
    try:
        text = decode(wire)
    except ValueError:
        return
    assert decode(encode(text)) == text


@pytest.mark.parametrize("pattern, text", [
    (b"*O*", "*O*"),
    (b"Caf&AOk-*", "Café*"),
    (b"Caf\xc3\xa9%", "Café%"),  # 8-bit UTF-8 as it is, as Dovecot reads a LIST pattern
    (b"a&-*", "a&*"),
])
def test_decode_pattern(pattern, text):
    assert decode_pattern(pattern) == text


@pytest.mark.parametrize("pattern", [
    b"Caf&*",  # an unterminated shift
    b"&AOk-&AOk-",  # a shift right after another: "&AOkA6Q-" is how an encoder writes it
    b"&AOk-\xc3\xa9",  # a shift and 8-bit bytes: Dovecot reads neither way
    b"Caf\xe9",  # not UTF-8
])
def test_decode_pattern_refuses_what_dovecot_matches_as_bytes(pattern):
    with pytest.raises(ValueError):
        decode_pattern(pattern)



@pytest.mark.parametrize("name, utf8, valid", [
    (b"&AOkA6Q-", False, True),
    (b"&AOk-&AOk-", False, False),  # Dovecot: "Mailbox name is not valid mUTF-7" in every command
    (b"&AOk-&AOk-", True, False),
    (b"Shared/&AOk-&AOk-", False, False),
    (b"&AOk-/&AOk-", False, True),  # a separator between two shifts
    (b"&-&AOk-", False, True),  # "&" written "&-", then a shift
    (b"&AOk-&-", False, True),  # a shift, then "&"
    (b"&AOk-a&AOk-", False, True),
])
def test_valid_name_refuses_a_shift_right_after_another(name, utf8, valid):
    from referral_proxy.imap.mutf7 import valid_name
    assert valid_name(name, utf8=utf8) is valid
