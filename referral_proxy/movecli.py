"""``referral-proxy move`` and ``referral-proxy recover``: mailbox moves run by an administrator.

Both log in to the backends with each backend's master user (``master_user`` /
``master_password``) acting as the mail user: the proxy never keeps users'
passwords, and a move must be finishable after a crash. Warnings and errors of
the move are logged to stderr.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from .appendturns import mover_turn
from .backend import BackendError
from .config import Config, ConfigError, load_config
from .crossturns import Standalone
from .imap.command import ParseError
from .imap.data import parse_status
from .journal import StoreUnavailable, owner_gone
from .mailops import TransferError, exists, name_arg, status
from .mover import Connect, MoveIncomplete, Mover
from .oldhome import carry_old_homes
from .openstore import open_store
from .recovery import SWEEP_SECONDS, describe, master_connector, recover_all
from .relocation import seen_by_another_process
from .routing import OLD_HOME_WATCH, MailboxMap, StepHook, normalize
from .transfer import Progress

__all__ = ["run_move", "run_recover"]

log = Logger()


class _Unbroken:
    """A stream whose reader went away (``move ... | true``, a wrapper that died) takes writes and drops
    them: a progress line raising BrokenPipeError made the move fail midway, and the report of that
    failure raised again before reactor.stop(): the command never exited (probe 8, stop 48)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _run(main: Callable[[Any], Any]) -> int:
    """Run ``await main(reactor) -> exit status`` on the reactor, and return the status."""
    from twisted.internet import reactor

    status = [1]
    # A user's or mailbox's name from the command line that is not UTF-8 (a Latin-1 login name: its bytes
    # surrogateescaped in sys.argv) is printed back as the same bytes. A UTF-8 terminal's strict stdout
    # raised at the first print naming it: `move` and `recover` said they failed (exit 1) after their work
    # was done, and `map show` showed nothing.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    sys.stdout, sys.stderr = _Unbroken(sys.stdout), _Unbroken(sys.stderr)  # type: ignore[assignment]
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
                                     redirectStandardIO=False)

    finished = [False]

    def start() -> None:
        d = defer.ensureDeferred(main(reactor))

        def done(result: object) -> None:
            finished[0] = True
            if isinstance(result, Failure):
                sys.stderr.write(f"referral-proxy: {result.getErrorMessage()}\n")
            else:
                status[0] = int(result or 0)
            if reactor.running:  # (Ctrl-C stopped it already: ReactorNotRunning)
                reactor.stop()

        d.addBoth(done)

    def interrupted() -> None:
        """Ctrl-C (SIGINT, SIGTERM) before the command finished: exit 1 said in words (probe r2: silent)."""
        if not finished[0]:
            sys.stderr.write("\nreferral-proxy: interrupted before it finished; a move under way is left in the "
                             "map's journal: `referral-proxy recover` (or a running proxy, once the move's lease "
                             "ends) finishes or undoes it\n")

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]


def missing_store(spec: str) -> str | None:
    """Why an admin command must not run on *spec*: an SQLite map file that is not there is no running
    proxy's (a copy of the config elsewhere, a relative path: `move` moved the mail and wrote where it
    went into a new, empty file no proxy reads, and the user's mailbox was gone; probe 3, stop 48)."""
    if not spec.startswith("sqlite:") or spec == "sqlite::memory:" or os.path.exists(spec.partition(":")[2]):
        return None
    return (f"the map store {spec.partition(':')[2]} does not exist: no proxy uses it (is this the running "
            "proxy's configuration file, where its relative paths start?); nothing done. A new map is made by "
            "starting the proxy, or `referral-proxy map --config FILE migrate`")


def _load(path: str, on_step: StepHook | None) -> tuple[Config, MailboxMap] | None:
    try:
        config = load_config(path)
    except ConfigError as e:
        sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
        return None
    if config.map.store is None:
        sys.stderr.write("referral-proxy: [map].store is not set: moves need a journal\n")
        return None
    if (why := missing_store(config.map.store)) is not None:
        sys.stderr.write(f"referral-proxy: {why}\n")
        return None
    mailbox_map = MailboxMap(config.map, open_store(config.map.store, lease_seconds=config.map.lease_seconds),
                             on_step=on_step)
    try:
        mailbox_map.start()
    except Exception as e:  # the store unreachable, or its schema missing: one line
        sys.stderr.write(f"referral-proxy: {e}\n")
        return None
    return config, mailbox_map


