"""What the move tests judge by: every message, by its Message-Id, counted on the backends themselves.

* ``census(fleet, user)`` -- every mailbox of *user* on every backend (LIST "*" straight
  on each Dovecot), each message's Message-Id: a Counter, and where each one is.
* ``through_proxy(proxy, user)`` -- the same as a client of the proxy sees it (its LIST,
  then EXAMINE of each mailbox): mail that the census finds but this does not is
  unreachable.
* ``seed`` / ``deliver`` -- messages with unique ids, MULTIAPPENDed or APPENDed straight
  to a backend (as LMTP would deliver them), never through the proxy.
* ``Deliverer`` -- a thread that keeps delivering to a backend mailbox, as LDA/LMTP does:
  when the mailbox is missing (TRYCREATE) it delivers to INBOX instead.
"""

from __future__ import annotations

import collections
import imaplib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from referral_proxy.fleet import Dovecot
from referral_proxy.imap.data import parse_list

_ID = re.compile(rb"Message-Id: <([^>]+)>", re.IGNORECASE)
REPO = Path(__file__).resolve().parent.parent


def body(mid: str, size: int = 600) -> bytes:
    head = b"Message-Id: <%s>\r\nSubject: %s\r\n\r\n" % (mid.encode(), mid.encode())
    return head + (b"body of %s\r\n" % mid.encode()) * max(1, (size - len(head)) // (len(mid) + 10))


def quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def seed(backend: Dovecot, user: str, mailbox: str, ids: Iterable[str], size: int = 600, create: bool = True) -> None:
    """The messages in ONE MULTIAPPEND straight to the backend (the mailbox created first)."""
    ids = list(ids)
    with backend.client(user) as m:
        if create and mailbox.upper() != "INBOX":
            m.create(quote(mailbox))
        if not ids:
            return
        parts = [b"s APPEND " + quote(mailbox).encode()]
        for i, mid in enumerate(ids):
            data = body(mid, size)
            parts.append(b' (%s) "%02d-Jan-2020 10:00:00 +0000" {%d+}\r\n' % (
                [b"\\Seen", b"", b"\\Flagged $Work"][i % 3], 1 + i % 28, len(data)) + data)
        multiappend(m, parts)


def multiappend(m: imaplib.IMAP4, parts: list[bytes]) -> None:
    """Send ``s APPEND box`` + message parts (each `` flags date {n+}\\r\\nbody``) at once; it must be OK."""
    m.send(b"".join(parts) + b"\r\n")
    while True:
        line = m.readline()
        if line.startswith(b"s "):
            assert line.startswith(b"s OK"), line
            return


def set_validity(backend: Dovecot, user: str, mailbox: str, value: int) -> None:
    """Give *mailbox* of *user* on *backend* the UIDVALIDITY *value* (doveadm, as an operator would)."""
    done = subprocess.run(["doveadm", "-c", str(backend.conf_path), "mailbox", "update", "-u", user,
                           "--uid-validity", str(value), mailbox], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def validity_of(backend: Dovecot, user: str, mailbox: str) -> int:
    with backend.client(user) as m:
        typ, data = m.status(quote(mailbox), "(UIDVALIDITY)")
    assert typ == "OK", data
    return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))


def inbox_apart(src: Dovecot, dst: Dovecot, user: str) -> None:
    """*dst*'s INBOX of *user* given a UIDVALIDITY other than *src*'s if a test made both in one second
    (INBOXes made apart have their own): a move of INBOX into one of the same is refused (validity.py)."""
    mine = validity_of(src, user, "INBOX")
    if validity_of(dst, user, "INBOX") == mine:
        set_validity(dst, user, "INBOX", mine + 1000)


def deliver(backend: Dovecot, user: str, mailbox: str, mid: str) -> str | None:
    """One message straight to the backend, as LDA would: into *mailbox*, or INBOX if it is
    missing. Where it was acknowledged, or None (refused: not delivered, may not count)."""
    with backend.client(user) as m:
        return deliver_on(m, mailbox, mid)


