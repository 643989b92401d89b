"""Past a move's commit point: the source's verified messages removed, the drain's own removals told from a client's.

A client's command already at the source backend when the move's reservation landed (a
UID MOVE within that backend, an EXPUNGE: relayed an instant before, run late by a slow
command, a lock wait, a stopped process) can still take a copied message away, at any
moment until the drain removes it. Its copy kept at the destination, it would be there
twice (moved), or come back (expunged). So (mover.Mover._empty calls remove_verified):

* The drain removes the verified UIDs by ``UID MOVE`` to a private mailbox of its own, the
  *drop* (``referral-proxy-aside-<token>/drop-<n>``, a new one for each use, deleted after it): Dovecot's COPYUID
  names exactly the messages this MOVE took. A STORE \\Deleted + UID EXPUNGE cannot tell: a
  client's MOVE between the two takes a \\Deleted message away, and the EXPUNGE's answer
  is the same either way.
* A copied UID gone from the source that the drain did not take (``settled`` lists those
  it did) was someone else's: its copy is taken back from the destination (moved to a drop
  there), unless a client moved it on there, or changed it (CONDSTORE: its MODSEQ past the
  one recorded when its batch was verified), after the placement switched: then it is left
  and logged, never lost.
* Journaled before acting: ``dropping`` (the UIDs about to be moved to the drop), ``dropped``
  (which were), ``taking-back`` (the copies about to be taken back, decided). Killed after
  the drop's MOVE but before ``dropped``, recovery settles it by content (resume): the drop,
  emptied before each use, holds only that MOVE's messages, and each vouches for one UID
  gone whose copy has its sha256; the others gone were someone else's.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from twisted.logger import Logger

from .aside import finish_cut_delete
from .backend import BackendProtocol
from .imap.uidset import expand_uid_set, uid_set
from .journal import JournalEntry, Step
from .mailops import (
    TransferError,
    create,
    exists,
    expunge_uids,
    list_mailboxes,
    name_arg,
    open_mailbox,
    same_mailbox,
    search_uids,
    still_there,
)
from .routing import MailboxMap
from .transfer import flag_key, flags_of, hash_messages, hashes_present

__all__ = ["remove_verified", "resume", "settled", "take_back_vanished", "copied_of"]

log = Logger()

ATTEMPTS = 5  # a removal refused because a message went meanwhile is tried again this often
MOVE_DEATHS = 2  # the drain's UID MOVE that took nothing this often (the backend died on it): UID EXPUNGE instead


def settled(data: dict, i: int) -> set[int]:
    """Source UIDs of pair *i* done with: removed by the drain, or someone else's (copy taken back or left)."""
    return set(expand_uid_set(data.get("settled", {}).get(str(i), "")))


def _settle(data: dict, i: int, uids: Sequence[int]) -> None:
    if "settled" in data:  # else an older version's entry: it stays one (remove_verified)
        data["settled"][str(i)] = uid_set(sorted(settled(data, i) | set(uids))).decode()


def _copies(data: dict, i: int) -> dict[int, tuple[int, dict]]:
    """Source UID -> (destination UID, its batch record) of pair *i*."""
    out = {}
    for rec in data["batches"]:
        if rec["pair"] == i:
            for s, d in zip(expand_uid_set(rec["src"]), expand_uid_set(rec["dst"]), strict=True):
                out[s] = (d, rec)
    return out


