"""The sans-I/O command reader: whole commands out of bytes, every client limit in one place."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_proxy.commands import COMMANDS
from referral_proxy.imap.command import Atom, ParenList, String
from referral_proxy.imap.framing import NEED_DATA
from referral_proxy.imap.grammar import encode
from referral_proxy.imap.reader import (
    NEED_DECISION,
    STREAMED,
    AppendAbort,
    AppendData,
    AppendEnd,
    AppendMessage,
    AppendMessageEnd,
    AppendStart,
    Command,
    CommandReader,
    Continue,
    Ended,
    Limits,
    Refusal,
    Refused,
    TextLine,
)


def _admit(start):
    spec = COMMANDS.get(start.name)
    if spec is None:
        return Refusal("BAD", f"Unknown command {start.name}")
    return STREAMED if start.name == "APPEND" else spec.grammar


def reader(**limits) -> CommandReader:
    return CommandReader(Limits(**limits), _admit)


def events(r: CommandReader, data: bytes = b"", *, accept: bool = True) -> list:
    """Everything the reader yields for *data*; message literals accepted (or not)."""
    r.receive_data(data)
    out = []
    while True:
        ev = r.next_event()
        if ev is NEED_DATA:
            return out
        if ev is NEED_DECISION:
            if not accept:
                out.append(ev)
                return out
            r.accept()
            continue
        out.append(ev)


def test_pipelined_commands_come_out_whole_and_parsed():
    out = events(reader(), b'a NOOP\r\nb SELECT "My box"\r\nc FETCH 1:* (FLAGS BODY[HEADER.FIELDS (SUBJECT)])\r\n')
    assert [type(e) for e in out] == [Command, Command, Command]
    assert out[0].name == "NOOP" and out[0].args.tokens == ()
    assert out[1].args.tokens == (String(b"My box"),)
    assert out[2].args.tokens == (Atom(b"1:*"), ParenList((Atom(b"FLAGS"), Atom(b"BODY[HEADER.FIELDS (SUBJECT)]"))))


def test_sync_literal_asks_for_continuation_and_keeps_its_space():
    r = reader()
    assert events(r, b"t CREATE {5}\r\n") == [Continue()]
    out = events(r, b"Hello\r\n")
    assert out == [Command(b"t", "CREATE", out[0].args)]
    assert out[0].args.tokens == (String(b"Hello", literal=True),)


def test_a_header_name_sent_as_a_literal_in_a_fetch_section_becomes_a_quoted_one():
    """The section is one atom again, as if quoted: the backend reads no literal there."""
    r = reader()
    assert events(r, b"f FETCH 1 BODY.PEEK[HEADER.FIELDS ({7}\r\n") == [Continue()]
    (cmd,) = events(r, b"Subject)]\r\n")
    assert cmd.args.tokens == (Atom(b"1"), Atom(b'BODY.PEEK[HEADER.FIELDS ("Subject")]'))
    assert encode(cmd.args).fragments == (b'1 BODY.PEEK[HEADER.FIELDS ("Subject")]',)
    (cmd,) = events(reader(), b"f UID FETCH 1:* (UID BODY[1.HEADER.FIELDS.NOT (From {7+}\r\nSubject {2+}\r\nTo)])\r\n")
    assert cmd.args.tokens[1] == ParenList((Atom(b"UID"), Atom(b'BODY[1.HEADER.FIELDS.NOT (From "Subject" "To")]')))


@pytest.mark.parametrize("data", [
    b"f FETCH 1 BODY[HEADER.FIELDS ({24+}\r\nX\r\nS1 CREATE Shared/Ghost)]\r\nm NOOP\r\n",  # a line break
    b'f FETCH 1 BODY[HEADER.FIELDS ({3+}\r\nX"Y)]\r\nm NOOP\r\n',  # a quote
    b"f FETCH 1 BODY[HEADER.FIELDS ({3+}\r\nX]Y)]\r\nm NOOP\r\n",  # the section's end
    b"f FETCH 1 BODY[HEADER.FIELDS (~{7+}\r\nSubject)]\r\nm NOOP\r\n",  # a literal8
    b"f FETCH 1 BODY[TEXT {7+}\r\nSubject]\r\nm NOOP\r\n",  # not a header list
])
def test_other_literals_in_a_fetch_section_are_refused_and_never_commands(data):
    out = events(reader(), data)
    assert isinstance(out[0], Refused) and out[0].tag == b"f" and out[0].status == "BAD", out
    assert [e.tag for e in out[1:]] == [b"m"]


def test_unknown_command_and_arguments_where_none_belong_are_refused_unread():
    r = reader()
    out = events(r, b"x FROB {5+}\r\nhello\r\nn NOOP {6+}\r\n\r\nS1 CREATE Shared/Ghost\r\nm NOOP\r\n")
    assert out[0] == Refused(b"x", "BAD", "Unknown command FROB")
    assert out[1] == Refused(b"n", "BAD", "NOOP takes no arguments")
    # Whatever rode in the refused literals is never a command: the next one is m.
    assert [e.tag for e in out[2:]] == [b"m"]


def test_a_sync_literal_of_a_refused_command_is_never_announced():
    out = events(reader(), b"n NOOP {6}\r\nm NOOP\r\n")
    assert out == [Refused(b"n", "BAD", "NOOP takes no arguments"), Command(b"m", "NOOP", out[1].args)]


@pytest.mark.parametrize("line, reason", [
    (b'c CREATE "Wor\\k"\r\n', "invalid escape"),
    (b"c CREATE\r\n", "missing"),
    (b"c CREATE a b\r\n", "too many arguments"),
    (b"c COPY 1 (x)\r\n", "invalid dest"),
    (b"c FETCH 1:x FLAGS\r\n", "invalid seqset"),
    (b"c STATUS INBOX MESSAGES\r\n", "invalid list"),
    (b"c SELECT a[b c]\r\n", "invalid mailbox"),
])
def test_arguments_that_do_not_parse_against_the_grammar_are_refused(line, reason):
    (ev,) = events(reader(), line)
    assert isinstance(ev, Refused) and ev.status == "BAD" and reason in ev.text, ev


def test_literals_are_counted_as_objects_not_only_bytes():
    """ID {0+}{0+}... and one-byte literals: bounded by max_literals, whatever their size."""
    r = reader(max_literals=10)
    out = events(r, b"i ID (" + b"{0+}\r\n" * 50 + b")\r\nn NOOP\r\n")
    assert out[0] == Refused(b"i", "NO", "[LIMIT] Too many literals in one command (limit 10)")
    assert out[1].name == "NOOP"
    assert r.buffered == 0


def test_a_refused_commands_rest_is_not_dropped_for_ever():
    """ID ({0+}{0+}... without end: once refused, its rest is dropped, but only for as many
    parts as a command may have: then the reader ends (it had cost a line's work each, for
    ever: 50 such clients made another client's NOOP wait 7 s)."""
    r = reader(max_literals=10, max_append_messages=20)
    out = events(r, b"i ID (" + b"{0+}\r\n" * 32)  # the 11th refused, 21 dropped
    assert out == [Refused(b"i", "NO", "[LIMIT] Too many literals in one command (limit 10)")]
    assert events(r, b"{0+}\r\n") == [Ended("Too long command (more than 21 parts)")]
    # As many parts as the biggest command may have are dropped without an end: a refused
    # MULTIAPPEND of max_append_messages LITERAL+ messages.
    r = reader(max_literals=10, max_append_messages=20)
    out = events(r, b"a APPEND INBOX" + b" {1+}\r\nx" * 20 + b"\r\nn NOOP\r\n", accept=False)
    assert out[0] == AppendStart(b"a", "APPEND", b"INBOX") and out[-1] is NEED_DECISION
    r.drop()
    assert [e.name for e in events(r)] == ["NOOP"]


_SKIP = {"max_line": 80, "max_literal": 64, "max_command": 2000, "max_message": 100}  # a refused literal: 2000 skipped


@pytest.mark.parametrize("data, refusal", [
    (b"a APPEND INBOX {99999999999999999999+}\r\nxx\r\n", "NO [TOOBIG] Message too large (limit 100 bytes); nothing was appended"),
    (b"c CREATE {2001+}\r\n" + b"x" * 2001 + b"\r\n", "NO [TOOBIG] Literal too large (limit 64 bytes)"),
    (b"s SEARCH TEXT " + b"x" * 100 + b" {2001+}\r\n", "BAD Command line too long (limit 80 bytes)"),
    (b"s SEARCH TEXT {60+}\r\n" + b"y" * 60 + b" TEXT {2001+}\r\n", "NO [TOOBIG] Literal too large (limit 64 bytes)"),
    (b"a APPEND INBOX {1+}\r\nx {2001+}\r\n", "NO [TOOBIG] Message too large (limit 100 bytes); nothing was appended"),
], ids=["append", "create", "long-line", "second-literal", "second-message"])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
def test_a_refused_literal_larger_than_any_command_may_send_ends_the_reader(data, refusal, bytewise):
    """`APPEND INBOX {99999999999999999999+}` was refused and its announced bytes dropped for ever, every
    command after them with them: the client waited for good (probe g2 of stop 57). Past what any
    command may send (max_message or max_command), the refusal is followed by the end, as Dovecot's BYE."""
    r = reader(**_SKIP)
    data += b"n NOOP\r\n"
    out = [] if bytewise else events(r, data)
    for i in range(len(data) if bytewise else 0):
        out += events(r, data[i:i + 1])
    answers = [e for e in out if isinstance(e, (Refused, AppendAbort, Ended, Command))]
    answers = answers[:answers.index(Ended("Literal too large to skip (limit 2000 bytes)")) + 1]  # (nothing is read after)
    assert [f"{e.status} {e.text}" if isinstance(e, (Refused, AppendAbort)) else e for e in answers] == [
        refusal, Ended("Literal too large to skip (limit 2000 bytes)")], out


@pytest.mark.parametrize("head", [b"c CREATE {2000+}\r\n", b"a APPEND INBOX {2000+}\r\n", b"a APPEND INBOX {1+}\r\nx {2000+}\r\n",
                                  b"s SEARCH TEXT " + b"x" * 100 + b" {2000+}\r\n"])
def test_a_refused_literal_no_larger_than_a_command_may_send_is_skipped(head):
    out = events(reader(**_SKIP), head + b"y" * 2000 + b"\r\nn NOOP\r\n")
    assert isinstance(out[-2], (Refused, AppendAbort)) and out[-1].name == "NOOP", out


def test_collected_bytes_are_bounded_and_drained():
    r = reader(max_literal=100, max_command=250)
    out = events(r, b"s SEARCH TEXT {90+}\r\n" + b"x" * 90 + b" TEXT {90+}\r\n" + b"y" * 90
                 + b" TEXT {90+}\r\n" + b"z" * 90 + b"\r\nn NOOP\r\n")
    assert out[0] == Refused(b"s", "NO", "[TOOBIG] Command too large (limit 250 bytes)")
    assert out[1].name == "NOOP"


def test_literal_over_the_limit_refused_before_it_is_sent():
    out = events(reader(max_literal=10), b"s SEARCH TEXT {11}\r\n")
    assert out == [Refused(b"s", "NO", "[TOOBIG] Literal too large (limit 10 bytes)")]


def test_line_too_long_then_the_session_goes_on():
    out = events(reader(max_line=20), b"a SEARCH " + b"x" * 40 + b"\r\nn NOOP\r\n")
    assert out[0] == Refused(b"a", "BAD", "Command line too long (limit 20 bytes)")
    assert out[1].name == "NOOP"


def test_a_tag_cut_by_the_line_limit_is_not_answered_as_the_clients():
    """Only the first 64 bytes of a too long line are kept: a tag that fills them may be cut, and
    an answer tagged with its first 64 bytes names a command the client never sent (Dovecot: `*`)."""
    out = events(reader(max_line=100), b"t" * 200 + b" NOOP\r\nn NOOP\r\n")
    assert out[0] == Refused(b"*", "BAD", "Command line too long (limit 100 bytes)")
    assert out[1].name == "NOOP"
    out = events(reader(max_line=100), b"t" * 63 + b" SEARCH " + b"x" * 200 + b"\r\n")
    assert out[0].tag == b"t" * 63  # whole: followed by its space inside the 64 bytes


@pytest.mark.parametrize("data", [
    b"s SELECT ~{5}\r\n",  # never answered "+"
    b"s SELECT ~{5+}\r\nINBOX\r\n",  # drained, never a command
    b"s STATUS INBOX (~{8+}\r\nMESSAGES)\r\n",
    b"s APPEND ~{5}\r\n",  # the mailbox name, not the message
    b"s APPEND ~{5+}\r\nINBOX {3+}\r\nabc\r\n",
])
def test_a_literal8_outside_an_appends_message_is_refused(data):
    """RFC 3516: literal8 is for APPEND's message data; Dovecot refuses it anywhere else (through
    the proxy a SELECT ~{5} was relayed as SELECT INBOX before)."""
    out = events(reader(), data + b"n NOOP\r\n")
    assert out[0] == Refused(b"s", "BAD", "Invalid arguments: literal8 not allowed here"), out
    assert [e.name for e in out[1:]] == ["NOOP"]


def test_a_literal8_is_a_setmetadata_value():  # RFC 5464: value = nstring / literal8
    (cmd,) = events(reader(), b"s SETMETADATA INBOX (/private/comment ~{3+}\r\nabc)\r\n")
    assert cmd.name == "SETMETADATA" and encode(cmd.args).literals[0].binary  # relayed as a literal8


def test_a_literal8_as_setmetadatas_mailbox_is_refused():
    """Probe c2 (stop 55): the whole SETMETADATA was let take literal8, its name too: run as SETMETADATA Work
    where Dovecot answers BAD "literal8 not allowed here" (a name holds no literal8 anywhere: grammar.is_astring)."""
    out = events(reader(), b's SETMETADATA ~{4+}\r\nWork (/private/comment "x")\r\nn NOOP\r\n')
    assert isinstance(out[0], Refused) and out[0].status == "BAD", out
    assert [e.name for e in out[1:]] == ["NOOP"]


def test_deep_nesting_is_refused():
    (ev,) = events(reader(), b"f FETCH 1 " + b"(" * 100 + b")" * 100 + b"\r\n")
    assert isinstance(ev, Refused) and "nested" in ev.text


def test_append_streams_each_message_and_asks_before_each_literal():
    r = reader()
    out = events(r, b'a APPEND "My box" (\\Seen) " 7-Feb-1994 22:43:04 -0800" {5}\r\n', accept=False)
    assert out == [AppendStart(b"a", "APPEND", b"My box"), out[1], NEED_DECISION]
    msg = out[1]
    assert msg.flags == (b"\\Seen",) and msg.date == b" 7-Feb-1994 22:43:04 -0800" and msg.literal.size == 5
    r.accept()
    out = events(r, b"hello {3+}\r\nabc\r\nn NOOP\r\n")
    assert out[:3] == [AppendData(b"hello"), AppendMessageEnd(), AppendMessage(None, None, out[2].literal)]
    assert out[3:6] == [AppendData(b"abc"), AppendMessageEnd(), AppendEnd()]
    assert out[6].name == "NOOP"


@pytest.mark.parametrize("date, relayed", [
    (b"7-Feb-1994 22:43:04 -0800", b" 7-Feb-1994 22:43:04 -0800"),  # Dovecot takes a day of one digit
    (b" 7-Feb-1994 22:43:04 -0800", b" 7-Feb-1994 22:43:04 -0800"),
    (b"07-feb-1994 22:43:04 -0800", b"07-feb-1994 22:43:04 -0800"),
    (b"01-Jan-2020 30:00:00 +0000", b"01-Jan-2020 30:00:00 +0000"),  # RFC 3501's time is 2DIGIT each (probe j3 F1)
    (b"01-Jan-2020 99:99:99 +9999", b"01-Jan-2020 99:99:99 +9999"),
    (b"99-Dec-2020 10:00:00 +0000", b"99-Dec-2020 10:00:00 +0000"),  # date-day-fixed: 2DIGIT (probe j5 F1)
    (b"0-Jan-2020 10:00:00 +0000", b" 0-Jan-2020 10:00:00 +0000"),
    (b" 07-Jan-2020 10:00:00 +0000", b" 07-Jan-2020 10:00:00 +0000"),  # Dovecot's imap_parse_date takes it
])
def test_append_date_as_dovecot_takes_it_relayed_as_rfc_3501_writes_it(date, relayed):
    out = events(reader(), b'a APPEND INBOX "%s" {5}\r\n' % date, accept=False)
    assert out[1].date == relayed, out


@pytest.mark.parametrize("date", [b"01-Jan-20 00:00:00 +0000", b"01-Jan-2020 0:00:00 +0000", b"  1-Jan-2020 00:00:00 +0000",
                                  b"001-Jan-2020 00:00:00 +0000", b"01-Jan-2020  00:00:00 +0000"])
def test_append_date_dovecot_refuses_is_refused(date):  # else a LITERAL+ message would run as commands
    out = events(reader(), b'a APPEND INBOX "%s" {3+}\r\nabc\r\nn NOOP\r\n' % date)
    assert out[0] == Refused(b"a", "BAD", "Invalid arguments: invalid date-time")
    assert [e.name for e in out[1:]] == ["NOOP"]


@pytest.mark.parametrize("flag", [b"a]b", b"a%b", b"a*b", b"a\\b"])
def test_append_keyword_dovecot_reads_but_refuses_is_answered_no_before_its_literal(flag):
    """An atom to Dovecot's parser but no keyword: Dovecot answers NO [CANNOT] (not BAD)."""
    out = events(reader(), b"a APPEND INBOX (\\Seen %s) {3+}\r\nabc\r\nn NOOP\r\n" % flag)
    assert out[0] == Refused(b"a", "NO", "[CANNOT] Invalid characters in keyword.")
    assert [e.name for e in out[1:]] == ["NOOP"]
    out = events(reader(), b'a APPEND INBOX (%s) "x" {3+}\r\nabc\r\nn NOOP\r\n' % flag)
    assert out[0].status == "BAD"  # the syntax is checked first, as Dovecot does


@pytest.mark.parametrize("announce", [b"{3+}\r\nabc\r\n", b"{3}\r\n"], ids=["literal+", "sync"])
def test_append_to_an_8bit_atom_is_bad_before_its_literal_as_every_command(announce):
    """Probe C (this stop): answered NO by the backend (``Mailbox name is not valid mUTF-7``) where every
    other command, and Dovecot for APPEND too, answers BAD (8-bit data in an atom)."""
    out = events(reader(), b"a APPEND W\xc3\xa9 " + announce + b"n NOOP\r\n")
    assert out[0] == Refused(b"a", "BAD", "Invalid arguments: invalid mailbox argument")
    assert [e.name for e in out[1:]] == ["NOOP"]


def test_append_mailbox_as_a_literal():
    r = reader()
    assert events(r, b"a APPEND {6}\r\n") == [Continue()]
    out = events(r, b"A\r\nB C {2+}\r\nhi\r\n")
    assert out[0] == AppendStart(b"a", "APPEND", b"A\r\nB C")
    assert out[-1] == AppendEnd()


@pytest.mark.parametrize("line", [
    b"a APPEND INBOX (\\Seen {5}\r\n",  # the flag list never closed (issue 10)
    b"a APPEND INBOX (\\Recent) {5}\r\n",
    b"a APPEND INBOX (\\Bogus) {5}\r\n",
    b'a APPEND INBOX "7-Fbr-1994 22:43:04 -0800" {5}\r\n',
    b"a APPEND INBOX\r\n",
    b"a APPEND INBOX junk {5}\r\n",
])
def test_bad_append_refused_before_anything_is_read(line):
    r = reader()
    out = events(r, line + b"hello\r\nn NOOP\r\n")
    assert isinstance(out[0], Refused) and out[0].status == "BAD", out
    # A sync literal was never announced: what follows is read as the client's next commands.
    assert all(not isinstance(e, (AppendStart, AppendData)) for e in out)


def test_bad_second_message_aborts_and_drops_the_rest():
    r = reader()
    out = events(r, b"a APPEND INBOX {1+}\r\nx (\\Recent) {5+}\r\nhello\r\nn NOOP\r\n")
    assert isinstance(out[-2], AppendAbort) and out[-2].status == "BAD"
    assert out[-1].name == "NOOP"


@pytest.mark.parametrize("tail", [b" ", b"   "])
def test_spaces_before_an_appends_final_crlf_end_it_as_dovecot_takes_them(tail):
    out = events(reader(), b"a APPEND INBOX {3+}\r\nabc {2+}\r\nhi%s\r\nn NOOP\r\n" % tail)
    assert out[-2:] == [AppendEnd(), out[-1]] and out[-1].name == "NOOP", out
    out = events(reader(), b"a APPEND INBOX {3+}\r\nabc \t\r\nn NOOP\r\n")  # a tab is no space: BAD there too
    assert isinstance(out[-2], AppendAbort) and out[-2].status == "BAD", out


def test_an_rfc_6855_utf8_message_is_streamed_with_its_wrapping():
    """``APPEND box UTF8 (~{n}...)`` (RFC 6855; Python's imaplib sends it once UTF8=ACCEPT is
    enabled): the message's literal8 with ``utf8``; main answered BAD "unbalanced parentheses"."""
    out = events(reader(), b"a APPEND INBOX (\\Seen) UTF8 (~{3+}\r\nabc) utf8 (~{2+}\r\nhi) {1+}\r\nx)\r\nn NOOP\r\n")
    starts = [e for e in out if isinstance(e, AppendMessage)]
    assert [(m.flags, m.utf8, m.literal.binary) for m in starts] == [((b"\\Seen",), True, True), (None, True, True),
                                                                      (None, False, False)][:len(starts)]
    assert isinstance(out[-2], AppendAbort) and out[-2].status == "BAD"  # ")" after a message that is not UTF8
    out = events(reader(), b"a APPEND INBOX UTF8 (~{3+}\r\nabc)  \r\nn NOOP\r\n")
    assert [type(e) for e in out] == [AppendStart, AppendMessage, AppendData, AppendMessageEnd, AppendEnd, Command]
    out = events(reader(), b"a APPEND {5}\r\nINBOX UTF8 (~{3+}\r\nabc)\r\n")
    assert out[1] == AppendStart(b"a", "APPEND", b"INBOX") and out[2].utf8 and out[-1] == AppendEnd()


@pytest.mark.parametrize("data", [
    b"a APPEND INBOX UTF8 ({3+}\r\nabc)\r\nn NOOP\r\n",  # RFC 6855: a literal8 only
    b"a APPEND INBOX UTF8 (~{3+}\r\nabc\r\nn NOOP\r\n",  # never closed
    b"a APPEND INBOX UTF8 (~{3+}\r\nabc) UTF8 {2+}\r\nhi\r\nn NOOP\r\n",
])
def test_a_broken_utf8_message_is_bad_and_nothing_of_it_runs(data):
    out = events(reader(), data)
    assert any(isinstance(e, (Refused, AppendAbort)) and e.status == "BAD" for e in out), out
    assert [e.name for e in out if isinstance(e, Command)] == ["NOOP"]


def test_append_limits():
    out = events(reader(max_append_messages=2), b"a APPEND INBOX" + b" {1+}\r\nx" * 3 + b"\r\nn NOOP\r\n")
    assert out[-2] == AppendAbort("NO", "[LIMIT] Too many messages in one APPEND (limit 2); nothing was appended")
    out = events(reader(max_message=3), b"a APPEND INBOX {4}\r\nn NOOP\r\n")
    assert out[0] == Refused(b"a", "NO", "[TOOBIG] Message too large (limit 3 bytes); nothing was appended")
    assert out[1].name == "NOOP"


def test_drop_refuses_the_rest_of_an_append():
    r = reader()
    out = events(r, b"a APPEND INBOX {5+}\r\nhello {3+}\r\nabc\r\nn NOOP\r\n", accept=False)
    assert out[-1] is NEED_DECISION
    r.drop()
    assert [e.name for e in events(r)] == ["NOOP"]


def test_line_mode_reads_one_line_as_text():
    r = reader()
    r.expect_line()
    out = events(r, b"DONE\r\nx2 NOOP\r\n")
    assert out[0] == TextLine(b"DONE", clean=True) and out[1].name == "NOOP"
    r.expect_line()
    out = events(r, b"x3 NOOP {5}\r\ny NOOP\r\n")
    assert out[0] == TextLine(b"x3 NOOP ", clean=False) and out[1].name == "NOOP"


@pytest.mark.parametrize("ending", [b"DONE {16+}", b"X ~{8+}", b"X {99999999+}", b"abc {3}"])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
def test_line_mode_takes_a_literal_announcement_as_text(ending, bytewise):
    """The line that ends IDLE, or a SASL response, is text to a server: "DONE {16+}" then "c NOOP" is a BAD
    and a NOOP to Dovecot. The reader took its {16+} for a literal and swallowed the next 16 bytes (with
    {99999999+}, every command after: the client waited for good; probe t2 of stop 51)."""
    r = reader()
    r.expect_line()
    data = ending + b"\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n"
    out = [] if bytewise else events(r, data)
    for i in range(len(data) if bytewise else 0):
        out += events(r, data[i:i + 1])
    assert isinstance(out[0], TextLine) and not out[0].clean, out
    assert [(e.tag, e.name) for e in out[1:]] == [(b"c", "NOOP"), (b"d", "NOOP"), (b"e", "NOOP")], out


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "byte-by-byte"])
def test_line_mode_drops_a_too_long_text_line_to_its_own_end(bytewise):
    """The same over max_line: dropped to its CRLF, its {20+} no literal (probe u1 of stop 51: the 20 bytes after
    it and the rest of that line were dropped too, the commands there never answered)."""
    r = reader(max_line=100)
    r.expect_line()
    data = b"X" * 300 + b" {20+}\r\nc NOOP\r\nd NOOP\r\n"
    out = [] if bytewise else events(r, data)
    for i in range(len(data) if bytewise else 0):
        out += events(r, data[i:i + 1])
    assert out[0] == TextLine(b"", clean=False), out
    assert [(e.tag, e.name) for e in out[1:]] == [(b"c", "NOOP"), (b"d", "NOOP")], out
    out = events(r, b"e APPEND INBOX" + b"x" * 300 + b" {3+}\r\nabc\r\nf NOOP\r\n")  # a command's: its literal dropped
    assert [getattr(e, "tag", None) for e in out][-1] == b"f", out