def run_recover(args: argparse.Namespace, *, on_step: StepHook | None = None) -> int:
    loaded = _load(args.move_config, on_step)
    if loaded is None:
        return 2
    config, mailbox_map = loaded

    async def main(reactor: Any) -> int:
        mailbox_map.start_leases(reactor, config.map.lease_seconds / 4)  # what it takes over stays its own
        def connector(user: str) -> Connect:
            return master_connector(reactor, config, user)

        turns = Standalone.of(mailbox_map, config.map.store, reactor)
        lines = await recover_all(mailbox_map, connector, reactor, turns)
        lines += await carry_old_homes(mailbox_map, connector, reactor, turns)  # mail that reached an old INBOX since
        for line in lines:
            print(line, flush=True)
        left = await mailbox_map.entries()
        await mailbox_map.close()
        if not lines and not left:
            print("nothing to recover")
        elif left:
            print(f"{len(left)} entr{'y' if len(left) == 1 else 'ies'} left in the journal (running elsewhere, or "
                  "not recovered):")
            for e in left:  # (probe t5: an owner alive that gave its move up holds it until its lease runs out;
                # probe j1 F2: mostly it is a live proxy recovering it, which the old text did not say)
                held = f"held by {e.owner}" + (
                    " (no longer running: the next recovery takes it)" if owner_gone(e.owner)
                    else " (running)" if e.lease_expired is None else  # (no leases: SQLite)
                    f", a live process: it finishes the entry, or its lease lapses {config.map.lease_seconds:g} s"
                    " after its last renewal and the next recovery takes it")
                print(f"  {describe(e)}: " + (held if e.owner else "nobody's: the sweep retries it"))
        return 1 if any("NOT recovered" in line for line in lines) else 0

    return _run(main)


class ProgressBar:
    """Messages and bytes, rate and ETA on one line (a tty) or every few seconds (a log)."""

    def __init__(self, total_messages: int, total_bytes: int, out: TextIO | None = None) -> None:
        out = out if out is not None else sys.stderr  # (looked up now: _run's, which a closed pipe does not break)
        self.total_messages, self.total_bytes, self.out = total_messages, total_bytes, out
        self.start = time.monotonic()
        self._last = 0.0
        self.tty = out.isatty()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        # mail delivered to a source during the move is carried too: the totals grow with it ("157/76", ETA -2 s)
        self.total_messages, self.total_bytes = max(self.total_messages, p.messages), max(self.total_bytes, p.bytes)
        if p.messages != self.total_messages and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-6)
        rate = p.bytes / elapsed
        left = (self.total_bytes - p.bytes) / rate if rate > 0 else 0
        share = p.bytes / self.total_bytes if self.total_bytes else 1.0
        bar = "#" * int(share * 30)
        line = (f"[{bar:<30}] {p.messages}/{self.total_messages} messages, {p.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
                f"{rate / 1e6:.1f} MB/s, ETA {left:.0f}s")
        self.out.write(("\r" + line) if self.tty else (line + "\n"))
        self.out.flush()


def unnamable(name: str, separator: str) -> str | None:
    """Why no mailbox has *name* (Dovecot refuses it or strips it to another name: "Projects/" routed as
    another name, probe v1 of stop 52), or None."""
    levels = name.split(separator)
    if "" in levels:
        return "begins or ends with the separator, or has it twice" if len(levels) > 1 else "is empty"
    if any(level in (".", "..") for level in levels) or name.startswith("~"):
        return "has a '.' or '..' level or begins with '~'"
    return None


def master_login(user: str, master_separator: str) -> str | None:
    """Why *user* names no user (a master user's login form, ``alice*admin``: routed as alice, so a placement
    for it would be no one's; probe e3 of stop 56), or None."""
    if master_separator and master_separator in user:
        return (f"is a master user's login (master_user_separator {master_separator!r}), not a user: "
                f"name the user, {user.partition(master_separator)[0]!r}")
    return None


