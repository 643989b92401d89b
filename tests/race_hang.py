"""A backend that HANGS (SIGSTOP of its whole process group) at each step of a COPY/MOVE/RENAME
across servers (round 9a). Not collected (slow): ``python3 -m pytest tests/race_hang.py``.

The proxy is paused at a journal step (faultproxy.py), the backend stopped, the proxy resumed:
its client must hear something within ~15 s (the answer, or stayalive lines), another user on
another backend must be served meanwhile; then SIGCONT (or SIGKILL + restart + recover) and
the census must be exact."""

from __future__ import annotations

import os
import signal
import time

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, judge, seed, through_proxy, wait_paused

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
RULES = [{"mailbox": "Far*", "backend": "b2"}, {"user": "bob", "mailbox": "*", "backend": "b3"}]
OPS = {"move": b"UID MOVE 1:* Far", "copy": b"UID COPY 1:* Far", "rename": b"RENAME Work Far2"}
STEPS = {"move": ["move-appending:1", "move-appending:2", "move-appended:1", "move-expunging:1"],
         "copy": ["start"],
         "rename": ["planned:1", "copying:2", "copied:1", "committed:1", "placed:1", "aside:1"]}


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}@t" for i in range(n)]


def _heard(w: Wire, tag: bytes, within: float) -> list[bytes]:
    """Lines the client hears within *within* s (stops at the tagged answer)."""
    deadline = time.monotonic() + within
    got = []
    try:
        while time.monotonic() < deadline:
            w.sock.settimeout(max(0.1, deadline - time.monotonic()))
            line = w.line()
            got.append(line)
            if line.startswith(tag + b" "):
                break
    except TimeoutError:
        pass
    except ConnectionError:  # the session ended (its home backend was killed)
        got.append(b"(closed)")
    w.sock.settimeout(180)
    return got


def _bob_served(proxy) -> None:
    """bob, whose mail is on b3, is served while the other backend hangs."""
    other = Wire(proxy.host, proxy.port, timeout=20)
    other.login("bob")
    assert other.cmd(b"x", b"SELECT INBOX")[-1].startswith(b"x OK")
    other.close()


def _release(backend, group: int, after: str) -> None:
    """The stopped backend goes on (cont), or is killed and started again (kill)."""
    if after == "cont":
        os.killpg(group, signal.SIGCONT)
    else:
        backend.kill()
        backend.start()


CASES = [(op, step, stopped, after) for op in OPS for step in STEPS[op] for stopped in ("b1", "b2")
         for after in ("cont", "kill")]


@pytest.mark.parametrize("op,step,stopped,after", CASES)
def test_a_backend_hangs_at_a_step_of_an_operation_across(proxy_factory, fleet, tmp_path, op, step, stopped, after):
    hang_at(proxy_factory, fleet, tmp_path, op, step, stopped, after)


