"""The session's fast path (fastpath.relay_plain): a read that is one plain relayed
command line goes to the backend from the bytes, and every guarantee of the long way
holds: admission by table and state, the cap on commands in flight, a refused
command's literal never run, only DONE during IDLE, nothing read while input is blocked."""

from __future__ import annotations

import re
from unittest.mock import patch

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from referral_proxy.fastpath import completed_plain
from referral_proxy.flow import Block
from referral_proxy.imap.framing import Framer
from referral_proxy.imap.response import plain_untagged
from referral_proxy.testing.fakes import SessionHarness, minimal_config


def harness(**proxy) -> tuple[SessionHarness, list[bytes]]:
    """A logged-in session, and the reads that went the long way (through the reader)."""
    h = SessionHarness(minimal_config(**proxy))
    h.login()
    long_way: list[bytes] = []
    reader = h.session.reader
    receive = reader.receive_data

    def spy(data: bytes) -> None:
        long_way.append(data)
        receive(data)

    reader.receive_data = spy  # type: ignore[method-assign]
    return h, long_way


@pytest.mark.parametrize("name, line, relayed", [
    ("NOOP", b"a1 NOOP\r\n", b"rp1 NOOP\r\n"),
    ("UID FETCH", b"a.2 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])\r\n",
     b"rp1 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])\r\n"),
    ("STORE", b'x STORE 3,5:7 +FLAGS.SILENT (\\Deleted "a")\r\n', b'rp1 STORE 3,5:7 +FLAGS.SILENT (\\Deleted "a")\r\n'),
    ("EXPUNGE", b"e EXPUNGE\r\n", b"rp1 EXPUNGE\r\n"),
])
def test_a_plain_line_is_relayed_from_its_bytes(name, line, relayed):
    h, long_way = harness()
    h.send(line)
    assert h.to_backend() == relayed
    assert long_way == []  # the reader never saw it
    tag = line.split(b" ")[0]
    h.from_backend(b"* 1 FETCH (FLAGS ())\r\nrp1 OK done\r\n")
    assert h.to_client() == b"* 1 FETCH (FLAGS ())\r\n" + tag + b" OK done\r\n"
    assert h.context.observer.commands_total[(name, "ok")] == 1


@pytest.mark.parametrize("line, relayed", [
    (b"a1 noop\r\n", b"rp1 NOOP\r\n"),  # lower case: parsed, and written canonically
    (b"a1 NOOP \r\n", b"rp1 NOOP\r\n"),
    (b"a1 FETCH 1  FLAGS\r\n", b"rp1 FETCH 1 FLAGS\r\n"),
    (b"a1 FETCH 1 FLAGS\n", b"rp1 FETCH 1 FLAGS\r\n"),
    (b"a1 SEARCH RETURN (ALL) UNSEEN\r\n", b"rp1 SEARCH RETURN (ALL) UNSEEN\r\n"),  # its tag is in answers
    (b"a1 NOOP\r\na2 NOOP\r\n", b"rp1 NOOP\r\nrp2 NOOP\r\n"),  # two commands in one read
])
def test_what_is_not_one_plain_line_takes_the_long_way(line, relayed):
    h, long_way = harness()
    h.send(line)
    assert h.to_backend() == relayed
    assert long_way == [line]


def test_before_login_nothing_is_relayed():
    h = SessionHarness()
    h.to_client()
    h.send(b"a1 NOOP\r\n")
    h.send(b"a2 FETCH 1 FLAGS\r\n")
    assert h.to_client() == b"a1 OK NOOP completed.\r\na2 BAD FETCH is not allowed before login\r\n"
    assert h.connector.backends == []


