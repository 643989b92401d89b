"""The fast path's byte-level shortcuts give what the full parse gives (hypothesis).

* imap.plain: a plain argument line, parsed, matched against its grammar and encoded
  again, is the line itself, byte for byte: relaying it unparsed changes nothing;
* the one-match command head and tagged completion equal the full parsers';
* the reader passes a plain line on unparsed only for the commands it is told, and
  only after the session admitted it (state and table first, limits as always).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from referral_proxy.commands import COMMANDS
from referral_proxy.fastpath import PLAIN_COMMANDS
from referral_proxy.imap.command import ParseError, _parse_command_start, parse_arguments, parse_command_start
from referral_proxy.imap.framing import NEED_DATA
from referral_proxy.imap.grammar import Encoded, Grammar, encode, match
from referral_proxy.imap.plain import PLAIN_GRAMMARS, plain_arguments
from referral_proxy.imap.reader import Command, CommandReader, Limits, Refusal, Refused
from referral_proxy.imap.response import _parse_response_start, parse_response_start, plain_completion

# Pieces a client's FETCH/STORE/SEARCH lines are made of, and what breaks them.
PIECES = [b"1", b"1:*", b"2,4:6", b"$", b"*", b"FLAGS", b"UID", b"BODY.PEEK[]", b"BODY[1.MIME]",
          b"BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]", b"BODY[HEADER.FIELDS.NOT (X-A)]", b"<0.100>",
          b"+FLAGS.SILENT", b"(\\Seen $Forwarded)", b"\\Deleted", b'"a b"', b'""', b"NIL", b"RETURN",
          b"(", b")", b"[", b"]", b'"', b"\\", b" ", b"  ", b"{5}", b"{0+}", b"~{1}", b"\x00", b"\x01", b"\x7f",
          b"\xc3\xa9", b'"a\\"', b'\\"', b'"\\\\"', b"%", b"{", b"}", b"(())", b"((a) (b c))", b"(((a)))", b"( a)", b"(a )", b"[a", b"a]"]

lines = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join),
    st.lists(st.sampled_from(PIECES), max_size=8).map(b" ".join),
    st.binary(max_size=40),
)


def full(grammar: str, rest: bytes) -> Encoded | None:
    """The long way: parse, check against the grammar, write again (None if refused)."""
    try:
        return encode(match(Grammar.parse(grammar), parse_arguments([rest], []), rest))
    except ParseError:
        return None


@pytest.mark.parametrize("grammar", sorted(PLAIN_GRAMMARS))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rest=lines)
def test_a_plain_line_is_its_own_canonical_encoding(grammar, rest):
    if plain_arguments(grammar, rest):
        assert full(grammar, rest) == Encoded((rest,), ())


@pytest.mark.parametrize("grammar, rest", [
    ("seqset any+", b"1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"),
    ("seqset any+", b"7 (UID BODY.PEEK[]<0.100>)"),
    ("seqset any+", b'3,5:9 +FLAGS.SILENT (\\Deleted $Label1)'),
    ("seqset any+", b'4 (FLAGS (\\Seen) "x")'),
    ("seqset", b"1:5,7"),
    ("any+", b'UNSEEN SUBJECT "hello world"'),
])
def test_the_common_lines_are_plain(grammar, rest):
    assert plain_arguments(grammar, rest)
    assert full(grammar, rest) == Encoded((rest,), ())


@pytest.mark.parametrize("grammar, rest", [
    ("seqset any+", b"1 FLAGS "), ("seqset any+", b"1  FLAGS"), ("seqset any+", b"1 (FLAGS )"),
    ("seqset any+", b"1 \xc3\xa9"), ("seqset any+", b'1 "a\\"b"'), ("seqset any+", b"1 {5}"),
    ("seqset any+", b"x FLAGS"), ("seqset any+", b"1"), ("seqset any+", b"1 (((a)))"), ("any+", b""),
    ("mailbox", b"INBOX"),
])
def test_what_is_not_plain_takes_the_long_way(grammar, rest):
    assert not plain_arguments(grammar, rest)


def _or_none(parse, data: bytes) -> object:
    try:
        return parse(data)
    except ParseError:
        return None


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(
    st.tuples(st.sampled_from([b"a1", b"A.2", b"*", b"+", b"", b"t]"]),
              st.sampled_from([b" ", b"", b"  ", b"\t"]),
              st.sampled_from([b"NOOP", b"noop", b"UID", b"UID ", b"UID FETCH", b"UID fetch", b"UID  FETCH",
                               b"UID UID", b"X-1", b"FETCH", b""]),
              st.sampled_from([b"", b" ", b"  ", b" 1:* FLAGS", b"x", b"\t"])).map(b"".join),
    st.binary(max_size=30)))
def test_the_one_match_command_head_is_the_full_parsers(data):
    assert _or_none(parse_command_start, data) == _or_none(_parse_command_start, data)


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(
    st.tuples(st.sampled_from([b"rp1", b"a", b"*", b"+", b"", b"a(b"]),
              st.sampled_from([b" ", b"", b"  "]),
              st.sampled_from([b"OK", b"ok", b"NO", b"BAD", b"BYE", b"OKAY", b"FETCH", b"1 EXISTS"]),
              st.sampled_from([b"", b" ", b" done", b" [READ-WRITE] x", b" [", b"  x", b"[x]", b" [NOUPDATE \"a\"] y"]),
              ).map(b"".join),
    st.binary(max_size=30)))
def test_the_one_match_completion_is_the_full_parsers(data):
    assert _or_none(parse_response_start, data) == _or_none(_parse_response_start, data)


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(
    st.tuples(st.sampled_from([b"rp1", b"a", b"*", b"+", b"", b"a(b"]),
              st.sampled_from([b" ", b"", b"  "]),
              st.sampled_from([b"OK", b"ok", b"NO", b"BAD", b"BYE", b"OKAY"]),
              st.sampled_from([b"", b" ", b" done", b" [READ-WRITE] x", b" [", b"  x", b" a\rb", b" x\r\ny",
                               b" [APPENDUID 7 1] Append completed.", b" [appenduid 7 1]", b" [A]", b" [A] ", b" [A]x",
                               b" [A  \t1 \x0b] y", b" [A ]", b" []", b" [ A]", b" [A(b)] c", b" [A]] b", b" [[A] b",
                               b' [A "]"] b', b" [A [B]] c", b" [A\tB] c", b" [\xe9] c", b" [A] }", b"  [A] b"]),
              st.sampled_from([b"\r\n", b"\n", b"", b"\r\n\r\n", b"\r\n* 1 EXISTS\r\n"])).map(b"".join),
    st.binary(max_size=30)))
def test_a_whole_plain_completion_is_what_the_parser_says_of_its_line(data):
    start = plain_completion(data)
    if start is not None:
        assert data.endswith(b"\r\n") and b"\n" not in data[:-2] and b"\r" not in data[:-2]
        assert start == parse_response_start(data[:-2])


def test_a_completion_with_a_code_is_taken_whole():
    start = plain_completion(b"rp8 OK [APPENDUID 7 12] Append completed.\r\n")
    assert start is not None and (start.tag, start.code, start.code_args, start.text) == (
        b"rp8", "APPENDUID", b"7 12", b"Append completed.")
    assert plain_completion(b'rp8 NO [BADCHARSET ("x")] no\r\n') is None  # quotes: the long way


def test_the_fast_commands_are_relay_only_and_route_by_nothing():
    assert {"FETCH", "UID FETCH", "STORE", "UID STORE"} <= PLAIN_COMMANDS
    for name in PLAIN_COMMANDS:
        spec = COMMANDS[name]
        assert spec.handler in ("to_selected", "to_home", "mailboxes.change") and not spec.grammar.names
        assert not spec.tag_refs and not spec.tag_args


def _read(data: bytes, admit, plain=PLAIN_COMMANDS) -> list:
    reader = CommandReader(Limits(), admit, plain)
    reader.receive_data(data)
    out = []
    while (event := reader.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def _by_table(start):
    return COMMANDS[start.name].grammar if start.name in COMMANDS else Refusal("BAD", "unknown")


def test_the_reader_passes_a_plain_line_on_unparsed_after_admission():
    line = b"a1 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
    [cmd] = _read(line, _by_table)
    assert isinstance(cmd, Command) and cmd.tag == b"a1" and cmd.name == "UID FETCH"
    assert cmd.args.tokens == () and encode(cmd.args).text == b"1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
    [slow] = _read(line, _by_table, plain=frozenset())  # the long way: tokens, the same bytes
    assert slow.args.tokens and encode(slow.args).text == encode(cmd.args).text
    # Admission first: a refused command is refused, plain or not.
    [refused] = _read(line, lambda start: Refusal("BAD", "not now"))
    assert isinstance(refused, Refused) and refused.text == "not now"
    # Not plain: parsed, and refused if the grammar says so.
    [bad] = _read(b"a2 FETCH x FLAGS\r\n", _by_table)
    assert isinstance(bad, Refused) and bad.status == "BAD"
    # A literal: never the fast path (the literal is read, then the whole command parsed).
    events = _read(b"a3 UID FETCH 1 (BODY.PEEK[HEADER.FIELDS ({7+}\r\nSUBJECT)])\r\n", _by_table)
    assert isinstance(events[-1], Command) and events[-1].args.tokens
