"""Two proxy processes on one PostgreSQL map, their sessions racing on the same mailboxes.

Not collected by the suite (none of these found anything on main; ~3 min): run it by name,
``python3 -m pytest tests/race_two_proxies.py``. What found something is in test_several_proxies.py.

Each test starts commands on both proxies at the same instant (a barrier) and judges only by
a census of the backends (movecheck.py): every message once, wherever the winner put it.
"""

from __future__ import annotations

import threading

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, judge, seed, through_proxy
from test_moves import _at_once
from test_several_proxies import RULES, _config, _entries, _exactly_once, ids, killed_mid_rename

pytestmark = pytest.mark.usefixtures("clean_mail")


def _logged_in(proxy, user: str = "carol") -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=180)
    w.login(user)
    return w


def _two(proxy_factory, pg_dsn):
    return proxy_factory(_config(pg_dsn), rules=RULES), proxy_factory(_config(pg_dsn), rules=RULES)


def _work_on_two(proxy_factory, fleet, pg_dsn, n: int, users=("carol", "carol")):
    """Work (*n* messages) on b1, proxies A and B, a session on each: (ids, A, B, sessions)."""
    work = ids("work", n)
    seed(fleet["b1"], "carol", "Work", work)
    a, b = _two(proxy_factory, pg_dsn)
    return work, a, b, [_logged_in(a, users[0]), _logged_in(b, users[1])]


@pytest.mark.parametrize("users", [("carol", "carol"), ("carol", "CAROL")])
def test_the_same_rename_across_from_two_proxies_at_once(proxy_factory, fleet, pg_dsn, users):
    work, a, b, wires = _work_on_two(proxy_factory, fleet, pg_dsn, 300, users)
    answers = _at_once(wires, [b"RENAME Work Shared/A", b"RENAME Work Shared/A"])
    assert sum(t.split()[1] == b"OK" for t in answers) == 1, answers
    for w in wires:
        w.close()
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in work} == {("b3", "Shared/A")}
    _exactly_once(fleet, [a, b], "carol", work)
    assert _entries(pg_dsn) == 0


def test_rename_there_and_back_from_two_proxies(proxy_factory, fleet, pg_dsn):
    """A: RENAME Work Shared/A while B: RENAME Shared/A Work, ten times over."""
    work, a, b, wires = _work_on_two(proxy_factory, fleet, pg_dsn, 120)
    seen = []
    for k in range(10):
        there, back = (b"RENAME Work Shared/A", b"RENAME Shared/A Work")
        answers = _at_once(wires, [there, back] if k % 2 == 0 else [back, there])
        seen.append(answers)
    for w in wires:
        w.close()
    assert any(b" OK" in t for pair in seen for t in pair), seen
    _exactly_once(fleet, [a, b], "carol", work)
    assert _entries(pg_dsn) == 0


def test_rename_across_and_delete_at_once(proxy_factory, fleet, pg_dsn):
    work, a, b, wires = _work_on_two(proxy_factory, fleet, pg_dsn, 300)
    answers = _at_once(wires, [b"RENAME Work Shared/A", b"DELETE Work"])
    renamed, deleted = (x.split()[1] == b"OK" for x in answers)
    assert renamed != deleted, answers
    for w in wires:
        w.close()
    counts, where = census(fleet, "carol")
    if renamed:
        assert {where[i][0] for i in work} == {("b3", "Shared/A")}
        _exactly_once(fleet, [a, b], "carol", work)
    else:  # deleted: nothing of it anywhere (no copy left on b3)
        assert sum(counts.values()) == 0, where
    assert _entries(pg_dsn) == 0


@pytest.mark.parametrize("then", [b"UID MOVE 1:* Proj", b"UID COPY 1:* Proj"])
def test_a_session_selected_on_b_while_a_moves_its_mailbox(proxy_factory, fleet, pg_dsn, then):
    """B's session had Work selected; A moved Work to b3: B's next commands must not act on the old one."""
    work = ids("work", 50)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Proj", [])
    a, b = _two(proxy_factory, pg_dsn)
    on_b = _logged_in(b)
    assert on_b.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    on_a = _logged_in(a)
    assert on_a.cmd(b"r", b"RENAME Work Shared/W")[-1].startswith(b"r OK")
    try:
        first = on_b.cmd(b"x", then)
        second = on_b.cmd(b"y", b"EXPUNGE")
    except ConnectionError:
        first = second = [b"(closed)"]
    on_a.close()
    on_b.close()
    counts, where = census(fleet, "carol")
    moved = judge(counts, work)
    assert moved[0] == [], (first, second, moved)
    if not then.startswith(b"UID COPY"):  # a copy answered OK may be a second one
        assert moved == ([], []), (first, second, {i: where[i] for i in moved[1][:5]})
        assert {where[i][0] for i in work} == {("b3", "Shared/W")}, (first, second)


