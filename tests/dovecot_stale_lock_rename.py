r"""A RENAME X -> Y that moves another session's dovecot-uidlist dotlock along: the lock then sits in
.Y/dovecot-uidlist.lock naming a LIVE imap process, which Dovecot never overrides (file-dotlock.c
check_lock: "process exists, don't override"), so every sync of Y that must lock its uidlist waits
the lock timeout (122 s), then fails NO [SERVERBUG] or goes on without it (an EXAMINE answers OK
after ~124 s, without the new mail).  (Soak: carol's ``*`` -> ``Proj``.)

Not collected (a fact about the backend): ``python3 tests/dovecot_stale_lock_rename.py [race [ROUNDS [OP...]]]``
or ``... clear [ROUNDS]``.  Direct Dovecot 2.3.19.1, maildir, on $HOST (default 127.0.0.20; 127.0.0.20-30 only).

race: per round, session A runs OP on mailbox X{i} (200 messages, 200 more as files in new/) while
session B RENAMEs X{i} -> Y{i} after a random delay within A's command's duration.  Each round is
    miss     no "Our dotlock file .../.X{i}/dovecot-uidlist.lock was deleted" warning in the log
    died     moved, but A's process exited (BYE "inconsistent" / closed): the lock names a dead pid,
             the next locker overrides it (after <= 2 s: STALE_PID_CHECK_SECS)
    STALE    .Y{i}/dovecot-uidlist.lock names A's live pid; checked by a probe: a file dropped in
             .Y{i}/new/, a third session's EXAMINE Y{i} with a 5 s socket timeout.
clear: make STALE (A selected INBOX, STATUS X{i} raced; or the op given by $CLEAR_OP, e.g. noop-sync
for A selected X{i}), then let A (or a third session / doveadm: the c-* actions) do one thing
($CLEAR_ACTIONS, default all of CLEARS) and probe again; per action a tally prompt (< 2 s) / slow /
BLOCKED and the time A's own command took.  $PENDING=0 skips the probe before the action (which
leaves a file in Y's new/ for A's sync to find).
planted: the same state without the race (``... planted [ROUNDS]``): a synced Y{i}, then a
dovecot-uidlist.lock naming A's live pid written into it; $LOCK_AGE, $PENDING, $SETTLE,
$SETTLE_SELECT say how old the lock is and whether A's sync of Y has anything to do
(see run_planted).

Findings (2.3.19.1): A's own sync of Y clears the lock (file-dotlock.c check_lock: a lock naming
getpid() is overridden) in 0.1-0.2 s (the override's sleep), or ~2-3 s when the lock is < 2 s old
(STALE_PID_CHECK_SECS: the pid is not read yet) - but only when that sync has to lock the uidlist
(new files, "dirty" new/ or cur/, \Recent to take): EXAMINE, STATUS and even SELECT of a quiescent
Y lock nothing and leave it; a flag STORE in Y always locks (select-y-flag).  NOOP elsewhere: never.
LOGOUT: always (the pid is dead; the next locker overrides it once the lock is >= 2 s old).  A third session: nothing over IMAP (RENAME moves the lock along), doveadm
force-resync waits like anyone; only deleting the file (``doveadm fs delete posix "" PATH``) clears.
"""

from __future__ import annotations

import collections
import os
import pwd
import random
import re
import sys
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from imapwire import Wire  # noqa: E402

from referral_proxy.fleet import Dovecot, make_root  # noqa: E402

USER, PASSWORD = "alice", "secret"
MESSAGES = 200
PROBE_TIMEOUT = 5.0