async def remove_verified(journal: MailboxMap, entry: JournalEntry, i: int, src: BackendProtocol,
                          dst: BackendProtocol, box: str, drop: str, present: Sequence[int], copied: set[int]) -> None:
    """*box* selected read-write on *src*, holding *present*: remove those of them whose copy is
    verified (*copied*); take back the copies of the copied UIDs someone else took away."""
    data = entry.data
    # An entry an older version wrote (recovered after an upgrade) does not say which UIDs its drain
    # expunged: none is taken for someone else's (their copies are the only ones left).
    theirs = sorted(copied - set(present) - settled(data, i)) if "settled" in data else []
    mine = [u for u in present if u in copied]
    for _attempt in range(ATTEMPTS):
        if not mine:
            break
        this = _next_drop(data, drop)
        how = "move" if _can_move(src) and data.get("move_deaths", 0) < MOVE_DEATHS else "expunge"
        if how == "expunge" and _can_move(src):
            log.warn("move {id}: {b} closed the connection on the drain's UID MOVE {n} times (Dovecot 2.3.19 panics "
                     "on a message its index damaged); its verified messages removed by UID STORE and UID EXPUNGE",
                     id=entry.id, b=src.name, n=data["move_deaths"])
        data["dropping"] = {"pair": i, "box": box, "uids": uid_set(mine).decode(), "drop": this, "how": how}
        await journal.step(entry, Step.DROPPING)
        await _fresh(src, this, selected=box)
        taken = await _move_to(src, mine, this) if how == "move" else await _expunged(src, mine)
        still: list[int] = []
        if taken is None:  # one went meanwhile (EXPUNGEISSUED): what the MOVE took, if any, is told by content
            still = await still_there(src, mine)
            moved = set(await _in_drop(src, dst, data, i, _without(mine, still), this))
            await open_mailbox(src, box, readonly=False)
        else:
            moved = set(taken)
            if how == "move":
                await _late_flags(src, dst, data, i, box, this, taken)
        theirs += [u for u in _without(mine, still) if u not in moved]
        await _dropped(journal, entry, i, sorted(moved))
        await _gone(src, this, selected=box)
        mine = still  # tried again
    if mine:
        raise TransferError(f"the source on {src.name} kept refusing to give up its copied messages; tried again later")
    if theirs:
        await _take_back(journal, entry, i, dst, sorted(theirs), drop)


async def take_back_vanished(journal: MailboxMap, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol) -> None:
    """Before the commit point: a message copied from a source that has left it since -- a client's
    command already on its way to the backend when the reservation landed (a MOVE, an EXPUNGE) --
    is taken back from the destination; kept, it would be there twice (or, expunged, come back).
    The destination first, then the journal: a crash between rolls back what is still recorded."""
    data = entry.data
    for i, (old, new) in enumerate(data["pairs"]):
        copied = copied_of(entry, i)
        if not copied:
            continue
        await open_mailbox(src, old, readonly=True)
        present, _ = await search_uids(src, b"ALL")
        await src.deselect()
        gone = copied - set(present)
        if not gone:
            continue
        back: list[int] = []
        for rec in data["batches"]:
            if rec["pair"] == i:  # source and destination UIDs, both ascending, in the same order
                both = list(zip(expand_uid_set(rec["src"]), expand_uid_set(rec["dst"]), strict=True))
                back += [d for s, d in both if s in gone]
                rec["src"] = uid_set(s for s, _d in both if s not in gone).decode()
                rec["dst"] = uid_set(d for s, d in both if s not in gone).decode()
        await open_mailbox(dst, new, readonly=False)
        await expunge_uids(dst, back)
        await dst.deselect()  # never CLOSE
        data["batches"] = [rec for rec in data["batches"] if rec["src"]]
        await journal.record(entry)
        log.warn("move {id}: {n} message(s) left {box} on {b} while it was copied (a command under way when "
                 "the move began): their copies taken back", id=entry.id, n=len(back), box=old, b=src.name)


def copied_of(entry: JournalEntry, i: int) -> set[int]:
    """The source UIDs of pair *i* a mailbox move copied and verified."""
    return {u for rec in entry.data["batches"] if rec["pair"] == i for u in expand_uid_set(rec["src"])}


