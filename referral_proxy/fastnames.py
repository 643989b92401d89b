"""LIST, LSUB and STATUS from the bytes of a plain line, when nothing needs the long way.

The stress mix's LIST cost 2.3 SELECTs and its STATUS 1.1 (bench/README.md, perf15): the
reader's general parse, then for LIST a task (input paused, a coroutine, two looks at the moves'
view, a wait for quiet backends) around the merge. A read that is exactly one such line
(fastpath.relay_plain's conditions: nothing half read, nothing blocking, below the cap) is
carried out here instead, the same way:

* ``LSUB``/``LIST reference pattern`` (two quoted strings or atoms, printable ASCII, a
  non-empty pattern) for a user the map sends wholly to the session's home backend
  (MailboxMap.backends_for: every placement, rule and the default name it, so it owns every
  name, the private ones aside) with no mailbox move holding a name of theirs (the moves' view
  is then nothing), no command in flight and no backend busy (as listing's gather waits for):
  input paused, ``LIST "" "*"`` (``LSUB``) on the home connection captured, and answered by
  listing.answer_merged, the long way's own code (private names hidden, placeholders, child
  flags, the client's reference and pattern matched as Dovecot matches them, INBOX first).
* ``STATUS mailbox (items)`` (a printable ASCII name; plain atoms): the long way's checks
  (mailboxes.py: a private name refused, a name a move holds, a referral) leave it to the long
  way; otherwise relayed to its owner as the long way writes it (the name as a canonical astring).

Anything else (RLIST/RLSUB, LIST-EXTENDED, a literal, 8-bit, several backends, a move on) takes
the long way. tests/test_list_fast.py runs the same commands both ways on real Dovecot.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import UntaggedResponse
from .commands import CONDSTORE_WORDS
from .fastpath import NAMED, relay_line
from .flow import Block
from .imap.grammar import encode_astring
from .imap.mutf7 import shifts_a_line_break, spare_bits_set
from .imap.response import ResponseStart, completion_text
from .listing import answer_merged
from .staging import is_private_name
from .stall import Watch

__all__ = ["list_line", "status_line"]

log = Logger()

# A quoted string of printable ASCII (its only escapes \" and \\), or an atom of a few safe characters
# (LIST's wildcards too): what the reader parses to the same value (imap.command); else the long way.
_QUOTED = rb'"(?:[ !#-\[\]-~]|\\["\\])*+"'
_LIST_ARGS = re.compile(rb"(%s|[A-Za-z0-9%%*&+\-./_]++) (%s|[A-Za-z0-9%%*&+\-./_]++)" % (_QUOTED, _QUOTED))
_STATUS_ARGS = re.compile(rb"(%s|[A-Za-z0-9&+\-./_]++) (\([A-Za-z0-9=.\-]++(?: [A-Za-z0-9=.\-]++)*+\))" % _QUOTED)
_ESCAPE = re.compile(rb"\\(.)")
_TASK = Block.TASK


def _value(token: bytes) -> bytes:
    """An astring's value: an atom as it is, a quoted string unescaped."""
    if token[:1] != b'"':
        return token
    inner = token[1:-1]
    return _ESCAPE.sub(rb"\1", inner) if b"\\" in inner else inner


def list_line(session: Any, tag: bytes, name: str, rest: bytes) -> bool:
    """Carry out a plain ``LIST``/``LSUB`` line as listing's merge would (False: the long way)."""
    m = _LIST_ARGS.fullmatch(rest)
    if m is None:
        return False
    pattern = _value(m.group(2))
    pool, home, user = session.pool, session.home, session.user
    if (not pattern or spare_bits_set(rest) or pool.busy or session.relay.in_flight or session.appends.unanswered
            or session.mailbox_map.mailbox_moves(user) or session.mailbox_map.backends_for(user) != [home]):
        return False
    conn = pool.ready(home)
    if conn is None or conn.capture is not None or conn.tap is not None:
        return False
    reference = _value(m.group(1))
    if pool.reusable and CONDSTORE_WORDS.search(rest):  # as keepalive.taints
        pool.reusable = False
    session.ctx.observer.command_named(session, tag, name)
    session.block(_TASK)
    captured: list[UntaggedResponse] = []
    conn.capture = captured

    def done(start: ResponseStart, _raw: bytes) -> None:
        conn.capture = None
        if start.status == "OK":
            answer_merged(session, tag, name, reference, pattern, [(conn, r) for r in captured],
                          lambda _name: home, None)
        else:  # the backend's own answer, as listing's gather refuses
            session.answer(tag, completion_text(start))
        session.unblock(_TASK)

    def lost(reason: Failure) -> None:
        conn.capture = None
        log.warn("session {id}: {why}", id=session.id, why=f"backend {conn.name} closed the connection")
        session.tagged(tag, "NO", "[UNAVAILABLE] Mail server temporarily unavailable")
        session.unblock(_TASK)

    ptag = conn.next_tag()
    conn.expect(ptag, done, lost)
    conn.write(ptag + b" " + name.encode("ascii") + b' "" "*"\r\n')
    return True


def status_line(session: Any, tag: bytes, name: str, rest: bytes) -> bool:
    """Relay a plain ``STATUS`` line as mailboxes.by_mailbox would (False: the long way)."""
    m = _STATUS_ARGS.fullmatch(rest)
    most = session.config.proxy.connections.max_commands_in_flight
    if m is None or session.relay.in_flight + len(session.appends.unanswered) >= most:
        return False
    mailbox = _value(m.group(1))
    mailboxes = session.mailboxes
    if (is_private_name(mailbox) or mailboxes.moving(mailbox) or shifts_a_line_break(mailbox)
            or spare_bits_set(mailbox)):  # NO or BAD: the long way
        return False
    route = mailboxes.route_of(mailbox)
    if mailboxes.refers(route, mailbox):
        return False
    conn = session.pool.fast(route.primary)
    encoded = encode_astring(mailbox)
    if conn is None or encoded is None:
        return False
    relay_line(session, conn, tag, name, rest, b" STATUS " + encoded + b" " + m.group(2) + b"\r\n", most)
    if route.primary != session.home and len(conn._pending) == 1:
        # A read on another backend: bounded, so one stalled server does not cost the whole session.
        Watch.bounding(conn, b"STATUS", next(iter(conn._pending)))
    return True


NAMED.update({"LIST": list_line, "LSUB": list_line, "STATUS": status_line})