@pytest.mark.parametrize("step", ["copied:1", "placed:1"])
def test_a_killed_mid_move_recovered_by_two_starting_proxies_at_once(proxy_factory, fleet, pg_dsn, step):
    """A is SIGKILLed mid-RENAME; A restarted and a new proxy C both recover at start-up at the same
    moment, while B's sweep may too: exactly one of them takes the entry, every message once."""
    work, a, b = killed_mid_rename(proxy_factory, fleet, pg_dsn, step, 60)
    c = proxy_factory(_config(pg_dsn), rules=RULES, wait=False)
    a.start(wait=False)
    a.wait_greeting(30)
    c.wait_greeting(30)
    for _ in range(600):
        if _entries(pg_dsn) == 0:
            break
        threading.Event().wait(0.1)
    assert _entries(pg_dsn) == 0
    for _ in range(600):  # (its log line comes just after the entry is gone)
        done = [(p.stderr_text() + p.stdout_text()).count("recovery: carol: Work -> Shared/Work") for p in (a, b, c)]
        if sum(done):
            break
        threading.Event().wait(0.1)
    a.stop()  # (their logs complete)
    c.stop()
    done = [(p.stderr_text() + p.stdout_text()).count("recovery: carol: Work -> Shared/Work") for p in (a, b, c)]
    assert sum(done) == 1, done
    a.start()
    c.start()
    _exactly_once(fleet, [a, b, c], "carol", work)
    reached = through_proxy(b, "carol")
    assert [i for i in work if reached[i] != 1] == []
    assert cli("recover", "--config", str(b.config_path)).returncode == 0


def _move_one_by_one(wire: Wire, n: int, target: bytes, stop: threading.Event, answers: dict) -> threading.Thread:
    """UID MOVE 1, 2, ... n to *target*, one command each, until stopped or BYE; *answers*: uid -> tagged line."""
    def run() -> None:
        for uid in range(1, n + 1):
            if stop.is_set():
                return
            reply = wire.cmd(b"m%d" % uid, b"UID MOVE %d %s" % (uid, target))
            answers[uid] = reply[-1]
            if any(x.startswith(b"* BYE") for x in reply):
                return
    t = threading.Thread(target=run)
    t.start()
    return t


def _renamed_meanwhile(renamer: Wire, command: bytes, stop: threading.Event, t: threading.Thread,
                       wires: list[Wire]) -> None:
    """*command* (a RENAME) on *renamer* while *t* MOVEs (again while INUSE: one of the MOVEs across holds
    the mailbox); then the MOVEs stopped, the sessions closed. It must be OK."""
    while True:
        renamed = renamer.cmd(b"r", command)
        if not renamed[-1].startswith(b"r NO [INUSE]"):
            break
    stop.set()
    t.join(300)
    for w in wires:
        w.close()
    assert renamed[-1].startswith(b"r OK"), renamed


@pytest.mark.parametrize("rename", [b"RENAME Work Shared/W", b"RENAME Archive/X Shared/X"])
def test_messages_moved_across_while_the_other_proxy_renames_a_mailbox_across(proxy_factory, fleet, pg_dsn, rename):
    """A MOVEs Work's messages (b1) into Archive/X (b2) one by one; B RENAMEs their source to Shared/W,
    or their destination to Shared/X (b3)."""
    work, old = ids("work", 150), ids("old", 100)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b2"], "carol", "Archive/X", old)
    a, b = _two(proxy_factory, pg_dsn)
    mover, renamer = _logged_in(a), _logged_in(b)
    assert mover.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    stop = threading.Event()
    t = _move_one_by_one(mover, 150, b"Archive/X", stop, {})
    _renamed_meanwhile(renamer, rename, stop, t, [mover, renamer])
    _exactly_once(fleet, [a, b], "carol", work + old)
    assert _entries(pg_dsn) == 0


