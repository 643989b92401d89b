"""Argument grammars and the canonical re-encoding of parsed arguments (sans-I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_proxy.imap import mutf7
from referral_proxy.imap.command import Atom, ParenList, ParseError, String, parse_arguments
from referral_proxy.imap.grammar import Grammar, Slot, encode, encode_astring, match


def tokens(text: bytes, *literals: bytes):
    fragments = text.split(b"{}")
    return parse_arguments(fragments, list(literals))


def test_slots_are_bound():
    args = match(Grammar.parse("seqset dest"), tokens(b'1:3,5 "Shared/X"'))
    assert args.slots == (Slot.SEQSET, Slot.DEST)
    assert args.value(Slot.DEST) == b"Shared/X"
    args = match(Grammar.parse("list? reference pattern any*"), tokens(b'(SUBSCRIBED) "" ("a*" b) RETURN (CHILDREN)'))
    assert args.slots == (Slot.LIST, Slot.REFERENCE, Slot.PATTERN, Slot.ANY, Slot.ANY)
    args = match(Grammar.parse("list? reference pattern any*"), tokens(b'"" *'))
    assert args.slots == (Slot.REFERENCE, Slot.PATTERN)


@pytest.mark.parametrize("grammar, text, reason", [
    ("", b"x", "no arguments expected"),
    ("mailbox", b"", "missing mailbox"),
    ("mailbox", b"a b", "too many arguments"),
    ("mailbox list", b"INBOX MESSAGES", "invalid list"),
    ("seqset any+", b"1:2:3 FLAGS", "invalid seqset"),
    ("mailbox", b"(a)", "invalid mailbox"),
    ("seqset any+", b"1 {5}", "invalid atom"),
    ("seqset any+", b"1 a\x01b", "invalid character"),
])
def test_what_does_not_fit_is_a_parse_error(grammar, text, reason):
    with pytest.raises(ParseError, match=reason):
        match(Grammar.parse(grammar), tokens(text))


def test_names_are_written_as_canonical_astrings():
    args = match(Grammar.parse("mailbox dest"), tokens(b'"INBOX" {}', b"a*b"))
    enc = encode(args)
    assert enc.text == b'INBOX "a*b"'  # a literal a quoted string can carry goes quoted
    args = match(Grammar.parse("mailbox"), tokens(b"{}", b"Evil\r\nX9 CREATE Injected"))
    enc = encode(args)
    assert enc.fragments == (b"", b"") and enc.literals[0].value == b"Evil\r\nX9 CREATE Injected"
    assert encode_astring("Café".encode()) is None  # 8-bit: a literal
    assert encode_astring(b'a"b\\c') == b'"a\\"b\\\\c"'


def test_other_strings_keep_their_form():
    args = match(Grammar.parse("any+"), tokens(b'TEXT "a\\"b" SUBJECT {}', b"hi"))
    enc = encode(args)
    assert enc.fragments == (b'TEXT "a\\"b" SUBJECT ', b"")
    assert enc.literals == (String(b"hi", literal=True),)


def test_literal8_stays_binary():
    args = match(Grammar.parse("any+"), parse_arguments([b"X ", b""], [b"\x00\x01"], binary=[True]))
    assert encode(args).literals == (String(b"\x00\x01", literal=True, binary=True),)


# -- round trip: what the backend reads is what the proxy parsed ------------------------------

_atom = st.from_regex(rb"\A[A-Za-z0-9.:*,$\\-]{1,8}\Z")
_text = st.binary(max_size=12)


def _token():
    return st.recursive(
        st.one_of(_atom.map(Atom), _text.map(lambda v: String(v, literal=True)),
                  _text.filter(lambda v: b"\r" not in v and b"\n" not in v and b"\0" not in v).map(String)),
        lambda inner: st.lists(inner, max_size=4).map(lambda items: ParenList(tuple(items))),
        max_leaves=10,
    )


def _reparse(enc):
    return parse_arguments(list(enc.fragments), [lit.value for lit in enc.literals],
                           binary=[lit.binary for lit in enc.literals])


@settings(max_examples=300, deadline=None)
@given(st.lists(_token(), min_size=1, max_size=6))
def test_any_arguments_survive_encoding(toks):
    args = match(Grammar.parse("any+"), toks)
    assert tuple(_reparse(encode(args))) == tuple(toks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=20))
def test_any_mailbox_name_survives_encoding(name):
    # Dovecot would act on the name up to the NUL, or read it as another spelling: not the one routed by
    if b"\x00" in name or mutf7.spare_bits_set(name) or mutf7.shifts_a_line_break(name):
        with pytest.raises(ParseError):
            match(Grammar.parse("mailbox"), [String(name, literal=True)])
        return
    args = match(Grammar.parse("mailbox"), [String(name, literal=True)])
    (tok,) = _reparse(encode(args))
    assert tok.value == name


_piece = st.sampled_from([b"a", b"1:*", b"BODY[HEADER.FIELDS (X Y)]", b'"q"', b'"a\\"b"', b'"s p"', b"(", b")",
                          b" ", b"  ", b"\\Seen", b'""', b"( ", b" )"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_piece, min_size=1, max_size=12))
def test_reused_client_text_is_exactly_the_canonical_encoding(pieces):
    text = b"".join(pieces)
    try:
        toks = parse_arguments([text], [])
        args = match(Grammar.parse("any*"), toks, text)
    except ParseError:
        return
    assert encode(args).text == encode(match(Grammar.parse("any*"), toks)).text


@pytest.mark.parametrize("value, ok", [
    (b"1", True), (b"01", True), (b"1:*", True), (b"*:1", True), (b"*", True), (b"$", True), (b"4294967295", True),
    (b"10,1:2", True), (b"0", False), (b"00", False), (b"1:0", False), (b"0:*", False), (b"1,0", False),
    (b"1**", False), (b"*1", False), (b"4294967296", False), (b"1:99999999999", False), (b"1:2:3", False),
    (b"1,,2", False), (b",1", False), (b"1,", False), (b"", False)])
def test_sequence_sets_as_rfc_3501_defines_them(value, ok):
    """seq-number = nz-number / "*", a 32-bit number (referral19: "COPY 0 Shared/X" was referred)."""
    from referral_proxy.imap.grammar import is_sequence_set
    from referral_proxy.imap.plain import plain_arguments

    assert is_sequence_set(value) is ok
    if plain_arguments("seqset", value):  # the fast path never takes what the grammar refuses
        assert ok


@pytest.mark.parametrize("items, caps, problem", [
    (b"(MESSAGES)", None, None), (b"(messages Unseen)", frozenset(), None), (b"(MESSAGES MESSAGES)", frozenset(), None),
    (b"()", None, "Empty status list"), (b'("MESSAGES")', None, "Status list contains non-atoms"),
    (b"(MESSAGES (UNSEEN))", None, "Status list contains non-atoms"), (b"(BOGUS)", None, "Invalid status item BOGUS"),
    (b"(SIZE)", frozenset({"STATUS=SIZE"}), None), (b"(SIZE)", frozenset({"IMAP4REV1"}), "Invalid status item SIZE"),
    (b"(SIZE)", None, None), (b"(APPENDLIMIT)", frozenset({"APPENDLIMIT=1000"}), None),
    (b"(HIGHESTMODSEQ)", frozenset({"QRESYNC"}), None), (b"(DELETED)", frozenset({"CONDSTORE"}), "Invalid status item DELETED")])
def test_status_lists_as_rfc_3501_and_the_announced_extensions_define_them(items, caps, problem):
    from referral_proxy.imap.referargs import status_list_problem

    (tok,) = tokens(items)
    assert isinstance(tok, ParenList)
    assert status_list_problem(tok, caps) == problem


@pytest.mark.parametrize("params, caps, qresync, problem", [
    (b"()", None, False, None), (b"(CONDSTORE)", frozenset({"CONDSTORE"}), False, None), (b"(condstore)", None, False, None),
    (b"(CONDSTORE)", frozenset({"IMAP4REV1"}), False, "Unknown SELECT parameter CONDSTORE"),
    (b"(QRESYNC (1 1))", None, False, "QRESYNC not enabled"), (b"(QRESYNC (1 1))", None, True, None),
    (b"(QRESYNC (1 1 1:5 (1,3 2,9)))", None, True, None), (b"(QRESYNC)", None, True, "Invalid QRESYNC parameters"),
    (b"(QRESYNC (0 1))", None, True, "Invalid QRESYNC parameters"), (b"(QRESYNC (1 1 1:*))", None, True, "Invalid QRESYNC parameters"),
    (b'("CONDSTORE")', None, False, "SELECT options contain non-atoms"), (b"(BOGUS)", None, False, "Unknown SELECT parameter BOGUS"),
    (b"(CONDSTORE 1)", None, False, "Unknown SELECT parameter 1")])
def test_select_parameters_as_rfc_4466_and_7162_define_them(params, caps, qresync, problem):
    from referral_proxy.imap.referargs import select_params_problem

    (tok,) = tokens(params)
    assert select_params_problem(tok, caps, qresync) == problem
