"""Recovery of a cross-server MOVE of messages (op ``move-messages``) a crash left unfinished.

transfer.py journals the MOVE (MOVE_APPENDING, MOVE_APPENDED, MOVE_EXPUNGING); here
``recover`` finishes it: the copies are found (recorded, or by content), verified, and
exactly the source UIDs whose copy is verified are expunged. A copy another client moved
away before recovery is looked for by content: back in the source (``came_back``), or in
another mailbox (``moved_on``); what is found vouches for its source, which then goes.
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
    guids,
    internal_time,
    list_mailboxes,
    named_by_validity,
    open_mailbox,
    same_mailbox,
    saved_since,
    search_uids,
    still_there,
)
from .routing import MailboxMap
from .transfer import find_copies, hash_messages, hashes_present

Connect = Callable[[str], Awaitable[BackendProtocol]]
log = Logger()

#: Seconds before a move's beginning a copy saved elsewhere still counts as moved on by a client:
#: SAVEDATE is to the second, and the backend's clock is not the proxy's.
SAVEDATE_SLACK = 2.0

__all__ = ["finish_message_move", "came_back", "moved_on", "unvouched"]


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
        if not found:
            moved = await _committed_then_moved_on(entry, mailbox_map, src, dst, connect, sent, src_uids)
            if not moved:
                await mailbox_map.end_move(entry)
                return "the destination never committed: nothing moved"
            data["present"], data["vanished_dst"] = uid_set(moved).decode(), ""
            await mailbox_map.step(entry, Step.MOVE_EXPUNGING)
            await expunge_uids(src, moved)
            await mailbox_map.end_move(entry)
            return f"finished: {len(moved)} message(s) removed from the source (their copies were moved on)"
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
    # Decided, and journaled before acting: a recovery cut off after the expunge must not find the
    # sources gone and take their copies back as if someone else had moved them (both gone).
    data["present"] = uid_set(present).decode()
    there = set(present)  # sets: thousands of UIDs
    data["vanished_dst"] = uid_set(d for s, d in verified if s not in there).decode()
    await mailbox_map.step(entry, Step.MOVE_EXPUNGING)
    await expunge_uids(src, present)
    await _take_back(dst, data, expand_uid_set(data["vanished_dst"]))  # their source went elsewhere
    await mailbox_map.end_move(entry)
    left = f"; {len(unfound) - len(rest)} left where clients put them and their copies" if len(unfound) > len(rest) else ""
    return f"finished: {len(present)} message(s) removed from the source{left}"


async def _committed_then_moved_on(entry: JournalEntry, mailbox_map: MailboxMap, src: BackendProtocol,
                                   dst: BackendProtocol, connect: Connect | None, sent: dict[int, str],
                                   src_uids: Sequence[int]) -> list[int]:
    """The MULTIAPPEND's outcome unknown and none of its copies above the recorded UIDNEXT: it never
    committed, or it did and a client moved every copy on before recovery came (soak, seed 41049:
    taken for "never committed", the source kept: the messages twice). It can have committed only if
    the destination has, from that UIDNEXT, as many consecutive UIDs as it sent that no message holds
    now (it saves all or nothing, on consecutive UIDs). Then a source message goes if its content was
    saved somewhere the user sees since the move began (SAVEDATE, RFC 8514; a copy made before, a
    client's own, vouches for nothing), and is not a copy of the source message itself made on its
    backend (soak seed 43154: a client's COPY of it within the source, 0.9 s after the MOVE's NO, was
    taken for the move's copy moved back and the source expunged: once where the client had made it
    twice). Dovecot's COPY and MOVE keep a message's X-GUID, the move's APPEND gives a new one; and
    only a message of the source's INTERNALDATE counts (the move's copy has it; the same body
    APPENDed or delivered anywhere since has its own: helper attack18, the source expunged).
    Returns the source UIDs to expunge; the source selected again."""
    data = entry.data
    if not await _room_for_copies(dst, data, len(src_uids)):
        return []
    still = await still_there(src, src_uids)
    since = entry.created - SAVEDATE_SLACK
    itself = set((await guids(src, still)).values())  # a client's copy of a source message on its backend
    back = await came_back(src, still, sent, max(src_uids), saved_after=since, not_guids=itself)  # moved back
    mine, _ = await fetch_infos(src, [s for s in still if s not in set(back)])
    moved = await _moved_on_anywhere(mailbox_map, entry.user, src, data["src_mailbox"], dst, data["dst_mailbox"],
                                     connect, mine, sent, collections.Counter(), saved_after=since, not_guids=itself)
    await _reselect_source(src, data)
    return sorted(back + moved)


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


async def _room_for_copies(dst: BackendProtocol, data: dict, n: int) -> bool:
    """Whether *n* consecutive UIDs from the recorded UIDNEXT up to the destination's UIDNEXT now are
    free (saved and expunged since, or never given): room for a committed MULTIAPPEND's copies."""
    if not n or not await exists(dst, data["dst_mailbox"]):
        return False
    state = await open_mailbox(dst, data["dst_mailbox"], readonly=True)
    try:
        if state.uidvalidity != data["dst_validity"]:
            return False
        held, _ = await search_uids(dst, b"UID %d:*" % data["dst_uidnext"])
        taken, run = set(held), 0
        for uid in range(data["dst_uidnext"], state.uidnext):
            run = 0 if uid in taken else run + 1
            if run >= n:
                return True
        return False
    finally:
        await dst.deselect()


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
                             kept: collections.Counter[str], saved_after: float | None = None,
                             not_guids: set[bytes] | None = None) -> list[int]:
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
        return await moved_on([dst, src, *conns], src, src_mailbox, mine, sent, seen, routed, saved_after, not_guids)
    finally:
        for conn in conns:
            conn.logout()


