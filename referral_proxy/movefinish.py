"""Recovery of a cross-server MOVE of messages (op ``move-messages``) a crash left unfinished.

transfer.py journals the MOVE (MOVE_APPENDING, MOVE_APPENDED, MOVE_EXPUNGING); here
``recover`` finishes it: the copies are found (recorded, or by content), verified, and
exactly the source UIDs whose copy is verified are expunged. A copy another client moved
away before recovery is looked for by content: back in the source (``came_back``), or in
another mailbox (``moved_on``); what is found vouches for its source, which then goes -- only
when the move is known to have committed (its APPENDUID recorded, or some of its copies found
where it saved them): with the outcome unknown and no copy found, nothing ties a message found
elsewhere to the move (``_never_committed_or_moved_on``), and the source stays.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from .backend import BackendProtocol
from .imap.uidset import expand_uid_set, uid_set
from .journal import JournalEntry, Step
from .mailops import (
    MessageInfo,
    NoMasterUser,
    TransferError,
    exists,
    expunge_uids,
    fetch_infos,
    list_mailboxes,
    named_by_validity,
    open_mailbox,
    same_mailbox,
    search_uids,
    still_there,
)
from .routing import MailboxMap
from .transfer import carry_flags, find_copies, flag_changes, flags_of, flags_text, hash_messages, hashes_present

Connect = Callable[[str], Awaitable[BackendProtocol]]
log = Logger()

__all__ = ["finish_message_move", "undo_copy", "came_back", "moved_on", "unvouched"]


async def undo_copy(entry: JournalEntry, mailbox_map: MailboxMap, dst: BackendProtocol, clock: Any = None) -> str:
    """Recovery of a COPY across told NO while its MULTIAPPEND may have committed (transfer._told_no): its
    copies, found by content above the UIDNEXT it recorded, are taken back, as NO says; the entry ends."""
    data = entry.data
    found = await find_copies(dst, data["dst_mailbox"], data["dst_validity"], data["dst_uidnext"], data["hashes"],
                              clock=clock)
    if found:
        await open_mailbox(dst, data["dst_mailbox"], readonly=False)
        await expunge_uids(dst, sorted(found.values()))
    await mailbox_map.end_move(entry)
    return f"undone, as the client was told: {len(found)} copies taken back"


async def finish_message_move(entry: JournalEntry, mailbox_map: MailboxMap, src: BackendProtocol,
                              dst: BackendProtocol, clock: Any = None, connect: Connect | None = None) -> str:
    """Recovery of a cross-server MOVE. If the destination committed (recorded, or found by content)
    the copies are verified and exactly the recorded source UIDs whose copy is verified are expunged;
    a copy whose source someone else moved or expunged meanwhile is taken back. Else nothing moved.
    *connect(backend)*: a new connection to another backend of the user's, to look for copies a
    client moved on there before recovery (see moved_on); without it only *src* and *dst* are searched."""
    data = entry.data
    for conn, role in ((src, "src"), (dst, "dst")):
        await _follow_rename(mailbox_map, entry.user, conn, data, role)
    if not await exists(src, data["src_mailbox"]):
        await mailbox_map.end_move(entry)
        return "source mailbox gone: nothing to remove"
    if not await same_mailbox(src, data["src_mailbox"], data["src_validity"]):
        await mailbox_map.end_move(entry)
        return "source mailbox replaced (UIDVALIDITY): nothing removed"
    if entry.step is Step.MOVE_EXPUNGING:  # which source UIDs go and which copies come back was decided
        present, _ = await search_uids(src, b"UID " + data["present"].encode()) if data["present"] else ([], [])
        if "dst_uids" in data:  # (probe u2 of stop 51: changed on the sources since the MOVE marked them, lost)
            copy_of = dict(zip(expand_uid_set(data["src_uids"]), expand_uid_set(data["dst_uids"])))
            await _late_flags(src, dst, data, [(u, copy_of[u]) for u in present if u in copy_of])
            await mailbox_map.record(entry)
        await expunge_uids(src, present)
        await _take_back(dst, data, expand_uid_set(data["vanished_dst"]))
        await mailbox_map.end_move(entry)
        return f"finished: {len(present)} message(s) removed from the source"
    src_uids = expand_uid_set(data["src_uids"])
    if "hashes" not in data:  # the MULTIAPPEND's last byte was never sent: it cannot have committed
        await mailbox_map.end_move(entry)
        return "the destination never committed: nothing moved"
    sent = dict(zip(src_uids, data["hashes"]))
    if "dst_uids" in data:
        pairs = list(zip(src_uids, expand_uid_set(data["dst_uids"])))
    else:  # the journal does not know whether the MULTIAPPEND committed: look for the copies by content
        found = await find_copies(dst, data["dst_mailbox"], data["dst_validity"], data["dst_uidnext"],
                                  data["hashes"], clock=clock) or await _made_anew(dst, data)
        if not found:  # nothing ties a message found elsewhere to the move: the source stays
            await mailbox_map.end_move(entry)
            return _never_committed_or_moved_on(entry)
        found = await _whole_run(dst, data, found)
        pairs = [(src_uids[i], uid) for i, uid in sorted(found.items())]
    if not await exists(dst, data["dst_mailbox"]):
        await mailbox_map.end_move(entry)
        return "destination mailbox gone: the source is left as it is"
    dst_state = await open_mailbox(dst, data["dst_mailbox"], readonly=True)
    same_dst = dst_state.uidvalidity == data["dst_validity"]
    copies = await hashes_present(dst, [d for _s, d in pairs]) if same_dst else {}
    verified = [(s, d) for s, d in pairs if copies.get(d) == sent[s]]
    gone = [s for s, d in pairs if d not in copies] if same_dst else []
    if data.get("told") == "NO" and same_dst and not gone:  # the client heard NO: the source stays, copies go back
        data["present"], data["vanished_dst"] = "", uid_set(d for _s, d in verified).decode()
        await mailbox_map.step(entry, Step.MOVE_EXPUNGING)  # (a copy moved on by a client meanwhile: finished)
        await _take_back(dst, data, [d for _s, d in verified])
        await mailbox_map.end_move(entry)
        return f"undone, as the client was told: {len(verified)} copies taken back, the source kept"
    back = await came_back(src, gone, sent, max(src_uids)) if gone else []
    # A source a client moved or expunged too (seen in the soak, seed 11017: the owner dead, its copy
    # and its source each moved on through another proxy): neither is the move's to remove.
    came = set(back)
    unfound = [s for s in gone if s not in came]
    if rest := await still_there(src, unfound):
        mine, _ = await fetch_infos(src, rest)
        kept = collections.Counter(sent[s] for s, _d in verified)  # still at the destination: found there
        back += await _moved_on_anywhere(mailbox_map, entry.user, src, data["src_mailbox"], dst, data["dst_mailbox"],
                                         connect, mine, sent, kept)
        await _reselect_source(src, data)
    keep = [s for s, _d in verified] + back
    present, _ = await search_uids(src, b"UID " + uid_set(sorted(keep))) if keep else ([], [])
    if "dst_uids" not in data:  # copies found by content: one whose source is gone may be another's message
        verified = await _ours_elsewhere(entry, mailbox_map, src, dst, connect, verified, present, sent)
    there = set(present)  # sets: thousands of UIDs
    await _late_flags(src, dst, data, [(s, d) for s, d in verified if s in there])
    # Decided, and journaled before acting: a recovery cut off after the expunge must not find the
    # sources gone and take their copies back as if someone else had moved them (both gone).
    data["present"] = uid_set(present).decode()
    data["vanished_dst"] = uid_set(d for s, d in verified if s not in there).decode()
    await mailbox_map.step(entry, Step.MOVE_EXPUNGING)
    await expunge_uids(src, present)
    await _take_back(dst, data, expand_uid_set(data["vanished_dst"]))  # their source went elsewhere
    await mailbox_map.end_move(entry)
    left = f"; {len(unfound) - len(rest)} left where clients put them and their copies" if len(unfound) > len(rest) else ""
    return f"finished: {len(present)} message(s) removed from the source{left}"


async def _late_flags(src: BackendProtocol, dst: BackendProtocol, data: dict, pairs: list[tuple[int, int]]) -> None:
    """Flags a client set or cleared on a source after it was copied (journaled as copied), onto its copy, added
    and cleared, never replaced, as the MOVE itself carries them (transfer.carry_flags); recovery dropped them
    (probe t3 of stop 51: keywords, \\Flagged lost, \\Seen back). \\Deleted only cleared: the move may have set
    the source's before it was cut off, a client un-deleting it is carried. *src*: with the source selected.
    *data*'s flags are then the copies' (journaled by the caller): a later recovery carries only what came after."""
    if not pairs or "src_flags" not in data:  # (an entry of an older version)
        return
    uids = expand_uid_set(data["src_uids"])
    was = {u: f.encode("utf-8", "surrogateescape").split() for u, f in zip(uids, data["src_flags"])}
    now = await flags_of(src, [s for s, _d in pairs])
    changes = flag_changes(was, dict(now), dict(pairs))
    await carry_flags(dst, data["dst_mailbox"], data["dst_validity"], changes)
    data["src_flags"] = [flags_text(sorted(now[u])) if u in now else f for u, f in zip(uids, data["src_flags"])]
    if changes:
        log.info("{b}: flags changed on {n} source message(s) after they were copied carried to their copies",
                 b=src.name, n=len(changes))


def _never_committed_or_moved_on(entry: JournalEntry) -> str:
    """The MULTIAPPEND's outcome unknown and none of its copies where it saved them: it never committed,
    or it did and a client moved every copy on before recovery came (soak, seed 41049). The source
    stays either way: at worst each message twice, never once where a client made two.

    79beff0 told them apart by a guess: room at the destination for the copies, and the source's
    content saved elsewhere since the move began (SAVEDATE), with its INTERNALDATE, under another
    X-GUID. Any other instance of that content saved anew in that window passes it too, and the
    source went: one where the user had made two (soak A, seed 49002: the user's own COPY of the
    message RENAMEd across by another session, an APPEND with its INTERNALDATE; so does a MOVE
    across through the proxy, and Dovecot's own MOVE, which gives a new SAVEDATE on 2.3.19; helper
    attack18: a COPY across through the proxy). Nothing the backends keep ties a message to the
    move's run once the copy left it (the move's APPEND gave it an X-GUID recorded nowhere)."""
    return ("the destination never committed, or every copy was moved on before recovery (nothing ties one "
            "found elsewhere to the move): nothing moved")


async def _follow_rename(mailbox_map: MailboxMap, user: str, conn: BackendProtocol, data: dict, role: str) -> None:
    """The move's source or destination (*role*: "src", "dst") renamed by a client before recovery
    (straight on the backend; helper recovery17: "destination mailbox gone: the source is left",
    the messages twice): gone under its name, or another there, the one mailbox with its UIDVALIDITY
    on *conn* that the map sends there is taken for it, its new name recorded in *data*."""
    name, validity = data[f"{role}_mailbox"], data[f"{role}_validity"]
    if await exists(conn, name) and await same_mailbox(conn, name, validity, readonly=True):
        await conn.deselect()
        return
    found = [n for n in await named_by_validity(conn, validity)
             if not n.startswith("referral-proxy-") and mailbox_map.lookup(user, n).primary == conn.name]
    if len(found) == 1:
        log.info("recovery: {box} on {b} was renamed {new}: followed", box=name, b=conn.name, new=found[0])
        data[f"{role}_mailbox"] = found[0]


async def _whole_run(dst: BackendProtocol, data: dict, found: dict[int, int]) -> dict[int, int]:
    """*found* ({index: destination UID}, copies found by content) with the UIDs of the others of the
    MULTIAPPEND: it saved all or nothing, on consecutive UIDs, so a copy not found was at its place
    in the run and left before recovery (a client moved some copies on and not others, helper
    recovery17: the sources of those were never looked at and stayed, the messages twice). The run
    is the one start from the recorded UIDNEXT on where each found copy's body is the one sent at
    its place and every other place is free now (identical bodies: found copies may have been
    matched to the wrong places). No such start, or more than one: as found."""
    hashes, n = data["hashes"], len(data["hashes"])
    if not found or len(found) == n:
        return found
    state = await open_mailbox(dst, data["dst_mailbox"], readonly=True)
    held, _ = await search_uids(dst, b"UID %d:*" % data["dst_uidnext"])
    await dst.deselect()
    runs = [start for start in _run_starts(found, hashes)
            if _run_fits(start, found, hashes, set(held), data["dst_uidnext"], state.uidnext)]
    return {i: runs[0] + i for i in range(n)} if len(runs) == 1 else found


def _run_starts(found: dict[int, int], hashes: Sequence[str]) -> set[int]:
    """Every first UID a run could have for a found copy to be at a place of its body."""
    return {uid - j for i, uid in found.items() for j, h in enumerate(hashes) if h == hashes[i]}


def _run_fits(start: int, found: dict[int, int], hashes: Sequence[str], held: set[int], uidnext: int,
              now_next: int) -> bool:
    """Whether the run from *start* begins at or after the recorded UIDNEXT and ends before the one
    now, holds each found copy at a place of its body, and every other place of it is free."""
    n = len(hashes)
    at = {uid: hashes[i] for i, uid in found.items()}
    return (uidnext <= start and start + n <= now_next
            and all(start <= uid < start + n and hashes[uid - start] == h for uid, h in at.items())
            and all(start + j in at or start + j not in held for j in range(n)))


async def _ours_elsewhere(entry: JournalEntry, mailbox_map: MailboxMap, src: BackendProtocol, dst: BackendProtocol,
                          connect: Connect | None, verified: list[tuple[int, int]], present: Sequence[int],
                          sent: dict[int, str]) -> list[tuple[int, int]]:
    """*verified* without the copies found by content whose source is gone and whose content is
    nowhere else (unvouched: seen in the soak, seed 6043); the source selected read-write again."""
    there = set(present)
    gone = [(s, d) for s, d in verified if s not in there]
    if not gone:
        return verified
    kept = collections.Counter(sent[s] for s, _d in verified)  # at the destination: each vouches for none
    alone = set(await unvouched(mailbox_map, entry.user, src, entry.data["src_mailbox"], dst, entry.data["dst_mailbox"],
                                connect, gone, sent, kept))
    await _reselect_source(src, entry.data)
    return [p for p in verified if p not in alone]


async def unvouched(mailbox_map: MailboxMap, user: str, src: BackendProtocol, src_mailbox: str, dst: BackendProtocol,
                    dst_mailbox: str, connect: Connect | None, gone: Sequence[tuple[int, int]], sent: dict[int, str],
                    kept: collections.Counter[str]) -> list[tuple[int, int]]:
    """Of the copies found by content whose source is gone, (source UID, destination UID) in *gone*,
    those whose content is nowhere else the user sees: never to be taken for the move's own.

    The MULTIAPPEND's outcome unknown, a message of that content above the recorded UIDNEXT is taken
    for its copy; but another client may have put it there itself -- moving the very source message
    to the destination (seen in the soak: a MOVE cut off by a backend kill, then an RFC 3501 move of
    the same message by another client, then recovery took that client's copy back: the message was
    nowhere). Taken back, as a copy whose source went elsewhere, only if another message of that
    content is somewhere the user sees (moved_on); else it is the message itself: it stays (at
    worst twice, if the copy was the move's and the source then went elsewhere unseen). *sent*:
    source UID -> sha256; *kept*: the hashes of the copies at the destination (each vouches for
    none). Leaves nothing selected on *src* nor *dst*."""
    if not gone:
        return []
    await open_mailbox(dst, dst_mailbox, readonly=True)
    infos, _ = await fetch_infos(dst, [d for _s, d in gone])
    await dst.deselect()
    by_uid = {i.uid: i for i in infos}
    theirs = [replace(by_uid[d], uid=s) for s, d in gone if d in by_uid]
    elsewhere = set(await _moved_on_anywhere(mailbox_map, user, src, src_mailbox, dst, dst_mailbox, connect, theirs,
                                             sent, kept))
    alone = [(s, d) for s, d in gone if s not in elsewhere]
    if alone:
        log.warn("recovery: {n} message(s) found by content in {box} on {b} whose source is gone and that are nowhere "
                 "else: kept (maybe another client's own move of them)", n=len(alone), box=dst_mailbox, b=dst.name)
    return alone


async def _reselect_source(src: BackendProtocol, data: dict) -> None:
    """The source selected read-write again (moved_on looked at other mailboxes on its backend)."""
    if not await same_mailbox(src, data["src_mailbox"], data["src_validity"]):
        raise TransferError("the source mailbox was replaced during recovery (UIDVALIDITY changed)")


async def _made_anew(dst: BackendProtocol, data: dict) -> dict[int, int]:
    """The destination deleted and made again after the MOVE's STATUS (another UIDVALIDITY): a
    MULTIAPPEND that committed is there whole, every body in order on consecutive UIDs (it saves
    all or nothing). Found: {index: UID}, and that UIDVALIDITY recorded as the copies'."""
    if not await exists(dst, data["dst_mailbox"]):
        return {}
    state = await open_mailbox(dst, data["dst_mailbox"], readonly=True)
    if state.uidvalidity == data["dst_validity"]:
        return {}
    uids, _ = await search_uids(dst, b"ALL")
    hashes, n = await hash_messages(dst, uids), len(data["hashes"])
    for k in range(len(uids) - n + 1):
        if hashes[k:k + n] == data["hashes"] and uids[k + n - 1] - uids[k] == n - 1:
            data["dst_validity"] = state.uidvalidity
            return {i: uids[k + i] for i in range(n)}
    return {}


async def _moved_on_anywhere(mailbox_map: MailboxMap, user: str, src: BackendProtocol, src_mailbox: str,
                             dst: BackendProtocol, dst_mailbox: str, connect: Connect | None,
                             mine: Sequence[MessageInfo], sent: dict[int, str],
                             kept: collections.Counter[str]) -> list[int]:
    """moved_on over the source's, the destination's and every other backend the user's mailboxes may
    live on (a copy moved on by a cross-server MOVE of its own lands on a third one). *kept*: copies
    in *dst_mailbox*, which count only if the map sends that name to *dst* (else moved_on skips them;
    a mailbox move's destination before its commit point)."""
    others = [b for b in mailbox_map.backends_for(user) if b not in (src.name, dst.name)] if connect else []
    conns: list[BackendProtocol] = []
    try:
        for name in others:
            assert connect is not None
            try:
                conns.append(await connect(name))
            except NoMasterUser as e:  # never reachable: looked at nowhere (a copy there leaves the source)
                log.warn("recovery: a copy moved on to {backend} cannot be looked for ({why})", backend=name, why=str(e))

        def routed(backend: str, mailbox: str) -> bool:
            return mailbox_map.lookup(user, mailbox).primary == backend

        seen = kept if routed(dst.name, dst_mailbox) else collections.Counter()
        return await moved_on([dst, src, *conns], src, src_mailbox, mine, sent, seen, routed)
    finally:
        for conn in conns:
            conn.logout()


async def came_back(src: BackendProtocol, uids: Sequence[int], sent: dict[int, str], top: int) -> list[int]:
    """Of source *uids* whose copy left the destination before recovery, those whose same content
    (sha256) is in the source mailbox again as a newer message (a client moved the copy back):
    the message is there once without them. Each newer message vouches for one source UID."""
    still = await still_there(src, uids)
    newer, _ = await search_uids(src, b"UID %d:*" % (top + 1))
    newer = [u for u in newer if u > top]  # n:* names the last message even when n is beyond it
    if not still or not newer:
        return []
    mine, _ = await fetch_infos(src, still)
    sizes = {i.size for i in mine}
    others, _ = await fetch_infos(src, newer)
    hashes = await hashes_present(src, [i.uid for i in others if i.size in sizes])
    return _vouched(mine, sent, collections.Counter(hashes.values()))


async def moved_on(conns: Sequence[BackendProtocol], src: BackendProtocol, src_mailbox: str,
                   mine: Sequence[MessageInfo], sent: dict[int, str], kept: collections.Counter[str],
                   routed: Callable[[str, str], bool] = lambda _backend, _name: True) -> list[int]:
    """Of source messages (*mine*) whose committed copy left the destination before recovery, those
    whose content (size, then sha256) is in some other mailbox of *conns*' backends (the source's,
    the destination's, and every other backend the user's mailboxes may live on), one that
    *routed(backend, name)* says the map sends there (a copy out of every client's sight vouches
    for nothing): a client moved the copy on, so the source's message goes (else it is there twice).
    A copy found nowhere was expunged (or lost): its source stays. Each match vouches for one;
    *kept*: the hashes of the copies still at the destination (found there, they vouch for none)."""
    sizes = {i.size for i in mine}
    if not sizes:
        return []
    found: collections.Counter[str] = collections.Counter()
    for conn in conns:
        for entry in await list_mailboxes(conn):
            name = entry.name.decode("utf-8", "surrogateescape")
            if (not entry.selectable or name.startswith("referral-proxy-") or not routed(conn.name, name)
                    or (conn is src and _same_name(name, src_mailbox))):
                continue
            if (await open_mailbox(conn, name, readonly=True)).messages:
                uids, _ = await search_uids(conn, b"LARGER %d SMALLER %d" % (min(sizes) - 1, max(sizes) + 1))
                infos, _ = await fetch_infos(conn, uids)
                hashes = await hashes_present(conn, [i.uid for i in infos if i.size in sizes])
                found.update(hashes.values())
            await conn.deselect()
    found.subtract(kept)
    return _vouched(mine, sent, found)


def _vouched(mine: Sequence[MessageInfo], sent: dict[int, str], found: collections.Counter[str]) -> list[int]:
    """The UIDs of *mine* whose content (*sent*: uid -> sha256) *found* holds, each found copy
    vouching for one."""
    out = []
    for info in mine:
        key = sent[info.uid]
        if found[key] > 0:
            found[key] -= 1
            out.append(info.uid)
    return out


def _same_name(a: str, b: str) -> bool:
    return a == b or a.upper() == b.upper() == "INBOX"


async def _take_back(dst: BackendProtocol, data: dict, uids: list[int]) -> None:
    """Expunge copies whose source was moved or expunged by someone else while the MOVE ran."""
    box = data["dst_mailbox"]
    if uids and await exists(dst, box) and await same_mailbox(dst, box, data["dst_validity"]):
        await expunge_uids(dst, uids)
