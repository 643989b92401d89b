"""Commands routed by their mailbox arguments: to the owner, referred, or carried across.

CREATE, DELETE, STATUS, SUBSCRIBE, ACL, QUOTA and METADATA commands go to the
backend that owns their mailbox; SELECT/EXAMINE move the selected state there;
RENAME is relayed when both names live on one backend and carried out by mover.py
when they do not (COPY/MOVE: copycommand.py). In a referral-aware session a
mailbox on another backend is answered with an RFC 2193 referral instead. The
session is reached only through :class:`MailboxHost`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import referrals
from .appendturns import HELD, Held, mover_turn
from .backend import BackendProtocol, UntaggedResponse
from .backendtypes import BackendError
from .commands import COMMANDS
from .context import ProxyContext
from .creating import create_with_kin, kin_route, rename_kin
from .deleting import delete_placed, placed_itself
from .flow import Block, ClientFlow
from .hierarchy import UNDER_ITSELF, under_itself
from .holds import wait_free
from .imap import mutf7
from .imap.command import ParenList, ParseError, astring_value, parse_arguments
from .imap.grammar import Slot
from .imap.quoting import astring
from .imap.reader import Command
from .imap.referargs import select_params_problem, status_list_problem
from .imap.response import ResponseStart
from .imap.url import has_dot_segment
from .lastanswers import Hurry
from .listing import command_pieces
from .localrename import rename_here
from .mailops import TransferError, exists, subtree
from .mover import ANSWER_WITHIN, MoveIncomplete, Mover, MoveResult
from .moveview import status_during_move
from .pool import BackendPool
from .proxyappends import APPENDING
from .relay import Relay
from .relocation import held_by, renames_aside, seen_within
from .renamecheck import refused_before
from .routing import MailboxMap, Route
from .staging import is_private_name
from .stall import Watch

__all__ = ["INUSE", "READ_ONLY", "MailboxCommands", "MailboxHost", "Refusing"]

log = Logger()


class Refusing(Exception):
    """A command answered with a status response before (or instead of) reaching a backend."""

    def __init__(self, response: str) -> None:
        super().__init__(response)
        self.response = response


class MailboxHost(Protocol):
    """What the mailbox commands need of their session."""

    id: int
    ctx: ProxyContext
    user: str | None
    home: str | None
    selected: str | None
    selected_mailbox: bytes | None
    referral_aware: bool
    pool: BackendPool | None
    relay: Relay
    flow: ClientFlow
    transport: Any  # the client's

    @property
    def closed(self) -> bool: ...  # the client connection is gone

    @property
    def config(self) -> Any: ...

    @property
    def mailbox_map(self) -> MailboxMap: ...

    def relay_cmd(self, cmd: Command, route: Route | str, after: Callable[[ResponseStart], None] | None = None,
                  name: str | None = None) -> None: ...

    def run(self, tag: bytes, work: Coroutine[Any, Any, None]) -> None: ...

    def send(self, data: bytes) -> None: ...

    def write_from(self, source: object, data: bytes, end: bool = True) -> None: ...

    def tagged(self, tag: bytes, status: str, text: str) -> None: ...

    def answer(self, tag: bytes, response: str) -> None:
        """``tag`` + a status response of the proxy's own or a backend's (``NO [CODE] text``)."""

    def refuse(self, line: bytes) -> None:
        """The proxy's own refusal of a command (a referral, NO): after the APPENDs before it."""

    async def gather(self, backends: Sequence[str], command: bytes,
                     then: Sequence[bytes] = ()) -> list[tuple[BackendProtocol, UntaggedResponse]]: ...

INUSE = "[INUSE] Mailbox is being moved to another server; try again shortly"
READ_ONLY = ("[READ-ONLY] The mailbox was opened with EXAMINE: nothing was moved; SELECT it to move "
              "messages to another server")
_RESERVED = "[CANNOT] Mailbox names beginning with referral-proxy-staging- or referral-proxy-aside- are reserved"
#: CREATE and RENAME while the map store is unavailable: the map held may be stale (another proxy moved the name's
#: mailbox meanwhile; made where the stale map says, it is a stray no client sees once the map is read again)
_RETAKEN = 10  # times a command waits for a name's brief holders when another takes it as the last lets go
UNMADE = "[UNAVAILABLE] The mailbox map is unreachable; mailboxes are created and renamed once it is back"


