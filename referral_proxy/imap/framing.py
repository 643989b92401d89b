"""Split an IMAP byte stream into line fragments and literals (sans-I/O).

An IMAP "logical line" (a command or a response) is a sequence of fragments, each
ended by CRLF; every fragment but the last ends with a literal announcement
(``{n}``, ``{n+}``, ``~{n}``, ``~{n+}``) and is followed by exactly n literal bytes.
:class:`Framer` turns bytes fed with :meth:`Framer.receive_data` into events
returned by :meth:`Framer.next_event`, in the style of h11:

* :class:`Line` -- one fragment, with the literal it announces (if any);
* :class:`LiteralData` -- a chunk (at most 64 KiB) of the current literal;
* :class:`LiteralEnd` -- the literal is complete; a ``Line(first=False)`` follows;
* :class:`LineTooLong` -- a fragment exceeded ``max_line``; the rest of its
  logical line is discarded silently;
* :data:`NEED_DATA` -- nothing more until more bytes arrive.

Nothing here does I/O, and no literal is ever held whole in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CHUNK_SIZE",
    "NEED_DATA",
    "Event",
    "Framer",
    "Line",
    "LineTooLong",
    "LiteralData",
    "LiteralEnd",
    "LiteralSpec",
    "NeedData",
    "Overrun",
    "announced_literal",
]

#: Largest LiteralData chunk handed out, so a consumer never holds more at once.
CHUNK_SIZE = 65536

# Longest possible announcement: "~{" + 19 digits + "+}" = 23 bytes.
_ANNOUNCE_WINDOW = 24
# What a fragment being discarded keeps of its end: the announcement plus a CR.
_TAIL = 32
# Bytes of an overlong fragment reported in LineTooLong.prefix (enough for the tag).
_PREFIX = 64
_ANNOUNCE = re.compile(rb"(~?)\{([0-9]{1,19})(\+?)\}\Z")
_ANNOUNCE_LONG = re.compile(rb"(~?)\{([0-9]+)(\+?)\}\Z")
_CR = 13
_RBRACE = 125


class NeedData:
    """Sentinel type: next_event() has nothing to return until more bytes arrive."""

    __slots__ = ()
    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        # A singleton, so that ``event is NEED_DATA`` is the natural test.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class LiteralSpec:
    """A literal announced at the end of a fragment."""

    size: int
    """Number of literal bytes that follow the line end."""
    sync: bool
    """False for a non-synchronizing literal ``{n+}`` (RFC 7888): no continuation awaited."""
    binary: bool = False
    """True for a literal8 ``~{n}`` (RFC 3516 BINARY), which may contain NUL."""

    def announce(self, sync: bool | None = None) -> bytes:
        """The announcement bytes, e.g. ``b"~{5+}"``; ``sync`` overrides self.sync (to relay as {n+})."""
        if sync is None:
            sync = self.sync
        return b"%s{%d%s}" % (b"~" if self.binary else b"", self.size, b"" if sync else b"+")


@dataclass(frozen=True, slots=True)
class Line:
    """One line fragment: a whole line, or the part of one up to a literal announcement."""

    data: bytes
    """Fragment bytes, without the trailing literal announcement and without the line end."""
    literal: LiteralSpec | None
    """Literal announced at the end of this fragment; None when it ends the logical line."""
    first: bool
    """True if this fragment starts a logical line, False if it continues one after a literal."""


@dataclass(frozen=True, slots=True)
class LiteralData:
    """Some bytes of the literal being delivered, so that it never has to be whole in memory."""

    data: bytes
    """A non-empty chunk of at most CHUNK_SIZE (64 KiB) bytes."""


@dataclass(frozen=True, slots=True)
class LiteralEnd:
    """The current literal is complete; the logical line goes on with a Line(first=False)."""


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A fragment exceeded max_line; the framer now silently drops the rest of its logical line."""

    prefix: bytes
    """The first 64 bytes (max_line + 1 if less) of the offending fragment, to find the tag."""
    first: bool
    """Whether that fragment started a logical line (else the tag was in an earlier Line)."""
    limit: int
    """The max_line in force."""


@dataclass(frozen=True, slots=True)
class Overrun:
    """Dropping a refused logical line would go on past anything a command may send: more than
    max_dropped fragments (endless ``{0+}`` literals, each a line's work for nothing), or a
    non-synchronizing literal over max_skipped bytes (``{99999999999999999999+}``, never all sent)."""

    limit: int
    """The max_dropped (fragments) or max_skipped (bytes) in force."""
    literal: bool = False
    """True for a literal over max_skipped; False for too many fragments."""


Event = Line | LiteralData | LiteralEnd | LineTooLong | Overrun

