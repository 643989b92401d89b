"""listing.py's own evaluation of a LIST/LSUB reference and pattern over merged names."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from referral_proxy.listing import ListEntry, merge, select


def test_list_patterns_match_a_names_characters_not_its_modified_utf7():
    names = [b"INBOX", b"Caf&AOk-", b"&AOkA6Q-", b"a&-b"]
    entries = [ListEntry((), b"/", n, "b1") for n in names]

    def listed(pattern: bytes) -> list[bytes]:
        return sorted(e.name for e in select(entries, b"", pattern, "/"))

    assert listed(b"*O*") == [b"INBOX"]  # no "O" in Café
    assert listed(b"*-") == []
    assert listed(b"*&AOk-") == [b"&AOkA6Q-", b"Caf&AOk-"]
    assert listed(b"\xc3\xa9*") == [b"&AOkA6Q-"]
    assert listed(b"a&*") == [b"a&-b"]  # not modified UTF-7: matched as it is
    assert listed(b"&AOk-&AOk-") == []


def test_a_pattern_that_may_match_inbox_matches_its_letters_in_any_case():
    """Dovecot's rule (imap-match.c): "inbox*", "i*", "*n*" and "I%B%X" list INBOX (and what is under
    it); the rest of a name, and any other name, is matched with its case."""
    entries = [ListEntry((), b"/", n, "b1") for n in (b"INBOX", b"INBOX/x", b"Inboxes", b"Sent", b"Work")]

    def listed(reference: bytes, pattern: bytes) -> list[bytes]:
        return sorted(e.name for e in select(entries, reference, pattern, "/"))

    assert listed(b"", b"inbox*") == [b"INBOX", b"INBOX/x"]
    assert listed(b"", b"i*") == [b"INBOX", b"INBOX/x"]
    assert listed(b"", b"*n*") == [b"INBOX", b"INBOX/x", b"Inboxes", b"Sent"]
    assert listed(b"", b"I%B%X") == [b"INBOX"]
    assert listed(b"inbox", b"/%") == [b"INBOX/x"]
    assert listed(b"", b"inbox/X") == []  # past INBOX the case counts
    assert listed(b"", b"w*") == []


def _entry_the_long_way(fragment: bytes) -> ListEntry | str:
    """parse_list_entry before its shortcut: the general parse (command.parse_arguments)."""
    from referral_proxy.imap.command import Atom, ParenList, ParseError, parse_arguments

    try:
        args = parse_arguments([fragment], [])
    except ParseError:
        return "ParseError"
    if len(args) < 3 or not isinstance(args[0], ParenList) or not hasattr(args[2], "value"):
        return "ParseError"
    delim = None if isinstance(args[1], Atom) and args[1].value.upper() == b"NIL" else args[1].value
    return ListEntry(tuple(t.value for t in args[0].items if isinstance(t, Atom)), delim, args[2].value, "b1")


_PIECES = st.sampled_from([b"(", b")", b" ", b'"', b"\\", b"/", b".", b"NIL", b"nil", b"\\HasChildren", b"\\Noselect",
                           b"INBOX", b"a", b"%", b"*", b"{", b"}", b"[", b"]", b"\xc3\xa9", b"\x00", b"\r", b"3", b"~"])
_TEXT = st.lists(_PIECES, max_size=6).map(b"".join)
# (flags) delimiter name [rest]: each part now plain, now odd
_SHAPED = st.tuples(st.lists(st.sampled_from([b"\\HasChildren", b"\\Marked", b"", b"(x)", b'"s"', b"a[b", b"{3}"]),
                             max_size=3).map(b" ".join),
                    st.sampled_from([b'"/"', b'"."', b"NIL", b"nil", b'"\\\\"', b'""', b'"\x00"', b'"ab"', b"/"]),
                    st.one_of(_TEXT.map(lambda t: b'"' + t + b'"'), _TEXT),
                    st.sampled_from([b"", b" ", b" x", b" (CHILDINFO (SUBSCRIBED))"])
                    ).map(lambda p: b"(" + p[0] + b") " + p[1] + b" " + p[2] + p[3])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.lists(_PIECES, max_size=12).map(b"".join), _SHAPED))
@example(b'(\\HasNoChildren) "/" INBOX')
@example(b'() NIL "a b"')
@example(b'(\\Noselect \\HasChildren) "." "50% off"')
@example(b'(\\HasNoChildren) "/" a[b]')
@example(b'() "/" "a\x00"')  # no NUL in a quoted string
@example(b'({3}) "/" a')  # no "{" starts an atom
@example(b'() "/" a b')  # more after the name: read in general
def test_a_plain_entry_is_read_as_the_general_parse_reads_it(fragment):
    """listing.parse_list_entry reads ``(flags) "/" name`` with one regex when it can: the same entry
    as the general parse gives, or the same refusal."""
    from referral_proxy.imap.command import ParseError
    from referral_proxy.listing import parse_list_entry

    try:
        got: ListEntry | str = parse_list_entry([fragment], [], "b1")
    except ParseError:
        got = "ParseError"
    assert got == _entry_the_long_way(fragment)


def test_a_noselect_parent_shown_only_for_a_child_hidden_there_is_not_listed():
    """b1 lists Work as \\Noselect for its Work/c, a stray the map sends to b2 (a RENAME across of Work put
    it back): the client has no Work (probe 1, stop 48). A \\Noselect parent with a child kept stays."""
    owner = {"Work": "b1", "Work/c": "b2", "Proj": "b1", "Proj/a": "b2", "Proj/b": "b1", "Tmp": "b1"}.get
    entries = [ListEntry((b"\\Noselect", b"\\HasChildren"), b"/", b"Work", "b1"),
               ListEntry((b"\\HasNoChildren",), b"/", b"Work/c", "b1"),
               ListEntry((b"\\Noselect", b"\\HasChildren"), b"/", b"Proj", "b1"),
               ListEntry((b"\\HasNoChildren",), b"/", b"Proj/a", "b1"),
               ListEntry((b"\\HasNoChildren",), b"/", b"Proj/b", "b1"),
               ListEntry((b"\\Noselect", b"\\HasNoChildren"), b"/", b"Tmp", "b1")]
    listed = {e.name: e.flags for e in merge(entries, owner, "/")}
    assert listed == {b"Proj": (b"\\Noselect", b"\\HasChildren"), b"Proj/b": (b"\\HasNoChildren",),
                      b"Tmp": (b"\\Noselect", b"\\HasNoChildren")}