def test_a_refused_commands_literal_is_never_run():
    h, long_way = harness()
    h.send(b"a0 FROB {9+}\r\n")  # refused: its literal (the next read) is dropped unread
    h.send(b"a1 NOOP\r\n")  # 9 bytes: the literal
    h.send(b"a1b NOOP\r\n")  # the rest of a0's line after its literal: dropped too
    h.send(b"a2 NOOP\r\n")
    assert h.to_backend() == b"rp1 NOOP\r\n"
    assert h.to_client() == b"a0 BAD Unknown command FROB\r\n"
    h.from_backend(b"rp1 OK done\r\n")
    assert h.to_client() == b"a2 OK done\r\n"
    assert long_way == [b"a0 FROB {9+}\r\n", b"a1 NOOP\r\n", b"a1b NOOP\r\n"]


def test_a_command_after_a_literal_of_its_own_is_not_taken_for_a_new_one():
    h, long_way = harness()
    h.send(b"a0 UID FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT {7+}\r\n")
    h.send(b"a1 NOOP\r\n")  # the rest of a0's line and literal, not a command
    h.send(b")])\r\n")
    assert b"NOOP" not in h.to_backend()


def test_only_done_is_read_during_idle():
    h, long_way = harness()
    h.send(b"i IDLE\r\n")
    h.from_backend(b"+ idling\r\n")
    h.to_client()
    h.send(b"a1 NOOP\r\n")  # not DONE: ends the IDLE, never relayed as a command
    assert b"NOOP" not in h.to_backend()
    assert long_way[-1] == b"a1 NOOP\r\n"


def test_the_cap_on_commands_in_flight_holds():
    h, long_way = harness(max_commands_in_flight=2)
    for i in range(4):
        h.send(b"a%d NOOP\r\n" % i)
    assert h.to_backend() == b"rp1 NOOP\r\nrp2 NOOP\r\n"
    assert Block.IN_FLIGHT in h.session.flow.blocked
    h.from_backend(b"rp1 OK done\r\nrp2 OK done\r\n")
    assert h.to_backend() == b"rp3 NOOP\r\nrp4 NOOP\r\n"
    h.from_backend(b"rp3 OK done\r\nrp4 OK done\r\n")
    assert h.to_client() == b"a0 OK done\r\na1 OK done\r\na2 OK done\r\na3 OK done\r\n"


def test_nothing_is_relayed_while_input_is_blocked():
    h, long_way = harness()
    h.session.block(Block.OUTPUT)  # the client reads nothing of what it is sent
    h.send(b"a1 NOOP\r\n")
    assert h.to_backend() == b""
    h.session.unblock(Block.OUTPUT)
    assert h.to_backend() == b"rp1 NOOP\r\n"


def test_a_fetch_waits_for_a_select_on_another_backend():
    """Input is held while a command waits (Block.TASK): the FETCH goes after, where it belongs."""
    h, long_way = harness()
    h.session.block(Block.TASK)
    h.send(b"f FETCH 1 FLAGS\r\n")
    assert h.to_backend() == b""
    h.session.unblock(Block.TASK)
    assert h.to_backend() == b"rp1 FETCH 1 FLAGS\r\n"


def test_a_completion_inside_a_literal_is_literal_data():
    """A backend's read that looks like the tagged completion but is a literal's data (or
    the rest of an untagged line) completes nothing."""
    h, long_way = harness()
    h.send(b"f FETCH 1 BODY[]\r\n")
    h.to_backend()
    h.from_backend(b"* 1 FETCH (BODY[] {13}\r\nrp1 OK done\r\n")  # 13 bytes: the message, in the same read
    assert h.session.relay.in_flight == 1
    h.from_backend(b")\r\n")
    h.from_backend(b"rp1 OK done\r\n")
    assert h.to_client() == b"* 1 FETCH (BODY[] {13}\r\nrp1 OK done\r\n)\r\nf OK done\r\n"
    assert h.session.relay.in_flight == 0


def test_a_completion_with_a_response_code_is_parsed():
    h, long_way = harness()
    h.send(b"n NOOP\r\n")
    h.from_backend(b"rp1 OK [CAPABILITY IMAP4rev1 X-NEW] done\r\n")
    assert "X-NEW" in h.backend.capabilities
    assert h.to_client() == b"n OK [CAPABILITY IMAP4rev1 X-NEW] done\r\n"


