#!/usr/bin/env python3
"""Randomized soak of cross-server moves: several clients, live delivery, kills; then a census.

One run (a seed): carol's mail is seeded on b1; for ``seconds`` seconds, clients of the proxy
RENAME mailboxes across backends (to names that often collide), MOVE / UID MOVE and UID COPY
single messages across backends, APPEND new ones; a deliverer APPENDs straight to b1 (as
LMTP would, falling back to INBOX when the mailbox is gone); a chaos thread SIGKILLs the
proxy (restarted at once: its start-up recovery runs) or a backend (restarted a moment
later). Then everything is stopped, ``referral-proxy recover`` runs until the journal is
empty, and every message is counted on every backend by its Message-Id:

* lost: a message some backend acknowledged (seeded, delivered, APPENDed with OK, or an OK
  COPY's copy) that is found fewer times than it must be;
* duplicated: found more times than the COPYs that may have made copies of it allow;
* unreachable: found on a backend, but not through the proxy's LIST + EXAMINE;
* proxy faults: a line of a proxy's log (or recover's) saying the proxy failed itself (a
  traceback, its own NO [SERVERBUG] to a client): a wrong answer, even with every message in place.

    python tests/soak.py --runs 20 --seed 1000 --seconds 30     # the long form
    python tests/soak.py --proxies 2 --store postgresql --admin # several proxies on one map store
    (tests/test_moves_soak.py runs a bounded form in CI)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import imaplib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from movecheck import REPO, body, census, cli, deliver_on, message_ids, quote, seed, through_proxy  # noqa: E402
from soakanswers import Answers, long_waits  # noqa: E402

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER  # noqa: E402
from referral_proxy.testing.proxyproc import ProxyProcess  # noqa: E402

USER = "carol"
RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]
TARGETS = ["Shared/A", "Shared/B", "Shared/Z", "Shared/Z/c", "Archive/A", "Archive/B", "Work", "Work/c", "Proj",
           "50% off", "Shared/50% off"]
# --odd-names: INBOX's children (renamed as inbox/..., Inbox/...), a mailbox named "*", wildcards in new names,
# parents of the rules' subtrees (a child renamed into Shared/... lives elsewhere)
ODD_TARGETS = ["inbox/Sub", "INBOX/Sub/x", "*", "Inbox/Sub/*", "Shared/*", "Shared", "Archive"]
ODD_ORIGINALS = {"INBOX/Sub": 12, "INBOX/Sub/k": 4, "*": 6}
OPTIONS = {"odd_names": False, "admin": False, "multiappend": False, "proxies": 1, "workers": 1, "capitals": False,
           "kills": True}
LOGINS = ["carol", "CAROL", "Carol"]  # --capitals: each session's login spelled one of these ways (one user)
#: Seconds a Dovecot command may wait on a lock a SIGKILLed Dovecot left (its maildir uidlist lock goes
#: stale after 120 s unchanged; seed 49164: a MOVE into b1's INBOX answered OK 121 s after b1's kill).
LOCK_STALL = 125.0
START_TIMEOUT = 90.0  # seconds a (re)started proxy may take to greet: a master and its workers under a loaded machine
# (proxies are started tied to the soak: SIGTERM when it exits, however it ends)


def proxy_config(fleet, port: int) -> dict:
    backends = {name: {"endpoint": d.endpoint, "url": d.url, "tls": "none", "master_user": MASTER_USER,
                       "master_password": MASTER_PASSWORD} for name, d in fleet.backends.items()}
    return {"proxy": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "hostname": "soak.test"},
            "backends": backends, "map": {"default": "b1", "store": "sqlite:map.sqlite3", "rules": RULES}}


class SoakProxy(ProxyProcess):
    """The proxy (the one runner of testing/proxyproc.py), with what a census needs of it."""

    def login(self, user: str) -> imaplib.IMAP4:
        m = imaplib.IMAP4("127.0.0.1", self.port, timeout=60)
        m.login(user, "secret")
        return m


@dataclass
class Ledger:
    """What the clients were told, message by message (thread-safe)."""

    must: set = field(default_factory=set)  # acknowledged by a backend
    may: set = field(default_factory=set)  # answer lost (a kill) or refused: it may exist, once
    copies_acked: collections.Counter = field(default_factory=collections.Counter)
    copies_maybe: collections.Counter = field(default_factory=collections.Counter)
    ops: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)  # what imaplib raised, by text
    history: list = field(default_factory=list)  # (time, client, what) of every RENAME, MOVE and COPY
    overlaps: list = field(default_factory=list)  # (message, start, end, lost) of MOVEs/COPYs not answered OK
    moved: list = field(default_factory=list)  # (message, start, end, client) of MOVEs answered OK
    lost_moves: list = field(default_factory=list)  # (message, source, target) of MOVEs whose answer never came
    answers: Answers = field(default_factory=Answers)  # what each COPY/MOVE/APPEND/RENAME was answered, and its wait
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.ops[f"{kind} {outcome}"] += 1

    def backend_died(self, mid: str, since: float, answered: bool = False, lost: bool = False) -> None:
        """A MOVE or COPY of *mid* that a backend kill may have overlapped: Dovecot's own MOVE/COPY
        is not crash-atomic (a maildir MOVE is a copy, then an expunge), so a second copy may exist.
        Judged at the end (:meth:`settle`): the client can see its connection drop before the
        chaos thread has written its "KILL b" line.

        *lost*: a MOVE whose answer never came (its connection cut: a proxy kill). A backend kill up
        to :data:`LOCK_STALL` seconds BEFORE it counts too: Dovecot's MOVE waits that long on a lock
        the killed Dovecot left in its destination, its file already linked there, and commits after
        its client is gone; a RENAME of its source meanwhile (Dovecot's own, or the proxy's across)
        keeps the source's copy too (seed 49164; tests/test_rename_move_stalled.py). Such a kill before
        it counts only if the census finds a copy on the killed backend (:meth:`settle`): the stall is
        on the destination's lock, on the backend the kill left it, where the late copy lands (seeds
        49164: b1's INBOX, and 53157: b1's INBOX, its source renamed within b1 and moved out and back
        by the admin meanwhile; tests/test_rename_move_stalled_within.py)."""
        with self.lock:
            self.overlaps.append((mid, since, time.monotonic() + (0.0 if answered else 1.0), lost))

    def dovecot_partial(self, mid: str, answer: list) -> None:
        """Dovecot's own NO to a same-backend COPY/MOVE whose selected source was renamed or deleted
        by another session meanwhile ("Mailbox was deleted under us") may come after the copy was
        saved: a second copy may exist (Dovecot's behaviour; the proxy relays it)."""
        if any(b"deleted under us" in a for a in answer if isinstance(a, bytes)):
            with self.lock:
                self.copies_maybe[mid] += 1

    def kept_in_doubt(self, kept: set) -> None:
        """A MOVE whose answer never came (a proxy kill) between two mailboxes a recovery named in
        *kept* (:func:`kept_in_doubt`): the MOVE across was journaled at move-appending, its copy's UIDs
        unknown, and none was found where it saved them -- it never committed, or it did and a client
        moved the copy on before recovery came. The source stays either way (movefinish: twice rather
        than ever once where two were made), so a copy moved on may be a second one (seed 55095, two
        proxies: the copy MOVEd on through the other proxy 0.2 s after the kill, 3.5 s before its
        recovery; tests/test_several_proxies_moved_on.py)."""
        with self.lock:
            for mid, src, dst in self.lost_moves:
                if (src, dst) in kept:
                    self.copies_maybe[mid] += 1

    def moved_ok(self, mid: str, since: float, client: int) -> None:
        with self.lock:
            self.moved.append((mid, since, time.monotonic(), client))

    def settle(self, where: dict | None = None) -> None:
        """Count a possible copy for each MOVE/COPY that a backend kill overlapped (one not answered
        OK: up to 1 s after its end), or for a MOVE whose answer was lost, that a kill of a backend
        where the census (*where*: message -> [(backend, mailbox)]) finds a copy preceded by up to
        :data:`LOCK_STALL` (see :meth:`backend_died`); and for two clients' MOVEs of one message at
        once, both answered OK: Dovecot's own MOVE copies, then expunges, so a same-backend MOVE that had the message in
        hand (seen: one waiting 110 s on a lock a killed Dovecot left) copies it even though the
        other MOVE took it meanwhile -- two copies, as two clients of Dovecot itself would leave."""
        with self.lock:
            for i, (mid, start, end, who) in enumerate(self.moved):
                if any(m == mid and w != who and s < end and start < e for m, s, e, w in self.moved[i + 1:]):
                    self.copies_maybe[mid] += 1
            self.moved.clear()
            kills = [(t, what.split()[1]) for t, who, what in self.history if who == -1 and what.startswith("KILL b")]
            for mid, since, ended, lost in self.overlaps:
                held = None if where is None else {b for b, _ in where.get(mid, [])}
                if any(since <= t <= ended or (lost and since - LOCK_STALL <= t < since and (held is None or b in held))
                       for t, b in kills):
                    self.copies_maybe[mid] += 1
            self.overlaps.clear()

    def tell(self, who: int, what: str) -> None:
        with self.lock:
            self.history.append((round(time.monotonic(), 3), who, what))


class Client(threading.Thread):
    """One IMAP client of the proxy doing random operations until stopped."""

    def __init__(self, k: int, ports: list[int], rng: random.Random, ledger: Ledger, stop: threading.Event,
                 pick: random.Random | None = None) -> None:
        super().__init__(daemon=True)
        self.k, self.ports, self.rng, self.ledger, self.stop_event = k, ports, rng, ledger, stop
        self.pick = pick or random.Random(k)  # which proxy each session goes to (its own: one proxy draws nothing)
        self.n = 0
        self.m: imaplib.IMAP4 | None = None

    def _conn(self) -> imaplib.IMAP4:
        if self.m is None:
            port = self.ports[0] if len(self.ports) == 1 else self.pick.choice(self.ports)
            m = imaplib.IMAP4("127.0.0.1", port, timeout=60)
            m.login(self.pick.choice(LOGINS) if OPTIONS["capitals"] else USER, "secret")
            self.ledger.tell(self.k, f"CONNECTED to the proxy on port {port}")  # whose logs tell its commands
            self.m = m
        return self.m

    def run(self) -> None:
        while not self.stop_event.is_set():
            op = self.rng.choice(["rename", "move", "move", "copy", "append", "append", "oldmove"])
            try:
                getattr(self, op)(self._conn())
            except (imaplib.IMAP4.abort, OSError, EOFError):
                self.ledger.note(op, "connection lost")
                self.m = None
                self.stop_event.wait(0.2)
            except imaplib.IMAP4.error as e:
                self.ledger.note(op, "error")
                with self.ledger.lock:
                    self.ledger.errors[str(e)[:90]] += 1
                self.m = None

    @staticmethod
    def _mailboxes(m: imaplib.IMAP4) -> list[str]:
        typ, data = m.list('""', '"*"')
        if typ != "OK":
            return []
        from referral_proxy.imap.data import parse_list
        out = []
        for item in data:
            if isinstance(item, bytes) and item:
                entry = parse_list([item], [])
                if entry.selectable:
                    out.append(entry.name.decode())
        return out

    def rename(self, m: imaplib.IMAP4) -> None:
        boxes = [b for b in self._mailboxes(m) if b != "INBOX" and not b.startswith("referral-proxy-")]
        if not boxes:
            return
        odd = OPTIONS["odd_names"]
        old, new = self.rng.choice(boxes), self.rng.choice(TARGETS + ODD_TARGETS if odd else TARGETS)
        if odd and old.startswith("INBOX/") and self.rng.random() < 0.7:
            old = self.rng.choice(["inbox", "Inbox", "iNBOX"]) + old[5:]
        self.ledger.tell(self.k, f"RENAME {old} {new}")
        try:
            typ, data = self.ledger.answers.ask("RENAME", lambda: m.rename(quote(old), quote(new)))
        except imaplib.IMAP4.abort:
            self.ledger.note("rename", "lost")
            self.ledger.tell(self.k, f"RENAME {old} {new}: lost")
            raise
        self.ledger.tell(self.k, f"RENAME {old} {new}: {typ} {data}")
        self.ledger.note("rename", typ + (" " + data[0].split(b"]")[0].decode(errors="replace") + "]"
                                          if typ != "OK" and data and data[0].startswith(b"[") else ""))

    def _pick(self, m: imaplib.IMAP4) -> tuple[str, bytes, str] | None:
        """A random message: (mailbox, its UID, its Message-Id), with the mailbox selected."""
        boxes = self._mailboxes(m)
        if not boxes:
            return None
        box = self.rng.choice(boxes)
        typ, data = m.select(quote(box))
        if typ != "OK":
            return None
        typ, data = m.uid("SEARCH", "ALL")
        uids = data[0].split() if typ == "OK" and data and data[0] else []
        if not uids:
            return None
        uid = self.rng.choice(uids)
        try:
            mid = (message_ids(m, uid.decode(), uid=True) or ["?"])[0]  # read from its file (see message_ids)
        except AssertionError:  # the FETCH refused
            mid = "?"
        return box, uid, mid

    def move(self, m: imaplib.IMAP4) -> None:
        picked = self._pick(m)
        if picked is None:
            return
        box, uid, mid = picked
        target = self.rng.choice([b for b in self._mailboxes(m) if b != box] or [box])
        m.response("COPYUID")  # (forget any earlier one)
        self.ledger.tell(self.k, f"MOVE {mid} {box} -> {target}")
        since = time.monotonic()
        typ, lost = None, False
        try:
            typ, data = self.ledger.answers.ask("MOVE", lambda: m.uid("MOVE", uid, quote(target)))
        except (imaplib.IMAP4.abort, OSError, EOFError):
            lost = True  # its answer never came
            raise
        finally:
            self.ledger.backend_died(mid, since, answered=typ == "OK", lost=lost)
            if lost:
                with self.ledger.lock:
                    self.ledger.lost_moves.append((mid, box, target))
        if typ != "OK":
            self.ledger.dovecot_partial(mid, data)
        self.ledger.note("move", typ)
        if typ == "OK":
            self.ledger.moved_ok(mid, since, self.k)
        self.ledger.tell(self.k, f"MOVE {mid} {box} -> {target}: {typ} {data}")
        m.unselect()

    def _copy(self, m: imaplib.IMAP4, uid: bytes, mid: str, target: str,
              command: str = "COPY") -> tuple[str, list, bytes | None]:
        """UID COPY of one message, the ledger told what it may have left: a copy counted when
        answered OK with COPYUID (OK without: the UID was gone, moved meanwhile: nothing copied)."""
        m.response("COPYUID")  # (forget any earlier one)
        since = time.monotonic()
        try:
            typ, data = self.ledger.answers.ask(command, lambda: m.uid("COPY", uid, quote(target)))
        except (imaplib.IMAP4.abort, OSError):
            with self.ledger.lock:
                self.ledger.copies_maybe[mid] += 1
            raise
        if typ != "OK":
            self.ledger.backend_died(mid, since)
            self.ledger.dovecot_partial(mid, data)
        copyuid = m.response("COPYUID")[1][0]  # imaplib keeps the tagged answer's code there
        if typ == "OK" and copyuid:
            with self.ledger.lock:
                self.ledger.copies_acked[mid] += 1
        return typ, data, copyuid

    def copy(self, m: imaplib.IMAP4) -> None:
        picked = self._pick(m)
        if picked is None:
            return
        box, uid, mid = picked
        target = self.rng.choice(self._mailboxes(m) or [box])
        self.ledger.tell(self.k, f"COPY {mid} {box} -> {target}")
        typ, data, copyuid = self._copy(m, uid, mid, target)
        self.ledger.tell(self.k, f"COPY {mid} {box} -> {target}: {typ} {data} {copyuid}")
        self.ledger.note("copy", typ)

    def oldmove(self, m: imaplib.IMAP4) -> None:
        """A move the RFC 3501 way (UID COPY, UID STORE \\Deleted, UID EXPUNGE), in a session that
        keeps its mailbox selected while other clients rename it."""
        picked = self._pick(m)
        if picked is None:
            return
        box, uid, mid = picked
        target = self.rng.choice([b for b in self._mailboxes(m) if b != box] or [box])
        self.ledger.tell(self.k, f"OLDMOVE {mid} {box} -> {target}")
        since = time.monotonic()
        typ, data, copyuid = self._copy(m, uid, mid, target, "OLDMOVE-COPY")
        if typ != "OK" or not copyuid:
            self.ledger.note("oldmove", f"copy {typ}")
            return
        try:
            typ, data = self.ledger.answers.ask(
                "OLDMOVE-STORE", lambda: m.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)"))
            if typ == "OK":
                typ, data = self.ledger.answers.ask("OLDMOVE-EXPUNGE", lambda: m.uid("EXPUNGE", uid))
        except (imaplib.IMAP4.abort, OSError):
            with self.ledger.lock:  # the original may be gone, or not
                self.ledger.copies_acked[mid] -= 1
                self.ledger.copies_maybe[mid] += 1
            raise
        if typ == "OK":
            with self.ledger.lock:
                self.ledger.copies_acked[mid] -= 1
            self.ledger.moved_ok(mid, since, self.k)
        self.ledger.tell(self.k, f"OLDMOVE {mid} {box} -> {target}: {typ} {data}")
        self.ledger.note("oldmove", typ)
        m.unselect()

    def append(self, m: imaplib.IMAP4) -> None:
        if OPTIONS["multiappend"]:
            return self.multiappend(m)
        self.n += 1
        mid = f"c{self.k}-{self.n}@soak"
        box = self.rng.choice(self._mailboxes(m) or ["INBOX"])
        try:
            message = body(mid, self.rng.choice([300, 3000, 30000]))
            typ, data = self.ledger.answers.ask("APPEND", lambda: m.append(quote(box), None, None, message))
        except (imaplib.IMAP4.abort, OSError):
            with self.ledger.lock:
                self.ledger.may.add(mid)
            raise
        with self.ledger.lock:
            (self.ledger.must if typ == "OK" else self.ledger.may).add(mid)
        self.ledger.note("append", typ)


    def multiappend(self, m: imaplib.IMAP4) -> None:
        """One to three messages in ONE APPEND (RFC 3502, LITERAL+), which is all or nothing: OK, every one
        must be there; NO, none may be -- unless the answer says the outcome is unknown."""
        mids = [f"c{self.k}-{self.n + j + 1}@soak" for j in range(self.rng.randint(1, 3))]
        self.n += len(mids)
        box = self.rng.choice(self._mailboxes(m) or ["INBOX"])
        parts = []
        for mid in mids:
            data = body(mid, self.rng.choice([300, 3000, 30000]))
            parts.append(b"{%d+}\r\n" % len(data) + data)
        try:
            typ, data = self.ledger.answers.ask(
                "APPEND", lambda: m._command_complete("APPEND", m._command("APPEND", quote(box), b" ".join(parts))))
        except (imaplib.IMAP4.abort, OSError):
            with self.ledger.lock:
                self.ledger.may.update(mids)
            raise
        unknown = any(b"may or may not" in d for d in data if isinstance(d, bytes))
        with self.ledger.lock:
            if typ == "OK":
                self.ledger.must.update(mids)
            elif unknown:
                self.ledger.may.update(mids)
            # else refused: none of them may exist (found, it counts as a duplicate)
        self.ledger.tell(self.k, f"APPEND {mids} -> {box}: {typ} {data}")
        self.ledger.note("multiappend", f"{typ} (outcome unknown)" if unknown else typ)


class Deliverer(threading.Thread):
    """Delivers straight to b1 (as LMTP would), to mailboxes that come and go."""

    def __init__(self, fleet, rng: random.Random, ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.fleet, self.rng, self.ledger, self.stop_event = fleet, rng, ledger, stop

    def run(self) -> None:
        n = 0
        m = None
        while not self.stop_event.is_set():
            n += 1
            mid = f"d-{n}@soak"
            try:
                if m is None:
                    m = self.fleet["b1"].client(USER)
                where = deliver_on(m, self.rng.choice(["Work", "Proj", "INBOX", "50% off", "Work/c"]), mid)
            except (imaplib.IMAP4.error, OSError, EOFError):
                with self.ledger.lock:
                    self.ledger.may.add(mid)
                m = None
                self.stop_event.wait(0.3)
                continue
            with self.ledger.lock:
                (self.ledger.must if where else self.ledger.may).add(mid)
            self.ledger.note("deliver", "OK" if where else "NO")
            # bursts: mostly a few ms apart, now and then a second of nothing
            self.stop_event.wait(self.rng.uniform(0.5, 1.0) if self.rng.random() < 0.05 else self.rng.uniform(0.0, 0.05))


class Admin(threading.Thread):
    """An administrator moving carol's mailboxes (with their children; INBOX; all of them) with
    `referral-proxy move` while the clients work; a third of the moves SIGKILLed at a random moment (the journal
    entry is left for the proxy's start-up recovery or `recover`). An admin move makes no copy:
    the census allows none for it."""

    def __init__(self, ports: list[int], config: Path, rng: random.Random, ledger: Ledger,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.ports, self.config, self.rng, self.ledger, self.stop_event = ports, config, rng, ledger, stop

    def _names(self) -> list[str]:
        try:
            port = self.ports[0] if len(self.ports) == 1 else self.rng.choice(self.ports)
            m = imaplib.IMAP4("127.0.0.1", port, timeout=60)
            m.login(USER, "secret")
            names = Client._mailboxes(m)
            m.logout()
        except (imaplib.IMAP4.error, OSError, EOFError):
            return []
        return [n for n in names if not n.startswith("referral-proxy-")]

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(0.5, 2.0)):
            names = self._names()
            if not names:
                continue
            # INBOX or the whole user too: the deliverer keeps delivering to b1, the old home then
            # (its mail is carried to the new one: oldhome.py)
            box = "*" if self.rng.random() < 0.15 else self.rng.choice(names)
            to = self.rng.choice(["b1", "b2", "b3"])
            kill_after = self.rng.uniform(0.0, 1.5) if self.rng.random() < 0.33 else None
            kill_after = kill_after if OPTIONS["kills"] else None  # (drawn all the same: the seeds' runs unchanged)
            self.ledger.tell(-2, f"ADMIN MOVE {box} -> {to}" + (f" (kill at {kill_after:.2f} s)" if kill_after else ""))
            env = dict(os.environ, PYTHONPATH=str(REPO))
            user = self.rng.choice(LOGINS) if OPTIONS["capitals"] else USER
            proc = subprocess.Popen([sys.executable, "-m", "referral_proxy", "move", "--config", str(self.config),
                                     user, box, to], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=REPO, env=env)
            try:
                out, _ = proc.communicate(timeout=kill_after if kill_after is not None else 300)
                outcome = f"rc={proc.returncode}"
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                out, _ = proc.communicate()
                outcome = "killed"
            self.ledger.note("admin move", outcome if outcome == "killed" or proc.returncode == 0 else "refused")
            self.ledger.tell(-2, f"ADMIN MOVE {box} -> {to}: {outcome} {out.strip()[-300:]!r}")


def chaos(fleet, proxies: list[ProxyProcess], rng: random.Random, ledger: Ledger, until: float,
          backends: bool) -> None:
    """Kill a proxy (one of *proxies*, or one of its workers) or a backend at random moments,
    and bring it back, until *until*.

    Runs in the caller's (main) thread: a Dovecot started from a thread that then ends would
    be sent SIGTERM (its parent-death signal follows the thread that forked it). With --no-kills: none."""
    if not OPTIONS["kills"]:  # only sessions against each other: every message's count is then exact
        time.sleep(max(0.0, until - time.monotonic()))
        return
    pick = random.Random(rng.random()) if len(proxies) > 1 or OPTIONS["workers"] > 1 else None
    while time.monotonic() + 0.5 < until:
        time.sleep(min(rng.uniform(0.5, 2.5), max(0.0, until - time.monotonic())))
        if time.monotonic() >= until:
            break
        if not backends or rng.random() < 0.6:
            i = pick.randrange(len(proxies)) if pick is not None else 0
            proxy = proxies[i]
            what = f"proxy{i}" if len(proxies) > 1 else "proxy"
            workers = _children(proxy.pid) if pick is not None and OPTIONS["workers"] > 1 else []
            if workers and pick is not None and pick.random() < 0.7:  # one worker: its master starts it again
                victim = pick.choice(workers)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
                ledger.note("kill", "worker")
                ledger.tell(-1, f"KILL {what} worker {victim}")
                continue
            proxy.kill()
            ledger.note("kill", "proxy")
            ledger.tell(-1, f"KILL {what}")
            for pid in workers:  # (they stop by themselves once their master is gone; the port must be free)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(rng.uniform(0.0, 0.5))
            proxy.start(timeout=START_TIMEOUT, tied_to_parent=True)
        else:
            name = rng.choice(["b1", "b2", "b3"])
            fleet[name].kill()
            ledger.note("kill", name)
            ledger.tell(-1, f"KILL {name}")
            time.sleep(rng.uniform(0.2, 1.0))
            fleet[name].start()


def _children(pid: int) -> list[int]:
    """The child processes of *pid* (a master's workers)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


@dataclass
class Figures:
    seed: int
    ops: collections.Counter
    lost: list
    duplicated: list
    unreachable: list
    messages: int
    recover_runs: int
    errors: collections.Counter = field(default_factory=collections.Counter)  # what imaplib raised, by text
    faults: list = field(default_factory=list)  # the proxies' and recover's lines that say the proxy failed
    answers: Answers = field(default_factory=Answers)  # the clients' commands by answer, and their waits

    def line(self) -> str:
        ops = sum(n for k, n in self.ops.items() if not k.startswith("kill"))
        kills = sum(n for k, n in self.ops.items() if k.startswith("kill"))
        return (f"seed {self.seed}: {ops} operations, {kills} kills, {self.messages} messages counted; "
                f"lost {len(self.lost)}, duplicated {len(self.duplicated)}, unreachable {len(self.unreachable)}"
                + (f", proxy faults {len(self.faults)}" if self.faults else "") + f"; {self.answers.text()}")


#: What the proxy logs when it failed rather than the mail or a backend: a wrong answer to a client.
FAULT = re.compile(r"Traceback|Unhandled|#critical|\[SERVERBUG\] (Internal proxy error|The staged)|command failed")
# (a backend's own [SERVERBUG], relayed, is Dovecot's: e.g. an APPEND into a mailbox deleted under it)


#: A recovery's words (a proxy's log, `recover`'s output) for a cross-server MOVE it left as it was, in
#: doubt (movefinish._never_committed_or_moved_on): recovery.describe's "MOVE src -> dst (b -> b)".
KEPT_IN_DOUBT = re.compile(r"MOVE (.+?) -> (.+?) \(\w+ -> \w+\), at move-appending: the destination never "
                           r"committed, or every copy was moved on before recovery")


#: recovery (movefinish._follow_rename): the move's mailbox renamed on its backend before it came, its line names the new one
FOLLOWED = re.compile(r"recovery: (.+?) on \w+ was renamed (.+?): followed")


def kept_in_doubt(workdir: Path) -> set:
    """(source, destination) of every cross-server MOVE the run's recoveries left in doubt (Ledger.kept_in_doubt),
    by the names the MOVE had (a mailbox a recovery followed to its new name: by its old one too)."""
    texts = [path.read_text(errors="replace") for path in sorted(workdir.glob("*.log"))]
    old = {new: was for text in texts for was, new in FOLLOWED.findall(text)}
    return {(old.get(src, src), old.get(dst, dst)) for text in texts for src, dst in KEPT_IN_DOUBT.findall(text)}


def faults(workdir: Path) -> list[str]:
    """The lines of the run's proxy logs (and recover's output) that say the proxy itself failed."""
    return [f"{path.name}: {line.strip()}" for path in sorted(workdir.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines() if FAULT.search(line)]


def one_run(fleet, workdir: Path, seed_: int, seconds: float, clients: int = 3, backend_kills: bool = True,
            store: str | None = None, proxies: int | None = None) -> Figures:
    """One seeded run against a running *fleet*; the caller has cleared carol's mail.

    *store*: the map store's URI (a fresh, migrated PostgreSQL database); None: SQLite in *workdir*.
    *proxies*: how many proxy processes share that store (OPTIONS["proxies"] if None), each
    with ``workers = OPTIONS["workers"]``; each client session goes to one of them at random."""
    rng = random.Random(seed_)
    n_proxies = proxies if proxies is not None else OPTIONS["proxies"]
    ports = [_free_port() for _ in range(n_proxies)]
    workdir.mkdir(parents=True, exist_ok=True)
    names = ["proxy"] if n_proxies == 1 else [f"proxy{i}" for i in range(n_proxies)]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import toml_dumps
    for name, port in zip(names, ports):
        config = proxy_config(fleet, port)
        if store is not None:
            config["map"]["store"] = store
        if OPTIONS["workers"] > 1:
            config["proxy"]["workers"] = OPTIONS["workers"]
        (workdir / f"{name}.toml").write_text(toml_dumps(config))  # (SQLite: one file, relative to workdir)
    config_path = workdir / f"{names[0]}.toml"
    ledger = Ledger()
    originals = {"Work": 60, "Work/c": 10, "Proj": 30, "50% off": 5, "INBOX": 40} | (
        ODD_ORIGINALS if OPTIONS["odd_names"] else {})
    for box, n in originals.items():
        mids = [f"o-{box}-{i}@soak" for i in range(n)]
        seed(fleet["b1"], USER, box, mids, size=rng.choice([500, 5000]))
        ledger.must.update(mids)
    procs = [SoakProxy(workdir / f"{name}.toml", host="127.0.0.1", port=port, stdout_path=workdir / f"{name}.log",
                       stderr_path=workdir / f"{name}.log") for name, port in zip(names, ports)]
    stop = threading.Event()
    actors: list[threading.Thread] = []
    try:
        for p in procs:
            p.start(timeout=START_TIMEOUT, tied_to_parent=True)
        actors = [Client(k, ports, random.Random(rng.random()), ledger, stop, random.Random(seed_ * 104729 + k))
                  for k in range(clients)]
        actors.append(Deliverer(fleet, random.Random(rng.random()), ledger, stop))
        if OPTIONS["admin"]:  # (its own generator: the seeds' runs without it are unchanged)
            actors.append(Admin(ports, config_path, random.Random(seed_ * 7919 + 1), ledger, stop))
        for a in actors:
            a.start()
        chaos(fleet, procs, random.Random(rng.random()), ledger, time.monotonic() + seconds, backend_kills)
    finally:
        stop.set()
        for a in actors:
            a.join(180)
        for d in fleet.backends.values():
            d.start()  # (a no-op for those running)
    for p in procs:
        p.stop()  # what it was still doing is left in the journal, for `recover`
    runs = 0
    while True:
        runs += 1
        done = cli("recover", "--config", str(config_path), timeout=600)
        with open(workdir / "recover.log", "a") as f:
            f.write(done.stdout + done.stderr)
        if "nothing to recover" in done.stdout or runs > 5:
            break
    quiet_backends(fleet)
    try:
        for p in procs:
            p.start(timeout=START_TIMEOUT, tied_to_parent=True)
        counts, where = census(fleet, USER)
        reaches = [through_proxy(p, USER) for p in procs]  # every proxy must reach every message
    finally:
        for p in procs:
            p.stop()
    ledger.settle(where)
    ledger.kept_in_doubt(kept_in_doubt(workdir))
    with ledger.lock:
        lost = sorted(i for i in ledger.must if counts[i] < 1 + ledger.copies_acked[i])
        duplicated = sorted(i for i, n in counts.items()
                            if (i not in ledger.must and i not in ledger.may)
                            or n > 1 + ledger.copies_acked[i] + ledger.copies_maybe[i])
        allowed = {i: 1 + ledger.copies_acked[i] + ledger.copies_maybe[i] for i in duplicated}
    # Dovecot's own: after a SIGKILLed Dovecot, its maildir index can list ONE file under two
    # UIDs ("Broken file dovecot-uidlist ... UIDs not ordered" in its log); nobody made a copy.
    files = files_on_disk(fleet, USER, duplicated)
    indexed = [i for i in duplicated if counts[i] > files[i] and files[i] <= allowed[i] and i in ledger.must | ledger.may]
    if indexed:
        ledger.note("census", "one file indexed twice by Dovecot")
        print(f"seed {seed_}: Dovecot's index shows one file more than once (not a copy): "
              f"{[(i, where.get(i), files[i]) for i in indexed[:5]]}", file=sys.stderr)
        duplicated = [i for i in duplicated if i not in indexed]
    unreachable = sorted(i for i in counts if any(r[i] != counts[i] for r in reaches))
    figures = Figures(seed_, ledger.ops, lost, duplicated, unreachable, sum(counts.values()), runs, ledger.errors,
                      faults(workdir), ledger.answers)
    for line in figures.faults[:10]:
        print(f"seed {seed_}: proxy fault: {line[:500]}", file=sys.stderr)
    for line in long_waits(ledger.history, 30.0, LOCK_STALL):
        print(f"seed {seed_}: long wait: {line}", file=sys.stderr)
    with open(workdir / "history.txt", "w") as f:  # always: a run kept for a slow or refused answer needs it too
        f.writelines(f"{t} c{k} {what}\n" for t, k, what in ledger.history)
    if lost or duplicated or unreachable:
        detail = {i: (where.get(i), ledger.copies_acked[i], ledger.copies_maybe[i], i in ledger.must)
                  for i in (lost + duplicated + unreachable)[:10]}
        print(f"seed {seed_}: details {detail}; recover: {done.stdout[-2000:]}", file=sys.stderr)
        print(f"seed {seed_}: history in {workdir / 'history.txt'}, proxy logs {names} in {workdir}, "
              f"recover's output in {workdir / 'recover.log'}", file=sys.stderr)
    return figures


def quiet_backends(fleet, timeout: float = 240.0) -> None:
    """Wait until no imap process of any backend is left: a command of a connection long gone may
    still be waiting for a lock a SIGKILLed Dovecot left (up to ~120 s, then it commits), and
    must not commit between the census and the look through the proxy (seen: a UID COPY)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(comm == "imap" for d in fleet.backends.values() for _pid, comm, _state in d._group()):
            return
        time.sleep(0.2)


def files_on_disk(fleet, user: str, ids: list[str]) -> collections.Counter:
    """How many message files (cur/ and new/ of every maildir of *user* on every backend) hold each of *ids*."""
    wanted = {f"<{i}>".encode(): i for i in ids}
    found: collections.Counter = collections.Counter()
    if not wanted:
        return found
    for d in fleet.backends.values():
        for path in (Path(d.mail_dir) / user).rglob("*"):
            if path.parent.name in ("cur", "new") and path.is_file():
                head = path.read_bytes()[:300]
                for key, i in wanted.items():
                    if b"Message-Id: " + key in head:
                        found[i] += 1
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1000, help="first seed; run i uses seed + i")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of random operations per run")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--no-backend-kills", action="store_true")
    parser.add_argument("--odd-names", action="store_true",
                        help="also inbox/... spelled in other cases, a mailbox named '*', wildcards in new names")
    parser.add_argument("--admin", action="store_true",
                        help="also an administrator's `referral-proxy move` of a mailbox or the whole user, some killed")
    parser.add_argument("--multiappend", action="store_true",
                        help="APPENDs of 1-3 messages in one command (RFC 3502); a refused one must leave none")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the map store: SQLite (the default) or a PostgreSQL server of the soak's own")
    parser.add_argument("--proxies", type=int, default=1,
                        help="proxy processes on the one map store, each client session to one of them at random")
    parser.add_argument("--workers", type=int, default=1, help="[proxy] workers of each proxy")
    parser.add_argument("--no-kills", action="store_true",
                        help="no kills at all (proxies, workers, backends, admin moves): concurrent sessions only")
    parser.add_argument("--capitals", action="store_true",
                        help="sessions (and admin moves) name carol as carol, CAROL or Carol at random")
    args = parser.parse_args()
    OPTIONS["odd_names"] = args.odd_names
    OPTIONS["admin"] = args.admin
    OPTIONS["multiappend"] = args.multiappend
    OPTIONS["proxies"] = args.proxies
    OPTIONS["workers"] = args.workers
    OPTIONS["capitals"] = args.capitals
    OPTIONS["kills"] = not args.no_kills
    from referral_proxy.fleet import Fleet, make_root

    root = make_root("rp-soak-")
    fleet = Fleet.start_default(root / "fleet")
    pg = None
    if args.store == "postgresql":
        from referral_proxy.pgstore import migrate
        from referral_proxy.testing.pg import PostgresServer

        pg = PostgresServer(root / "pg")
        pg.init()
        pg.start()
    totals = collections.Counter()
    answers = Answers()
    bad = 0
    try:
        for i in range(args.runs):
            fleet.reset_mail()
            store = None
            if pg is not None:
                store = pg.create_db(f"soak{i}")
                migrate(store)
            f = one_run(fleet, Path(tempfile.mkdtemp(dir=root)), args.seed + i, args.seconds, args.clients,
                        not args.no_backend_kills, store)
            print(f.line(), flush=True)
            if f.errors:  # the answers imaplib raised on (a BAD, an unexpected response): worth a look
                print("  errors: " + "; ".join(f"{n}x {text}" for text, n in f.errors.most_common(8)), flush=True)
            if f.answers.refusals:  # which refusals (of NO [INUSE]: a move's hold, a COPY's wait for one...)
                print("  refused: " + f.answers.refused(), flush=True)
            totals.update(f.ops)
            answers.update(f.answers)
            totals["lost"] += len(f.lost)
            totals["duplicated"] += len(f.duplicated)
            totals["unreachable"] += len(f.unreachable)
            totals["messages"] += f.messages
            totals["faults"] += len(f.faults)
            bad += bool(f.lost or f.duplicated or f.unreachable or f.faults)
    finally:
        fleet.stop()
        if pg is not None:
            pg.stop()
    ops = sum(n for k, n in totals.items() if " " in k and not k.startswith("kill"))
    kills = sum(n for k, n in totals.items() if k.startswith("kill"))
    print(f"{args.runs} runs, {ops} operations, {kills} kills ({', '.join(f'{k}: {n}' for k, n in sorted(totals.items()) if k.startswith('kill'))}), "
          f"{totals['messages']} messages counted: lost {totals['lost']}, duplicated {totals['duplicated']}, "
          f"unreachable {totals['unreachable']}, proxy faults {totals['faults']}; {answers.text()}")
    print("operations: " + ", ".join(f"{k} {n}" for k, n in sorted(totals.items()) if " " in k))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