async def resume(journal: MailboxMap, entry: JournalEntry, src: BackendProtocol, dst: BackendProtocol,
                 drop: str) -> None:
    """Recovery: finish a removal a crash cut off (at ``dropping`` or ``taking-back``)."""
    data = entry.data
    if pending := data.get("dropping"):
        i, mine = pending["pair"], expand_uid_set(pending["uids"])
        expunging = pending.get("how") == "expunge"
        present: list[int] = []
        if await exists(src, pending["box"]):
            state = await open_mailbox(src, pending["box"], readonly=True)
            if state.uidvalidity != data["validity"].get(str(i), state.uidvalidity):
                raise TransferError("a source mailbox was replaced during the move (UIDVALIDITY changed)")
            present, _ = await search_uids(src, b"UID " + uid_set(mine))
            await src.deselect()
        gone = _without(mine, present)
        # The MOVE took nothing: cut off, or the backend died on it; or it never ran, its drop not made
        # (its CREATE refused, or the process killed first): then it is no death of the backend's.
        if not expunging and not gone and await exists(src, pending.get("drop", drop)):
            data["move_deaths"] = data.get("move_deaths", 0) + 1
        # expunged (no drop): every one gone is the drain's own, as _expunged counts them
        await _dropped(journal, entry, i, gone if expunging else await _in_drop(src, dst, data, i, gone,
                                                                                pending.get("drop", drop)))
    if data.get("taking"):
        await _finish_taking(journal, entry, dst, drop)
    for conn in (src, dst):  # settled: what a crash left in a drop is the copy of a message that is elsewhere
        for left in await list_mailboxes(conn, name_arg(drop + "*")):  # (a private name: no wildcard in it)
            await _gone(conn, left.name.decode("ascii"))


def _next_drop(data: dict, base: str) -> str:
    """A drop name never used before in this move (journaled with the step that uses it): one a killed
    Dovecot half deleted, and then refuses to delete or make again, never stops the drain."""
    data["drops"] = data.get("drops", 0) + 1
    return f"{base}-{data['drops']}"


async def _dropped(journal: MailboxMap, entry: JournalEntry, i: int, moved: Sequence[int]) -> None:
    _settle(entry.data, i, moved)
    entry.data["dropping"] = None
    await journal.step(entry, Step.DROPPED)


async def _in_drop(src: BackendProtocol, dst: BackendProtocol, data: dict, i: int, gone: list[int],
                   drop: str) -> list[int]:
    """Of source UIDs *gone*, those whose content the drop holds (the drain's MOVE took them)."""
    if not gone or not await exists(src, drop):
        return []
    await open_mailbox(src, drop, readonly=True)
    uids, _ = await search_uids(src, b"ALL")
    there = collections.Counter(await hash_messages(src, uids))
    await src.deselect()
    copies = _copies(data, i)
    new = data["pairs"][i][1]
    hashes: dict[int, str] = {}
    if await exists(dst, new):
        state = await open_mailbox(dst, new, readonly=True)
        known = [copies[s][0] for s in gone if s in copies and copies[s][1]["validity"] == state.uidvalidity]
        hashes = await hashes_present(dst, known)
        await dst.deselect()
    ours = []
    for s in gone:
        h = hashes.get(copies[s][0]) if s in copies else None
        if h is not None and there[h] > 0:
            there[h] -= 1
            ours.append(s)
    return ours