def test_reader_never_raises_while_a_decision_is_pending():
    r = reader()
    out = events(r, b"b APPEND INBOX {5}\r\n", accept=False)
    assert out[-1] is NEED_DECISION
    r.receive_data(b"c NOOP\r\n")
    assert r.next_event() is NEED_DECISION  # nothing read meanwhile


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"a NOOP\r\n", b"b APPEND INBOX {3+}\r\nabc\r\n", b'c SELECT "x"\r\n', b"d ID {0+}\r\n\r\n",
    b"e CREATE {2+}\r\nab\r\n", b"f FROB {2+}\r\nxy\r\n", b"g NOOP {1+}\r\nz\r\n", b"\r\n",
    b"h APPEND INBOX (\\Seen {1+}\r\nq\r\n", b"i SEARCH " + b"x" * 100 + b"\r\n",
]), max_size=12), st.integers(1, 7))
def test_any_split_gives_the_same_events(commands, step):
    data = b"".join(commands)
    whole = events(reader(max_line=64), data)
    r = reader(max_line=64)
    pieces = []
    for i in range(0, len(data), step):
        pieces += events(r, data[i:i + step])
    merged = []
    for e in pieces:  # literal chunks may be cut differently
        if isinstance(e, AppendData) and merged and isinstance(merged[-1], AppendData):
            merged[-1] = AppendData(merged[-1].data + e.data)
        else:
            merged.append(e)
    assert merged == whole