# op: (A's selected mailbox, whether new files are dropped in X/new first, A's command)
OPS: dict[str, tuple[str, bool, bytes]] = {
    "noop-sync": ("X", True, b"NOOP"),                       # selected X: sync assigns UIDs to new/
    "fetch-sync": ("X", True, b"UID FETCH 1:* (FLAGS)"),
    "store": ("X", False, b"STORE 1:* +FLAGS (\\Seen \\Flagged)"),
    "expunge": ("X", False, b"UID EXPUNGE 1:*"),              # after STORE 1:* +FLAGS \Deleted
    "move-out": ("X", False, b"UID MOVE 1:* INBOX"),
    "status-x": ("INBOX", True, b"STATUS X (MESSAGES UIDNEXT UNSEEN)"),  # A elsewhere: X only looked at
    "copy-in": ("INBOX", False, b"COPY 1:50 X"),               # A elsewhere: saves into X
    "select-x": ("INBOX", True, b"SELECT X"),
    "examine-x": ("INBOX", True, b"EXAMINE X"),
    "append-in": ("INBOX", False, b"APPEND X" + b"".join(  # A elsewhere: MULTIAPPEND of 50 into X
        b" {%d+}\r\n%s" % (len(m), m) for m in (
            b"From: a@example.org\r\nSubject: a%d\r\n\r\n" % k + b"body line\r\n" * 30
            for k in range(50)))),
}


