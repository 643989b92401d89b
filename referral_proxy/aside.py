"""Mailboxes a move sets aside: deleted only once seen empty, read whole again first, or put back.

Dovecot trusts its index while a maildir's new/ and cur/ keep the mtimes it recorded (hidden_messages);
a DELETE a killed Dovecot left half done is finished (finish_cut_delete).
"""

from __future__ import annotations

import hashlib

from twisted.logger import Logger

from .backend import BackendProtocol
from .imap.command import ParseError
from .imap.data import parse_uid_code
from .mailops import (
    NotReadAgain,
    TransferError,
    _failed,
    _gone,
    _text,
    exists,
    expunge_uids,
    list_mailboxes,
    missing,
    name_arg,
    open_mailbox,
    run_ok,
    search_uids,
)

__all__ = ["delete_if_empty", "finish_cut_delete", "aside_gone", "put_back", "hidden_messages", "drop_marks"]

log = Logger()


async def delete_if_empty(conn: BackendProtocol, name: str, aside: str, separator: str) -> bool:
    """Delete *name* only if it holds no message and no child; True if it is gone.

    Dovecot's DELETE expunges whatever the mailbox holds, also mail delivered a moment
    after we looked. So the mailbox is first renamed to *aside*, a name nobody delivers
    to (a delivery racing the RENAME either lands before it, and is seen below, or
    fails); only that is checked and deleted. Not empty: renamed back, and False.
    *aside* is the same name at every attempt: one cut off between its RENAMEs (a kill, a
    backend gone) left it, and it is settled first, or its mail would stay out of sight.
    Dovecot's RENAME carries the children along (*name*/c to *aside*/c): they are put back at
    once, and first at the next attempt if one was cut off in between (seen in the soak: a
    roll-back's aside took the client's own ``Work/c`` and its 59 messages out of sight)."""
    await put_back(conn, aside, name, separator)
    if await exists(conn, aside):
        if not await _gone_if_empty(conn, aside, separator):
            await run_ok(conn, b"RENAME " + name_arg(aside) + b" " + name_arg(name), "RENAME")
            return False
    renamed = await conn.command(b"RENAME " + name_arg(name) + b" " + name_arg(aside))
    if not renamed.ok:
        if not await exists(conn, name):
            return True  # nothing there (any more)
        raise TransferError(_failed("RENAME", conn, renamed.start))
    await put_back(conn, aside, name, separator)
    if await _gone_if_empty(conn, aside, separator):
        return True
    await run_ok(conn, b"RENAME " + name_arg(aside) + b" " + name_arg(name), "RENAME")
    return False


async def finish_cut_delete(conn: BackendProtocol, aside: str) -> bool:
    """DELETE again a private *aside* whose DELETE a killed Dovecot cut off; True if it was one.

    Dovecot marks the mailbox's index deleted, then removes its files: killed in between, it
    lists the mailbox but opens it no more ("Mailbox was deleted under us"), forever. Only the
    mover deletes an aside, and only once it saw it empty: finishing that DELETE is safe. A
    Dovecot that refuses that DELETE too (seen: "Mailbox exists", until it was restarted) holds
    nothing there for anyone: the aside is left, said in the log, rather than the move kept
    from ending (its reservations would keep the user's names in use)."""
    answer = await conn.command(b"STATUS " + name_arg(aside) + b" (MESSAGES)")
    if answer.ok or b"deleted under us" not in answer.start.text:
        return False
    deleted = await conn.command(b"DELETE " + name_arg(aside))
    if not deleted.ok:
        log.warn("{b}: {aside} was half deleted by a killed Dovecot and cannot be deleted now ({why}); "
                 "it holds no mail and is left as it is", b=conn.name, aside=aside, why=_failed("DELETE", conn, deleted.start))
    return True


async def _gone_if_empty(conn: BackendProtocol, aside: str, separator: str) -> bool:
    """DELETE the private *aside* if it holds no message and no child; True if deleted."""
    if await finish_cut_delete(conn, aside):
        return True
    try:
        state = await open_mailbox(conn, aside, readonly=True)
    except TransferError:
        if await missing(conn, aside):
            return True
        raise
    await conn.deselect()
    children = await list_mailboxes(conn, name_arg(aside + separator + "*"))  # aside: our name, no wildcard
    if children or (state.messages and state.messages > await drop_marks(conn, aside)):
        return False
    try:
        if await hidden_messages(conn, aside):
            return False
    except NotReadAgain as e:
        log.warn("{b}: {aside} is not deleted, nor put back: {why}", b=conn.name, aside=aside, why=str(e))
        return False
    await run_ok(conn, b"DELETE " + name_arg(aside), "DELETE")
    return True