@pytest.mark.parametrize("data", [
    b"a APPEND INBOX ~{5}\r\n",  # never answered "+"
    b"a APPEND INBOX ~{5+}\r\nhello\r\n",  # drained, never a command
    b"a APPEND {5+}\r\nINBOX (\\Seen) ~{5+}\r\nhello\r\n",
    b"a APPEND INBOX {1+}\r\nx ~{5+}\r\nhello\r\n",  # the second message: the command aborted
])
def test_a_literal8_message_is_refused_where_binary_is_not_offered(data):
    """RFC 3502's grammar has no literal8; RFC 3516 gives it to an APPEND only once BINARY is announced.
    The session sets literal8 False where it is not (main appended such messages)."""
    r = reader()
    r.literal8 = False
    assert r.append_line(data) is None  # nor does the quick way take it
    out = events(r, data + b"n NOOP\r\n")
    refusal = next(e for e in out if isinstance(e, (Refused, AppendAbort)))
    assert (refusal.status, refusal.text) == ("BAD", "Invalid arguments: literal8 without BINARY"), out
    assert not any(isinstance(e, AppendData) for e in out[out.index(refusal):]), out
    assert out[-1].name == "NOOP", out
    offered = events(reader(), data + b"n NOOP\r\n")  # where BINARY is offered: a message like any
    assert any(isinstance(e, AppendMessage) and e.literal.binary for e in offered), offered
