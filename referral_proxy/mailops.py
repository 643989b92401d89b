"""Mail operations on one authenticated backend connection: the moves', the admin commands' and recovery's.

Each is one or a few commands with its answer read into values. Mailbox arguments
are names, never LIST patterns: ``%`` and ``*`` are legal in names ("50% off"), and
LIST has no escape for them, so a name with a wildcard is looked up by listing
everything and comparing. Names are ``str`` (modified UTF-7 as the client sent
it, bytes beyond ASCII kept with surrogateescape).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from .acrossview import SAVED
from .backend import BackendError, BackendProtocol, Tagged, UntaggedResponse
from .imap.command import Atom, ParseError, String, parse_arguments
from .imap.data import ListData, parse_fetch, parse_list, parse_search, parse_status
from .imap.quoting import astring
from .imap.response import ResponseStart, completion_text
from .imap.uidset import highest_number, sequence_set_size, uid_set
from .routing import normalize

__all__ = ["TransferError", "Vanished", "NotReadAgain", "MailboxGone", "TRYCREATE", "NoMasterUser", "MessageInfo", "MailboxState",
           "name_arg", "run_ok", "list_mailboxes", "exists", "create", "refused_target", "subtree", "status", "status_now",
           "open_mailbox", "same_mailbox", "search_uids", "still_there", "named_uids", "fetch_infos", "expunge_uids",
           "subscribed", "may_expunge", "missing", "myrights", "grants", "highest_modseq"]

log = Logger()

#: STATUS asked again this often while a new mailbox's UIDVALIDITY reads 0 (measured on Dovecot 2.3.19,
#: three sessions opening a just-CREATEd mailbox at once: at most 13 more answers of 0 in 600 asks).
UNSET_RETRIES = 100
EXPUNGE_TRIES = 3  # expunge_uids() flags and expunges messages at most this often (see there)


class TransferError(BackendError):
    """A mail operation stopped; str() is safe to show a client (no client bytes in it). *others*: untagged
    responses of the client's selected mailbox not handed on yet (an EXPUNGE: told, or its numbers drift)."""

    others: tuple[bytes, ...] = ()

    def carrying(self, others: Sequence[bytes]) -> TransferError:
        """This error, with *others* before those it carried already."""
        self.others = tuple(others) + self.others
        return self


class NoMasterUser(BackendError):
    """A backend without ``master_user``: the proxy cannot act there for a user (moves, recovery)."""


class Vanished(TransferError):
    """A source message could not be read: another session expunged it meanwhile (nothing was saved)."""


class NotReadAgain(TransferError):
    """The backend refused what would make it read a private mailbox whole (hidden_messages): at quota."""


class MailboxGone(TransferError):
    """STATUS said the mailbox is not there: deleted since it was found, for a COPY/MOVE's target
    (transfer.py answers TRYCREATE, as the backend's own MOVE would)."""


#: What a COPY or MOVE to a mailbox that is not there gets (without ``NO``), as Dovecot's own says.
TRYCREATE = "[TRYCREATE] Mailbox doesn't exist"


@dataclass(frozen=True)
class MessageInfo:
    uid: int
    flags: tuple[bytes, ...]  # without \Recent
    internaldate: bytes
    size: int


@dataclass(frozen=True)
class MailboxState:
    """What SELECT / EXAMINE / STATUS told about a mailbox."""

    uidvalidity: int
    uidnext: int
    messages: int


def name_arg(name: str) -> bytes:
    """A mailbox name as a command argument: atom, quoted string or literal, as it needs."""
    return astring(name.encode("utf-8", "surrogateescape"))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


async def run_ok(conn: BackendProtocol, command: bytes, what: str, *, bounded: bool = False) -> Tagged:
    """Run *command* (*bounded*: a read, cut by stall.py); its result if OK, else TransferError naming *what* and the backend."""
    result = await conn.command(command, bounded=bounded)
    if not result.ok:
        raise TransferError(_failed(what, conn, result.start))
    return result


def _failed(what: str, conn: BackendProtocol, start: ResponseStart) -> str:
    """``[ALREADYEXISTS] CREATE failed on b3: ...``: the backend's response code first, for the client."""
    code = f"[{start.code}] " if start.code and start.code.isalpha() else ""
    return f"{code}{what} failed on {conn.name}: {start.text.decode('utf-8', 'replace')}"


def _wild(name: str) -> bool:
    return "%" in name or "*" in name