def deliver_on(m: imaplib.IMAP4, mailbox: str, mid: str) -> str | None:
    """deliver() on a connection of the caller's."""
    typ, data = m.append(quote(mailbox), None, None, body(mid, 300))
    if typ == "OK":
        return mailbox
    if b"TRYCREATE" in b"".join(d for d in data if isinstance(d, bytes)):
        typ, _ = m.append("INBOX", None, None, body(mid, 300))
        return "INBOX" if typ == "OK" else None
    return None


class Deliverer(threading.Thread):
    """Delivers to *mailbox* on *backend* until stopped; ``acked``: the ids Dovecot acknowledged."""

    def __init__(self, backend: Dovecot, user: str, mailbox: str, prefix: str, pause: float = 0.0,
                 burst: int = 0) -> None:
        super().__init__(daemon=True)
        self.backend, self.user, self.mailbox, self.prefix = backend, user, mailbox, prefix
        self.pause = pause
        self.burst = burst  # after this many deliveries, half a second without (as mail arrives in bursts)
        self.acked: list[str] = []
        self.refused: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        m = self.backend.client(self.user)
        i = 0
        while not self._stop_event.is_set():
            i += 1
            mid = f"{self.prefix}-{i}@live"
            try:
                where = deliver_on(m, self.mailbox, mid)
            except (imaplib.IMAP4.error, OSError):
                self.refused.append(mid)
                m = self.backend.client(self.user)
                continue
            (self.acked if where else self.refused).append(mid)
            self._stop_event.wait(0.5 if self.burst and i % self.burst == 0 else self.pause)
        m.logout()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


def _names(m: imaplib.IMAP4) -> list[str]:
    typ, data = m.list('""', '"*"')
    assert typ == "OK", data
    out = []
    for item in data:
        if not item:
            continue
        if isinstance(item, tuple):  # a name sent as a literal
            entry = parse_list([item[0].rsplit(b"{", 1)[0], b""], [item[1]])
        else:
            entry = parse_list([item], [])
        if entry.selectable:
            out.append(entry.name.decode("utf-8", "surrogateescape"))
    return out


def _ids_in(m: imaplib.IMAP4, name: str) -> list[str]:
    typ, data = m.select(quote(name), readonly=True)
    if typ != "OK":
        raise AssertionError(f"cannot EXAMINE {name!r}: {data}")
    if data == [b"0"]:
        return []
    return message_ids(m, "1:*")


HEAD_BYTES = 1024  # of each message, read for its Message-Id (the tests' messages begin with it)