BUSY_RETRY = 0.2  # seconds between tries while a client's RENAME across or another move holds a name (--wait)

def run_move(args: argparse.Namespace, *, on_step: StepHook | None = None) -> int:
    loaded = _load(args.move_config, on_step)
    if loaded is None:
        return 2
    config, mailbox_map = loaded
    if args.backend not in config.backends:
        sys.stderr.write(f"referral-proxy: move: unknown backend {args.backend!r}\n")
        return 2
    user = mailbox_map.canonical(args.user)
    if (why := master_login(user, config.map.master_user_separator)) is not None:
        sys.stderr.write(f"referral-proxy: move: {args.user!r} {why}\n")
        return 2
    if args.mailbox != "*" and (why := unnamable(args.mailbox, mailbox_map.separator)):
        sys.stderr.write(f"referral-proxy: move: {args.mailbox!r} {why}: no mailbox is named so\n")
        return 2

    async def main(reactor: Any) -> int:
        mailbox_map.start_leases(reactor, config.map.lease_seconds / 4)
        try:
            return await _move(reactor)
        finally:
            await mailbox_map.close()

    async def _move(reactor: Any) -> int:
        connect = master_connector(reactor, config, user)
        busy_until = time.monotonic() + args.wait
        while True:
            # "*" moves a whole user: every mailbox of the user's home backend, INBOX first. Looked up at each
            # try: a move that held the name may have taken it elsewhere (Mover.rename checks it once held)
            src_name = mailbox_map.lookup(user, "INBOX" if args.mailbox == "*" else args.mailbox).primary
            if src_name == args.backend:
                return await _there_already(connect, src_name)
            mover = Mover(mailbox_map, connect, user, clock=reactor,
                          turn=mover_turn(Standalone.of(mailbox_map, config.map.store, reactor), user),
                          seen_by_others=seen_by_another_process(mailbox_map.store))
            try:
                totals = await _totals(connect, src_name, mover, args.mailbox)
                mover.progress.on_message = ProgressBar(*totals)
                started = time.monotonic()
                result = await mover.rename(args.mailbox, args.mailbox, src_name, args.backend)
                break
            except TransferError as e:  # a name held by a client's RENAME across or another move: begun, nothing
                if not str(e).startswith("[INUSE]") or mover.left_to_recovery or time.monotonic() > busy_until:
                    return await _failed(mailbox_map, mover, e)  # (probe t1: a user's RENAMEs starved every try)
                await task.deferLater(reactor, BUSY_RETRY, lambda: None)
            except BaseException as e:
                return await _failed(mailbox_map, mover, e)
        await _count(mailbox_map, "ok", result.bytes)
        elapsed = time.monotonic() - started
        sys.stderr.write("\n")
        print(f"moved {user} {args.mailbox} from {src_name} to {args.backend}: {result.mailboxes} mailbox(es), "
              f"{result.messages} message(s), {result.bytes / 1e6:.1f} MB in {elapsed:.1f}s "
              f"({result.bytes / 1e6 / max(elapsed, 1e-6):.1f} MB/s)")
        if args.mailbox == "*":
            print(f"{user}'s home is now {args.backend}; mailboxes created from now on follow the "
                  f"rules: point {user}'s rule (or the default) at {args.backend} too, and deliver "
                  f"{user}'s mail there")
        if normalize(args.mailbox, mailbox_map.separator) in ("*", "INBOX"):
            print(f"mail still delivered to {user}'s INBOX on {src_name} is carried to {args.backend} for "
                  f"{OLD_HOME_WATCH // 3600} h (by every running proxy, within {SWEEP_SECONDS:.0f} s, and by `recover`)")
        return 0

    async def _there_already(connect: Connect, src_name: str) -> int:
        """The map puts the mailbox on the destination already: 0 if it is there (nothing to carry), else 1."""
        if args.mailbox != "*":  # there, or nowhere (probe 3, stop 48: "already there" of a mailbox none has)
            conn = await connect(src_name)
            try:
                there = await exists(conn, args.mailbox)
            finally:
                conn.logout()
            if not there:
                sys.stderr.write(f"referral-proxy: move: [NONEXISTENT] {user} has no mailbox {args.mailbox} "
                                 f"on {src_name}, where the map puts it\n")
                return 1
        print(f"{user} {args.mailbox} is on {args.backend} already")
        if args.mailbox == "*" and await _stranded(connect, [b for b in config.backends if b != src_name], user,
                                                     src_name):
            return 1  # what the operator meant (the user's mail on that backend) is not so
        return 0  # nothing to carry: not a transfer, not counted

    return _run(main)


