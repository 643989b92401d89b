"""Round h41 (not collected: ``python3 -m pytest -q -p no:cacheprovider tests/race_turns41.py``): a mailbox
move takes the relayed MOVE turn of each source around its drain's UID MOVE and its RENAME aside
(mover.Mover._in_turn, appendturns.mover_turn). Attacked with real Dovecot through the proxy, judged
only by a census of the backends (movecheck.census: every message exactly once) and by timings
(a move longer than SLOW seconds is a finding).

* rounds of client sessions UID MOVEing messages out of the source (relayed within b1), 0-30 ms
  apart, while the admin ``move`` takes it to b3; Proj's dovecot-uidlist.lock held now and then so
  that relayed MOVEs stay at Dovecot while the move drains (SQLite, or RP_TEST_STORE=postgresql);
* the same with a client's RENAME across (``RENAME Work-N Shared/W-N``, Shared/* on b3);
* two proxies on one PostgreSQL map: the MOVEs on one, the RENAME across on the other;
* a client that sends a relayed MOVE whose answer it never reads (its own response is large:
  flag changes another session made) while the admin moves the mailbox.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import admin_move, census, journal_empty, judge, quote, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]
SLOW = 20.0  # seconds: a move longer than this is a finding
ROUNDS = int(os.environ.get("RP_H41_ROUNDS", "20"))
TIMINGS: list[tuple[str, float]] = []


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}@t" for i in range(n)]


class Locker(threading.Thread):
    """Holds *folder*'s dovecot-uidlist.lock (naming this live process) for 0-hold s now and then:
    a relayed MOVE into it stays at Dovecot (its message hard-linked into tmp/) meanwhile."""

    def __init__(self, backend, user: str, folder: str, hold: float = 1.2, seed_: int = 0) -> None:
        super().__init__(daemon=True)
        self.path = Path(backend.user_mail_dir(user)) / folder / "dovecot-uidlist.lock"
        self.hold, self.rng = hold, random.Random(seed_)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.path.write_text(f"{os.getpid()}:{socket.gethostname()}")
            except OSError:
                pass  # the folder renamed or deleted meanwhile
            self.stop_event.wait(self.rng.uniform(0.05, self.hold))
            self.path.unlink(missing_ok=True)
            self.stop_event.wait(self.rng.uniform(0.05, 0.4))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.path.unlink(missing_ok=True)


def _mover_session(proxy, box: str, dst: str, uids: list[int], stagger: float, stop: threading.Event,
                   log: list, rng: random.Random) -> None:
    """SELECT *box*, then UID MOVE each of *uids* to *dst*, *stagger*-ish apart, until stopped or closed."""
    try:
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        if not w.cmd(b"s", b"SELECT " + quote(box).encode())[-1].startswith(b"s OK"):
            return
        for k, uid in enumerate(uids):
            if stop.is_set():
                break
            time.sleep(rng.uniform(0, stagger))
            t0 = time.monotonic()
            answer = w.cmd(b"m%d" % k, b"UID MOVE %d %s" % (uid, quote(dst).encode()))[-1]
            log.append((uid, answer[:60], round(time.monotonic() - t0, 3)))
            if any(b"BYE" in x for x in [answer]):
                break
        w.close()
    except (ConnectionError, OSError) as e:
        log.append(("closed", repr(e)[:80].encode(), 0))


def _round(proxy, fleet, r: int, box: str, how: str, rng: random.Random, mover_proxy=None, n: int = 40,
           sessions: int = 2, lock: bool = True) -> tuple[float, list, str]:
    """One round: *box* (seeded with *n*) on b1, client sessions MOVE out of it to Proj-r (b1) while it
    moves to b3 (*how*: "admin" CLI, "rename" a client's RENAME across). The census judges."""
    mail = ids(f"r{r}", n)
    dst = f"Proj-{r}"
    seed(fleet["b1"], "carol", box, mail)
    seed(fleet["b1"], "carol", dst, [])
    locker = Locker(fleet["b1"], "carol", "." + dst, seed_=r) if lock else None
    stop, log = threading.Event(), []
    uids = list(range(1, n + 1))
    rng.shuffle(uids)
    threads = [threading.Thread(target=_mover_session, daemon=True,
                                args=(proxy, box, dst, uids[i::sessions], 0.03, stop, log, random.Random(r * 7 + i)))
               for i in range(sessions)]
    if locker:
        locker.start()
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.05, 0.6))
    started = time.monotonic()
    target = "INBOX" if box.upper() == "INBOX" else (box if how == "admin" else f"Shared/W-{r}")
    if how == "admin":
        child = admin_move(mover_proxy or proxy, "carol", box, "b3")
        try:
            out, err = child.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            out += " [KILLED after 180 s]"
        outcome = f"rc={child.returncode} {out.strip()[-120:]} {err.strip()[-200:]}"
    else:
        on = mover_proxy or proxy
        w = Wire(on.host, on.port, timeout=180)
        w.login("carol")
        outcome = w.cmd(b"r", b"RENAME " + quote(box).encode() + b" " + quote(target).encode())[-1].decode().strip()
        w.close()
    took = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(120)
    if locker:
        locker.stop()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.1)
    counts, where = census(fleet, "carol")
    lost, dup = judge({k: v for k, v in counts.items() if k.startswith(f"r{r}-")}, mail)
    TIMINGS.append((f"{how} {box} r{r}", round(took, 2)))
    bad = [(i, where.get(i)) for i in lost + dup]
    return took, bad, outcome + f" moves={len(log)} no={sum(1 for x in log if b' NO' in x[1])}"


