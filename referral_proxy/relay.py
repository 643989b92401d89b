"""Relaying one parsed client command to one backend, and its answer back.

The command is written again from its parsed arguments (imap.grammar.encode) under
the proxy's own tag; each of its literals is announced synchronizing and its ``+``
awaited, even from a backend with LITERAL+: a backend reads a literal only once it has
tokenized everything before it, and one whose tokenizer refuses what the proxy's grammar
let through (Dovecot: ``{`` or 8-bit bytes in an atom, a quote inside ``BODY[...]``)
would then read a ``{n+}`` literal's bytes as commands of their own. The tagged
completion comes back with the client's tag; responses that name a command's tag
inside their data (ESEARCH ``(TAG "...")``, ``[NOUPDATE "..."]``) are translated
too, including CONTEXT=SEARCH updates that arrive long after their command.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.python.failure import Failure

from .backend import BackendProtocol, BackendUnavailable
from .commands import COMMANDS, enables_condstore
from .flow import Block
from .imap.command import Atom, ParenList, String, Token
from .imap.grammar import Arguments, Encoded, encode
from .imap.response import ResponseStart, replace_tag_references
from .pool import BackendPool

__all__ = ["Relay", "RelayHost", "wants_updates"]

MAX_UPDATES = 64  # live CONTEXT=SEARCH/SORT updates per connection; one more is refused NO [NOUPDATE]
_TAG_NAMING = (b"* ESEARCH ", b"* NO [NOUPDATE", b"* OK [NOUPDATE")  # responses naming a command by its tag
# A private name (staging.py's prefixes) in a backend's refusal: Dovecot's SELECT of a mailbox while a move renames
# another aside said "Mailbox doesn't exist: referral-proxy-aside-1b574d03" (probe l3): the name is left out
_PRIVATE_NAMED = re.compile(rb': "?referral-proxy-(?:aside|staging)-[^\s()"]*"?', re.IGNORECASE)
_NO_CANCELS: list[bytes] = []  # never changed: _Op only reads it


class RelayHost(Protocol):
    """What the relay needs of its session."""

    pool: BackendPool | None  # its backend connections (a command enabling CONDSTORE enables it on the others)

    def write_from(self, source: object, data: bytes, end: bool = True) -> None:
        """Write a response (or part of one) of *source* to the client, in order."""

    def send(self, data: bytes) -> None:
        """Write a response of the proxy's own."""

    def refuse(self, line: bytes) -> None:
        """The proxy's own refusal of a command: after the answers of the commands before it."""

    def block(self, reason: Block) -> None: ...

    def unblock(self, reason: Block) -> None: ...

    def relay_finished(self, conn: BackendProtocol) -> None:
        """A relayed command of *conn* has its completion (or its connection is gone):
        the other backends may be quiet now, and the cap on commands in flight less full."""

    def relay_lost(self, conn: BackendProtocol, tag: bytes) -> None:
        """*conn* went away before the command tagged *tag* completed."""


def _returns(args: Arguments) -> bool:
    toks = args.tokens
    return bool(toks) and isinstance(toks[0], Atom) and toks[0].value.upper() == b"RETURN"


def wants_updates(args: Arguments) -> bool:
    """``SEARCH RETURN (... UPDATE ...)``: its ESEARCH responses go on after it completes."""
    toks = args.tokens
    return (len(toks) > 1 and isinstance(toks[0], Atom) and toks[0].value.upper() == b"RETURN"
            and isinstance(toks[1], ParenList)
            and any(isinstance(t, Atom) and t.value.upper() == b"UPDATE" for t in toks[1].items))


@dataclass
class _Refs:
    """The proxy's tags on one connection whose responses name them, with the client's tags."""

    live: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)  # proxy tag -> client tag
    updates: set[bytes] = field(default_factory=set)  # of those, the ones whose updates go on (UPDATE)

    def proxy_tag(self, client_tag: bytes) -> bytes | None:
        for ptag in self.updates:  # (one at most per client tag: a second is refused, as Dovecot refuses it)
            if self.live.get(ptag) == client_tag:
                return ptag
        for ptag, ctag in reversed(self.live.items()):
            if ctag == client_tag:
                return ptag
        return None

    def forget(self, ptag: bytes) -> None:
        self.live.pop(ptag, None)
        self.updates.discard(ptag)


