"""The APPEND line from the bytes (fastpath.append_line, imap.reader.CommandReader.append_line):
a read that is exactly the line a client sends before a message's synchronizing literal starts
the command without the framer or the general parse, and everything after it is what the long
way does: the same reader events and state (every check of the line: flags, date, sizes, the
mailbox's characters), the same routing (reserved names, moves, referrals), the same bytes to
the backend and the client."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from referral_proxy.config import parse_config
from referral_proxy.flow import Block
from referral_proxy.imap.framing import NEED_DATA
from referral_proxy.imap.reader import NEED_DECISION, STREAMED, AppendData, AppendStart, CommandReader, Limits
from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, SessionHarness

# -- the reader: append_line gives what next_event gives ------------------------------------------

_LIMITS = Limits(max_line=120, max_message=100000, max_append_messages=3)


def _reader() -> CommandReader:
    return CommandReader(_LIMITS, lambda start: STREAMED)


def _events(reader: CommandReader, *, decide: str = "accept") -> list[object]:
    out: list[object] = []
    for _ in range(50):
        event = reader.next_event()
        if event is NEED_DATA:
            break
        if event is NEED_DECISION:
            out.append("decision")
            getattr(reader, decide)()
            continue
        out.append(event)
    return out


_GOOD: list[list[bytes]] = []  # each part's good values, in the order of the line


def _mostly(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of *good* four times in five (the forms clients send, each taken), else one of *bad*."""
    _GOOD.append(good)
    return st.tuples(st.integers(0, 4), st.sampled_from(good), st.sampled_from(bad)).map(
        lambda t: t[2] if t[0] == 4 else t[1])


_TAGS = _mostly([b"a", b"A001", b"x.1]", b"7"], [b"a+", b"a{"])
_NAMES = _mostly([b"APPEND"], [b"append", b"APPEND  ", b"UID APPEND"])
_BOXES = _mostly([b"INBOX", b"Bench", b"a/b.c&AOk-", b'"Sent Items"', b'""', b'"a]b"'],
                 [b'"a%b"', b"a%b", b"a*", b'"a*"', b'"a\\"b"', b'"caf\xc3\xa9"', b"caf\xc3\xa9", b'"a\x00b"',
                  b"a\x00b", b"{3}", b"(x)", b"a]", b"~{2}"])
_FLAGS = _mostly([b"", b" ()", b" (\\Seen)", b" (\\seen $Junk)", b" (\\Draft \\Flagged \\Answered \\Deleted k.w)"],
                 [b" (\\Recent)", b" (\\Foo)", b" (a]b)", b" (\\Seen  kw)", b" ((x))", b" (a%b)", b" (\\*)", b" (a{b)",
                  b" (\xc3\xa9)"])
_DATES = _mostly([b"", b' "30-Nov-2026 12:00:00 +0000"', b' " 1-Jan-2020 00:00:00 -0130"', b' "1-Jan-2020 00:00:00 +0000"'],
                 [b' "31-Foo-2020 00:00:00 +0000"', b' "x"', b" NIL", b' "30-Nov-2026 12:00:00 +0000" "x"'])
_LITERALS = _mostly([b" {5}", b" ~{5}", b" {0005}"],
                    [b" {5+}", b" {0}", b" {100001}", b"{5}", b" {99999999999999999999}", b" ~{5+}", b" {}"])
_ENDS = _mostly([b"\r\n"], [b"\n", b"\r\na NOOP\r\n", b"\r\nhel", b" \r\n"])


@settings(max_examples=400, deadline=None)
@given(tag=_TAGS, name=_NAMES, box=_BOXES, flags=_FLAGS, date=_DATES, literal=_LITERALS, end=_ENDS,
       decide=st.sampled_from(["accept", "drop"]), pad=st.integers(0, 100))
@example(tag=b"a", name=b"APPEND", box=b"INBOX", flags=b" (\\Seen)", date=b' "30-Nov-2026 12:00:00 +0000"',
         literal=b" {5}", end=b"\r\n", decide="accept", pad=0)
def test_an_append_line_is_read_as_the_long_way_reads_it(tag, name, box, flags, date, literal, end, decide, pad):
    line = tag + b" " + name + b" " + (b"x" * pad if box[:1].isalpha() else b"") + box + flags + date + literal + end
    fast, slow = _reader(), _reader()
    start = fast.append_line(line)
    slow.receive_data(line)
    if start is None:
        fast.receive_data(line)
        assert _events(fast, decide=decide) == _events(slow, decide=decide)
    else:
        assert fast._framer.buffered == 0
        assert [start, *_events(fast, decide=decide)] == _events(slow, decide=decide)
    assert fast._start == slow._start and fast._messages == slow._messages
    rest = b"hello\r\n" + b"b NOOP\r\n"
    fast.receive_data(rest)
    slow.receive_data(rest)
    assert _events(fast) == _events(slow)
    clean = (tag, name, box, flags, date, literal, end)
    if all(part in strategy_good for part, strategy_good in zip(clean, _GOOD)) and len(line) - 2 <= _LIMITS.max_line:
        assert start is not None  # the forms clients send are taken


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 70000), cuts=st.lists(st.integers(0, 70000), max_size=3),
       end=st.sampled_from([b"\r\n", b"\n", b"\r\nb NOOP\r\n", b" {3}\r\n", b"\r", b""]),
       pull=st.integers(0, 4))
