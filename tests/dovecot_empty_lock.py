"""How long Dovecot's writers wait on a dovecot-uidlist.lock a SIGKILLed Dovecot left, by its content.

Not collected (a fact about the backend): ``python3 tests/dovecot_empty_lock.py``; direct Dovecot
2.3.19.1, maildir, on $HOST (default 127.0.0.21). Per case a mailbox with one message, then a lock
file planted in it ($AGE seconds old, default 100) and an APPEND to it timed.

Dovecot creates the lock with open(O_EXCL) and then writes "pid:host" into it (dotlock_use_excl = yes,
file-dotlock.c): a SIGKILL between the two leaves it EMPTY. A lock naming a dead pid is overridden at
once (once >= 2 s old); an empty one (or one whose host is not this one) only after stale_timeout,
120 s counted from the lock file's last change as first seen (its ctime), whatever its mtime says --
about when the writer's own lock timeout (122 s) runs out: it answers OK, or NO [SERVERBUG].

Measured here (2.3.19.1), two runs: empty 121.2 s OK ("Append completed (121.185 + 0.000 + ...)": the
lock-wait column says 0.000) and 122.4 s "NO [SERVERBUG] Timeout while waiting for lock"; a dead pid
0.1 s and 0.1 s; another host's 121.4 s and 120.3 s, OK. Soak D (workers and kills) seed 88008: nine
commands of four sessions on b1 waited 97-117 s, all answered within one second, 120 s after b1 was
SIGKILLed; seed 89008 likewise (an APPEND 104 s): this, not the proxy. Not measured: Dovecot's other
way, ``dotlock_use_excl = no``, links a file already holding the pid (file-dotlock.c), so a kill
cannot leave an empty lock that way.
"""

from __future__ import annotations

import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from dovecot_stale_lock_rename import Lab  # noqa: E402

from referral_proxy.fleet import Dovecot, make_root  # noqa: E402

CASES = {
    "empty (SIGKILL between create and write)": "",
    "a dead pid": "999999:{host}",
    "another host's pid": "999999:{host}.elsewhere",
}
MESSAGE = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"


def main() -> int:
    age = float(os.environ.get("AGE", "100"))
    root = make_root("rp-emptylock-")
    os.chmod(root, 0o755)
    d = Dovecot("b1", os.environ.get("HOST", "127.0.0.21"), root / "b1")
    d.start()
    try:
        lab = Lab(d)
        for i, (what, content) in enumerate(CASES.items()):
            box = b"E%d" % i
            assert lab.ctl.cmd(b"c", b"CREATE " + box)[-1].startswith(b"c OK")
            lab.ctl.cmd(b"a", b"APPEND %s {%d+}\r\n%s" % (box, len(MESSAGE), MESSAGE))
            lock = lab.box.path(box.decode()) / "dovecot-uidlist.lock"
            lock.write_text(content.format(host=socket.gethostname()))
            os.chown(lock, lab.box.uid.pw_uid, lab.box.uid.pw_gid)
            t = time.time() - age
            os.utime(lock, (t, t))
            w = lab.session(timeout=300)
            t0 = time.monotonic()
            answer = w.cmd(b"a", b"APPEND %s {%d+}\r\n%s" % (box, len(MESSAGE), MESSAGE))[-1]
            print(f"lock {what}, {age:.0f} s old: APPEND answered after {time.monotonic() - t0:.1f} s: "
                  f"{answer.strip()[:100]!r}", flush=True)
        return 0
    finally:
        d.stop()


if __name__ == "__main__":
    sys.exit(main())
