"""Recovery of journaled operations a crash (or a failure) left unfinished: start-up, a timer, ``recover``.

Each entry is claimed first (a compare-and-set of its owner in the store), and only
if the process that ran it is gone, gave it up, or (PostgreSQL) let its lease run out:
a move still running in another process is never touched, and of two recoverers
only one wins the claim. What is done with it follows journal.TABLE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from .appendturns import mover_turn
from .backend import BackendError, BackendProtocol, Credentials
from .backendlogin import connect_backend
from .config import Config
from .creating import CREATE_OP, reconcile_create
from .deleting import DELETE_OP, reconcile_delete
from .journal import TABLE, JournalEntry, Recovery, StoreUnavailable
from .localrename import reconcile_local
from .mailops import NoMasterUser
from .movefinish import finish_message_move, undo_copy
from .mover import Connect, Mover
from .oldhome import carry_old_homes
from .relocation import seen_by_another_process
from .routing import MailboxMap
from .staging import drop_staging
from .transfer import COPIES, SETTLE

__all__ = ["NoMasterUser", "master_connector", "describe", "recover_entry", "recover_all", "RecoverySweep",
           "SWEEP_SECONDS"]

log = Logger()

SWEEP_SECONDS = 30.0  # how often a running proxy looks for entries nobody is finishing


def master_connector(reactor: Any, config: Config, user: str) -> Connect:
    """connect(backend name) -> a new connection logged in as *user* through the master user."""
    async def connect(name: str) -> BackendProtocol:
        if (cfg := config.backends.get(name)) is None:  # (probe r2: said as "NOT recovered: 'b3'")
            raise NoMasterUser(f"backend {name} is not in the configuration: a move naming it cannot be recovered "
                               "until it is put back")
        if cfg.master_user is None or cfg.master_password is None:
            raise NoMasterUser(f"backend {name} has no master_user: moves and their recovery need one")
        return await connect_backend(reactor, cfg, Credentials(cfg.master_user, cfg.master_password, authzid=user))
    return connect


def describe(entry: JournalEntry) -> str:
    d = entry.data
    if entry.op == "move":
        what = f"{d.get('old')} -> {d.get('new')} ({d.get('src')} -> {d.get('dst')})"
    elif entry.op == "move-messages" and "src_mailbox" not in d:  # cut off before it read its mailboxes
        what = "MOVE across, before it sent anything"
    elif entry.op == "move-messages":
        what = f"MOVE {d.get('src_mailbox')} -> {d.get('dst_mailbox')} ({d.get('src')} -> {d.get('dst')})"
    elif entry.op == "copy-messages":
        what = f"COPY {d.get('src_mailbox')} -> {d.get('dst_mailbox')} across servers"
    elif entry.op == "staging":
        what = f"APPEND to {d.get('target')} staged in {d.get('mailbox')} on {d.get('backend')}"
    elif entry.op in (CREATE_OP, DELETE_OP):
        what = f"{entry.op.upper()} {d.get('mailbox')} on {d.get('backend')}"
    elif entry.op == "map":
        what = f"map {d.get('command')} of {d.get('mailbox')}"
    else:
        what = f"RENAME {d.get('old')} {d.get('new')} on {d.get('backend')}"
    return f"{entry.user}: {what}, at {entry.step.value if entry.step else 'an unknown step'}"


async def recover_entry(mailbox_map: MailboxMap, entry: JournalEntry, connect: Connect, clock: Any = None,
                        turns: Any = None) -> str:
    """Finish, roll back or release one claimed entry, as journal.TABLE says for its step; *turns*: the
    relayed MOVEs' (a ProxyContext, crossturns.Standalone) that a mailbox move takes (mover.Mover.turn)."""
    if entry.step is None:
        raise BackendError("written by another version of referral-proxy: not recovered")
    how, connect = TABLE[entry.step].recovery, mailbox_map.fences.guarding(connect, entry)  # (fencing.py)
    if entry.op in (CREATE_OP, DELETE_OP):  # cut off before its placement was made (creating.py) or removed
        conn = await connect(entry.data["backend"])
        try:
            return await (reconcile_create if entry.op == CREATE_OP else reconcile_delete)(mailbox_map, entry, conn)
        finally:
            conn.logout()
    if entry.op == COPIES and entry.data.get("told") == "NO" and "hashes" in entry.data:  # (transfer._told_no)
        try:
            conn = await connect(entry.data["dst"])
        except NoMasterUser as e:  # released: kept, it would hold both mailboxes from MOVEs for good
            await mailbox_map.end_move(entry)
            return f"released, its copies (if saved) left where they are: {e}"
        try:
            return await undo_copy(entry, mailbox_map, conn, clock)
        finally:
            conn.logout()
    if how is Recovery.RELEASE:
        if entry.op == COPIES and clock is not None:  # its APPEND, held by Dovecot on a lock, may still commit:
            await task.deferLater(clock, SETTLE, lambda: None)  # a MOVE begun at once would take that copy
        await mailbox_map.end_move(entry)
        if entry.op == COPIES and "hashes" in entry.data:  # its last byte went: the copies may be there (probe i1)
            return "released (a COPY never answered: any copies it saved stay where they are)"
        return "released (nothing was changed)"
    if entry.op == "move":
        # the sessions of other processes selected in a source are told BYE before the drain's EXPUNGEs: the
        # move's own process, killed, no longer says it; they look once a second (relocation.py)
        mover = Mover(mailbox_map, connect, entry.user, clock=clock, seen_by_others=seen_by_another_process(
            mailbox_map.store), turn=None if turns is None else mover_turn(turns, entry.user))
        if how is Recovery.ROLL_BACK:
            await mover.roll_back(entry)
            return "rolled back"
        await mover.finish(entry)
        return "finished"
    conns: list[BackendProtocol] = []
    try:
        if entry.op == "move-messages":
            conns = [await connect(entry.data["src"]), await connect(entry.data["dst"])]
            return await finish_message_move(entry, mailbox_map, conns[0], conns[1], clock, connect)
        if how is Recovery.DROP_STAGING:
            conns = [await connect(entry.data["backend"])]
            return await drop_staging(mailbox_map, entry, conns[0])
        conns = [await connect(entry.data["backend"])]
        return await reconcile_local(mailbox_map, entry, conns[0])
    finally:
        for conn in conns:
            conn.logout()


