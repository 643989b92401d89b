"""The administrator's `referral-proxy move` against clients and against itself (round 9a).

Not collected by the suite (slow; run by name: ``python3 -m pytest tests/race_admin.py``).
Judged only by a census of the backends (movecheck.py): every message once.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from imapwire import Wire
from movecheck import Deliverer, admin_move, body, census, cli, exact, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

MASTERS = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}@t" for i in range(n)]


def _proxy(proxy_factory, store: str | None = None, **kw):
    cfg: dict = {"backends": MASTERS}
    if store:
        cfg["map"] = {"store": store}
    return proxy_factory(cfg, **kw)


def _move_beside(proxy, w: Wire, client, stop: threading.Event, log: list) -> subprocess.CompletedProcess:
    """`move carol Work b2` while *client()* runs in a thread on *w* (until the move is over)."""
    def run() -> None:
        try:
            client()
        except (ConnectionError, OSError) as e:
            log.append(("closed", repr(e)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.4)
    moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b2", timeout=300)
    time.sleep(0.4)
    stop.set()
    t.join(60)
    w.close()
    return moved


@pytest.mark.parametrize("what", ["Work", "*", "Work+*", "Work/c+Work", "INBOX+*"])
@pytest.mark.parametrize("run", range(3))
def test_two_admin_moves_of_the_same_mailbox_at_once(proxy_factory, fleet, what, run):
    work, inbox = ids("work", 200), ids("inbox", 20)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work/c", ids("child", 10))
    proxy = _proxy(proxy_factory)
    names = what.split("+") if "+" in what else [what, what]
    children = [admin_move(proxy, "carol", n, b) for n, b in zip(names, ("b2", "b3"))]
    outs = [c.communicate(timeout=300) for c in children]
    codes = [c.returncode for c in children]
    assert 0 in codes, (codes, outs)  # both OK when one came after the other had ended
    exact(fleet, proxy, "carol", work + inbox + ids("child", 10))


@pytest.mark.parametrize("run", range(3))
def test_admin_move_while_a_client_works_in_the_selected_mailbox(proxy_factory, fleet, run):
    """A session SELECTs Work and keeps flagging, UID MOVEing to Proj (same backend) and APPENDing into
    Work while the admin moves Work to b2."""
    work = ids("work", 150)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Proj", [])
    proxy = _proxy(proxy_factory)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    appended: dict[str, bytes] = {}
    log: list = []
    stop = threading.Event()

    def client() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            for tag, c in [(b"f%d" % k, b"UID STORE %d +FLAGS (\\Flagged)" % (k % 150 + 1)),
                           (b"m%d" % k, b"UID MOVE %d Proj" % (k % 150 + 1)),
                           (b"n%d" % k, b"NOOP")]:
                log.append((c, w.cmd(tag, c)[-1]))
            mid = f"app-{k}@t"
            data = body(mid)
            w.send(b"a%d APPEND Work {%d+}\r\n" % (k, len(data)) + data + b"\r\n")
            appended[mid] = w.until_tagged(b"a%d" % k)[-1]

    moved = _move_beside(proxy, w, client, stop, log)
    must = work + [m for m, a in appended.items() if b" OK" in a]
    exact(fleet, proxy, "carol", must, may=list(appended))
    assert moved.returncode == 0, moved.stdout + moved.stderr


@pytest.mark.parametrize("what", ["INBOX", "inbox", "*"])
def test_admin_move_of_inbox_while_mail_is_delivered_to_it(proxy_factory, fleet, what):
    inbox = ids("inbox", 100)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = _proxy(proxy_factory)
    d = Deliverer(fleet["b1"], "carol", "INBOX", "live")
    d.start()
    time.sleep(0.3)
    moved = cli("move", "--config", str(proxy.config_path), "carol", what, "b2", timeout=300)
    time.sleep(0.5)
    d.stop()
    assert moved.returncode == 0, moved.stdout + moved.stderr
    # mail delivered to the old INBOX after the move is carried by recover (old-home watch)
    rec = cli("recover", "--config", str(proxy.config_path))
    assert rec.returncode == 0, rec.stdout + rec.stderr
    exact(fleet, proxy, "carol", inbox + d.acked)


@pytest.mark.parametrize("rename", [b"RENAME Work Work2", b"RENAME Top Top2", b"RENAME Work Archive/W"])
@pytest.mark.parametrize("run", range(2))
def test_admin_move_while_a_client_renames(proxy_factory, fleet, rename, run):
    work = ids("work", 150)
    seed(fleet["b1"], "carol", "Top", [])
    seed(fleet["b1"], "carol", "Top/Work", work)
    seed(fleet["b1"], "carol", "Work", ids("w2", 30))
    proxy = _proxy(proxy_factory, rules=[{"mailbox": "Archive/*", "backend": "b2"}])
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    mover = admin_move(proxy, "carol", "Top/Work" if b"Top" in rename else "Work", "b3")
    time.sleep(0.2)
    answer = w.cmd(b"r", rename)[-1]
    out = mover.communicate(timeout=300)
    w.close()
    exact(fleet, proxy, "carol", work + ids("w2", 30))
    print(answer, mover.returncode, out)


@pytest.mark.parametrize("rename", [b"RENAME Top Top2", b"RENAME Top Archive/T", b"RENAME Top/Work Top/W2",
                                    b"DELETE Top", b"RENAME INBOX Top/Work/x"])
@pytest.mark.parametrize("step", ["planned:1", "copied:1", "placed:1", "aside:1"])
def test_a_client_renames_the_parent_at_each_step_of_an_admin_move(proxy_factory, fleet, tmp_path, rename, step):
    from movecheck import start_paused, wait_paused

    work, inbox = ids("work", 40), ids("inbox", 5)
    seed(fleet["b1"], "carol", "Top", ids("top", 3))
    seed(fleet["b1"], "carol", "Top/Work", work)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    proxy = _proxy(proxy_factory, rules=[{"mailbox": "Archive/*", "backend": "b2"}])
    pause = tmp_path / "pause"
    mover = start_paused(pause, step, "move", "--config", str(proxy.config_path), "carol", "Top/Work", "b3")
    assert wait_paused(pause, step) == step
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    answer = w.cmd(b"r", rename)[-1]
    (pause / "resume").touch()
    out = mover.communicate(timeout=300)
    w.close()
    may = inbox if b"INBOX" in rename else []
    counts, where = census(fleet, "carol")
    print(answer, mover.returncode, out[0][-300:], {where[i][0] for i in work})
    exact(fleet, proxy, "carol", work + ids("top", 3) + ([] if b"DELETE" in rename and b" OK" in answer else []) + (
        [] if may else inbox), may=may)


@pytest.mark.parametrize("step", ["copying:2", "copied:1", "committed:1", "placed:1", "aside:1", "drained:1"])
def test_the_survivors_answers_while_a_killed_proxys_move_holds_the_names(proxy_factory, fleet, pg_dsn, step):
    from test_several_proxies import killed_mid_rename

    work, a, b = killed_mid_rename(proxy_factory, fleet, pg_dsn, step, 40)
    seed(fleet["b1"], "carol", "Work/c", ids("child", 3))
    on_b = Wire(b.host, b.port, timeout=120)
    on_b.login("carol")
    answers = {}
    for tag, c in [(b"l", b'LIST "" "*"'), (b"m", b'LIST "" "%"'), (b"n", b'LSUB "" "*"'),
                   (b"s", b"STATUS Work (MESSAGES)"),
                   (b"t", b"SELECT Work"), (b"u", b"SELECT Shared/Work"), (b"v", b"STATUS Shared/Work (MESSAGES)"),
                   (b"w", b'LIST "" "Work*"'), (b"x", b'LIST "" "Shared/*"'), (b"y", b'RLIST "" "*"')]:
        answers[c] = on_b.cmd(tag, c)
    on_b.close()
    for c, lines in answers.items():
        print(c, lines)
    listed = b"".join(answers[b'LIST "" "*"'])
    assert b"referral-proxy" not in listed and b"\\0" not in listed, listed
    assert listed.count(b" Work\r\n") + listed.count(b' "Work"\r\n') <= 1, listed


@pytest.mark.parametrize("box", ["Work", "INBOX"])
@pytest.mark.parametrize("step", ["planned:1", "copied:1", "committed:1", "placed:1", "aside:1", "drained:1", "end"])
def test_a_multiappend_open_across_each_step_of_an_admin_move(proxy_factory, fleet, tmp_path, box, step):
    """The client's MULTIAPPEND into the mailbox has sent its first message when the admin move
    starts; it sends the second and its end while the move stands at *step* (or after it ended)."""
    from movecheck import start_paused, wait_paused

    work = ids("work", 30)
    seed(fleet["b1"], "carol", box, work)
    proxy = _proxy(proxy_factory)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    one, two = body("ma-1@t"), body("ma-2@t")
    w.send(b"a APPEND %s {%d}\r\n" % (box.encode(), len(one)))
    assert w.line().startswith(b"+")
    w.send(one + b" {%d}\r\n" % len(two))
    first = w.line()
    assert first.startswith(b"+"), first
    pause = tmp_path / "pause"
    if step == "end":
        moved = cli("move", "--config", str(proxy.config_path), "carol", box, "b2", timeout=300)
        out = (moved.returncode, moved.stdout[-300:], moved.stderr[-300:])
    else:
        mover = start_paused(pause, step, "move", "--config", str(proxy.config_path), "carol", box, "b2")
        try:
            assert wait_paused(pause, step) == step
        except AssertionError:
            mover.kill()
            raise AssertionError(mover.communicate()[0][-500:]) from None
    w.send(two + b"\r\n")
    answer = w.until_tagged(b"a")[-1]
    if step != "end":
        (pause / "resume").touch()
        o = mover.communicate(timeout=300)[0]
        out = (mover.returncode, o[-300:])
    w.close()
    rec = cli("recover", "--config", str(proxy.config_path))
    counts, where = census(fleet, "carol")
    print(answer, out, rec.stdout, {m: where.get(m) for m in ("ma-1@t", "ma-2@t")})
    ok = answer.startswith(b"a OK")
    exact(fleet, proxy, "carol", work + (["ma-1@t", "ma-2@t"] if ok else []))


@pytest.mark.parametrize("run", range(4))
def test_admin_move_while_a_client_expunges_and_moves_across(proxy_factory, fleet, run):
    work = ids("work", 200)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/X", [])
    proxy = _proxy(proxy_factory, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    deleted: list[str] = []
    log: list = []
    stop = threading.Event()

    def client() -> None:
        k = 0
        while not stop.is_set():
            k += 2
            deleted.append(f"work-{k - 1}@t")
            for tag, c in [(b"f%d" % k, b"UID STORE %d +FLAGS (\\Deleted)" % k),
                           (b"e%d" % k, b"EXPUNGE"),
                           (b"m%d" % k, b"UID MOVE %d Shared/X" % (k + 1)),
                           (b"i%d" % k, b"IDLE")]:
                if c == b"IDLE":
                    w.send(tag + b" IDLE\r\n")
                    if w.line().startswith(b"+"):
                        time.sleep(0.05)
                        w.send(b"DONE\r\n")
                        log.append((c, w.until_tagged(tag)[-1]))
                    continue
                log.append((c, w.cmd(tag, c)[-1]))

    moved = _move_beside(proxy, w, client, stop, log)
    rec = cli("recover", "--config", str(proxy.config_path))
    print(moved.returncode, moved.stderr[-300:], rec.stdout, log[-6:], len(log))
    may = [f"work-{k - 1}@t" for k in range(2, 2 * len(deleted) + 2, 2)]
    exact(fleet, proxy, "carol", [i for i in work if i not in may], may=may)


@pytest.mark.parametrize("step", ["copying:2", "copied:1", "placed:1", "aside:1"])
def test_two_recoverers_while_a_move_runs(proxy_factory, fleet, tmp_path, step):
    from concurrent.futures import ThreadPoolExecutor

    from movecheck import move_paused

    work = ids("work", 40)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = _proxy(proxy_factory)
    pause = tmp_path / "pause"
    mover = move_paused(proxy, pause, step, "carol", "Work", "b3")
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: cli("recover", "--config", str(proxy.config_path)), range(2)))
    (pause / "resume").touch()
    out = mover.communicate(timeout=300)[0]
    print([r.stdout for r in runs], out[-200:])
    assert mover.returncode == 0
    assert all("1 entry left" in r.stdout for r in runs), [r.stdout + r.stderr for r in runs]
    exact(fleet, proxy, "carol", work)


@pytest.mark.parametrize("rename", [b"RENAME Work Archive/W", b"RENAME Work Work2", b"DELETE Work"])
@pytest.mark.parametrize("delay", [0.4, 0.6, 0.8, 1.0, 1.3])
def test_admin_move_overlapping_a_clients_rename(proxy_factory, fleet, rename, delay):
    work = ids("work", 400)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = _proxy(proxy_factory, rules=[{"mailbox": "Archive/*", "backend": "b2"}])
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    mover = admin_move(proxy, "carol", "Work", "b3")
    time.sleep(delay)
    answer = w.cmd(b"r", rename)[-1]
    out = mover.communicate(timeout=300)
    w.close()
    print(answer, mover.returncode, out[1][-200:])
    deleted = b"DELETE" in rename and answer.startswith(b"r OK")
    exact(fleet, proxy, "carol", [] if deleted else work)