async def list_mailboxes(conn: BackendProtocol, pattern: bytes = b"*") -> list[ListData]:
    """``LIST "" <pattern>``: every entry, placeholders included (see ListData.selectable)."""
    result = await run_ok(conn, b'LIST "" ' + pattern, "LIST", bounded=True)  # a read: answer_timeout (stall.py)
    out = []
    for r in result.responses:
        if r.start.name == "LIST":
            try:
                out.append(parse_list(*r.arguments))
            except ParseError:
                continue
    return out


def _same(a: str, b: str, separator: str = "/") -> bool:
    """Names compare exactly, but INBOX (and the INBOX of ``inbox/sub``) without regard to case."""
    return a == b or normalize(a, separator) == normalize(b, separator)


async def exists(conn: BackendProtocol, name: str) -> bool:
    """Is there a selectable mailbox of exactly this name? Not one Dovecot lists yet says does not exist (a
    parent DELETEd with children: a move onto it was refused ALREADYEXISTS, recovery of one whose source or
    destination became one failed at every sweep, its names [INUSE] for good: probe w5 of stop 52)."""
    entries = await list_mailboxes(conn, b"*" if _wild(name) else name_arg(name))
    found = [e for e in entries if e.selectable and _same(_text(e.name), name)]
    return bool(found) and not (found[0].has(b"\\HasChildren") and await missing(conn, name))  # (one has children)


async def create(conn: BackendProtocol, name: str) -> None:
    """CREATE *name*, found absent and reserved. Dovecot 2.3.19 answers some ``NO [ALREADYEXISTS]`` having made
    it, while the user's other sessions LIST or MYRIGHTS (9 and 22 of 400 beside two: tests/test_rename_brief_hold.py):
    found there right after, empty, it is taken as made; anything else is the refusal."""
    result = await conn.command(b"CREATE " + name_arg(name))
    if result.ok:
        return
    if result.start.code == "ALREADYEXISTS" and await exists(conn, name) and (await status(conn, name)).messages == 0:
        log.info("backend {b}: CREATE {name} refused as existing, and made: taken", b=conn.name, name=name)
        return
    raise TransferError(_failed("CREATE", conn, result.start))


async def refused_target(conn: BackendProtocol, name: str, ask: BackendProtocol | None = None) -> str | None:
    """None if *name* is a selectable mailbox on *conn*; else the answer (without ``NO``) a COPY or MOVE to it
    gets: ``[TRYCREATE]`` if it is not there, or the backend's own refusal of a name no mailbox can have
    (Dovecot's "Mailbox name is not valid mUTF-7." for ``a&b``), as its own COPY says (TRYCREATE there sent
    clients to a CREATE that fails). Asked of *ask*, the client's own session there, when given: Dovecot 2.3
    answers a name too long for its file system with that session's LAST storage error (``[CANNOT] Mailbox
    name too long`` after the client's CREATE of it, ``[SERVERBUG]`` in a new session)."""
    if await exists(conn, name):
        return None
    start = (await (ask or conn).command(b"STATUS " + name_arg(name) + b" (MESSAGES)", bounded=True)).start
    if start.status == "NO" and not _gone(start):
        return completion_text(start)[3:]
    return TRYCREATE


_GONE_CODES = frozenset({"NONEXISTENT", "TRYCREATE"})


def _gone(start: ResponseStart) -> bool:
    """A NO that says the mailbox is not there (Dovecot: ``[NONEXISTENT] Mailbox doesn't exist``)."""
    return start.status == "NO" and (start.code in _GONE_CODES or b"doesn't exist" in start.text)


async def missing(conn: BackendProtocol, name: str) -> bool:
    """Listed, yet not there: Dovecot lists a mailbox DELETEd while it had children (without \\Noselect,
    to every session) and opens it no more (seen: recovery stuck on 'EXAMINE failed ... undo-0'; a RENAME
    across of a tree holding one refused, probe v2 of stop 52)."""
    return _gone((await conn.command(b"STATUS " + name_arg(name) + b" (MESSAGES)", bounded=True)).start)


async def subtree(conn: BackendProtocol, name: str, separator: str) -> list[str]:
    """The selectable mailboxes *name* and *name*/..., by exact name and prefix (parents first)."""
    if _wild(name):
        entries = await list_mailboxes(conn)
    else:
        entries = await list_mailboxes(conn, name_arg(name)) + await list_mailboxes(conn, name_arg(name + separator + "*"))
    prefix = normalize(name, separator) + separator  # Dovecot lists inbox/sub as INBOX/sub
    names = {_text(e.name) for e in entries if e.selectable}
    found = [n for n in names if _same(n, name, separator) or normalize(n, separator).startswith(prefix)]
    return sorted(found, key=lambda n: (n.count(separator), n))


