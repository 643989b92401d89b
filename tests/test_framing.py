"""Tests of referral_proxy.imap.framing: every input is fed whole, byte by byte and in random splits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from referral_proxy.imap.framing import (
    CHUNK_SIZE,
    NEED_DATA,
    Framer,
    Line,
    LineTooLong,
    LiteralData,
    LiteralEnd,
    LiteralSpec,
    NeedData,
)

SPLITS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- driver --------------------------------------------------------------------


def drive(chunks, actions=(), *, max_line=65536, auto_accept=False):
    """Feed chunks, draining events after each, and return the events with LiteralData merged.

    actions[k] says what to do with the k-th announced literal (default "accept"):
    "accept"; "reject"; "discard" (accept, then discard_line() at once);
    "partial" (accept, discard_line() once 3 bytes arrived; only those 3 are recorded);
    "end" (accept, discard_line() after its LiteralEnd);
    "pending" (discard_line() while the decision is pending).
    Also checks the invariants that hold whatever the split.
    """
    framer = Framer(max_line, auto_accept=auto_accept)
    events = []
    announced = 0
    partial = None  # bytes still wanted while a "partial" literal is delivered
    discard_at_end = False
    bound = max(max_line, 32) + 1
    for chunk in chunks:
        before = framer.buffered
        framer.receive_data(chunk)
        assert framer.buffered == before + len(chunk)
        while True:
            ev = framer.next_event()
            assert framer.buffered <= before + len(chunk)
            if ev is NEED_DATA:
                break
            if isinstance(ev, LiteralData):
                assert 0 < len(ev.data) <= CHUNK_SIZE
                if partial is not None:
                    ev = LiteralData(ev.data[:partial])
                    partial -= len(ev.data)
                    if not partial:
                        partial = None
                        framer.discard_line()
                if events and isinstance(events[-1], LiteralData):
                    events[-1] = LiteralData(events[-1].data + ev.data)
                else:
                    events.append(ev)
                continue
            events.append(ev)
            if isinstance(ev, LiteralEnd):
                partial = None
                if discard_at_end:
                    discard_at_end = False
                    framer.discard_line()
            elif isinstance(ev, Line) and ev.literal is not None:
                action = actions[announced] if announced < len(actions) else "accept"
                announced += 1
                if auto_accept:
                    assert framer.literal_remaining == ev.literal.size
                    continue
                assert framer.literal_remaining == 0
                if action == "reject":
                    framer.reject_literal()
                elif action == "pending":
                    framer.discard_line()
                else:
                    framer.accept_literal()
                    assert framer.literal_remaining == ev.literal.size
                    if action == "discard":
                        framer.discard_line()
                        assert framer.literal_remaining == 0
                    elif action == "partial":
                        partial = 3
                    elif action == "end":
                        discard_at_end = True
        assert framer.buffered <= bound
    return events


def whole(data):
    return [data]


def bytewise(data):
    return [data[i : i + 1] for i in range(len(data))]


@st.composite
def splits(draw, data: bytes):
    """data cut at random points (possibly empty pieces)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def L(data, literal=None, first=True):
    return Line(data, literal, first)


def S(size, sync=True, binary=False):
    return LiteralSpec(size, sync, binary)


D = LiteralData
E = LiteralEnd()


# -- table of cases --------------------------------------------------------------


@dataclass
class Case:
    id: str
    data: bytes
    expected: list
    actions: tuple = ()
    kwargs: dict = field(default_factory=dict)