@example(size=5, cuts=[], end=b"\r\n", pull=4)
@example(size=65536, cuts=[], end=b"\r\n", pull=4)
@example(size=65537, cuts=[], end=b"\r\n", pull=4)
def test_the_rest_of_a_message_is_read_as_the_long_way_reads_it(size, cuts, end, pull):
    """The message literal cut into reads, the last with what follows it: each read the fast way
    takes gives the long way's events, however many of them the consumer pulls before the next read."""
    fast, slow = _reader(), _reader()
    line = b"a APPEND INBOX {%d}\r\n" % size
    assert fast.append_line(line) is not None
    slow.receive_data(line)
    assert [slow.next_event(), slow.next_event()][0] == AppendStart(b"a", "APPEND", b"INBOX")
    fast.next_event()
    fast.accept()
    slow.accept()
    body = bytes(range(256)) * (size // 256 + 1)
    data = body[:size] + end
    points = sorted({c for c in cuts if 0 < c < len(data)})
    took = False
    for a, b in zip([0, *points], [*points, len(data)]):
        read = data[a:b]
        if fast.message_rest(read):
            took = True
        else:
            fast.receive_data(read)
        slow.receive_data(read)
        got_fast, got_slow = [], []
        for _ in range(pull):  # a consumer stopped (its input blocked) pulls only some
            got_fast.append(fast.next_event())
            got_slow.append(slow.next_event())
        assert _joined(got_fast) == _joined(got_slow)
        assert fast.mid_command == slow.mid_command
    assert _joined(_events(fast)) == _joined(_events(slow))
    assert fast.between_commands == slow.between_commands and fast.mid_command == slow.mid_command
    if not points and end == b"\r\n" and size <= 65536:
        assert took


def _joined(events: list[object]) -> list[object]:
    """AppendData chunks as one (the long way hands out a literal cut where its reads were)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, AppendData) and out and isinstance(out[-1], AppendData):
            out[-1] = AppendData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


@pytest.mark.parametrize("rest", [b"hello\r\n", b"hello)\r\n", b"hello \r\n", b"hello) \r\n"])
def test_a_utf8_message_s_rest_is_read_the_long_way(rest):
    """RFC 6855 ``UTF8 (~{n}``: its ")" is due after the literal, so a bare CRLF there is BAD, not the end."""
    fast, slow = _reader(), _reader()
    line = b"a APPEND INBOX UTF8 (~{5}\r\n"
    assert fast.append_line(line) is None  # (not the common form)
    for reader in (fast, slow):
        reader.receive_data(line)
    assert _events(fast) == _events(slow)
    assert not fast.message_rest(rest)
    for reader in (fast, slow):
        reader.receive_data(rest)
    assert _events(fast) == _events(slow)


def test_the_line_limit_holds():
    line = b"a APPEND " + b"x" * 200 + b" {5}\r\n"
    assert _reader().append_line(line) is None


def test_only_between_commands():
    reader = _reader()
    reader.receive_data(b"a NOOP")  # half a line held
    assert reader.append_line(b"a APPEND INBOX {5}\r\n") is None


# -- the session: the same bytes everywhere as the long way ---------------------------------------

RULES = [{"user": "*", "mailbox": "Shared/*", "backend": "b2"}]


def _config(referrals: str = "never"):
    return parse_config({
        "proxy": {"listen": ["tcp:0:interface=127.0.0.1"], "hostname": "fake.test", "referrals": referrals},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"},
                     "b2": {"endpoint": "tcp:host=127.0.0.3:port=1", "url": "imap://127.0.0.3:1"}},
        "map": {"default": "b1", "rules": RULES},
    }, base=Path("."))


def _harness(referrals: str) -> tuple[SessionHarness, list[bytes]]:
    h = SessionHarness(_config(referrals), connector=FakeConnector(capabilities=[*DOVECOT_CAPS, "QUOTA"]))
    h.login()
    long_way: list[bytes] = []
    receive = h.session.reader.receive_data

    def spy(data: bytes) -> None:
        long_way.append(data)
        receive(data)

    h.session.reader.receive_data = spy  # type: ignore[method-assign]
    return h, long_way


_QUOTA = b'* QUOTAROOT %s ""\r\n* QUOTA "" (STORAGE 10 100000000)\r\nrp%d OK quota\r\n'

# (what the client sends | what the backend answers, its connection the last one opened)
SCRIPTS = {
    "one by one to a taker": [
        ("c", b"a APPEND Bench {3}\r\n"), ("b", _QUOTA % (b"Bench", 1) + b"+ OK\r\n"), ("c", b"abc\r\n"),
        ("b", b"rp2 OK [APPENDUID 7 1] done\r\n"),
        ("c", b"b APPEND Bench (\\Seen $Junk) \" 1-Jan-2020 00:00:00 +0000\" {4}\r\n"), ("c", b"abcd\r\n"),
        ("b", b"rp3 OK [APPENDUID 7 2] done\r\n"),
        ("c", b"c APPEND Bench {5}\r\n"), ("c", b"abcde"), ("c", b" (\\Flagged) {2}\r\n"), ("c", b"xy\r\n"),
        ("b", b"rp4 OK [APPENDUID 7 3:4] done\r\n"),
        ("c", b"d APPEND Bench {0}\r\n"), ("c", b"e APPEND Other {2}\r\n"),
    ],
    "refused before the message": [
        ("c", b"a APPEND referral-proxy-staging-x {3}\r\n"), ("c", b"b APPEND Bench (\\Recent) {3}\r\n"),
        ("c", b"c APPEND Bench {3+}\r\nabc\r\n"), ("b", b"rp1 OK [APPENDUID 7 1] done\r\n"),
    ],
    "another backend": [
        ("c", b"a APPEND Shared/x {3}\r\n"), ("b", _QUOTA % (b"Shared/x", 1) + b"+ OK\r\n"), ("c", b"abc\r\n"),
        ("b", b"rp2 NO [TRYCREATE] no such mailbox\r\n"), ("c", b"b APPEND Shared/x {3}\r\n"),
    ],
    "input blocked mid-message": [
        ("c", b"a APPEND Bench {3}\r\n"), ("b", _QUOTA % (b"Bench", 1) + b"+ OK\r\n"), ("c", b"abc\r\n"),
        ("b", b"rp2 OK [APPENDUID 7 1] done\r\n"), ("c", b"b APPEND Bench {4}\r\n"), ("c", b"ab"),
        ("block", b""), ("c", b"cd\r\n"), ("unblock", b""), ("b", b"rp3 OK [APPENDUID 7 2] done\r\n"),
        ("c", b"c APPEND Bench {4}\r\n"), ("block", b""), ("c", b"abcd\r\n"), ("b", b"rp4 NO [OVERQUOTA] full\r\n"),
        ("unblock", b""), ("c", b"d NOOP\r\n"),
    ],
    "the cap on commands in flight": [
        ("c", b"a FETCH 1:* FLAGS\r\n" * 8), ("c", b"b APPEND Bench {3}\r\n"),
    ],
}


def _step(h: SessionHarness, who: str, data: bytes) -> None:
    if who in ("block", "unblock"):
        getattr(h.session, who)(Block.OUTPUT)  # the client reads nothing: its input is not read meanwhile
    else:
        (h.send if who == "c" else h.from_backend)(data)


@pytest.mark.parametrize("referrals", ["never", "always"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_session_appends_as_the_long_way_does(script, referrals):
    fast, fast_long = _harness(referrals)
    slow, _ = _harness(referrals)
    for who, data in SCRIPTS[script]:
        _step(fast, who, data)
        with patch("referral_proxy.session.append_line", lambda session, data: False):
            _step(slow, who, data)
        assert (fast.to_client(), fast.to_backend()) == (slow.to_client(), slow.to_backend()), (who, data)
        assert len(fast.connector.backends) == len(slow.connector.backends)
    assert fast.context.observer.commands_total == slow.context.observer.commands_total
    assert fast_long != [d for who, d in SCRIPTS[script] if who == "c"]  # some lines went the fast way


def test_the_line_to_a_taker_never_reaches_the_reader():
    h, long_way = _harness("never")
    for who, data in SCRIPTS["one by one to a taker"][:4]:
        (h.send if who == "c" else h.from_backend)(data)
    h.to_client()
    h.to_backend()
    h.send(b"b APPEND Bench {4}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"  # a known taker: the proxy's own +
    assert b"b APPEND Bench {4}\r\n" not in long_way
    h.send(b"abcd\r\n")
    assert h.to_backend() == b"rp3 APPEND Bench {4+}\r\nabcd\r\n"
    h.from_backend(b"rp3 OK [APPENDUID 7 2] done\r\n")
    assert h.to_client() == b"b OK [APPENDUID 7 2] done\r\n"