class Relay:
    """The relaying side of one session."""

    __slots__ = ("host", "_refs", "in_flight", "answered")  # no per-instance dict

    def __init__(self, host: RelayHost) -> None:
        self.host = host
        self._refs: dict[BackendProtocol, _Refs] = {}
        self.in_flight = 0  # commands sent and not completed (the session caps them)
        self.answered = 0  # completions relayed so far (stayalive.Waiting: has a waiting session heard any?)

    def send(self, conn: BackendProtocol, tag: bytes, name: str, args: Arguments, *,
             after: Callable[[ResponseStart], None] | None = None,
             on_continuation: Callable[[bytes], None] | None = None,
             answer: Callable[[ResponseStart, bytes], bytes] | None = None,
             settled: Callable[[], None] | None = None) -> None:
        """Relay a parsed command to *conn* under the proxy's tag. *after* sees its
        completion; *answer* may replace the completion the client gets; *settled* is called
        once it completed or its connection is gone (whichever comes)."""
        ptag = conn.next_tag()
        keep: bool | None = None
        cancels: list[bytes] = []
        if name != "ENABLE" and b"CONDSTORE" not in conn.enabled and enables_condstore(args.tokens):
            if self.host.pool is not None:
                self.host.pool.condstore_used(conn)
        spec = COMMANDS.get(name)
        if spec is not None and spec.tag_refs and _returns(args):  # ESEARCH / ESORT: (TAG "...")
            refs = self._refs.setdefault(conn, _Refs())
            keep = wants_updates(args)
            if keep and any(refs.live.get(p) == tag for p in refs.updates):  # its updates would go on after a CANCELUPDATE
                return self.host.refuse(b"%s BAD Duplicate search update tag\r\n" % tag)
            if keep and len(refs.updates) >= MAX_UPDATES:  # (one forgotten went on naming the proxy's tag: probe v4)
                return self.host.refuse(b'%s NO [NOUPDATE "%s"] Too many searches with updates; CANCELUPDATE one first\r\n'
                                        % (tag, tag))  # (a tag holds no '"' nor '\\': RFC 3501 9)
            refs.live[ptag] = tag
            if keep:
                refs.updates.add(ptag)
        elif spec is not None and spec.tag_args:  # CANCELUPDATE "tag" ...: the proxy's tags
            tokens = self.client_tags_to_proxy(conn, args.tokens)
            cancels = [t.value for t in tokens if isinstance(t, String)]
            args = Arguments(tokens, args.slots)
        op = _Op(self, conn, tag, ptag, after, keep, answer, cancels, settled)
        self.in_flight += 1
        try:
            op.start(ptag + b" " + name.encode("ascii"), encode(args) if args.tokens or args.text else None,
                     on_continuation)
        except BackendUnavailable:  # its connection went meanwhile: never sent, never answered from there (the
            self.in_flight -= 1     # count held the proxy's refusals after it for good: probe u1 of stop 51)
            raise

    def send_line(self, conn: BackendProtocol, tag: bytes, tail: bytes) -> None:
        """Relay a plain command line (fastpath.py) under the proxy's tag: *tail* is the
        client's line after its tag, CRLF included, already its canonical encoding."""
        ptag = conn.next_tag()
        op = _Op(self, conn, tag, ptag, None, None, None, _NO_CANCELS)
        conn.expect(ptag, op.done, op.lost)  # (BackendUnavailable: not counted)
        self.in_flight += 1
        conn.write(ptag + tail)

    # -- tags inside responses -------------------------------------------------------------

    def translate(self, conn: BackendProtocol, data: bytes) -> bytes:
        """A response of *conn* with the proxy's tags it names given back as the client's."""
        refs = self._refs.get(conn)
        if refs is None or not refs.live:
            return data
        return replace_tag_references(data, refs.live)

    def captured(self, conn: object, data: bytes) -> bytes:
        """A whole response a command of the proxy's own brought (a transfer's FETCH, STORE, EXPUNGE): an
        ESEARCH update in it names the client's tag, as a relayed one does (RFC 5267; probe 2, stop 48)."""
        if data.startswith(_TAG_NAMING):
            return self.translate(conn, data)  # type: ignore[arg-type]
        return data

    def client_tags_to_proxy(self, conn: BackendProtocol, tokens: tuple[Token, ...]) -> tuple[Token, ...]:
        """CANCELUPDATE's arguments: the client's tags as the proxy's tags on *conn*."""
        refs = self._refs.get(conn) or _Refs()
        out: list[Token] = []
        for tok in tokens:
            ptag = refs.proxy_tag(tok.value) if isinstance(tok, (Atom, String)) else None
            out.append(String(ptag) if ptag is not None else tok)
        return tuple(out)

    def cancel_updates(self, conn: BackendProtocol, ptags: list[bytes]) -> None:
        refs = self._refs.get(conn)
        if refs is not None:
            for ptag in ptags:
                refs.forget(ptag)

    def end_updates(self, conn: BackendProtocol) -> None:
        """The mailbox of *conn* changes: its updates are over (RFC 5267); a search still unanswered keeps its tag
        until it is (probe l4 F1: `SEARCH RETURN (COUNT) ALL` then SELECT, pipelined: `(TAG "rp4")` reached the client)."""
        refs = self._refs.get(conn)
        if refs is None:
            return
        for ptag in list(refs.live):
            if conn.still_in_flight(frozenset((ptag,))):
                refs.updates.discard(ptag)  # answered still, updated no more
            else:
                refs.forget(ptag)
        if not refs.live:
            del self._refs[conn]

    def _completed(self, conn: BackendProtocol, ptag: bytes, keep: bool | None, ok: bool) -> None:
        refs = self._refs.get(conn)
        if keep is None or refs is None or (keep and ok and ptag in refs.updates):
            return
        refs.forget(ptag)
        if not refs.live:
            del self._refs[conn]