class Box:
    def __init__(self, d: Dovecot) -> None:
        self.d = d
        self.uid = pwd.getpwnam("dovecot")
        self.n = 0

    def path(self, box: str) -> Path:
        return self.d.user_mail_dir(USER) / f".{box}"

    def message(self, k: int) -> bytes:
        self.n += 1
        return (b"From: a@example.org\r\nSubject: m%d\r\nMessage-ID: <%d.%d.%d@h43>\r\n\r\n"
                % (k, os.getpid(), self.n, k) + b"body line\r\n" * 30)

    def drop(self, box: str, n: int) -> None:
        """*n* messages as files in *box*'s new/ (as a delivery agent would, no lock taken)."""
        new = self.path(box) / "new"
        for k in range(n):
            self.n += 1
            p = new / f"{int(time.time())}.M{self.n}P{os.getpid()}.h43"
            p.write_bytes(self.message(k))
            os.chown(p, self.uid.pw_uid, self.uid.pw_gid)

    def lock(self, box: str) -> int | None:
        """The pid named by *box*'s dovecot-uidlist.lock, None without one."""
        try:
            return int((self.path(box) / "dovecot-uidlist.lock").read_text().split(":")[0])
        except (OSError, ValueError):
            return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Lab:
    def __init__(self, d: Dovecot) -> None:
        self.d = d
        self.box = Box(d)
        self.ctl = self.session()

    def session(self, timeout: float = 60.0) -> Wire:
        w = Wire(self.d.host, self.d.port, timeout=timeout)
        w.login(USER, PASSWORD)
        return w

    def session_pid(self) -> tuple[Wire, int]:
        """A new session and its imap process's pid (Dovecot's ID reply names it)."""
        w = self.session()
        before = set(self.d.sessions(USER))
        # the pid is not in ID's answer; find the process that is serving this connection: its
        # proctitle (verbose_proctitle) shows the command, so send one that waits (IDLE) and look.
        w.send(b"w IDLE\r\n")
        w.line()  # "+ idling"
        pid = None
        for _ in range(200):
            for p in before:
                try:
                    title = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")
                except OSError:
                    continue
                if b"IDLE" in title:
                    pid = p
                    break
            if pid:
                break
            time.sleep(0.01)
        w.send(b"DONE\r\n")
        w.until_tagged(b"w")
        assert pid, "could not find the session's pid"
        return w, pid

    def prepare(self, i: int, op: str) -> str:
        x = f"X{i}"
        assert self.ctl.cmd(b"c", b"CREATE " + x.encode())[-1].startswith(b"c OK")
        self.box.drop(x, MESSAGES)
        self.ctl.cmd(b"e", b"EXAMINE " + x.encode())  # UIDs for them
        self.ctl.cmd(b"u", b"UNSELECT")
        return x

    def probe(self, box: str, timeout: float = PROBE_TIMEOUT) -> float | None:
        """Seconds a new session's EXAMINE *box* took after a file was dropped in its new/ (so that
        its sync must lock the uidlist); None if it did not answer within *timeout*."""
        self.box.drop(box, 1)
        w = self.session()
        w.sock.settimeout(timeout)
        t0 = time.monotonic()
        try:
            w.cmd(b"p", b"EXAMINE " + box.encode())
            return time.monotonic() - t0
        except TimeoutError:
            return None
        finally:
            w.close()

    def race(self, i: int, op: str, delay: float) -> tuple[str, dict]:
        where, drop, command = OPS[op]
        x, y = self.prepare(i, op), f"Y{i}"
        a, apid = self.session_pid()
        selected = x if where == "X" else "INBOX"
        assert a.cmd(b"s", b"SELECT " + selected.encode())[-1].startswith(b"s OK")
        if op == "expunge":
            a.cmd(b"d", b"STORE 1:* +FLAGS.SILENT (\\Deleted)")
        if op == "copy-in" and not getattr(self, "_inbox_filled", False):
            for k in range(50):
                data = self.box.message(k)
                a.send(b"a APPEND INBOX {%d+}\r\n" % len(data) + data + b"\r\n")
                a.until_tagged(b"a")
            a.cmd(b"n", b"NOOP")
            self._inbox_filled = True
        if drop:
            self.box.drop(x, MESSAGES)
        b = self.session()
        command = command.replace(b" X", b" " + x.encode())
        out: dict = {"apid": apid}

        def a_side() -> None:
            a.send(b"t " + command + b"\r\n")
            lines = []
            try:
                while not (lines and lines[-1].startswith(b"t ")):
                    lines.append(a.line())
                out["a"] = lines[-1].strip()[:70]
            except (ConnectionError, OSError):
                bye = [x for x in lines if x.startswith(b"* BYE")]
                out["a"] = b"closed " + (bye[-1].strip()[:60] if bye else b"(no BYE)")
            m = re.search(rb"\((\d+\.\d+) \+", out["a"])
            out["a_secs"] = float(m.group(1)) if m else None  # Dovecot's own time for it

        def b_side() -> None:
            time.sleep(delay)
            out["b"] = b.cmd(b"r", b"RENAME %s %s" % (x.encode(), y.encode()))[-1].strip()[:40]

        sides = [threading.Thread(target=a_side), threading.Thread(target=b_side)]
        for t in sides:
            t.start()
        for t in sides:
            t.join(300)
        b.close()
        time.sleep(0.05)
        warned = f"/.{x}/dovecot-uidlist.lock was deleted" in self.d.log_text()
        holder = self.box.lock(y)
        out["a_alive"] = alive(apid)
        out["a_conn"] = a
        if not warned and holder is None:
            verdict = "miss"
        elif holder == apid and alive(apid):
            verdict = "STALE"
        elif holder is not None and alive(holder):
            verdict = "stale-other"
        else:
            verdict = "died"
        out["holder"] = holder
        return verdict, out


def run_race(lab: Lab, rounds: int, ops: list[str], start: int) -> int:
    i = start
    for op in ops:
        tally: collections.Counter = collections.Counter()
        dur = 0.005
        probes = []
        answers: collections.Counter = collections.Counter()
        for _ in range(rounds):
            delay = random.random() * dur * 1.3
            verdict, out = lab.race(i, op, delay)
            if out.get("a_secs") and verdict == "miss":
                dur = 0.7 * dur + 0.3 * out["a_secs"]
            tally[verdict] += 1
            if verdict != "miss":
                answers[out.get("a", b"")[:60]] += 1
            if verdict == "STALE":
                p = lab.probe(f"Y{i}")
                probes.append("blocked" if p is None else f"{p:.1f}s")
            try:
                out["a_conn"].send(b"z LOGOUT\r\n")
                out["a_conn"].close()
            except OSError:
                pass
            i += 1
        print(f"{op:11} {rounds} rounds: {dict(tally)}  A's answers when moved: {dict(answers)}  "
              f"probes of STALE: {collections.Counter(probes)}", flush=True)
    return i