async def status(conn: BackendProtocol, name: str, others: list[bytes] | None = None) -> MailboxState:
    """UIDVALIDITY, UIDNEXT and MESSAGES of a mailbox, without selecting it (MailboxGone: not there).

    Of the mailbox selected on *conn*, Dovecot (2.3) answers from that session's view: the
    UIDNEXT and MESSAGES of its last sync, and for one renamed away or deleted since, with
    another made under its name, the OLD one's UIDVALIDITY (status_now() asks the mailbox).

    Of a mailbox made a moment ago, Dovecot answers ``UIDVALIDITY 0`` while another session is
    opening it for the first time (its index not written yet): asked again, up to UNSET_RETRIES
    times, never taken for a UIDVALIDITY (a move compared it with its APPENDUID's: "replaced").

    *others*: where the other untagged responses go, raw (on a client's selected mailbox: an EXPUNGE
    or EXISTS the client must see, or its message numbers go out of step)."""
    for _ in range(UNSET_RETRIES):
        result = await conn.command(b"STATUS " + name_arg(name) + b" (UIDVALIDITY UIDNEXT MESSAGES)", bounded=True)
        if others is not None:
            others += [r.raw for r in result.responses if r.start.name != "STATUS"]
        if not result.ok:
            raise (MailboxGone if _gone(result.start) else TransferError)(_failed("STATUS", conn, result.start))
        state = _status_state(result)
        if state is None:
            raise TransferError(f"STATUS failed on {conn.name}: no usable answer")
        if state.uidvalidity:
            return state
    raise TransferError(f"STATUS on {conn.name} gave UIDVALIDITY 0 {UNSET_RETRIES} times")


def _status_state(result: Tagged) -> MailboxState | None:
    for r in result.responses:
        if r.start.name == "STATUS":
            try:
                v = parse_status(*r.arguments).values
                return MailboxState(v[b"UIDVALIDITY"], v[b"UIDNEXT"], v[b"MESSAGES"])
            except (ParseError, KeyError):
                return None
    return None


async def status_now(conn: BackendProtocol, name: str) -> MailboxState:
    """status() of the mailbox as it is now, on a connection of the proxy's own that may have one
    selected (a transfer's, verify_copies): that is left first (UNSELECT; BAD if none, harmless).
    UNSELECT, CLOSE, another SELECT or a fresh connection end Dovecot's view; NOOP does not."""
    await conn.deselect()
    return await status(conn, name)


async def named_by_validity(conn: BackendProtocol, validity: int) -> list[str]:
    """The names of the selectable mailboxes of *conn*'s user whose UIDVALIDITY is *validity* (at most
    one: Dovecot gives each new mailbox of a user a UIDVALIDITY of its own and keeps it on RENAME)."""
    await conn.deselect()
    out = []
    for entry in await list_mailboxes(conn):
        name = entry.name.decode("utf-8", "surrogateescape")
        if entry.selectable:
            try:
                if (await status(conn, name)).uidvalidity == validity:
                    out.append(name)
            except MailboxGone:
                continue
    return out


async def open_mailbox(conn: BackendProtocol, name: str, *, readonly: bool) -> MailboxState:
    """SELECT (or EXAMINE) a mailbox; what it said about UIDs and messages."""
    verb = b"EXAMINE " if readonly else b"SELECT "
    result = await run_ok(conn, verb + name_arg(name), verb.strip().decode(), bounded=readonly)  # EXAMINE reads
    validity = uidnext = messages = 0
    for r in result.responses:
        if r.start.name == "EXISTS" and r.start.number is not None:
            messages = r.start.number
        elif r.start.code == "UIDVALIDITY" and r.start.code_args.isdigit():
            validity = int(r.start.code_args)
        elif r.start.code == "UIDNEXT" and r.start.code_args.isdigit():
            uidnext = int(r.start.code_args)
    if not validity:
        raise TransferError(f"{verb.strip().decode()} on {conn.name} gave no UIDVALIDITY")
    return MailboxState(validity, uidnext, messages)


async def same_mailbox(conn: BackendProtocol, name: str, validity: int | None, *, readonly: bool = False) -> bool:
    """Select *name*: is it still the mailbox whose UIDs were recorded (UIDVALIDITY *validity*)? One
    deleted and made anew meanwhile holds other messages under the same UIDs: none is acted on."""
    return (await open_mailbox(conn, name, readonly=readonly)).uidvalidity == validity


