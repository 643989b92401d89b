"""``referral-proxy move`` and ``referral-proxy recover``: mailbox moves run by an administrator.

Both log in to the backends with each backend's master user (``master_user`` /
``master_password``) acting as the mail user: the proxy never keeps users'
passwords, and a move must be finishable after a crash.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .backend import BackendError, BackendProtocol, Credentials, connect_backend
from .config import Config, ConfigError, load_config
from .routing import MailboxMap, open_store
from .transfer import Mover, Progress, TransferError

__all__ = ["run_move", "run_recover", "recover_all", "master_connector"]

log = Logger()


class NoMasterUser(BackendError):
    pass


def master_connector(reactor: Any, config: Config, user: str):
    """connect(backend name) -> a new connection logged in as *user* through the master user."""
    async def connect(name: str) -> BackendProtocol:
        cfg = config.backends[name]
        if cfg.master_user is None or cfg.master_password is None:
            raise NoMasterUser(f"backend {name} has no master_user: an administrator's move needs one")
        return await connect_backend(reactor, cfg, Credentials(cfg.master_user, cfg.master_password, authzid=user))
    return connect


async def recover_all(reactor: Any, config: Config, mailbox_map: MailboxMap) -> list[str]:
    """Finish or roll back every journaled move; one line per entry."""
    lines = []
    for entry in mailbox_map.store.journal():
        mover = Mover(mailbox_map, master_connector(reactor, config, entry.user), entry.user)
        pairs = ", ".join(f"{o} -> {n}" for o, n in entry.data.get("pairs", []))
        try:
            outcome = await mover.recover(entry)
            lines.append(f"{entry.user}: {pairs} ({entry.data['src']} -> {entry.data['dst']}, at {entry.step}): {outcome}")
        except BackendError as e:
            lines.append(f"{entry.user}: {pairs} (at {entry.step}): NOT recovered: {e}")
    return lines


def _run(main) -> int:
    """Run ``await main(reactor) -> exit status`` on the reactor, and return the status."""
    from twisted.internet import reactor

    status = [1]

    def start() -> None:
        d = defer.ensureDeferred(main(reactor))

        def done(result: object) -> None:
            if isinstance(result, Failure):
                sys.stderr.write(f"referral-proxy: {result.getErrorMessage()}\n")
            else:
                status[0] = int(result or 0)
            reactor.stop()

        d.addBoth(done)

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]


def _load(path: str) -> tuple[Config, MailboxMap] | None:
    try:
        config = load_config(path)
    except ConfigError as e:
        sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
        return None
    if config.map.store is None:
        sys.stderr.write("referral-proxy: [map].store is not set: moves need a journal\n")
        return None
    return config, MailboxMap(config.map, open_store(config.map.store))


def run_recover(args: argparse.Namespace) -> int:
    loaded = _load(args.move_config)
    if loaded is None:
        return 2
    config, mailbox_map = loaded

    async def main(reactor: Any) -> int:
        lines = await recover_all(reactor, config, mailbox_map)
        for line in lines:
            print(line, flush=True)
        if not lines:
            print("nothing to recover")
        return 1 if any("NOT recovered" in line for line in lines) else 0

    return _run(main)


class ProgressBar:
    """Messages and bytes, rate and ETA on one line (a tty) or every few seconds (a log)."""

    def __init__(self, total_messages: int, total_bytes: int, out: TextIO = sys.stderr) -> None:
        self.total_messages, self.total_bytes, self.out = total_messages, total_bytes, out
        self.start = time.monotonic()
        self._last = 0.0
        self.tty = out.isatty()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
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


def run_move(args: argparse.Namespace) -> int:
    loaded = _load(args.move_config)
    if loaded is None:
        return 2
    config, mailbox_map = loaded
    if args.backend not in config.backends:
        sys.stderr.write(f"referral-proxy: move: unknown backend {args.backend!r}\n")
        return 2

    async def main(reactor: Any) -> int:
        connect = master_connector(reactor, config, args.user)
        # "*" moves a whole user: every mailbox of the user's home backend, INBOX first.
        src_name = mailbox_map.lookup(args.user, "INBOX" if args.mailbox == "*" else args.mailbox).primary
        if src_name == args.backend:
            print(f"{args.user} {args.mailbox} is on {args.backend} already")
            return 0
        mover = Mover(mailbox_map, connect, args.user)
        try:
            totals = await _totals(connect, src_name, mover, args.mailbox)
            mover.progress.on_message = ProgressBar(*totals)
            started = time.monotonic()
            result = await mover.rename(args.mailbox, args.mailbox, src_name, args.backend)
        except (TransferError, BackendError) as e:
            sys.stderr.write(f"\nreferral-proxy: move failed, nothing changed: {e}\n")
            return 1
        elapsed = time.monotonic() - started
        sys.stderr.write("\n")
        print(f"moved {args.user} {args.mailbox} from {src_name} to {args.backend}: {result.mailboxes} mailbox(es), "
              f"{result.messages} message(s), {result.bytes / 1e6:.1f} MB in {elapsed:.1f}s "
              f"({result.bytes / 1e6 / max(elapsed, 1e-6):.1f} MB/s)")
        if args.mailbox == "*":
            print(f"{args.user}'s home is now {args.backend}; mailboxes created from now on follow the "
                  f"rules: point {args.user}'s rule (or the default) at {args.backend} too")
        return 0

    return _run(main)


async def _totals(connect, src_name: str, mover: Mover, mailbox: str) -> tuple[int, int]:
    """Messages and bytes the move will carry (for the progress bar)."""
    conn = await connect(src_name)
    try:
        messages = size = 0
        for old, _new in await mover.plan(conn, mailbox, mailbox):
            result = await conn.command(b"STATUS " + old.encode().join([b'"', b'"']) + b" (MESSAGES SIZE)"
                                        if "STATUS=SIZE" in conn.capabilities else
                                        b"STATUS " + old.encode().join([b'"', b'"']) + b" (MESSAGES)")
            for r in result.responses:
                if r.start.name == "STATUS":
                    words = r.start.rest.replace(b"(", b" ").replace(b")", b" ").split()
                    for key, value in zip(words, words[1:]):
                        if key.upper() == b"MESSAGES":
                            messages += int(value)
                        elif key.upper() == b"SIZE":
                            size += int(value)
        return messages, size
    finally:
        conn.logout()