def make_stale(lab: Lab, i: int, op: str, tries: int = 200) -> tuple[int, dict] | None:
    dur = 0.005
    for _ in range(tries):
        verdict, out = lab.race(i, op, random.random() * dur * 1.3)
        if verdict == "STALE":
            return i, out
        if out.get("a_secs") and verdict == "miss":
            dur = 0.7 * dur + 0.3 * out["a_secs"]
        try:
            out["a_conn"].close()
        except OSError:
            pass
        i += 1
    return None


# A's own actions (A = the session whose pid the stale lock names) and a THIRD session's (C).
CLEARS = ("nothing", "noop", "status-inbox", "select-inbox", "examine-y", "status-y", "select-y",
          "select-y-flag",
          "idle", "logout",
          "c-doveadm-force-resync", "c-doveadm-mailbox-status", "c-doveadm-fs-delete",
          "c-rename-away-back", "c-examine-long")


def doveadm(lab: Lab, *args: str, timeout: float = 10.0) -> tuple[str, float]:
    """Run doveadm against this instance's config; (outcome, seconds).  A timeout kills only
    the doveadm child started here."""
    import subprocess
    t0 = time.monotonic()
    try:
        r = subprocess.run(["doveadm", "-c", str(lab.d.conf_path), *args], capture_output=True,
                           timeout=timeout)
        out = f"rc={r.returncode} {(r.stdout + r.stderr).decode(errors='replace').strip()[:80]!r}"
    except subprocess.TimeoutExpired:
        out = f"TIMEOUT>{timeout:.0f}s"
    return out, time.monotonic() - t0


def clear_action(lab: Lab, action: str, i: int, a: Wire) -> bytes:
    y = f"Y{i}"
    if action == "noop":
        return a.cmd(b"n", b"NOOP")[-1]
    if action == "status-inbox":
        return a.cmd(b"n", b"STATUS INBOX (MESSAGES)")[-1]
    if action == "select-inbox":
        return a.cmd(b"n", b"SELECT INBOX")[-1]
    if action == "examine-y":  # A looks at Y read-only and leaves it again
        r = a.cmd(b"n", b"EXAMINE " + y.encode())[-1]
        return r + b" | " + a.cmd(b"u", b"UNSELECT")[-1]
    if action == "status-y":
        return a.cmd(b"n", b"STATUS " + y.encode() + b" (MESSAGES)")[-1]
    if action == "select-y":
        return a.cmd(b"n", b"SELECT " + y.encode())[-1]
    if action == "select-y-flag":  # SELECT Y, then a flag set and taken back again
        r = [a.cmd(b"n", b"SELECT " + y.encode())[-1].strip(),
             a.cmd(b"f", b"STORE 1 +FLAGS.SILENT (\\Flagged)")[-1].strip(),
             a.cmd(b"g", b"STORE 1 -FLAGS.SILENT (\\Flagged)")[-1].strip(),
             a.cmd(b"u", b"UNSELECT")[-1].strip()]
        return b" | ".join(r)
    if action == "idle":  # A IDLEs; a file arrives in Y's new/ (inotify on the moved dir)
        a.send(b"n IDLE\r\n")
        a.line()
        lab.box.drop(y, 1)
        time.sleep(3.0)
        a.send(b"DONE\r\n")
        return b"|".join(x.strip() for x in a.until_tagged(b"n"))
    if action == "logout":
        r = b"".join(a.cmd(b"n", b"LOGOUT"))
        a.close()
        return r
    # a third session / tool, A left alone
    if action == "c-doveadm-force-resync":
        return doveadm(lab, "force-resync", "-u", USER, y)[0].encode()
    if action == "c-doveadm-mailbox-status":
        return doveadm(lab, "mailbox", "status", "-u", USER, "messages", y)[0].encode()
    if action == "c-doveadm-fs-delete":  # doveadm's generic fs access: removes the file
        path = lab.box.path(y) / "dovecot-uidlist.lock"
        return doveadm(lab, "fs", "delete", "posix", "", str(path))[0].encode()
    if action == "c-rename-away-back":  # C renames Y -> Z{i} -> Y (the lock moves along)
        c = lab.session()
        r1 = c.cmd(b"r", b"RENAME %s Z%d" % (y.encode(), i))[-1]
        r2 = c.cmd(b"r", b"RENAME Z%d %s" % (i, y.encode()))[-1]
        c.close()
        return r1.strip() + b" | " + r2.strip()
    if action == "c-examine-long":  # C waits out the whole lock timeout
        c = lab.session(timeout=200)
        r = c.cmd(b"n", b"EXAMINE " + y.encode())[-1]
        c.close()
        return r
    return b""