class _Sink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def untagged(self, _backend, *args) -> None:
        self.calls.append(args)

    def backend_lost(self, _backend, _reason) -> None:
        pass


RESPONSE_LINES = [b"* 1 FETCH (FLAGS ())", b"* 3 EXPUNGE", b"* OK [CAPABILITY IMAP4rev1 X]", b"* BYE going",
                  b"* 1 FETCH (BODY[] {3}", b"abc)", b"* 1 FETCH (BODY[] {13}", b'* ESEARCH (TAG "rp1") ALL 1', b"* OK [UIDNEXT 4] x",
                  b"rp1 OK done", b"rp1 OK [READ-WRITE] x", b"rp1 NO no", b"rp9 OK other", b"+ go", b"* 2 EXISTS",
                  b"rp1 OK [APPENDUID 7 1:3] done", b"rp1 NO [TRYCREATE] x", b"rp1 OK [CAPABILITY IMAP4rev1 Y] x",
                  b'rp1 NO [BADCHARSET ("x")] y']


# Lines for reads split anywhere: literals (a tagged line as a literal's body, an empty one), the
# response codes the session must see on a completion, BYE, a completion announcing a literal.
LITERAL_LINES = RESPONSE_LINES + [b"* 2 FETCH (UID 2 BODY[HEADER] {11}", b"* 1 FETCH (UID 1 BODY[] {0}", b")",
                                  b"rp1 OK [READ-ONLY] x", b"rp1 OK [CLOSED] x", b"* OK [UIDVALIDITY 7] x", b"* BYE",
                                  b"rp1 NO x {3}", b"rp1 OK Fetch completed (0.001 + 0.000 secs).", b"* 4 FETCH (UID 4)"]


def _reads_into(fast: bool, reads: list[bytes], whole_lines: bool = True) -> tuple:
    """What a connection that got *reads* relayed, completed and kept, with or without the fast
    path; *whole_lines* False: a line cut by a read is left to the framer (Framer.take_partial off)."""
    h, _ = harness()
    h.send(b"a NOOP\r\n")
    h.to_backend()
    conn, sink = h.backend, _Sink()
    conn.sink = sink
    with (patch("referral_proxy.backend.completed_plain", completed_plain if fast else lambda c, d: False),
          patch.object(Framer, "take_partial", Framer.take_partial if whole_lines else lambda self, d: d)):
        for data in reads:
            conn.dataReceived(data)
        conn.dataReceived(b"* 5 EXISTS\r\n")
    return (sink.calls, h.session.relay.in_flight, h.to_client(), conn.capabilities, conn.bye_received,
            sorted(conn._pending), conn._current, conn._framer.idle)


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r*\n", b"\r\n", data)


def _parsed(call: tuple) -> bool:
    """A sink call with a parsed response the session may act on (not plain untagged data)."""
    first = re.sub(rb"~?\{[0-9]+\+?\}$", b"", call[1].split(b"\n")[0].rstrip(b"\r"))
    return call[0] is not None and not plain_untagged(first)