LONG = b"x" * 30
CASES = [
    Case("plain", b"A1 NOOP\r\nA2 CAPABILITY\r\n", [L(b"A1 NOOP"), L(b"A2 CAPABILITY")]),
    Case(
        "bare-lf-and-empty-lines",
        b"A1 NOOP\nA2 LOGOUT\r\n\r\n\n",
        [L(b"A1 NOOP"), L(b"A2 LOGOUT"), L(b""), L(b"")],
    ),
    Case("inner-cr-kept", b"A1 X\rY\r\r\n", [L(b"A1 X\rY\r")]),
    Case("partial-line-not-emitted", b"A1 NOOP\r\nA2 NO", [L(b"A1 NOOP")]),
    Case(
        "sync-literals",
        b"A1 LOGIN {3}\r\nbob {6}\r\nsecret\r\n",
        [L(b"A1 LOGIN ", S(3)), D(b"bob"), E, L(b" ", S(6), False), D(b"secret"), E, L(b"", None, False)],
    ),
    Case(
        "non-sync-binary",
        b"A1 APPEND x ~{4+}\r\n\x00\r\n\x01 ~{2}\r\n\xff\xfe\r\n",
        [
            L(b"A1 APPEND x ", S(4, False, True)),
            D(b"\x00\r\n\x01"),
            E,
            L(b" ", S(2, True, True), False),
            D(b"\xff\xfe"),
            E,
            L(b"", None, False),
        ],
    ),
    Case(
        "zero-length",
        b"A1 LOGIN {0}\r\n {0+}\r\n\r\nA2 NOOP\r\n",
        [L(b"A1 LOGIN ", S(0)), E, L(b" ", S(0, False), False), E, L(b"", None, False), L(b"A2 NOOP")],
    ),
    Case(
        "multiappend",
        b'A1 APPEND saved (\\Seen) {5}\r\nhello {6+}\r\nworld! "x" {0}\r\n\r\nA2 NOOP\r\n',
        [
            L(b"A1 APPEND saved (\\Seen) ", S(5)),
            D(b"hello"),
            E,
            L(b" ", S(6, False), False),
            D(b"world!"),
            E,
            L(b' "x" ', S(0), False),
            E,
            L(b"", None, False),
            L(b"A2 NOOP"),
        ],
    ),
    Case(
        "literal-holding-line-ends-and-announcements",
        b"A1 X {10}\r\n{3}\r\nab\r\n\n)\r\nA2 NOOP\r\n",
        [L(b"A1 X ", S(10)), D(b"{3}\r\nab\r\n\n"), E, L(b")", None, False), L(b"A2 NOOP")],
    ),
    Case(
        "not-announcements",
        b'A1 X "{5}"\r\nA2 X {1234567890123456789x}\r\nA3 X {}\r\nA4 X {5+ }\r\nA5 X {-1}\r\nA6 X { 5}\r\nA7 X {5}}\r\n',
        [
            L(b'A1 X "{5}"'),
            L(b"A2 X {1234567890123456789x}"),  # twenty digits or more: test_hostile_bytes.py
            L(b"A3 X {}"),
            L(b"A4 X {5+ }"),
            L(b"A5 X {-1}"),
            L(b"A6 X { 5}"),
            L(b"A7 X {5}}"),
        ],
    ),
    Case(
        "nineteen-digits-and-double-tilde",
        b"A1 X {1234567890123456789}\r\nA2 X ~~{2+}\r\nab\r\n",
        [L(b"A1 X ", S(1234567890123456789)), L(b"A2 X ~", S(2, False, True)), D(b"ab"), E, L(b"", None, False)],
        actions=("reject",),
    ),
    Case(
        "reject-sync",
        b"A1 LOGIN {3}\r\nA2 NOOP\r\n",
        [L(b"A1 LOGIN ", S(3)), L(b"A2 NOOP")],
        actions=("reject",),
    ),
    Case(
        "reject-non-sync-drains-literals",
        b"A1 LOGIN {3+}\r\nbob {6+}\r\nA9 X\r\n\r\nA2 NOOP\r\n",
        [L(b"A1 LOGIN ", S(3, False)), L(b"A2 NOOP")],
        actions=("reject",),
    ),
    Case(
        "reject-non-sync-stops-at-sync",
        b"A1 X {3+}\r\nabc {2}\r\nA2 NOOP\r\n",
        [L(b"A1 X ", S(3, False)), L(b"A2 NOOP")],
        actions=("reject",),
    ),
    Case(
        "discard-while-pending",
        b"A1 X {3+}\r\nabc\r\nA2 NOOP {1}\r\nA3 NOOP\r\n",
        [L(b"A1 X ", S(3, False)), L(b"A2 NOOP ", S(1)), L(b"A3 NOOP")],
        actions=("pending", "pending"),
    ),
    Case(
        "discard-at-literal-start",
        b"A1 APPEND x {5}\r\nhello {3+}\r\nabc\r\nA2 NOOP\r\n",
        [L(b"A1 APPEND x ", S(5)), L(b"A2 NOOP")],
        actions=("discard",),
    ),
    Case(
        "discard-mid-literal",
        b"A1 APPEND x {10}\r\n0123456789 {2+}\r\nab ~{4+}\r\n\r\n\r\n\r\nA2 NOOP\r\n",
        [L(b"A1 APPEND x ", S(10)), D(b"012"), L(b"A2 NOOP")],
        actions=("partial",),
    ),
    Case(
        "discard-mid-literal-stops-after-sync",
        b"A1 APPEND x {10}\r\n0123456789 {2}\r\nA2 NOOP\r\n",
        [L(b"A1 APPEND x ", S(10)), D(b"012"), L(b"A2 NOOP")],
        actions=("partial",),
    ),
    Case(
        "discard-after-literal-end",
        b"A1 APPEND x {3}\r\nabc {2+}\r\nde (junk\r\nA2 NOOP\r\n",
        [L(b"A1 APPEND x ", S(3)), D(b"abc"), E, L(b"A2 NOOP")],
        actions=("end",),
    ),
    Case(
        "too-long",
        b"A1 LOGIN " + LONG + b"\r\nA2 NOOP\r\n",
        [LineTooLong(b"A1 LOGIN " + LONG[:12], True, 20), L(b"A2 NOOP")],
        kwargs={"max_line": 20},
    ),
    Case(
        "too-long-prefix-is-64-bytes",
        b"A1 " + b"y" * 200 + b"\nA2 NOOP\n",
        [LineTooLong(b"A1 " + b"y" * 61, True, 100), L(b"A2 NOOP")],
        kwargs={"max_line": 100},
    ),
    Case(
        "too-long-drains-non-sync-literals",
        b"A1 APPEND x " + LONG + b" {5+}\r\nhe\r\nl {3+}\r\nabc\r\nA2 NOOP\r\n",
        [LineTooLong(b"A1 APPEND x " + LONG[:9], True, 20), L(b"A2 NOOP")],
        kwargs={"max_line": 20},
    ),
    Case(
        "too-long-ends-at-sync",
        b"A1 X " + LONG + b" ~{5}\r\nA2 NOOP\r\n",
        [LineTooLong(b"A1 X " + LONG[:16], True, 20), L(b"A2 NOOP")],
        kwargs={"max_line": 20},
    ),
    Case(
        "too-long-very-long-fragment-drains-literal",
        b"A1 X " + b"z" * 5000 + b" {4+}\r\n\r\n\r\n\r\nA2 NOOP\r\n",
        [LineTooLong(b"A1 X " + b"z" * 59, True, 100), L(b"A2 NOOP")],
        kwargs={"max_line": 100},
    ),
    Case(
        "too-long-continuation",
        b"A1 X {3}\r\nabc " + LONG + b" {2+}\r\nab\r\nA2 NOOP\r\n",
        [L(b"A1 X ", S(3)), D(b"abc"), E, LineTooLong(b" " + LONG[:20], False, 20), L(b"A2 NOOP")],
        kwargs={"max_line": 20},
    ),
    Case(
        "exact-limit",
        b"0123456789\r\n0123456789\n012345 {3}\r\nabc\r\n",
        [L(b"0123456789"), L(b"0123456789"), L(b"012345 ", S(3)), D(b"abc"), E, L(b"", None, False)],
        kwargs={"max_line": 10},
    ),
    Case(
        "one-over-limit",
        b"0123456789A\r\nB\r\n0123456789\rX\r\nC\r\n0123456 {3+}\r\nabc\r\nD\r\n",
        [
            LineTooLong(b"0123456789A", True, 10),
            L(b"B"),
            LineTooLong(b"0123456789\r", True, 10),
            L(b"C"),
            LineTooLong(b"0123456 {3+", True, 10),
            L(b"D"),
        ],
        kwargs={"max_line": 10},
    ),
    Case(
        "auto-accept",
        b"* 1 FETCH (BODY[] {5}\r\nhello BINARY[1] ~{2}\r\n\x00\x01)\r\nA1 OK done\r\n",
        [
            L(b"* 1 FETCH (BODY[] ", S(5)),
            D(b"hello"),
            E,
            L(b" BINARY[1] ", S(2, True, True), False),
            D(b"\x00\x01"),
            E,
            L(b")", None, False),
            L(b"A1 OK done"),
        ],
        kwargs={"auto_accept": True},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_whole_and_bytewise(case):
    assert drive(whole(case.data), case.actions, **case.kwargs) == case.expected
    assert drive(bytewise(case.data), case.actions, **case.kwargs) == case.expected


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@SPLITS
@given(data=st.data())
def test_random_splits(case, data):
    chunks = data.draw(splits(case.data))
    assert drive(chunks, case.actions, **case.kwargs) == case.expected


# -- misuse ------------------------------------------------------------------------

MISUSE_INPUT = b"A1 LOGIN {3}\r\nbob\r\nA2 NOOP\r\n"


def feed_until_literal(framer, chunks):
    """Feed chunks until a Line announcing a literal comes out; return it and the unfed chunks."""
    for i, chunk in enumerate(chunks):
        framer.receive_data(chunk)
        ev = framer.next_event()
        while ev is not NEED_DATA:
            if isinstance(ev, Line) and ev.literal is not None:
                return ev, chunks[i + 1 :]
            ev = framer.next_event()
    raise AssertionError("no literal announced")


def check_misuse(chunks):
    framer = Framer()
    with pytest.raises(RuntimeError):
        framer.accept_literal()
    with pytest.raises(RuntimeError):
        framer.reject_literal()
    line, rest = feed_until_literal(framer, chunks)
    assert line == L(b"A1 LOGIN ", S(3))
    with pytest.raises(RuntimeError):
        framer.next_event()
    with pytest.raises(RuntimeError):  # still undecided
        framer.next_event()
    framer.accept_literal()
    with pytest.raises(RuntimeError):
        framer.accept_literal()
    with pytest.raises(RuntimeError):
        framer.reject_literal()
    events = []
    for chunk in [b"", *rest]:
        framer.receive_data(chunk)
        while (ev := framer.next_event()) is not NEED_DATA:
            events.append(ev)
    merged = b"".join(e.data for e in events if isinstance(e, LiteralData))
    assert merged == b"bob"
    assert [e for e in events if not isinstance(e, LiteralData)] == [E, L(b"", None, False), L(b"A2 NOOP")]


def test_misuse_whole_and_bytewise():
    check_misuse(whole(MISUSE_INPUT))
    check_misuse(bytewise(MISUSE_INPUT))


@SPLITS
@given(st.data())
def test_misuse_random_splits(data):
    check_misuse(data.draw(splits(MISUSE_INPUT)))


def test_auto_accept_needs_no_decision():
    framer = Framer(auto_accept=True)
    framer.receive_data(b"* 1 FETCH (BODY[] {2}\r\n")
    assert framer.next_event() == L(b"* 1 FETCH (BODY[] ", S(2))
    with pytest.raises(RuntimeError):
        framer.accept_literal()
    assert framer.literal_remaining == 2
    assert framer.next_event() is NEED_DATA
    framer.receive_data(b"h")
    assert framer.next_event() == D(b"h")
    assert framer.literal_remaining == 1


def test_need_data_sentinel():
    assert repr(NEED_DATA) == "NEED_DATA"
    assert NeedData() is NEED_DATA
    assert Framer().next_event() is NEED_DATA


def test_literal_spec_announce():
    assert S(5).announce() == b"{5}"
    assert S(5, False).announce() == b"{5+}"
    assert S(5, True, True).announce() == b"~{5}"
    assert S(5, True, True).announce(sync=False) == b"~{5+}"
    assert S(7, False).announce(sync=True) == b"{7}"


def test_events_are_frozen():
    with pytest.raises(AttributeError):
        L(b"x").data = b"y"  # type: ignore[misc]


def test_discard_line_between_lines_is_a_no_op():
    framer = Framer()
    framer.receive_data(b"A1 NOOP\r\n")
    assert framer.next_event() == L(b"A1 NOOP")
    framer.discard_line()
    framer.receive_data(b"A2 NOOP\r\n")
    assert framer.next_event() == L(b"A2 NOOP")


# -- memory bounds -------------------------------------------------------------------

BIG = 10 * 1024 * 1024


def big_literal_events(pieces, size=BIG):
    """Feed an APPEND of a literal; return (chunk sizes, digest, max buffered after a drain, ...)."""
    framer = Framer()
    framer.receive_data(b"A1 APPEND x {%d}\r\n" % size)
    line = framer.next_event()
    assert line == L(b"A1 APPEND x ", S(size))
    framer.accept_literal()
    sizes, digest, high = [], hashlib.sha256(), 0
    tail = []
    for piece in pieces:
        framer.receive_data(piece)
        while (ev := framer.next_event()) is not NEED_DATA:
            if isinstance(ev, LiteralData):
                sizes.append(len(ev.data))
                digest.update(ev.data)
            else:
                tail.append(ev)
        high = max(high, framer.buffered)
    return sizes, digest.hexdigest(), high, tail, framer


def big_pieces(step, size=BIG):
    body = bytes(range(256)) * (size // 256)
    pieces = [body[i : i + step] for i in range(0, size, step)]
    pieces.append(b")\r\n")
    return body, pieces


def test_big_literal_in_64k_pieces_keeps_buffer_small():
    body, pieces = big_pieces(65536)
    sizes, digest, high, tail, framer = big_literal_events(pieces)
    assert digest == hashlib.sha256(body).hexdigest()
    assert sum(sizes) == BIG and max(sizes) <= CHUNK_SIZE
    assert high <= 65536
    assert tail == [E, L(b")", None, False)]
    assert framer.buffered == 0


def test_big_literal_fed_at_once_is_chunked():
    body, _ = big_pieces(65536)
    sizes, digest, high, tail, _ = big_literal_events([body + b")\r\n"])
    assert digest == hashlib.sha256(body).hexdigest()
    assert sizes == [CHUNK_SIZE] * (BIG // CHUNK_SIZE)
    assert tail == [E, L(b")", None, False)]


def test_a_read_inside_a_literal_is_handed_out_as_it_is():
    """A relay's 64 KiB reads in the middle of a big literal are not copied by the framer."""
    framer = Framer(1024, auto_accept=True)
    framer.receive_data(b"* 1 FETCH (BODY[] {200000}\r\n" + b"a" * 100)
    assert isinstance(framer.next_event(), Line)
    assert framer.next_event() == LiteralData(b"a" * 100)
    assert framer.next_event() is NEED_DATA
    piece = b"b" * CHUNK_SIZE
    framer.receive_data(piece)
    assert framer.buffered == CHUNK_SIZE and framer.literal_remaining == 200000 - 100
    event = framer.next_event()
    assert isinstance(event, LiteralData) and event.data is piece
    rest = 200000 - 100 - CHUNK_SIZE
    framer.receive_data(b"c" * (rest - 10))
    framer.receive_data(b"c" * 10 + b")\r\n")  # two reads before next_event: in order, whole
    got = b""
    while (event := framer.next_event()) is not NEED_DATA and isinstance(event, LiteralData):
        got += event.data
    assert got == b"c" * rest and event == E
    assert framer.next_event() == L(b")", None, False)


@settings(max_examples=10, deadline=None)
@given(st.integers(100, 300_000))
def test_big_literal_random_piece_size(step):
    body, pieces = big_pieces(step, 1 << 20)
    sizes, digest, high, tail, _ = big_literal_events(pieces, 1 << 20)
    assert digest == hashlib.sha256(body).hexdigest()
    assert max(sizes) <= CHUNK_SIZE
    assert high <= step
    assert tail == [E, L(b")", None, False)]


def test_long_line_without_lf_is_bounded_bytewise():
    framer = Framer(1000)
    events = []
    high = 0
    for i in range(20000):
        framer.receive_data(b"x")
        while (ev := framer.next_event()) is not NEED_DATA:
            events.append((i, ev))
        high = max(high, framer.buffered)
    # reported as soon as the 1001st byte arrives, not at the line end
    assert events == [(1000, LineTooLong(b"x" * 64, True, 1000))]
    assert high <= 1001
    assert framer.buffered <= 32
    framer.receive_data(b"\r\nA2 NOOP\r\n")
    assert framer.next_event() == L(b"A2 NOOP")


def test_discarded_literal_is_not_buffered():
    framer = Framer(100)
    framer.receive_data(b"A1 APPEND x {1000000+}\r\n")
    assert framer.next_event() == L(b"A1 APPEND x ", S(1000000, False))
    framer.reject_literal()
    assert framer.literal_remaining == 0
    for _ in range(1000000 // 4096):
        framer.receive_data(b"\n" * 4096)
        assert framer.next_event() is NEED_DATA
        assert framer.buffered == 0
    framer.receive_data(b"\n" * (1000000 % 4096) + b" more\r\nA2 NOOP\r\n")
    assert framer.next_event() == L(b"A2 NOOP")


# -- properties ---------------------------------------------------------------------

_frag = st.binary(max_size=40).map(
    # no line ends inside; no "}" or "~" at the end, which would change the announcement
    lambda b: (lambda c: c + b"." if c.endswith((b"}", b"~")) else c)(b.replace(b"\n", b"").replace(b"\r", b""))
)
_literal = st.tuples(
    st.sampled_from([(True, False), (False, False), (True, True), (False, True)]),
    st.binary(max_size=80) | st.sampled_from([b"{3}\r\n", b"\r\n", b"\n"]),
)
_command = st.tuples(st.lists(st.tuples(_frag, _literal), max_size=4), _frag)


def serialize(commands, line_end):
    out = bytearray()
    for parts, last in commands:
        for frag, ((sync, binary), body) in parts:
            out += frag + LiteralSpec(len(body), sync, binary).announce() + line_end + body
        out += last + line_end
    return bytes(out)


def reconstruct(events):
    """Commands as (list of (fragment, (sync, binary), literal body), last fragment)."""
    commands = []
    parts = []
    for ev in events:
        if isinstance(ev, Line):
            assert ev.first == (not parts)
            if ev.literal is None:
                commands.append((parts, ev.data))
                parts = []
            else:
                parts.append([ev.data, (ev.literal.sync, ev.literal.binary), b"", ev.literal.size])
        elif isinstance(ev, LiteralData):
            parts[-1][2] += ev.data
        else:
            assert isinstance(ev, LiteralEnd)
            assert len(parts[-1][2]) == parts[-1][3]
    assert not parts
    return [([(f, k, b) for f, k, b, _ in p], last) for p, last in commands]


@settings(max_examples=150, deadline=None)
@given(st.lists(_command, min_size=1, max_size=4), st.sampled_from([b"\r\n", b"\n"]), st.booleans(), st.data())
def test_round_trip(commands, line_end, auto_accept, data):
    wire = serialize(commands, line_end)
    chunks = data.draw(splits(wire))
    events = drive(chunks, auto_accept=auto_accept)
    expected = [([(f, k, b) for f, (k, b) in parts], last) for parts, last in commands]
    assert reconstruct(events) == expected


_pieces = st.sampled_from(
    [b"a", b" ", b"{", b"}", b"+", b"~", b"1", b"3", b"\r", b"\n", b"\r\n", b"xxxxxxxx", b"{2}\r\n", b"{1+}\r\n", b"~{0}\r\n", b"{4+}\n"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_pieces, max_size=60).map(b"".join),
    st.integers(1, 24),
    st.lists(st.sampled_from(["accept", "reject", "discard", "partial", "end", "pending"]), max_size=8),
    st.booleans(),
    st.data(),
)
def test_garbage_is_split_invariant(wire, max_line, actions, auto_accept, data):
    kwargs = {"max_line": max_line, "auto_accept": auto_accept}
    reference = drive(whole(wire), actions, **kwargs)
    assert drive(bytewise(wire), actions, **kwargs) == reference
    assert drive(data.draw(splits(wire)), actions, **kwargs) == reference
    for ev in reference:
        if isinstance(ev, Line):
            assert b"\n" not in ev.data
            assert len(ev.data) + (len(ev.literal.announce()) if ev.literal else 0) <= max_line


def test_announced_literal_of_a_whole_line():
    from referral_proxy.imap.framing import LiteralSpec, announced_literal

    assert announced_literal(b"* 1 FETCH (BODY[] {12}\r\n") == LiteralSpec(12, True)
    assert announced_literal(b"a APPEND x ~{3+}\n") == LiteralSpec(3, False, True)
    assert announced_literal(b"a SEARCH {5+}") == LiteralSpec(5, False)
    for line in (b"* OK done\r\n", b"* OK {x}\r\n", b"}\r\n", b"", b"{12} text\r\n"):
        assert announced_literal(line) is None, line


# -- pass_through: bulk responses relayed in the bytes they were read in ------------------

_RESPONSES = st.one_of(
    st.builds(lambda n, body: b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (n, n, len(body)) + body + b")\r\n",
              st.integers(1, 99), st.binary(max_size=300)),
    st.builds(lambda n: b"* %d EXISTS\r\n" % n, st.integers(0, 99)),
    st.builds(lambda body: b"* BYE {%d}\r\n" % len(body) + body + b"\r\n", st.binary(max_size=50)),  # not plain
    st.builds(lambda n: b"rp%d OK done\r\n" % n, st.integers(1, 9)),  # tagged: never passed through
    st.just(b"* 3 FETCH (BODY[1] {2}\r\nab BODY[2] {0}\r\n)\r\n"),
    st.just(b"* " + b"x" * 63 + b"\r\n"),  # one byte over max_line: the usual LineTooLong
)


def _plain(data: bytes) -> bool:
    return data.startswith(b"* ") and not data.startswith(b"* BYE")


def _wire(event) -> bytes:
    if isinstance(event, Line):
        return event.data + (event.literal.announce() if event.literal is not None else b"") + b"\r\n"
    return event.data if isinstance(event, LiteralData) else b""


@given(st.lists(_RESPONSES, max_size=12), st.data(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_pass_through_takes_exactly_the_accepted_responses_in_any_split(responses, data, partial):
    """Every byte comes out once, in order; what pass_through takes belongs to responses whose
    first fragment *plain* accepts; every other first fragment (a tagged line, a BYE) and an
    overlong line still reach next_event as before. *partial*: each read goes through
    take_partial first (backend.py), so a line an earlier read ended in is whole again."""
    stream = b"".join(responses)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    framer, out, inside, firsts = Framer(64, auto_accept=True), [], False, []
    for chunk in chunks:
        if partial:
            chunk = framer.take_partial(chunk)
        k = framer.pass_through(chunk, _plain, inside)
        if k:
            out.append(chunk[:k])
            inside = framer.mid_line
        framer.receive_data(chunk[k:])
        while (event := framer.next_event()) is not NEED_DATA:
            if isinstance(event, LineTooLong):
                out.append(b"<too long>")
                inside = False
                continue
            if isinstance(event, Line):
                if event.first:
                    firsts.append(event.data)
                    inside = _plain(event.data)
                inside = inside and event.literal is not None
            out.append(_wire(event))
    expected = Framer(64, auto_accept=True)
    expected.receive_data(stream)
    whole, want_firsts = [], []
    while (event := expected.next_event()) is not NEED_DATA:
        if isinstance(event, LineTooLong):
            whole.append(b"<too long>")
            continue
        if isinstance(event, Line) and event.first and not _plain(event.data):
            want_firsts.append(event.data)
        whole.append(_wire(event))
    assert b"".join(out) == b"".join(whole)
    assert [f for f in firsts if not _plain(f)] == want_firsts  # none of them passed through


def test_a_line_cut_by_a_read_is_passed_through_whole():
    """The read that ends a line an earlier read began: passed through from there (it failed
    on the old code: pass_through took nothing while anything was buffered)."""
    f = Framer(64, auto_accept=True)
    assert f.pass_through(b"* 1 FETCH (UID 1)\r\n* 2 FET", _plain) == len(b"* 1 FETCH (UID 1)\r\n")
    f.receive_data(b"* 2 FET")
    assert f.next_event() is NEED_DATA
    assert f.take_partial(b"CH") == b"CH"  # no line end yet: it stays buffered
    f.receive_data(b"CH")
    data = f.take_partial(b" (UID 2)\r\nrp1 OK done\r\n")
    assert data == b"* 2 FETCH (UID 2)\r\nrp1 OK done\r\n" and f.idle
    assert f.pass_through(data, _plain) == len(b"* 2 FETCH (UID 2)\r\n")
    g = Framer(64, auto_accept=True)  # inside a literal, or a line being dropped: nothing taken
    g.receive_data(b"* 1 FETCH (BODY[] {5}\r\nab")
    assert isinstance(g.next_event(), Line)
    assert g.take_partial(b"c\r\n") == b"c\r\n"
    h = Framer(64)  # a command reader's framer: never
    h.receive_data(b"a NO")
    assert h.take_partial(b"OP\r\n") == b"OP\r\n"


def test_pass_through_refuses_what_it_must_not_take():
    f = Framer(64, auto_accept=True)
    assert f.pass_through(b"rp1 OK done\r\n", _plain) == 0
    assert f.pass_through(b"* 1 FETCH (BODY[] {5}\r\nab", _plain) == len(b"* 1 FETCH (BODY[] {5}\r\nab")
    assert f.pass_through(b"cde)\r\n* 2 EXISTS\r\nrp2 OK x\r\n", _plain, True) == len(b"cde)\r\n* 2 EXISTS\r\n")
    g = Framer(64)  # a command reader decides on each literal: never
    assert g.pass_through(b"* 1 EXISTS\r\n", _plain) == 0
