"""The fast path: a plain relayed command goes to its backend as the client wrote it.

A command the declared table (commands.py) relays to the selected or home backend
through the plain relay handler, whose arguments nothing reads but the relay (no
mailbox to route by, no tag inside them, no state it changes), is passed on as its
line when the line is plain (imap.plain: its canonical re-encoding is the line
itself, proved in tests/test_plain.py). Two levels:

* the reader (:data:`PLAIN_COMMANDS`): such a command is admitted as any other (table,
  state, limits), then its arguments are not parsed;
* :func:`relay_plain`: a read that is exactly one such line, arriving while the
  session reads nothing else (no command half read, no literal or dropped rest
  pending, no IDLE or SASL line awaited, nothing blocking its input, below the cap
  on commands in flight, its backend ready at once) is relayed from the bytes: its
  tag swapped, no framer event, no Command. Anything else takes the long way,
  which would do the same with that line;
* :func:`completed_plain`: a backend's read that is exactly one tagged completion
  (``rp7 OK NOOP completed.``, ``rp8 OK [APPENDUID 7 12] Append completed.``; not
  ``[CAPABILITY ...]``, nor a code with brackets or quotes inside), after untagged lines relayed
  unparsed anyway (``* 3 FETCH (FLAGS (\\Seen))``, ``* 4 EXPUNGE``), relays those and
  completes its command from the bytes (relay.py swaps the tag back). After untagged
  responses with literals (a FETCH's bodies), the backend's framer passes those through
  first (``Framer.pass_through``, the long way's own step) and this completes the rest.
* :func:`append_line`: a read that is exactly the APPEND line a client sends before a message's
  synchronizing literal (``a APPEND INBOX (\\Seen) {310}``), arriving as for relay_plain, is read
  by imap.reader.CommandReader.append_line (the same checks, no framer, no general parse) and its
  command started as the long way starts it: routed by the same look-ups (appends.Appends.start:
  reserved names, moves, the map, referrals), its message then decided by the session's pump;
  a read that is exactly the rest of that message's literal and the command's CRLF is queued
  as the reader's events for it (CommandReader.message_rest), not framed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .commands import COMMANDS, CONDSTORE_ATOMS, CONDSTORE_WORDS, PRE
from .flow import Block
from .imap.command import _TAG as TAG
from .imap.plain import PLAIN_GRAMMARS, plain_arguments
from .imap.response import plain_completion, plain_untagged_lines

__all__ = ["PLAIN_COMMANDS", "NAMED", "relay_plain", "relay_line", "append_line", "completed_plain"]

# The handlers that only relay: to the selected mailbox's backend (home if none), or home;
# NOOP's after login is to_selected; mailboxes.change (STORE, EXPUNGE) relays unless a move holds
# the selected mailbox (relay_plain leaves that case to it: NO [INUSE]).
_RELAY_ONLY = {"to_selected": False, "to_home": True, "noop": False, "mailboxes.change": False}
_CHANGES = frozenset(spec.name for spec in COMMANDS.values() if spec.handler == "mailboxes.change")

#: FETCH, STORE, UID EXPUNGE ... (CHECK, EXPUNGE: no arguments, never parsed anyway).
PLAIN_COMMANDS: frozenset[str] = frozenset(
    spec.name for spec in COMMANDS.values()
    if spec.handler in _RELAY_ONLY and not spec.tag_refs and not spec.tag_args and spec.grammar.text in PLAIN_GRAMMARS
)

# name -> (grammar text, to home): every command relay_plain takes; after login the table
# admits each whatever the line (not a PRE-login command, collected, not STREAMED: session._admit).
_FAST: dict[str, tuple[str, bool]] = {
    spec.name: (spec.grammar.text, _RELAY_ONLY[spec.handler]) for spec in COMMANDS.values()
    if spec.handler in _RELAY_ONLY and not spec.tag_refs and not spec.tag_args
    and (spec.name in PLAIN_COMMANDS or not spec.grammar.takes_arguments) and spec.states != PRE
}

#: Commands whose plain line another module answers from the bytes when it can (fastnames.py: LIST,
#: LSUB, STATUS), as handler(session, tag, name, arguments) -> False to take the long way. Filled
#: by that module (it needs listing.py, which needs backend.py, which needs this module).
NAMED: dict[str, Callable[[Any, bytes, str, bytes], bool]] = {}

# One whole line: tag SP NAME [SP arguments] CRLF, nothing after it, upper-case names only. Possessive
# runs: a read of 64 KiB without a space is refused at once, not after 64 Ki steps back (~4 ms).
_LINE = re.compile(rb"(%s+) ((?:UID )?[A-Z]++)(?: ([^\r\n]++))?\r\n" % TAG.pattern)


def relay_plain(session: Any, data: bytes) -> bool:
    """Relay *data* if it is one plain command line the session (logged in: its caller
    checks) would relay at once as it is; False (nothing done) to take the long way."""
    if session.flow.blocked or not session.reader.idle:
        return False
    m = _LINE.fullmatch(data)
    if m is None or len(data) - 2 > session.reader.limits.max_line:
        return False
    tag, name, rest = m.group(1), m.group(2).decode("ascii"), m.group(3)
    fast = _FAST.get(name)
    if fast is None:
        named = NAMED.get(name)
        return named is not None and rest is not None and named(session, tag, name, rest)
    grammar, to_home = fast
    if rest is None:
        if grammar:
            return False
    elif not grammar or not plain_arguments(grammar, rest):
        return False
    if name in _CHANGES and session.mailboxes.selected_held():
        return False
    most = session.config.proxy.connections.max_commands_in_flight
    if session.relay.in_flight + len(session.appends.unanswered) >= most:
        return False
    conn = session.pool.fast(session.home if to_home else session.selected or session.home)
    if conn is None:
        return False
    relay_line(session, conn, tag, name, rest, data[len(tag):], most)
    return True


def relay_line(session: Any, conn: Any, tag: bytes, name: str, rest: bytes | None, tail: bytes, most: int) -> None:
    """Relay the command *name* (its arguments *rest*, as read) to *conn* as *tail* (its canonical
    line after the tag, CRLF included), as the long way would: counted, its keepalive taint noted;
    *most*: the cap on commands in flight (relayed, and APPENDs unanswered), below it now."""
    relay, pool = session.relay, session.pool
    if rest is not None and _may_name_condstore(rest):  # (each regex below costs a line ~2 us: most lines skip both)
        if pool.reusable and CONDSTORE_WORDS.search(rest):  # never reused (keepalive.py)
            pool.reusable = False
        if b"CONDSTORE" not in conn.enabled and CONDSTORE_ATOMS.search(rest):
            pool.condstore_used(conn)  # (FETCH 1 (MODSEQ): on every backend from now on)
    session.ctx.observer.command_named(session, tag, name)
    relay.send_line(conn, tag, tail)
    if relay.in_flight + len(session.appends.unanswered) >= most:
        session.block(Block.IN_FLIGHT)  # as the reader's loop would, before its next command


def _may_name_condstore(rest: bytes) -> bool:
    """Whether *rest* may hold a word of CONDSTORE_WORDS or CONDSTORE_ATOMS (each has SEQ, SINCE, CONDSTORE or
    QRESYNC in it): three substring tests in C instead of two case-insensitive regexes (bench_stress_cpu: STORE
    and FETCH2 ~9k instructions each more since 77b11e6)."""
    up = rest.upper()
    return b"SEQ" in up or b"SINCE" in up or b"CONDSTORE" in up or b"QRESYNC" in up


def append_line(session: Any, data: bytes) -> bool:
    """Start the APPEND *data* is the line of (the session logged in: its caller checks), as the
    reader's pump would with nothing else to read; or take *data* as the rest of a message and the
    command's end (CommandReader.message_rest). False (nothing done) to take the long way. The
    caller pumps the reader next (the message is decided there, or the rest's events handled)."""
    if not data.endswith(b"}\r\n"):  # (no APPEND being read: at once)
        return session.appends.current is not None and session.reader.message_rest(data)  # type: ignore[no-any-return]
    if session.flow.blocked or session._pumping:
        return False
    appends = session.appends
    if session.relay.in_flight + len(appends.unanswered) >= session.config.proxy.connections.max_commands_in_flight:
        return False  # the pump reads nothing now
    event = session.reader.append_line(data)
    if event is None:
        return False
    session.ctx.observer.command_named(session, event.tag, "APPEND")
    appends.start(event)
    return True


def completed_plain(conn: Any, data: bytes) -> bool:
    """Complete a command of *conn* (a BackendProtocol between responses) if *data* is
    exactly its tagged completion (imap.response.plain_completion), after whole untagged lines
    nobody acts on (imap.response.plain_untagged, no literal): what the framer, the
    response parser and the backend's relay would do with them, from the bytes."""
    if not conn._greeted or conn.closed or not conn._framer.idle:
        return False
    cut = data.rfind(b"\n", 0, len(data) - 1) + 1  # where the last line starts
    if cut and b"}\r\n" in data:  # a literal: the caller's framer passes it through first
        return False
    start = plain_completion(data[cut:] if cut else data)
    if start is None or start.code == "CAPABILITY":  # (the long way learns the capabilities)
        return False
    head = data[:cut]
    if cut and (conn.tap is not None or conn.capture is not None or conn.sink is None or not plain_untagged_lines(head)):
        return False
    pending = conn._pending.pop(start.tag, None)
    if pending is None:
        return False  # the long way says so in the log
    if cut:
        conn.sink.untagged(conn, None, head, True)
    pending.on_done(start, data[cut:] if cut else data)
    return True