class MailboxCommands:
    """The mailbox-routed commands of one session."""

    __slots__ = ("host", "examined", "selected_since", "selects", "unsettled", "hurry")  # no per-instance dict

    def __init__(self, host: MailboxHost) -> None:
        self.host = host
        self.examined = False  # the selected mailbox was opened with EXAMINE (read-only)
        self.selected_since = 0  # mailbox moves begun before its SELECT (MailboxMap.moves_begun): relocation.py
        # SELECT/EXAMINEs dispatched so far, per backend: the answer of a CLOSE, or a SELECT's NO,
        # pipelined before a later SELECT sent to the same backend must not unselect the session (that
        # backend would keep the later mailbox selected unknown to the session: CHECK, EXPUNGE, FETCH of
        # "no mailbox" ran there); one before a SELECT elsewhere must (else that SELECT unselects again).
        self.selects: dict[str, int] = {}
        self.unsettled = 0  # SELECT/EXAMINE/CLOSE/UNSELECTs relayed, not answered yet (selection.settled)
        self.hurry: Hurry | None = None  # the answer clock of a RENAME across under way (lastanswers.hurry)

    def refuse_no(self, tag: bytes, text: str) -> None:
        """``tag NO text``: the proxy's own refusal, answered after the APPENDs before it (RFC 3501
        5.5: a client that pipelines reads the answers in its commands' order, as Dovecot gives them)."""
        self.host.refuse(b"%s NO %s\r\n" % (tag, text.encode()))

    # -- routes and referrals ----------------------------------------------------------------

    def route_of(self, mailbox: bytes) -> Route:
        """The backends of *mailbox*; the empty name (server METADATA, a CREATE "" the
        backend refuses) is nobody's mailbox: the home backend answers it."""
        host = self.host
        assert host.user is not None and host.home is not None
        if not mailbox:
            return Route((host.home,))
        return host.mailbox_map.lookup(host.user, mailbox.decode("utf-8", "surrogateescape"))

    def refers(self, route: Route, mailbox: bytes) -> bool:
        """In a referral-aware session, a mailbox on another backend is referred, not proxied:
        unless no member of its replica set may be named (each is the proxy itself: a loop), or
        the name is not one a client may send (not modified UTF-7, nor UTF-8 after ENABLE
        UTF8=ACCEPT): then it is proxied, and the backend refuses it as it would directly."""
        host = self.host
        if not host.referral_aware or route.primary == host.home:
            return False
        return self.valid_name(mailbox) and bool(referrals.referable_members(host.config, route))

    def valid_name(self, mailbox: bytes) -> bool:
        """A name an IMAP URL can carry: modified UTF-7, or UTF-8 once UTF8=ACCEPT is enabled (pool.py: asked
        for and announced), with no ``.`` or ``..`` segment (a client resolving the URL would land elsewhere), and
        no empty level (``Shared//x``, ``Shared/x/``: Dovecot answers ``NO [CANNOT] Invalid mailbox name``, probe g3)."""
        pool = self.host.pool
        utf8 = pool is not None and pool.enabled_where_announced(b"UTF8=ACCEPT", self.host.home or "")
        return mutf7.valid_name(mailbox, utf8=utf8) and not has_dot_segment(mailbox) and self.renamable(mailbox)

    def _url_user(self) -> str:
        host = self.host
        assert host.user is not None
        return referrals.url_user(host.config, host.pool.login if host.pool is not None else None, host.user)

    def referral(self, tag: bytes, route: Route, mailbox: bytes) -> bytes:
        host = self.host
        assert host.user is not None
        try:
            urls = referrals.mailbox_urls(host.config, route, self._url_user(), mailbox)
        except (ValueError, KeyError):
            urls = []
        if not urls:
            return b"%s NO [CANNOT] This mailbox name cannot be referred to another server\r\n" % tag
        return referrals.referral(tag, urls)

    def refer(self, cmd: Command, route: Route, mailbox: bytes) -> bytes:
        """The proxy's answer to *cmd* for a mailbox it refers: the referral, or BAD (bad_arguments)."""
        bad = self.bad_arguments(cmd, route)
        return bad if bad is not None else self.referral(cmd.tag, route, mailbox)

    def bad_arguments(self, cmd: Command, route: Route) -> bytes | None:
        """``tag BAD ...`` for arguments the remote server of *route* refuses as BAD (RFC 3501 7.1.5),
        which a client following a referral would only meet there: a STATUS list, or SELECT/EXAMINE
        parameters, it does not take (referargs.py; a sequence set is the grammar's); None if none."""
        caps = self.host.ctx.backend_caps.get(route.primary)
        problem = None
        if cmd.name == "STATUS":
            items = cmd.args.tokens[-1]
            problem = status_list_problem(items, caps) if isinstance(items, ParenList) else "Invalid arguments"
        elif cmd.name in ("SELECT", "EXAMINE") and len(cmd.args.tokens) > 1:
            params = cmd.args.tokens[1]
            pool = self.host.pool
            qresync = pool is not None and b"QRESYNC" in pool.enabled
            problem = select_params_problem(params, caps, qresync) if isinstance(params, ParenList) else "Invalid arguments"
        return None if problem is None else b"%s BAD %s\r\n" % (cmd.tag, problem.encode())

    def moving(self, mailbox: bytes) -> bool:
        """A mailbox a move holds (mover.py, journal.py): NO [INUSE] until the move ends."""
        assert self.host.user is not None
        return self.host.mailbox_map.reserved(self.host.user, mailbox.decode("utf-8", "surrogateescape"))

    def selected_held(self) -> bool:
        """The selected mailbox is held by a move to another server (or its parent's, or the user's), or
        such a move took it and ended before the relocation watch's BYE (soak seed 51255: an EXPUNGE then
        relayed to the drained old INBOX left the moved copy, beside the client's COPY: twice)."""
        mailbox = self.host.selected_mailbox
        return mailbox is not None and (self.moving(mailbox) or self.selected_elsewhere(mailbox)
                                        or self.taken_since_selected())

    def taken_since_selected(self) -> bool:
        """A mailbox move begun after this SELECT held the selected mailbox, ended or not (relocation.held_by:
        the watch's BYE is on its way). A RENAME across leaves the old name routed where it was, so
        selected_elsewhere does not see it: a STORE and EXPUNGE relayed there (soak C seed 85027, an
        OLDMOVE's, both answered OK) left the moved copy beside the client's COPY: twice."""
        mailbox_map = self.host.mailbox_map
        if mailbox_map.moves_begun <= self.selected_since:  # nearly always: an int compared, nothing read
            return False
        _seen, began = mailbox_map.moves_since(self.selected_since)
        return held_by(self.host, [m for m in began if renames_aside(m[2])], mailbox_map) is not None

    def selected_elsewhere(self, mailbox: bytes) -> bool:
        """The selected *mailbox* lives on another backend now than the one it is selected on: a move
        took it (and may have ended, its reservations gone) and the relocation watch has not yet ended
        the session (relocation.py: once a second, between commands). A STORE or EXPUNGE relayed to the
        old place changes what the move drained, never the copy at the new place."""
        host = self.host
        where = host.selected
        if where is None or not mailbox or host.user is None or host.home is None:
            return False
        return where not in self.route_of(mailbox).backends

    def append_target(self, tag: bytes, mailbox: bytes) -> bytes | Route | Held:
        """Where an APPEND to *mailbox* goes (its route, looked up once), or the answer
        refusing it before any message is read (bytes), or HELD (a move or RENAME holds it)."""
        if is_private_name(mailbox):
            return b"%s NO %s\r\n" % (tag, _RESERVED.encode())
        if self.moving(mailbox):
            return HELD
        route = self.route_of(mailbox)
        return self.referral(tag, route, mailbox) if self.refers(route, mailbox) else route

    def append_held(self, tag: bytes, mailbox: bytes) -> defer.Deferred[bytes | None]:
        """An APPEND to a mailbox held: None once the holder let go, if it was only a check or a RENAME on
        one backend (holds.py: then routed again); else the answer ``NO [INUSE]``."""
        host = self.host
        assert host.user is not None
        inuse = b"%s NO %s\r\n" % (tag, INUSE.encode())
        waiting = defer.ensureDeferred(wait_free(host.mailbox_map, host.user, [mailbox], host.ctx.reactor))
        return waiting.addCallback(lambda free: None if free else inuse)

    def _when_free(self, cmd: Command, names: tuple[bytes, ...], again: Callable[[Command], None],
                   refuse: Callable[[bytes, str], None] | None = None) -> None:
        """*cmd* met one of *names* held: *again* once they are free, if the holder was only a check
        (holds.py: reading stops meanwhile, the commands after it wait); else NO [INUSE] (by *refuse*)."""
        host = self.host
        assert host.user is not None
        host.flow.block(Block.HOLDS)

        async def free() -> bool:
            for _ in range(_RETAKEN):  # another process took a name between wait_free's look and ours: its hold
                # is waited for too (one of nine DELETEs of a placed mailbox at once was told INUSE, in CI)
                if not await wait_free(host.mailbox_map, host.user or "", names, host.ctx.reactor):
                    return False
                if not any(self.moving(n) for n in names):
                    return True
            return False

        def then(is_free: bool) -> None:
            if is_free:
                again(cmd)  # from the start: routes may have changed (a RENAME on one backend)
            else:
                (refuse or self.refuse_no)(cmd.tag, INUSE)

        def failed(f: Failure) -> None:
            log.failure("session {id}: {name} failed", f, id=host.id, name=cmd.name)
            host.tagged(cmd.tag, "NO", "[SERVERBUG] Internal proxy error")

        waiting = defer.ensureDeferred(free())
        waiting.addCallback(then).addErrback(failed).addBoth(lambda _: host.flow.unblock(Block.HOLDS))

    def target(self, cmd: Command, slot: Slot, again: Callable[[Command], None],
               refuse: Callable[[bytes, str], None] | None = None) -> tuple[bytes, Route] | None:
        """The mailbox argument and its route, or None when a move holds it (answered INUSE, or
        *again* once a check holding it lets go) or it is the proxy's own (*refuse*: how it says NO)."""
        mailbox = cmd.args.value(slot)
        assert mailbox is not None  # the grammar has it
        if cmd.name == "CREATE":
            mailbox = self.created(mailbox)
        if is_private_name(mailbox):  # the proxy's own (append.py): never a client's
            (refuse or self.refuse_no)(cmd.tag, _RESERVED)
            return None
        if self.moving(mailbox):
            if cmd.name == "STATUS" and status_during_move(self.host, cmd):
                return None  # the old name before the move's commit point, the new one after (moveview.py)
            self._when_free(cmd, (mailbox,), again, refuse)
            return None
        return mailbox, self.route_of(mailbox)

    def created(self, mailbox: bytes) -> bytes:
        """The mailbox a CREATE makes: the backend drops one trailing separator (RFC 3501 6.3.3,
        Dovecot), so ``CREATE Shared/`` makes ``Shared``, and goes where the map puts ``Shared``."""
        sep = self.host.mailbox_map.separator.encode()
        return mailbox[:-len(sep)] if len(mailbox) > len(sep) and mailbox.endswith(sep) else mailbox

    def inbox_cased(self, mailbox: bytes) -> bytes:
        """``inbox/kid`` as ``INBOX/kid``, the name a backend lists: a RENAME's own look-ups of the
        mailbox and its children (exact names and prefixes) found nothing under ``inbox/``."""
        sep = self.host.mailbox_map.separator.encode()
        head, s, tail = mailbox.partition(sep)
        return b"INBOX" + s + tail if head.upper() == b"INBOX" and head != b"INBOX" else mailbox

    def renamable(self, mailbox: bytes) -> bool:
        """Not a name every backend's RENAME, COPY and MOVE refuse (Dovecot: a separator at either
        end or two together): one that is goes to a backend to be refused, never into a move across
        (whose CREATE would drop a trailing separator and leave a mailbox its roll-back cannot name;
        a COPY across said TRYCREATE, and CREATE then COPY again would loop)."""
        sep = self.host.mailbox_map.separator.encode()
        return bool(mailbox) and not (mailbox.startswith(sep) or mailbox.endswith(sep) or sep + sep in mailbox)

    # -- by mailbox -------------------------------------------------------------------------

    def by_mailbox(self, cmd: Command) -> None:
        """CREATE, DELETE, STATUS, SUBSCRIBE ...: to the backend that owns the mailbox."""
        target = self.target(cmd, Slot.MAILBOX, self.by_mailbox)
        if target is None:
            return
        mailbox, route = target
        if cmd.name == "CREATE" and not self.host.mailbox_map.available:
            return self.refuse_no(cmd.tag, UNMADE)
        if (cmd.name == "CREATE" and self.valid_name(mailbox) and not self.host.referral_aware
                and kin_route(self.host.mailbox_map, self.host.user or "", mailbox, route) is not None):
            return self.host.run(cmd.tag, create_with_kin(self.host, cmd, mailbox, route, self.moving, INUSE))
        others = ([b for b in self.host.mailbox_map.backends_for(self.host.user or "") if b not in route.backends]
                  if cmd.name == "UNSUBSCRIBE" else [])
        if COMMANDS[cmd.name].referred and self.refers(route, mailbox):
            if others:  # the owner's is the referred server's to remove; one kept elsewhere, ours
                return self.host.run(cmd.tag, self._unsubscribe_everywhere(cmd, route, mailbox, others, refer=True))
            return self.host.refuse(self.refer(cmd, route, mailbox))
        if (cmd.name == "GETMETADATA" and (b"*" in mailbox or b"%" in mailbox)
                and len(backends := self.host.mailbox_map.backends_for(self.host.user or "")) > 1):
            return self.host.run(cmd.tag, self._metadata_of_pattern(cmd, backends))
        if others:
            return self.host.run(cmd.tag, self._unsubscribe_everywhere(cmd, route, mailbox, others))
        if cmd.name == "DELETE" and placed_itself(self.host.mailbox_map, self.host.user or "", mailbox):
            return self.host.run(cmd.tag, delete_placed(self.host, cmd, mailbox, route, INUSE))
        pool = self.host.pool
        if cmd.name == "STATUS" and route.primary != self.host.home and pool is not None and pool.fast(route.primary) is None:
            return self.host.run(cmd.tag, self._bounded_read(cmd, route))  # (else fastnames.status_line's way)
        self.host.relay_cmd(cmd, route)

    async def _bounded_read(self, cmd: Command, route: Route) -> None:
        """A STATUS on another backend whose connection is not ready (the session's first command there):
        bounded by its answer_timeout as the fast path's is (stall.py). Unbounded, a backend that took the
        login and then stalled held the client for good (probe 3, stop 48)."""
        assert self.host.pool is not None
        conn = await self.host.pool.ready_for(route)
        self.host.relay.send(conn, cmd.tag, cmd.name, cmd.args)
        if len(conn._pending) == 1:
            Watch.bounding(conn, b"STATUS", next(iter(conn._pending)))

    async def _metadata_of_pattern(self, cmd: Command, backends: list[str]) -> None:
        """Dovecot's GETMETADATA of a mailbox pattern (beyond RFC 5464), over each backend of the user: a
        mailbox's entries from its owner only (never a stray copy elsewhere, nor a private name)."""
        text, then = command_pieces("GETMETADATA", cmd.args)
        out = []
        for conn, r in await self.host.gather(backends, text, then):
            if r.start.name == "METADATA":
                try:
                    name = astring_value(parse_arguments(*r.arguments)[0])
                except (ParseError, IndexError):
                    continue
                if is_private_name(name) or self.route_of(name).primary != conn.name:
                    continue
            out.append(r.raw)
        self.host.send(b"".join(out) + b"%s OK Getmetadata completed.\r\n" % cmd.tag)

    async def _unsubscribe_everywhere(self, cmd: Command, route: Route, mailbox: bytes, others: list[str],
                                      refer: bool = False) -> None:
        """A subscription stays on the backend that took it when its name's route changes (LSUB shows it
        from there: listing.merge): removed from each of the user's backends, the owner's answer the client's
        (*refer*: the referral, the owner's subscription the referred server's to remove; else none could)."""
        pool = self.host.pool
        assert pool is not None
        for name in others:
            try:
                conn = await pool.connection(name)
                await pool.quiet(None)
                await pool.prepare(conn)  # (UTF8=ACCEPT replayed: the name as the client wrote it)
                await conn.command(b"UNSUBSCRIBE " + astring(mailbox), bounded=True)
            except BackendError as e:  # a backend down keeps it: shown again once it is back
                log.warn("UNSUBSCRIBE {box} on {b}: {why}", box=mailbox, b=name, why=str(e))
        if refer:  # after every answer before it (a backend that failed above was never waited for)
            await pool.quiet(None)
            return self.host.refuse(self.refer(cmd, route, mailbox))
        conn = await pool.ready_for(route)
        self.host.relay.send(conn, cmd.tag, cmd.name, cmd.args)

    def change(self, cmd: Command) -> None:
        """STORE, EXPUNGE, UID EXPUNGE: relayed where the mailbox is selected; NO [INUSE] while a move
        to another server holds it, since what they changed in the copy being moved would be lost at
        its new place (flags) or come back there (an expunged message). CLOSE too (close below)."""
        host = self.host
        assert host.home is not None
        if self.selected_held():
            return self.refuse_no(cmd.tag, INUSE)
        host.relay_cmd(cmd, host.selected or host.home)

    def rename(self, cmd: Command) -> None:
        """RENAME on one backend is relayed (placements follow); across backends the proxy moves it."""
        host = self.host
        old, new = cmd.args.value(Slot.MAILBOX), cmd.args.value(Slot.DEST)
        assert old is not None and new is not None and host.user is not None
        old, new = self.inbox_cased(old), self.inbox_cased(new)
        if is_private_name(old) or is_private_name(new):
            return self.refuse_no(cmd.tag, _RESERVED)
        if not host.mailbox_map.available:
            return self.refuse_no(cmd.tag, UNMADE)
        if under_itself(old.decode("utf-8", "surrogateescape"), new.decode("utf-8", "surrogateescape"),
                        host.mailbox_map.separator):
            return self.refuse_no(cmd.tag, UNDER_ITSELF)  # as Dovecot, whichever backends own the names
        if self.moving(old) or self.moving(new):  # before any referral: the client would rename it under the move
            return self._when_free(cmd, (old, new), self.rename)
        old_route, new_route = self.route_of(old), self.route_of(new)
        rules = None  # into a mailbox a move placed on another backend than the rules say: with it (creating.py)
        if not host.referral_aware and self.valid_name(new) and (
                kin := rename_kin(host.mailbox_map, host.user, old, new, old_route, new_route)) is not None:
            rules, new_route = new_route, kin
        if host.referral_aware and (self.refers(old_route, old) or self.refers(new_route, new)):
            urls = self._rename_pair(old, new, old_route, new_route)
            if urls is not None:
                return host.refuse(referrals.referral(cmd.tag, urls))
        if old_route.primary != new_route.primary and not (self.renamable(old) and self.renamable(new)):
            return host.relay_cmd(cmd, old_route)  # refused there, as directly (the old name checked first)
        if old_route.primary != new_route.primary and not (self.valid_name(old) and self.valid_name(new)):
            # Never moved across: the backend of the name that is not a valid one refuses it, as directly.
            return host.relay_cmd(cmd, old_route if not self.valid_name(old) else new_route)
        if old_route.primary != new_route.primary:
            return host.run(cmd.tag, host.ctx.observer.transfer(
                host, "rename", self._rename_across(cmd, old, new, old_route, new_route, rules),
                src=old_route.primary, dst=new_route.primary, mailbox=old, to=new))
        host.run(cmd.tag, self._rename_here(cmd, old, new, old_route, rules))

    async def _rename_here(self, cmd: Command, old: bytes, new: bytes, route: Route, rules: Route | None) -> None:
        """RENAME on one backend: localrename.rename_here holds both names meanwhile and lets placements follow."""
        host = self.host
        assert host.pool is not None
        await self._not_shadowing(rules, new)
        conn = await host.pool.connection(route)
        await host.pool.quiet(None)
        # after the MOVEs out of it (or a child) under way (Dovecot's MOVE, renamed between its copy and
        # its expunge, leaves the message in both), before those sent next (they find it gone): crossturns.py
        # ... and after the APPENDs to them under way (Dovecot answers one NO and keeps it: appendturns.py)
        text = old.decode("utf-8", "surrogateescape")
        try:
            children = await subtree(conn, text, host.mailbox_map.separator)
        except TransferError:
            children = []  # the backend refuses the name: its answer to the RENAME says why
        try:
            turn = mover_turn(host.ctx, host.user or "")
            release = await turn.renaming(conn.name, [text, *children])
        except defer.TimeoutError:  # an APPEND's client stopped mid-literal: not waited for for ever
            raise Refusing(APPENDING) from None
        try:
            outcome = await rename_here(host.mailbox_map, host.user or "", conn, text,
                                        new.decode("utf-8", "surrogateescape"), others=host.pool.fresh,
                                        clock=host.ctx.reactor, quiet=lambda: turn.quiet(conn.name, conn))
        finally:
            release()
        for raw in outcome.untagged:
            host.write_from(conn, raw)
        host.answer(cmd.tag, outcome.completion)

    async def _not_shadowing(self, rules: Route | None, new: bytes) -> None:
        """A RENAME's new name taken to its parent's backend: not one already where the rules send it."""
        if rules is not None and self.host.pool is not None and await exists(await self.host.pool.ready_for(rules),
                                                                              new.decode("utf-8", "surrogateescape")):
            raise Refusing("NO [ALREADYEXISTS] Mailbox already exists")

    def _rename_pair(self, old: bytes, new: bytes, old_route: Route, new_route: Route) -> list[str] | None:
        """RFC 2193 4.3: the pair of urls (where the mailbox is, where it would go), or None when
        either name cannot be referred (invalid, or only the proxy holds it): then it is proxied."""
        host = self.host
        assert host.user is not None
        if not (self.valid_name(old) and self.valid_name(new)):
            return None
        try:
            user = self._url_user()
            old_urls = referrals.mailbox_urls(host.config, old_route, user, old)
            new_urls = referrals.mailbox_urls(host.config, new_route, user, new)
        except (ValueError, KeyError):
            return None
        if not old_urls or not new_urls:
            return None
        return [old_urls[0], new_urls[0]]

    async def _rename_across(self, cmd: Command, old: bytes, new: bytes, old_route: Route,
                             new_route: Route, rules: Route | None = None) -> MoveResult:
        """RENAME to a name another backend owns: the journaled move of mover.Mover. *rules*: where the rules
        send *new*, its parent's backend taken instead; one there already is not shadowed (ALREADYEXISTS)."""
        host = self.host
        assert host.user is not None and host.pool is not None
        await host.pool.quiet(None)
        sep = host.mailbox_map.separator
        text = old.decode("utf-8", "surrogateescape")  # "inbox/sub" is INBOX/sub, selected in any case
        self.hurry = Hurry(host.ctx.reactor)  # a stop or an ending session answers it at once past its commit
        mover = Mover(host.mailbox_map, host.pool.fresh, host.user, clock=host.ctx.reactor,
                      answer_within=ANSWER_WITHIN, answer_clock=self.hurry, turn=mover_turn(host.ctx, host.user),
                      seen_by_others=seen_within(host.ctx.config.proxy.workers, host.mailbox_map.store,
                                                 host.ctx.config.map.store))
        try:
            await self._not_shadowing(rules, new)
            await refused_before(mover, text, new.decode("utf-8", "surrogateescape"), old_route.primary,
                                 new_route.primary)  # a RENAME its checks refuse holds no name (BYEs no session)
            # ... and is refused for what Dovecot refuses it (ALREADYEXISTS ...) before it is for the
            # mailbox selected (Dovecot renames a selected mailbox; a move across would BYE this session)
            if host.selected_mailbox is not None and under_itself(text, host.selected_mailbox.decode(
                    "utf-8", "surrogateescape") + sep + "x", sep):  # it, or one under it
                raise Refusing("NO [INUSE] Close (or unselect) the mailbox before moving it to another server")
            result = await mover.rename(text, new.decode("utf-8", "surrogateescape"),
                                        old_route.primary, new_route.primary)
        except MoveIncomplete as e:  # past its commit point: the mailbox is in its new place
            log.warn("session {id}: RENAME committed, not finished: {why}", id=host.id, why=str(e))
            result = e.result or MoveResult(pending=True)
        except TransferError as e:
            text = str(e)
            raise Refusing(text if text.startswith(("NO ", "BAD ")) else "NO " + text) from None
        finally:
            self.hurry = None
        host.tagged(cmd.tag, "OK", f"Rename completed ({result.mailboxes} mailbox(es), "
                                   f"{result.messages} message(s) moved to another server"
                                   f"{'; the old mailbox is still being emptied' if result.pending else ''}).")
        return result