async def highest_modseq(conn: BackendProtocol, name: str) -> int | None:
    """*name*'s HIGHESTMODSEQ (RFC 7162), None without CONDSTORE: a copy whose MODSEQ is past the one its
    batch had when verified was changed by a client (never taken back, nor given its source's late flags)."""
    if "CONDSTORE" not in conn.capabilities:
        return None
    for r in (await conn.command(b"STATUS " + name_arg(name) + b" (HIGHESTMODSEQ)")).responses:
        if r.start.name == "STATUS":
            try:
                return parse_status(*r.arguments).values.get(b"HIGHESTMODSEQ")
            except ParseError:
                break
    return None


async def search_uids(conn: BackendProtocol, criteria: bytes) -> tuple[list[int], list[bytes]]:
    """``UID SEARCH <criteria>`` in the selected mailbox: the UIDs ascending, and the other
    untagged responses (raw, for a client to see)."""
    result = await conn.command(b"UID SEARCH " + criteria, bounded=True)
    if not result.ok:
        raise TransferError(completion_text(result.start))
    uids: set[int] = set()
    others = []
    for r in result.responses:
        if r.start.name == "SEARCH":
            try:
                uids.update(parse_search(r.start.rest))
            except ParseError:
                raise TransferError(f"unreadable SEARCH answer from {conn.name}") from None
        else:
            others.append(r.raw)
    return sorted(uids), others


async def still_there(conn: BackendProtocol, uids: Sequence[int], others: list[bytes] | None = None) -> list[int]:
    """Those of *uids* still in the selected mailbox, ascending (only those asked for: a UID set
    ending past the last UID may name the last message); the other untagged responses to *others*."""
    if not uids:
        return []
    asked = set(uids)
    found, also = await search_uids(conn, b"UID " + uid_set(sorted(asked)))
    if others is not None:
        others += also
    return [u for u in found if u in asked]


async def named_uids(conn: BackendProtocol, message_set: bytes, uid: bool) -> tuple[list[int], list[bytes]]:
    """The UIDs a client's COPY/MOVE *message_set* names in the selected mailbox (ascending), and
    the other untagged responses. A sequence set naming a message past the last is refused whole
    (TransferError BAD), as the backend refuses that COPY (Dovecot: BAD Invalid messageset):
    ``UID SEARCH`` finds the messages that exist, and a MOVE 6:7 of six moved one, said OK."""
    uids, others = await search_uids(conn, (b"UID " if uid else b"") + message_set)
    if not uid and message_set != SAVED:  # $ may name nothing: OK, as Dovecot answers (acrossview.py)
        size = sequence_set_size(message_set)  # None: with "*", which names the last message if any
        if (len(uids) < size) if size is not None else not uids:
            raise TransferError(PAST_THE_LAST)
        if size is None and (top := highest_number(message_set)) is not None and top > 1:
            # "9,*" of 5 messages: 9 names none (Dovecot 2.3.19's own COPY 9,* panics its process)
            there, also = await search_uids(conn, b"%d" % top)
            others += also
            if not there:
                raise TransferError(PAST_THE_LAST)
    return uids, others


PAST_THE_LAST = "BAD Invalid messageset: it names a message past the last one"


async def fetch_infos(conn: BackendProtocol, uids: Sequence[int]) -> tuple[list[MessageInfo], list[bytes]]:
    """FLAGS, INTERNALDATE and size of each message of the selected mailbox, in UID order."""
    if not uids:
        return [], []
    result = await run_ok(conn, b"UID FETCH " + uid_set(uids) + b" (UID FLAGS INTERNALDATE RFC822.SIZE)", "FETCH")
    infos: dict[int, MessageInfo] = {}
    others = []
    for r in result.responses:
        try:
            if r.start.name != "FETCH":
                raise ParseError("not a FETCH")
            data = parse_fetch(*r.arguments)
            uid, flags, date, size = data.uid, data.flags, data.internaldate, data.size
            if uid is None or flags is None or date is None or size is None:
                raise ParseError("incomplete")  # an unsolicited flag update, say
        except ParseError:
            others.append(r.raw)
            continue
        infos[uid] = MessageInfo(uid, flags, date, size)
    missing = [u for u in uids if u not in infos]
    if missing:
        raise Vanished(f"message UID {missing[0]} vanished from the source").carrying(others)
    return [infos[u] for u in uids], others