async def _take_back(journal: MailboxMap, entry: JournalEntry, i: int, dst: BackendProtocol, theirs: list[int],
                     drop: str) -> None:
    """Copies of source UIDs someone else took away: decided, journaled, then moved to a drop on *dst*."""
    data = entry.data
    new = data["pairs"][i][1]
    copies = _copies(data, i)
    take: list[int] = []
    changed: list[int] = []
    validity = None
    if await exists(dst, new):
        state = await open_mailbox(dst, new, readonly=True)
        validity = state.uidvalidity
        mine = [copies[s] for s in theirs if s in copies and copies[s][1]["validity"] == state.uidvalidity]
        found, _ = await search_uids(dst, b"UID " + uid_set(d for d, _r in mine)) if mine else ([], [])
        there = set(found)
        take = [d for d, _r in mine if d in there]
        if "CONDSTORE" in dst.capabilities:
            taken = set(take)
            for rec in {id(r): r for _d, r in mine if r.get("modseq") is not None}.values():
                ds = {d for d, r in mine if r is rec and d in taken}
                if ds:
                    later, _ = await search_uids(dst, b"UID " + uid_set(sorted(ds)) + b" MODSEQ %d" % (rec["modseq"] + 1))
                    changed += [d for d in later if d in ds]
        await dst.deselect()
    take = _without(take, changed)
    _settle(data, i, theirs)
    data["taking"] = {"pair": i, "uids": uid_set(sorted(take)).decode(), "validity": validity,
                      "drop": _next_drop(data, drop)}
    await journal.step(entry, Step.TAKING_BACK)
    left = len(theirs) - len(take)
    log.warn("move {id}: {n} message(s) left {box} on {b} after the move's commit point (a client's command under "
             "way when the move began): {t} copy(ies) taken back from {d}, {left} left there (moved on or changed "
             "by a client meanwhile{why})", id=entry.id, n=len(theirs), box=data["pairs"][i][0], b=data["src"],
             t=len(take), d=dst.name, left=left, why=f": {len(changed)} changed" if changed else "")
    await _finish_taking(journal, entry, dst, drop)


async def _finish_taking(journal: MailboxMap, entry: JournalEntry, dst: BackendProtocol, drop: str) -> None:
    data = entry.data
    taking = data["taking"]
    drop = taking.get("drop", drop)
    new = data["pairs"][taking["pair"]][1]
    uids = expand_uid_set(taking["uids"])
    if uids and await exists(dst, new):
        await _fresh(dst, drop, keep=True)
        if await same_mailbox(dst, new, taking["validity"]):
            for _attempt in range(ATTEMPTS):  # one a client moved on meanwhile is not moved: left, never lost
                if not uids or await _move_to(dst, uids, drop) is not None:
                    break
                uids = await still_there(dst, uids)
        await dst.deselect()
        await _gone(dst, drop)
    data["taking"] = None
    await journal.record(entry)


def _without(uids: Sequence[int], these: Sequence[int]) -> list[int]:
    """*uids* but *these*, in order (a set made once: thousands of UIDs)."""
    gone = set(these)
    return [u for u in uids if u not in gone]


def _can_move(conn: BackendProtocol) -> bool:
    return "MOVE" in conn.capabilities and "UIDPLUS" in conn.capabilities


async def _expunged(conn: BackendProtocol, uids: Sequence[int]) -> dict[int, int]:
    """STORE \\Deleted and UID EXPUNGE *uids* of the selected mailbox: every one taken for the drain's
    (a client's MOVE between the two could not be told; used only where the MOVE cannot be)."""
    await expunge_uids(conn, uids)
    return dict.fromkeys(uids, 0)


async def _move_to(conn: BackendProtocol, uids: Sequence[int], drop: str) -> dict[int, int] | None:
    """UID MOVE *uids* of the selected mailbox to *drop*: the UIDs it took, each to its UID in *drop*
    (COPYUID); None if it was refused because one of them went meanwhile (EXPUNGEISSUED: it may have taken some).

    A backend without MOVE and UIDPLUS: STORE \\Deleted and UID EXPUNGE, every one taken for the drain's."""
    if not _can_move(conn):
        return await _expunged(conn, uids)
    result = await conn.command(b"UID MOVE " + uid_set(sorted(uids)) + b" " + name_arg(drop))
    if not result.ok:
        if result.start.code == "EXPUNGEISSUED":
            return None
        raise TransferError(f"MOVE failed on {conn.name}: {result.start.text.decode('utf-8', 'replace')}")
    moved: dict[int, int] = {}
    for start in [r.start for r in result.responses] + [result.start]:
        if start.code == "COPYUID":
            parts = start.code_args.split()
            if len(parts) == 3:
                moved.update(zip(expand_uid_set(parts[1].decode()), expand_uid_set(parts[2].decode()), strict=False))
    wanted = set(uids)
    return {u: there for u, there in moved.items() if u in wanted}