def test_messages_moved_across_into_a_mailbox_the_other_proxy_deletes(proxy_factory, fleet, pg_dsn):
    """A MOVEs Work's messages (b1) into Archive/X (b2); B DELETEs Archive/X meanwhile: a message whose MOVE
    was not answered OK is still in Work, once; none is anywhere twice."""
    work = ids("work", 150)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b2"], "carol", "Archive/X", [])
    a, b = _two(proxy_factory, pg_dsn)
    mover, deleter = _logged_in(a), _logged_in(b)
    assert mover.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    stop, answers = threading.Event(), {}
    t = _move_one_by_one(mover, 150, b"Archive/X", stop, answers)
    while len(answers) < 20:
        threading.Event().wait(0.01)
    while True:  # INUSE while one of the MOVEs across holds Archive/X
        deleted = deleter.cmd(b"d", b"DELETE Archive/X")
        if not deleted[-1].startswith(b"d NO [INUSE]"):
            break
    t.join(300)
    mover.close()
    deleter.close()
    assert deleted[-1].startswith(b"d OK"), deleted
    counts, where = census(fleet, "carol")
    refused = [work[u - 1] for u, line in answers.items() if b" OK" not in line] + [work[u - 1] for u in range(1, 151)
                                                                                   if u not in answers]
    assert [i for i in refused if counts[i] != 1] == [], {i: where.get(i) for i in refused if counts[i] != 1}
    assert [i for i in counts if counts[i] > 1] == []
    assert _entries(pg_dsn) == 0


@pytest.mark.parametrize("target", [b"Archive/X", b"Proj"])  # (Proj on b1 too: the turns of pgturns.py)
def test_the_same_message_moved_from_two_proxies_at_once(proxy_factory, fleet, pg_dsn, target):
    """Two sessions (one on each proxy) UID MOVE the same messages at the same instant, one by one."""
    work = ids("work", 40)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b2"], "carol", "Archive/X", [])
    seed(fleet["b1"], "carol", "Proj", [])
    a, b = _two(proxy_factory, pg_dsn)
    wires = [_logged_in(a), _logged_in(b)]
    for w in wires:
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    both_ok = []
    for uid in range(1, 41):
        answers = _at_once(wires, [b"UID MOVE %d %s" % (uid, target)] * 2)
        if all(x.split()[1] == b"OK" for x in answers):
            both_ok.append(uid)
    for w in wires:
        w.close()
    counts, where = census(fleet, "carol")
    twice = {i: where[i] for i in work if counts[i] != 1}
    assert twice == {}, (both_ok, twice)


B_OPS = [b"UID MOVE 1 Proj", b"UID MOVE 2 Archive/Y", b"UID STORE 3 +FLAGS.SILENT (\\Deleted)",
         b"UID EXPUNGE 3", b"CLOSE", b"SELECT Shared/W", b"UID MOVE 1:* Proj", b"CLOSE", b"RENAME Work/c Archive/C",
         b"RENAME Shared/W Shared/V", b"DELETE Work/c"]


@pytest.mark.parametrize("step", ["copied:1", "placed:1", "aside:1", "drained:2"])
def test_the_other_proxy_works_on_a_mailbox_at_each_step_of_its_move(proxy_factory, fleet, pg_dsn, tmp_path, step):
    """A stops at each step of RENAME Work Shared/W; B's session does what clients do to Work, Work/c
    and Shared/W meanwhile (APPENDs too); then A goes on. Every message once, wherever it went."""
    from movecheck import body, wait_paused

    work, child = ids("work", 30), ids("child", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/c", child)
    seed(fleet["b1"], "carol", "Proj", [])
    seed(fleet["b2"], "carol", "Archive/Y", [])
    pause = tmp_path / "pause"
    pause.mkdir()
    a = proxy_factory(_config(pg_dsn), rules=RULES, command=faulty("--pause-at", step, "--pause-dir", str(pause)))
    b = proxy_factory(_config(pg_dsn), rules=RULES)
    on_a, on_b = _logged_in(a), _logged_in(b)
    assert on_b.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")  # before the move: B knows nothing of it yet
    on_a.send(b"r RENAME Work Shared/W\r\n")
    assert wait_paused(pause, step) == step
    answers = []
    appended = {}
    for k, box in enumerate([b"Work", b"Shared/W", b"Work/c"]):
        mid = f"b-{k}@t"
        data = body(mid)
        on_b.send(b"a%d APPEND %s {%d+}\r\n" % (k, box, len(data)) + data + b"\r\n")
        reply = on_b.until_tagged(b"a%d" % k)
        appended[mid] = reply[-1]
    for k, command in enumerate(B_OPS):
        try:
            answers.append((command, on_b.cmd(b"b%d" % k, command)[-1]))
        except ConnectionError:  # BYE: the session's mailbox moved
            answers.append((command, b"(closed)"))
            break
    (pause / "resume").touch()
    done = on_a.until_tagged(b"r")
    on_a.close()
    on_b.close()
    for _ in range(600):
        if _entries(pg_dsn) == 0:
            break
        threading.Event().wait(0.1)
    counts, where = census(fleet, "carol")
    must = work + child + [m for m, line in appended.items() if b" OK" in line]
    lost, duplicated = judge(counts, must, may=list(appended))
    assert (lost, duplicated) == ([], []), (done, appended, answers, {i: where.get(i) for i in lost + duplicated})