_LITERAL_END = LiteralEnd()

# Framer states.
_LINE = 0  # expecting (the rest of) a fragment
_PENDING = 1  # a literal was announced; the consumer must accept or reject it
_LITERAL = 2  # delivering (or discarding) literal bytes


def announced_literal(line: bytes) -> LiteralSpec | None:
    """The literal a whole line (CRLF or LF included, or not) announces at its end, if any.

    For readers that skip literals by their size without a Framer (a benchmark's hot loop)."""
    end = len(line)
    if line.endswith(b"\n"):
        end -= 2 if line.endswith(b"\r\n") else 1
    if not end or line[end - 1] != _RBRACE:
        return None
    m = _ANNOUNCE.search(line, max(0, end - _ANNOUNCE_WINDOW), end)
    return None if m is None else LiteralSpec(int(m.group(2)), not m.group(3), bool(m.group(1)))


class Framer:
    """Turns received bytes into Line / LiteralData / LiteralEnd / LineTooLong events.

    ``max_line`` bounds the bytes of one fragment (announcement included, line end
    excluded). With ``auto_accept`` (for server responses) every literal is
    accepted without accept_literal(); otherwise the consumer must call
    accept_literal() or reject_literal() after each Line announcing one. With
    ``max_dropped``, a logical line being dropped that goes on for more fragments
    gives an Overrun event (dropping is silent and would otherwise never end); with
    ``max_skipped``, so does a non-synchronizing literal to drop of more bytes.
    """

    __slots__ = (
        "_buf",
        "_max_line",
        "_auto",
        "_state",
        "_first",
        "_discard",
        "_text",
        "_scan",
        "_pending",
        "_remaining",
        "_direct",
        "_max_dropped",
        "_dropped",
        "_max_skipped",
    )

    def __init__(self, max_line: int = 65536, *, auto_accept: bool = False, max_dropped: int | None = None,
                 max_skipped: int | None = None) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self._buf = bytearray()
        self._max_line = max_line
        self._auto = auto_accept
        self._state = _LINE
        # Whether the next fragment starts a logical line.
        self._first = True
        # Whether the current logical line is being dropped silently.
        self._discard = False
        # Whether the line dropped is text (not_a_literal): an announcement at its end is no literal.
        self._text = False
        # Bytes of _buf already searched for LF in vain (so feeding byte by byte is linear).
        self._scan = 0
        self._pending: LiteralSpec | None = None
        self._remaining = 0
        # Bytes received mid-literal with nothing buffered before them, all of them literal
        # data: handed out as they are (a 50 MB FETCH is copied once less per read).
        self._direct: bytes | None = None
        # Fragments of the logical line being dropped; over max_dropped: an Overrun event.
        self._max_dropped = max_dropped
        self._dropped = 0
        self._max_skipped = max_skipped

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the peer; then call next_event() until NEED_DATA."""
        if self._direct is not None:
            self._buf += self._direct
            self._direct = None
        elif (self._state == _LITERAL and not self._buf and not self._discard and type(data) is bytes
              and 0 < len(data) <= min(self._remaining, CHUNK_SIZE)):
            self._direct = data
            return
        self._buf += data

    def take_partial(self, data: bytes) -> bytes:
        """*data* after the start of a fragment this framer holds from an earlier read, which it
        then forgets (as if never received: only _buf and _scan held it), so that pass_through
        sees the whole line; *data* itself if it has no line end or the framer holds anything else."""
        buf = self._buf
        if (not buf or self._state != _LINE or self._discard or self._direct is not None or not self._auto
                or data.find(b"\n") < 0):
            return data
        data = bytes(buf) + data
        buf.clear()
        self._scan = 0
        return data

    def pass_through(self, data: bytes, plain: Callable[[bytes], bool], mid_response: bool = False) -> int:
        """Take from the start of *data* (instead of receive_data) whole fragments and literal
        bytes of responses that *plain* accepts by their first fragment's data, as next_event
        would deliver them: how many bytes, which the caller passes on as they are (a 50 MB
        FETCH is relayed in the bytes it was read in, never copied); ``data[k:]`` then goes to
        receive_data. *mid_response*: the caller is inside an accepted response. Only for an
        ``auto_accept`` framer with nothing buffered; 0 otherwise."""
        state, remaining, first = self._state, self._remaining, self._first
        if (self._buf or self._direct is not None or self._discard or not self._auto or state == _PENDING
                or not mid_response and (state != _LINE or not first)):
            return 0
        pos, n, most = 0, len(data), self._max_line
        while pos < n:
            if state == _LITERAL:
                if remaining:
                    take = remaining if remaining < n - pos else n - pos
                    pos += take
                    remaining -= take
                    continue
                state, first = _LINE, False
            i = data.find(b"\n", pos, pos + most + 2)
            if i < 0:
                break
            end = i - 1 if i > pos and data[i - 1] == _CR else i
            if end - pos > most:
                break
            m = (_ANNOUNCE.search(data, max(pos, end - _ANNOUNCE_WINDOW), end)
                 if end > pos and data[end - 1] == _RBRACE else None)
            if first and not plain(data[pos:m.start() if m is not None else end]):
                break
            pos = i + 1
            if m is not None:
                state, remaining, first = _LITERAL, int(m.group(2)), False
            else:
                first = True
        self._state, self._remaining, self._first = state, remaining, first
        return pos

    # -- output --------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA; RuntimeError while a literal awaits accept/reject."""
        buf = self._buf
        while True:
            state = self._state
            if state == _LITERAL:
                remaining = self._remaining
                direct = self._direct
                if direct is not None:
                    self._direct = None
                    self._remaining = remaining - len(direct)
                    return LiteralData(direct)
                if remaining:
                    if self._discard and self._max_skipped is not None and remaining > self._max_skipped:
                        self._remaining = 0  # (the peer is told BYE: nothing after this is read)
                        return Overrun(self._max_skipped, literal=True)
                    n = len(buf)
                    if not n:
                        return NEED_DATA
                    if self._discard:
                        if remaining >= n:
                            buf.clear()
                            self._remaining = remaining - n
                        else:
                            del buf[:remaining]
                            self._remaining = 0
                        continue
                    k = min(remaining, n, CHUNK_SIZE)
                    self._remaining = remaining - k
                    return LiteralData(self._take(k))
                self._state = _LINE
                self._first = False
                if self._discard:
                    continue
                return _LITERAL_END

            if state == _PENDING:
                raise RuntimeError(
                    "call accept_literal() or reject_literal() before next_event()"
                )

            if self._discard:
                # Dropping a logical line: only the end of the fragment matters, to
                # see whether a non-synchronizing literal (to drop too) follows.
                i = buf.find(b"\n")
                if i < 0:
                    if len(buf) > _TAIL:
                        del buf[:-_TAIL]
                    return NEED_DATA
                spec, _ = self._announcement(i - 1 if i and buf[i - 1] == _CR else i)
                del buf[: i + 1]
                self._scan = 0
                if spec is not None and not spec.sync and not self._text:
                    self._state = _LITERAL
                    self._remaining = spec.size
                    self._dropped += 1
                    if self._max_dropped is not None and self._dropped > self._max_dropped:
                        self._dropped = 0
                        return Overrun(self._max_dropped)
                else:
                    # Line end, or a sync literal the peer waits in vain to send.
                    self._discard = self._text = False
                    self._first = True
                    self._dropped = 0
                continue

            # A fragment of at most max_line bytes has its LF within max_line + 2.
            limit = self._max_line + 2
            i = buf.find(b"\n", self._scan, limit)
            if i < 0:
                n = len(buf)
                if n >= limit or (n == limit - 1 and buf[-1] != _CR):
                    return self._too_long()
                self._scan = n
                return NEED_DATA
            end = i - 1 if i and buf[i - 1] == _CR else i
            if end > self._max_line:
                return self._too_long()
            spec, end = self._announcement(end)
            if spec is None:
                line = Line(bytes(buf[:end]), None, self._first)
                self._first = True
            else:
                line = Line(bytes(buf[:end]), spec, self._first)
                self._first = False
                if self._auto:
                    self._state = _LITERAL
                    self._remaining = spec.size
                else:
                    self._state = _PENDING
                    self._pending = spec
            del buf[: i + 1]
            self._scan = 0
            return line

    # -- decisions -----------------------------------------------------------

    def accept_literal(self) -> None:
        """Take the announced literal: LiteralData chunks, LiteralEnd, then the line goes on."""
        spec = self._take_pending()
        self._state = _LITERAL
        self._remaining = spec.size

    def announced(self, spec: LiteralSpec) -> None:
        """A whole first fragment announcing *spec* was read by the consumer itself, from bytes
        never given to receive_data (the command reader's APPEND line): await the decision on
        its literal as after that fragment's Line. Only between logical lines, nothing held."""
        if not self.idle or self._auto:
            raise RuntimeError("a fragment is read here already")
        self._first = False
        self._state = _PENDING
        self._pending = spec

    def literal_end(self, data: bytes) -> bool:
        """*data* (instead of receive_data) taken if it is exactly the rest of the accepted literal
        being delivered (one LiteralData: at most CHUNK_SIZE bytes) and the CRLF that ends its
        logical line: the framer is then between logical lines, as after that LiteralData, the
        LiteralEnd and the empty Line. False, and nothing taken, for any other bytes or state."""
        if (self._state != _LITERAL or self._discard or self._buf or self._direct is not None
                or self._remaining != len(data) - 2 or self._remaining > CHUNK_SIZE or not data.endswith(b"\r\n")):
            return False
        self._state, self._remaining, self._first = _LINE, 0, True
        return True

    def reject_literal(self) -> None:
        """Refuse the announced literal and the rest of its command.

        A sync literal is never sent by the peer, so a new logical line comes next;
        a non-sync one is on its way and is dropped along with the rest of the line.
        """
        spec = self._take_pending()
        if spec.sync:
            self._state = _LINE
            self._first = True
        else:
            self._state = _LITERAL
            self._remaining = spec.size
            self._discard = True

    def not_a_literal(self) -> None:
        """Take the announcement ending this line as its text (a line read whole, IDLE's DONE or a SASL
        response, where a server takes no literal): the next bytes begin a new logical line."""
        self._take_pending()
        self._state = _LINE
        self._first = True

    def text_too_long(self) -> None:
        """The line over max_line being dropped is text (not_a_literal): dropped to its own end, whatever it ends in."""
        self._text = True

    def discard_line(self) -> None:
        """Silently drop the rest of the current logical line (literals included).

        Dropping stops at the line end or after a fragment announcing a sync literal.
        With a literal awaiting a decision this is reject_literal(); between logical
        lines it does nothing.
        """
        if self._state == _PENDING:
            self.reject_literal()
        elif self._state == _LITERAL or not self._first:
            self._discard = True

    # -- introspection -------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes held in the buffer now.

        Once next_event() has returned NEED_DATA this is at most max_line + 1 (or
        32 + 1 while dropping a line), so only one receive_data() ever adds to it.
        """
        return len(self._buf) + (len(self._direct) if self._direct is not None else 0)

    @property
    def mid_line(self) -> bool:
        """True while the peer is in the middle of a logical line: part of a fragment is
        buffered, a literal is announced or being read, or the line goes on after one."""
        return bool(self._buf) or self._direct is not None or self._state != _LINE or not self._first

    @property
    def idle(self) -> bool:
        """True between logical lines with nothing buffered, announced or being dropped:
        the next byte received starts a new line."""
        return (not self._buf and self._direct is None and self._state == _LINE and self._first
                and not self._discard)

    @property
    def literal_remaining(self) -> int:
        """Bytes of the accepted literal still to deliver (0 if none is being delivered)."""
        if self._state == _LITERAL and not self._discard:
            return self._remaining
        return 0

    # -- internals -----------------------------------------------------------

    def _take_pending(self) -> LiteralSpec:
        spec = self._pending
        if self._state != _PENDING or spec is None:
            raise RuntimeError("no literal is waiting for accept_literal()/reject_literal()")
        self._pending = None
        return spec

    def _announcement(self, end: int) -> tuple[LiteralSpec | None, int]:
        """The literal announced by the fragment ending at ``end``, and where its data ends."""
        buf = self._buf
        if end and buf[end - 1] == _RBRACE:
            m = _ANNOUNCE.search(buf, max(0, end - _ANNOUNCE_WINDOW), end)
            if m is None and end > 1 and (48 <= buf[end - 2] <= 57 or buf[end - 2] == 43):
                m = self._long_announcement(end)  # 20 digits or more: a literal no limit takes, not text
            if m is not None:
                spec = LiteralSpec(int(m.group(2)), not m.group(3), bool(m.group(1)))
                return spec, m.start()
        return None, end

    def _long_announcement(self, end: int) -> re.Match[bytes] | None:
        """``{18446744073709551616+}``: read as the literal it announces (refused by every limit,
        its bytes dropped), never as a line's text whose "literal" then runs as commands."""
        buf = self._buf
        start = buf.rfind(b"{", 0, end)
        if start < 0:
            return None
        return _ANNOUNCE_LONG.match(buf, start - 1 if start and buf[start - 1] == 126 else start, end)

    def _too_long(self) -> LineTooLong:
        # Only max_line + 1 bytes are sure to be there, whatever the split.
        prefix = bytes(self._buf[: min(_PREFIX, self._max_line + 1)])
        event = LineTooLong(prefix, self._first, self._max_line)
        self._discard = True
        self._scan = 0
        return event

    def _take(self, k: int) -> bytes:
        """Remove and return the first k bytes of the buffer, copying them once."""
        buf = self._buf
        if k == len(buf):
            data = bytes(buf)
            buf.clear()
            return data
        with memoryview(buf) as view:
            data = view[:k].tobytes()
        del buf[:k]
        return data