def secs(p: float | None, blocked: str = "blocked") -> str:
    return blocked if p is None else f"{p:.1f}s"


def run_clear(lab: Lab, rounds: int, start: int, op: str) -> int:
    """$PENDING=0: no probe before A's action, Y has nothing new (nothing for A's sync of Y to
    assign UIDs to); default 1: a probe first (a file in Y's new/, a third session's EXAMINE that
    times out), so that any sync of Y must lock its uidlist."""
    i = start
    pending = os.environ.get("PENDING", "1") != "0"
    for action in os.environ.get("CLEAR_ACTIONS", ",".join(CLEARS)).split(","):
        tally: collections.Counter = collections.Counter()
        a_times = []
        for _ in range(rounds):
            made = make_stale(lab, i, op)
            if made is None:
                print(f"{action}: no STALE state in 200 tries")
                return i
            i, out = made
            y, a = f"Y{i}", out["a_conn"]
            before = lab.probe(y) if pending else "skipped"
            answer = b""
            a.sock.settimeout(200)
            t0 = time.monotonic()
            try:
                answer = clear_action(lab, action, i, a)
            except (ConnectionError, OSError) as e:
                answer = b"closed " + repr(e).encode()
            took = time.monotonic() - t0
            a_times.append(took)
            time.sleep(0.1)
            holder = lab.box.lock(y)
            after = lab.probe(y, timeout=PROBE_TIMEOUT)
            verdict = ("BLOCKED" if after is None else "prompt" if after < 2.0 else "slow")
            tally[verdict] += 1
            print(f"{action:12} Y{i}: A={out['apid']} probe before: "
                  f"{before if isinstance(before, str) else secs(before)}; action took {took:.2f}s, "
                  f"answered {answer.strip()[:110]!r}; A alive {alive(out['apid'])}; lock names "
                  f"{holder}{' (A)' if holder == out['apid'] else ''}; probe after: "
                  f"{secs(after, 'BLOCKED')}", flush=True)
            try:
                a.send(b"z LOGOUT\r\n")
                a.close()
            except OSError:
                pass
            i += 1
        print(f"== {action} (pending={int(pending)}, op={op}) {rounds} rounds: {dict(tally)}; "
              f"action secs min/max {min(a_times):.2f}/{max(a_times):.2f}", flush=True)
    return i