async def recover_all(mailbox_map: MailboxMap, connector: Callable[[str], Connect], clock: Any = None,
                      turns: Any = None) -> list[str]:
    """Every entry whose owner is gone: claimed, then recovered; one line per entry.

    *connector(user)* gives the connect function for that user's backends; *clock* lets
    recovery wait for a dead connection's last command to settle (transfer.SETTLE)."""
    lines = []
    for entry in await mailbox_map.entries():
        if not mailbox_map.abandoned(entry) or not await mailbox_map.claim(entry):
            continue  # running in a live process, or another recoverer was first
        found = describe(entry)  # the step it was found at: recovery steps the entry on as it goes
        try:
            outcome = await recover_entry(mailbox_map, entry, connector(entry.user), clock, turns)
            lines.append(f"{found}: {outcome}")
        except Exception as e:
            await mailbox_map.disown(entry)
            lines.append(f"{found}: NOT recovered: {e}")
    return lines


class RecoverySweep:
    """In a running proxy: recover at start-up, then every SWEEP_SECONDS while entries remain;
    and sweep at once when the quick check (every ``[map].recovery_check_seconds``) finds an
    entry whose owner is gone: until then the clients of the other proxies see a half-done
    move (a MOVE's copies beside their sources: every message twice)."""

    def __init__(self, reactor: Any, config: Callable[[], Config], mailbox_map: MailboxMap) -> None:
        self.reactor, self.config, self.map = reactor, config, mailbox_map
        self.turns: Any = None  # the proxy's relayed-MOVE turns (its ProxyContext), set once it is made
        self._loop = task.LoopingCall(self._sweep)
        self._loop.clock = reactor
        self._running: defer.Deferred[None] | None = None
        self._check_loop = task.LoopingCall(self._check)
        self._check_loop.clock = reactor
        self._checking = False
        mailbox_map.on_given_up = self._given_up

    def start(self) -> None:
        self._loop.start(SWEEP_SECONDS, now=True)
        self._check_loop.start(self.config().map.recovery_check_seconds, now=False)

    def stop(self) -> None:
        for loop in (self._loop, self._check_loop):
            if loop.running:
                loop.stop()

    def _check(self) -> None:
        self._check_loop.interval = self.config().map.recovery_check_seconds  # a reload's, from the next tick
        if self._running is not None or self._checking:
            return
        self._checking = True
        checked = defer.ensureDeferred(self._look())
        checked.addBoth(lambda _: setattr(self, "_checking", False))

    async def _look(self) -> None:
        """One read of the journal's owners, no backend reached: a sweep only if one is gone."""
        try:
            gone = await self.map.owners_gone()
        except StoreUnavailable:
            return  # the sweep says so (every SWEEP_SECONDS), not this check every few seconds
        except Exception:
            if self._loop.running:
                log.failure("recovery check failed")
            return
        if gone and self._loop.running:
            log.info("recovery: the owner of journal entries {ids} is gone; recovering them now",
                     ids=", ".join(map(str, gone)))
            self._sweep()

    def _given_up(self) -> None:
        """This process gave an entry up (a MOVE across whose destination mailbox was deleted under it): swept at
        the next check's time, not in 30 s, its names [INUSE] meanwhile (probe v2 of stop 52). One given up by
        a worker waits for the sweep; one that stays unowned (its recovery failed: a backend down) too."""
        if self._loop.running:
            self.reactor.callLater(self.config().map.recovery_check_seconds, self.now)

    def now(self) -> None:
        """Sweep at once, not at the next tick (a worker died: its moves have no owner now)."""
        if self._loop.running:
            self._sweep()

    def _sweep(self) -> defer.Deferred[None] | None:
        if self._running is not None:
            return None
        self._running = defer.ensureDeferred(self._recover())
        self._running.addBoth(lambda _: setattr(self, "_running", None))
        return None  # the loop never waits for (nor dies with) a slow recovery

    async def _recover(self) -> None:
        try:
            config = self.config()

            def connector(user: str) -> Connect:
                return master_connector(self.reactor, config, user)

            lines = await recover_all(self.map, connector, self.reactor, self.turns)
            lines += await carry_old_homes(self.map, connector, self.reactor, self.turns)
        except StoreUnavailable as e:
            log.warn("recovery: the map store is unreachable ({why}); trying again in {s}s", why=str(e),
                     s=SWEEP_SECONDS)
            return
        except Exception as e:
            if not self._loop.running:  # the proxy is stopping (its store closed under the recovery)
                log.info("recovery interrupted by shutdown ({why}); it goes on at the next start", why=str(e))
                return
            log.failure("recovery failed")
            return
        for line in lines:
            log.warn("recovery: {line}", line=line)