class _Op:
    """One relayed command: its writing, and its completion or loss."""

    __slots__ = ("relay", "conn", "tag", "ptag", "after", "keep", "answer", "cancels", "pending", "blocking",
                 "settled")

    def __init__(self, relay: Relay, conn: BackendProtocol, tag: bytes, ptag: bytes,
                 after: Callable[[ResponseStart], None] | None, keep: bool | None,
                 answer: Callable[[ResponseStart, bytes], bytes] | None, cancels: list[bytes],
                 settled: Callable[[], None] | None = None) -> None:
        self.relay, self.conn, self.tag, self.ptag, self.after, self.keep = relay, conn, tag, ptag, after, keep
        self.answer, self.cancels, self.settled = answer, cancels, settled
        self.pending: list[tuple[bytes, String]] = []
        self.blocking = False

    def start(self, head: bytes, encoded: Encoded | None, on_continuation: Callable[[bytes], None] | None) -> None:
        conn = self.conn
        conn.expect(self.ptag, self.done, self.lost)
        if on_continuation is not None:
            conn.on_continuation = on_continuation
        if encoded is None:
            conn.write(head + b"\r\n")
            return
        fragments, literals = encoded.fragments, encoded.literals
        if not literals:
            conn.write(head + b" " + fragments[0] + b"\r\n")
            return
        # Each literal is announced and its "+" awaited (see the module docstring).
        parts = [head + b" " + fragments[0], *fragments[1:]]
        conn.write(parts[0] + _announce(literals[0], sync=True))
        self.pending = [(b"", literals[0]), *zip(parts[1:], literals[1:])]
        self._wait(parts[-1])

    def _wait(self, last: bytes) -> None:
        """Input pauses until every literal went (a backend that refuses early ends it too)."""
        self.blocking = True
        self.relay.host.block(Block.BACKEND_LITERAL)
        conn = self.conn

        def go_on(_text: bytes) -> None:
            _part, lit = self.pending.pop(0)
            if not self.pending:
                conn.write(lit.value + last + b"\r\n")
                self._release()
                return
            part, nxt = self.pending[0]
            conn.on_continuation = go_on
            conn.write(lit.value + part + _announce(nxt, sync=True))

        conn.on_continuation = go_on

    def _release(self) -> None:
        if self.blocking:
            self.blocking = False
            self.relay.host.unblock(Block.BACKEND_LITERAL)

    def done(self, start: ResponseStart, raw: bytes) -> None:
        relay, conn = self.relay, self.conn
        relay.in_flight -= 1
        relay.answered += 1
        if self.blocking:  # refused before all literals were sent
            conn.on_continuation = None
        data = self.tag + raw[len(self.ptag):]  # raw starts with the proxy's tag: its completion was found by it
        if start.code == "NOUPDATE":
            data = relay.translate(conn, data)
        if self.keep is not None:
            relay._completed(conn, self.ptag, self.keep, start.status == "OK")
        if self.cancels and start.status == "OK":
            relay.cancel_updates(conn, self.cancels)
        if self.answer is not None:
            data = self.answer(start, data)
        if start.status == "NO" and b"referral-proxy-" in data:
            data = _PRIVATE_NAMED.sub(b"", data)
        relay.host.write_from(conn, data)
        if self.after is not None:
            self.after(start)
        if self.blocking:
            self._release()
        if self.settled is not None:
            self.settled()
        relay.host.relay_finished(conn)

    def lost(self, _reason: Failure) -> None:
        relay = self.relay
        relay.in_flight -= 1
        relay.host.relay_lost(self.conn, self.tag)
        self._release()
        if self.settled is not None:
            self.settled()
        relay.host.relay_finished(self.conn)


def _announce(lit: String, *, sync: bool) -> bytes:
    return b"%s{%d%s}\r\n" % (b"~" if lit.binary else b"", len(lit.value), b"" if sync else b"+")