def run_planted(lab: Lab, rounds: int, start: int) -> int:
    """The same state without the race: Y{i} created and fully synced (by another session), then a
    dovecot-uidlist.lock naming A's live pid planted in it (the content Dovecot writes, "pid:host",
    file-dotlock.c file_write_pid) with mtime $LOCK_AGE seconds old (default 10; < 2 means the pid
    is not even read yet, STALE_PID_CHECK_SECS).  $PENDING=1: a file dropped in Y's new/ before
    A's action (its sync then has to lock the uidlist); 0 (default): Y has nothing new.  $SETTLE=S:
    S seconds, then Y synced once more before the lock is planted, so that new/ and cur/ are not
    rescanned as "dirty" (MAILDIR_SYNC_SECS) by A's next sync; 0 (default): planted at once."""
    import socket
    i = start
    pending = os.environ.get("PENDING", "0") != "0"
    age = float(os.environ.get("LOCK_AGE", "10"))
    settle = float(os.environ.get("SETTLE", "0"))
    settle_select = os.environ.get("SETTLE_SELECT", "0") != "0"
    for action in os.environ.get("CLEAR_ACTIONS", ",".join(CLEARS)).split(","):
        tally: collections.Counter = collections.Counter()
        a_times = []
        for _ in range(rounds):
            y = f"Y{i}"
            assert lab.ctl.cmd(b"c", b"CREATE " + y.encode())[-1].startswith(b"c OK")
            lab.box.drop(y, 20)
            # $SETTLE_SELECT=1: a read-write SELECT takes the messages' \Recent (moves new/ -> cur/),
            # so that A's later SELECT has no recent messages to move either
            lab.ctl.cmd(b"e", (b"SELECT " if settle_select else b"EXAMINE ") + y.encode())
            lab.ctl.cmd(b"u", b"UNSELECT")
            if settle:  # new/ and cur/ no longer "dirty" (maildir-sync.c DIR_DELAYED_REFRESH)
                time.sleep(settle)
                lab.ctl.cmd(b"e", b"EXAMINE " + y.encode())
                lab.ctl.cmd(b"u", b"UNSELECT")
            a, apid = lab.session_pid()
            assert a.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
            lock = lab.box.path(y) / "dovecot-uidlist.lock"
            lock.write_text(f"{apid}:{socket.gethostname()}")
            os.chown(lock, lab.box.uid.pw_uid, lab.box.uid.pw_gid)
            t = time.time() - age
            os.utime(lock, (t, t))
            if pending:
                lab.box.drop(y, 1)
            a.sock.settimeout(200)
            t0 = time.monotonic()
            try:
                answer = clear_action(lab, action, i, a)
            except (ConnectionError, OSError) as e:
                answer = b"closed " + repr(e).encode()
            took = time.monotonic() - t0
            a_times.append(took)
            time.sleep(0.1)
            holder = lab.box.lock(y)
            after = lab.probe(y, timeout=PROBE_TIMEOUT)
            verdict = ("BLOCKED" if after is None else "prompt" if after < 2.0 else "slow")
            tally[verdict] += 1
            print(f"{action:12} {y}: A={apid} action took {took:.2f}s, answered "
                  f"{answer.strip()[:110]!r}; A alive {alive(apid)}; lock names "
                  f"{holder}{' (A)' if holder == apid else ''}; probe after: "
                  f"{secs(after, 'BLOCKED')}", flush=True)
            try:
                a.send(b"z LOGOUT\r\n")
                a.close()
            except OSError:
                pass
            i += 1
        print(f"== planted {action} (pending={int(pending)}, lock age {age:g}s, settle {settle:g}s"
              f"{' after SELECT' if settle_select else ''}) "
              f"{rounds} rounds: "
              f"{dict(tally)}; action secs min/max {min(a_times):.2f}/{max(a_times):.2f}",
              flush=True)
    return i


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "race"
    rounds = int(argv[1]) if len(argv) > 1 else (20 if mode == "race" else 2)
    root = make_root("rp-h43-")
    os.chmod(root, 0o755)
    d = Dovecot("b1", os.environ.get("HOST", "127.0.0.20"), root / "b1")
    d.start()
    print(f"Dovecot {d.host}:{d.port} root {root}", flush=True)
    try:
        lab = Lab(d)
        if mode == "race":
            run_race(lab, rounds, argv[2:] or list(OPS), 0)
        elif mode == "planted":
            run_planted(lab, rounds, 0)
        else:
            run_clear(lab, rounds, 0, os.environ.get("CLEAR_OP", "status-x"))
        return 0
    finally:
        d.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