@settings(max_examples=400, deadline=None)
@example(lines=[b"* 2 FETCH (UID 2 BODY[HEADER] {11}", b"rp1 OK done", b")", b"rp1 OK done"], cuts=[])
@example(lines=[b"* 2 FETCH (UID 2 BODY[HEADER] {11}", b"rp1 OK done", b")", b"rp1 OK [READ-ONLY] x"], cuts=[])
@example(lines=[b"* 1 FETCH (UID 1 BODY[] {0}", b")", b"rp1 OK [CLOSED] x"], cuts=[30])
@example(lines=[b"* 1 FETCH (BODY[] {3}", b"abc)", b"* BYE", b"rp1 OK done"], cuts=[])
@example(lines=[b"* 1 FETCH (BODY[] {3}", b"abc)", b"rp1 NO x {3}", b"abc"], cuts=[])
@example(lines=[b"* 1 FETCH (BODY[] {13}", b"rp9 OK other"], cuts=[1])  # the literal ends between CR and LF
@given(lines=st.lists(st.sampled_from(LITERAL_LINES), min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=3))
def test_reads_with_literals_complete_as_the_long_way_would(lines, cuts):
    """A FETCH answer's literals passed through, then the completion from its bytes: the same
    bytes relayed in the same order, the same completions and state as the long way, however
    the answer is cut into reads."""
    data = b"".join(line + b"\r\n" for line in lines)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    reads = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
    fast = _reads_into(True, reads)
    assert fast == _reads_into(False, reads)
    # Framer.take_partial: the same bytes relayed in the same order, the same state after, as
    # without it; only the pieces they are handed on in differ, and a plain untagged line (one
    # the session does nothing with: imap.response.plain_untagged) may come unparsed.
    # (The long way writes a bare LF ending a line as CRLF, pass_through relays it as read: a
    # literal here may end between CR and LF. Dovecot never ends a line with a bare LF.)
    old = _reads_into(False, reads, whole_lines=False)
    assert _crlf(b"".join(c[1] for c in fast[0])) == _crlf(b"".join(c[1] for c in old[0]))
    assert [c for c in fast[0] if _parsed(c)] == [c for c in old[0] if _parsed(c)]
    assert fast[0][-1][2] == old[0][-1][2] if fast[0] and old[0] else fast[0] == old[0]
    assert fast[1:] == old[1:]


def test_a_fetch_with_a_literal_completes_from_the_bytes():
    """The untagged FETCH with its literal and the completion in one read: relayed, completed,
    and the completion never parsed as a framer Line (it fails on the old code: _begin parsed it)."""
    h, _ = harness()
    h.send(b"f FETCH 2 (UID BODY.PEEK[HEADER])\r\n")
    assert h.to_backend() == b"rp1 FETCH 2 (UID BODY.PEEK[HEADER])\r\n"
    answer = b"* 2 FETCH (UID 2 BODY[HEADER] {11}\r\nrp1 OK done)\r\n"
    with patch.object(h.backend, "_begin", side_effect=AssertionError("the long way")):
        h.from_backend(answer + b"rp1 OK Fetch completed.\r\n")
    assert h.to_client() == answer + b"f OK Fetch completed.\r\n"
    assert h.session.relay.in_flight == 0


@settings(max_examples=150, deadline=None)
@example(parts=[(b"rp1 OK [CAPABILITY IMAP4rev1 Y] x", b"\r\n")])  # the fast path leaves it: capabilities learned
@example(parts=[(b"* 3 EXPUNGE", b"\r\n"), (b"rp1 OK [APPENDUID 7 1:3] done", b"\r\n")])
@example(parts=[(b"* 1 FETCH (BODY[] {13}", b"\r\n"), (b"rp1 OK done", b"\r\n")])  # the completion is literal data
@example(parts=[(b"* 3 EXPUNGE", b"\r\n"), (b"* 1 FETCH (FLAGS ())", b"\r\n"), (b"rp1 OK done", b"\r\n")])
@example(parts=[(b"rp1 OK done", b""), (b"* 1 FETCH (BODY[] {3}", b"\r\n")])  # a completion that ends as a literal's announce
@given(parts=st.lists(st.tuples(st.sampled_from(RESPONSE_LINES), st.sampled_from([b"\r\n", b"\n", b"\r\n", b""])),
                      min_size=1, max_size=5))
def test_a_backends_read_completes_as_the_long_way_would(parts):
    """The same reads into two connections, one without the fast path: the same relayed
    bytes, the same completions, the same state after."""
    data = b"".join(line + end for line, end in parts)
    assert _reads_into(True, [data]) == _reads_into(False, [data])