async def aside_gone(conn: BackendProtocol, aside: str, name: str, separator: str) -> bool:
    """A source renamed from *name* to the private *aside* (mover._drain): the children that RENAME
    carried along put back first (put_back: before, a child made on the backend during the move was
    left under the aside, out of every client's sight); True if *aside* is not there (any more), or
    was half deleted by a killed Dovecot (finish_cut_delete): nothing left to empty."""
    await put_back(conn, aside, name, separator)
    return not await exists(conn, aside) or await finish_cut_delete(conn, aside) or await missing(conn, aside)


async def put_back(conn: BackendProtocol, aside: str, name: str, separator: str) -> list[str]:
    """Rename each mailbox under the private *aside* back under *name* (``aside/c`` to ``name/c``),
    where a RENAME of *name* to *aside* took it: Dovecot's RENAME carries the children along. The
    names put back, shallowest first (a RENAME carries its own children: those are not renamed
    again). A placeholder (\\Noselect) is not there to rename: what is under it is listed itself."""
    entries = await list_mailboxes(conn, name_arg(aside + separator + "*"))  # aside: our name, no wildcard
    moved: list[str] = []
    for child in sorted({_text(e.name) for e in entries}, key=lambda n: (n.count(separator), n)):
        if any(child.startswith(m + separator) for m in moved):
            continue
        back = name + child[len(aside):]
        renamed = await conn.command(b"RENAME " + name_arg(child) + b" " + name_arg(back))
        if renamed.ok:
            log.info("{b}: {back} was carried under the private {aside} by a RENAME (to {child}); put back",
                     b=conn.name, back=back, aside=aside, child=child)
            moved.append(child)
        elif not _gone(renamed.start):
            raise TransferError(_failed("RENAME", conn, renamed.start) + f" (putting {back} back from {child})")
    return moved


def _mark(box: str) -> bytes:
    """What hidden_messages() saves into *box*, twice, and expunges at once; its header names *box*
    (a digest), so that drop_marks() finds exactly these, and no mail of the user's."""
    return b"X-Referral-Proxy-Rescan: %s\r\nSubject: a private mailbox read again before it is deleted\r\n\r\n.\r\n" % (
        _mark_token(box))


def _mark_token(box: str) -> bytes:
    return hashlib.sha256(box.encode("utf-8", "surrogateescape")).hexdigest()[:32].encode()


async def hidden_messages(conn: BackendProtocol, box: str) -> int:
    """Make Dovecot read the private *box*'s maildir whole, before a DELETE trusts it empty; how
    many messages it holds then (they were out of sight until now).

    Dovecot trusts its index while new/ and cur/ keep the mtimes it recorded: message files that
    no uidlist record names (a process rewrote the uidlist while another session's RENAME moved
    the directory: soak C 72556, 68001) stay invisible, and a DELETE removes them with the mailbox.
    A message saved into each directory (no flags: new/; flagged: cur/) changes both mtimes, and
    the next SELECT (a full read) reads both again; the two marks are expunged at once (ones a
    crash left in between: drop_marks)."""
    mark = _mark(box)
    if "MULTIAPPEND" in conn.capabilities:
        sent = [(b" {%d}" % len(mark), [mark + b" (\\Seen \\Deleted) {%d}\r\n" % len(mark), mark + b"\r\n"])]
    else:
        sent = [(b" {%d}" % len(mark), [mark + b"\r\n"]), (b" (\\Seen \\Deleted) {%d}" % len(mark), [mark + b"\r\n"])]
    marks: list[int] = []
    validity = set()
    for first, then in sent:
        saved = await conn.command(b"APPEND " + name_arg(box) + first, then=then)
        if not saved.ok:
            raise NotReadAgain(_failed("APPEND", conn, saved.start))
        try:
            code = parse_uid_code(saved.start.code, saved.start.code_args)
        except ParseError:
            raise TransferError(f"APPEND on {conn.name} gave no APPENDUID") from None
        marks += code.uids
        validity.add(code.uidvalidity)
    try:
        if {(await open_mailbox(conn, box, readonly=False)).uidvalidity} != validity:
            raise TransferError(f"{box} on {conn.name} was replaced while it was read again")
        await expunge_uids(conn, marks)
        present, _ = await search_uids(conn, b"ALL")
    finally:
        await conn.deselect()  # never CLOSE: it would expunge \Deleted mail
    return len(present)


async def drop_marks(conn: BackendProtocol, box: str) -> int:
    """Expunge what a crash left of hidden_messages()'s marks in the private *box* (else copied to
    the user's mailbox as mail); how many."""
    await open_mailbox(conn, box, readonly=False)
    try:
        marks, _ = await search_uids(conn, b"HEADER X-Referral-Proxy-Rescan " + _mark_token(box))
        await expunge_uids(conn, marks)
    finally:
        await conn.deselect()
    return len(marks)