async def came_back(src: BackendProtocol, uids: Sequence[int], sent: dict[int, str], top: int,
                    saved_after: float | None = None, not_guids: set[bytes] | None = None) -> list[int]:
    """Of source *uids* whose copy left the destination before recovery, those whose same content
    (sha256) is in the source mailbox again as a newer message (a client moved the copy back):
    the message is there once without them. Each newer message vouches for one source UID.
    *saved_after*: only newer messages saved since then count (mailops.saved_since), and only of the
    source message's INTERNALDATE too (the move's copy keeps it; a duplicate delivered or APPENDed
    since has its own: helper attack18); *not_guids*: none with one of those X-GUIDs counts
    (mailops.guids: a copy of a source message itself)."""
    still = await still_there(src, uids)
    newer, _ = await search_uids(src, b"UID %d:*" % (top + 1))
    newer = [u for u in newer if u > top]  # n:* names the last message even when n is beyond it
    if saved_after is not None:
        newer = await saved_since(src, newer, saved_after)
    newer = await _other_than(src, newer, not_guids)
    if not still or not newer:
        return []
    mine, _ = await fetch_infos(src, still)
    sizes, dated = {i.size for i in mine}, saved_after is not None
    others, _ = await fetch_infos(src, newer)
    by_uid = {i.uid: i for i in others}
    hashes = await hashes_present(src, [i.uid for i in others if i.size in sizes])
    found = collections.Counter(_key(h, by_uid[u], dated) for u, h in hashes.items())
    return _vouched(mine, sent, found, dated)


async def moved_on(conns: Sequence[BackendProtocol], src: BackendProtocol, src_mailbox: str,
                   mine: Sequence[MessageInfo], sent: dict[int, str], kept: collections.Counter[str],
                   routed: Callable[[str, str], bool] = lambda _backend, _name: True,
                   saved_after: float | None = None, not_guids: set[bytes] | None = None) -> list[int]:
    """Of source messages (*mine*) whose committed copy left the destination before recovery, those
    whose content (size, then sha256) is in some other mailbox of *conns*' backends (the source's,
    the destination's, and every other backend the user's mailboxes may live on), one that
    *routed(backend, name)* says the map sends there (a copy out of every client's sight vouches
    for nothing): a client moved the copy on, so the source's message goes (else it is there twice).
    A copy found nowhere was expunged (or lost): its source stays. Each match vouches for one;
    *kept*: the hashes of the copies still at the destination (found there, they vouch for none).
    *saved_after*: only messages saved to their mailbox since then count (mailops.saved_since), of
    the source message's INTERNALDATE too (see came_back);
    *not_guids*: on the source's backend, none with one of those X-GUIDs counts (a copy of a source
    message itself: Dovecot's COPY and MOVE keep it; X-GUIDs of other backends are theirs)."""
    sizes, dated = {i.size for i in mine}, saved_after is not None
    if not sizes:
        return []
    found: collections.Counter[Any] = collections.Counter()
    for conn in conns:
        for entry in await list_mailboxes(conn):
            name = entry.name.decode("utf-8", "surrogateescape")
            if (not entry.selectable or name.startswith("referral-proxy-") or not routed(conn.name, name)
                    or (conn is src and _same_name(name, src_mailbox))):
                continue
            if (await open_mailbox(conn, name, readonly=True)).messages:
                uids, _ = await search_uids(conn, b"LARGER %d SMALLER %d" % (min(sizes) - 1, max(sizes) + 1))
                if saved_after is not None:
                    uids = await saved_since(conn, uids, saved_after)
                if conn is src:
                    uids = await _other_than(conn, uids, not_guids)
                infos, _ = await fetch_infos(conn, uids)
                by_uid = {i.uid: i for i in infos}
                hashes = await hashes_present(conn, [i.uid for i in infos if i.size in sizes])
                found.update(_key(h, by_uid[u], dated) for u, h in hashes.items())
            await conn.deselect()
    found.subtract(kept)
    return _vouched(mine, sent, found, dated)


async def _other_than(conn: BackendProtocol, uids: list[int], not_guids: set[bytes] | None) -> list[int]:
    """Those of *uids* (selected on *conn*) whose X-GUID is none of *not_guids* (None: all of them)."""
    if not not_guids or not uids:
        return uids
    have = await guids(conn, uids)
    return [u for u in uids if have.get(u) not in not_guids]


def _key(sha: str, info: MessageInfo, dated: bool) -> Any:
    """What a found message is matched on: its sha256, and if *dated* its INTERNALDATE too."""
    return (sha, internal_time(info)) if dated else sha


def _vouched(mine: Sequence[MessageInfo], sent: dict[int, str], found: collections.Counter[Any],
             dated: bool = False) -> list[int]:
    """The UIDs of *mine* whose content (*sent*: uid -> sha256; *dated*: and INTERNALDATE) *found*
    holds, each found copy vouching for one."""
    out = []
    for info in mine:
        key = _key(sent[info.uid], info, dated)
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
