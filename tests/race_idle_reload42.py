"""IDLE, SIGHUP reloads and a client that never reads, against admin moves and moves across (round 42).

Not collected by the suite (slow; run by name: ``python3 -m pytest tests/race_idle_reload42.py``).
Judged by a census of the backends (movecheck.py: every message once), by what a client reaches
through the proxy afterwards, and by the idler's own view: its EXISTS/EXPUNGE must stay consistent
(an EXPUNGE names a message it has, an EXISTS never shrinks its count), it never hangs (an update,
or a BYE it can act on, within seconds), and it never hears a message expunged that is in fact
still in its mailbox (moved under the same name to another backend) -- never by the proxy's claim.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from imapwire import Wire
from movecheck import admin_move, body, census, cli, exact, judge, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]
HANG = 15.0  # seconds: a bound on a hang, never a measure


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}@t" for i in range(n)]


class Idler:
    """A session SELECTed in *box*, then IDLE; a thread keeps every line it hears, with its time."""

    def __init__(self, proxy, box: bytes, user: str = "carol") -> None:
        self.w = Wire(proxy.host, proxy.port, timeout=120)
        self.w.login(user)
        sel = self.w.cmd(b"s", b"SELECT " + box)
        assert sel[-1].startswith(b"s OK"), sel
        self.count = next(int(x.split()[1]) for x in sel if x.endswith(b" EXISTS\r\n"))
        self.start_count = self.count
        self.lines: list[tuple[float, bytes]] = []
        self.closed_at: float | None = None
        self.errors: list[str] = []  # inconsistencies of the view
        self.expunged = 0
        self.w.send(b"i IDLE\r\n")
        assert self.w.line().startswith(b"+ ")
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        try:
            while True:
                line = self.w.line()
                self.lines.append((time.monotonic(), line))
                self._judge(line)
        except (ConnectionError, OSError):
            self.closed_at = time.monotonic()

    def _judge(self, line: bytes) -> None:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == b"*" and parts[1].isdigit():
            n = int(parts[1])
            if parts[2] == b"EXISTS":
                if n < self.count:
                    self.errors.append(f"EXISTS {n} below {self.count}")
                self.count = n
            elif parts[2] == b"EXPUNGE":
                if not 1 <= n <= self.count:
                    self.errors.append(f"EXPUNGE {n} of {self.count}")
                self.count -= 1
                self.expunged += 1

    def heard(self, word: bytes, since: float = 0.0) -> list[bytes]:
        return [ln for t, ln in self.lines if t >= since and word in ln]

    def bye(self) -> bytes | None:
        b = self.heard(b"* BYE")
        return b[0] if b else None

    def wait(self, pred, timeout: float = HANG) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return pred()

    def tagged(self, tag: bytes, timeout: float = HANG) -> bytes | None:
        self.wait(lambda: any(ln.startswith(tag + b" ") for _, ln in self.lines) or self.closed_at is not None, timeout)
        got = [ln for _, ln in self.lines if ln.startswith(tag + b" ")]
        return got[0] if got else None

    def close(self) -> None:
        self.w.close()
        self._t.join(5)


def _appender(proxy, box: bytes, prefix: str, stop: threading.Event, answers: dict, pause: float = 0.05) -> threading.Thread:
    """A second session APPENDing to *box* through the proxy until *stop*; answers: mid -> tagged line."""
    def run() -> None:
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        k = 0
        try:
            while not stop.is_set():
                k += 1
                mid = f"{prefix}-{k}@t"
                data = body(mid, 400)
                answers[mid] = b"?"
                w.send(b"a%d APPEND %s {%d+}\r\n" % (k, box, len(data)) + data + b"\r\n")
                answers[mid] = w.until_tagged(b"a%d" % k)[-1]
                time.sleep(pause)
        except (ConnectionError, OSError) as e:
            answers["closed"] = repr(e).encode()
        finally:
            w.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _ok(answers: dict) -> list[str]:
    return [m for m, a in answers.items() if m != "closed" and b" OK" in a]


def _unsure(answers: dict) -> list[str]:
    return [m for m, a in answers.items() if m != "closed" and a == b"?"]


# -- 1. IDLE against an admin move, a RENAME across, APPENDs ---------------------------------------------


@pytest.mark.parametrize("box", ["Work", "INBOX"])
@pytest.mark.parametrize("done", ["none", "pipelined"])
@pytest.mark.parametrize("appends", [True, False])
@pytest.mark.parametrize("run", range(2))
def test_idle_while_the_admin_moves_its_mailbox(proxy_factory, fleet, box, done, appends, run):
    mail = ids("m", 60 if appends else 3)
    seed(fleet["b1"], "carol", box, mail)
    proxy = proxy_factory(MASTERS, rules=RULES)
    idler = Idler(proxy, box.encode())
    stop, answers = threading.Event(), {}
    app = _appender(proxy, box.encode(), f"app{run}", stop, answers) if appends else threading.Thread(target=stop.wait)
    if not appends:
        app.start()
    time.sleep(0.3)
    mover = admin_move(proxy, "carol", box, "b2")
    if done == "pipelined":
        time.sleep(0.4 + 0.2 * run)
        try:
            idler.w.send(b"DONE\r\nn NOOP\r\nj IDLE\r\n")
        except OSError:
            pass
    out = mover.communicate(timeout=300)
    ended = time.monotonic()
    # within seconds of the move's end: a BYE, or (pipelined) the answers
    if done == "pipelined" and idler.bye() is None:
        assert idler.tagged(b"i") is not None, idler.lines
        assert idler.tagged(b"n") is not None, idler.lines
    got = idler.wait(lambda: idler.bye() is not None or idler.closed_at is not None, HANG)
    stop.set()
    app.join(60)
    print(box, done, mover.returncode, out[1][-300:], "idler:", [ln for _, ln in idler.lines][:12], idler.expunged,
          "bye after end:", (idler.closed_at or 0) - ended)
    assert mover.returncode == 0, out
    assert got, ("no BYE within %.0fs of the move's end" % HANG, idler.lines[-10:])
    assert not idler.errors, idler.errors
    # none of the mail it had was expunged: it is all still in its mailbox (on b2 now)
    assert idler.expunged == 0, ("the idler heard its mail expunged", idler.expunged,
                                 [ln for _, ln in idler.lines if b"EXPUNGE" in ln][:5], idler.bye())
    idler.close()
    exact(fleet, proxy, "carol", mail + _ok(answers), may=_unsure(answers))
    assert app.is_alive() is False


@pytest.mark.parametrize("rename", [b"RENAME Work Shared/W", b"RENAME Work Archive/W", b"RENAME Work Work2"])
@pytest.mark.parametrize("done", ["none", "pipelined"])
def test_idle_while_another_session_renames_its_mailbox_across(proxy_factory, fleet, rename, done):
    mail = ids("m", 80)
    seed(fleet["b1"], "carol", "Work", mail)
    proxy = proxy_factory(MASTERS, rules=RULES)
    idler = Idler(proxy, b"Work")
    stop, answers = threading.Event(), {}
    app = _appender(proxy, b"Work", "app", stop, answers)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    time.sleep(0.2)
    if done == "pipelined":
        threading.Timer(0.1, lambda: idler.w.send(b"DONE\r\nn NOOP\r\n")).start()
    answer = w.cmd(b"r", rename)[-1]
    ended = time.monotonic()
    stop.set()
    app.join(60)
    got = idler.wait(lambda: idler.bye() is not None or idler.closed_at is not None
                     or (done == "pipelined" and idler.tagged(b"n", 0) is not None), HANG)
    print(rename, answer, [ln for _, ln in idler.lines][:12], (idler.closed_at or 0) - ended)
    assert got, idler.lines
    assert not idler.errors, idler.errors
    w.close()
    idler.close()
    exact(fleet, proxy, "carol", mail + _ok(answers), may=_unsure(answers))


def test_idle_hears_appends_through_the_proxy_then_an_admin_move(proxy_factory, fleet):
    """Baseline: the idler's EXISTS follow a second session's APPENDs exactly, as Dovecot's own."""
    seed(fleet["b1"], "carol", "Work", ids("m", 5))
    proxy = proxy_factory(MASTERS, rules=RULES)
    idler = Idler(proxy, b"Work")
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    for k in range(5):
        data = body(f"x-{k}@t")
        assert w.cmd(b"a", b"APPEND Work {%d+}\r\n" % len(data) + data)[-1].startswith(b"a OK")
        assert idler.wait(lambda k=k: idler.count == 6 + k, 10), (k, idler.lines)
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    assert moved.returncode == 0, moved.stderr
    assert idler.wait(lambda: idler.bye() is not None, HANG), idler.lines
    assert not idler.errors and idler.expunged == 0, (idler.errors, idler.lines)
    w.close()
    idler.close()
    exact(fleet, proxy, "carol", ids("m", 5) + ids("x", 5))