def message_ids(m: imaplib.IMAP4, which: str, uid: bool = False) -> list[str]:
    """The Message-Id of each message *which* names in the selected mailbox ("?": none), read
    from its file: the first HEAD_BYTES of ``BODY[]``, not ``BODY[HEADER.FIELDS (MESSAGE-ID)]``,
    which Dovecot answers from its cache, and a SIGKILLed Dovecot can leave a cache record of
    one message on another's UID (soak seed 14707: UID 31 of Archive/B was c0-41's file while
    its cached Message-Id, MIME parts and date were c2-57's: the census found c0-41 nowhere).
    A message whose Message-Id is not in those bytes is asked for by its header field."""
    fetch = (lambda *a: m.uid("FETCH", *a)) if uid else (lambda *a: m.fetch(*a))
    typ, data = fetch(which, f"(UID BODY.PEEK[]<0.{HEAD_BYTES}>)")
    assert typ == "OK", data
    found: dict[int, str] = {}
    for item in data:
        meta, text = item if isinstance(item, tuple) else (item, b"")
        got = re.match(rb"\d+ \(.*?UID (\d+)", meta or b"")
        if got is None or b"BODY[]" not in meta:
            continue  # the ")" closing a literal, or another session's flag change
        head = text.split(b"\r\n\r\n", 1)[0]
        m_id = _ID.search(head)
        if m_id is None and b"\r\n\r\n" not in text:  # a header longer than HEAD_BYTES
            typ, more = m.uid("FETCH", got.group(1), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            m_id = _ID.search(b"".join(x[1] for x in more if isinstance(x, tuple)))
        found[int(got.group(1))] = m_id.group(1).decode() if m_id else "?"
    return [found[u] for u in sorted(found)]


def census(fleet, user: str, backends: Iterable[Dovecot] | None = None) -> tuple[collections.Counter, dict]:
    """Every message of *user* on every backend: Counter of ids, and id -> [(backend, mailbox)]."""
    counts: collections.Counter = collections.Counter()
    where: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for backend in backends or fleet.backends.values():
        unopened: list[AssertionError] = []
        seen = 0
        with backend.client(user, timeout=300) as m:  # a lock a killed process left may take minutes
            for name in _names(m):
                try:
                    found = _ids_in(m, name)
                except AssertionError as e:  # a private mailbox a killed Dovecot half deleted: nothing in it
                    if name.startswith("referral-proxy-aside-") and "deleted under us" in str(e):
                        continue
                    if "doesn't exist" not in str(e):
                        raise
                    unopened.append(e)  # listed, yet "doesn't exist": judged by the files on disk below
                    continue
                seen += len(found)
                for mid in found:
                    counts[mid] += 1
                    where[mid].append((backend.name, name))
        # A Dovecot SIGKILLed mid-RENAME/DELETE can leave its mailbox list index naming a mailbox
        # whose maildir is gone (seen: INBOX/Sub/* listed selectable, only INBOX/Sub/*/c on disk).
        # Nothing is hidden there if the user's message files on this backend are all counted above.
        if unopened and _message_files(backend, user) != seen:
            raise unopened[0]
    return counts, where


def _message_files(backend: Dovecot, user: str) -> int:
    """The message files (cur/, new/) of every maildir of *user* on *backend*."""
    return sum(1 for p in Path(backend.user_mail_dir(user)).rglob("*") if p.parent.name in ("cur", "new") and p.is_file())


def through_proxy(proxy, user: str) -> collections.Counter:
    """Every message *user* reaches through the proxy (its merged LIST, then each mailbox)."""
    counts: collections.Counter = collections.Counter()
    m = proxy.login(user)
    try:
        for name in _names(m):
            try:
                counts.update(_ids_in(m, name))
            except AssertionError as e:
                # Listed, yet "doesn't exist": Dovecot's own list index after a RENAME of a mailbox whose
                # child it could not rename (seen, soak seed 17023: ``rename(.Proj.c, .Work.c) failed:
                # Directory not empty``, then Proj listed \HasChildren, EXAMINE "doesn't exist", direct
                # too). Nothing is counted for it: mail of the census not reached is reported unreachable.
                if "doesn't exist" not in str(e):
                    raise
    finally:
        m.logout()
    return counts


def judge(counts: collections.Counter, must: Iterable[str], may: Iterable[str] = ()) -> tuple[list, list]:
    """(lost, duplicated): *must* ids have to be there exactly once, *may* ids at most once;
    anything else found is duplicated too (it should not exist)."""
    must, may = set(must), set(may)
    lost = sorted(i for i in must if counts[i] < 1)
    duplicated = sorted(i for i, n in counts.items() if n > 1 or (i not in must and i not in may))
    return lost, duplicated


def cli(*args: str, timeout: float = 120.0, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """``referral-proxy ARGS`` (or *command* + ARGS) as a child process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([*(command or [sys.executable, "-m", "referral_proxy"]), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def admin_move(proxy, *args: str) -> subprocess.Popen:
    """``referral-proxy move --config <proxy's config> ARGS`` started as a child process (not waited for)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "referral_proxy", "move", "--config", str(proxy.config_path), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def exact(fleet, proxy, user: str, must, may=()) -> tuple[collections.Counter, dict]:
    """The census: *must* once, *may* at most once, nothing else; every message reached through *proxy* once."""
    counts, where = census(fleet, user)
    lost, dup = judge(counts, must, may)
    assert (lost, dup) == ([], []), (lost[:5], len(lost), [(d, where[d]) for d in dup[:5]], len(dup))
    reached = through_proxy(proxy, user)
    unreachable = [i for i in counts if reached[i] != 1]
    assert not unreachable, [(i, where[i]) for i in unreachable[:5]]
    return counts, where


# Merged into the config of a proxy running beside a process the test kills mid-move (an admin `move`,
# `recover`): its check (recovery.py, every 2 s) would take the killed move over at once; slowed,
# the entry is left to the test's own `recover`, as it was before the check (the 30-s sweep aside).
LEFT_TO_RECOVER = {"map": {"recovery_check_seconds": 3600}}

# Merged into the config of a proxy whose test sends a COPY/MOVE that meets a MOVE across in its way
# (cut off, left to recovery) to see what is refused or left: it waits [map] move_wait_seconds (10 s by
# default) before NO [INUSE]; 1 s here (CI's time). A test of what the wait lets through keeps a long one.
QUICK_REFUSAL = {"map": {"move_wait_seconds": 1}}


def merged(*configs: dict) -> dict:
    """Proxy config fragments (MASTERS, LEFT_TO_RECOVER, QUICK_REFUSAL ...) merged table by table."""
    out: dict = {}
    for config in configs:
        for key, value in config.items():
            out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def faulty(*options: str) -> list[str]:
    """The command prefix of tests/faultproxy.py with *options* (then ``--``)."""
    return [sys.executable, str(REPO / "tests" / "faultproxy.py"), *options, "--"]


def start_paused(pause: Path, point: str, *args: str) -> subprocess.Popen:
    """``referral-proxy ARGS`` started as a child process that stops at journal step *point*
    (faultproxy.py --pause-at; DIR *pause* is made): take the stop with :func:`wait_paused`."""
    pause.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([*faulty("--pause-at", point, "--pause-dir", str(pause)), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def move_paused(proxy, pause: Path, point: str, user: str, mailbox: str, to: str) -> subprocess.Popen:
    """The admin ``move`` of *user*'s *mailbox* to *to*, stopped at journal step *point* (taken)."""
    mover = start_paused(pause, point, "move", "--config", str(proxy.config_path), user, mailbox, to)
    assert wait_paused(pause, point) == point
    return mover


def wait_paused(pause: Path, what: str) -> str:
    """Wait until a faultproxy.py --pause-at point is reached (DIR/paused), take it, say which."""
    deadline = time.monotonic() + 60
    while not (pause / "paused").exists():
        assert time.monotonic() < deadline, "the move never reached " + what
        time.sleep(0.01)
    step = (pause / "paused").read_text()
    (pause / "paused").unlink()
    return step


def journal_store(proxy):
    """*proxy*'s map store, opened as another process would (started; close it)."""
    from storehelp import REACTOR

    from referral_proxy.config import load_config
    from referral_proxy.openstore import open_store

    store = open_store(load_config(proxy.config_path).map.store, REACTOR)
    store.start()
    return store


def journal_empty(proxy) -> bool:
    """No move journal entry left in *proxy*'s map store."""
    from storehelp import now

    store = journal_store(proxy)
    try:
        return now(store.journal()) == []
    finally:
        now(store.close())


def journal_killed_move(proxy, data: dict) -> None:
    """A cross-server MOVE's entry as a proxy killed at move-appending leaves it (unowned): Work on b1
    to Shared/Dest on b3, *data* its journal data (hashes journaled: the MULTIAPPEND may have committed)."""
    from storehelp import now

    from referral_proxy.journal import Reservation, Step

    store = journal_store(proxy)
    try:
        held = [Reservation(data["src_mailbox"], False, True), Reservation(data["dst_mailbox"], False, True)]
        entry = now(store.begin_move("carol", "move-messages", held, data, None, "/"))
        now(store.journal_step(entry, Step.MOVE_APPENDING, data, None))
    finally:
        now(store.close())