async def _failed(mailbox_map: MailboxMap, mover: Mover, e: BaseException) -> int:
    """The move's failure, said and counted: 1 (anything unforeseen is raised, said by _run)."""
    if isinstance(e, MoveIncomplete):
        await _count(mailbox_map, "ok", mover.progress.bytes)  # committed: the mail is in its new place
        sys.stderr.write(f"\nreferral-proxy: move committed but not finished: {e}\n"
                         "run `referral-proxy recover` (or a running proxy will) to finish it\n")
        return 1
    await _count(mailbox_map, "failed", 0)
    if isinstance(e, (TransferError, BackendError)):
        if mover.left_to_recovery:
            sys.stderr.write(f"\nreferral-proxy: move failed: {e}; its roll-back failed too and is left to "
                             "`referral-proxy recover` (or a running proxy): the source is untouched\n")
        else:
            sys.stderr.write(f"\nreferral-proxy: move failed, nothing changed: {e}\n")
        return 1
    if isinstance(e, StoreUnavailable):  # stopped or hung mid-move: its journal entry says how far it went
        sys.stderr.write(f"\nreferral-proxy: move stopped, the map store failed: {e}\nrun `referral-proxy "
                         "recover` (or a running proxy will) once the map store is back: it finishes or undoes "
                         "the move\n")
        return 1
    raise e  # anything else (the store lost mid-move...): said by _run


async def _count(mailbox_map: MailboxMap, result: str, nbytes: int) -> None:
    """Count the move (kind ``admin_move``) in the map store, where every proxy's /metrics reads it.

    Never raises: the move's outcome stands whether or not it could be counted (the store away)."""
    try:
        await mailbox_map.store.count_transfer("admin_move", result, nbytes)
    except Exception as e:
        log.warn("the move ({result}) could not be counted in the map store's admin_move metrics: {why}",
                 result=result, why=str(e) or type(e).__name__)


async def _stranded(connect: Connect, others: list[str], user: str, home: str) -> bool:
    """Say which other backends' INBOX of *user* holds mail the map no longer routes to (probe r2: a rule pointed
    at *home* before the mail was moved, then `move USER '*' home` said "already" and nothing more); True if any."""
    found = False
    for name in others:
        try:
            conn = await connect(name)
        except BackendError:
            continue  # (no master_user there, or away: nothing known)
        try:
            held = (await status(conn, "INBOX")).messages
        except (BackendError, TransferError):
            held = 0
        finally:
            conn.logout()
        if held:
            sys.stderr.write(f"referral-proxy: move: note: {user}'s INBOX on {name} holds {held} message(s), which no "
                             f"client reaches while the map routes INBOX to {home} (a rule changed before the mail "
                             f"was moved?): point the rule back at {name}, move, then change the rule\n")
            found = True
    return found


async def _totals(connect: Connect, src_name: str, mover: Mover, mailbox: str) -> tuple[int, int]:
    """Messages and bytes the move will carry (for the progress bar)."""
    conn = await connect(src_name)
    try:
        messages = size = 0
        items = b" (MESSAGES SIZE)" if "STATUS=SIZE" in conn.capabilities else b" (MESSAGES)"
        for old, _new in await mover.plan(conn, mailbox, mailbox):
            result = await conn.command(b"STATUS " + name_arg(old) + items)
            for r in result.responses:
                if r.start.name == "STATUS":
                    try:
                        values = parse_status(*r.arguments).values
                    except ParseError:
                        continue
                    messages += values.get(b"MESSAGES", 0)
                    size += values.get(b"SIZE", 0)
        return messages, size
    finally:
        conn.logout()