# -- 2. SIGHUP in the middle of things --------------------------------------------------------------------


def _reload(proxy, rules: list[dict], drop: str | None = None) -> None:
    """Rewrite the config (*rules*; *drop* a backend) and SIGHUP."""
    from conftest import toml_dumps
    cfg = dict(proxy.config)
    cfg["map"] = {**cfg["map"], "rules": rules}
    if drop:
        cfg["backends"] = {k: v for k, v in cfg["backends"].items() if k != drop}
    proxy.config_path.write_text(toml_dumps(cfg))
    proxy.send_signal(signal.SIGHUP)


MOVED_RULES = [{"mailbox": "Shared/*", "backend": "b2"}, {"mailbox": "Archive/*", "backend": "b2"}]


@pytest.mark.parametrize("at", [0.0, 0.2, 0.6])
def test_reload_during_a_multiappend(proxy_factory, fleet, at):
    """A MULTIAPPEND into Shared/X (b3 by the rules) half sent; Shared/* moves to b2 meanwhile (Shared/X
    made on b2 too, so both routes are real): its answer must say where its mail is, once."""
    seed(fleet["b3"], "carol", "Shared/X", ids("x", 3))
    seed(fleet["b2"], "carol", "Shared/X", ids("y", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    msgs = [body(f"ma-{i}@t", 2000) for i in range(6)]
    w.send(b"a APPEND Shared/X {%d}\r\n" % len(msgs[0]))
    assert w.line().startswith(b"+")
    for i, m in enumerate(msgs[:-1]):
        w.send(m + b" {%d}\r\n" % len(msgs[i + 1]))
        assert w.line().startswith(b"+")
        if i == 2:
            time.sleep(at)
            _reload(proxy, MOVED_RULES)
            time.sleep(0.3)
    w.send(msgs[-1] + b"\r\n")
    answer = w.until_tagged(b"a")[-1]
    w.close()
    print(answer, proxy.stderr_text()[-600:])
    ok = answer.startswith(b"a OK")
    counts, where = census(fleet, "carol")
    lost, dup = judge(counts, ids("x", 3) + ids("y", 2) + (ids("ma", 6) if ok else []))
    assert (lost, dup) == ([], []), (answer, lost, [(d, where[d]) for d in dup])
    if ok:  # all in one mailbox
        assert len({tuple(where[i]) for i in ids("ma", 6)}) == 1, {i: where[i] for i in ids("ma", 6)}


@pytest.mark.parametrize("cmd", [b"MOVE", b"COPY"])
@pytest.mark.parametrize("at", [0.05, 0.3, 0.8])
def test_reload_during_a_move_across(proxy_factory, fleet, cmd, at):
    mail = ids("w", 400)
    seed(fleet["b1"], "carol", "Work", mail, size=3000)
    seed(fleet["b3"], "carol", "Shared/X", [])
    seed(fleet["b2"], "carol", "Shared/X", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID " + cmd + b" 1:* Shared/X\r\n")
    time.sleep(at)
    _reload(proxy, MOVED_RULES)
    t0 = time.monotonic()
    answer = w.until_tagged(b"m")
    took = time.monotonic() - t0
    n = w.cmd(b"n", b"NOOP")
    w.close()
    print(answer[-1], took, n[-1])
    ok = answer[-1].startswith(b"m OK")
    counts, where = census(fleet, "carol")
    if cmd == b"COPY":
        expect = {i: 2 if ok else 1 for i in mail}
    else:
        expect = {i: 1 for i in mail}
    wrong = {i: where[i] for i in mail if counts[i] != expect[i]}
    assert not wrong, (answer[-1], len(wrong), list(wrong.items())[:5])
    places = {p for i in mail for p in where[i]}
    if ok and cmd == b"MOVE":
        assert len(places) == 1 and ("b1", "Work") not in places, places
    if not ok and cmd == b"MOVE":
        assert places == {("b1", "Work")}, (answer[-1], places)


@pytest.mark.parametrize("change", ["rules", "drop-b2", "add"])
def test_reload_during_an_admin_move(proxy_factory, fleet, change):
    mail = ids("w", 300)
    seed(fleet["b1"], "carol", "Work", mail, size=3000)
    seed(fleet["b3"], "carol", "Shared/X", ids("s", 4))
    seed(fleet["b2"], "carol", "Shared/X", [])
    cfg = MASTERS
    if change == "add":  # b2 not configured at first: added (with a rule to it) mid-move
        cfg = {"backends": {**MASTERS["backends"], "b2": None}}
    proxy = proxy_factory(cfg, rules=RULES if change != "add" else RULES[:1])
    idler = Idler(proxy, b"Shared/X")
    mover = admin_move(proxy, "carol", "Work", "b3")
    time.sleep(0.5)
    if change == "rules":
        _reload(proxy, MOVED_RULES)
    elif change == "drop-b2":
        proxy.config["map"]["rules"] = RULES[:1]
        _reload(proxy, RULES[:1], drop="b2")
    else:
        full = dict(proxy.config)
        full["backends"] = {**full["backends"], "b2": {"endpoint": fleet["b2"].endpoint, "url": fleet["b2"].url,
                                                       "tls": "none", "master_user": MASTER_USER,
                                                       "master_password": MASTER_PASSWORD}}
        proxy.config.update(full)
        _reload(proxy, RULES)
    out = mover.communicate(timeout=300)
    time.sleep(1.5)
    # the idler (Shared/X on b3) hears something it can act on, or stays (NOOP answered after DONE)
    if idler.closed_at is None and idler.bye() is None:
        idler.w.send(b"DONE\r\nn NOOP\r\n")
        assert idler.tagged(b"n") is not None, idler.lines
    print(change, mover.returncode, out[0][-200:], out[1][-300:], [ln for _, ln in idler.lines][:6])
    assert not idler.errors, idler.errors
    idler.close()
    counts, where = census(fleet, "carol")
    lost, dup = judge(counts, mail + ids("s", 4))
    assert (lost, dup) == ([], []), (lost[:5], [(d, where[d]) for d in dup[:5]])
    if mover.returncode == 0:
        assert {where[i][0] for i in mail} == {("b3", "Work")}
        w = Wire(proxy.host, proxy.port, timeout=60)
        w.login("carol")
        st = w.cmd(b"s", b"STATUS Work (MESSAGES)")
        w.close()
        assert st[0] == b"* STATUS Work (MESSAGES 300)\r\n", st


@pytest.mark.parametrize("mode", ["rules", "drop-b3"])
def test_reload_while_idle_in_a_mailbox_the_rule_takes_elsewhere(proxy_factory, fleet, mode):
    seed(fleet["b3"], "carol", "Shared/X", ids("s", 4))
    seed(fleet["b2"], "carol", "Shared/X", ids("t", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    idler = Idler(proxy, b"Shared/X")
    other = Idler(proxy, b"INBOX")
    t0 = time.monotonic()
    if mode == "rules":
        _reload(proxy, MOVED_RULES)
    else:
        _reload(proxy, [{"mailbox": "Archive/*", "backend": "b2"}], drop="b3")
    got = idler.wait(lambda: idler.bye() is not None or idler.closed_at is not None, 6)
    print(mode, time.monotonic() - t0, [ln for _, ln in idler.lines], proxy.stderr_text()[-500:])
    if not got:  # it stayed: it must still work
        idler.w.send(b"DONE\r\nn NOOP\r\n")
        assert idler.tagged(b"n") is not None, idler.lines
    other.w.send(b"DONE\r\nn NOOP\r\n")
    assert other.tagged(b"n") is not None and other.bye() is None, other.lines
    idler.close()
    other.close()


# -- 3. a client that never reads, its mailbox moved by the admin ------------------------------------------


@pytest.mark.parametrize("pending", [b"FETCH 1:* BODY.PEEK[]", b"FETCH 1:* BODY.PEEK[]\r\nm UID MOVE 1 A",
                                     b"IDLE"])
def test_a_client_that_never_reads_while_the_admin_moves_its_mailbox(proxy_factory, fleet, pending):
    mail = ids("big", 40)
    seed(fleet["b1"], "carol", "Work", mail, size=200_000)  # 8 MB: more than the sockets between hold
    seed(fleet["b1"], "carol", "A", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    stalled = Wire(proxy.host, proxy.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.login("carol")
    assert stalled.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    if pending == b"IDLE":  # an idler whose updates back up: then a big FETCH to be answered after DONE
        stalled.send(b"i IDLE\r\n")
        assert stalled.line().startswith(b"+")
        stalled.send(b"DONE\r\nf FETCH 1:* BODY.PEEK[]\r\n")
    else:
        stalled.send(pending + b"\r\n")  # and never read again
    other = Wire(proxy.host, proxy.port, timeout=60)
    other.login("carol")
    assert other.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    t0 = time.monotonic()
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b2", timeout=180)
    took = time.monotonic() - t0
    # other sessions go on
    for k, c in enumerate([b"SELECT Work", b"NOOP", b"LIST \"\" *", b"STATUS A (MESSAGES)"]):
        r = other.cmd(b"o%d" % k, c)
        assert r[-1].startswith(b"o%d OK" % k), (c, r[-1])
    third = Wire(proxy.host, proxy.port, timeout=60)
    third.login("carol")
    assert third.cmd(b"s", b"SELECT A")[-1].startswith(b"s OK")
    third.close()
    print(pending, moved.returncode, took, moved.stdout[-200:], moved.stderr[-300:])
    assert moved.returncode == 0, moved.stdout + moved.stderr
    stalled.close()
    other.close()
    time.sleep(1)
    counts, where = census(fleet, "carol")
    assert {i: where[i] for i in mail if counts[i] != 1} == {}


@pytest.mark.parametrize("workers", [1, 2])
def test_short_admin_moves_under_an_idler_with_workers(proxy_factory, fleet, workers):
    """test_idle_admin_move_no_expunge's rounds, with [proxy] workers = 2 too (each worker looks on its own)."""
    from test_idle_admin_move_no_expunge import _idle

    mail = ids("m", 3)
    seed(fleet["b1"], "carol", "INBOX", mail)
    proxy = proxy_factory(MASTERS, rules=RULES, workers=workers)
    where, bad = "b1", []
    for rnd in range(5):
        to = "b2" if where == "b1" else "b1"
        w, heard, t = _idle(proxy, b"INBOX")
        moved = cli("move", "--config", str(proxy.config_path), "carol", "INBOX", to)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        where = to
        t.join(HANG)
        w.close()
        t.join(5)
        assert any(line.startswith(b"* BYE") for line in heard), (rnd, heard)
        if any(line.endswith(b" EXPUNGE\r\n") for line in heard):
            bad.append((rnd, heard))
        time.sleep(0.3 * (rnd % 3))
    exact(fleet, proxy, "carol", mail)
    assert not bad, bad[:2]
