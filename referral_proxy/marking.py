"""A MOVE across flags its sources \\Deleted before it expunges them: which are still there, with what flags.

Another session may change a source meanwhile (a STORE, a FETCH's \\Seen), clear the flag again, or expunge
it (its own \\Deleted, or the one this mark set); transfer.py carries the changes to the copies, takes back
the copy of a message someone else removed, and moves the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .backend import BackendProtocol
from .imap.command import ParseError
from .imap.data import parse_fetch
from .imap.uidset import uid_set
from .mailops import run_ok

__all__ = ["MARK_TRIES", "fetched_flags", "flag_key", "mark_deleted"]

MARK_TRIES = 3  # a MOVE across flags its sources \Deleted (and expunges them) at most this often, another session
#                 clearing the flag meanwhile (a client's flag resync): those still there are not moved, NO [INUSE]


async def mark_deleted(src: BackendProtocol, uids: Sequence[int]
                       ) -> tuple[dict[int, frozenset[bytes] | None], list[bytes], list[int]]:
    """``UID STORE uids +FLAGS (\\Deleted)``, not silent: the UIDs that are moved (still there, each with its
    flags as before this mark, None: not said), the other untagged responses, raw, and the UIDs still without the flag.
    Dovecot's answer names each message whose flags changed, so not one that was \\Deleted already: those
    are asked for again. One another session cleared the flag of meanwhile is flagged again, MARK_TRIES in all.

    Which were there, and their flags, is asked right before the STORE: one there then and gone after it was
    taken by another session's EXPUNGE, of the \\Deleted this STORE set: it is moved (its copy kept; probe F: 3 of
    40 lost when it was taken back). One gone before was moved or expunged by someone else: its copy goes back.
    One without \\Deleted then has its flags carried without the mark (a client's un-delete reaches the copy);
    the STORE's answer cannot tell: it names too what other sessions changed (probe w4 of stop 52)."""
    there: dict[int, frozenset[bytes] | None] = {}
    others = await _flags_now(src, uids, there)
    unflagged = {u for u, f in there.items() if f is not None and not _deleted(f)}  # the mark to come is the MOVE's
    present: dict[int, frozenset[bytes] | None] = {}
    todo = sorted(there)
    for _ in range(MARK_TRIES):
        if not todo:
            break
        result = await run_ok(src, b"UID STORE " + uid_set(todo) + b" +FLAGS (\\Deleted)", "STORE")
        now: dict[int, frozenset[bytes] | None] = {}
        heard = fetched_flags(result.responses, set(todo), now)
        if quiet := [u for u in todo if u not in now]:
            heard += await _flags_now(src, quiet, now)
        if _expunges(heard):  # which are still there, once told
            still: dict[int, frozenset[bytes] | None] = {}
            heard += await _flags_now(src, todo, still)
            now = {u: now.get(u) for u in still}
        others += heard
        # gone since the first look: taken by an EXPUNGE, moved; unless \\Deleted then (by another session): not ours
        present.update({u: without_mark(now.get(u)) if u in unflagged else now.get(u) for u in todo
                        if u in now or u in unflagged})
        todo = [u for u, f in now.items() if f is not None and not _deleted(f)]
        unflagged.update(todo)  # a client cleared the mark meanwhile: the next is the MOVE's again
    unmarked = set(todo)
    return {u: f for u, f in present.items() if u not in unmarked}, others, todo


async def _flags_now(src: BackendProtocol, uids: Sequence[int], into: dict[int, frozenset[bytes] | None]) -> list[bytes]:
    """Into *into*: those of *uids* still there, with their flags; the other responses, raw. Dovecot answers a
    FETCH of a message another session expunged, then says EXPUNGE: asked again then, now told (probe b2 of
    stop 54: such messages were taken for moved, their copies kept: 30 of 30 expunged ones came back)."""
    got: dict[int, frozenset[bytes] | None] = {}
    others = fetched_flags((await src.command(b"UID FETCH " + uid_set(uids) + b" (UID FLAGS)")).responses, set(uids), got)
    if _expunges(others):
        got = {}
        others += fetched_flags((await src.command(b"UID FETCH " + uid_set(uids) + b" (UID FLAGS)")).responses, set(uids), got)
    into.update(got)
    return others


def _expunges(raws: Sequence[bytes]) -> bool:
    """Whether another session's expunge was told (EXPUNGE; VANISHED once QRESYNC is enabled, RFC 7162)."""
    return any(raw.startswith(b"* ") and (raw.endswith(b" EXPUNGE\r\n") or raw.startswith(b"* VANISHED ")) for raw in raws)


def _deleted(flags: frozenset[bytes]) -> bool:
    return b"\\DELETED" in {flag_key(x) for x in flags}


def without_mark(flags: frozenset[bytes] | None) -> frozenset[bytes] | None:
    """Flags as the MOVE's STORE left them, without the \\Deleted it added (a client's un-delete is carried)."""
    return None if flags is None else frozenset(f for f in flags if flag_key(f) != b"\\DELETED")


def fetched_flags(responses: Sequence[Any], wanted: set[int], present: dict[int, frozenset[bytes] | None]) -> list[bytes]:
    """Into *present*: the *wanted* UIDs FETCH responses name, with their flags; the other responses, raw."""
    others = []
    for r in responses:
        data = None
        if r.start.name == "FETCH":
            try:
                data = parse_fetch(*r.arguments)
            except ParseError:
                data = None
        if data is not None and data.uid in wanted:
            present[data.uid] = None if data.flags is None else frozenset(data.flags)
        else:
            others.append(r.raw)
    return others


def flag_key(flag: bytes) -> bytes:
    """A flag as compared: system flags in any case, keywords as written."""
    return flag.upper() if flag.startswith(b"\\") else flag