def hang_at(proxy_factory, fleet, tmp_path, op: str, step: str, stopped: str, after: str,
            config=MASTERS, stopped_for: float = 17, n: int = 30, size: int = 600) -> tuple[list[bytes], list[bytes]]:
    """*stopped* hangs at *step* of *op* for *stopped_for* s, then goes on (after="cont") or is
    killed and restarted ("kill"); the census must be exact (*n* messages of *size* bytes moved).
    What the client heard while the backend was stopped, and its answer."""
    work = ids("work", n)
    seed(fleet["b1"], "carol", "Work", work, size=size)
    seed(fleet["b2"], "carol", "Far", [])
    bobs = ids("bob", 2)
    seed(fleet["b3"], "bob", "INBOX", bobs)
    pause = tmp_path / "pause"
    pause.mkdir()
    command = faulty("--pause-at", step, "--pause-dir", str(pause)) if step != "start" else None
    proxy = proxy_factory(config, rules=RULES, command=command)
    w = Wire(proxy.host, proxy.port, timeout=180)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    if op == "rename":
        assert w.cmd(b"u", b"UNSELECT")[-1].startswith(b"u OK")
    backend = fleet[stopped]
    group = os.getpgid(backend.pid)
    if step == "start":
        os.killpg(group, signal.SIGSTOP)
        w.send(b"c " + OPS[op] + b"\r\n")
    else:
        w.send(b"c " + OPS[op] + b"\r\n")
        assert wait_paused(pause, step) == step
        os.killpg(group, signal.SIGSTOP)
        (pause / "resume").touch()
    try:
        heard = _heard(w, b"c", stopped_for)
        assert heard, f"the client heard nothing for {stopped_for} s"
        _bob_served(proxy)
        if heard[-1].startswith(b"c ") and stopped != "b1":  # answered while stopped (a cut read, stall.py)
            assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    finally:
        _release(backend, group, after)
    answer = heard if heard and heard[-1].startswith(b"c ") else _heard(w, b"c", 120)
    w.close()
    if after == "kill":
        rec = cli("recover", "--config", str(proxy.config_path))
        assert rec.returncode == 0, rec.stdout + rec.stderr
    else:
        for _ in range(300):
            r = cli("recover", "--config", str(proxy.config_path))
            if "nothing to recover" in r.stdout or "left" not in r.stdout:
                break
            time.sleep(1)
    counts, where = census(fleet, "carol")
    if op == "copy":
        ok = bool(answer) and answer[-1].startswith(b"c OK")
        assert all(counts[i] in (1, 2) for i in work), counts
        assert all(counts[i] == counts[work[0]] for i in work), (answer, dict(counts))
        assert (counts[work[0]] == 2) == ok or not answer or not answer[-1].startswith(b"c "), (answer, dict(counts))
    else:
        lost, dup = judge(counts, work)
        assert (lost, dup) == ([], []), (answer[-3:], lost[:3], [(d, where[d]) for d in dup[:3]])
        reached = through_proxy(proxy, "carol")
        assert [i for i in counts if reached[i] != 1] == [], (answer[-3:], dict(where))
    return heard, answer


@pytest.mark.parametrize("when", ["after-first", "before-end"])
@pytest.mark.parametrize("after", ["cont", "kill"])
def test_a_backend_hangs_during_a_multiappend(proxy_factory, fleet, when, after):
    seed(fleet["b1"], "carol", "Work", [])
    bobs = ids("bob", 2)
    seed(fleet["b3"], "bob", "INBOX", bobs)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=180)
    w.login("carol")
    from movecheck import body
    one, two = body("ma-1@t", 20000), body("ma-2@t", 20000)
    group = os.getpgid(fleet["b1"].pid)
    w.send(b"a APPEND Work {%d}\r\n" % len(one))
    assert w.line().startswith(b"+")
    if when == "after-first":
        os.killpg(group, signal.SIGSTOP)
    w.send(one + b" {%d}\r\n" % len(two))
    heard = _heard(w, b"a", 3)
    if when == "before-end":
        assert heard and heard[0].startswith(b"+"), heard
        w.send(two)
        time.sleep(0.5)
        os.killpg(group, signal.SIGSTOP)
        w.send(b"\r\n")
    try:
        _bob_served(proxy)
    finally:
        _release(fleet["b1"], group, after)
    if when == "after-first" and after == "cont":
        heard += _heard(w, b"a", 5)
        if heard and heard[-1].startswith(b"+"):
            w.send(two + b"\r\n")
    answer = heard + _heard(w, b"a", 60)
    w.close()
    counts, where = census(fleet, "carol")
    print(answer, dict(counts))
    n = {counts["ma-1@t"], counts["ma-2@t"]}
    assert len(n) == 1 and n <= {0, 1}, (answer, dict(counts))
    if answer and answer[-1].startswith(b"a OK"):
        assert n == {1}
    if answer and answer[-1].startswith(b"a NO") and b"may or may not" not in answer[-1]:
        assert n == {0}, answer
