"""The codec's UID sets and untagged-data parsers (sans-I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from referral_proxy.imap.command import Atom, ParseError, String
from referral_proxy.imap.data import parse_fetch, parse_list, parse_search, parse_status, parse_uid_code
from referral_proxy.imap.uidset import expand_uid_set, uid_set


def test_uid_set_keeps_order_and_ranges():
    assert uid_set([5, 6, 7, 9, 3, 4]) == b"5:7,9,3:4"
    assert uid_set([1]) == b"1"
    assert uid_set([]) == b""
    assert expand_uid_set(b"5:7,9") == [5, 6, 7, 9]
    assert expand_uid_set("7:5") == [7, 6, 5]
    assert expand_uid_set(b"") == []


@given(st.lists(st.integers(min_value=1, max_value=10**9), max_size=60))
def test_uid_set_round_trip(uids):
    assert expand_uid_set(uid_set(uids)) == uids


@pytest.mark.parametrize("bad", [b"*", b"1:*", b"0", b"1,,2", b"a", b"1:2:3", b" 1", b"-1", b"1:99999999999"])
def test_expand_refuses_malformed(bad):
    with pytest.raises(ValueError):
        expand_uid_set(bad)


def test_expand_is_bounded():
    with pytest.raises(ValueError):
        expand_uid_set(b"1:4294967295")
    assert len(expand_uid_set(b"1:1000", limit=1000)) == 1000


def test_uid_set_refuses_non_uids():
    with pytest.raises(ValueError):
        uid_set([0])


def test_fetch():
    d = parse_fetch([b'(UID 7 FLAGS (\\Seen \\Recent $Work) INTERNALDATE "01-Jan-2020 10:00:00 +0000" RFC822.SIZE 31)'], [])
    assert (d.uid, d.flags, d.internaldate, d.size) == (7, (b"\\Seen", b"$Work"), b"01-Jan-2020 10:00:00 +0000", 31)
    assert parse_fetch([b"(FLAGS ())"], []).uid is None
    body = parse_fetch([b"(UID 3 BODY[] ", b")"], [b"abc"])
    assert body.items[b"BODY[]"] == String(b"abc", literal=True)


@pytest.mark.parametrize("bad", [b"UID 7", b"(UID)", b"(UID 7", b"(UID 7) x", b'("UID" 7)'])
def test_fetch_refuses_malformed(bad):
    with pytest.raises(ParseError):
        parse_fetch([bad], [])


@pytest.mark.parametrize("bad", [b"(UID x)", b"(FLAGS \\Seen)", b"(INTERNALDATE 5)", b"(RFC822.SIZE ())"])
def test_fetch_items_of_the_wrong_kind(bad):
    d = parse_fetch([bad], [])
    with pytest.raises(ParseError):
        assert (d.uid, d.flags, d.internaldate, d.size) is None


def test_list_names_are_names():
    e = parse_list([b'(\\HasNoChildren) "/" "50% off"'], [])
    assert (e.name, e.delimiter, e.selectable) == (b"50% off", b"/", True)
    e = parse_list([b'(\\Noselect \\HasChildren) NIL ', b""], [b"Caf\xc3\xa9"])
    assert (e.name, e.delimiter, e.selectable) == (b"Caf\xc3\xa9", None, False)
    assert parse_list([b'(\\NonExistent) "/" "q\\"uo\\\\te"'], []).name == b'q"uo\\te'
    assert not parse_list([b'(\\NonExistent) "/" x'], []).selectable
    with pytest.raises(ParseError):
        parse_list([b'"/" x'], [])


def test_status_and_search():
    s = parse_status([b'"My box" (MESSAGES 3 UIDNEXT 9 UIDVALIDITY 17)'], [])
    assert s.mailbox == b"My box" and s.values == {b"MESSAGES": 3, b"UIDNEXT": 9, b"UIDVALIDITY": 17}
    with pytest.raises(ParseError):
        parse_status([b"x (MESSAGES many)"], [])
    assert parse_search(b"2 5 9") == [2, 5, 9]
    assert parse_search(b"") == []
    assert parse_search(b"4 (MODSEQ 12)") == [4]
    with pytest.raises(ParseError):
        parse_search(b"2 x")


def test_uid_codes():
    a = parse_uid_code("APPENDUID", b"38505 3955:3957")
    assert (a.uidvalidity, a.source, a.uids) == (38505, (), (3955, 3956, 3957))
    c = parse_uid_code("COPYUID", b"9 7:8 5:6")
    assert (c.uidvalidity, c.source, c.uids) == (9, (7, 8), (5, 6))
    for code, args in [("APPENDUID", b"x 1"), ("APPENDUID", b"1"), ("COPYUID", b"1 2"), ("TRYCREATE", b""),
                       (None, b"1 2")]:
        with pytest.raises(ParseError):
            parse_uid_code(code, args)


def test_tokens_are_the_commands_own():
    assert isinstance(parse_fetch([b"(X 1)"], []).items[b"X"], Atom)


def test_sequence_set_size_counts_distinct_numbers_and_knows_nothing_of_star():
    from referral_proxy.imap.uidset import sequence_set_size
    assert [sequence_set_size(s) for s in (b"1", b"1:5,3:7", b"9:6", b"1,1", b"1:2,8:9,3")] == [1, 7, 4, 1, 5]
    assert sequence_set_size(b"*") is None and sequence_set_size(b"6:*") is None
    assert sequence_set_size(b"1:4294967295") == 4294967295  # counted, never expanded


def test_highest_number_beside_a_star_not_inside_a_range_to_it():
    from referral_proxy.imap.uidset import highest_number
    sets = [b"9,*", b"*,9", b"2,7,*", b"3:5,*", b"2:*,1", b"1:*,9", b"6:*", b"*", b"*:4,9", b"x,*", b"1:2:3"]
    assert [highest_number(s) for s in sets] == [9, 9, 7, 5, 1, None, None, None, None, None, None]