def _rounds(proxy_factory, fleet, how: str, box_of, two_proxies: bool = False, pg_dsn=None):
    rng = random.Random(int(os.environ.get("RP_H41_SEED", "41")))
    cfg = dict(MASTERS)
    if pg_dsn:
        cfg = {**MASTERS, "map": {"store": pg_dsn}}
    proxy = proxy_factory(cfg, rules=RULES)
    other = proxy_factory(cfg, rules=RULES) if two_proxies else None
    findings, slow = [], []
    for r in range(ROUNDS):
        box = box_of(r)
        took, bad, outcome = _round(proxy, fleet, r, box, how, rng, mover_proxy=other)
        print(f"round {r} {how} {box}: {took:.2f}s {outcome} bad={bad}", flush=True)
        if bad:
            findings.append((r, bad, outcome))
        if took > SLOW:
            slow.append((r, took, outcome))
        if box.upper() == "INBOX":
            fleet.reset_mail()
    print("timings", TIMINGS)
    assert not findings, findings
    assert not slow, slow


def test_admin_move_of_work_against_relayed_moves(proxy_factory, fleet):
    _rounds(proxy_factory, fleet, "admin", lambda r: f"Work-{r}")


def test_rename_across_of_work_against_relayed_moves(proxy_factory, fleet):
    _rounds(proxy_factory, fleet, "rename", lambda r: f"Work-{r}")


def test_admin_move_of_inbox_against_relayed_moves(proxy_factory, fleet):
    _rounds(proxy_factory, fleet, "admin", lambda r: "INBOX")


def test_two_proxies_moves_on_one_rename_across_on_the_other(proxy_factory, fleet, pg_dsn):
    _rounds(proxy_factory, fleet, "rename", lambda r: f"Work-{r}", two_proxies=True, pg_dsn=pg_dsn)


def test_two_proxies_moves_on_one_admin_move(proxy_factory, fleet, pg_dsn):
    _rounds(proxy_factory, fleet, "admin", lambda r: f"Work-{r}", two_proxies=True, pg_dsn=pg_dsn)


# -- a client that stopped reading, its relayed MOVE's answer unread --


class SmallWire(Wire):
    """A Wire whose receive buffer is set small before it connects (it is then never read)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(timeout)
        s.connect((host, port))
        self.sock, self.buf = s, b""
        self.greeting = self.line()


KEYWORDS = [b"kw%02d" % i + b"x" * 44 for i in range(40)]  # mail_max_keyword_length: 50


@pytest.mark.parametrize("how", ["admin", "rename"])
def test_a_relayed_move_whose_answer_is_never_read_does_not_hang_a_move(proxy_factory, fleet, how):
    """The stalled session's UID MOVE ran at Dovecot; its answer (flag changes another session made:
    ~8 MB) is more than the sockets hold, so the proxy stops reading that backend connection before
    the tagged OK: the MOVE's turn is held while the client stays connected. Does the mailbox move
    of Work wait for it (for ever)?"""
    n = 4000
    mail = ids("w", n)
    seed(fleet["b1"], "carol", "Work", mail, size=300)
    seed(fleet["b1"], "carol", "Proj", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    stalled = SmallWire(proxy.host, proxy.port, timeout=120)
    stalled.login("carol")
    assert stalled.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    with fleet["b1"].client("carol") as m:  # another session changes every message's flags
        m.select("Work")
        typ, data = m.store("1:*", "+FLAGS", "(" + " ".join(k.decode() for k in KEYWORDS) + ")")
        assert typ == "OK", data
    stalled.send(b"m UID MOVE 1 Proj\r\n")  # and never read again
    time.sleep(2)
    started = time.monotonic()
    if how == "admin":
        child = admin_move(proxy, "carol", "Work", "b3")
        try:
            out, err = child.communicate(timeout=60)
            outcome = f"rc={child.returncode} {out[-200:]} {err[-300:]}"
        except subprocess.TimeoutExpired:
            outcome = "still running after 60 s"
    else:
        w = Wire(proxy.host, proxy.port, timeout=60)
        w.login("carol")
        try:
            outcome = w.cmd(b"r", b"RENAME Work Shared/W")[-1].decode()
        except (TimeoutError, OSError) as e:
            outcome = f"no answer in 60 s ({e!r})"
        while not journal_empty(proxy) and time.monotonic() - started < 60:  # (it finishes behind its answer)
            time.sleep(0.5)
        outcome += f" entry left: {not journal_empty(proxy)}"
    took = time.monotonic() - started
    print("move took", round(took, 2), outcome)
    stalled.close()
    if how == "admin" and child.returncode is None:
        out, err = child.communicate(timeout=120)
        print("after the stalled client closed:", round(time.monotonic() - started, 2), child.returncode, out[-200:])
    time.sleep(3)
    counts, where = census(fleet, "carol")
    lost, dup = judge(counts, mail)
    assert (lost, dup) == ([], []), [(i, where.get(i)) for i in lost + dup][:5]
    assert took < SLOW, (took, outcome)