async def may_expunge(conn: BackendProtocol, name: str) -> tuple[bool, list[bytes]]:
    """May this login flag messages of *name* \\Deleted and expunge them (RFC 4314 ``t`` and ``e``)?
    And the other untagged responses, raw (on the selected mailbox's connection: a client must see them)."""
    rights, others = await myrights(conn, name)
    return grants(conn, rights, "te"), others


async def myrights(conn: BackendProtocol, name: str) -> tuple[str | None, list[bytes]]:
    """The RFC 4314 rights of this login on *name* (``MYRIGHTS``): None if the backend has no ACL, or
    does not say (refused, unreadable); and the other untagged responses, raw."""
    if "ACL" not in conn.capabilities:
        return None, []
    result = await conn.command(b"MYRIGHTS " + name_arg(name), bounded=True)
    rights, others = None, []
    for r in result.responses:
        if r.start.name != "MYRIGHTS":
            others.append(r.raw)
            continue
        try:
            args = parse_arguments(*r.arguments)
        except ParseError:
            continue
        if result.ok and len(args) == 2 and isinstance(args[1], (Atom, String)):
            rights = args[1].value.decode("ascii", "replace")
    return rights, others


def grants(conn: BackendProtocol, rights: str | None, needed: str) -> bool:
    """Do *rights* hold every right of *needed* (of ``t e x``)? Unknown rights (None) are granted (the
    operation then finds out). On a server without ``RIGHTS=`` naming them (RFC 2086), ``d`` stands for
    ``t`` and ``e``, and ``x`` is not known."""
    if rights is None:
        return True
    announced = "".join(c[7:].lower() for c in conn.capabilities if c.startswith("RIGHTS="))
    for right in needed:
        if right in announced or right in rights:
            if right not in rights:
                return False
        elif right in "te" and "d" not in rights:
            return False
    return True


async def expunge_uids(conn: BackendProtocol, uids: Sequence[int], untagged: list[bytes] | None = None,
                       flags: dict[int, frozenset[bytes] | None] | None = None) -> Tagged | None:
    """Remove exactly these messages of the selected mailbox (never a plain EXPUNGE, never CLOSE): flagged and
    expunged in one write, then looked for. One still there (a client cleared \\Deleted between the two, or
    Dovecot kept it: soak C 76065) is done again, EXPUNGE_TRIES in all, then TransferError. The last EXPUNGE's
    answer; the untagged responses, raw, to *untagged*. *flags*: each one's flags, read in that first write
    (a MOVE across carries what another session changed until then: probe a3)."""
    raw: list[bytes] = [] if untagged is None else untagged
    left, expunged = sorted(uids), None
    for _ in range(EXPUNGE_TRIES):
        if not left:
            return expunged
        reading = [conn.command(b"UID FETCH " + uid_set(left) + b" (UID FLAGS)")] if flags is not None else []
        marking = conn.command(b"UID STORE " + uid_set(left) + b" +FLAGS.SILENT (\\Deleted)")
        expunging = conn.command(b"UID EXPUNGE " + uid_set(left))
        try:
            marked = await marking
        except BaseException:
            for d in (*reading, expunging):
                d.addErrback(lambda _f: None)  # the connection's end, said by the first
            raise
        expunged = await expunging
        got = [r for d in reading for r in (await d).responses] + [*marked.responses, *expunged.responses]
        raw += [r.raw for r in got if flags is None or not _flags_into(r, flags, set(left))]
        flags = None  # (the first write's only)
        for result, what in ((marked, "STORE"), (expunged, "UID EXPUNGE")):
            if not result.ok:
                raise TransferError(_failed(what, conn, result.start))
        left = await still_there(conn, left, raw)
    if left:
        raise TransferError(f"UID EXPUNGE on {conn.name} answered OK, yet {uid_set(left).decode()} still there")
    return expunged


def _flags_into(r: UntaggedResponse, flags: dict[int, frozenset[bytes] | None], wanted: set[int]) -> bool:
    """Whether *r* is a FETCH of the FLAGS of one of the *wanted* UIDs, put into *flags* (the later wins)."""
    if r.start.name != "FETCH":
        return False
    try:
        data = parse_fetch(*r.arguments)
    except ParseError:
        return False
    if data.uid not in wanted or data.flags is None:
        return False
    flags[data.uid] = frozenset(data.flags)
    return True


async def subscribed(conn: BackendProtocol) -> set[str]:
    result = await run_ok(conn, b'LSUB "" "*"', "LSUB")
    names = set()
    for r in result.responses:
        if r.start.name == "LSUB":
            try:
                names.add(_text(parse_list(*r.arguments).name))
            except ParseError:
                continue
    return names