async def _late_flags(src: BackendProtocol, dst: BackendProtocol, data: dict, i: int, box: str, drop: str,
                      taken: dict[int, int]) -> None:
    """Flags a STORE gave a source message after it was copied (a client's, under way when the move began and
    run late: answered OK, then lost with the source; probe 6 of stop 49), set on its copy: read in the drop,
    which holds the messages as the drain took them, unless a client changed the copy since (STORE
    UNCHANGEDSINCE the MODSEQ its batch had when verified, RFC 7162). *src* is left with *box* selected."""
    copies = {s: (c, rec["modseq"]) for s, (c, rec) in (_copies(data, i) if data.get("batches") else {}).items()
              if s in taken and rec.get("modseq")}
    if not copies or "CONDSTORE" not in dst.capabilities:
        return
    await open_mailbox(src, drop, readonly=True)
    final = await flags_of(src, [taken[s] for s in copies])
    await open_mailbox(src, box, readonly=False)
    await open_mailbox(dst, data["pairs"][i][1], readonly=True)  # (EXAMINE: the copies stay \Recent for the client)
    now = await flags_of(dst, [c for c, _m in copies.values()])
    stores: dict[tuple[frozenset[bytes], int], list[int]] = collections.defaultdict(list)
    for s, (copy, modseq) in copies.items():
        flags, there = final.get(taken[s]), now.get(copy)
        if flags is not None and there is not None and {flag_key(f) for f in flags} != {flag_key(f) for f in there}:
            stores[(flags, modseq)].append(copy)
    if stores:
        await open_mailbox(dst, data["pairs"][i][1], readonly=False)
    for (flags, modseq), uids in stores.items():
        await dst.command(b"UID STORE %s (UNCHANGEDSINCE %d) FLAGS.SILENT (%s)" % (uid_set(uids), modseq, b" ".join(sorted(flags))))
        log.info("{b}: flags set on {n} message(s) of {box} after they were copied carried to their copies",
                 b=src.name, n=len(uids), box=box)
    await dst.deselect()


async def _fresh(conn: BackendProtocol, drop: str, *, keep: bool = False, selected: str | None = None) -> None:
    """The drop, there and (unless *keep*) empty: what a past use left in it is no one's. Its CREATE
    Dovecot refuses as existing having made it (mailops.create) is taken: refused, the drain stopped
    past the commit point, and recovery counted the drain's MOVE that never ran as one Dovecot died on."""
    if await exists(conn, drop):
        if keep:
            return
        await _gone(conn, drop, selected=selected)
    await create(conn, drop)


async def _gone(conn: BackendProtocol, drop: str, *, selected: str | None = None) -> None:
    """Delete the drop (what is in it: the copies of messages that are elsewhere); one a killed
    Dovecot half deleted is finished, or left if it refuses (aside.finish_cut_delete). One the
    backend will not delete is emptied and left, logged: a drain is never stopped by it (the
    move's names would stay reserved for good). *selected*: the mailbox to select again after."""
    if not await exists(conn, drop) or await finish_cut_delete(conn, drop):
        return
    deleted = await conn.command(b"DELETE " + name_arg(drop))
    if deleted.ok:
        return
    await open_mailbox(conn, drop, readonly=False)
    uids, _ = await search_uids(conn, b"ALL")
    await expunge_uids(conn, uids)
    await conn.deselect()
    if selected is not None:
        await open_mailbox(conn, selected, readonly=False)
    log.warn("{b}: {drop} could not be deleted ({why}): emptied and left (a private name, shown to no client)",
             b=conn.name, drop=drop, why=deleted.start.text.decode("utf-8", "replace"))
